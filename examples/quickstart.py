"""The shortest complete use: train a small CNN, get an int8 artifact for x86 when fit ends, run it.

python examples/quickstart.py          # 1 epoch on Fashion-MNIST (scikit-learn's digits if absent)
python examples/quickstart.py --quick  # a few batches, for tests
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

from lightning_quant import PTQCallback, load
from lightning_quant.demo import DemoData, LitClassifier


def main(quick: bool = False, out: str = "quickstart_logs", data_dir: str | None = None) -> float:
    pl.seed_everything(0)
    data = DemoData(data_dir, train_subset=2048 if quick else None)  # Fashion-MNIST, else scikit-learn's digits
    model = LitClassifier(image_size=data.image_size)  # any LightningModule with a validation_step

    ptq = PTQCallback(backend="x86", num_calibration_samples=256 if quick else 1024)  # the one added line
    trainer = pl.Trainer(max_epochs=1, callbacks=[ptq], default_root_dir=out, logger=False, enable_progress_bar=False)
    trainer.fit(model, data)  # trains fp32, then calibrates, converts, exports, reloads, evaluates

    int8 = load(ptq.artifacts["model"])  # a .pt2 AOTInductor package: plain torch, no lightning needed to run it
    images, labels = next(iter(data.val_dataloader()))
    with torch.no_grad():
        accuracy = (int8(images).argmax(1) == labels).float().mean().item()
    print(f"artifact {ptq.artifacts['model']}: int8 accuracy on one batch {accuracy:.3f}")
    metrics = trainer.callback_metrics
    print(f"val_acc fp32 {metrics['val_acc']:.4f}, int8 {metrics['val_acc_int8']:.4f}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="train on a subset, for tests")
    parser.add_argument("--out", default="quickstart_logs", help="output folder")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default Debian's; else sklearn digits)")
    args = parser.parse_args()
    main(args.quick, args.out, args.data)
