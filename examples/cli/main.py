"""LightningCLI with lightning-quant: switch PTQ or QAT on from a YAML overlay, no code change.

    python examples/cli/main.py fit --config examples/cli/config.yaml                                 # float
    python examples/cli/main.py fit --config examples/cli/config.yaml --config examples/cli/qat.yaml  # + QAT
    python examples/cli/main.py fit --config examples/cli/config.yaml --config examples/cli/ptq.yaml  # + PTQ

Every callback argument is a YAML key under ``init_args`` and a command-line flag; a flag edits the last callback
in ``trainer.callbacks``:

    ... --config examples/cli/qat.yaml --trainer.callbacks.init_args.backend=arm \\
        --trainer.callbacks.init_args.modules=[model]

or, with no overlay, add the callback from the command line:

    ... --trainer.callbacks+=lightning_quant.QATCallback --trainer.callbacks.start_epoch=1

Needs ``pip install "lightning-quant[cli]"`` (jsonargparse).
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant.demo import DemoData, LitClassifier


class Data(DemoData):
    """The demo's Fashion-MNIST (digits fallback), with an optional smaller validation set for quick runs.

    Args:
        data_dir: folder with the Fashion-MNIST ``*-ubyte.gz`` files (default: Debian's dataset-fashion-mnist).
        batch_size: training batch size.
        train_subset: train on the first N shuffled images only.
        val_subset: validate on the first N images only.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        train_subset: int | None = None,
        val_subset: int | None = None,
    ) -> None:
        super().__init__(data_dir=data_dir, batch_size=batch_size, train_subset=train_subset)
        self.val_subset = val_subset

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.val_subset:
            self.val_set = TensorDataset(*(t[: self.val_subset] for t in self.val_set.tensors))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # 28x28 Fashion-MNIST or 8x8 digits: the model's input size follows the data.
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        # jsonargparse checks names and types while parsing; values are checked by the classes themselves
        # (`backend: x87`). Show their message as one line instead of a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ModuleNotFoundError) as err:
            while err.__cause__ or err.__context__:
                err = err.__cause__ or err.__context__
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


def main(args: list[str] | None = None) -> None:
    CLI(LitClassifier, Data, args=args)


if __name__ == "__main__":
    main()
