"""The `lightning-quant demo`: a small CNN trained on real data, then PTQ for x86 and ARM.

Data never comes from the network: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (gzipped IDX files)
when present or given with ``--data``, else scikit-learn's bundled 8x8 digits.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    root = Path(root) if root else FASHION_MNIST_DIR
    return all((root / f).exists() for pair in _FILES.values() for f in pair)


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> TensorDataset:
    """Fashion-MNIST from gzipped IDX files, as float images in [0, 1] of shape N×1×28×28."""
    root = Path(root) if root else FASHION_MNIST_DIR
    images, labels = (_read_idx(root / f) for f in _FILES[split])
    x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    return TensorDataset((x - 0.2860) / 0.3530, torch.from_numpy(labels.astype(np.int64)))


def load_digits(split: str = "train", seed: int = 0) -> TensorDataset:
    """scikit-learn's bundled 8×8 digits (1,797 images), split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    idx = perm[:cut] if split == "train" else perm[cut:]
    return TensorDataset((x[idx] - 0.3) / 0.4, y[idx])


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x2 with pooling, then a 2-layer classifier: ~110k parameters at 28×28."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, 128 if image_size >= 16 else 64), nn.ReLU()
        )
        self.head = nn.Linear(128 if image_size >= 16 else 64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.features(x)))


class LitClassifier(pl.LightningModule):
    """A plain LightningModule that knows nothing of quantization: ``self.model`` plus torchmetrics accuracy."""

    def __init__(self, image_size: int = 28, num_classes: int = 10, lr: float = 0.05, width: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = SmallCNN(1, num_classes, image_size, width)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):  # noqa: D102
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _subset(data: TensorDataset, n: int) -> TensorDataset:
    """``n`` samples of ``data`` drawn at random (fixed seed)."""
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]
    return TensorDataset(*(t[idx] for t in data.tensors))


class DemoData(pl.LightningDataModule):
    """Fashion-MNIST when its files are there (or at ``data_dir``), else scikit-learn's digits."""

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        train_subset: int | None = None,
        test_subset: int | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.name = "fashion-mnist" if fashion_mnist_available(data_dir) else "digits"
        self.image_size = 28 if self.name == "fashion-mnist" else 8

    def setup(self, stage: str | None = None) -> None:
        if self.name == "fashion-mnist":
            self.train_set, self.val_set = (
                load_fashion_mnist(self.data_dir, "train"),
                load_fashion_mnist(self.data_dir, "test"),
            )
        else:
            self.train_set, self.val_set = load_digits("train"), load_digits("test")
        if self.train_subset:
            self.train_set = _subset(self.train_set, self.train_subset)
        if self.test_subset:
            self.val_set = _subset(self.val_set, self.test_subset)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)
