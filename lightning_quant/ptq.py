"""PTQCallback: post-training int8 quantization when ``trainer.fit`` ends."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_quant import _torchao
from lightning_quant._guards import artifact_dir, check_precision, check_siblings, check_strategy, resolve_dirpath
from lightning_quant._loop import (
    all_loaders,
    batches_for,
    first_loader,
    has_validation_step,
    loader_length,
    run_validation,
)
from lightning_quant._report import QuantReport, QuantResults, convert_on_rank_zero, finish
from lightning_quant.capture import SELF, child_targets, get_submodule, resolve_targets
from lightning_quant.config import QuantConfig, expect_output_args
from lightning_quant.quantize import CalibrationGraph


class PTQCallback(QuantResults, Callback):
    """Post-training int8 quantization of the trained model when ``fit`` ends, exported for x86 or ARM.

    Calibrates observers on ``num_calibration_samples`` samples by running your LightningModule's own
    ``validation_step`` over the chosen dataloader, converts a **copy** (the float model stays bit-identical and
    trainable; ``fit`` can be called again), writes the backend artifact plus its JSON sidecar to ``dirpath``, reloads
    it to check its outputs, and logs its validation metrics with an ``_int8`` suffix next to the float ones.

    Args:
        backend: ``"x86"`` (aliases ``"fbgemm"``, ``"onednn"``): AOTInductor ``.pt2``; or ``"arm"`` (aliases
            ``"qnnpack"``, ``"xnnpack"``): ExecuTorch ``.pte`` lowered to XNNPACK (needs ``lightning-quant[arm]``).
        num_calibration_samples: samples to calibrate on (1,000-3,000 usually suffice).
        calibration_data: ``"train"`` or ``"val"``: the dataloader to draw calibration batches from.
        observer: activation observer: ``"histogram"``, ``"minmax"`` or ``"moving_average"``.
        weight_granularity: ``"per_channel"`` (default) or ``"per_tensor"`` weight scales (for hardware that needs
            one scale per tensor; costs accuracy on nets whose channels have very different ranges).
        modules: dotted names of the submodules to quantize, ``"self"`` for the LightningModule's own ``forward``, or
            ``None`` to pick: layers defined directly on the LightningModule -> ``"self"``, else every child holding
            Conv/Linear layers (``"model"``, or ``"backbone"`` and ``"head"``).
        dirpath: where artifacts go (default ``<trainer.log_dir>/quantized``).
        max_batch_size: largest batch the artifact accepts (the batch dimension is dynamic up to it).
        bias_correction: subtract from each conv/linear bias the mean output shift that rounding its weight to int8
            causes, measured on the calibration data (default on; ``False`` gives plain round-to-nearest weights).
        evaluate: run ``validation_step`` with the int8 artifact and log ``<metric><metric_suffix>``.
        metric_suffix: appended to your metric names for the int8 results.
        dynamic_dims: other dimensions of the batched inputs that vary, each with its largest size: ``{1: 512}`` for
            text of 2 to 512 tokens in dimension 1 (x86 only). Every other dimension is fixed at the first batch's size.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range or names nothing known.
        ModuleNotFoundError: ``backend="arm"`` without executorch installed.

    Example::

        >>> from lightning_quant import PTQCallback
        >>> cb = PTQCallback(backend="x86", num_calibration_samples=512)
        >>> cb.config.backend, cb.config.num_calibration_samples
        ('x86', 512)
    """

    def __init__(
        self,
        backend: str = "x86",
        num_calibration_samples: int = 1024,
        calibration_data: str = "train",
        observer: str = "histogram",
        weight_granularity: str = "per_channel",
        modules: str | list[str] | None = None,
        dirpath: str | None = None,
        max_batch_size: int = 1024,
        bias_correction: bool = True,
        evaluate: bool = True,
        metric_suffix: str = "_int8",
        dynamic_dims: dict[int, int] | None = None,
    ) -> None:
        self.config = QuantConfig(
            backend=backend,
            modules=modules,
            observer=observer,
            num_calibration_samples=num_calibration_samples,
            calibration_data=calibration_data,
            max_batch_size=max_batch_size,
            weight_granularity=weight_granularity,
            bias_correction=bias_correction,
            dynamic_dims=dynamic_dims,
        )
        if self.config.backend == "arm":
            _torchao.require_executorch(backend)
        expect_output_args(dirpath, evaluate, metric_suffix)
        self.dirpath = dirpath
        self._dirpath: Path | None = None  # resolved at `setup`, on every rank
        self._dirpath_trainer: weakref.ref | None = None  # the trainer it was resolved for
        self.evaluate = evaluate
        self.metric_suffix = metric_suffix
        self.quantized_modules: dict[str, torch.fx.GraphModule] = {}
        self.report: QuantReport | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Fail before training, not after hours of it.
        check_strategy(trainer, "PTQCallback")
        check_precision(trainer, "PTQCallback")
        self._dirpath = resolve_dirpath(self.dirpath, trainer)
        self._dirpath_trainer = weakref.ref(trainer)
        if not has_validation_step(pl_module):
            raise ValueError(
                f"PTQCallback calibrates by running `{type(pl_module).__name__}.validation_step` on calibration "
                "batches, but it defines none. Define `validation_step`, or quantize with "
                "`lightning_quant.quantize_ptq(...)`."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not at `setup`: the LightningModule's `setup` and `configure_model` run after it and may build layers
        resolve_targets(pl_module, self.config.modules)
        check_siblings(self, trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail before training, not after it, on what the dataloaders will need at fit end.
        if type(self).calibration_loader is not PTQCallback.calibration_loader:
            return  # a custom calibration source: checked when it is used
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        source = getattr(val_loop, "_data_source", None)
        if (self.config.calibration_data == "val" or self.evaluate) and source is not None and source.is_defined():
            val_loop.setup_data()  # what the first validation does (once)
        loaders = [("calibration", self.calibration_loader(trainer))]
        if self.evaluate:
            loaders += [("validation (int8 evaluation)", v) for v in all_loaders(trainer.val_dataloaders)]
        for what, loader in loaders:
            batch = getattr(loader, "batch_size", None)
            if isinstance(batch, int) and batch > self.config.max_batch_size:
                raise ValueError(
                    f"Expected argument `max_batch_size` ({self.config.max_batch_size}) to be at least the batch size "
                    f"of the {what} dataloader ({batch}): the int8 artifact takes batches up to `max_batch_size`. "
                    "Raise `max_batch_size` or use smaller batches."
                )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            return
        # calibrated once, on rank 0 (the only rank that writes artifacts): every rank gets the same int8 model
        self.quantized_modules = convert_on_rank_zero(trainer, lambda: self._calibrate(trainer, pl_module))
        if trainer.is_global_zero:
            self.report = self._finish(trainer, pl_module)

    def calibration_loader(self, trainer: pl.Trainer) -> Any:
        """The dataloader calibration draws from (``calibration_data``; the first of several).

        Override to calibrate on other data.
        """
        source = self.config.calibration_data
        loader = first_loader(trainer.train_dataloader if source == "train" else trainer.val_dataloaders)
        other = "val" if source == "train" else "train"
        if loader is None:
            raise ValueError(
                f"Expected a {source} dataloader for calibration (calibration_data={source!r}), but the trainer has "
                f"none. Pass calibration_data={other!r} or give `fit` a {source} dataloader."
            )
        if loader_length(loader) == 0:
            raise ValueError(
                f"Expected the {source} dataloader used for calibration (calibration_data={source!r}) to yield "
                f"batches, but it is empty. Pass calibration_data={other!r} or check the dataset."
            )
        return loader

    def quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantReport:
        """Calibrate, convert a copy, export, check and report. Runs at ``on_fit_end``; callable after ``fit`` too."""
        self.quantized_modules = self._calibrate(trainer, pl_module)
        self.report = self._finish(trainer, pl_module)
        return self.report

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        targets = resolve_targets(pl_module, self.config.modules)
        artifact_dir(self, trainer)  # a folder that cannot be written fails before the work
        loader = self.calibration_loader(trainer)
        n_batches = batches_for(loader, self.config.num_calibration_samples)
        calibrators = self._observe(trainer, pl_module, loader, targets, n_batches)
        if self.config.modules is None and targets == (SELF,) and calibrators[SELF].prepared is None:
            # the default picked `forward`, but the steps call the children directly (`self.head(self.backbone(x))`)
            children = child_targets(pl_module)
            if children:
                rank_zero_info(
                    f"PTQCallback: `{type(pl_module).__name__}.forward` was not called during calibration (the steps "
                    f"call its submodules directly), so {list(children)} are quantized instead, one artifact each."
                )
                calibrators = self._observe(trainer, pl_module, loader, children, n_batches)
        return {name: c.convert() for name, c in calibrators.items()}

    def _observe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any, targets: tuple[str, ...], n_batches: int
    ) -> dict[str, CalibrationGraph]:
        calibrators = {name: CalibrationGraph(get_submodule(pl_module, name), name, self.config) for name in targets}
        run_validation(trainer, pl_module, loader, calibrators, limit_batches=n_batches)
        return calibrators

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantReport:
        return finish(
            trainer,
            pl_module,
            self.quantized_modules,
            method="PTQ",
            backend=self.config.backend,
            dirpath=artifact_dir(self, trainer),
            metric_suffix=self.metric_suffix,
            evaluate=self.evaluate,
        )
