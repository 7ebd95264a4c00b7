"""x86: a zero pad between a conv's activation and the next conv is quantized at its input (int8 pad, fused conv)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_quant import _torchao
from lightning_quant.export import load, save
from lightning_quant.quantize import quantize_ptq

QD = torch.ops.quantized_decomposed


class PaddedConvs(nn.Module):
    """EfficientNet's static "same" padding: ReLU6 -> asymmetric ZeroPad2d -> stride-2 conv; and a pad of 1.0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.pad(self.act(self.conv1(x))))
        return self.conv3(F.pad(torch.relu(y), (1, 1, 1, 1), value=1.0))  # not a zero pad: left as it is


def _pads(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _torchao._PADS]


def _quantize(model: nn.Module, data: list[torch.Tensor], move: bool) -> torch.fx.GraphModule:
    patch = mock.patch.object(_torchao, "quantize_before_pad", _torchao.quantize_before_pad if move else lambda gm: 0)
    with patch:
        return quantize_ptq(model, data, backend="x86", observer="minmax", num_calibration_samples=16, max_batch_size=8)


def test_zero_pad_runs_on_int8_with_the_same_results(tmp_path):
    torch.manual_seed(0)
    model = PaddedConvs().eval()
    data = [torch.randn(8, 3, 9, 9) * 2 for _ in range(2)]
    moved, kept = _quantize(model, data, move=True), _quantize(model, data, move=False)
    zero_pad, one_pad = _pads(moved)
    assert zero_pad.args[0].target == QD.dequantize_per_tensor.default  # quantized before the pad...
    assert [u.target for u in zero_pad.users] == [QD.quantize_per_tensor.default]  # ...with the same qparams after it
    assert zero_pad.args[0].args[1:3] == next(iter(zero_pad.users)).args[1:3]
    assert one_pad.args[0].target != QD.dequantize_per_tensor.default  # a pad of 1.0 is not moved
    assert _pads(kept)[0].args[0].target == torch.ops.aten.hardtanh.default  # without the rewrite: fp32 pad
    x = torch.randn(5, 3, 9, 9) * 2
    torch.testing.assert_close(moved(x), kept(x), rtol=0, atol=0)  # the zero point pads exactly 0.0

    save(moved, tmp_path / "m.pt2")  # Inductor lowers the int8 pad; the artifact computes the same thing
    expected = moved(x)
    torch.testing.assert_close(load(tmp_path / "m.pt2")(x), expected, atol=0.02 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_zero_pad_detection(value):
    g = torch.fx.Graph()
    x = g.placeholder("x")
    pad = g.call_function(torch.ops.aten.pad.default, (x, [1, 1], "constant", value))
    nd = g.call_function(torch.ops.aten.constant_pad_nd.default, (x, [1, 1], value))
    reflect = g.call_function(torch.ops.aten.pad.default, (x, [1, 1], "reflect"))
    assert _torchao._zero_pad(pad) is _torchao._zero_pad(nd) is (value == 0.0)
    assert not _torchao._zero_pad(reflect)
