"""int8 accuracy against fp32 on real data and a real pretrained net, measured on artifacts reloaded from disk.

    python benchmarks/accuracy.py [--quick] [--out benchmarks/results]

Two cases, every int8 figure from ``lightning_quant.load(path)`` of the exported artifact, x86 (``.pt2``) and ARM
(``.pte``), weights ``per_channel`` (the default) and ``per_tensor``:

1. Fashion-MNIST (Debian's ``dataset-fashion-mnist``, the full 10k test set): ``MobileNetV2Small`` and ``ResNetSmall``
   from ``benchmarks/common.py`` trained fp32 through a Lightning ``Trainer``; PTQ at several calibration sizes; QAT as
   a ``QATCallback`` fine-tune from the fp32 weights.
2. EfficientNet-Lite0 with its ImageNet weights (ReLU6): foolbox's 20 labelled ImageNet images and scikit-image's
   bundled photos, plus random crops/flips of them (fixed seed), 224x224 (96x96 in --quick). Top-1 on the labelled
   images, top-1 agreement with fp32 on all evaluation images (label-free). Calibration and QAT use other crops than
   evaluation.
   QAT here is distillation: a small LightningModule matches the fp32 model's logits, with ``QATCallback``.

Writes ``accuracy.json`` (machine, settings, every figure, timings), ``accuracy.md`` (:func:`render_markdown` of the
JSON) and ``accuracy.png`` to ``--out``. ``--quick`` is a smoke test of every code path (under 2.5 minutes on 2 cores).
Nothing is downloaded: images are read as files from the installed packages' folders.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_quant as lq  # noqa: E402
from benchmarks import common  # noqa: E402
from lightning_quant import _torchao  # noqa: E402
from lightning_quant.config import QuantConfig  # noqa: E402
from lightning_quant.demo import DemoData  # noqa: E402
from lightning_quant.quantize import CalibrationGraph  # noqa: E402

BACKENDS = ("x86", "arm")
GRANULARITIES = ("per_channel", "per_tensor")
SUFFIX = {"x86": ".pt2", "arm": ".pte"}

#: The source document's table (top-1, ImageNet) and TensorFlow Lite's published one, for the comparison.
SOURCE_TABLE = [
    {"model": "MobileNet v2 1.4", "source": "source document", "fp32": 0.71, "qat": 0.71, "ptq": 0.66},
    {"model": "Inception v3", "source": "source document", "fp32": 0.78, "qat": 0.78, "ptq": 0.772},
    {"model": "MobileNet-v2", "source": "TensorFlow Lite", "fp32": 0.719, "qat": 0.709, "ptq": 0.637},
]

FULL: dict[str, Any] = {
    "fm_nets": ["mobilenetv2", "resnet"],
    "fm_train_subset": None,  # None = all 60k training images
    # epochs per net: MobileNetV2Small's depthwise convs cost ~3.5 min per 60k epoch on 2 cores, ResNetSmall ~25 s
    "fm_epochs": {"mobilenetv2": 1, "resnet": 2},
    "fm_lr": 0.05,
    "fm_batch_size": 128,
    "fm_test_subset": None,  # None = the full 10k test set
    # calibration sweep: per_channel at every size on both backends for `fm_sweep_nets`; per_tensor at
    # `fm_per_tensor_sizes`; the other nets at `fm_default_size` only (each artifact costs 10-20 s of export)
    "fm_calibration_sizes": [64, 256, 1024],  # the last run's sweep to 3000 changed nothing past 1024
    "fm_sweep_nets": ["mobilenetv2"],
    "fm_default_size": 1024,
    "fm_per_tensor_sizes": [1024],
    "fm_qat_subset": 1024,  # QAT fine-tune: one epoch on this many training images, lr x0.1
    "fm_qat_epochs": 1,
    "fm_qat_lr_scale": 0.1,
    "fm_qat_backends": ["x86", "arm"],
    "fm_qat_granularities": ["per_channel"],
    "fm_max_batch_size": 512,
    "en_extra_eval_views": 3,  # random crops/flips per base image in the evaluation set (plus its centre view)
    "en_calibration_pool": 128,  # crops for calibration and QAT (disjoint from evaluation: another seed)
    "en_calibration_sizes": [32, 128],
    "en_per_tensor_sizes": [128],
    "en_ptq_grid": [["x86", "per_channel"], ["x86", "per_tensor"], ["arm", "per_channel"], ["arm", "per_tensor"]],
    # the same PTQ without bias correction, at the largest calibration size, to show what it contributes
    "en_no_bias_correction_grid": [["x86", "per_channel"], ["arm", "per_channel"]],
    "en_qat_granularities": ["per_tensor"],
    "en_qat_backends": ["x86", "arm"],
    "en_qat_images": 128,  # the whole calibration pool; 16 epochs at batch 16 = 128 steps (~1.1 s each on 2 cores)
    "en_qat_epochs": 16,
    "en_qat_lr": 1e-4,  # 3e-4 diverged for a while in a trial run; 2e-5 moved too little in 128 steps
    "en_qat_val_images": 16,  # QATCallback's own int8 check; the figures come from our evaluation of the artifact
    "en_max_batch_size": 32,
    "en_base_images": None,  # None = all
    "en_image_size": 224,
}

QUICK: dict[str, Any] = {
    **FULL,
    "fm_nets": ["resnet"],
    "fm_train_subset": 1024,
    "fm_epochs": 1,
    "fm_batch_size": 64,
    "fm_test_subset": 1000,
    "fm_calibration_sizes": [64],
    "fm_sweep_nets": ["resnet"],
    "fm_default_size": 64,
    "fm_per_tensor_sizes": [64],
    "fm_ptq_grid": [["x86", "per_channel"], ["arm", "per_tensor"]],
    "fm_qat_subset": 256,
    "fm_qat_backends": ["x86"],
    "en_extra_eval_views": 1,
    "en_calibration_pool": 8,
    "en_calibration_sizes": [8],
    "en_per_tensor_sizes": [8],
    # each EfficientNet export costs 10-25 s: one PTQ and one QAT artifact (the other backend x granularity pairs run
    # on the Fashion-MNIST net); the without-bias-correction rows only in the full run
    "en_ptq_grid": [["x86", "per_channel"]],
    "en_no_bias_correction_grid": [],
    "en_qat_backends": ["arm"],
    "en_qat_images": 8,
    "en_qat_epochs": 1,
    "en_qat_val_images": 4,
    "en_base_images": 4,
    "en_image_size": 96,  # the same code path at a smaller resolution (the net pools adaptively)
}

log = logging.getLogger("accuracy")


# --------------------------------------------------------------------------------------------------------- helpers


class Timer:
    """Accumulates wall time per phase."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def __call__(self, name: str) -> Any:
        timer = self

        class _Ctx:
            def __enter__(self) -> None:
                self.t = time.perf_counter()

            def __exit__(self, *exc: Any) -> None:
                timer.phases[name] = timer.phases.get(name, 0.0) + time.perf_counter() - self.t

        return _Ctx()


def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


class WrongBatchError(RuntimeError):
    """An artifact returned another number of rows than it was given."""


@torch.no_grad()
def predict(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, fixed_batch: bool = False
) -> torch.Tensor:
    """Logits of ``model`` over ``x`` in batches (eval mode for modules).

    ``fixed_batch`` pads the last batch to ``batch_size`` (for an artifact that only works at one batch size).

    Raises:
        WrongBatchError: ``model`` returned a different number of rows than it got.
    """
    if isinstance(model, nn.Module):
        model.eval()
    outs = []
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        n = len(chunk)
        if fixed_batch and n < batch_size:
            chunk = torch.cat([chunk, chunk.new_zeros(batch_size - n, *chunk.shape[1:])])
        out = model(chunk)
        if out.shape[0] != len(chunk):
            raise WrongBatchError(f"given a batch of {len(chunk)}, the artifact returned {out.shape[0]} rows")
        outs.append(out[:n])
    return torch.cat(outs)


def predict_artifact(runner: Any, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, str | None]:
    """Logits of a loaded artifact; if it ignores the batch size, the figure at its exported example batch + a note."""
    try:
        return predict(runner, x, batch_size), None
    except WrongBatchError as err:
        example = runner.sidecar.get("example_batch") or _example_batch(runner)
        note = f"lightning_quant bug: {err}; evaluated at batch {example} (last batch zero-padded)"
        log.warning("  %s", note)
        return predict(runner, x, example, fixed_batch=True), note


def _example_batch(runner: Any) -> int:
    """The batch size an artifact really computes (the rows it returns for one input)."""
    with torch.no_grad():
        shape = [d or 1 for d in runner.sidecar["inputs"][0]["shape"]]
        return int(runner(torch.zeros(shape)).shape[0])


def _batches(x: torch.Tensor, sizes: Iterable[int], batch_size: int) -> Iterable[torch.Tensor]:
    """Consecutive batches of ``x`` whose running total hits each of ``sizes`` exactly."""
    stops = sorted(set(sizes))
    start = 0
    for stop in stops:
        while start < stop:
            end = min(start + batch_size, stop)
            yield x[start:end]
            start = end


def ptq_sweep(
    model: nn.Module,
    x: torch.Tensor,
    sizes: list[int],
    *,
    backend: str,
    weight_granularity: str,
    max_batch_size: int,
    batch_size: int = 128,
    bias_correction: bool = True,
) -> dict[int, torch.fx.GraphModule]:
    """PTQ int8 models at several calibration sizes from one calibration pass over ``x``.

    This is :func:`lightning_quant.quantize_ptq`'s own code (``CalibrationGraph``: capture, prepare, observe, convert),
    converted each time the observed sample count reaches a size: the model at ``n`` is the one ``quantize_ptq`` gives
    on the first ``n`` samples (checked by :func:`check_sweep_matches_quantize_ptq`), without calibrating again.
    """
    config = QuantConfig(
        backend=backend,
        num_calibration_samples=max(sizes),
        weight_granularity=weight_granularity,
        max_batch_size=max_batch_size,
        bias_correction=bias_correction,
    )
    calib = CalibrationGraph(model, type(model).__name__, config)
    out: dict[int, torch.fx.GraphModule] = {}
    with torch.no_grad():
        for batch in _batches(x, sizes, batch_size):
            calib(batch)
            if calib.num_samples in sizes:
                out[calib.num_samples] = calib.convert()
    return out


def check_sweep_matches_quantize_ptq(model: nn.Module, x: torch.Tensor, n: int, backend: str) -> float:
    """Max |difference| between the sweep's int8 model at ``n`` and ``quantize_ptq`` on the first ``n`` samples."""
    swept = ptq_sweep(model, x, [n], backend=backend, weight_granularity="per_channel", max_batch_size=64)[n]
    direct = lq.quantize_ptq(
        model, DataLoader(x[:n], batch_size=128), backend=backend, num_calibration_samples=n, max_batch_size=64
    )
    with torch.no_grad():
        return float((swept(x[:16]) - direct(x[:16])).abs().max())


def export_and_load(q: torch.fx.GraphModule, path: Path, timer: Timer) -> tuple[lq.QuantizedArtifact, dict]:
    """Save ``q`` as its backend's artifact, then load it back from disk (sha256 checked)."""
    backend = q.meta["lightning_quant"]["backend"]
    with timer(f"export_{backend}"):
        t = time.perf_counter()
        lq.save(q, path)
        export_s = time.perf_counter() - t
    runner = lq.load(path, backend=backend)
    info = {"export_s": round(export_s, 2), "size_bytes": path.stat().st_size}
    return runner, {**info, "bias_corrected_layers": runner.sidecar.get("bias_corrected_layers")}


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


class _BasicBlockOwnReLUs(common.BasicBlock):
    """``BasicBlock`` with a second ReLU module for its second call (same maths, same state dict).

    Works around a torchao 0.18 bug: ``X86InductorQuantizer`` groups both calls of the one ``self.relu`` into one
    partition and its conv+add+relu annotation raises "Input partition has more than one output node".
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + self.down(x))


def own_relus(net: nn.Module) -> nn.Module:
    """Give every ``BasicBlock`` of ``net`` its own second ReLU (see :class:`_BasicBlockOwnReLUs`)."""
    for m in net.modules():
        if type(m) is common.BasicBlock:
            m.__class__ = _BasicBlockOwnReLUs
            m.relu_out = nn.ReLU()
    return net


def fm_epochs(s: dict[str, Any], net: str) -> int:
    """fp32 training epochs for ``net`` (``fm_epochs`` is a number or a dict per net)."""
    e = s["fm_epochs"]
    return int(e[net] if isinstance(e, dict) else e)


def fashion_mnist_case(s: dict[str, Any], work: Path, timer: Timer, seed: int = 0) -> dict[str, Any]:
    data = DemoData(batch_size=s["fm_batch_size"], train_subset=s["fm_train_subset"])
    data.setup()
    full_train = data
    if s["fm_train_subset"]:
        full_train = DemoData(batch_size=s["fm_batch_size"])
        full_train.setup()
    x_test, y_test = data.val_set.tensors
    if s["fm_test_subset"]:
        x_test, y_test = x_test[: s["fm_test_subset"]], y_test[: s["fm_test_subset"]]
    # calibration draws from the 60k training images (never the test set), in a fixed random order
    g = torch.Generator().manual_seed(seed + 1)
    x_train_all, y_train_all = full_train.train_set.tensors
    perm = torch.randperm(len(x_train_all), generator=g)
    x_calib = x_train_all[perm[: max(s["fm_calibration_sizes"] + s["fm_per_tensor_sizes"] + [s["fm_default_size"]])]]
    qat_idx = perm[-s["fm_qat_subset"] :]
    qat_set = TensorDataset(x_train_all[qat_idx], y_train_all[qat_idx])
    mbs = s["fm_max_batch_size"]

    notes: list[str] = []

    def accuracy(model: Any) -> float:
        with timer("evaluate"):
            if isinstance(model, lq.QuantizedArtifact):
                logits, note = predict_artifact(model, x_test, mbs)
                if note:
                    notes.append(f"{model.path.name}: {note}")
            else:
                logits = predict(model, x_test, mbs)
            return float((logits.argmax(1) == y_test).float().mean())

    result: dict[str, Any] = {"dataset": data.name, "test_images": len(x_test), "nets": {}}
    for net_name in s["fm_nets"]:
        log.info("Fashion-MNIST %s: training fp32", net_name)
        pl.seed_everything(seed, verbose=False)
        lit = common.LitNet(net=net_name, lr=s["fm_lr"])
        if net_name == "resnet":
            own_relus(lit.model)
        with timer("train_fp32"):
            t = time.perf_counter()
            _trainer(max_epochs=fm_epochs(s, net_name), limit_val_batches=0).fit(
                lit, train_dataloaders=data.train_dataloader()
            )
            train_s = time.perf_counter() - t
        net = lit.model.eval()
        entry: dict[str, Any] = {
            "params": sum(p.numel() for p in net.parameters()),
            "epochs": fm_epochs(s, net_name),
            "train_s": round(train_s, 1),
            "fp32": accuracy(net),
            "ptq": [],
            "qat": [],
        }
        log.info("  fp32 accuracy %.4f", entry["fp32"])
        sweep = net_name in s["fm_sweep_nets"]
        for backend, gran in s.get("fm_ptq_grid") or [[b, g] for b in BACKENDS for g in GRANULARITIES]:
            if gran == "per_channel":
                sizes = s["fm_calibration_sizes"] if sweep else [s["fm_default_size"]]
            else:
                sizes = s["fm_per_tensor_sizes"] if sweep else [s["fm_default_size"]]
            with timer("calibrate"):
                models = ptq_sweep(net, x_calib, sizes, backend=backend, weight_granularity=gran, max_batch_size=mbs)
            for n, q in sorted(models.items()):
                path = work / f"fm_{net_name}_{backend}_{gran}_{n}{SUFFIX[backend]}"
                runner, info = export_and_load(q, path, timer)
                row = {"backend": backend, "granularity": gran, "calibration_samples": n, "accuracy": accuracy(runner)}
                row["delta"] = row["accuracy"] - entry["fp32"]
                entry["ptq"].append({**row, **info})
                log.info("  PTQ %s %s n=%d: %.4f (%+.4f)", backend, gran, n, row["accuracy"], row["delta"])
                path.unlink()
        for backend in s["fm_qat_backends"]:
            for gran in s["fm_qat_granularities"]:
                student = copy.deepcopy(lit).train()  # `lit.model` was left in eval mode; Lightning keeps modes
                student.hparams.lr = s["fm_lr"] * s["fm_qat_lr_scale"]
                qat = lq.QATCallback(
                    backend=backend,
                    start_epoch=0,
                    weight_granularity=gran,
                    dirpath=str(work / f"qat_{net_name}_{backend}_{gran}"),
                    max_batch_size=mbs,
                    evaluate=False,  # evaluated below, on the full test set, from the reloaded artifact
                )
                with timer("train_qat"):
                    t = time.perf_counter()
                    _trainer(max_epochs=s["fm_qat_epochs"], limit_val_batches=0, callbacks=[qat]).fit(
                        student, train_dataloaders=DataLoader(qat_set, batch_size=s["fm_batch_size"], shuffle=True)
                    )
                    qat_s = time.perf_counter() - t  # includes the export
                path = qat.artifacts["model"]
                runner = lq.load(path, backend=backend)
                row = {"backend": backend, "granularity": gran, "accuracy": accuracy(runner)}
                row["delta"] = row["accuracy"] - entry["fp32"]
                entry["qat"].append({**row, "fit_and_export_s": round(qat_s, 1), "size_bytes": path.stat().st_size})
                log.info("  QAT %s %s: %.4f (%+.4f)", backend, gran, row["accuracy"], row["delta"])
                shutil.rmtree(path.parent, ignore_errors=True)
        result["nets"][net_name] = entry
    result["notes"] = notes
    return result


# ------------------------------------------------------------------------------------------- EfficientNet-Lite0

#: scikit-image's bundled photographs (files inside the wheel; nothing goes through its pooch fetcher)
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "clock_motion.png",
    "cell.png",
)


def _package_dir(name: str) -> Path:
    """A package's folder, found without importing it (foolbox needs eagerpy to import; skimage would set up pooch)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The benchmark reads image files shipped in the `{name}` package: `pip install {name}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def base_images(limit: int | None = None) -> list[tuple[str, Any, int | None]]:
    """(name, PIL RGB image, ImageNet label or None): foolbox's labelled ImageNet images, then scikit-image's photos."""
    from PIL import Image

    fb = _package_dir("foolbox") / "data"
    labelled = sorted(fb.glob("imagenet_*_*.*"))
    if len(labelled) != 20:
        raise FileNotFoundError(f"Expected foolbox's 20 imagenet_<i>_<label> images in {fb}, found {len(labelled)}.")
    sk = _package_dir("skimage") / "data"
    images: list[tuple[str, Any, int | None]] = []
    for f in labelled:
        images.append((f.name, Image.open(f).convert("RGB"), int(f.stem.split("_")[2])))
    for name in SKIMAGE_PHOTOS:
        images.append((f"skimage/{name}", Image.open(sk / name).convert("RGB"), None))
    if limit:  # keep labelled and unlabelled ones
        images = images[: limit // 2] + images[20 : 20 + limit - limit // 2]
    return images


def _to_tensor(img: Any) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(common.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def centre_view(img: Any, size: int = 224) -> torch.Tensor:
    """ImageNet evaluation view: shorter side to 256 (for 224), centre crop."""
    from PIL import Image

    short = round(size / 0.875)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return _to_tensor(img.crop((left, top, left + size, top + size)))


def random_view(img: Any, rng: np.random.Generator, size: int = 224) -> torch.Tensor:
    """A random-resized crop (15-100% of the area, aspect 3/4-4/3) with a random horizontal flip."""
    from PIL import Image

    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.15, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if cw <= w and ch <= h:
            break
    else:
        cw = ch = min(w, h)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = img.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_tensor(crop)


def efficientnet_images(s: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Evaluation set (centre views + random views, seed ``seed``) and calibration pool (random views, another seed)."""
    bases = base_images(s["en_base_images"])
    eval_rng, calib_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1000)
    x_eval, labels, names = [], [], []
    size = s.get("en_image_size", 224)
    for name, img, label in bases:
        x_eval.append(centre_view(img, size))
        labels.append(-1 if label is None else label)
        names.append(name)
    for _ in range(s["en_extra_eval_views"]):
        for name, img, _label in bases:
            x_eval.append(random_view(img, eval_rng, size))
            labels.append(-1)  # crops may cut the object out: no label claimed
            names.append(f"{name}#crop")
    calib = [random_view(bases[i % len(bases)][1], calib_rng, size) for i in range(s["en_calibration_pool"])]
    calib_x = torch.stack(calib)
    calib_x = calib_x[torch.randperm(len(calib_x), generator=torch.Generator().manual_seed(seed + 2))]
    return {
        "x_eval": torch.stack(x_eval),
        "labels": torch.tensor(labels),
        "names": names,
        "x_calib": calib_x,
        "n_base": len(bases),
        "n_labelled": sum(1 for b in bases if b[2] is not None),
    }


#: fp32 softmax top-1 probability from which an evaluation image counts as "confident"
CONFIDENT = 0.5


def _en_scores(logits: torch.Tensor, fp32_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    top1, fp32_top1 = logits.argmax(1), fp32_logits.argmax(1)
    lab = labels >= 0
    confident = fp32_logits.softmax(1).amax(1) >= CONFIDENT
    agree = top1 == fp32_top1
    return {
        "top1_labelled": float((top1[lab] == labels[lab]).float().mean()),
        "agreement": float(agree.float().mean()),
        "agreement_confident": float(agree[confident].float().mean()) if confident.any() else float("nan"),
    }


def noise_floor(model: nn.Module, x: torch.Tensor, fp32_logits: torch.Tensor, batch_size: int, seeds: int = 3) -> dict:
    """How often fp32 itself keeps its top-1 when each pixel moves by at most half a level (of 255), i.e. the same
    photo decoded or resized with other rounding: the agreement no int8 model can be expected to beat."""
    std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    runs = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        noise = (torch.rand(x.shape, generator=g) - 0.5) / 255.0 / std
        runs.append(_en_scores(predict(model, x + noise, batch_size), fp32_logits, torch.full((len(x),), -1)))
    return {
        "perturbation": "uniform +-0.5/255 per pixel",
        "seeds": seeds,
        "agreement": [r["agreement"] for r in runs],
        "agreement_confident": [r["agreement_confident"] for r in runs],
    }


def _activation_pairs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The dequantize nodes of ``gm``'s activation quantize -> dequantize pairs (weights are stored int8 already)."""
    _torchao.register_quantized_ops()
    ops = torch.ops.quantized_decomposed
    q = (ops.quantize_per_tensor.default, ops.quantize_per_tensor.tensor)
    dq = (ops.dequantize_per_tensor.default, ops.dequantize_per_tensor.tensor)
    return [n for n in gm.graph.nodes if n.target in dq and getattr(n.args[0], "target", None) in q]


def limits(model: nn.Module, q: torch.fx.GraphModule, x: torch.Tensor, fp32_logits: torch.Tensor, batch: int) -> dict:
    """What limits the int8 model's agreement with fp32, one part at a time, on its reference (Q/DQ) graph ``q``:
    the fp32 model fed only the int8 rounding of its input (the first quantize's scale and zero point), and ``q``
    with only its weights in int8 (every activation quantize -> dequantize pair removed)."""
    pairs = _activation_pairs(q)
    first = next(dq.args[0] for dq in pairs if dq.args[0].args[0].op == "placeholder")  # the input's quantize
    scale, zero_point, qmin, qmax = (float(a) if i < 1 else int(a) for i, a in enumerate(first.args[1:5]))
    x_int8 = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    labels = torch.full((len(x),), -1)
    input_only = _en_scores(predict(model, x_int8, batch), fp32_logits, labels)
    weights = copy.deepcopy(q)
    for dq in _activation_pairs(weights):
        dq.replace_all_uses_with(dq.args[0].args[0])
    weights.graph.eliminate_dead_code()
    weights.recompile()
    _torchao.allow_train_eval(weights)
    weights_only = _en_scores(predict(weights, x, batch), fp32_logits, labels)
    return {
        "input_scale": scale,
        "input_zero_point": zero_point,
        "input_int8_only": input_only["agreement"],
        "weights_int8_only": weights_only["agreement"],
        "activation_pairs": len(pairs),
    }


class Distill(pl.LightningModule):
    """QAT without labels: the student (``self.model``) learns to match the fp32 teacher's logits.

    Batches are (images, teacher logits). ``validation_step`` logs ``agreement`` (top-1 agreement with the teacher), so
    ``QATCallback`` reports it for the fake-quant model and for the reloaded int8 artifact.
    """

    def __init__(self, student: nn.Module, lr: float = 2e-5, temperature: float = 2.0) -> None:
        super().__init__()
        self.model = student
        self.lr = lr
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, teacher = batch
        t = self.temperature
        loss = (
            F.kl_div(
                F.log_softmax(self.model(x) / t, 1),
                F.log_softmax(teacher / t, 1),
                log_target=True,
                reduction="batchmean",
            )
            * t
            * t
        )
        self.log("distill_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, teacher = batch
        agree = (self.model(x).argmax(1) == teacher.argmax(1)).float().mean()
        self.log("agreement", agree, batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)


def efficientnet_case(s: dict[str, Any], work: Path, timer: Timer, seed: int = 0) -> dict[str, Any]:
    with timer("images"):
        data = efficientnet_images(s, seed)
    x_eval, labels, x_calib = data["x_eval"], data["labels"], data["x_calib"]
    mbs = s["en_max_batch_size"]
    model = common.efficientnet_lite0()
    # drop-connect's train/eval switch is Python control flow that torch.export would bake in; off for QAT capture
    model._global_params = model._global_params._replace(drop_connect_rate=0.0)
    log.info(
        "EfficientNet-Lite0: %d evaluation images (%d labelled), %d calibration crops",
        len(x_eval),
        int((labels >= 0).sum()),
        len(x_calib),
    )
    with timer("evaluate_fp32"):
        fp32_logits = predict(model, x_eval, mbs)
    result: dict[str, Any] = {
        "images": {
            "base": data["n_base"],
            "labelled": data["n_labelled"],
            "evaluation": len(x_eval),
            "calibration_pool": len(x_calib),
        },
        "fp32": {
            "top1_labelled": _en_scores(fp32_logits, fp32_logits, labels)["top1_labelled"],
            "agreement": 1.0,
            "confident_images": int((fp32_logits.softmax(1).amax(1) >= CONFIDENT).sum()),
        },
        "ptq": [],
        "qat": [],
    }
    with timer("noise_floor"):
        result["fp32"]["noise_floor"] = noise_floor(model, x_eval, fp32_logits, mbs)
    grid = s.get("en_ptq_grid") or [[b, g] for b in BACKENDS for g in GRANULARITIES]
    grid = [(b, g, True) for b, g in grid] + [(b, g, False) for b, g in s.get("en_no_bias_correction_grid", [])]
    for backend, gran, bc in grid:
        sizes = s["en_calibration_sizes"] if gran == "per_channel" else s["en_per_tensor_sizes"]
        sizes = sizes if bc else sizes[-1:]
        with timer("calibrate"):
            models = ptq_sweep(
                model,
                x_calib,
                sizes,
                backend=backend,
                weight_granularity=gran,
                max_batch_size=mbs,
                batch_size=16,
                bias_correction=bc,
            )
        if (backend, gran, bc) == ("x86", "per_channel", True):  # the default settings, at the largest size
            with timer("limits"):
                result["limits"] = {
                    "calibration_samples": max(models),
                    **limits(model, models[max(models)], x_eval, fp32_logits, mbs),
                }
        for n, q in sorted(models.items()):
            path = work / f"effnet_{backend}_{gran}_{n}{'' if bc else '_nobc'}{SUFFIX[backend]}"
            runner, info = export_and_load(q, path, timer)
            with timer("evaluate"):
                logits, note = predict_artifact(runner, x_eval, mbs)
                scores = _en_scores(logits, fp32_logits, labels)
            row = {
                "backend": backend,
                "granularity": gran,
                "calibration_samples": n,
                "bias_correction": bc,
                **scores,
                **info,
            }
            result["ptq"].append({**row, "note": note} if note else row)
            log.info(
                "  PTQ %s %s n=%d bias correction %s: agreement %.4f (confident %.4f), top-1 %.3f",
                backend,
                gran,
                n,
                bc,
                scores["agreement"],
                scores["agreement_confident"],
                scores["top1_labelled"],
            )
            path.unlink()

    # QAT by distillation on the calibration crops (never the evaluation views)
    x_train = x_calib[: s["en_qat_images"]]
    with timer("evaluate_fp32"):
        teacher = predict(model, x_train, mbs)
    n_val = s["en_qat_val_images"]
    val = DataLoader(TensorDataset(x_eval[:n_val], fp32_logits[:n_val]), batch_size=16)
    for backend in s["en_qat_backends"]:
        for gran in s["en_qat_granularities"]:
            pl.seed_everything(seed, verbose=False)
            student = Distill(copy.deepcopy(model).train(), lr=s["en_qat_lr"])
            qat = lq.QATCallback(
                backend=backend,
                start_epoch=0,
                freeze_bn_epoch=0,  # pretrained BatchNorm statistics, not those of 16-image batches
                weight_granularity=gran,
                dirpath=str(work / f"qat_effnet_{backend}_{gran}"),
                max_batch_size=mbs,
            )
            with timer("train_qat"):
                t = time.perf_counter()
                # validation on: QATCallback evaluates `agreement` on the reloaded int8 artifact at fit end
                _trainer(
                    max_epochs=s["en_qat_epochs"], check_val_every_n_epoch=s["en_qat_epochs"], callbacks=[qat]
                ).fit(
                    student,
                    train_dataloaders=DataLoader(TensorDataset(x_train, teacher), batch_size=16, shuffle=True),
                    val_dataloaders=val,
                )
                qat_s = time.perf_counter() - t
            path = qat.artifacts["model"]
            runner = lq.load(path, backend=backend)
            with timer("evaluate"):
                logits, note = predict_artifact(runner, x_eval, mbs)
                scores = _en_scores(logits, fp32_logits, labels)
            callback_metrics = qat.report.metrics_int8 if qat.report else {}
            result["qat"].append(
                {
                    "backend": backend,
                    "granularity": gran,
                    **scores,
                    "callback_agreement_int8": callback_metrics.get("agreement"),
                    "callback_val_images": n_val,
                    "fit_and_export_s": round(qat_s, 1),
                    "size_bytes": path.stat().st_size,
                    **({"note": note} if note else {}),
                }
            )
            log.info(
                "  QAT %s %s: agreement %.4f, top-1 %.3f", backend, gran, scores["agreement"], scores["top1_labelled"]
            )
            shutil.rmtree(path.parent, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------------ targets


def corrected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PTQ rows with the default bias correction (results from before it existed count as such)."""
    return [r for r in rows if r.get("bias_correction", True)]


def best_ptq_agreement(en: dict[str, Any], backend: str, granularity: str) -> float | None:
    """EfficientNet-Lite0's best PTQ agreement (bias-corrected, any calibration size) for these settings, if run."""
    return max(
        (r["agreement"] for r in corrected(en["ptq"]) if (r["backend"], r["granularity"]) == (backend, granularity)),
        default=None,
    )


def _noise_floor_text(en: dict[str, Any]) -> str:
    nf = en["fp32"].get("noise_floor")
    if not nf:
        return ""

    def span(values: list[float]) -> str:
        lo, hi = min(values) * 100, max(values) * 100
        return f"{lo:.1f}%" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}-{hi:.1f}%"

    return (
        f"fp32 itself under {nf['perturbation']} ({nf['seeds']} draws): {span(nf['agreement'])} "
        f"({span(nf['agreement_confident'])} on confident images)"
    )


def _limits_text(en: dict[str, Any]) -> str:
    lim = en.get("limits")
    if not lim:
        return ""
    return (
        f"one part at a time (x86 reference graph, n={lim['calibration_samples']}): the int8 input alone (fp32 "
        f"model fed its input rounded to the int8 grid, scale {lim['input_scale']:.4f}) "
        f"{lim['input_int8_only'] * 100:.1f}%, "
        f"the int8 weights alone (every activation float) {lim['weights_int8_only'] * 100:.1f}%"
    )


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's accuracy targets, each with the measured figure."""
    rows: list[dict[str, Any]] = []
    for net, e in results.get("fashion_mnist", {}).get("nets", {}).items():
        for kind in ("ptq", "qat"):
            default = [r for r in e[kind] if r["granularity"] == "per_channel"]
            if not default:
                continue
            worst = min(default, key=lambda r: r["delta"])
            rows.append(
                {
                    "target": f"Fashion-MNIST {net} {kind.upper()} int8 (per_channel, every backend"
                    + (" and calibration size" if kind == "ptq" else "")
                    + ") within 0.3 point of fp32",
                    "measured": f"worst {worst['delta'] * 100:+.2f} points ({worst['backend']}"
                    + (f", n={worst['calibration_samples']}" if kind == "ptq" else "")
                    + ")",
                    "met": worst["delta"] >= -0.003,
                }
            )
    en = results.get("efficientnet_lite0")
    if en:
        default = [r for r in corrected(en["ptq"]) if r["granularity"] == "per_channel"]
        if default:
            worst = min(default, key=lambda r: r["agreement"])
            confident = (
                f"; on the {en['fp32']['confident_images']} images fp32 is confident about (top-1 p >= {CONFIDENT}): "
                f"worst {min(r['agreement_confident'] for r in default) * 100:.1f}%"
                if "agreement_confident" in worst
                else ""
            )
            floor, parts = _noise_floor_text(en), _limits_text(en)
            rows.append(
                {
                    "target": "EfficientNet-Lite0 PTQ int8 (default settings) top-1 agreement with fp32 >= 99%",
                    "measured": f"worst {worst['agreement'] * 100:.1f}% ({worst['backend']}, "
                    f"n={worst['calibration_samples']}){confident}"
                    + (f". Noise floor: {floor}" if floor else "")
                    + (f". Limits, {parts}" if parts else ""),
                    "met": worst["agreement"] >= 0.99,
                }
            )
        images = en.get("images", {}).get("evaluation")
        for r in en["qat"]:
            ptq = best_ptq_agreement(en, r["backend"], r["granularity"])
            if ptq is None:
                continue
            best = best_ptq_agreement(en, r["backend"], "per_channel") or 0.0  # what the default PTQ reaches
            gained = r["agreement"] - ptq
            recovered = (
                f"; {gained / (best - ptq) * 100:.0f}% of the {(best - ptq) * 100:.1f} points it loses to the best "
                f"PTQ ({best * 100:.1f}%)"
                if best > ptq and gained > 0
                else ""
            )
            unit = f" = {round(gained * images):+d} of {images} images" if images else ""
            rows.append(
                {
                    "target": f"EfficientNet-Lite0 {r['granularity']} QAT recovers what {r['granularity']} PTQ "
                    f"loses ({r['backend']}): agreement above the best {r['granularity']} PTQ",
                    "measured": f"QAT {r['agreement'] * 100:.1f}% vs PTQ {ptq * 100:.1f}% ({gained * 100:+.1f} points"
                    f"{unit}){recovered}",
                    "met": gained > 0,
                }
            )
    return rows


# ------------------------------------------------------------------------------------------------------ output


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.2f}"


def render_markdown(results: dict[str, Any]) -> str:
    """The results as markdown: comparison with the source's table, every figure, targets, settings, machine."""
    m = results["machine"]
    s = results["settings"]
    out: list[str] = []
    out.append("# int8 accuracy (`benchmarks/accuracy.py`)" + (" — quick smoke run" if results.get("quick") else ""))
    out.append("")
    out.append(
        f"Measured on {m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['versions'].get('torch')}, torchao "
        f"{m['versions'].get('torchao')}, executorch {m['versions'].get('executorch')}; whole run "
        f"{results['wall_time_s'] / 60:.1f} min. Every int8 figure is measured on the exported artifact reloaded from "
        "disk (`lightning_quant.load`): x86 = AOTInductor `.pt2`, arm = ExecuTorch/XNNPACK `.pte` (run here on x86)."
    )
    out.append("")

    fm = results.get("fashion_mnist", {})
    en = results.get("efficientnet_lite0")
    # ---- comparison with the source
    out.append("## Beside the source's table")
    out.append("")
    out.append("| model | data | fp32 | QAT int8 | PTQ int8 | PTQ − fp32 | from |")
    out.append("|---|---|---|---|---|---|---|")
    for r in results.get("source_table", SOURCE_TABLE):
        out.append(
            f"| {r['model']} | ImageNet top-1 | {r['fp32']:.3f} | {r['qat']:.3f} | {r['ptq']:.3f} | "
            f"{(r['ptq'] - r['fp32']) * 100:+.1f} pt | {r['source']} |"
        )
    default_n = s["fm_default_size"]
    for net, e in fm.get("nets", {}).items():
        for gran in GRANULARITIES:
            for backend in BACKENDS:
                ptq = [
                    r
                    for r in e["ptq"]
                    if (r["backend"], r["granularity"], r["calibration_samples"]) == (backend, gran, default_n)
                ]
                qat = [r for r in e["qat"] if (r["backend"], r["granularity"]) == (backend, gran)]
                if not ptq:
                    continue
                q = f"{qat[0]['accuracy']:.4f}" if qat else "—"
                out.append(
                    f"| {net} ({gran}, {backend}) | Fashion-MNIST test, {fm['test_images']} | {e['fp32']:.4f} | {q} | "
                    f"{ptq[0]['accuracy']:.4f} | {ptq[0]['delta'] * 100:+.2f} pt | ours, n={default_n} |"
                )
    if en:
        n_max = max(r["calibration_samples"] for r in en["ptq"])
        for gran in GRANULARITIES:
            for backend in BACKENDS:
                ptq = [
                    r
                    for r in corrected(en["ptq"])
                    if (r["backend"], r["granularity"], r["calibration_samples"]) == (backend, gran, n_max)
                ]
                qat = [r for r in en["qat"] if (r["backend"], r["granularity"]) == (backend, gran)]
                if not ptq:
                    continue
                q = f"{qat[0]['agreement']:.3f}" if qat else "—"
                out.append(
                    f"| EfficientNet-Lite0 ({gran}, {backend}) | agreement with fp32, {en['images']['evaluation']} "
                    f"images | 1.000 | {q} | {ptq[0]['agreement']:.3f} | "
                    f"{(ptq[0]['agreement'] - 1) * 100:+.1f} pt | ours, n={n_max} |"
                )
    out.append("")
    out.append(_verdict(results))
    out.append("")

    # ---- Fashion-MNIST
    if fm.get("nets"):
        out.append(f"## Fashion-MNIST ({fm['dataset']}, {fm['test_images']} test images)")
        out.append("")
        out.append("| net | params | fp32 | method | backend | weights | calibration | int8 accuracy | vs fp32 |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for net, e in fm["nets"].items():
            for r in e["ptq"]:
                out.append(
                    f"| {net} | {e['params'] / 1e3:.0f}k | {e['fp32']:.4f} | PTQ | {r['backend']} | "
                    f"{r['granularity']} | {r['calibration_samples']} | {r['accuracy']:.4f} | "
                    f"{r['delta'] * 100:+.2f} pt |"
                )
            for r in e["qat"]:
                out.append(
                    f"| {net} | {e['params'] / 1e3:.0f}k | {e['fp32']:.4f} | QAT | {r['backend']} | "
                    f"{r['granularity']} | — | {r['accuracy']:.4f} | {r['delta'] * 100:+.2f} pt |"
                )
        out.append("")

    # ---- EfficientNet
    if en:
        im = en["images"]
        out.append("## EfficientNet-Lite0, ImageNet weights (ReLU6)")
        out.append("")
        out.append(
            f"{im['evaluation']} evaluation images at {s.get('en_image_size', 224)}×{s.get('en_image_size', 224)}: "
            f"the centre view of {im['base']} base images "
            f"({im['labelled']} labelled ImageNet images from foolbox, the rest scikit-image's photos) plus "
            f"{s['en_extra_eval_views']} random crop/flip views of each; calibration and QAT use "
            f"{im['calibration_pool']} other random crops of the same images (another seed). Top-1 is on the "
            f"labelled centre views only ({im['labelled']} images: one image is "
            f"{100 / max(1, im['labelled']):.0f} points); agreement is over all "
            "evaluation images."
        )
        out.append("")
        n_conf = en["fp32"].get("confident_images")
        if n_conf is not None:
            out.append(
                f"fp32 is confident (softmax top-1 >= {CONFIDENT}) about {n_conf} of the {im['evaluation']} images; "
                "the rest are photos outside ImageNet's classes or crops that cut the object, where the top two "
                "classes are close and any perturbation flips them. "
                + (f"Noise floor: {_noise_floor_text(en)}." if en["fp32"].get("noise_floor") else "")
                + (
                    f" Agreement with fp32, {_limits_text(en)}"
                    + (
                        ": each alone already stays below 99%."
                        if max(en["limits"]["input_int8_only"], en["limits"]["weights_int8_only"]) < 0.99
                        else "."
                    )
                    if en.get("limits")
                    else ""
                )
            )
            out.append("")

        def conf(r: dict[str, Any]) -> str:
            return f"{r['agreement_confident']:.3f}" if "agreement_confident" in r else "—"

        out.append(
            "| method | backend | weights | bias correction | calibration | top-1 (labelled) | agreement with fp32 "
            "| agreement, confident images |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        out.append(f"| fp32 | | | | | {en['fp32']['top1_labelled']:.3f} | 1.000 | 1.000 |")
        for r in en["ptq"]:
            bc = "yes" if r.get("bias_correction", True) else "no"
            out.append(
                f"| PTQ | {r['backend']} | {r['granularity']} | {bc} | {r['calibration_samples']} | "
                f"{r['top1_labelled']:.3f} | {r['agreement']:.3f} | {conf(r)} |"
            )
        for r in en["qat"]:
            out.append(
                f"| QAT (distillation, {s['en_qat_images']} crops × {_epochs(s['en_qat_epochs'])}) | {r['backend']} | "
                f"{r['granularity']} | — | — | {r['top1_labelled']:.3f} | {r['agreement']:.3f} | {conf(r)} |"
            )
        out.append("")
        for r in en["qat"]:
            cb = r.get("callback_agreement_int8")
            out.append(
                f"- QAT {r['backend']} {r['granularity']}: `QATCallback`'s own int8 evaluation (reloaded artifact, "
                f"{r.get('callback_val_images', '?')} evaluation images): "
                + (f"agreement {cb:.3f}." if cb is not None else "no int8 metric recorded.")
            )
        if en["qat"]:
            out.append("")

    notes = list(fm.get("notes", []))
    if en:
        notes += [
            f"EfficientNet-Lite0 {k} {r['backend']} {r['granularity']}: {r['note']}"
            for k in ("ptq", "qat")
            for r in en[k]
            if r.get("note")
        ]
    if notes:
        out.append("## Problems found")
        out.append("")
        out.extend(f"- {n}" for n in notes)
        out.append("")

    # ---- targets
    out.append("## Targets")
    out.append("")
    out.append("| target | measured | met |")
    out.append("|---|---|---|")
    for t in results.get("targets", []):
        out.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    out.append("")

    # ---- settings
    out.append("## Settings")
    out.append("")
    epochs = ", ".join(f"{net} {e.get('epochs', '?')}" for net, e in fm.get("nets", {}).items())
    train_images = f"{s['fm_train_subset']} of the 60k" if s["fm_train_subset"] else "all 60k"
    out.append(
        f"- Fashion-MNIST: fp32 training through a Lightning `Trainer` (`LitNet`: SGD + OneCycle, lr {s['fm_lr']}, "
        f"batch {s['fm_batch_size']}) on {train_images} training images; epochs: {epochs} (fp32 training is the "
        "costliest step on 2 cores; the int8-vs-fp32 difference is what is measured)."
    )
    out.append(
        f"- PTQ: calibration on training images (never the test set); sizes {s['fm_calibration_sizes']} with "
        f"per-channel weights on both backends for {', '.join(s['fm_sweep_nets'])}; per-tensor at "
        f"{s['fm_per_tensor_sizes']}; other nets at {s['fm_default_size']} only. One calibration pass per "
        "backend × granularity, converted at each size (`quantize_ptq`'s own `CalibrationGraph`, equal to "
        "`quantize_ptq` on the first n samples). Histogram observer and bias correction (the defaults)."
    )
    out.append(
        f"- QAT: `QATCallback(start_epoch=0)` fine-tune of the trained fp32 weights, {s['fm_qat_epochs']} epoch on "
        f"{s['fm_qat_subset']} training images, learning rate ×{s['fm_qat_lr_scale']}; weights "
        f"{', '.join(s['fm_qat_granularities'])}."
    )
    out.append(
        f"- EfficientNet-Lite0: calibration sizes {s['en_calibration_sizes']} (per-tensor {s['en_per_tensor_sizes']}); "
        f"QAT by distillation (KL to the fp32 logits, T=2, Adam lr {s['en_qat_lr']}, batch 16, BatchNorm frozen, "
        f"{s['en_qat_images']} calibration crops × {_epochs(s['en_qat_epochs'])}) for "
        f"{', '.join(s['en_qat_granularities'])} weights on {', '.join(s['en_qat_backends'])}; its "
        "`validation_step` logs `agreement`, which `QATCallback` reports for the reloaded int8 artifact "
        f"(on {s['en_qat_val_images']} images; the table's figure is ours on all evaluation images)."
    )
    out.append(
        "- ResNetSmall's blocks call one `nn.ReLU` twice; torchao 0.18's `X86InductorQuantizer` fails on that "
        '("Input partition has more than one output node"), so the benchmark gives each block a second ReLU module '
        "(same maths, same weights)."
    )
    timings = ", ".join(
        f"{k} {v:.0f} s" for k, v in sorted(results.get("timings_s", {}).items(), key=lambda kv: -kv[1])
    )
    out.append(f"- Wall time {results['wall_time_s']:.0f} s: {timings}.")
    out.append("")
    return "\n".join(out)


def _verdict(results: dict[str, Any]) -> str:
    """Plain words from the measured figures only: where there is a gap vs fp32, where there is none, and where the
    two backends disagree for the same settings."""
    lines = []
    fm = results.get("fashion_mnist", {}).get("nets", {})
    for net, e in fm.items():
        for gran in GRANULARITIES:
            rows = [r for r in e["ptq"] if r["granularity"] == gran]
            if not rows:
                continue
            worst = min(rows, key=lambda r: r["delta"])
            gap = "no gap vs fp32" if worst["delta"] >= -0.003 else "a gap vs fp32"
            lines.append(
                f"Fashion-MNIST {net}, {gran} PTQ: {gap} (fp32 {e['fp32']:.4f}; worst {worst['delta'] * 100:+.2f} "
                f"points, {worst['backend']} n={worst['calibration_samples']}, over {len(rows)} "
                f"artifact{'s' if len(rows) > 1 else ''})."
            )
        for r in e["qat"]:
            gap = "no gap vs fp32" if r["delta"] >= -0.003 else "a gap vs fp32"
            lines.append(
                f"Fashion-MNIST {net}, {r['granularity']} QAT on {r['backend']}: {gap} "
                f"({r['delta'] * 100:+.2f} points)."
            )
    en = results.get("efficientnet_lite0")
    if en:
        for kind in ("ptq", "qat"):
            for gran in GRANULARITIES:
                pool = corrected(en[kind]) if kind == "ptq" else en[kind]
                keys = sorted({r.get("calibration_samples") or 0 for r in pool if r["granularity"] == gran})
                for n in keys:
                    rows = {
                        r["backend"]: r
                        for r in pool
                        if r["granularity"] == gran and (r.get("calibration_samples") or 0) == n
                    }
                    if not rows:
                        continue
                    what = f"EfficientNet-Lite0, {gran} {kind.upper()}" + (f" (n={n})" if n else "")
                    figs = ", ".join(
                        f"{b} {r['agreement'] * 100:.1f}% ("
                        + ("no gap" if r["agreement"] >= 0.99 else f"a gap of {(1 - r['agreement']) * 100:.1f} points")
                        + ")"
                        for b, r in sorted(rows.items(), key=lambda kv: BACKENDS.index(kv[0]))
                    )
                    text = f"{what}: top-1 agreement with fp32 {figs}"
                    if len(rows) == 2 and abs(rows["x86"]["agreement"] - rows["arm"]["agreement"]) >= 0.05:
                        text += (
                            "; the backends differ by 5 points or more for the same settings (their int8 schemes "
                            "differ: x86 uint8 asymmetric activations, XNNPACK int8 symmetric ones and other fusions)"
                        )
                    lines.append(text + ".")
        for r in en["ptq"]:
            if r.get("bias_correction", True):
                continue
            on = [
                p
                for p in corrected(en["ptq"])
                if (p["backend"], p["granularity"], p["calibration_samples"])
                == (r["backend"], r["granularity"], r["calibration_samples"])
            ]
            if on:
                lines.append(
                    f"EfficientNet-Lite0, {r['granularity']} PTQ on {r['backend']} (n={r['calibration_samples']}): "
                    f"bias correction takes agreement from {r['agreement'] * 100:.1f}% (without) to "
                    f"{on[0]['agreement'] * 100:.1f}%."
                )
        for r in en["qat"]:
            ptq = best_ptq_agreement(en, r["backend"], r["granularity"])
            if ptq is not None:
                lines.append(
                    f"EfficientNet-Lite0, {r['granularity']} QAT on {r['backend']}: agreement "
                    f"{r['agreement'] * 100:.1f}% vs {ptq * 100:.1f}% for the best PTQ with the same weights."
                )
    return "\n".join(f"- {x}" for x in lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy (or agreement) vs calibration size, one line per backend × granularity, one panel per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[dict], str, float]] = []
    for net, e in results.get("fashion_mnist", {}).get("nets", {}).items():
        panels.append((f"Fashion-MNIST {net}", e["ptq"], "accuracy", e["fp32"]))
    en = results.get("efficientnet_lite0")
    if en:
        panels.append(("EfficientNet-Lite0 (agreement with fp32)", corrected(en["ptq"]), "agreement", 1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, rows, key, fp32) in zip(axes[0], panels):
        ax.axhline(fp32, color="black", linestyle="--", linewidth=1, label="fp32")
        for backend in BACKENDS:
            for gran in GRANULARITIES:
                pts = sorted(
                    (r["calibration_samples"], r[key])
                    for r in rows
                    if (r["backend"], r["granularity"]) == (backend, gran)
                )
                if pts:
                    ax.plot(
                        *zip(*pts),
                        marker="o" if gran == "per_channel" else "s",
                        linestyle="-" if backend == "x86" else ":",
                        label=f"{backend} {gran}",
                    )
        ax.set_xscale("log")
        ax.set_xlabel("calibration samples")
        ax.set_ylabel(key)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- main


def run(settings: dict[str, Any], out: Path, quick: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    timer = Timer()
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "benchmark": "accuracy",
        "quick": quick,
        "machine": {**common.machine(), "torch_threads": torch.get_num_threads()},
        "settings": settings,
        "source_table": SOURCE_TABLE,
    }
    with tempfile.TemporaryDirectory(prefix="lq-accuracy-") as tmp:
        work = Path(tmp)
        if quick:
            x = torch.randn(64, 1, 28, 28)
            results["sweep_check_max_abs_diff"] = check_sweep_matches_quantize_ptq(
                own_relus(common.ResNetSmall().eval()), x, 48, "x86"
            )
        results["fashion_mnist"] = fashion_mnist_case(settings, work, timer)
        results["efficientnet_lite0"] = efficientnet_case(settings, work, timer)
    results["targets"] = targets(results)
    results["timings_s"] = {k: round(v, 1) for k, v in timer.phases.items()}
    results["wall_time_s"] = round(time.perf_counter() - t0, 1)
    (out / "accuracy.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "accuracy.md").write_text(render_markdown(results))
    plot(results, out / "accuracy.png")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test of every code path (<= 2.5 minutes)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("lightning.pytorch", "lightning.fabric", "torch._inductor", "torch._export", "torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = run(QUICK if args.quick else FULL, Path(args.out), args.quick)
    print(render_markdown(results))


if __name__ == "__main__":
    main()
