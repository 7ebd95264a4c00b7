"""What to quantize: backends, observers and the validated configuration shared by the callbacks.

Everything here is a plain value (strings, ints, lists) so that LightningCLI YAML can set every field.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class QuantizationError(RuntimeError):
    """A quantization step cannot go on for a reason the user can act on; the message names the cause and the fix.

    The base of :class:`~lightning_quant.CaptureError`, :class:`~lightning_quant.ExportError` and
    :class:`~lightning_quant.ArtifactError`; bad arguments raise ``ValueError``/``TypeError`` instead.
    """


@dataclass(frozen=True)
class Backend:
    """One deployment target: the quantizer recipe and the artifact it produces.

    Args:
        name: canonical name (``"x86"`` or ``"arm"``).
        aliases: other accepted spellings, e.g. the legacy engine names.
        suffix: file suffix of the exported artifact.
        artifact: a human description of the artifact.
        extra: the ``pip install "lightning-quant[extra]"`` needed, if any.
    """

    name: str
    aliases: tuple[str, ...]
    suffix: str
    artifact: str
    extra: str | None = None


BACKENDS: dict[str, Backend] = {
    "x86": Backend(
        name="x86",
        aliases=("fbgemm", "onednn", "x86_64", "inductor"),
        suffix=".pt2",
        artifact="AOTInductor package (int8 oneDNN kernels compiled at export; loads with plain torch)",
    ),
    "arm": Backend(
        name="arm",
        aliases=("qnnpack", "xnnpack", "executorch", "aarch64"),
        suffix=".pte",
        artifact="ExecuTorch program lowered to XNNPACK",
        extra="arm",
    ),
}

OBSERVERS: tuple[str, ...] = ("histogram", "minmax", "moving_average")
CALIBRATION_DATA: tuple[str, ...] = ("train", "val")
WEIGHT_GRANULARITIES: tuple[str, ...] = ("per_channel", "per_tensor")


def speed_change(fp32_ms: float, int8_ms: float) -> str:
    """``"2.50x faster"``, or ``"1.25x slower"`` when int8 takes longer (never "0.80x faster")."""
    if int8_ms <= fp32_ms:
        return f"{fp32_ms / int8_ms:.2f}x faster"
    return f"{int8_ms / fp32_ms:.2f}x slower"


def first_line(err: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (for one-line errors)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for Net:" + what they are
        text = f"{text} {lines[1]}"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _expect_choice(name: str, value: Any, choices: Sequence[str], extra: str = "") -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"Expected argument `{name}` to be a string, one of {', '.join(map(repr, choices))}, "
            f"but got {value!r} of type {type(value).__name__}."
        )
    key = value.strip().lower()
    if key not in choices:
        raise ValueError(
            f"Expected argument `{name}` to be one of {', '.join(map(repr, choices))}{extra}, but got {value!r}."
            + _did_you_mean(key, choices)
        )
    return key


def resolve_backend(backend: Any) -> Backend:
    """Map a backend name or alias (``"x86"``, ``"fbgemm"``, ``"arm"``, ``"qnnpack"``, ...) to its :class:`Backend`.

    Raises:
        TypeError: if ``backend`` is not a string.
        ValueError: if ``backend`` names no known backend; the message lists the valid names.
    """
    table = {b.name: b for b in BACKENDS.values()}
    for b in BACKENDS.values():
        table.update({alias: b for alias in b.aliases})
    aliases = "; ".join(f"{', '.join(map(repr, b.aliases))} -> {b.name!r}" for b in BACKENDS.values())
    if not isinstance(backend, str):
        _expect_choice("backend", backend, list(table))  # raises its TypeError
    key = backend.strip().lower()
    if key not in table:  # the names first, then what each alias stands for (not every name twice)
        names = ", ".join(repr(name) for name in BACKENDS)
        raise ValueError(
            f"Expected argument `backend` to be {names} or an alias ({aliases}), but got {backend!r}."
            + _did_you_mean(key, list(table))
        )
    return table[key]


def expect_positive_int(name: str, value: Any) -> int:
    """Validate an integer argument that must be >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"Expected argument `{name}` to be a positive int, but got {value!r} of type {type(value).__name__}."
        )
    if value <= 0:
        raise ValueError(f"Expected argument `{name}` to be a positive int (>= 1), but got {value}.")
    return value


def expect_output_args(dirpath: Any, evaluate: Any, metric_suffix: Any) -> None:
    """Validate the callbacks' shared output arguments."""
    if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
        raise TypeError(f"Expected argument `dirpath` to be a path string or None, but got {type(dirpath).__name__}.")
    if not isinstance(evaluate, bool):
        raise TypeError(f"Expected argument `evaluate` to be a bool, but got {evaluate!r}.")
    if not isinstance(metric_suffix, str) or not metric_suffix:
        raise ValueError(f"Expected argument `metric_suffix` to be a non-empty string, but got {metric_suffix!r}.")


def expect_dynamic_dims(value: Any) -> tuple[tuple[int, int], ...] | None:
    """Normalise ``dynamic_dims=``: ``None``, or ``{dim: largest size}`` (dims >= 1; sizes >= 2) as sorted pairs."""
    if value is None:
        return None
    pairs = value.items() if isinstance(value, dict) else value
    try:
        pairs = tuple((d, n) for d, n in pairs)
    except (TypeError, ValueError):
        pairs = None
    if not pairs or not all(type(d) is int and type(n) is int for d, n in pairs):
        raise TypeError(
            "Expected argument `dynamic_dims` to be None or a dict from a dimension to its largest size, e.g. "
            f"{{1: 512}} for (batch, sequence) inputs, but got {value!r}."
        )
    for d, n in pairs:
        if d < 1 or n < 2:
            raise ValueError(
                f"Expected argument `dynamic_dims` to map dimensions >= 1 (dimension 0 is the batch: see "
                f"`max_batch_size`) to largest sizes >= 2, but got {d}: {n}."
            )
    if len({d for d, _ in pairs}) != len(pairs):
        raise ValueError(f"Expected argument `dynamic_dims` to name each dimension once, but got {value!r}.")
    return tuple(sorted(pairs))


def expect_modules(value: Any) -> tuple[str, ...] | None:
    """Normalise ``modules=``: ``None`` (pick automatically), a dotted name, or a list of dotted names."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(
            "Expected argument `modules` to be None, a dotted submodule name or a list of them (e.g. ['model'] or "
            f"['backbone', 'head']), but got {value!r}."
        )
    names = tuple(v.strip() for v in value)
    if not names or any(not n for n in names):
        raise ValueError(
            "Expected argument `modules` to name at least one submodule (e.g. 'model', or 'self' for the "
            f"LightningModule's own forward), but got {value!r}. Use modules=None to pick automatically."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"Expected argument `modules` to name each submodule once, but got {list(names)}.")
    for a in names:
        for b in names:
            if a != b and (a == "self" or b.startswith(a + ".")):
                raise ValueError(
                    f"Expected argument `modules` to name disjoint submodules, but {a!r} contains {b!r}. Keep only one."
                )
    return names


@dataclass(frozen=True)
class QuantConfig:
    """The validated, plain-value description of a quantization run.

    Args:
        backend: ``"x86"`` (aliases ``"fbgemm"``, ``"onednn"``) or ``"arm"`` (aliases ``"qnnpack"``, ``"xnnpack"``).
        modules: dotted names of the submodules to quantize; ``None`` picks them (see :mod:`lightning_quant.capture`);
            ``"self"`` is the LightningModule's own ``forward``.
        observer: activation observer used by PTQ calibration: ``"histogram"`` (default, the x86 recipe's),
            ``"minmax"`` or ``"moving_average"``.
        num_calibration_samples: how many samples PTQ calibrates on.
        calibration_data: ``"train"`` or ``"val"``: which dataloader PTQ calibrates on.
        max_batch_size: largest batch the exported artifact accepts (the batch dimension is dynamic up to it).
        dynamic_dims: other dimensions that vary between batches, each with its largest size: ``{1: 512}`` lets a
            text model take any sequence length from 2 to 512 in dimension 1 of its batched inputs. Every other
            dimension is fixed at the first captured batch's size. A dimension the model fixes (channels, a Linear's
            features) stays fixed. x86 only.
        weight_granularity: ``"per_channel"`` (default: one scale per output channel) or ``"per_tensor"`` (one scale
            per weight tensor, for hardware that needs it; usually less accurate on depthwise nets).
        bias_correction: PTQ only: subtract from each conv/linear bias the mean output shift that rounding its weight
            to int8 causes, measured on the calibration data (see :mod:`lightning_quant._bias_correction`).

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range or names nothing known.
    """

    backend: str = "x86"
    modules: tuple[str, ...] | None = None
    observer: str = "histogram"
    num_calibration_samples: int = 1024
    calibration_data: str = "train"
    max_batch_size: int = 1024
    weight_granularity: str = "per_channel"
    bias_correction: bool = True
    dynamic_dims: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", resolve_backend(self.backend).name)
        object.__setattr__(self, "modules", expect_modules(self.modules))
        object.__setattr__(self, "observer", _expect_choice("observer", self.observer, OBSERVERS))
        expect_positive_int("num_calibration_samples", self.num_calibration_samples)
        object.__setattr__(
            self, "calibration_data", _expect_choice("calibration_data", self.calibration_data, CALIBRATION_DATA)
        )
        expect_positive_int("max_batch_size", self.max_batch_size)
        object.__setattr__(
            self,
            "weight_granularity",
            _expect_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES),
        )
        if not isinstance(self.bias_correction, bool):
            raise TypeError(
                f"Expected argument `bias_correction` to be True or False, but got {self.bias_correction!r}."
            )
        object.__setattr__(self, "dynamic_dims", expect_dynamic_dims(self.dynamic_dims))
        if self.dynamic_dims and self.backend == "arm":
            raise ValueError(
                "Expected argument `dynamic_dims` to be None with backend='arm': ExecuTorch's XNNPACK lowering takes "
                "one dynamic dimension per reshape (the batch), and refuses a Linear or Conv1d over a dynamic sequence "
                "beside it. Pad to one length for 'arm', or use backend='x86'."
            )
        if self.max_batch_size < 2:
            raise ValueError(
                f"Expected argument `max_batch_size` to be >= 2 (the batch dimension is exported as dynamic), "
                f"but got {self.max_batch_size}."
            )

    @property
    def target(self) -> Backend:
        return BACKENDS[self.backend]

    @property
    def per_channel(self) -> bool:
        return self.weight_granularity == "per_channel"
