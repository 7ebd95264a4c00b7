"""Checks shared by the callbacks at ``setup``, before training: strategies, sibling callbacks, output folder."""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lightning_quant.capture import SELF, resolve_targets

#: strategies whose model is a plain module (DDP wraps it without sharding parameters)
SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)


def check_strategy(trainer: pl.Trainer, who: str) -> None:
    """Refuse strategies that shard or re-own parameters (FSDP, DeepSpeed, model parallel, ...)."""
    strategy = trainer.strategy
    if not isinstance(strategy, SUPPORTED_STRATEGIES):
        raise ValueError(
            f"{who} does not support the {type(strategy).__name__} strategy: PT2E capture needs whole, unsharded "
            "parameters. Use a single device or strategy='ddp' / 'ddp_spawn' for training, or quantize the "
            "consolidated checkpoint afterwards with `lightning-quant ptq`."
        )


def check_precision(trainer: pl.Trainer, who: str) -> None:
    """Refuse a "*-true" precision other than float32: it converts the model's weights (and batches) to that dtype."""
    precision = str(trainer.precision)
    if precision.endswith("-true") and precision != "32-true":
        dtype = {"64-true": "float64", "16-true": "float16", "bf16-true": "bfloat16"}.get(precision, precision)
        raise ValueError(
            f"{who} does not support the Trainer's precision={precision!r}: it converts the model's weights to "
            f"{dtype}, and int8 quantization (PT2E) starts from float32 weights. Train "
            "with precision='32-true' or 'bf16-mixed' (autocast; the weights stay float32), or quantize the "
            "checkpoint afterwards with `lightning-quant ptq`."
        )


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> list[str]:
    out = []
    for x in a:
        for y in b:
            if SELF in (x, y) or x == y or x.startswith(y + ".") or y.startswith(x + "."):
                out.append(x if len(x) >= len(y) else y)
    return sorted(set(out))


def _logs_int8_metrics(callback: pl.Callback) -> bool:
    return bool(callback.evaluate and getattr(callback, "export", True))


def check_siblings(callback: pl.Callback, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse a second QAT callback, or a PTQ callback, on a submodule a QAT callback trains.

    Several PTQCallbacks (one per backend) may share a model: each converts its own copy. Two of them for the same
    backend and folder would overwrite each other's artifacts and are refused too, as are two callbacks logging
    their int8 metrics under the same names.
    """
    from lightning_quant.ptq import PTQCallback
    from lightning_quant.qat import QATCallback

    mine = resolve_targets(pl_module, callback.config.modules)
    for other in trainer.callbacks:
        if other is callback or not isinstance(other, (PTQCallback, QATCallback)):
            continue
        shared = _overlap(mine, resolve_targets(pl_module, other.config.modules))
        if shared and (isinstance(callback, QATCallback) or isinstance(other, QATCallback)):
            raise ValueError(
                f"Two lightning-quant callbacks ({type(callback).__name__} and {type(other).__name__}) act on the same "
                f"submodule(s) {shared}. QAT changes the model it trains, so it must be the only callback on it: "
                "keep one, or point them at different submodules with `modules=`."
            )
        if shared and callback.config.backend == other.config.backend and callback.dirpath == other.dirpath:
            raise ValueError(
                f"Two PTQCallbacks for backend {callback.config.backend!r} write {shared} to the same `dirpath`; "
                "give them different `dirpath`s or keep one."
            )
        if _logs_int8_metrics(callback) and _logs_int8_metrics(other) and callback.metric_suffix == other.metric_suffix:
            raise ValueError(
                f"Two lightning-quant callbacks ({type(callback).__name__} for {callback.config.backend!r} and "
                f"{type(other).__name__} for {other.config.backend!r}) log their int8 metrics with the same "
                f"`metric_suffix` ({callback.metric_suffix!r}), so one would overwrite the other's. Give each its "
                f"own, e.g. `metric_suffix='_int8_{other.config.backend}'`, or pass `evaluate=False` to one."
            )


def resolve_dirpath(dirpath: str | os.PathLike | None, trainer: pl.Trainer) -> Path:
    """The artifact folder: ``dirpath`` or ``<trainer.log_dir>/quantized``; checked writable before any work.

    Call it on every rank (``setup``): ``trainer.log_dir`` broadcasts rank 0's folder, so a call on rank 0 alone would
    wait for the other ranks forever, or mismatch their next collective. Later checks go through :func:`check_dirpath`.
    """
    path = (
        Path(dirpath).expanduser()
        if dirpath is not None
        else Path(trainer.log_dir or trainer.default_root_dir) / "quantized"
    )
    return check_dirpath(path)


def check_dirpath(path: Path) -> Path:
    """``path`` if it is a folder, or can become one, that this process may write to."""
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"Expected argument `dirpath` to be a folder, but {str(path)!r} is a file. Pass a folder path."
        )
    probe = path
    while not probe.exists():
        probe = probe.parent
    try:  # a real write: `os.access` says yes to root anywhere, /proc and /sys included
        os.rmdir(tempfile.mkdtemp(prefix=".lightning_quant_probe_", dir=probe))
    except OSError as err:
        raise PermissionError(
            f"Expected argument `dirpath` to be writable, but {str(probe)!r} is not ({err.strerror or err}). Pass a "
            "folder you can write to."
        ) from None
    return path


def artifact_dir(callback: Any, trainer: pl.Trainer) -> Path:
    """The folder ``callback`` writes to, as resolved by its ``setup`` (on every rank), checked again now.

    Safe on rank 0 alone for the trainer that ran ``setup``. Resolves it now for another trainer, or if ``setup`` did
    not run (``PTQCallback.quantize`` called outside ``fit``).
    """
    owner = callback._dirpath_trainer() if callback._dirpath_trainer is not None else None
    if callback._dirpath is None or owner is not trainer:  # another trainer: its own folder
        callback._dirpath = resolve_dirpath(callback.dirpath, trainer)
        callback._dirpath_trainer = weakref.ref(trainer)
    return check_dirpath(callback._dirpath)
