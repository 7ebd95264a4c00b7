"""The fast QAT stand-ins give torchao's results: fake quant, observers, Conv+BN division bit for bit; the Conv+BN
division moved onto the weight up to float rounding; convert identical."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from helpers import ConvBNReLULinear, TinyConvNet
from test_ptq import needs_executorch
from torch import nn
from torch.nn import functional as F

from lightning_quant import _fast_qat, _torchao
from lightning_quant.config import QuantConfig
from lightning_quant.demo import SmallCNN
from lightning_quant.qat_graph import QATGraph


def _fused_fake_quant(kind: str) -> nn.Module:
    pt2e = _torchao._pt2e()
    obs, fq = pt2e.observer, pt2e.fake_quantize.FusedMovingAvgObsFakeQuantize
    if kind == "uint8":  # x86 activations
        return fq(observer=obs.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8)
    if kind == "int8":  # XNNPACK activations
        return fq(observer=obs.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8)
    return fq(  # per-channel symmetric weights
        observer=obs.MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.int8,
        qscheme=torch.per_channel_symmetric,
    )


def _inputs(kind: str, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    shape = {"uint8": (8, 4, 6, 6), "int8": (16, 40), "per_channel": (6, 3, 3, 3)}[kind]
    x = torch.randn(shape, generator=g) * (1 + 3 * step)  # the range grows: later steps fall outside the averages
    x.view(-1)[:2] = torch.tensor([0.5, -0.0])
    if step >= 6:  # observers frozen by then: far outside the range, infinities (per tensor; see _fast_qat)
        far = [1e6, -1e6] if kind == "per_channel" else [1e6, -1e6, float("inf"), -float("inf")]
        x.view(-1)[2 : 2 + len(far)] = torch.tensor(far)
    if kind == "uint8" and step % 2:
        x = x.relu()
    return x


@pytest.mark.parametrize("kind", ["uint8", "int8", "per_channel"])
def test_fake_quant_matches_torchao_over_steps(kind):
    ref = _fused_fake_quant(kind)
    fast = copy.deepcopy(ref)
    assert _torchao.use_fast_fake_quantize(fast, True) == 1
    for step in range(8):
        if step == 6:  # frozen observers: qparams stay, fake quant goes on
            ref.apply(_torchao.disable_observer)
            fast.apply(_torchao.disable_observer)
        x = _inputs(kind, step)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = ref(xr), fast(xf)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + step))
        yr.backward(grad)
        yf.backward(grad)
        assert torch.equal(yr, yf), step
        assert torch.equal(xr.grad, xf.grad), step
        assert (xf.grad[yf.isfinite()] == 0).any() or step < 2  # the straight-through mask cuts out-of-range values
        for (name, a), (_, b) in zip(ref.state_dict().items(), fast.state_dict().items()):
            assert a.dtype == b.dtype and torch.equal(a, b), (step, name)


def test_straight_through_gradient_is_the_in_range_mask():
    fq = _fused_fake_quant("uint8")
    _torchao.use_fast_fake_quantize(fq, True)
    fq(torch.tensor([0.0, 2.55]))  # scale 0.01, zero point 0 from then on
    fq.apply(_torchao.disable_observer)
    x = torch.tensor([-1.0, -0.004, -0.006, 0.0, 1.234, 2.554, 2.556, 9.0], requires_grad=True)
    y = fq(x)
    y.sum().backward()
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.23, 2.55, 2.55, 2.55]))
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_fake_quant_falls_back_to_torchao_when_it_cannot_help():
    fq = _fused_fake_quant("uint8")
    _torchao.use_fast_fake_quantize(fq, True)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert _fast_qat.fused_moving_avg_fake_quant(fq, x) is None  # not float32
    fq.fake_quant_enabled[0] = 0
    assert _fast_qat.fused_moving_avg_fake_quant(fq, x.float()) is None
    assert torch.equal(fq(x.float()), x.float())


@pytest.mark.parametrize(("a_shape", "b_shape"), [((4, 3, 5, 5), (1, 3, 1, 1)), ((2, 6, 7), (6, 1)), ((3, 4), (3, 4))])
def test_div_by_scale_matches_autograd_div(a_shape, b_shape):
    a = torch.randn(a_shape, requires_grad=True)
    b = (torch.rand(b_shape) + 0.3).requires_grad_()
    grad = torch.randn(torch.broadcast_shapes(a_shape, b_shape))
    expected = torch.div(a, b)
    got = _fast_qat.div_by_scale(a, b)
    ga, gb = torch.autograd.grad(expected, (a, b), grad)
    fa, fb = torch.autograd.grad(got, (a, b), grad)
    assert torch.equal(got, expected)
    assert torch.equal(fa, ga) and torch.equal(fb, gb)


def _qat_pair(
    model_cls: type, backend: str, granularity: str, x: torch.Tensor, fold: bool = True
) -> tuple[QATGraph, QATGraph]:
    graphs = []
    for fast in (False, True):
        torch.manual_seed(0)
        g = QATGraph(model_cls().train(), "model", QuantConfig(backend=backend, weight_granularity=granularity))
        g.train().capture((x,), {})
        if not fast or not fold:
            _fast_qat.uninstall(g.gm)
        if fast and not fold:  # the division stays on the conv output, as div_by_scale: bit-identical to torchao
            assert _fast_qat.install(g.gm, fold=False) > 0
        graphs.append(g)
    return graphs[0], graphs[1]


@pytest.mark.parametrize(
    ("model_cls", "backend", "granularity"),
    [
        (SmallCNN, "x86", "per_channel"),  # per-channel weights: the same fake-quant class on arm
        pytest.param(ConvBNReLULinear, "x86", "per_tensor", marks=pytest.mark.slow),  # conv bias; FakeQuantize weights
        pytest.param(SmallCNN, "arm", "per_tensor", marks=[pytest.mark.slow, needs_executorch]),
    ],
)
def test_training_and_convert_identical_to_torchao(model_cls, backend, granularity):
    x = torch.randn(8, 1, 28, 28)
    ref, fast = _qat_pair(model_cls, backend, granularity, x, fold=False)
    assert "div_by_scale" in fast.gm.code and "div_by_scale" not in ref.gm.code
    opts = [torch.optim.SGD(g.parameters(), lr=0.05, momentum=0.9) for g in (ref, fast)]
    for step in range(7):
        if step == 4:
            ref.freeze_observers()
            fast.freeze_observers()
        if step == 5:
            ref.freeze_bn()
            fast.freeze_bn()
        x, y = torch.randn(8, 1, 28, 28) * (1 + step), torch.randint(0, 10, (8,))
        outs, grads = [], []
        for g, opt in zip((ref, fast), opts):
            opt.zero_grad()
            out = g(x)
            F.cross_entropy(out, y).backward()
            outs.append(out)
            grads.append([p.grad.clone() for p in g.parameters()])
            opt.step()
        assert torch.equal(outs[0], outs[1]), step
        assert all(torch.equal(a, b) for a, b in zip(*grads)), step
    ref_sd, fast_sd = ref.state_dict(), fast.state_dict()
    assert list(ref_sd) == list(fast_sd)
    for k, v in ref_sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, fast_sd[k]), k

    q_ref, q_fast = ref.convert(), fast.convert()
    assert q_ref.code == q_fast.code
    ref_int8, fast_int8 = q_ref.state_dict(), q_fast.state_dict()
    assert list(ref_int8) == list(fast_int8) and any(v.dtype == torch.int8 for v in ref_int8.values())
    assert all(torch.equal(v, fast_int8[k]) for k, v in ref_int8.items())
    assert "div_by_scale" in fast.gm.code  # convert() restored torchao's graph on its copy only


def _weights_only_fake_quant(g: QATGraph) -> None:
    """Switch off activation fake quant (observers go on): the fake-quantized weights are the same in both graphs,
    so what is left to differ is float rounding, not an activation landing on the other side of a rounding step."""
    for m in g.gm.modules():
        if _torchao.is_fake_quantize(m) and not m.is_symmetric_quant:  # weights are symmetric, activations affine
            m.fake_quant_enabled[0] = 0


@pytest.mark.parametrize("model_cls", [SmallCNN, TinyConvNet])  # TinyConvNet's conv has a bias (torchao: zeros_like)
def test_division_folded_into_the_weight_matches_torchao(model_cls):
    shape = (8, 1, 28, 28) if model_cls is SmallCNN else (8, 3, 8, 8)
    ref, fast = _qat_pair(model_cls, "x86", "per_channel", torch.randn(shape))
    assert fast.gm.code.count("weight_div_by_scale(") == ref.gm.code.count("aten.div.Tensor(conv") > 0
    assert "div_by_scale(conv" not in fast.gm.code  # every Conv+BN division moved onto a weight
    for g in (ref, fast):
        _weights_only_fake_quant(g)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for step in range(5):
        if step == 2:
            ref.freeze_observers()
            fast.freeze_observers()
        if step == 3:
            ref.freeze_bn()
            fast.freeze_bn()
        for g in (ref, fast):
            g.train(step < 4)
        fast.load_state_dict(ref.state_dict())  # compare one step from the same state each time
        x = torch.randn(shape) * (1 + step)
        outs, grads = [], []
        for g in (ref, fast):
            for p in g.parameters():
                p.grad = None
            out = g(x)
            F.cross_entropy(out, torch.arange(len(x)) % out.shape[1]).backward()
            outs.append(out)
            grads.append([p.grad for p in g.parameters()])
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        ref_sd, fast_sd = ref.state_dict(), fast.state_dict()  # BN running stats, observer ranges, scales
        for k, v in ref_sd.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                torch.testing.assert_close(fast_sd[k], v, rtol=1e-5, atol=1e-6, msg=k)
        opt.step()

    fast.load_state_dict(ref.state_dict())
    q_ref, q_fast = ref.convert(), fast.convert()  # from torchao's graph, restored on a copy
    assert q_ref.code == q_fast.code
    assert all(torch.equal(v, q_fast.state_dict()[k]) for k, v in q_ref.state_dict().items())
    assert "weight_div_by_scale" in fast.gm.code


class _Conv1dAndTransposed(nn.Module):
    """Conv1d+BN (folded, weight reshaped to [C, 1, 1]) and ConvTranspose2d+BN (output channels on the weight's dim 1:
    the division must stay on the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.up = nn.ConvTranspose2d(2, 4, 3)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn(self.conv(x)).relu().flatten(1)
        b = self.bn2(self.up(x[:, :2].reshape(x.shape[0], 2, 4, -1))).flatten(1)
        return torch.cat([a, b], 1)


@needs_executorch
def test_division_folded_for_conv1d_and_kept_for_transposed_conv():
    x = torch.randn(4, 3, 16)
    ref, fast = _qat_pair(_Conv1dAndTransposed, "arm", "per_channel", x)  # the x86 quantizer skips conv1d
    code = fast.gm.code
    assert "weight_div_by_scale(" in code and "conv1d.default(activation_post_process_0, weight_div_by_scale" in code
    assert "aten.div.Tensor(conv_transpose2d" in code
    for g in (ref, fast):
        _weights_only_fake_quant(g)
    fast.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    fast.load_state_dict(ref.state_dict())  # observer ranges from that call differ in the last bits
    assert _structure(ref.convert()) == _structure(fast.convert())


class _ConvDividedPerSample(nn.Module):
    """A conv output divided by something other than the Conv+BN factor (per sample, here): not folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y / (x.flatten(1).abs().mean(1) + 1).reshape(-1, 1, 1, 1)


def test_only_the_conv_bn_factor_is_folded():
    torch.manual_seed(0)
    model = _ConvDividedPerSample().train()
    x = torch.randn(4, 3, 8, 8)  # batch == output channels: a wrong fold would even broadcast
    g = QATGraph(model, "model", QuantConfig(backend="x86")).train()
    g.capture((x,), {})
    assert "weight_div_by_scale" not in g.gm.code
    for m in g.gm.modules():
        if _torchao.is_fake_quantize(m):
            m.fake_quant_enabled[0] = 0
    torch.testing.assert_close(g(x), model(x))


def _structure(gm: torch.fx.GraphModule) -> list[tuple]:
    """The graph without node names (FX never reuses an erased node's name, so a restored node may get another)."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = gm.graph.nodes
    return [(n.op, n.target, repr(torch.fx.node.map_arg((n.args, n.kwargs), lambda a: index[a]))) for n in nodes]


def test_install_uninstall_round_trip_and_pickling():
    x = torch.randn(4, 1, 28, 28)
    ref, fast = _qat_pair(SmallCNN, "x86", "per_channel", x)
    fast_types = {type(m).__name__ for m in fast.gm.modules()}
    assert "FastFusedMovingAvgObsFakeQuantize" in fast_types and "weight_div_by_scale" in fast.gm.code
    assert "FastFusedMovingAvgObsFakeQuantize" not in {type(m).__name__ for m in ref.gm.modules()}

    fq = fast.gm.activation_post_process_0
    buf = io.BytesIO()
    torch.save(fq, buf)  # the class is found again by name
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(fq) and torch.equal(loaded(x), fq(x))

    copied = copy.deepcopy(fast.gm)
    assert _fast_qat.uninstall(copied) == 2 + 8  # two Conv+BN divisions, eight fake-quantize modules
    assert _structure(copied) == _structure(ref.gm)  # same ops, arguments and order: convert_pt2e sees torchao's graph
    assert _fast_qat.uninstall(copied) == 0
    assert _fast_qat.install(copied) == 10
    assert _structure(copied) == _structure(fast.gm)


def test_conv_bn_patterns_exported_once_per_process(monkeypatch):
    """torchao exports its Conv+BN pattern graphs on every QAT convert (~10 s); a warm convert exports none."""
    x = torch.randn(8, 3, 8, 8)
    g = QATGraph(TinyConvNet().train(), "model", QuantConfig(backend="x86")).train()
    g(x)
    exports = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    _torchao._PATTERN_CACHE.clear()
    cold = g.convert()
    n_cold = len(exports)
    warm = g.convert()
    assert n_cold > 10 and len(exports) == n_cold  # every pattern came from the cache the second time
    assert warm.code == cold.code
    assert all(torch.equal(v, warm.state_dict()[k]) for k, v in cold.state_dict().items())
    assert torch.equal(warm(x), cold(x))
    assert "quantize_per" in warm.code and "batch_norm" not in warm.code  # BN folded into the int8 conv


class ConvKindsNet(nn.Module):
    """Conv1d+BN, Conv2d+BN and ConvTranspose2d+BN (no conv_transpose1d): three of torchao's four fold passes match."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)
        self.c2, self.b2 = nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.t2, self.b3 = nn.ConvTranspose2d(4, 3, 2, stride=2), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.b1(self.c1(x.flatten(2)[..., :16])).relu().mean()
        return self.b3(self.t2(self.b2(self.c2(x)).relu())).relu() + a


class LinearBNNet(nn.Module):
    """A BatchNorm and no conv at all: every fold pass runs without a match."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.fc(x)).relu())


def _trained_qat_graph(model: nn.Module, shape: tuple[int, ...]) -> QATGraph:
    g = QATGraph(model.train(), "model", QuantConfig(backend="x86")).train()
    for _ in range(3):
        g(torch.randn(shape))
    return g


def test_convert_skips_only_the_fold_passes_of_absent_conv_kinds(monkeypatch):
    """The skipped passes export no pattern graphs, and the int8 model is torchao's own, node for node."""
    from torchao.quantization.pt2e import qat_utils

    torch.manual_seed(0)
    passes, exports = [], []
    real_helper, real_export = qat_utils._fold_conv_bn_qat_helper, torch.export.export
    monkeypatch.setattr(
        qat_utils, "_fold_conv_bn_qat_helper", lambda m, fn, *a, **k: passes.append(fn) or real_helper(m, fn, *a, **k)
    )
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    every = [F.conv1d, F.conv2d, F.conv_transpose1d, F.conv_transpose2d]
    _torchao._PATTERN_CACHE.clear()
    # the second model's stock convert finds every pattern in the cache the first one filled
    for model_cls, shape, present, stock_exports in (
        (ConvKindsNet, (8, 2, 6, 6), [F.conv1d, F.conv2d, F.conv_transpose2d], 24),
        (LinearBNNet, (8, 8), [], 0),
    ):
        g = _trained_qat_graph(model_cls(), shape)
        passes.clear()
        exports.clear()
        ours = g.convert()
        assert passes == present, model_cls  # torchao's fold pass ran for the conv kinds the graph calls, only those
        assert len(exports) == len(present) * 24  # 12 pattern/replacement pairs per pass, none for the skipped ones

        with monkeypatch.context() as m:
            m.setattr(_torchao, "_fold_only_the_graphs_conv_kinds", contextlib.nullcontext)  # torchao's own passes
            passes.clear()
            exports.clear()
            stock = g.convert()
        assert passes == every and len(exports) == stock_exports
        assert ours.code == stock.code
        assert list(ours.state_dict()) == list(stock.state_dict())
        assert all(torch.equal(v, stock.state_dict()[k]) for k, v in ours.state_dict().items())
        assert [n.name for n in ours.graph.nodes] == [n.name for n in stock.graph.nodes]
        assert {n for n, _ in ours.named_modules()} == {n for n, _ in stock.named_modules()}
        x = torch.randn(shape)
        assert torch.equal(ours(x), stock(x))
        if model_cls is ConvKindsNet:  # folded: the BatchNorms after conv1d and conv2d (torchao keeps conv_transpose's)
            assert "b1_running_mean" not in ours.code and "b2_running_mean" not in ours.code


def test_pattern_cache_key_only_for_plain_closures():
    def factory(value):
        def pattern(x, scale):
            return F.conv2d(x, x) * value + scale

        return pattern

    x, kw = (torch.randn(1, 1, 3, 3),), {"scale": torch.ones(2)}
    same = _torchao._pattern_key(factory(1.5), x, False, kw)
    assert same is not None and same == _torchao._pattern_key(factory(1.5), (torch.zeros(1, 1, 3, 3),), False, kw)
    assert same != _torchao._pattern_key(factory(2.0), x, False, kw)  # closure values are part of the key
    assert same != _torchao._pattern_key(factory(1.5), (torch.randn(1, 1, 4, 4),), False, kw)  # and input shapes
    assert same != _torchao._pattern_key(factory(1.5), x, True, kw)
    assert same != _torchao._pattern_key(factory(True), x, False, kw) != _torchao._pattern_key(factory(1), x, False, kw)
    keyword_default = factory(1.5)
    keyword_default.__kwdefaults__ = {"bias": 2.0}
    assert same != _torchao._pattern_key(keyword_default, x, False, kw)
    assert _torchao._pattern_key(factory(torch.ones(1)), x, False, kw) is None  # a tensor held by identity: no cache
    assert _torchao._pattern_key(factory(1.5), x, False, {"scale": [1, 2]}) is None
