"""PTQCallback inside real Trainer fits: both backends, both model layouts, bad inputs, the demo command."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import CaptureError, PTQCallback, QATCallback, _torchao, load

needs_executorch = pytest.mark.skipif(not _torchao.executorch_available(), reason="needs lightning-quant[arm]")


def _data(n: int = 256, side: int = 12, seed: int = 0) -> TensorDataset:
    """Learnable synthetic images: the class is which quadrant holds a bright blob."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, side, side, generator=g)
    h = side // 2
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, r * h : (r + 1) * h, col * h : (col + 1) * h] += 1.0
    return TensorDataset(x, y)


def _loaders(batch_size: int = 32, shuffle: bool = True) -> tuple[DataLoader, DataLoader]:
    return DataLoader(_data(256), batch_size=batch_size, shuffle=shuffle), DataLoader(_data(96, seed=1), batch_size=48)


class _Base(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=4, average="micro")

    def net(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class AttrLayout(_Base):
    """The network in an attribute: ``self.model`` (Conv-BN-ReLU-Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 4),
        )


class BackboneHead(_Base):
    """``self.backbone`` + ``self.head`` called from the steps, no ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
        self.loss_fn = nn.CrossEntropyLoss()

    def net(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class FlatLayout(_Base):
    """Layers defined on the LightningModule and used by its ``forward``, which takes a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1)) / temperature

    def net(self, x: torch.Tensor) -> torch.Tensor:
        return self(x, temperature=1.0)


class _FloatSnapshot(Callback):
    """Records the float state_dict at ``on_fit_end``, before PTQCallback (placed after it) runs."""

    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _fit(model, callbacks, tmp_path, max_epochs: int = 2, ckpt_path=None, shuffle: bool = True, **kwargs):
    train, val = _loaders(shuffle=shuffle)
    options = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer = pl.Trainer(**{**options, **kwargs})
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer


def _assert_same_state(before: dict, module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86", pytest.param("arm", marks=needs_executorch)])
def test_fit_then_ptq(backend, tmp_path):
    pl.seed_everything(0)
    model = AttrLayout()
    snap = _FloatSnapshot()
    ptq = PTQCallback(backend=backend, num_calibration_samples=64, dirpath=str(tmp_path / "q"))
    trainer = _fit(model, [snap, ptq], tmp_path)

    # float model untouched by PTQ, bit for bit, and still the float modules
    _assert_same_state(snap.state, model)
    assert isinstance(model.model, nn.Sequential)
    assert "forward" not in model.__dict__

    # artifact + sidecar
    path = ptq.artifacts["model"]
    assert path.suffix == {"x86": ".pt2", "arm": ".pte"}[backend]
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["backend"] == backend
    assert sidecar["num_calibration_samples"] == 64  # 2 batches of 32
    assert sidecar["metrics"]["int8"]["val_acc"] == pytest.approx(trainer.callback_metrics["val_acc_int8"].item())

    # int8 metrics logged next to the float ones, from the user's validation_step
    metrics = trainer.callback_metrics
    assert metrics["val_acc"] > 0.8, "the synthetic task should be learnt"
    assert abs(metrics["val_acc_int8"] - metrics["val_acc"]) <= 0.05
    assert metrics["val_acc_fp32"].item() == pytest.approx(ptq.report.metrics_fp32["val_acc"])  # same pass as int8
    assert ptq.report.parity_max_abs_diff["model"] < 0.2

    # the quantized model is usable in process and matches the artifact
    x = _data(8, seed=3).tensors[0]
    art = load(path)
    with torch.no_grad():
        ref = ptq.quantized_model(x)
    scale = float(ref.max() - ref.min()) / 255
    assert (art(x) - ref).abs().max() <= 1.01 * scale + 1e-5

    # a second fit works on the same model
    _fit(model, [], tmp_path, max_epochs=1)


@pytest.mark.slow
def test_layers_on_the_lightning_module_keep_forward_signature(tmp_path):
    pl.seed_everything(0)
    model = FlatLayout()
    ptq = PTQCallback(num_calibration_samples=32, dirpath=str(tmp_path))
    trainer = _fit(model, [ptq], tmp_path)
    assert list(ptq.quantized_modules) == ["self"]
    assert ptq.artifacts["self"].name == "FlatLayout_int8.pt2"
    assert "val_acc_int8" in trainer.callback_metrics
    # the captured graph keeps the keyword argument of the user's forward
    x = _data(4, seed=2).tensors[0]
    q = ptq.quantized_model(x, temperature=1.0)
    assert q.shape == (4, 4)
    # routing removed: the LightningModule's forward is its own again
    assert "forward" not in model.__dict__
    assert "_lightning_quant_forward" not in dict(model.named_children())
    torch.testing.assert_close(model(x), FlatLayout.forward(model, x))


class _WithTeacher(FlatLayout):
    """A layer the LightningModule holds but its ``forward`` never calls (a distillation teacher, a loss network)."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = nn.Linear(256, 256)


@pytest.mark.slow
def test_size_ratio_counts_only_what_the_int8_model_holds(tmp_path):
    pl.seed_everything(0)
    model = _WithTeacher()
    ptq = PTQCallback(num_calibration_samples=32, dirpath=str(tmp_path), evaluate=False)
    _fit(model, [ptq], tmp_path, max_epochs=1)
    fp32, int8 = ptq.report.size_bytes["self"]
    sidecar = json.loads(ptq.artifacts["self"].with_suffix(".pt2.json").read_text())
    assert sidecar["fp32_size_bytes"] == fp32
    used = sum(4 * p.numel() for m in (model.conv, model.bn, model.fc) for p in m.parameters())
    teacher = 4 * sum(p.numel() for p in model.teacher.parameters())  # 257 KiB, 16x the rest
    assert used <= fp32 < used + teacher / 4  # was the whole state_dict: the teacher made int8 look 17x smaller
    assert int8 == ptq.artifacts["self"].stat().st_size


@pytest.mark.slow
def test_backbone_and_head_are_quantized_separately(tmp_path):
    pl.seed_everything(0)
    model = BackboneHead()
    ptq = PTQCallback(num_calibration_samples=32, dirpath=str(tmp_path), evaluate=True)
    trainer = _fit(model, [ptq], tmp_path, max_epochs=1)
    assert set(ptq.quantized_modules) == {"backbone", "head"}
    assert {p.name for p in ptq.artifacts.values()} == {"backbone_int8.pt2", "head_int8.pt2"}
    assert "val_acc_int8" in trainer.callback_metrics
    with pytest.raises(RuntimeError, match="quantized_modules"):
        _ = ptq.quantized_model


class _BackboneLinearHeadWithForward(BackboneHead):
    """A ``forward`` and a Linear held directly (so the default picks ``forward``), but the steps bypass ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def net(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(1))


def test_default_falls_back_to_the_children_when_the_steps_bypass_forward(tmp_path, caplog):
    pl.seed_everything(0)
    model = _BackboneLinearHeadWithForward()
    ptq = PTQCallback(num_calibration_samples=32, dirpath=str(tmp_path), evaluate=True)
    with caplog.at_level("INFO"):
        trainer = _fit(model, [ptq], tmp_path, max_epochs=1)
    assert "was not called during calibration" in caplog.text
    assert set(ptq.quantized_modules) == {"backbone", "head"}
    assert {p.name for p in ptq.artifacts.values()} == {"backbone_int8.pt2", "head_int8.pt2"}
    assert "val_acc_int8" in trainer.callback_metrics
    x = _data(96, seed=1).tensors[0]
    q = ptq.quantized_modules
    with torch.no_grad():
        agree = (q["head"](q["backbone"](x).flatten(1)).argmax(1) == model(x).argmax(1)).float().mean()
    assert agree >= 0.95


class _CountsValBatches(AttrLayout):
    """Counts the batches of the val loader (48 samples) that inner `validate` runs (calibration uses train's 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner_val_batches = 0

    def validation_step(self, batch, batch_idx):
        if self.trainer.state.fn == "validate" and len(batch[0]) == 48:
            self.inner_val_batches += 1
        return super().validation_step(batch, batch_idx)


class _Quadrants(pl.LightningDataModule):
    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.prepared = self.transferred = 0

    def prepare_data(self) -> None:
        self.prepared += 1

    def train_dataloader(self):
        return _loaders()[0]

    def val_dataloader(self):
        return _loaders()[1]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.transferred += 1  # e.g. normalization on the device: calibration must see it too
        return batch


def _logged_trainer(tmp_path, callbacks) -> pl.Trainer:
    """A quiet one-epoch CPU Trainer with a CSV logger (the steps of `_SetupBuiltHead` use `self.logger`)."""
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


class _SetupBuiltHead(_Base):
    """Builds its head in ``setup`` (Lightning's docstring pattern, not idempotent) and reaches for ``self.logger`` and
    ``self.trainer.datamodule`` in ``validation_step``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.setup_calls: list[str] = []
        self.log_dirs: set[str | None] = set()
        self.transfers: list[int] = []

    def setup(self, stage: str) -> None:
        self.setup_calls.append(getattr(stage, "value", stage))
        self.head = nn.Linear(8 * 6 * 6, self.trainer.datamodule.num_classes)

    def net(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def validation_step(self, batch, batch_idx):
        assert self.trainer.datamodule.num_classes == 4
        self.logger.log_metrics({"seen": float(batch_idx)})  # e.g. `self.logger.experiment.add_image(...)`
        self.log_dirs.add(self.trainer.log_dir)  # e.g. to write images there
        self.transfers.append(self.trainer.datamodule.transferred)
        super().validation_step(batch, batch_idx)


@pytest.mark.slow
def test_qat_after_a_validate_finds_the_layers_built_in_setup(tmp_path):
    from lightning_quant import QATCallback, QATGraph

    pl.seed_everything(0)
    model, qat = _SetupBuiltHead(), QATCallback(start_epoch=0, export=False)
    trainer = _logged_trainer(tmp_path, [qat])
    trainer.validate(model, datamodule=_Quadrants(), verbose=False)  # a baseline first: `setup` runs after QAT's
    trainer.fit(model, datamodule=_Quadrants())
    assert isinstance(model.backbone, QATGraph) and isinstance(model.head, QATGraph)


class _BuiltInConfigureModel(_Base):
    """All layers built in ``configure_model`` (Lightning's hook for it; idempotent, as Lightning asks)."""

    def configure_model(self) -> None:
        if getattr(self, "model", None) is None:
            self.model = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
            )


@pytest.mark.slow
@pytest.mark.parametrize("modules", [None, ["model"]])
@pytest.mark.parametrize("method", ["ptq", "qat"])
def test_layers_built_in_configure_model(method, modules, tmp_path):
    from lightning_quant import QATCallback

    pl.seed_everything(0)
    model = _BuiltInConfigureModel()
    if method == "ptq":
        callback = PTQCallback(modules=modules, dirpath=str(tmp_path), num_calibration_samples=64, evaluate=False)
    else:
        callback = QATCallback(modules=modules, start_epoch=0, export=False)
    _fit(model, [callback], tmp_path, max_epochs=1)
    if method == "ptq":
        assert set(callback.quantized_modules) == {"model"}
    else:
        assert model.model.captured and model.model.training_calls > 0


@pytest.mark.slow
def test_validate_a_qat_checkpoint_into_layers_built_in_configure_model(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_quant import QATCallback, QATGraph

    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trained = _BuiltInConfigureModel()
    trainer = _fit(trained, [QATCallback(start_epoch=0, export=False), ckpt], tmp_path, 1, enable_checkpointing=True)
    want = float(trainer.callback_metrics["val_acc"])
    for modules in (None, ["model"]):
        model = _BuiltInConfigureModel()
        evaluator = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[QATCallback(modules=modules)]
        )
        out = evaluator.validate(model, _loaders()[1], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
        assert isinstance(model.model, QATGraph)
        assert out[0]["val_acc"] == pytest.approx(want, abs=1e-6)


@pytest.mark.slow
def test_validation_step_using_logger_and_datamodule_with_layers_built_in_setup(tmp_path):
    pl.seed_everything(0)
    model, ptq = _SetupBuiltHead(), PTQCallback(dirpath=str(tmp_path / "q"), num_calibration_samples=64)

    class KeepHead(Callback):
        def on_train_end(self, trainer, pl_module):
            self.head = pl_module.head

    keep = KeepHead()
    trainer = _logged_trainer(tmp_path, [ptq, keep])
    datamodule = _Quadrants()
    trainer.fit(model, datamodule=datamodule)
    assert model.setup_calls == ["fit"]  # calibration and the evaluations did not run `setup` again
    assert datamodule.prepared == 1  # nor `prepare_data` (under DDP, a barrier only rank 0 would enter)
    assert model.log_dirs == {trainer.log_dir}
    assert len(set(model.transfers)) == len(model.transfers) > 4  # the datamodule's batch hook ran before every step
    assert model.head is keep.head  # the trained head, not a new one
    # the fp32 evaluation ran the trained model: the same accuracy as the last epoch's validation
    assert ptq.report.metrics_fp32["val_acc"] == pytest.approx(float(trainer.callback_metrics["val_acc"]))
    assert set(ptq.report.artifacts) == {"backbone", "head"}  # layers built in `setup` are found at fit start
    assert all(path.is_file() for path in ptq.report.artifacts.values())


@pytest.mark.slow
@needs_executorch
def test_int8_evaluation_keeps_to_limit_val_batches(tmp_path):
    model = _CountsValBatches()
    ptq = PTQCallback(backend="arm", num_calibration_samples=32, dirpath=str(tmp_path / "q"))
    trainer = _fit(model, [ptq], tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    assert model.inner_val_batches == 2  # fp32 and int8, one batch each (of two in the loader)
    assert "val_acc_int8" in trainer.callback_metrics


class _TwoValLoaders(AttrLayout):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return super().validation_step(batch, batch_idx)


@pytest.mark.slow
@needs_executorch
def test_every_val_loader_evaluated_under_rich_progress_bar(tmp_path):
    """Rich is Lightning's default bar once installed: the inner loops must not open a second live display."""
    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    pl.seed_everything(0)
    train, val = _loaders()
    inverted = DataLoader(TensorDataset(-val.dataset.tensors[0], val.dataset.tensors[1]), batch_size=48)
    ptq = PTQCallback(backend="arm", num_calibration_samples=32, dirpath=str(tmp_path / "q"))
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[ptq, RichProgressBar()],
        default_root_dir=tmp_path,
    )
    trainer.fit(_TwoValLoaders(), train, [val, inverted])
    assert isinstance(trainer.progress_bar_callback, RichProgressBar)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for i in (0, 1):  # the metric's own suffix first, then Lightning's dataloader suffix
        assert m[f"val_acc_int8/dataloader_idx_{i}"] == pytest.approx(m[f"val_acc_fp32/dataloader_idx_{i}"], abs=0.05)
        assert m[f"val_acc_fp32/dataloader_idx_{i}"] == pytest.approx(m[f"val_acc/dataloader_idx_{i}"])
    assert m["val_acc/dataloader_idx_0"] > 0.8 > m["val_acc/dataloader_idx_1"]  # two different sets measured


@pytest.mark.parametrize(("offset", "off"), [(0.02, False), (0.5, True), (float("nan"), True)])
def test_reload_parity_judges_int8_rounding_apart_from_a_wrong_runtime(offset, off):
    from lightning_quant.export import max_abs_diff, parity_is_off

    want = {"logits": torch.linspace(-3.0, 5.0, 40).reshape(4, 10), "ids": torch.arange(4)}
    shift = offset * 8.0  # a runtime off by this fraction of the outputs' range (or NaN)
    got = {"logits": want["logits"] + shift, "ids": want["ids"]}
    diff = max_abs_diff(got, want)
    assert diff == pytest.approx(math.inf if math.isnan(shift) else shift, rel=1e-5)
    assert parity_is_off(diff, want) is off
    assert max_abs_diff(want, want) == 0.0 and not parity_is_off(0.0, want)


@needs_executorch
def test_save_warns_when_the_written_artifact_disagrees_with_the_model(tmp_path, monkeypatch):
    from lightning_quant import export, quantize_ptq

    q = quantize_ptq(
        AttrLayout().eval().model, DataLoader(_data(64), batch_size=32), backend="arm", input_fn=lambda b: b[0]
    )
    forward = export.QuantizedArtifact.forward
    monkeypatch.setattr(export.QuantizedArtifact, "forward", lambda self, *a, **k: forward(self, *a, **k) + 10.0)
    with pytest.warns(
        UserWarning, match=r"The exported artifact for 'Sequential' \(m.pte\) differs from the in-process"
    ):
        sidecar = export.save(q, tmp_path / "m.pte")
    assert sidecar["parity_max_abs_diff"] == pytest.approx(10.0, abs=0.5)


def test_last_smaller_batch_and_batch_one_run_through_the_int8_model(tmp_path):
    from lightning_quant import quantize_ptq

    model = AttrLayout().eval()
    q = quantize_ptq(model.model, DataLoader(_data(70), batch_size=32), input_fn=lambda b: b[0])
    for n in (1, 6, 32):
        assert q(torch.randn(n, 1, 12, 12)).shape == (n, 4)


# ----------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "x87"}, ValueError, r"`backend`.*Did you mean 'x86'"),
        ({"backend": 86}, TypeError, r"`backend`"),
        ({"num_calibration_samples": 0}, ValueError, r"`num_calibration_samples`.*>= 1"),
        ({"num_calibration_samples": -5}, ValueError, r"`num_calibration_samples`"),
        ({"num_calibration_samples": 1.5}, TypeError, r"`num_calibration_samples`"),
        ({"calibration_data": "test"}, ValueError, r"`calibration_data`.*'train', 'val'"),
        ({"observer": "kl"}, ValueError, r"`observer`.*'histogram'"),
        ({"modules": []}, ValueError, r"`modules`"),
        ({"modules": ["model", "model.0"]}, ValueError, r"`modules`.*contains"),
        ({"modules": 3}, TypeError, r"`modules`"),
        ({"max_batch_size": 1}, ValueError, r"`max_batch_size`"),
        ({"dirpath": 5}, TypeError, r"`dirpath`"),
        ({"metric_suffix": ""}, ValueError, r"`metric_suffix`"),
        ({"evaluate": "yes"}, TypeError, r"`evaluate`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PTQCallback(**kwargs)


def test_arm_without_executorch_names_the_extra(monkeypatch):
    monkeypatch.setattr(_torchao, "executorch_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning-quant\[arm\]"'):
        PTQCallback(backend="qnnpack")


class NoLayers(_Base):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.ReLU())
        self.scale = nn.Parameter(torch.ones(1))

    def net(self, x):
        return self.model(x)[:, :4] * self.scale


class NoValidationStep(AttrLayout):
    validation_step = pl.LightningModule.validation_step


class Untraceable(AttrLayout):
    def __init__(self) -> None:
        super().__init__()
        self.model = _DataDependent(self.model)


class _DataDependent(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.mean() > 0:  # data-dependent Python control flow: torch.export cannot capture it
            return self.inner(x)
        return -self.inner(x)


@pytest.mark.parametrize(
    ("model_cls", "cb_kwargs", "match"),
    [
        (AttrLayout, {"modules": "modle"}, r"`modules`.*'modle' does not exist.*Did you mean 'model'"),
        (NoLayers, {}, r"no quantizable layers"),
        (AttrLayout, {"modules": "val_acc"}, r"no Conv/Linear"),
        (BackboneHead, {"modules": "self"}, r"'self'.*defines no `forward`"),
        (NoValidationStep, {}, r"validation_step"),
    ],
)
def test_bad_setup_fails_before_training(model_cls, cb_kwargs, match, tmp_path):
    model = model_cls()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        _fit(model, [PTQCallback(dirpath=str(tmp_path), **cb_kwargs)], tmp_path, max_epochs=1)
    _assert_same_state(before, model)


@pytest.mark.parametrize(
    ("cb_kwargs", "match"),
    [
        ({"max_batch_size": 16}, r"`max_batch_size` \(16\) .* batch size of the calibration dataloader \(32\)"),
        ({"max_batch_size": 40}, r"`max_batch_size` \(40\) .* of the validation \(int8 evaluation\) dataloader \(48\)"),
        ({"calibration_data": "val", "val": False}, r"Expected a val dataloader for calibration"),
    ],
    ids=["calibration-batch", "evaluation-batch", "no-val-loader"],
)
def test_dataloader_mismatch_fails_before_training(cb_kwargs, match, tmp_path):
    model = AttrLayout()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = _loaders()
    with_val = cb_kwargs.pop("val", True)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,  # the val loader is not built before training: the check builds it
        callbacks=[PTQCallback(dirpath=str(tmp_path), **cb_kwargs)],
    )
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, train, val if with_val else None)
    assert trainer.global_step == 0
    _assert_same_state(before, model)


def test_dirpath_that_is_a_file_fails_before_training(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ValueError, match=r"`dirpath`.*is a file"):
        _fit(AttrLayout(), [PTQCallback(dirpath=str(f))], tmp_path, max_epochs=1)


@pytest.mark.parametrize("cls", [PTQCallback, QATCallback])
def test_a_later_trainer_gets_its_own_default_folder(cls, tmp_path):
    """The folder resolved at one fit's `setup` was kept: `PTQCallback.quantize(trainer_b, ...)` after
    `trainer_a.fit` wrote into trainer A's folder."""
    from lightning_quant._guards import artifact_dir

    callback, model = cls(), AttrLayout()
    a, b = (pl.Trainer(default_root_dir=tmp_path / n, logger=False, enable_progress_bar=False) for n in "ab")
    callback.setup(a, model, "fit")
    assert artifact_dir(callback, a) == tmp_path / "a" / "quantized"
    pickle.loads(pickle.dumps(callback))  # ddp_spawn pickles the callbacks: the trainer is held by a weak reference
    callback.teardown(a, model, "fit")
    assert artifact_dir(callback, b) == tmp_path / "b" / "quantized"


def test_untraceable_forward_names_the_submodule_and_keeps_the_model(tmp_path):
    model = Untraceable()
    snap = _FloatSnapshot()
    with pytest.raises(CaptureError, match=r"torch.export could not capture 'model' \(_DataDependent\)"):
        _fit(model, [snap, PTQCallback(dirpath=str(tmp_path))], tmp_path, max_epochs=1)
    _assert_same_state(snap.state, model)
    assert isinstance(model.model, _DataDependent)


@pytest.mark.parametrize(
    ("source", "train", "val", "match"),
    [
        ("val", DataLoader(_data(8)), None, r"calibration_data='val'.*has none.*calibration_data='train'"),
        ("train", None, DataLoader(_data(8)), r"calibration_data='train'.*has none"),
        ("train", DataLoader(TensorDataset(torch.zeros(0, 1, 12, 12))), None, r"calibration_data='train'.*empty"),
    ],
)
def test_missing_or_empty_calibration_loader(source, train, val, match):
    trainer = SimpleNamespace(train_dataloader=train, val_dataloaders=val)
    with pytest.raises(ValueError, match=match):
        PTQCallback(calibration_data=source).calibration_loader(trainer)


# ----------------------------------------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_command_prints_the_comparison(tmp_path):
    backends = "x86,arm" if _torchao.executorch_available() else "x86"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_quant.cli",
            "demo",
            "--epochs",
            "1",
            "--train-subset",
            "2000",
            "--test-subset",
            "1000",
            "--backends",
            backends,
            "--calibration-samples",
            "256",
            "--qat-epochs",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fp32 eager" in out.stdout
    assert "test accuracy (1000 images)" in out.stdout or "digits" in out.stdout
    assert "PTQ int8 x86 (.pt2)" in out.stdout
    if "arm" in backends:
        assert "PTQ int8 arm (.pte)" in out.stdout
    assert (tmp_path / "ptq" / "x86" / "model_int8.pt2").is_file()
    assert (tmp_path / "qat" / "x86" / "model_int8.pt2").is_file()
    assert "QAT int8 x86 (.pt2)" in out.stdout


def test_demo_rejects_a_data_folder_without_fashion_mnist(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lightning_quant.cli", "demo", "--data", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "has no Fashion-MNIST" in out.stderr
    assert "Traceback" not in out.stderr
