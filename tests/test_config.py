from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_quant.config import (
    BACKENDS,
    CALIBRATION_DATA,
    OBSERVERS,
    QuantConfig,
    expect_modules,
    resolve_backend,
    speed_change,
)

BAD_INPUTS = [
    # (callable, kwargs, exception, regex the message must match)
    (QuantConfig, {"backend": "x87"}, ValueError, r"`backend`.*Did you mean 'x86'\?"),
    (QuantConfig, {"backend": "fbgem"}, ValueError, r"`backend`.*Did you mean 'fbgemm'\?"),
    (QuantConfig, {"backend": "cuda"}, ValueError, r"`backend` to be 'x86', 'arm' or an alias \('fbgemm', "),
    (QuantConfig, {"backend": None}, TypeError, r"`backend` to be a string.*NoneType"),
    (QuantConfig, {"backend": 86}, TypeError, r"`backend` to be a string.*int"),
    (resolve_backend, {"backend": "amr"}, ValueError, r"`backend`.*Did you mean 'arm'\?"),
    (resolve_backend, {"backend": ["x86"]}, TypeError, r"`backend` to be a string"),
    (QuantConfig, {"observer": "histogramm"}, ValueError, r"`observer`.*Did you mean 'histogram'\?"),
    (QuantConfig, {"observer": "foo"}, ValueError, r"`observer` to be one of 'histogram', 'minmax', 'moving_average'"),
    (QuantConfig, {"observer": 1}, TypeError, r"`observer` to be a string"),
    (QuantConfig, {"calibration_data": "test"}, ValueError, r"`calibration_data` to be one of 'train', 'val'"),
    (QuantConfig, {"calibration_data": None}, TypeError, r"`calibration_data` to be a string"),
    (QuantConfig, {"num_calibration_samples": 0}, ValueError, r"`num_calibration_samples` to be a positive int.*0"),
    (QuantConfig, {"num_calibration_samples": -5}, ValueError, r"`num_calibration_samples`.*-5"),
    (QuantConfig, {"num_calibration_samples": True}, TypeError, r"`num_calibration_samples`.*bool"),
    (QuantConfig, {"num_calibration_samples": 1.5}, TypeError, r"`num_calibration_samples`.*float"),
    (QuantConfig, {"num_calibration_samples": "10"}, TypeError, r"`num_calibration_samples`.*str"),
    (QuantConfig, {"max_batch_size": 1}, ValueError, r"`max_batch_size` to be >= 2.*dynamic"),
    (QuantConfig, {"max_batch_size": 0}, ValueError, r"`max_batch_size` to be a positive int"),
    (QuantConfig, {"max_batch_size": 2.0}, TypeError, r"`max_batch_size`.*float"),
    (QuantConfig, {"modules": []}, ValueError, r"`modules` to name at least one submodule"),
    (QuantConfig, {"modules": ["model", " "]}, ValueError, r"`modules` to name at least one submodule"),
    (QuantConfig, {"modules": ["head", "head"]}, ValueError, r"`modules` to name each submodule once"),
    (QuantConfig, {"modules": ["m", "m.conv"]}, ValueError, r"`modules` to name disjoint.*'m' contains 'm.conv'"),
    (QuantConfig, {"modules": ["self", "head"]}, ValueError, r"`modules` to name disjoint.*'self' contains 'head'"),
    (QuantConfig, {"modules": 5}, TypeError, r"`modules` to be None, a dotted submodule name or a list"),
    (QuantConfig, {"modules": ["model", 1]}, TypeError, r"`modules`"),
    (QuantConfig, {"modules": {"model": True}}, TypeError, r"`modules`"),
    (expect_modules, {"value": ""}, ValueError, r"`modules` to name at least one"),
    (expect_modules, {"value": ("a.b", "a")}, ValueError, r"`modules` to name disjoint.*'a' contains 'a.b'"),
]


@pytest.mark.parametrize(
    ("fn", "kwargs", "exc", "match"),
    BAD_INPUTS,
    ids=[f"{fn.__name__}-{next(iter(kw))}={next(iter(kw.values()))!r}" for fn, kw, _, _ in BAD_INPUTS],
)
def test_bad_inputs(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        fn(**kwargs)
    assert type(info.value) is exc  # not a subclass standing in for it


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("x86", "x86"),
        ("fbgemm", "x86"),
        ("onednn", "x86"),
        ("FBGEMM", "x86"),
        (" OneDNN ", "x86"),
        ("arm", "arm"),
        ("ARM", "arm"),
        ("qnnpack", "arm"),
        ("xnnpack", "arm"),
        ("XNNPack", "arm"),
    ],
)
def test_backend_aliases(alias, expected):
    assert resolve_backend(alias).name == expected
    cfg = QuantConfig(backend=alias)
    assert cfg.backend == expected
    assert cfg.target is BACKENDS[expected]
    assert cfg.target.suffix == {"x86": ".pt2", "arm": ".pte"}[expected]


def test_defaults_and_normalisation():
    cfg = QuantConfig()
    assert (cfg.backend, cfg.modules, cfg.observer, cfg.calibration_data) == ("x86", None, "histogram", "train")
    assert (cfg.num_calibration_samples, cfg.max_batch_size) == (1024, 1024)
    cfg = QuantConfig(modules=" backbone ", observer=" MinMax ", calibration_data="VAL", max_batch_size=2)
    assert (cfg.modules, cfg.observer, cfg.calibration_data, cfg.max_batch_size) == (("backbone",), "minmax", "val", 2)
    assert QuantConfig(modules=["backbone", "head.fc"]).modules == ("backbone", "head.fc")
    assert QuantConfig(modules=["self"]).modules == ("self",)


def test_config_is_frozen():
    cfg = QuantConfig()
    with pytest.raises(AttributeError):
        cfg.backend = "arm"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- property test

FIELDS = ("backend", "modules", "observer", "num_calibration_samples", "calibration_data", "max_batch_size")
VALID_STRINGS = [*BACKENDS, "fbgemm", "QNNPACK", *OBSERVERS, *CALIBRATION_DATA, "model", "self", "backbone.0"]

anything = st.one_of(
    st.text(max_size=20),
    st.sampled_from(VALID_STRINGS),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.lists(st.one_of(st.text(max_size=10), st.sampled_from(VALID_STRINGS)), max_size=4),
    st.lists(st.one_of(st.integers(), st.none(), st.booleans(), st.floats()), max_size=3),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=anything)
def test_any_value_is_accepted_or_rejected_naming_the_field(field, value):
    try:
        cfg = QuantConfig(**{field: value})
    except (ValueError, TypeError) as err:  # anything else (AttributeError, KeyError, ...) fails the test
        assert f"`{field}`" in str(err), str(err)
        return
    # accepted: the stored value is normalised
    got = getattr(cfg, field)
    if field == "backend":
        assert got in BACKENDS
    elif field == "observer":
        assert got in OBSERVERS
    elif field == "calibration_data":
        assert got in CALIBRATION_DATA
    elif field == "modules":
        assert got is None or (isinstance(got, tuple) and got and all(n and n == n.strip() for n in got))
    else:
        assert type(got) is int and got >= (2 if field == "max_batch_size" else 1)


@pytest.mark.parametrize(
    ("fp32_ms", "int8_ms", "text"),
    [(2.0, 1.0, "2.00x faster"), (1.0, 1.0, "1.00x faster"), (1.0, 1.25, "1.25x slower")],
)
def test_speed_change_says_slower_rather_than_a_ratio_below_one_faster(fp32_ms, int8_ms, text):
    assert speed_change(fp32_ms, int8_ms) == text
