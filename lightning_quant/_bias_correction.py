"""Bias correction for PTQ: remove the mean output shift that rounding the weights to int8 causes.

Rounding a conv/linear weight ``W`` to its int8 grid adds an error ``dW``; its effect on the layer's output has a
non-zero mean, ``E[dW x] = dW E[x]`` per output channel, which int8 inference adds to every output and passes down the
net (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019; OpenVINO
NNCF's post-training quantization runs this "fast bias correction" by default). During calibration each layer's input
mean per channel is recorded (:func:`attach`); before conversion, the shift computed from the weight that conversion
will really use (the weight observer's scale and zero point) is subtracted from the layer's bias (:func:`apply`).

Spatial zero padding is ignored (each output is assumed to see the input's mean at every kernel tap), as in NNCF's fast
variant. Works on a prepared PT2E graph of either backend; no torchao import is needed (observers are duck-typed).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

#: layer ops whose bias is corrected -> the dimension of their input that holds the channels
_LAYERS = {
    torch.ops.aten.conv1d.default: 1,
    torch.ops.aten.conv2d.default: 1,
    torch.ops.aten.conv3d.default: 1,
    torch.ops.aten.conv1d.padding: 1,
    torch.ops.aten.conv2d.padding: 1,
    torch.ops.aten.conv3d.padding: 1,
    torch.ops.aten.linear.default: -1,
}
_GROUPS_ARG = 6  # aten.conv*d(input, weight, bias, stride, padding, dilation, groups)
_PREFIX = "_lq_input_mean_"


class InputMean(nn.Module):
    """Passes its input through, accumulating the mean over every dimension but ``channel_dim``.

    Values of +-inf are left out, as the histogram observer leaves them out of its range (int8 clamps them).
    """

    def __init__(self, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("total", torch.zeros(0, dtype=torch.float64), persistent=False)
        self.register_buffer("counts", torch.zeros(0, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            flat = x.detach().movedim(self.channel_dim, 0).reshape(x.shape[self.channel_dim], -1)
            kept = ~flat.isinf()
            sums = torch.where(kept, flat, 0).sum(1, dtype=torch.float64)
            counts = kept.sum(1)
            if self.total.numel() == 0:
                self.total, self.counts = sums, counts
            else:
                self.total, self.counts = self.total + sums, self.counts + counts
        return x

    @property
    def mean(self) -> torch.Tensor | None:
        """Per channel; 0 for a channel that saw only +-inf; ``None`` when nothing was recorded."""
        if self.counts.numel() == 0 or not bool(self.counts.any()):
            return None
        return self.total / self.counts.clamp(min=1)


def _attr(root: nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), root)


def _weight_observer(gm: torch.fx.GraphModule, layer: torch.fx.Node) -> tuple[torch.Tensor, Any] | None:
    """(float weight, its observer) when ``layer``'s weight is a constant observed for int8, else ``None``."""
    if len(layer.args) < 2:
        return None
    obs_node = layer.args[1]
    if not (isinstance(obs_node, torch.fx.Node) and obs_node.op == "call_module" and obs_node.args):
        return None
    weight_node = obs_node.args[0]
    if not (isinstance(weight_node, torch.fx.Node) and weight_node.op == "get_attr"):
        return None
    observer = gm.get_submodule(obs_node.target)
    if not hasattr(observer, "calculate_qparams") or not hasattr(observer, "quant_min"):
        return None
    return _attr(gm, weight_node.target), observer


def _bias_node(layer: torch.fx.Node) -> torch.fx.Node | None | bool:
    """The layer's bias get_attr, ``None`` if it has no bias, ``False`` if its bias is anything else."""
    bias = layer.args[2] if len(layer.args) > 2 else layer.kwargs.get("bias")
    if bias is None:
        return None
    if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
        return bias
    return False


def attach(gm: torch.fx.GraphModule) -> int:
    """Record the input mean of every conv/linear of prepared graph ``gm`` whose int8 weight is observed.

    Returns the number of layers instrumented.
    """
    count = 0
    for layer in list(gm.graph.nodes):
        dim = _LAYERS.get(layer.target) if layer.op == "call_function" else None
        if dim is None or not isinstance(layer.args[0], torch.fx.Node) or _bias_node(layer) is False:
            continue
        if _weight_observer(gm, layer) is None:
            continue
        name = f"{_PREFIX}{count}"
        gm.add_submodule(name, InputMean(dim))
        with gm.graph.inserting_before(layer):
            record = gm.graph.call_module(name, (layer.args[0],))
        layer.update_arg(0, record)
        count += 1
    if count:
        gm.recompile()
    return count


def _fake_quantize(weight: torch.Tensor, observer: Any) -> torch.Tensor:
    """``weight`` on the int8 grid that conversion gives it (the observer's scale and zero point)."""
    scale, zero_point = observer.calculate_qparams()
    scale, zero_point = scale.to(weight.dtype), zero_point.to(weight.dtype)
    if scale.numel() > 1:
        shape = [1] * weight.dim()
        shape[observer.ch_axis] = -1
        scale, zero_point = scale.view(shape), zero_point.view(shape)
    q = torch.clamp(torch.round(weight / scale) + zero_point, observer.quant_min, observer.quant_max)
    return (q - zero_point) * scale


def _output_shift(layer: torch.fx.Node, error: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Mean output change per output channel caused by weight error ``error`` on inputs with channel mean ``mean``."""
    if layer.target == torch.ops.aten.linear.default:
        return error.reshape(error.shape[0], -1) @ mean
    groups = layer.args[_GROUPS_ARG] if len(layer.args) > _GROUPS_ARG else layer.kwargs.get("groups", 1)
    out_ch, in_per_group = error.shape[0], error.shape[1]
    taps = error.reshape(groups, out_ch // groups, in_per_group, -1).sum(-1)
    return (taps * mean.view(groups, 1, in_per_group)).sum(-1).reshape(out_ch)


def apply(gm: torch.fx.GraphModule, correct: bool = True) -> int:
    """Remove :func:`attach`'s recorders from ``gm``; with ``correct``, first subtract each layer's shift from its bias.

    Layers whose recorder saw no data keep their bias. Returns the number of biases corrected.
    """
    corrected = 0
    for record in list(gm.graph.nodes):
        if record.op != "call_module" or not record.target.startswith(_PREFIX):
            continue
        recorder = gm.get_submodule(record.target)
        for layer in list(record.users):
            found = _weight_observer(gm, layer) if correct and recorder.mean is not None else None
            if found is not None:
                weight, observer = found
                with torch.no_grad():
                    weight = weight.detach().float()
                    shift = _output_shift(layer, _fake_quantize(weight, observer) - weight, recorder.mean.float())
                _set_bias(gm, layer, shift, corrected)
                corrected += 1
        record.replace_all_uses_with(record.args[0])
        gm.graph.erase_node(record)
        delattr(gm, record.target)
    gm.recompile()
    return corrected


def _set_bias(gm: torch.fx.GraphModule, layer: torch.fx.Node, shift: torch.Tensor, index: int) -> None:
    """Give ``layer`` a new bias constant: its old bias (or zero) minus ``shift``. Shared biases are not mutated."""
    old = _bias_node(layer)
    base = torch.zeros_like(shift) if old is None else _attr(gm, old.target).detach()
    name = f"_lq_corrected_bias_{index}"
    gm.register_parameter(name, nn.Parameter((base - shift.to(base.dtype)).contiguous(), requires_grad=False))
    with gm.graph.inserting_before(layer):
        bias = gm.graph.get_attr(name)
    if len(layer.args) > 2:
        layer.update_arg(2, bias)
    elif "bias" in layer.kwargs:
        layer.update_kwarg("bias", bias)
    else:
        layer.args = (*layer.args[:2], bias)
