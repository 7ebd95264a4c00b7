from __future__ import annotations

import types

import pytest
import torch
from helpers import ConvBNReLULinear, DataDependent, KwargsNet, output_range, with_bn_statistics
from torch import nn

from lightning_quant.capture import CaptureError
from lightning_quant.config import QuantConfig
from lightning_quant.quantize import META_KEY, CalibrationGraph, quantize_ptq


def _close_to_fp32(q_out: torch.Tensor, fp32_out: torch.Tensor) -> None:
    """int8 vs fp32 on random inputs: max |diff| under 10% of the fp32 output range (top-1 agreement not required)."""
    q_out, fp32_out = q_out.detach(), fp32_out.detach()
    diff = float((q_out - fp32_out).abs().max())
    assert diff < 0.1 * output_range(fp32_out), (diff, output_range(fp32_out))


@pytest.fixture(scope="module")
def ptq_x86():
    """The >=100k-parameter model, quantized for x86 while in train mode (so any BN update would show)."""
    torch.manual_seed(0)
    model = with_bn_statistics(ConvBNReLULinear(), torch.randn(32, 1, 28, 28)).train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = [torch.randn(16, 1, 28, 28) for _ in range(8)]
    q = quantize_ptq(model, calib, backend="x86", num_calibration_samples=128)
    ns = types.SimpleNamespace(model=model, before=before, q=q, training_after=model.training)
    model.eval()
    return ns


def test_model_has_at_least_100k_parameters(ptq_x86):
    assert sum(p.numel() for p in ptq_x86.model.parameters()) >= 100_000


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_ptq_x86_dynamic_batch_close_to_fp32(ptq_x86, batch):
    x = torch.randn(batch, 1, 28, 28)
    with torch.no_grad():
        out, ref = ptq_x86.q(x), ptq_x86.model(x)
    assert out.shape == (batch, 10)
    assert out.dtype == torch.float32
    _close_to_fp32(out, ref)


def test_ptq_is_really_int8(ptq_x86):
    """The result holds int8 weights and quantize ops, and no leftover fp32 conv/linear weights."""
    q = ptq_x86.q
    targets = {str(n.target) for n in q.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets)
    assert any("dequantize_per_channel" in t for t in targets)
    dtypes = {t.dtype for t in list(q.parameters()) + list(q.buffers())}
    assert torch.int8 in dtypes
    weights = [t for t in list(q.parameters()) + list(q.buffers()) if t.dtype == torch.float32 and t.numel() >= 1000]
    assert weights == []  # the large fp32 weights were dropped (strip_unused_attrs)
    meta = q.meta[META_KEY]
    assert (meta["backend"], meta["observer"], meta["num_calibration_samples"]) == ("x86", "histogram", 128)


def test_input_model_state_dict_is_bit_identical(ptq_x86):
    after = ptq_x86.model.state_dict()
    assert list(after) == list(ptq_x86.before)
    for k, v in ptq_x86.before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert ptq_x86.training_after is True  # the model's mode was not changed either
    assert isinstance(ptq_x86.model.conv, nn.Conv2d)  # not swapped or padded in place


def test_calibration_stops_after_num_calibration_samples(tiny_net):
    drawn = []

    def batches():
        for i in range(10):
            drawn.append(i)
            yield torch.randn(16, 3, 8, 8)

    q = quantize_ptq(tiny_net(), batches(), num_calibration_samples=32)
    assert drawn == [0, 1]
    assert q.meta[META_KEY]["num_calibration_samples"] == 32


def test_input_fn_maps_items_to_inputs(tiny_net):
    net = tiny_net()
    items = [(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))) for _ in range(2)]
    q = quantize_ptq(net, items, num_calibration_samples=16, input_fn=lambda batch: batch[0])
    x = torch.randn(3, 3, 8, 8)
    _close_to_fp32(q(x), net(x))


def test_a_torch_compile_wrapper_is_quantized_as_the_module_it_wraps(tiny_net):
    calib = [torch.randn(4, 3, 8, 8)]
    wrapped = torch.compile(tiny_net())
    q = quantize_ptq(wrapped, calib, num_calibration_samples=4, max_batch_size=8)
    ref = quantize_ptq(tiny_net(), calib, num_calibration_samples=4, max_batch_size=8)
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(q(x), ref(x), atol=0, rtol=0)


def test_batch_one_calibration_gives_dynamic_batch(tiny_net):
    net = tiny_net()
    q = quantize_ptq(net, [torch.randn(1, 3, 8, 8) for _ in range(4)], num_calibration_samples=4, max_batch_size=32)
    assert q.meta[META_KEY]["num_calibration_samples"] == 4
    for batch in (1, 7, 32):
        x = torch.randn(batch, 3, 8, 8)
        out = q(x)
        assert out.shape == (batch, 2)
        _close_to_fp32(out, net(x))


def test_kwargs_model_calibrated_with_dict_items():
    net = KwargsNet().eval()
    calib = [{"x": torch.randn(8, 16), "scale": 0.5, "mask": torch.rand(8, 4)} for _ in range(8)]
    q = quantize_ptq(net, calib, num_calibration_samples=64)
    x, mask = torch.randn(5, 16), torch.rand(5, 4)
    ref = net(x, scale=0.5, mask=mask)
    out = q(x=x, scale=0.5, mask=mask)
    assert out.shape == (5, 4)
    _close_to_fp32(out, ref)
    torch.testing.assert_close(q(x, scale=0.5, mask=mask), out, rtol=0, atol=0)  # x may also come positionally
    # a non-tensor kwarg is baked in at calibration: another value must fail loudly, not reuse 0.5 silently
    with pytest.raises(Exception, match="scale"):
        q(x=x, scale=2.0, mask=mask)


@pytest.mark.parametrize(
    ("observer", "activation_observer"),
    [
        ("histogram", "HistogramObserver"),
        ("minmax", "MinMaxObserver"),
        ("moving_average", "MovingAverageMinMaxObserver"),
    ],
)
def test_each_observer(tiny_net, observer, activation_observer):
    net = tiny_net()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    graph = CalibrationGraph(net, "net", QuantConfig(observer=observer, num_calibration_samples=24))
    with torch.no_grad():
        for x in calib:
            graph(x)
    observers = {type(m).__name__ for m in graph.prepared.modules()}
    assert activation_observer in observers
    assert observers & {"HistogramObserver", "MinMaxObserver", "MovingAverageMinMaxObserver"} == {activation_observer}

    q = quantize_ptq(net, calib, observer=observer, num_calibration_samples=24)
    assert q.meta[META_KEY]["observer"] == observer
    x = torch.randn(4, 3, 8, 8)
    _close_to_fp32(q(x), net(x))


def test_arm_backend(tiny_net):
    pytest.importorskip("executorch")
    net = tiny_net()
    q = quantize_ptq(net, [torch.randn(8, 3, 8, 8) for _ in range(2)], backend="qnnpack", num_calibration_samples=16)
    assert q.meta[META_KEY]["backend"] == "arm"
    x = torch.randn(3, 3, 8, 8)
    _close_to_fp32(q(x), net(x))


def _weight_dequant_nodes(q: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The dequantize nodes whose input is a stored int8 weight (a ``get_attr``)."""
    return [
        n
        for n in q.graph.nodes
        if n.op == "call_function" and "dequantize" in str(n.target) and n.args[0].op == "get_attr"
    ]


@pytest.mark.parametrize("backend", ["x86", "arm"])
def test_per_tensor_weights_share_one_scale(tiny_net, backend):
    if backend == "arm":
        pytest.importorskip("executorch")
    net = tiny_net()
    with torch.no_grad():
        net.conv.weight[0] *= 30  # one outlier channel: per-tensor scales must follow it, per-channel ones must not
    calib = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    per_channel = quantize_ptq(net, calib, backend=backend, num_calibration_samples=24)
    per_tensor = quantize_ptq(net, calib, backend=backend, num_calibration_samples=24, weight_granularity="per_tensor")
    assert per_tensor.meta[META_KEY]["weight_granularity"] == "per_tensor"
    for n in _weight_dequant_nodes(per_channel):
        assert "per_channel" in str(n.target) and _attr(per_channel, n.args[1]).unique().numel() > 1
    weights = _weight_dequant_nodes(per_tensor)
    assert len(weights) == len(_weight_dequant_nodes(per_channel)) >= 2
    for n in weights:
        w_int8, scale = _attr(per_tensor, n.args[0]), _attr(per_tensor, n.args[1])
        if backend == "x86":
            # per-channel form (Inductor's int8 kernels need it) with one scale shared by every channel
            assert "per_channel" in str(n.target) and scale.numel() == w_int8.shape[0]
            assert scale.unique().numel() == 1
        else:
            assert "per_tensor" in str(n.target)
    # the outlier channel sets the shared scale: symmetric int8 over the whole tensor's max |w|
    conv = next(n for n in weights if _attr(per_tensor, n.args[0]).dim() == 4)
    scale = float(_attr(per_tensor, conv.args[1]).flatten()[0])
    assert scale == pytest.approx(float(net.conv.weight.detach().abs().max()) / 127.5, rel=0.01)
    x = torch.randn(4, 3, 8, 8)
    _close_to_fp32(per_tensor(x), net(x))


def _attr(gm: torch.fx.GraphModule, node: torch.fx.Node | float) -> torch.Tensor:
    return getattr(gm, node.target) if isinstance(node, torch.fx.Node) else torch.tensor([node])


def test_data_dependent_model_raises_capture_error():
    with pytest.raises(CaptureError, match=r"could not capture 'DataDependent' \(DataDependent\)"):
        quantize_ptq(DataDependent(), [torch.randn(4, 4)])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_calibration_samples": 0}, ValueError, r"`num_calibration_samples`"),
        ({"calibration_data": []}, ValueError, r"`calibration_data` to yield at least one batch"),
        ({"calibration_data": iter(())}, ValueError, r"`calibration_data` to yield at least one batch"),
        ({"model": "resnet18"}, TypeError, r"`model` to be a torch.nn.Module, but got str"),
        ({"model": lambda x: x}, TypeError, r"`model` to be a torch.nn.Module"),
        ({"observer": "foo"}, ValueError, r"`observer`"),
        ({"backend": "x87"}, ValueError, r"`backend`.*Did you mean 'x86'"),
        ({"max_batch_size": 1}, ValueError, r"`max_batch_size`"),
        ({"weight_granularity": "per_chanel"}, ValueError, r"`weight_granularity`.*Did you mean 'per_channel'"),
        ({"input_fn": 3}, TypeError, r"`input_fn` to be callable"),
        ({"calibration_data": None}, TypeError, r"`calibration_data` to be an iterable of batches .*but got NoneType"),
        ({"model": nn.Linear(2, 2, device="meta")}, ValueError, r"`model` to hold real weights, .*'meta'"),
        (
            {"calibration_data": [torch.randn(2, 3, 8, 8), torch.full((2, 3, 8, 8), float("nan"))]},
            ValueError,
            r"Calibration batch 2 of 'TinyConvNet' sent NaN or infinite values into a layer to be quantized "
            r"\(input 'args\[0\]' holds NaN;",
        ),
        (
            {"calibration_data": [torch.randn(2, 3, 8, 8), torch.full((2, 3, 8, 8), float("inf"))]},
            ValueError,
            r"Calibration batch 2 of 'TinyConvNet' sent NaN or infinite values into a layer to be quantized "
            r"\(input 'args\[0\]' holds \+-inf;",
        ),
        (
            {"calibration_data": [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 9, 9)], "num_calibration_samples": 8},
            ValueError,
            r"Calibration batch 2 of 'TinyConvNet' does not match the inputs it was captured with .*Guard failed.*"
            r"`dynamic_dims`",
        ),
        (
            {"calibration_data": [torch.randn(2, 3, 8, 8), torch.randn(6, 3, 8, 8)], "max_batch_size": 4},
            ValueError,
            r"`max_batch_size` \(4\) to be at least the batch size .* \(6, calibration batch 2\)",
        ),
    ],
    ids=[
        "samples-0",
        "empty-list",
        "empty-iterator",
        "model-str",
        "model-function",
        "observer",
        "backend",
        "max-batch-1",
        "weight-granularity",
        "input-fn",
        "data-none",
        "meta-model",
        "nan-batch",
        "inf-batch",
        "later-batch-shape",
        "later-batch-over-max",
    ],
)
def test_bad_inputs(tiny_net, kwargs, exc, match):
    args = {"model": tiny_net(), "calibration_data": [torch.randn(2, 3, 8, 8)], **kwargs}
    with pytest.raises(exc, match=match):
        quantize_ptq(args.pop("model"), args.pop("calibration_data"), **args)


def test_a_model_that_cleans_nan_inputs_itself_calibrates(tiny_net):
    class NanToNum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(torch.nan_to_num(x))

    x = torch.randn(4, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    q = quantize_ptq(NanToNum().eval(), [x], num_calibration_samples=4)
    assert torch.isfinite(q(x)).all()


@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_range_observers_refuse_non_finite_calibration_values(tiny_net, observer, value):
    x = torch.randn(4, 3, 8, 8)
    x[1, 2, 3, 4] = value
    with pytest.raises(
        ValueError,
        match=r"Calibration sent NaN or infinite values into \d+ quantized tensor\(s\) of "
        r"'TinyConvNet' \(input 'x'.*Clean the calibration data",
    ):
        quantize_ptq(tiny_net(), [torch.randn(4, 3, 8, 8), x], observer=observer, num_calibration_samples=8)


def test_histogram_observer_and_bias_correction_leave_out_infinite_values(tiny_net):
    """As torchao's histogram observer does (int8 clamps them): the model stays finite and close to a clean one."""
    torch.manual_seed(0)
    model, clean = tiny_net().eval(), torch.randn(32, 3, 8, 8)
    dirty = clean.clone()
    dirty[0, 0, 0, 0] = float("inf")
    dirty[1, 1, 1, 1] = -float("inf")
    q_clean = quantize_ptq(model, [clean], num_calibration_samples=32)
    q_dirty = quantize_ptq(model, [dirty], num_calibration_samples=32)
    with torch.no_grad():
        want, got = q_clean(clean), q_dirty(clean)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 0.05 * float(want.max() - want.min())


def test_unpacked_target_in_the_batch_suggests_input_fn(tiny_net):
    from lightning_quant import CaptureError

    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,)))]
    with pytest.raises(CaptureError, match=r"TypeError: too many positional arguments.*input_fn=lambda batch: batch"):
        quantize_ptq(tiny_net(), batches, num_calibration_samples=4)


def test_calls_may_leave_out_defaults_or_pass_keywords_positionally():
    from lightning_quant.config import QuantConfig
    from lightning_quant.qat_graph import QATGraph

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x, scale: float = 1.0):
            return self.fc(x) * scale

    graph = QATGraph(Net(), "net", QuantConfig())
    x = torch.randn(4, 4)
    ref = graph(x, scale=1.0)  # captured with a keyword
    torch.testing.assert_close(graph(x), ref)  # default filled in
    torch.testing.assert_close(graph(x, 1.0), ref)  # keyword given positionally


def test_batches_larger_than_max_batch_size_are_refused_at_capture():
    net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"`max_batch_size` \(8\) to be at least the batch size .* \(16\)"):
        quantize_ptq(net, [torch.randn(16, 4)], max_batch_size=8)


class ReusedReLUBlock(nn.Module):
    """torchvision's BasicBlock pattern: one ``nn.ReLU`` called after each conv and after the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv2(self.relu(self.conv1(x))) + x)
        return self.fc(out.flatten(1))


@pytest.mark.parametrize("backend", ["x86", "arm"])
def test_a_module_called_twice_is_quantized_at_each_call(backend):
    if backend == "arm":
        pytest.importorskip("executorch")
    torch.manual_seed(0)
    net = ReusedReLUBlock().eval()
    calib = [torch.randn(8, 4, 8, 8) for _ in range(3)]
    q = quantize_ptq(net, calib, backend=backend, num_calibration_samples=24)  # x86 raised "more than one output"
    assert len(_weight_dequant_nodes(q)) == 3  # both convs and the linear are int8
    x = torch.randn(4, 4, 8, 8)
    _close_to_fp32(q(x), net(x))


def test_split_module_call_sites_names_each_call():
    from lightning_quant.capture import split_module_call_sites

    ep = torch.export.export(ReusedReLUBlock().eval(), (torch.randn(2, 4, 8, 8),))
    relus = [n for n in ep.graph.nodes if n.op == "call_function" and "relu" in str(n.target)]
    names = [list(n.meta["nn_module_stack"].values())[-1][0] for n in relus]
    assert len(set(names)) == 1  # torch.export gives both calls the same name
    assert split_module_call_sites(ep.graph) == 1
    assert split_module_call_sites(ep.graph) == 0  # idempotent
    names = [list(n.meta["nn_module_stack"].values())[-1][0] for n in relus]
    assert names == ["relu", "relu@1"]
