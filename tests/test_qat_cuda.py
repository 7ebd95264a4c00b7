"""QATCallback on a CUDA device: the swap, freezes and optimizer carry-over on the GPU, export on CPU.

Skipped without a CUDA device (CI has none); run it where one is available: ``pytest tests/test_qat_cuda.py``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from test_ptq import _data, _fit
from test_qat import DropoutNet, Probe, _fake_quants, _fresh_process_parity

from lightning_quant import QATCallback, QATGraph

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qat_cuda")
    pl.seed_everything(0)
    model = DropoutNet()
    qat = QATCallback(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3, dirpath=str(tmp / "q"))
    probe = Probe()
    trainer = _fit(model, [qat, probe], tmp, max_epochs=4, accelerator="gpu", devices=1)
    return model, qat, probe, trainer, tmp


def test_fake_quant_training_runs_on_the_gpu(cuda_run):
    model, _, probe, trainer, _ = cuda_run
    assert probe.swapped_at_train_start == {0: False, 1: True, 2: True, 3: True}
    assert isinstance(model.model, QATGraph)
    assert model.device.type == "cuda"
    fake_quants = _fake_quants(model.model)
    assert len(fake_quants) >= 4
    assert all(b.device.type == "cuda" for fq in fake_quants for b in fq.buffers())
    assert all(p.device.type == "cuda" for p in model.model.parameters())
    assert probe.identity_after_swap[1] == (True, True)  # same Parameters and momentum buffers after the swap
    assert probe.lrs == pytest.approx({0: 0.05, 1: 0.025, 2: 0.0125, 3: 0.00625})


def test_freezes_and_validation_on_the_gpu(cuda_run):
    _, _, probe, _, _ = cuda_run
    obs_changed = {e: c[0] for e, c in probe.epoch_changes.items()}
    bn_changed = {e: c[1] for e, c in probe.epoch_changes.items()}
    assert len(obs_changed[2]) >= 4 and obs_changed[3] == []
    assert bn_changed[1] and bn_changed[2] == [] and bn_changed[3] == []
    assert probe.val_changes and all(c == [] for c in probe.val_changes)


def test_export_on_cpu_matches_the_gpu_fake_quant_model(cuda_run):
    model, qat, _, trainer, tmp = cuda_run
    assert "val_acc_int8" in trainer.callback_metrics
    assert model.device.type == "cuda"  # the export left the training model where it was
    x = _data(16, seed=5).tensors[0]
    model.eval()
    with torch.no_grad():
        fake_quant = model.model(x.cuda()).cpu()
    diff = _fresh_process_parity(qat.report.artifacts["model"], x, fake_quant, tmp)
    step = float(fake_quant.max() - fake_quant.min()) / 255
    assert diff <= 2 * step + 1e-4, (diff, step)
    # training can continue on the GPU after the export
    _fit(model, [], tmp, max_epochs=1, accelerator="gpu", devices=1)
