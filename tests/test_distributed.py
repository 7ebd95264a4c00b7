"""DDP with 2 CPU processes (gloo): QAT and PTQ, ddp and ddp_spawn. Each run is a subprocess (tests/ddp_script.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_script.py")
# one after another on one pytest-xdist worker: each run takes 2 processes and a free port
pytestmark = pytest.mark.xdist_group("ddp")


def _artifact_names() -> list[str]:
    from lightning_quant import _torchao

    name = "model_int8.pte" if _torchao.executorch_available() else "model_int8.pt2"  # ddp_script's BACKEND
    return [name, name + ".json"]


def _run(tmp_path: Path, strategy: str, kind: str, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), strategy, kind, str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return out


def _tensor_diffs(tmp_path: Path, epoch: int) -> list[str]:
    a = torch.load(tmp_path / f"state_r0_e{epoch}.pt")
    b = torch.load(tmp_path / f"state_r1_e{epoch}.pt")
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_ddp_qat_keeps_ranks_identical_and_only_rank_zero_exports(tmp_path):
    out = _run(tmp_path, "ddp", "qat")
    assert out.returncode == 0, out.stderr[-3000:]
    for epoch in range(3):
        assert _tensor_diffs(tmp_path, epoch) == [], f"ranks differ after epoch {epoch}"
    state = torch.load(tmp_path / "state_r0_e2.pt")
    assert any("activation_post_process" in k for k in state), "observer buffers are part of the synced state"
    assert sorted(os.listdir(tmp_path / "quantized")) == _artifact_names()
    _assert_every_rank_holds_the_same_int8_model(tmp_path)


def _assert_every_rank_holds_the_same_int8_model(tmp_path: Path) -> None:
    q0, q1 = torch.load(tmp_path / "qparams_r0.pt"), torch.load(tmp_path / "qparams_r1.pt")
    assert q0 and q0.keys() == q1.keys() and all(torch.equal(q0[k], q1[k]) for k in q0)
    a0, a1 = torch.load(tmp_path / "act_qparams_r0.pt"), torch.load(tmp_path / "act_qparams_r1.pt")
    assert a0 and a0 == a1


@pytest.mark.slow
def test_ddp_conversion_failing_on_rank_zero_fails_every_rank(tmp_path):
    """No rank may wait in the broadcast for a rank 0 that raised (it would hang until the process-group timeout)."""
    out = _run(tmp_path, "ddp", "qat_fails", timeout=300)
    assert out.returncode != 0
    assert "never observed any data" in out.stderr  # rank 0's own error
    assert "Quantization failed on global rank 0 (QuantizationError: QAT on 'model'" in out.stderr  # rank 1's
    assert not (tmp_path / "quantized").exists()


@pytest.mark.slow
def test_ddp_ptq_exports_once(tmp_path):
    out = _run(tmp_path, "ddp", "ptq", timeout=300)  # hung before in the datamodule's `prepare_data` barrier
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "quantized")) == _artifact_names()
    assert _tensor_diffs(tmp_path, 2) == []
    _assert_every_rank_holds_the_same_int8_model(tmp_path)


@pytest.mark.slow
def test_ddp_spawn_qat_launching_process_holds_the_trained_model(tmp_path):
    out = _run(tmp_path, "ddp_spawn", "qat")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT rank=0 model=QATGraph" in out.stdout
    # the launching process computes what the workers' final state computes
    worker = torch.load(tmp_path / "state_r0_e2.pt")
    assert any(k.startswith("model.gm.") for k in worker)
    assert sorted(os.listdir(tmp_path / "quantized")) == _artifact_names()


def test_ddp_spawn_without_attach_is_refused_at_setup(tmp_path):
    """In process: `setup` (which a spawned worker runs first, before any training) sees the spawning launcher."""
    import lightning.pytorch as pl
    from test_qat import DropoutNet

    from lightning_quant import QATCallback, QuantizationError

    trainer = pl.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", logger=False, default_root_dir=tmp_path)
    model, qat = DropoutNet(), QATCallback(start_epoch=0, dirpath=str(tmp_path))
    with pytest.raises(QuantizationError, match=r"call `qat_callback.attach\(model\)` before"):
        qat.setup(trainer, model, "fit")
    qat.attach(model)
    qat.setup(trainer, model, "fit")  # attached: accepted
