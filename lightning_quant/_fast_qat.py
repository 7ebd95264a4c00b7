"""Faster stand-ins for the two hot spots of a ``prepare_qat_pt2e`` training graph: the same function, pure torch.

* ``FusedMovingAvgObsFakeQuantize``: ATen's fused op fake-quantizes in a scalar (non-vectorized) loop. Here the
  observer update and the choice of scale/zero point still run in that ATen op, but on a two-value summary of the
  input (its min and max; per row for per-channel weights), so running min/max, scale and zero point are
  bit-identical. The fake quantization itself runs as vectorized tensor ops doing the same float32 arithmetic
  (``x * (1/scale)``, round half to even, ``+ zero_point``, clamp, ``- zero_point``, ``* scale``), and the backward is
  ATen's: the gradient times the in-range mask (straight-through inside ``[quant_min, quant_max]``, zero outside).
  Only non-finite inputs can differ: ATen maps NaN to ``quant_min`` (here it stays NaN; its gradient is zero in both),
  and its per-channel kernel casts ``±inf`` to int64 before clamping (undefined; ``quant_min`` on x86), where here
  ``±inf`` clamps to ``quant_max``/``quant_min`` as in ATen's per-tensor kernel. bf16/fp16 inputs (autocast), which
  ATen's op refuses, are fake-quantized in float32 and come back as float32.
* The Conv+BN QAT pattern divides the conv output by the per-channel BN scale: a full-size pass forward and three
  backward. A convolution is linear in its weight and each output channel has its own filter, so
  ``conv(x, w) / s == conv(x, w / s[:, None, None, None])`` (without bias, or torchao's zero bias): the division moves
  onto the (small) fake-quantized weight, where ``s`` is the factor that scales that weight (nothing else is folded).
  Mathematically the same function and gradients; float rounding differs (relative ~1e-7). Where the conv does not
  allow it (transposed, a real bias), :class:`_DivByScale` reuses the forward quotient in the backward and negates
  after the reduction: bit for bit ``aten.div``'s results, two full-size passes fewer.

:func:`install` applies both to a prepared graph, :func:`uninstall` restores torchao's originals (``convert_pt2e``
pattern-matches the QAT graph, so :meth:`QATGraph.convert` converts a restored copy).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_quant import _torchao

aten = torch.ops.aten
_CONV = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
_RESHAPE = (aten.reshape.default, aten.view.default)
_HALF = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------------ fake quant


class _FakeQuantSTE(torch.autograd.Function):
    """Affine fake quantization with ``scale``/``zero_point`` already shaped to broadcast against ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
        zp = zero_point.to(x.dtype)
        q = torch.mul(x, torch.reciprocal(scale))  # ATen: x * (1.0f / scale)
        q.round_()  # nearbyint: half to even
        q.add_(zp)  # an integer in float32: exact
        clamped = torch.clamp(q, qmin, qmax)
        # In range (NaN: False, as ATen's mask). On CPU a 0/1 float32 mask, written over q: bool outputs and
        # float*bool products take scalar loops there, and grad * 1.0 / grad * 0.0 is exactly ATen's grad * mask.
        mask = q.eq_(clamped) if q.device.type == "cpu" else torch.eq(clamped, q)
        ctx.save_for_backward(mask)
        if zero_point.device.type != "cpu" or bool(zero_point.any()):
            clamped.sub_(zp)  # c - 0 == c bit for bit: skipped for zero points of 0 (ReLU outputs, symmetric weights)
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None  # ATen's fake_quantize_*_cachemask_backward


def fused_moving_avg_fake_quant(fq: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``FusedMovingAvgObsFakeQuantize.forward`` with identical results, or ``None`` for cases left to torchao.

    Those are: fake quantization switched off, non-float32 or empty inputs, per-channel along another axis than 0.
    """
    if x.dtype in _HALF:
        # mixed precision (autocast): ATen's fused op takes float32 only ("expected scalar type Float but found
        # BFloat16"); quantize in float32, which int8 levels and scales need anyway, and hand back float32
        return fused_moving_avg_fake_quant(fq, x.float())
    if x.dtype != torch.float32 or x.numel() == 0 or not fq.fake_quant_enabled.item():
        return None
    obs = fq.activation_post_process
    per_channel = bool(fq.is_per_channel)
    if per_channel and fq.ch_axis != 0:
        return None
    observe = bool(fq.observer_enabled.item())
    with torch.no_grad():
        if per_channel:
            if observe:
                stats = torch.stack(torch.aminmax(x.reshape(x.shape[0], -1), dim=1), dim=1)
            else:
                stats = x.new_zeros(x.shape[0], 2)
        else:
            stats = torch.stack(torch.aminmax(x)) if observe else x.new_zeros(2)
        # Updates min_val/max_val (when observing), scale and zero_point in place, exactly as on the full input:
        # the moving average only reads the (per-row) min and max, which ``stats`` has.
        torch.fused_moving_avg_obs_fake_quant(
            stats,
            fq.observer_enabled,
            fq.fake_quant_enabled,
            obs.min_val,
            obs.max_val,
            fq.scale,
            fq.zero_point,
            obs.averaging_constant,
            obs.quant_min,
            obs.quant_max,
            fq.ch_axis,
            per_channel,
            fq.is_symmetric_quant,
        )
    scale, zero_point = fq.scale, fq.zero_point
    if per_channel:
        shape = (-1,) + (1,) * (x.ndim - 1)
        scale, zero_point = scale.view(shape), zero_point.view(shape)
    return _FakeQuantSTE.apply(x, scale, zero_point, obs.quant_min, obs.quant_max)


# ----------------------------------------------------------------------------------------------------- conv + bn


class _DivByScale(torch.autograd.Function):
    """``a / b`` with autograd's ``DivBackward0`` arithmetic, reusing the quotient from the forward.

    ``DivBackward0``: ``grad_a = grad / b`` and ``grad_b = sum_to(-grad * ((a / b) / b))``. Here ``a / b`` is the
    saved output (the same bits), and the sign is applied after the reduction (negation is exact and rounding is
    symmetric, so ``-sum(v) == sum(-v)`` bit for bit).
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.div(a, b)
        ctx.save_for_backward(out, b)
        ctx.a_shape = a.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        out, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.div(grad, b).sum_to_size(ctx.a_shape)
        if ctx.needs_input_grad[1]:
            grad_b = torch.mul(grad, torch.div(out, b)).sum_to_size(b.shape).neg()
        return grad_a, grad_b


def div_by_scale(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Graph target standing in for ``aten.div.Tensor`` in the Conv+BN QAT pattern."""
    return _DivByScale.apply(a, b)


def weight_div_by_scale(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Graph target: the conv weight divided by the Conv+BN scale (given in the output's ``[1, C, 1, ...]`` shape)."""
    return torch.div(weight, scale.reshape((-1,) + (1,) * (weight.ndim - 1)))


def _is_conv_bn_div(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target != aten.div.Tensor or len(node.args) != 2 or node.kwargs:
        return False
    a, b = node.args
    return isinstance(a, torch.fx.Node) and a.target in _CONV and isinstance(b, torch.fx.Node) and b.target in _RESHAPE


def _foldable(div: torch.fx.Node) -> bool:
    """The Conv+BN QAT pattern of torchao, exactly: ``conv(x, fq(w * r(sf, [-1, 1, ..]))) / r(sf, [1, -1, 1, ..])``.

    The divisor must be the same per-output-channel factor ``sf`` that scales the conv's (fake-quantized) weight, so
    that dividing the weight instead is the same function; and the conv must be one whose output channel ``c`` is
    ``conv(x, weight[c])`` alone: not transposed, no bias (or torchao's zero bias), no other user of its output.
    """
    conv, divisor = div.args
    if len(conv.users) != 1 or len(conv.args) < 2 or not isinstance(conv.args[1], torch.fx.Node):
        return False
    if conv.target == aten.convolution.default and conv.args[6]:  # transposed: output channels on the weight's dim 1
        return False
    bias = conv.kwargs.get("bias", conv.args[2] if len(conv.args) > 2 else None)
    if not (bias is None or (isinstance(bias, torch.fx.Node) and bias.target == aten.zeros_like.default)):
        return False
    shape = list(divisor.args[1])  # a reshape/view (``_is_conv_bn_div``): (input, shape)
    if len(shape) < 2 or shape[1] != -1 or any(d != 1 for d in shape[:1] + shape[2:]):
        return False
    factor = divisor.args[0]
    fake_quant = conv.args[1]  # the weight's fake-quantize module call, on w * reshape(factor, [-1, 1, ...])
    scaled = fake_quant.args[0] if fake_quant.op == "call_module" and len(fake_quant.args) == 1 else None
    if not isinstance(scaled, torch.fx.Node) or scaled.target != aten.mul.Tensor or len(scaled.args) != 2:
        return False
    weight_factor = scaled.args[1]
    return (
        isinstance(weight_factor, torch.fx.Node)
        and weight_factor.target in _RESHAPE
        and weight_factor.args[0] is factor
        and list(weight_factor.args[1]) == [-1] + [1] * (len(shape) - 1)
    )


def _fold_divisions(gm: torch.fx.GraphModule) -> int:
    n = 0
    for div in list(gm.graph.nodes):
        if not _is_conv_bn_div(div) or not _foldable(div):
            continue
        conv, scale = div.args
        conv.prepend(scale)  # the divisor's reshape now comes before the conv (its input, the factor, already does)
        with gm.graph.inserting_before(conv):
            weight = gm.graph.call_function(weight_div_by_scale, (conv.args[1], scale))
        weight.meta["lightning_quant_div"] = (div.name, div.meta)  # for _unfold_divisions
        conv.update_arg(1, weight)
        div.replace_all_uses_with(conv)
        gm.graph.erase_node(div)
        n += 1
    return n


def _unfold_divisions(gm: torch.fx.GraphModule) -> int:
    n = 0
    for weight in list(gm.graph.nodes):
        if weight.op != "call_function" or weight.target is not weight_div_by_scale:
            continue
        (conv,) = weight.users
        fake_quantized, scale = weight.args
        name, meta = weight.meta.get("lightning_quant_div", (None, {}))
        conv.update_arg(1, fake_quantized)
        with gm.graph.inserting_after(conv):
            div = gm.graph.create_node("call_function", aten.div.Tensor, (conv, scale), name=name)
        div.meta = dict(meta)
        conv.replace_all_uses_with(div, delete_user_cb=lambda user, div=div: user is not div)
        div.prepend(scale)
        gm.graph.erase_node(weight)
        n += 1
    return n


# --------------------------------------------------------------------------------------------------- the passes


def install(gm: torch.fx.GraphModule, fold: bool = True) -> int:
    """Use the fast stand-ins in a prepared QAT graph; returns how many nodes and modules were switched.

    ``fold=False`` keeps every Conv+BN division on the conv output (as :func:`div_by_scale`): torchao's results bit
    for bit, at the cost of the full-size passes.
    """
    n = _fold_divisions(gm) if fold else 0
    for node in gm.graph.nodes:
        if _is_conv_bn_div(node):
            node.target = div_by_scale
            n += 1
    if n:
        gm.recompile()
    return n + _torchao.use_fast_fake_quantize(gm, True)


def uninstall(gm: torch.fx.GraphModule) -> int:
    """Restore torchao's graph (``aten.div`` nodes, its FakeQuantize classes); returns how many were switched back."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is div_by_scale:
            node.target = aten.div.Tensor
            n += 1
    n += _unfold_divisions(gm)
    if n:
        gm.recompile()
    return n + _torchao.use_fast_fake_quantize(gm, False)
