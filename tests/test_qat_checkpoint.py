"""QAT checkpoints: resume with ``fit(ckpt_path=...)``, ``validate(ckpt_path=...)``, ``load_state_dict`` outside a
Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_ptq import BackboneHead, FlatLayout, _fit, _loaders
from test_qat import DropoutNet
from torch import nn

from lightning_quant import PTQCallback, QATCallback, QATGraph
from lightning_quant.quantize import META_KEY


class _Record(Callback):
    def __init__(self) -> None:
        self.at_fit_start: dict[str, object] = {}
        self.val_acc: dict[int, float] = {}
        self.lrs: dict[int, float] = {}

    def on_fit_start(self, trainer, pl_module):
        graph = pl_module.model if hasattr(pl_module, "model") else None
        self.at_fit_start = {
            "qat": isinstance(graph, QATGraph) and graph.captured,
            "epoch": trainer.current_epoch,
        }

    def on_train_epoch_start(self, trainer, pl_module):
        self.lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.val_acc[trainer.current_epoch] = float(trainer.callback_metrics["val_acc"])


def _eval_trainer(root, callback):
    """A quiet CPU Trainer for validate/test/predict with a QAT callback in it."""
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root, callbacks=[callback]
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", filename="{epoch}", save_top_k=-1)
    record = _Record()
    qat = QATCallback(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=2, dirpath=str(tmp / "q"))
    model = DropoutNet()
    _fit(model, [qat, ckpt, record], tmp, max_epochs=3, enable_checkpointing=True)
    return tmp, record, model


@pytest.mark.slow
def test_resume_mid_qat_restores_phase_optimizer_and_schedule(checkpoints):
    tmp, record, _ = checkpoints
    resumed = _Record()
    qat = QATCallback(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=2, dirpath=str(tmp / "q2"))
    model = DropoutNet()
    _fit(model, [qat, resumed], tmp, max_epochs=3, ckpt_path=str(tmp / "ckpt" / "epoch=1.ckpt"))
    assert resumed.at_fit_start["qat"]  # swapped and captured (from the checkpoint) before any batch
    assert resumed.lrs == {2: pytest.approx(record.lrs[2])}  # StepLR position restored
    assert model.model.bn_frozen and model.model.observers_frozen
    assert qat.state_dict()["phase"] == "qat"
    assert qat.report.artifacts["model"].is_file()
    # exported from a training batch of the resumed run, not from the 2 samples the checkpoint keeps
    assert qat.report.batch_size["model"] == 32
    (x,), _ = qat.quantized_modules["model"].meta[META_KEY]["example_inputs"]
    assert x.shape[0] == 32 and x.device.type == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modules": "model.6"}, r"trained with QAT on \['model'\], but this QATCallback quantizes \['model.6'\]"),
        pytest.param(
            {"backend": "arm"},
            r"trained with QAT for backend 'x86', but `backend` is now 'arm'",
            marks=pytest.mark.arm,
        ),
    ],
    ids=["modules", "backend"],
)
def test_resume_with_other_qat_settings_is_refused_before_loading(checkpoints, kwargs, match):
    tmp, _, _ = checkpoints
    qat = QATCallback(start_epoch=1, dirpath=str(tmp / "q4"), **kwargs)
    with pytest.raises(ValueError, match=match):
        _fit(DropoutNet(), [qat], tmp, max_epochs=3, ckpt_path=str(tmp / "ckpt" / "epoch=1.ckpt"))


@pytest.mark.slow
def test_resume_with_one_qat_callback_per_submodule(tmp_path):
    def callbacks(tag):
        return [QATCallback(modules=m, export=False, dirpath=str(tmp_path / tag / m)) for m in ("backbone", "head")]

    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    _fit(BackboneHead(), [*callbacks("a"), ckpt], tmp_path, max_epochs=1, enable_checkpointing=True)
    model = BackboneHead()
    _fit(model, callbacks("b"), tmp_path, max_epochs=2, ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert isinstance(model.backbone, QATGraph) and isinstance(model.head, QATGraph)


def test_load_qat_checkpoint_with_one_qat_callback_per_submodule(tmp_path):
    from lightning_quant import load_qat_checkpoint

    pl.seed_everything(0)
    callbacks = [QATCallback(modules=m, export=False) for m in ("backbone", "head")]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}")
    trained = BackboneHead()
    _fit(trained, [*callbacks, ckpt], tmp_path, max_epochs=1, enable_checkpointing=True)
    model = load_qat_checkpoint(BackboneHead, str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert isinstance(model.backbone, QATGraph) and isinstance(model.head, QATGraph)
    x = _loaders()[1].dataset.tensors[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(model.eval().net(x), trained.eval().net(x), atol=0, rtol=0)


@pytest.mark.parametrize("weights_only", [False, True], ids=["full", "save_weights_only"])
def test_load_qat_checkpoint_rebuilds_with_the_saved_granularity_and_batch_limit(weights_only, tmp_path):
    from lightning_quant import load_qat_checkpoint

    pl.seed_everything(0)
    qat = QATCallback(weight_granularity="per_tensor", max_batch_size=2048, export=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_weights_only=weights_only)
    trained = DropoutNet()
    _fit(trained, [qat, ckpt], tmp_path, max_epochs=1, enable_checkpointing=True)
    model = load_qat_checkpoint(DropoutNet, str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    config = model.model.config
    assert (config.weight_granularity, config.max_batch_size) == ("per_tensor", 2048)
    x = _loaders()[1].dataset.tensors[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(model.eval().model(x), trained.eval().model(x), atol=0, rtol=0)


class _Branchy(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.aux = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))  # switched off: forward never uses it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _GroupsAndUnusedBranch(DropoutNet):
    """Parameter groups built from the model's structure, and a branch its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Branchy(self.model)

    def configure_optimizers(self):
        groups = [
            {"params": self.model.body[0].parameters(), "lr": 0.05},
            {"params": [*self.model.body[1:].parameters(), *self.model.aux.parameters()], "lr": 0.01},
        ]
        return torch.optim.SGD(groups, momentum=0.9)


def test_resume_with_parameter_groups_by_structure_and_unused_parameters(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    trained = _GroupsAndUnusedBranch()
    _fit(trained, [QATCallback(start_epoch=0, export=False), ckpt], tmp_path, max_epochs=1, enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=False)
    assert {k for k in saved["state_dict"] if ".aux." in k} >= {
        "model.unused.aux.0.weight",
        "model.unused.aux.1.running_var",
    }
    model = _GroupsAndUnusedBranch()
    record = _Record()
    _fit(
        model,
        [QATCallback(start_epoch=0, export=False), record],
        tmp_path,
        max_epochs=2,
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"),
    )
    assert isinstance(model.model, QATGraph) and record.val_acc
    assert torch.equal(
        model.model.float_module.aux[1].running_var, saved["state_dict"]["model.unused.aux.1.running_var"]
    )
    # the restored momentum buffers sit on the Parameters they were saved for
    opt = model.trainer.optimizers[0]
    assert all(
        opt.state[p]["momentum_buffer"].shape == p.shape
        for g in opt.param_groups
        for p in g["params"]
        if p in opt.state
    )


class _FailsOnce(_GroupsAndUnusedBranch):
    fail = True

    def configure_optimizers(self):
        if _FailsOnce.fail:
            _FailsOnce.fail = False
            raise RuntimeError("boom in configure_optimizers")
        return super().configure_optimizers()


def test_resume_failing_before_fit_start_puts_the_loaded_graphs_back(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}")
    _fit(_GroupsAndUnusedBranch(), [QATCallback(export=False), ckpt], tmp_path, max_epochs=1, enable_checkpointing=True)
    path = str(tmp_path / "ckpt" / "epoch=0.ckpt")
    model, qat = _FailsOnce(), QATCallback(export=False)
    with pytest.raises(RuntimeError, match="boom in configure_optimizers"):
        _fit(model, [qat], tmp_path, max_epochs=2, ckpt_path=path)
    assert isinstance(model.model, QATGraph) and model.model.captured and not qat._defer
    _fit(model, [QATCallback(export=False)], tmp_path, max_epochs=2, ckpt_path=path)  # the retry resumes
    assert isinstance(model.model, QATGraph) and model.model.captured


def test_qat_checkpoint_without_the_unused_tensors_still_loads(tmp_path):
    from lightning_quant import load_qat_checkpoint

    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}")
    trained = _GroupsAndUnusedBranch()
    _fit(trained, [QATCallback(export=False), ckpt], tmp_path, max_epochs=1, enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=False)
    saved["state_dict"] = {k: v for k, v in saved["state_dict"].items() if ".unused." not in k}  # as written before
    torch.save(saved, path)
    model = load_qat_checkpoint(_GroupsAndUnusedBranch, str(path))
    x = _loaders()[1].dataset.tensors[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(model.eval().model(x), trained.eval().model(x), atol=0, rtol=0)


class _AuxNeverCalled(BackboneHead):
    """``self.aux`` is a QAT target that ``training_step`` never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["current", "earlier"])
def test_checkpoint_with_a_target_never_called_resumes(layout, tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}")
    trained = _AuxNeverCalled()
    with pytest.warns(UserWarning, match="'aux' was not called"):
        _fit(
            trained,
            [QATCallback(modules=["backbone", "aux"], export=False), ckpt],
            tmp_path,
            max_epochs=1,
            enable_checkpointing=True,
        )
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=False)
    aux = {k for k in saved["state_dict"] if k.startswith("aux.")}
    assert aux == {"aux.weight", "aux.bias"}  # the float module's own names: it loads into the float model
    torch.testing.assert_close(saved["state_dict"]["aux.weight"], trained.aux.float_module.weight)
    if layout == "earlier":  # as written before: under the graph's `source`, with the graph's state
        sd = saved["state_dict"]
        sd["aux.source.weight"], sd["aux.source.bias"] = sd.pop("aux.weight"), sd.pop("aux.bias")
        sd["aux._extra_state"] = {**sd["backbone._extra_state"], "example_spec": None, "example_constants": {}}
        torch.save(saved, path)
    model, qat = _AuxNeverCalled(), QATCallback(modules=["backbone", "aux"], export=False)
    with pytest.warns(UserWarning, match="'aux' was not called"):
        _fit(model, [qat], tmp_path, max_epochs=2, ckpt_path=str(path))
    assert isinstance(model.backbone, QATGraph) and model.backbone.captured
    torch.testing.assert_close(model.aux.float_module.weight, trained.aux.float_module.weight, atol=0, rtol=0)


def test_state_of_a_graph_not_captured_round_trips_under_the_float_names():
    from lightning_quant.config import QuantConfig

    float_module = nn.Linear(3, 2)
    graph = QATGraph(float_module, "head", QuantConfig())
    state = graph.state_dict()
    assert set(state) == {"weight", "bias"}
    other = QATGraph(nn.Linear(3, 2), "head", QuantConfig())
    assert not other.load_state_dict(state).missing_keys
    torch.testing.assert_close(other.float_module.weight, float_module.weight, atol=0, rtol=0)


@pytest.mark.slow
def test_resume_with_another_weight_granularity_is_refused(checkpoints):
    tmp, _, _ = checkpoints
    qat = QATCallback(start_epoch=1, weight_granularity="per_tensor", dirpath=str(tmp / "q3"))
    with pytest.raises(ValueError, match=r"weight_granularity='per_channel'.*Resume with the same value"):
        _fit(DropoutNet(), [qat], tmp, max_epochs=3, ckpt_path=str(tmp / "ckpt" / "epoch=1.ckpt"))


@pytest.mark.slow
def test_validate_with_ckpt_path_reproduces_the_qat_metrics(checkpoints):
    tmp, record, _ = checkpoints
    model = DropoutNet()
    trainer = _eval_trainer(tmp, QATCallback(start_epoch=1))
    out = trainer.validate(model, _loaders()[1], ckpt_path=str(tmp / "ckpt" / "epoch=1.ckpt"), verbose=False)
    assert isinstance(model.model, QATGraph)
    assert out[0]["val_acc"] == pytest.approx(record.val_acc[1], abs=1e-6)


@pytest.mark.slow
def test_load_state_dict_outside_a_trainer_with_attach(checkpoints):
    tmp, record, trained = checkpoints
    ckpt = torch.load(tmp / "ckpt" / "epoch=2.ckpt", weights_only=True)
    model = DropoutNet()
    QATCallback(start_epoch=1).attach(model)
    model.load_state_dict(ckpt["state_dict"])  # strict: every key matched
    x = _loaders()[1].dataset.tensors[0][:16]
    model.eval()
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.model(x), trained.model(x), atol=0, rtol=0)


@pytest.mark.slow
def test_float_checkpoint_loads_into_a_model_with_the_hook(tmp_path):
    model = DropoutNet()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    other = DropoutNet()
    QATCallback().attach(other)
    other.load_state_dict(float_state)  # no QAT keys: the hook leaves the float model alone
    assert not isinstance(other.model, QATGraph)


@pytest.mark.slow
def test_resume_of_a_self_routed_model(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", filename="{epoch}", save_top_k=-1)
    _fit(
        FlatLayout(),
        [QATCallback(start_epoch=0, export=False), ckpt],
        tmp_path,
        max_epochs=1,
        enable_checkpointing=True,
    )
    model = FlatLayout()
    trainer = _eval_trainer(tmp_path, QATCallback(start_epoch=0))
    trainer.validate(model, _loaders()[1], ckpt_path=str(tmp_path / "c" / "epoch=0.ckpt"), verbose=False)
    assert isinstance(model._lightning_quant_forward, QATGraph) and model._lightning_quant_forward.captured

    from torch.utils.data import DataLoader

    fresh = FlatLayout()
    images = _loaders()[1].dataset.tensors[0][:10]
    preds = trainer.predict(fresh, DataLoader(images, batch_size=5), ckpt_path=str(tmp_path / "c" / "epoch=0.ckpt"))
    assert isinstance(fresh._lightning_quant_forward, QATGraph)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(preds), model(images), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (lambda d: [QATCallback(dirpath=d), QATCallback(backend="arm", dirpath=d)], r"QATCallback and QATCallback"),
        (lambda d: [QATCallback(dirpath=d), PTQCallback(dirpath=d)], r"QATCallback and PTQCallback.*\['model'\]"),
        (
            lambda d: [PTQCallback(dirpath=d, metric_suffix="_a"), PTQCallback(backend="fbgemm", dirpath=d)],
            r"same `dirpath`",
        ),
        (
            lambda d: [PTQCallback(dirpath=d), PTQCallback(backend="arm", dirpath=d)],
            r"PTQCallback for 'x86' and PTQCallback for 'arm'\) log their int8 metrics with the same `metric_suffix` "
            r"\('_int8'\).*`metric_suffix='_int8_arm'`",
        ),
        (
            lambda d: [QATCallback(dirpath=d, modules=["model.0"]), PTQCallback(dirpath=d, modules=["model.6"])],
            r"same `metric_suffix`",
        ),
    ],
)
def test_two_callbacks_on_the_same_submodule_are_refused(callbacks, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        _fit(DropoutNet(), callbacks(str(tmp_path)), tmp_path, max_epochs=1)


def test_ptq_for_two_backends_on_one_model_is_allowed(tmp_path):
    from lightning_quant._guards import check_siblings

    model, trainer = DropoutNet(), pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    x86 = PTQCallback(dirpath=str(tmp_path), metric_suffix="_int8_x86")
    arm = PTQCallback(backend="arm", dirpath=str(tmp_path), metric_suffix="_int8_arm")
    silent = PTQCallback(backend="arm", dirpath=str(tmp_path / "b"), evaluate=False)  # logs nothing: any suffix
    trainer.callbacks.extend([x86, arm, silent])
    check_siblings(x86, trainer, model)  # no error
    check_siblings(silent, trainer, model)


@pytest.mark.parametrize("cls", [QATCallback, PTQCallback])
def test_unsupported_strategy_is_refused_at_setup(cls, tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), callbacks=[], max_epochs=1)
    with pytest.raises(ValueError, match=r"does not support the FSDPStrategy strategy"):
        cls(dirpath=str(tmp_path)).setup(trainer, DropoutNet(), "fit")


@pytest.mark.parametrize("cls", [QATCallback, PTQCallback])
@pytest.mark.parametrize(("precision", "dtype"), [("64-true", "float64"), ("bf16-true", "bfloat16")])
def test_a_precision_that_converts_the_weights_is_refused_before_training(cls, precision, dtype, tmp_path):
    model = DropoutNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"precision='{precision}'.* to {dtype}.*'32-true' or 'bf16-mixed'"):
        _fit(model, [cls(dirpath=str(tmp_path))], tmp_path, max_epochs=1, precision=precision)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # not trained, not swapped


@pytest.mark.slow
def test_load_qat_checkpoint_one_liner(checkpoints):
    from lightning_quant import load_qat_checkpoint

    tmp, _, trained = checkpoints
    model = load_qat_checkpoint(DropoutNet, str(tmp / "ckpt" / "epoch=2.ckpt"))
    assert isinstance(model.model, QATGraph) and model.model.bn_frozen
    x = _loaders()[1].dataset.tensors[0][:8]
    model.eval()
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.model(x), trained.model(x), atol=0, rtol=0)


def test_load_qat_checkpoint_refuses_a_float_checkpoint(tmp_path):
    from lightning_quant import load_qat_checkpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="f")
    _fit(DropoutNet(), [ckpt], tmp_path, max_epochs=1, enable_checkpointing=True, limit_train_batches=1)
    with pytest.raises(ValueError, match=r"holds no QATCallback state.*DropoutNet.load_from_checkpoint"):
        load_qat_checkpoint(DropoutNet, str(tmp_path / "f.ckpt"))


def test_load_qat_checkpoint_bad_arguments(tmp_path):
    from lightning_quant import load_qat_checkpoint

    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"`checkpoint_path` to be a Lightning checkpoint, but .*notes.txt. could not"):
        load_qat_checkpoint(DropoutNet, tmp_path / "notes.txt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match=r"`checkpoint_path` to be a Lightning checkpoint, but .*list.ckpt.* is not"):
        load_qat_checkpoint(DropoutNet, tmp_path / "list.ckpt")
    with pytest.raises(FileNotFoundError, match=r"`checkpoint_path` to be a checkpoint file, but got .*missing.ckpt"):
        load_qat_checkpoint(DropoutNet, tmp_path / "missing.ckpt")
    with pytest.raises(TypeError, match=r"`cls` to be a LightningModule class, but got 'DropoutNet'"):
        load_qat_checkpoint("DropoutNet", tmp_path / "list.ckpt")


def test_load_qat_checkpoint_reads_remote_paths_through_fsspec():
    import fsspec

    from lightning_quant import load_qat_checkpoint

    with fsspec.open("memory://lq/float.ckpt", "wb") as f:
        torch.save({"state_dict": {}, "callbacks": {}}, f)
    with pytest.raises(ValueError, match=r"holds no QATCallback state"):  # loaded: not refused as a missing file
        load_qat_checkpoint(DropoutNet, "memory://lq/float.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("model_cls", [DropoutNet, FlatLayout])
def test_a_float_checkpoint_loads_into_the_trainer_after_qat(model_cls, tmp_path):
    """`trainer.test(ckpt_path="best")` after fit, where the best epoch came before QAT started."""
    pl.seed_everything(0)
    model = model_cls()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", filename="{epoch}", save_top_k=-1)
    trainer = _fit(
        model, [QATCallback(start_epoch=1, export=False), ckpt], tmp_path, max_epochs=2, enable_checkpointing=True
    )
    float_ckpt = str(tmp_path / "c" / "epoch=0.ckpt")
    with pytest.warns(UserWarning, match=r"float weights were loaded into '(model|self)', which held a fake-quant"):
        trainer.validate(model, _loaders()[1], ckpt_path=float_ckpt, verbose=False)  # raised missing/unexpected keys

    reference = model_cls.load_from_checkpoint(float_ckpt)  # the float model as saved
    assert not any(isinstance(m, QATGraph) for m in model.modules())  # the float module is back
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = _loaders()[1].dataset.tensors[0][:8]
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.net(x), reference.net(x), atol=0, rtol=0)


class _CrashAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


class _NoDropout(DropoutNet):
    """Dropout kept in the graph with p=0, so RNG draws (which Lightning's resume does not replay) change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.model[5].p = 0.0


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_crash_and_resume_matches_an_uninterrupted_run(tmp_path):
    def qat():
        return QATCallback(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3, export=False)

    pl.seed_everything(0)
    straight = _NoDropout()
    _fit(straight, [qat()], tmp_path / "a", max_epochs=4, shuffle=False)

    pl.seed_everything(0)
    crashed = _NoDropout()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", filename="{epoch}", save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(
            crashed, [qat(), ckpt, _CrashAt(2)], tmp_path / "b", max_epochs=4, enable_checkpointing=True, shuffle=False
        )
    resumed = _NoDropout()  # with Lightning's sanity check on resume, which runs the graph in eval mode
    _fit(resumed, [qat()], tmp_path / "b", max_epochs=4, ckpt_path=str(tmp_path / "c" / "epoch=1.ckpt"), shuffle=False)

    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and any("activation_post_process" in k for k in a)
    for k in a:  # tolerance 0: weights, BN statistics, observers and fake-quant scales are bit-identical
        assert torch.equal(a[k], b[k]), k


# -------------------------------------------------------------------------------- the callbacks' argument space

_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["x86", "arm", "fbgemm", "qnnpack", "val", "train", "minmax", "model", "self", "_q"]),
    st.lists(st.sampled_from(["model", "model.0", "self", ""]), max_size=3),
)
_PTQ_ARGS = [
    "backend",
    "num_calibration_samples",
    "calibration_data",
    "observer",
    "modules",
    "dirpath",
    "max_batch_size",
    "evaluate",
    "metric_suffix",
]
_QAT_ARGS = [
    "backend",
    "start_epoch",
    "freeze_bn_epoch",
    "freeze_observer_epoch",
    "modules",
    "dirpath",
    "max_batch_size",
    "export",
    "evaluate",
    "metric_suffix",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cls=st.sampled_from(["ptq", "qat"]), data=st.data())
def test_any_callback_arguments_build_or_raise_naming_the_argument(cls, data):
    names = _PTQ_ARGS if cls == "ptq" else _QAT_ARGS
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    kwargs = {name: data.draw(_ANY) for name in chosen}
    factory = PTQCallback if cls == "ptq" else QATCallback
    try:
        factory(**kwargs)
    except (ValueError, TypeError) as err:
        assert any(f"`{n}`" in str(err) for n in chosen), str(err)


class _CheckpointBytes(Callback):
    def __init__(self, folder):
        self.folder, self.before = folder, {}

    def on_fit_end(self, trainer, pl_module):  # runs before PTQCallback's on_fit_end (placed after it)
        self.before = {p.name: p.read_bytes() for p in self.folder.glob("*.ckpt")}


@pytest.mark.slow
def test_artifacts_written_beside_checkpoints_never_touch_them(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="float", save_last=True)
    probe = _CheckpointBytes(tmp_path)
    ptq = PTQCallback(dirpath=str(tmp_path), num_calibration_samples=32)
    _fit(DropoutNet(), [ckpt, probe, ptq], tmp_path, max_epochs=1, enable_checkpointing=True)
    assert set(probe.before) == {"float.ckpt", "last.ckpt"}
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.ckpt")} == probe.before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".ckpt")) == [
        "model_int8.pt2",
        "model_int8.pt2.json",
    ]


class _WithTestStep(DropoutNet):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self.model(x).argmax(1) == y).float().mean())


@pytest.mark.slow
def test_test_with_ckpt_path_on_a_qat_checkpoint(checkpoints):
    tmp, record, _ = checkpoints
    model = _WithTestStep()
    trainer = _eval_trainer(tmp, QATCallback(start_epoch=1))
    out = trainer.test(model, _loaders()[1], ckpt_path=str(tmp / "ckpt" / "epoch=1.ckpt"), verbose=False)
    assert isinstance(model.model, QATGraph)
    assert out[0]["test_acc"] == pytest.approx(record.val_acc[1], abs=1e-6)  # same data as validation


@pytest.mark.parametrize("cls", [PTQCallback, QATCallback])
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_unwritable_dirpath_fails_before_training(cls, tmp_path):
    # /proc takes no new folders, for root too (whom `os.access` tells it is writable: the check is a real write)
    model = DropoutNet()
    with pytest.raises(PermissionError, match=r"`dirpath` to be writable, but '/proc' is not"):
        _fit(model, [cls(dirpath="/proc/lightning_quant/out")], tmp_path, max_epochs=1)
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pt2", ".pte", ".ckpt")]


class _Batches(Callback):
    def __init__(self) -> None:
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += 1


@pytest.mark.slow
def test_fine_tune_from_a_float_checkpoint_past_the_observer_freeze_is_refused_before_training(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "float", filename="{epoch}", save_top_k=-1)
    _fit(DropoutNet(), [ckpt], tmp_path, max_epochs=2, enable_checkpointing=True)
    float_ckpt = str(tmp_path / "float" / "epoch=1.ckpt")  # resumes at epoch 2
    model, batches = DropoutNet(), _Batches()
    qat = QATCallback(start_epoch=0, freeze_observer_epoch=2, dirpath=str(tmp_path / "q"))
    with pytest.raises(ValueError, match=r"`freeze_observer_epoch` \(2\).*resumes at epoch 2.*freeze_observer_epoch=3"):
        _fit(model, [qat, batches], tmp_path, max_epochs=4, ckpt_path=float_ckpt)
    assert batches.seen == 0  # before any training (it trained two epochs on broken fake quantization)
    assert not isinstance(model.model, QATGraph)  # the float model is given back
    # one epoch of observation first: QAT runs and exports
    qat = QATCallback(start_epoch=0, freeze_observer_epoch=3, dirpath=str(tmp_path / "q"))
    _fit(DropoutNet(), [qat], tmp_path, max_epochs=4, ckpt_path=float_ckpt)
    assert qat.report.artifacts["model"].is_file()


@pytest.mark.parametrize("weights_only", [False, True])
def test_load_qat_checkpoint_refuses_a_checkpoint_saved_before_qat_started(weights_only, tmp_path):
    from lightning_quant import load_qat_checkpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, save_weights_only=weights_only)
    qat = QATCallback(start_epoch=1, export=False)
    _fit(DropoutNet(), [qat, ckpt], tmp_path, max_epochs=2, enable_checkpointing=True, limit_train_batches=1)
    # a full checkpoint holds the callback's state but no fake-quant graph: refused as the weights-only one is (it
    # returned a model whose QAT graphs would capture afresh, with new observers, at its first call)
    holds = "no QATCallback state and no fake-quant graphs" if weights_only else "QATCallback state but no fake-quant"
    with pytest.raises(ValueError, match=rf"holds {holds}.*saved before QAT started.*DropoutNet.load_from_checkpoint"):
        load_qat_checkpoint(DropoutNet, str(tmp_path / "epoch=0.ckpt"))
