"""The examples run as users run them: LightningCLI with YAML overlays, quickstart, fine-tuning a float checkpoint."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lightning_quant import _torchao
from lightning_quant.demo import fashion_mnist_available

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CLI = [sys.executable, str(EXAMPLES / "cli" / "main.py"), "fit", "--config", str(EXAMPLES / "cli" / "config.yaml")]
needs_jsonargparse = pytest.mark.skipif(
    importlib.util.find_spec("jsonargparse") is None, reason="LightningCLI needs lightning-quant[cli] (jsonargparse)"
)
ARM_OR_X86 = "arm" if _torchao.executorch_available() else "x86"
SUFFIX = {"x86": ".pt2", "arm": ".pte"}


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _quick(tmp_path: Path, digits: bool = True) -> list[str]:
    """Overrides for a short run: a few batches; scikit-learn's digits (no Fashion-MNIST files in an empty folder)."""
    args = [
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.train_subset=512",
        "--data.val_subset=512",
    ]
    if digits:
        (tmp_path / "no-data").mkdir(exist_ok=True)
        args.append(f"--data.data_dir={tmp_path / 'no-data'}")
    return args


def _cli_main() -> Callable[[list[str]], None]:
    """``examples/cli/main.py``'s ``main``, imported from its file (the examples are not a package)."""
    spec = importlib.util.spec_from_file_location("lightning_quant_cli_example", EXAMPLES / "cli" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _sidecar(path: Path) -> dict:
    assert path.is_file(), f"missing artifact {path}"
    return json.loads(Path(str(path) + ".json").read_text())


# ---------------------------------------------------------------------------------------------- LightningCLI


@needs_jsonargparse
@pytest.mark.slow
def test_cli_qat_overlay_exports_int8(tmp_path):
    out = _run([*CLI, "--config", str(EXAMPLES / "cli" / "qat.yaml"), *_quick(tmp_path, digits=False)])
    assert out.returncode == 0, out.stderr[-3000:]
    log_dir = tmp_path / "lightning_logs" / "version_0"
    sidecar = _sidecar(log_dir / "quantized" / "model_int8.pt2")
    assert (sidecar["method"], sidecar["backend"]) == ("QAT", "x86")
    side = 28 if fashion_mnist_available() else 8  # Fashion-MNIST when installed, else digits
    assert sidecar["inputs"][0]["shape"] == [None, 1, side, side]  # the model's image size is linked to the data
    assert "val_acc" in sidecar["metrics"]["int8"]
    assert "val_acc_int8" in (log_dir / "metrics.csv").read_text()  # logged next to val_acc by the CSVLogger


@needs_jsonargparse
@pytest.mark.slow
def test_cli_ptq_overlay_takes_every_argument_from_the_command_line(tmp_path):
    overrides = [
        f"--trainer.callbacks.init_args.backend={ARM_OR_X86}",
        "--trainer.callbacks.init_args.num_calibration_samples=128",
        "--trainer.callbacks.init_args.calibration_data=val",
        "--trainer.callbacks.init_args.observer=minmax",
        "--trainer.callbacks.init_args.modules=[model]",
        f"--trainer.callbacks.init_args.dirpath={tmp_path / 'int8'}",
        "--trainer.callbacks.init_args.max_batch_size=300",  # >= the val loader's batch of 256
        "--trainer.callbacks.init_args.metric_suffix=_q",
        "--trainer.callbacks.init_args.bias_correction=false",
    ]
    out = _run([*CLI, "--config", str(EXAMPLES / "cli" / "ptq.yaml"), *_quick(tmp_path), *overrides])
    assert out.returncode == 0, out.stderr[-3000:]
    sidecar = _sidecar(tmp_path / "int8" / f"model_int8{SUFFIX[ARM_OR_X86]}")
    assert sidecar["method"] == "PTQ"
    assert sidecar["backend"] == ARM_OR_X86
    assert sidecar["observer"] == "minmax"
    assert sidecar["bias_corrected_layers"] == 0
    assert sidecar["num_calibration_samples"] == 256  # whole batches: one val batch of 256 covers 128
    assert sidecar["max_batch_size"] == 300
    assert sidecar["inputs"][0]["shape"] == [None, 1, 8, 8]  # digits
    assert "val_acc_q" in (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()


def _bad_yaml(tmp_path: Path, init_args: str) -> str:
    path = tmp_path / "bad.yaml"
    head = "trainer:\n  callbacks:\n    - class_path: lightning_quant.QATCallback\n      init_args:\n"
    path.write_text(f"{head}        {init_args}\n")
    return str(path)


@needs_jsonargparse
@pytest.mark.parametrize(
    ("init_args", "cli", "expected"),
    [
        ("backnd: arm", [], "backnd"),  # unknown key: jsonargparse, while parsing
        ("start_epoch: two", [], 'Parser key "start_epoch"'),  # wrong type: jsonargparse, while parsing
        # bad value: the callback, at instantiation
        ("backend: x87", [], "Expected argument `backend` to be 'x86', 'arm' or an alias"),
        ("backend: x86", ["--trainer.callbacks.init_args.max_batch_size=1"], "`max_batch_size`"),
        ("backend: x86", ["--trainer.callbacks.init_args.freeze_bn_epoh=1"], "freeze_bn_epoh"),
    ],
)
def test_cli_rejects_a_bad_callback_config_before_training(tmp_path, capsys, monkeypatch, init_args, cli, expected):
    monkeypatch.setattr(sys, "argv", ["main.py"])
    with pytest.raises(SystemExit) as exit_info:
        _cli_main()([*CLI[2:], "--config", _bad_yaml(tmp_path, init_args), *_quick(tmp_path), *cli])
    assert exit_info.value.code not in (0, None)
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()  # nothing ran


@needs_jsonargparse
def test_cli_bad_value_is_one_line_without_traceback(tmp_path):
    out = _run([*CLI, "--config", _bad_yaml(tmp_path, "backend: x87"), *_quick(tmp_path)], timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [
        out.stderr.strip().splitlines()[-1]
    ]
    assert "`backend`" in out.stderr and "Did you mean 'x86'?" in out.stderr


@needs_jsonargparse
@pytest.mark.parametrize(("overlay", "name"), [("qat.yaml", "QATCallback"), ("ptq.yaml", "PTQCallback")])
def test_cli_overlays_configure_the_callbacks(capsys, monkeypatch, overlay, name):
    monkeypatch.setattr(sys, "argv", ["main.py"])
    with pytest.raises(SystemExit) as exit_info:
        _cli_main()([*CLI[2:], "--config", str(EXAMPLES / "cli" / overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert f"class_path: lightning_quant.{name}" in capsys.readouterr().out


@pytest.mark.parametrize(("overlay", "name"), [("qat.yaml", "QATCallback"), ("ptq.yaml", "PTQCallback")])
def test_cli_overlays_list_every_argument_at_its_default(overlay, name):
    import inspect

    import yaml

    import lightning_quant

    (entry,) = yaml.safe_load((EXAMPLES / "cli" / overlay).read_text())["trainer"]["callbacks+"]
    params = inspect.signature(getattr(lightning_quant, name)).parameters
    assert entry["init_args"] == {k: p.default for k, p in params.items()}


# ---------------------------------------------------------------------------------------------- scripts


@pytest.mark.slow
def test_quickstart(tmp_path):
    (tmp_path / "no-data").mkdir()
    out = _run(
        [
            sys.executable,
            str(EXAMPLES / "quickstart.py"),
            "--quick",
            "--out",
            str(tmp_path),
            "--data",
            str(tmp_path / "no-data"),
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert _sidecar(tmp_path / "quantized" / "model_int8.pt2")["method"] == "PTQ"
    assert "int8 accuracy on one batch" in out.stdout


def test_quickstart_is_short():
    assert len((EXAMPLES / "quickstart.py").read_text().splitlines()) < 60


@pytest.mark.slow
def test_finetune_existing_project_with_qat(tmp_path):
    (tmp_path / "no-data").mkdir()
    script = str(EXAMPLES / "finetune_existing.py")
    args = ["--quick", "--backend", ARM_OR_X86, "--out", str(tmp_path), "--data", str(tmp_path / "no-data")]
    out = _run([sys.executable, script, *args])
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "float").glob("*.ckpt")), "the plain project wrote no float checkpoint"
    sidecar = _sidecar(tmp_path / "int8" / f"net_int8{SUFFIX[ARM_OR_X86]}")
    assert (sidecar["method"], sidecar["backend"]) == ("QAT", ARM_OR_X86)
    assert "after 1 QAT epoch(s)" in out.stdout
