"""Fine-tune an existing project's float checkpoint to int8 with QAT, without touching its model code.

Part 1 is a project that knows nothing of lightning-quant: a plain LightningModule trained with a ModelCheckpoint.
Part 2 loads its best float checkpoint with ``load_from_checkpoint`` and fits a few more epochs with
``QATCallback(start_epoch=0)``: fake quantization from the first step, an int8 artifact when fit ends.

    python examples/finetune_existing.py                 # Fashion-MNIST (scikit-learn's digits if absent)
    python examples/finetune_existing.py --backend arm   # a .pte for ExecuTorch (needs lightning-quant[arm])
    python examples/finetune_existing.py --quick         # a few batches, for tests
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from lightning_quant import QATCallback
from lightning_quant.demo import DemoData

# ------------------------------------------------------------------ part 1: the existing project, unchanged


class Classifier(pl.LightningModule):
    def __init__(self, image_size: int = 28, num_classes: int = 10, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        side = image_size // 2
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * side * side, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.acc(logits, y)
        self.log("val_acc", self.acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def train_float(data: DemoData, out: Path, epochs: int, limit: int | float) -> str:
    checkpoint = ModelCheckpoint(dirpath=out / "float", monitor="val_acc", mode="max")
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[checkpoint], limit_train_batches=limit, logger=False, default_root_dir=out
    )
    trainer.fit(Classifier(image_size=data.image_size), data)
    return checkpoint.best_model_path


# ------------------------------------------------------------------ part 2: int8 fine-tuning with QAT


def finetune_qat(data: DemoData, ckpt: str, out: Path, epochs: int, limit: int | float, backend: str) -> QATCallback:
    model = Classifier.load_from_checkpoint(ckpt, lr=1e-4)  # the float weights, a 10x lower learning rate
    qat = QATCallback(backend=backend, start_epoch=0, dirpath=str(out / "int8"))
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[qat], limit_train_batches=limit, logger=False, default_root_dir=out
    )
    trainer.validate(model, data, verbose=False)  # the float model's accuracy, for comparison
    float_acc = trainer.callback_metrics["val_acc"].item()
    trainer.fit(model, data)
    int8_acc = trainer.callback_metrics["val_acc_int8"].item()
    print(f"float checkpoint {ckpt}: val_acc {float_acc:.4f}")
    print(f"after {epochs} QAT epoch(s), int8 artifact {qat.report.artifacts['net']}: val_acc {int8_acc:.4f}")
    return qat


def main(argv: list[str] | None = None) -> QATCallback:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="x86", help="x86 (.pt2) or arm (.pte)")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default Debian's; else sklearn digits)")
    parser.add_argument("--out", default="finetune_logs", help="output folder")
    parser.add_argument("--quick", action="store_true", help="a few batches on a subset, for tests")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    data = DemoData(data_dir=args.data, train_subset=1024 if args.quick else None)
    epochs, limit = (1, 8) if args.quick else (3, 1.0)
    ckpt = train_float(data, Path(args.out), epochs, limit)
    return finetune_qat(data, ckpt, Path(args.out), epochs if args.quick else 2, limit, args.backend)


if __name__ == "__main__":
    main()
