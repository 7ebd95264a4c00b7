"""PTQ bias correction: the mean output shift of int8 weights is measured on calibration data and removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_quant import _bias_correction
from lightning_quant.config import QuantConfig
from lightning_quant.quantize import META_KEY, CalibrationGraph, quantize_ptq

BACKENDS = ["x86", pytest.param("arm", marks=pytest.mark.arm)]


class OffsetInputs(nn.Module):
    """Conv (no bias) -> depthwise conv -> Linear, fed inputs whose channel means are far from zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.fc = nn.Linear(8 * 4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dw(self.conv(x)).flatten(1))


def _data(n: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return 2.0 + 0.5 * torch.randn(n, 3, 8, 8, generator=g)


def _mean_error(backend: str, bias_correction: bool) -> tuple[float, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = OffsetInputs().eval()
    x = _data()
    q = quantize_ptq(
        model,
        [x[i : i + 64] for i in range(0, len(x), 64)],
        backend=backend,
        weight_granularity="per_tensor",  # coarse weights: a large, systematic shift to remove
        num_calibration_samples=len(x),
        bias_correction=bias_correction,
        max_batch_size=256,
    )
    with torch.no_grad():
        err = (q(x) - model(x)).mean(0)  # mean output error per output unit over the calibration data
    return float(err.abs().mean()), q


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_correction_removes_the_mean_output_error(backend):
    plain, q_plain = _mean_error(backend, bias_correction=False)
    corrected, q = _mean_error(backend, bias_correction=True)
    assert corrected < 0.3 * plain, (corrected, plain)
    assert q.meta[META_KEY]["bias_corrected_layers"] == 3
    assert q_plain.meta[META_KEY]["bias_corrected_layers"] == 0
    for gm in (q, q_plain):  # no recorder is left in the int8 graph
        assert not [n for n, _ in gm.named_modules() if n.startswith(_bias_correction._PREFIX)]


def test_output_shift_matches_the_conv_of_the_weight_error():
    """With each input channel constant (no padding), conv(x, dW) is the shift at every position, groups included."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(8, generator=g)
    x = mean.view(1, 8, 1, 1).expand(1, 8, 5, 5)
    for groups in (1, 2, 8):
        error = torch.randn(12 if groups != 8 else 8, 8 // groups, 3, 3, generator=g)
        node = torch.fx.Graph().call_function(
            torch.ops.aten.conv2d.default, (None, None, None, [1, 1], [0, 0], [1, 1], groups)
        )
        expected = F.conv2d(x, error, groups=groups)[0, :, 0, 0]
        torch.testing.assert_close(_bias_correction._output_shift(node, error, mean), expected)
    lin = torch.fx.Graph().call_function(torch.ops.aten.linear.default, (None, None))
    error = torch.randn(4, 8, generator=g)
    torch.testing.assert_close(_bias_correction._output_shift(lin, error, mean), error @ mean)


def test_calibration_goes_on_after_a_convert():
    """convert() works on a copy: the recorders keep counting, and a later convert uses all the data seen."""
    model = OffsetInputs().eval()
    calib = CalibrationGraph(model, "m", QuantConfig(num_calibration_samples=128, max_batch_size=64))
    x = _data(128)
    with torch.no_grad():
        calib(x[:64])
        first = calib.convert()
        calib(x[64:] + 1.0)  # inputs with another mean: the correction must change
        second = calib.convert()
    recorders = [m for n, m in calib.prepared.named_modules() if n.startswith(_bias_correction._PREFIX)]
    assert len(recorders) == 3 and all(bool((r.counts > 0).all()) for r in recorders)
    assert (recorders[0].counts == 128 * 8 * 8).all()  # every position of every sample, for the first conv's input
    b1, b2 = (dict(gm.named_parameters()) | dict(gm.named_buffers()) for gm in (first, second))
    corrected = [k for k in b1 if k.startswith("_lq_corrected_bias")]
    assert corrected and any(not torch.equal(b1[k], b2[k]) for k in corrected)


def test_bias_correction_must_be_a_bool():
    with pytest.raises(TypeError, match=r"`bias_correction` to be True or False"):
        QuantConfig(bias_correction="yes")
