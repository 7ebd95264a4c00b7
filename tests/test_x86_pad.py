"""Zero pads before convs: symmetric ones become the conv's own padding (any backend); on x86 the others are
quantized at their input (int8 pad, fused conv)."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from helpers import with_bn_statistics
from torch import nn
from torch.nn import functional as F

from lightning_quant import _torchao
from lightning_quant.capture import _PADS, export, fold_zero_pads_into_convs, is_zero_pad
from lightning_quant.export import load, save
from lightning_quant.quantize import fold_pads_into_depthwise_qconvs, quantize_ptq

needs_executorch = pytest.mark.skipif(not _torchao.executorch_available(), reason="needs lightning-quant[arm]")

QD = torch.ops.quantized_decomposed


class PaddedConvs(nn.Module):
    """EfficientNet's static "same" padding: ReLU6 -> asymmetric ZeroPad2d -> stride-2 conv (dense, then depthwise
    3x3 and 5x5); and a pad of 1.0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.dw3 = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.dw5 = nn.Conv2d(8, 16, 5, stride=2, groups=8, padding=(1, 0))  # channel multiplier 2, own padding
        self.conv3 = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.pad(self.act(self.conv1(x))))
        y = self.dw3(F.pad(self.act(y), (0, 1, 0, 1)))
        y = self.dw5(F.pad(self.act(y), (1, 2, 0, 2)))
        return self.conv3(F.pad(torch.relu(y), (1, 1, 1, 1), value=1.0))  # not a zero pad: left as it is


def _pads(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _PADS]


def _quantize(model: nn.Module, data: list[torch.Tensor], move: bool) -> torch.fx.GraphModule:
    patch = mock.patch.object(_torchao, "quantize_before_pad", _torchao.quantize_before_pad if move else lambda gm: 0)
    with patch:
        return quantize_ptq(model, data, backend="x86", observer="minmax", num_calibration_samples=16, max_batch_size=8)


def test_zero_pad_runs_on_int8_with_the_same_results(tmp_path):
    torch.manual_seed(0)
    model = PaddedConvs().eval()
    data = [torch.randn(8, 3, 17, 17) * 2 for _ in range(2)]
    moved, kept = _quantize(model, data, move=True), _quantize(model, data, move=False)
    *zero_pads, one_pad = _pads(moved)
    for zero_pad in zero_pads:
        assert zero_pad.args[0].target == QD.dequantize_per_tensor.default  # quantized before the pad...
        assert [u.target for u in zero_pad.users] == [QD.quantize_per_tensor.default]  # ...with the same qparams
        assert zero_pad.args[0].args[1:3] == next(iter(zero_pad.users)).args[1:3]
    assert one_pad.args[0].target != QD.dequantize_per_tensor.default  # a pad of 1.0 is not moved
    assert _pads(kept)[0].args[0].target == torch.ops.aten.hardtanh.default  # without the rewrite: fp32 pad
    x = torch.randn(5, 3, 17, 17) * 2
    torch.testing.assert_close(moved(x), kept(x), rtol=0, atol=0)  # the zero point pads exactly 0.0

    # at export the pads before depthwise convs become their padding (grown kernels); the dense conv keeps its pad
    folded = copy.deepcopy(moved)
    assert fold_pads_into_depthwise_qconvs(folded) == 2
    assert len(_pads(folded)) == 2 and folded(x).shape == moved(x).shape
    expected = moved(x)
    torch.testing.assert_close(folded(x), expected, atol=0, rtol=0)  # the zero taps add exact zeros
    save(moved, tmp_path / "m.pt2")  # Inductor lowers the int8 pad; the artifact computes the same thing
    torch.testing.assert_close(load(tmp_path / "m.pt2")(x), expected, atol=0.02 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_zero_pad_detection(value):
    g = torch.fx.Graph()
    x = g.placeholder("x")
    pad = g.call_function(torch.ops.aten.pad.default, (x, [1, 1], "constant", value))
    nd = g.call_function(torch.ops.aten.constant_pad_nd.default, (x, [1, 1], value))
    reflect = g.call_function(torch.ops.aten.pad.default, (x, [1, 1], "reflect"))
    assert is_zero_pad(pad) is is_zero_pad(nd) is (value == 0.0)
    assert not is_zero_pad(reflect)


class SymmetricPads(nn.Module):
    """Zero pads a conv can absorb (symmetric, before its input) and ones it cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d(2)
        self.conv5 = nn.Conv2d(3, 4, 5)  # absorbs the ZeroPad2d(2): padding 2
        self.conv_p1 = nn.Conv2d(4, 4, 3, padding=1, groups=2)  # padding 1 + F.pad 1 -> 2
        self.conv_asym = nn.Conv2d(4, 4, 3, stride=2)  # after an asymmetric pad: kept
        self.conv1d = nn.Conv1d(4, 4, 3)  # F.pad (1, 1) on the last dim -> padding 1
        self.conv_shared = nn.Conv2d(4, 4, 3)  # its pad also feeds an add: kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv5(self.pad(x)))
        y = self.conv_p1(F.pad(y, (1, 1, 1, 1)))
        y = self.conv_asym(F.pad(y, (0, 1, 0, 1)))
        z = self.conv1d(F.pad(y.flatten(2), (1, 1)))
        p = F.pad(y, (1, 1, 1, 1))
        w = self.conv_shared(p) + p[:, :, 1:-1, 1:-1]
        return z.sum(-1) + w.flatten(1).sum(-1, keepdim=True) + F.pad(y, (1, 1, 1, 1), value=1.0).mean()


def test_symmetric_zero_pads_become_the_convs_padding():
    torch.manual_seed(0)
    model = SymmetricPads().eval()
    x = torch.randn(2, 3, 12, 12)
    ep = export(model, (x,), {}, max_batch_size=8, name="model")  # export folds them
    convs = {n.args[1].target: n for n in ep.graph.nodes if n.op == "call_function" and "conv" in str(n.target)}
    paddings = {k.split("_", 1)[1].rsplit("_", 1)[0]: list(n.args[4]) for k, n in convs.items() if len(n.args) > 4}
    assert paddings == {"conv5": [2, 2], "conv_p1": [2, 2], "conv1d": [1]}  # the others keep no padding argument
    kept = sorted(list(n.args[1]) for n in ep.graph.nodes if n.op == "call_function" and n.target in _PADS)
    assert kept == [[0, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]]  # asymmetric, shared with an add, value 1.0
    assert fold_zero_pads_into_convs(ep.graph) == 0
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)

    q = quantize_ptq(model, [torch.randn(8, 3, 12, 12)], backend="x86", num_calibration_samples=8, max_batch_size=8)
    assert len(_pads(q)) == 3
    x = torch.randn(4, 3, 12, 12)
    torch.testing.assert_close(q(x), model(x), atol=0.05 * float(model(x).abs().max()), rtol=0)


@pytest.mark.slow
def test_conv1d_on_a_single_channel_waveform_exports_a_correct_artifact(tmp_path):
    """Inductor compiles a one-input-channel int8 conv with wrong strides; Conv1d (raw audio) is padded as Conv2d is."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(1, 8, 5, stride=2, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip
    q = quantize_ptq(net, [torch.randn(8, 1, 64) for _ in range(4)], backend="x86")
    save(q, tmp_path / "m.pt2")
    artifact = load(tmp_path / "m.pt2")
    for batch in (5, 1):  # 0.19 and 0.08 of the outputs' range off without the padding
        x = torch.randn(batch, 1, 64)
        want = q(x)
        torch.testing.assert_close(artifact(x), want, atol=1e-4 * float(want.max() - want.min()), rtol=0)


class AudioNet(nn.Module):
    """Conv1d + BatchNorm + GELU/SiLU/Hardswish, as audio and text CNNs stack them (no ReLU anywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 9, stride=2, padding=4), nn.BatchNorm1d(8), nn.GELU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 16, 5, padding=2), nn.BatchNorm1d(16), nn.SiLU(),
            nn.Conv1d(16, 16, 3, padding=1, groups=16), nn.Hardswish(),
        )  # fmt: skip
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(-1))


def _int8_weight_convs(q: torch.fx.GraphModule) -> int:
    qd = torch.ops.quantized_decomposed
    return sum(
        n.target == torch.ops.aten.conv1d.default and n.args[1].target == qd.dequantize_per_channel.default
        for n in q.graph.nodes
    )


@pytest.mark.slow
def test_every_conv1d_is_int8_and_exports_on_x86(tmp_path):
    """torchao's X86InductorQuantizer quantized a Conv1d only before a ReLU: these stayed fp32 (or 'nothing to quantize'
    for a backbone of them), and once quantized, oneDNN's int8 conv1d refused the fused SiLU/Hardswish at run time."""
    torch.manual_seed(0)
    net = AudioNet()
    with_bn_statistics(net, torch.randn(64, 1, 64))
    net.eval()
    q = quantize_ptq(net, [torch.randn(8, 1, 64) for _ in range(4)], backend="x86")
    assert _int8_weight_convs(q) == 3
    x = torch.randn(6, 1, 64)
    want = net(x)
    torch.testing.assert_close(q(x), want, atol=0.05 * float(want.max() - want.min()), rtol=0)
    save(q, tmp_path / "m.pt2")  # checks the artifact against `q` itself (warns when they disagree)
    artifact = load(tmp_path / "m.pt2")
    for batch in (6, 1):
        x = torch.randn(batch, 1, 64)
        got, want = artifact(x), q(x)
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.max() - want.min()), rtol=0)


def test_qat_fake_quantizes_every_conv1d_and_folds_its_batch_norm():
    from lightning_quant import QATGraph
    from lightning_quant.config import QuantConfig

    torch.manual_seed(0)
    graph = QATGraph(AudioNet().features, "features", QuantConfig(backend="x86")).train()
    x = torch.randn(8, 1, 64)
    graph(x).sum().backward()
    graph.eval()
    q = graph.convert()
    assert _int8_weight_convs(q) == 3
    assert torch.ops.aten.batch_norm.default not in [n.target for n in q.graph.nodes]  # Conv1d + BN folded
    with torch.no_grad():
        torch.testing.assert_close(q(x), graph(x), atol=0.1 * float(graph(x).abs().max()), rtol=0)


class SamePadding(nn.Module):
    """``padding="same"``/``"valid"`` convolutions (``aten.convNd.padding``), with an even kernel (asymmetric zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 4, padding="same", dilation=2)  # 6 zeros: 3 left, 3 right
        self.c2 = nn.Conv2d(8, 8, (3, 2), padding="same")  # width: 0 left, 1 right
        self.c3 = nn.Conv2d(8, 8, 3, padding="valid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.c1(x)).unsqueeze(2).expand(-1, -1, 5, -1)
        return self.c3(F.relu(self.c2(h))).mean((2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86", pytest.param("arm", marks=needs_executorch)])
def test_string_padding_convs_are_quantized_and_exported(backend, tmp_path):
    """`aten.conv2d.padding` failed in X86InductorQuantizer ("conv2d is not an aten conv2d operator"), and a
    `Conv1d(padding="same")` stayed fp32: they are captured as convolutions with integer padding."""
    torch.manual_seed(0)
    net = SamePadding().eval()
    q = quantize_ptq(net, [torch.randn(8, 4, 24) for _ in range(4)], backend=backend)
    qd = torch.ops.quantized_decomposed
    convs = [n for n in q.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 3 and all(n.args[1].target == qd.dequantize_per_channel.default for n in convs)
    x = torch.randn(6, 4, 24)
    want = net(x)
    torch.testing.assert_close(q(x), want, atol=0.05 * float(want.max() - want.min()), rtol=0)
    path = tmp_path / f"m{_torchao.BACKENDS[backend].suffix}"
    save(q, path)  # checks the artifact against `q` itself (warns when they disagree)
    got, want = load(path)(x), q(x)
    torch.testing.assert_close(got, want, atol=0.02 * float(want.max() - want.min()), rtol=0)
