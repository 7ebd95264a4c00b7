"""Running the user's own ``validation_step`` over some batches, with other submodules swapped in.

Calibration and int8 evaluation both go through a short-lived inner ``Trainer`` (CPU, one device, no checkpointing),
so that the user's step code, torchmetrics metrics and Lightning's progress bar all work as usual, while the outer
Trainer's state, loggers and callbacks are left alone. What the step may reach for is there: ``self.logger`` is a
logger that records nothing (when the outer Trainer has one; its ``log_dir`` is the outer one),
``self.trainer.datamodule`` the outer one, whose batch hooks apply. The LightningModule's and datamodule's
``prepare_data``/``setup``/``teardown`` are not called again: they ran for the outer Trainer, and a ``setup`` that
builds layers would replace the trained ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.trainer.connectors.data_connector import _DataHookSelector
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_quant.capture import swapped


def has_validation_step(pl_module: pl.LightningModule) -> bool:
    return is_overridden("validation_step", pl_module)


def first_loader(loaders: Any) -> Any:
    """The first dataloader of what ``trainer.val_dataloaders``/``train_dataloader`` hold (a loader, list or dict)."""
    if loaders is None:
        return None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    inner = getattr(loaders, "iterables", None)  # CombinedLoader
    if inner is not None and inner is not loaders:
        return first_loader(inner)
    return loaders


def all_loaders(loaders: Any) -> list[Any]:
    """Every dataloader of what ``trainer.val_dataloaders`` holds (a loader, list, dict or CombinedLoader)."""
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in all_loaders(v)]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in all_loaders(v)]
    inner = getattr(loaders, "iterables", None)  # CombinedLoader
    if inner is not None and inner is not loaders:
        return all_loaders(inner)
    return [loaders]


def loader_length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def batches_for(loader: Any, num_samples: int) -> int:
    """How many batches of ``loader`` hold at least ``num_samples`` samples (capped at the loader's length)."""
    batch_size = getattr(loader, "batch_size", None)
    if not batch_size:
        batch_size = extract_batch_size(next(iter(loader)))
    n = math.ceil(num_samples / max(1, batch_size))
    length = loader_length(loader)
    return min(n, length) if length is not None else n


def _progress_bar(outer: pl.Trainer) -> list[pl.Callback]:
    """A bar like the outer Trainer's for the inner loops: tqdm bars only.

    A ``RichProgressBar`` (Lightning's default once ``rich`` is installed) holds the console's one live display while
    the outer fit runs; a second one in the inner Trainer leaves the outer bar's teardown failing (``IndexError`` in
    rich). Inner loops under it, or under a custom bar, run without one.
    """
    bar = outer.progress_bar_callback
    if not isinstance(bar, TQDMProgressBar):
        return []
    try:
        return [type(bar)()]
    except TypeError:
        return [TQDMProgressBar()]


@contextlib.contextmanager
def _quiet_inner_trainer() -> Iterator[None]:
    """The inner Trainer's banners ("GPU available", tips, limit notices) and loader-shuffle warnings are noise here."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*shuffling enabled.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _skip(*args: Any, **kwargs: Any) -> None:
    return None


class _SilentLogger(DummyLogger):
    """Records nothing; ``save_dir``/``log_dir`` are the outer Trainer's ``log_dir`` (a step may write files there)."""

    def __init__(self, log_dir: str | None) -> None:
        super().__init__()
        self._log_dir = log_dir

    @property
    def save_dir(self) -> str | None:
        return self._log_dir

    @property
    def log_dir(self) -> str | None:
        return self._log_dir


def _outer_log_dir(outer: pl.Trainer) -> str | None:
    """``outer.log_dir`` without its broadcast (only rank 0 runs the inner loops): Lightning's own choice of folder."""
    if not outer.loggers:
        return outer.default_root_dir
    first = outer.loggers[0]
    return first.log_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir


def _with_datamodule(inner: pl.Trainer, datamodule: pl.LightningDataModule | None) -> None:
    """Show ``datamodule`` to the inner Trainer's step code and apply its batch hooks, but not its data or setup.

    ``validate(dataloaders=...)`` attaches no datamodule; the batch hooks (``on_before_batch_transfer``,
    ``transfer_batch_to_device``, ``on_after_batch_transfer``) of a datamodule are chosen when data is attached, so
    they are chosen again right after. ``prepare_data`` is not run again: it ran for the outer Trainer, and under DDP
    Lightning wraps it in a barrier that only rank 0, alone in these loops, would enter.
    """
    connector = inner._data_connector
    connector.prepare_data = _skip
    if datamodule is None:
        return
    inner.datamodule = datamodule
    attach, outer_datamodule = connector.attach_datamodule, datamodule

    def attach_hooks_of_datamodule(model: pl.LightningModule, datamodule: Any = None) -> None:
        attach(model, datamodule=datamodule)
        connector._datahook_selector = _DataHookSelector(model, outer_datamodule)

    connector.attach_datamodule = attach_hooks_of_datamodule


@contextlib.contextmanager
def _without_setup_and_teardown(*owners: Any) -> Iterator[None]:
    """Make ``setup``/``teardown`` of each owner (LightningModule, datamodule) a no-op for the inner Trainer."""
    saved = []
    for owner in owners:
        if owner is None:
            continue
        for name in ("setup", "teardown"):
            saved.append((owner, name, owner.__dict__.get(name)))
            setattr(owner, name, _skip)
    try:
        yield
    finally:
        for owner, name, before in reversed(saved):
            if before is None:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, before)


@contextlib.contextmanager
def _local_metrics(pl_module: nn.Module) -> Iterator[None]:
    """Keep torchmetrics from syncing across processes: in DDP only rank 0 runs these inner loops."""
    from torchmetrics import Metric

    metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
    saved = [(m.sync_on_compute, m._to_sync) for m in metrics]
    for m in metrics:
        m.sync_on_compute = m._to_sync = False
    try:
        yield
    finally:
        for m, (on_compute, to_sync) in zip(metrics, saved):
            m.sync_on_compute, m._to_sync = on_compute, to_sync


def run_validation(
    outer: pl.Trainer,
    pl_module: pl.LightningModule,
    loader: Any,
    replacements: dict[str, nn.Module] | None = None,
    limit_batches: int | float = 1.0,
) -> dict[str, float]:
    """Run ``pl_module.validation_step`` over ``loader`` on CPU with ``replacements`` swapped in; return its metrics.

    The LightningModule ends where it started: same submodules, same device, attached to ``outer``.
    """
    with _quiet_inner_trainer(), _local_metrics(pl_module):
        return _run_validation(outer, pl_module, loader, replacements, limit_batches)


def _run_validation(
    outer: pl.Trainer,
    pl_module: pl.LightningModule,
    loader: Any,
    replacements: dict[str, nn.Module] | None,
    limit_batches: int | float,
) -> dict[str, float]:
    inner = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=_SilentLogger(_outer_log_dir(outer)) if outer.loggers else False,  # `self.logger...` records nothing
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=(bar := _progress_bar(outer)),
        enable_progress_bar=bool(bar),
        limit_val_batches=limit_batches,
        num_sanity_val_steps=0,
        inference_mode=False,  # observers write to their buffers in place
        default_root_dir=outer.default_root_dir,
    )
    datamodule = outer.datamodule
    _with_datamodule(inner, datamodule)
    device = pl_module.device
    was_training = pl_module.training
    try:
        with swapped(pl_module, replacements or {}), _without_setup_and_teardown(pl_module, datamodule):
            results = inner.validate(pl_module, dataloaders=loader, verbose=False)
    finally:
        pl_module.trainer = outer
        pl_module.to(device)
        pl_module.train(was_training)
    # one dict per dataloader; with several, Lightning has suffixed each key with its `/dataloader_idx_<i>`
    return {k: float(v) for metrics in results for k, v in metrics.items()}
