"""The `lightning-quant` command: ptq, inspect and bench, their help, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch

from lightning_quant.cli import main
from lightning_quant.demo import DemoData, LitClassifier

MODEL = "lightning_quant.demo.LitClassifier"
DATA = "lightning_quant.demo.DemoData"


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    return lines[-1]


def _fake_artifact(tmp_path: Path, backend: str = "x86", **extra) -> Path:
    """A file with a valid-looking sidecar (nothing compiled): enough for `inspect` and for the backend check."""
    path = tmp_path / f"model_int8{'.pt2' if backend == 'x86' else '.pte'}"
    path.write_bytes(b"not really a package")
    sidecar = {
        "format": 1,
        "backend": backend,
        "artifact": "test artifact",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "size_bytes": path.stat().st_size,
        "fp32_size_bytes": 100,
        "method": "PTQ",
        "submodule": "model",
        "inputs": [{"name": "args[0]", "shape": [None, 1, 8, 8], "dtype": "float32"}],
        "max_batch_size": 64,
        "num_calibration_samples": 128,
        "observer": "histogram",
        "versions": {"torch": "2.13.0"},
        "metrics": {"fp32": {"val_acc": 0.9}, "int8": {"val_acc": 0.89}},
        "latency_ms": {"fp32": 2.0, "int8": 0.5},
        **extra,
    }
    Path(str(path) + ".json").write_text(json.dumps(sidecar))
    return path


# ---------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["demo", "ptq", "inspect", "bench"])
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: lightning-quant {command}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def dummy_ckpt(tmp_path: Path) -> str:
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"not a checkpoint")
    return str(path)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", "missing.ckpt"], "--ckpt 'missing.ckpt' does not"),
        (["ptq", "--model", "nopkg.Model", "--datamodule", DATA, "--ckpt", "{ckpt}"], "cannot import 'nopkg'"),
        (
            ["ptq", "--model", "lightning_quant.demo.LitClasifier", "--datamodule", DATA, "--ckpt", "{ckpt}"],
            "Did you mean lightning_quant.demo.LitClassifier?",
        ),
        (["ptq", "--model", "LitClassifier", "--datamodule", DATA, "--ckpt", "{ckpt}"], "not a class path"),
        (["ptq", "--model", DATA, "--datamodule", DATA, "--ckpt", "{ckpt}"], "is not a LightningModule subclass"),
        (["ptq", "--model", MODEL, "--datamodule", MODEL, "--ckpt", "{ckpt}"], "not a LightningDataModule subclass"),
        (
            ["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", "{ckpt}", "--backend", "x87"],
            "Expected argument `backend`",
        ),
        (
            ["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", "{ckpt}", "--observer", "max"],
            "Expected argument `observer`",
        ),
        (
            ["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", "{ckpt}", "--weight-granularity", "per_chanel"],
            "Expected argument `weight_granularity`",
        ),
        (
            ["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", "{ckpt}", "--datamodule-args", "{bad"],
            "--datamodule-args is not valid JSON",
        ),
        (
            ["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", "{ckpt}", "--datamodule-args", '{"nope": 1}'],
            "unexpected keyword argument 'nope'",
        ),
        (["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", "{ckpt}"], "not loadable as LitClassifier"),
        (["inspect", "missing.pt2"], "ARTIFACT 'missing.pt2' does not exist"),
        (["inspect", "{ckpt}"], "has no sidecar"),
        (["bench", "{ckpt}"], "has no sidecar"),
        (["bench", "{artifact}", "--model", MODEL], "--model and --ckpt go together"),
        (["bench", "{artifact}", "--backend", "arm"], "is an 'x86' artifact, but backend='arm' was asked for"),
        (["bench", "{artifact}", "--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, dummy_ckpt, argv, match):
    artifact = str(_fake_artifact(tmp_path))
    argv = [a.replace("{ckpt}", dummy_ckpt).replace("{artifact}", artifact) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert match in _one_error_line(captured.err)


def test_a_qat_checkpoint_for_ckpt_is_named_as_such(tmp_path, capsys):
    from lightning_quant import QATCallback
    from lightning_quant.demo import LitClassifier

    model = LitClassifier(image_size=12, width=8)
    QATCallback().swap(model)
    model.model(torch.randn(4, 1, 12, 12))  # captured: the checkpoint holds a fake-quant graph
    ckpt = tmp_path / "qat.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {"image_size": 12, "width": 8},
            "pytorch-lightning_version": pl.__version__,
        },
        ckpt,
    )
    assert main(["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", str(ckpt), "--out", str(tmp_path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "written during quantization-aware training" in line and "load_qat_checkpoint" in line


def test_first_line_of_a_state_dict_error_says_what_is_missing():
    from lightning_quant.config import first_line

    err = RuntimeError('Error(s) in loading state_dict for Net:\n\tMissing key(s) in state_dict: "fc.weight".')
    assert (
        first_line(err)
        == 'RuntimeError: Error(s) in loading state_dict for Net: Missing key(s) in state_dict: "fc.weight".'
    )


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_quant.cli",
            "bench",
            str(_fake_artifact(tmp_path, "arm")),
            "--backend",
            "x86",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: model_int8.pte is an 'arm' artifact, but backend='x86' was asked for. Export for that backend, or "
        "load it without `backend=`."
    ]


# ---------------------------------------------------------------------------------------------- inspect


def test_inspect_prints_the_sidecar_readably(tmp_path, capsys):
    path = _fake_artifact(
        tmp_path, undelegated_ops=["aten.view_copy.default"], weight_granularity="per_tensor", bias_corrected_layers=3
    )
    assert main(["inspect", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # column widths vary
    for expected in (
        "backend x86: test artifact",
        "method PTQ, submodule 'model'",
        "(matches the file)",
        "args[0]: float32[N, 1, 8, 8] (N <= 64)",
        "128 samples, observer histogram",
        "weights per_tensor, bias corrected in 3 layers",
        "torch 2.13.0",
        "fp32 2.000 ms, int8 0.500 ms (4.00x)",
        "aten.view_copy.default",
    ):
        assert expected in out
    assert "val_acc 0.9000 0.8900 -0.0100" in out


def test_inspect_names_qat_artifacts_and_a_sidecar_written_for_another_file(tmp_path, capsys):
    path = _fake_artifact(tmp_path, observer="qat", num_calibration_samples=None, method="QAT")
    assert main(["inspect", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "calibration none: quantization-aware training (QAT)" in out and "None samples" not in out
    path = _fake_artifact(tmp_path, file="other_int8.pt2", sha256="0" * 64)
    assert main(["inspect", str(path)]) == 1
    assert "its sidecar was written for other_int8.pt2" in capsys.readouterr().err


def test_inspect_prints_a_hand_edited_sidecar_as_written(tmp_path, capsys):
    metrics = {"fp32": {"val_acc": "n/a", "val_loss": 0.5, "note": None}, "int8": {"val_acc": 0.89, "val_loss": True}}
    path = _fake_artifact(
        tmp_path, metrics=metrics, parity_max_abs_diff="unknown", latency_ms={"fp32": "?", "int8": 0.5}, size_bytes="?"
    )
    assert main(["inspect", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "val_acc n/a 0.8900" in out and "val_loss 0.5000 True" in out
    assert "max |diff| unknown" in out
    assert "latency" not in out
    path = _fake_artifact(
        tmp_path, metrics=["not", "a", "dict"], latency_ms="n/a", versions="?", machine=3, inputs=[{"name": "x"}]
    )
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "val_acc" not in out and "[{'name': 'x'}]" in out


def test_inspect_flags_a_changed_file_and_prints_raw_json(tmp_path, capsys):
    path = _fake_artifact(tmp_path)
    path.write_bytes(b"altered")
    assert main(["inspect", str(path)]) == 1  # what `load` refuses: the exit status says so
    out, err = capsys.readouterr()
    assert "DOES NOT match the file" in out and "does not match the sha256" in err
    assert main(["inspect", str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["backend"] == "x86"
    path = _fake_artifact(tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0


# ---------------------------------------------------------------------------------------------- ptq + bench


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory) -> tuple[Path, Path]:
    """A float LitClassifier checkpoint trained a few batches on scikit-learn's digits (an empty data folder)."""
    root = tmp_path_factory.mktemp("float")
    data_dir = root / "no-data"
    data_dir.mkdir()
    pl.seed_everything(0, verbose=False)
    dm = DemoData(data_dir=str(data_dir))
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(LitClassifier(image_size=dm.image_size), dm)
    trainer.save_checkpoint(root / "float.ckpt")
    return root / "float.ckpt", data_dir


@pytest.fixture(scope="module")
def ptq_artifact(float_ckpt, tmp_path_factory) -> Path:
    ckpt, data_dir = float_ckpt
    out = tmp_path_factory.mktemp("int8")
    argv = ["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", str(ckpt), "--out", str(out)]
    argv += ["--datamodule-args", json.dumps({"data_dir": str(data_dir)}), "--calibration-samples", "128"]
    assert main(argv) == 0
    return out / "model_int8.pt2"


@pytest.mark.slow
def test_ptq_command_quantizes_a_checkpoint(ptq_artifact, capsys):
    sidecar = json.loads(Path(str(ptq_artifact) + ".json").read_text())
    assert (sidecar["method"], sidecar["backend"], sidecar["num_calibration_samples"]) == ("PTQ", "x86", 128)
    assert sidecar["bias_corrected_layers"] > 0  # on by default
    assert set(sidecar["metrics"]["int8"]) == {"val_acc", "val_loss"}
    assert abs(sidecar["metrics"]["int8"]["val_acc"] - sidecar["metrics"]["fp32"]["val_acc"]) < 0.1


@pytest.mark.slow
def test_ptq_command_checks_modules_and_data_before_quantizing(float_ckpt, tmp_path, capsys):
    ckpt, data_dir = float_ckpt
    base = ["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", str(ckpt), "--out", str(tmp_path)]
    digits = ["--datamodule-args", json.dumps({"data_dir": str(data_dir)})]
    assert main([*base, *digits, "--modules", "nothere"]) == 2
    assert "'nothere' does not exist" in _one_error_line(capsys.readouterr().err)
    before = ckpt.read_bytes()
    with mock.patch("lightning.pytorch.Trainer.validate", side_effect=AssertionError("validated first")):
        assert main([*base[:-1], str(ckpt), *digits]) == 2  # --out names the checkpoint
    assert f"--out {str(ckpt)!r} is a file" in _one_error_line(capsys.readouterr().err)
    assert ckpt.read_bytes() == before
    assert main([*base, *digits, "--calibration-data", "val", "--calibration-samples", "1"]) == 0  # val works too
    assert (tmp_path / "model_int8.pt2").is_file()


@pytest.mark.slow
def test_bench_against_the_float_model(ptq_artifact, float_ckpt, capsys):
    ckpt, _ = float_ckpt
    argv = ["bench", str(ptq_artifact), "--batch", "16", "--threads", "1", "--repeats", "3"]
    assert main([*argv, "--model", MODEL, "--ckpt", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "batch 16, 1 thread(s), median of 3 runs" in out
    assert "int8 artifact" in out and "fp32 model" in out
    assert "than fp32" in out
    assert main(argv) == 0  # the artifact alone
    out = capsys.readouterr().out
    assert "int8 artifact" in out and "fp32 model" not in out
    assert main([*argv[:2], "--batch", "65536"]) == 2
    assert "exceeds the artifact's max_batch_size 1024" in _one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_a_model_torch_export_cannot_capture_is_one_error_line(float_ckpt, tmp_path, capsys, monkeypatch):
    from lightning_quant.demo import SmallCNN

    def branchy(self, x):  # data-dependent control flow: torch.export refuses it
        y = self.head(self.classifier(self.features(x)))
        return y if x.mean() > 0 else -y

    monkeypatch.setattr(SmallCNN, "forward", branchy)
    ckpt, data_dir = float_ckpt
    argv = ["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", str(ckpt), "--out", str(tmp_path)]
    argv += ["--datamodule-args", json.dumps({"data_dir": str(data_dir)}), "--calibration-samples", "16"]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: torch.export could not capture 'model' (SmallCNN)")
    assert not list(tmp_path.glob("*.pt2"))


def test_ptq_quantization_options_parse():
    from lightning_quant.cli import build_parser

    base = ["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", "x.ckpt"]
    args = build_parser().parse_args(base)
    assert (args.weight_granularity, args.bias_correction) == ("per_channel", True)
    args = build_parser().parse_args([*base, "--weight-granularity", "per_tensor", "--no-bias-correction"])
    assert (args.weight_granularity, args.bias_correction) == ("per_tensor", False)


_PTQ_ARGS = ["ptq", "--model", MODEL, "--datamodule", DATA, "--ckpt", "x.ckpt"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["demo", "--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
        (["demo", "--qat-epochs", "-2"], "argument --qat-epochs: expected an integer >= 0, got -2"),
        (["demo", "--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
        (["demo", "--train-subset", "0"], "argument --train-subset: expected an integer >= 1, got 0"),
        (["demo", "--test-subset", "-4"], "argument --test-subset: expected an integer >= 1, got -4"),
        (["demo", "--lr", "-1"], "argument --lr: expected a number > 0, got -1"),
        (["demo", "--qat-lr-scale", "nan"], "argument --qat-lr-scale: expected a number > 0, got nan"),
        (["demo", "--backends", ""], "argument --backends: expected one or more of x86, arm"),
        (["demo", "--backends", "x86,x87"], "argument --backends: .*Did you mean 'x86'"),
        ([*_PTQ_ARGS, "--calibration-samples", "0"], "argument --calibration-samples: expected an integer >= 1"),
        ([*_PTQ_ARGS, "--max-batch-size", "1"], "argument --max-batch-size: expected an integer >= 2, got 1"),
    ],
)
def test_bad_numbers_are_refused_by_flag_before_any_work(argv, match, capsys):
    # the demo started training on all of Fashion-MNIST with each of these
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err.strip().splitlines()[-1])


def test_demo_backends_take_aliases_once():
    from lightning_quant.cli import build_parser

    assert build_parser().parse_args(["demo"]).backends == ["x86", "arm"]
    assert build_parser().parse_args(["demo", "--backends", "fbgemm, x86,qnnpack"]).backends == ["x86", "arm"]


def test_ptq_dynamic_dims_flag_parses_and_reaches_the_config(capsys, tmp_path):
    from lightning_quant.cli import build_parser

    assert build_parser().parse_args(_PTQ_ARGS).dynamic_dims is None
    assert build_parser().parse_args([*_PTQ_ARGS, "--dynamic-dims", "1=512, 2=64"]).dynamic_dims == {1: 512, 2: 64}
    for bad in ("1:512", "=5", "x=5", ","):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*_PTQ_ARGS, "--dynamic-dims", bad])
        assert "argument --dynamic-dims: expected DIM=LARGEST" in capsys.readouterr().err
    # the callback's own check, before any loading: one error line naming the argument
    (tmp_path / "x.ckpt").write_bytes(b"")  # exists: the arguments are checked before it is read
    argv = [*_PTQ_ARGS[:-1], str(tmp_path / "x.ckpt"), "--dynamic-dims", "0=64"]
    assert main(argv) == 2
    assert "`dynamic_dims` to map dimensions >= 1 (dimension 0 is the batch" in capsys.readouterr().err
