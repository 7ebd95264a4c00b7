"""ReLU6 after conv/linear/add on the ``arm`` backend: quantized at the clamp's output, and the ``.pte`` agrees.

Regression test for EfficientNet-Lite0 (TF-"SAME" padded convs + BN + ReLU6): XNNPACKQuantizer gave a ReLU6 the int8
grid of its *unclamped* input, so only a few levels fell in [0, 6], and the reloaded ``.pte`` drifted far from the
in-process int8 model (0.91 on logits, 74% top-1 agreement with fp32).
"""

from __future__ import annotations

import pytest
import torch
from helpers import with_bn_statistics
from torch import nn

from lightning_quant import _torchao
from lightning_quant.export import load, save
from lightning_quant.quantize import quantize_ptq

pytestmark = pytest.mark.skipif(not _torchao.executorch_available(), reason="needs lightning-quant[arm]")

QD = torch.ops.quantized_decomposed


class SamePadReLU6Net(nn.Module):
    """EfficientNet-Lite's pattern in small: a ZeroPad2d((0, 1, 0, 1)) + stride-2 conv + BN + ReLU6 stem, then an
    MBConv block: padded depthwise conv + BN sharing the same ReLU6 module, 1x1 projection + BN, residual add. The
    stem's BN output spans far more than [0, 6], as in the pretrained network. Returns the block's features (pooling
    would average the differences away)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Conv2d(3, 16, 3, 2, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw_pad = nn.ZeroPad2d(1)
        self.dw = nn.Conv2d(16, 16, 3, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu6 = nn.ReLU6()
        with torch.no_grad():
            self.bn0.weight.uniform_(5.0, 20.0)  # a wide pre-activation range, like the pretrained stem's [-106, 119]
            self.bn1.weight.uniform_(2.0, 8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu6(self.bn0(self.stem(self.stem_pad(x))))
        y = self.relu6(self.bn1(self.dw(self.dw_pad(x))))
        return x + self.bn2(self.project(y))


def _hardtanh_output_scales(q: torch.fx.GraphModule) -> list[float]:
    """The int8 scale each hardtanh's output is quantized with."""
    scales = []
    for node in q.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.hardtanh.default:
            (user,) = node.users
            assert user.target == QD.quantize_per_tensor.default, user.target
            scales.append(float(user.args[1]))
    return scales


@pytest.fixture(scope="module")
def relu6_q():
    torch.manual_seed(0)
    model = with_bn_statistics(SamePadReLU6Net(), torch.randn(16, 3, 16, 16))
    calib = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    return model, quantize_ptq(model, calib, backend="arm", num_calibration_samples=32, max_batch_size=8)


def test_arm_relu6_quantized_at_its_output(relu6_q):
    _, q = relu6_q
    linear = nn.Sequential(nn.Linear(8, 8), nn.ReLU6()).eval()
    with torch.no_grad():
        linear[0].weight.mul_(20.0)
    q_linear = quantize_ptq(linear, [torch.randn(16, 8)], backend="arm", num_calibration_samples=16)
    for gm, expected in ((q, 2), (q_linear, 1)):
        scales = _hardtanh_output_scales(gm)
        assert len(scales) == expected, scales  # each ReLU6 fused with the conv(-BN)/linear before it
        for s in scales:
            assert s <= 6.0 / 255 * 1.001, scales  # the int8 grid spans at most [0, 6], not the pre-activation range
        for node in gm.graph.nodes:  # nothing quantized between a producer and its ReLU6
            if node.op == "call_function" and node.target == torch.ops.aten.hardtanh.default:
                assert node.args[0].target != QD.dequantize_per_tensor.default


def test_arm_relu6_pte_matches_int8_model(relu6_q, tmp_path):
    _, q = relu6_q
    path = tmp_path / "relu6.pte"
    sidecar = save(q, path)
    assert not [op for op in sidecar["undelegated_ops"] if "conv" in op or "hardtanh" in op or "clamp" in op], sidecar
    runner = load(path)
    (out,) = [n for n in q.graph.nodes if n.op == "output"]
    step = float(out.args[0][0].args[1])  # the output dequantize's scale
    torch.manual_seed(2)
    for batch in (1, 8):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            got, ref = runner(x), q(x)
        # XNNPACK requantizes with its own rounding: one step of the output grid. (Before the fix: up to 5 steps, a
        # stem value one step of its coarse grid off moved the block output by several output steps.)
        diff = float((got - ref).abs().max())
        assert diff <= 1.01 * step + 1e-6, (batch, diff, step)
