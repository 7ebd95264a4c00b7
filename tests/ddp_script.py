"""Run by tests/test_distributed.py in a subprocess: a 2-process CPU (gloo) fit with a plugin callback.

usage: python tests/ddp_script.py STRATEGY {qat,qat_fails,ptq} OUT_DIR
Each rank saves its tensor state at every train-epoch end; the launching process prints its model type. The
callbacks keep their default `dirpath` (<default_root_dir>/quantized: `trainer.log_dir` is a collective call). QAT with
"ddp" trains a model without BatchNorm (no buffers when DDP wraps it), the others one with; PTQ fits from a datamodule.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from test_ptq import _loaders  # noqa: E402
from test_qat import DropoutNet  # noqa: E402

from lightning_quant import PTQCallback, QATCallback, _torchao  # noqa: E402

# the .pte lowers in a few seconds, the .pt2 compiles C++ for ~15 s while the other rank waits: both export on rank 0
BACKEND = "arm" if _torchao.executorch_available() else "x86"


class NoBufferNet(DropoutNet):
    """DropoutNet without BatchNorm: no buffers when DDP wraps it, only the fake-quant graph's, added later."""

    def __init__(self):
        super().__init__()
        self.model[1] = torch.nn.Identity()


class Data(pl.LightningDataModule):
    """The same loaders from a datamodule that overrides `prepare_data` (Lightning runs it inside a barrier)."""

    def prepare_data(self):
        pass

    def train_dataloader(self):
        return _loaders()[0]

    def val_dataloader(self):
        return _loaders()[1]


class Dump(Callback):
    def __init__(self, out):
        self.out = out

    def on_train_epoch_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save(state, os.path.join(self.out, f"state_r{trainer.global_rank}_e{trainer.current_epoch}.pt"))


def main():
    strategy, kind, out = sys.argv[1:4]
    pl.seed_everything(0)
    model = NoBufferNet() if (strategy, kind) == ("ddp", "qat") else DropoutNet()
    if kind == "qat_fails":  # a submodule left in eval mode: its observers see nothing, converting it fails on rank 0
        model.model.eval()
        kind = "qat"
    if kind == "qat":
        cb = QATCallback(backend=BACKEND, start_epoch=1, freeze_observer_epoch=2)
        cb.attach(model)  # needed with ddp_spawn (tests/test_distributed.py checks the refusal without it)
    else:
        cb = PTQCallback(backend=BACKEND, num_calibration_samples=64)
    train, val = _loaders()
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, Dump(out)],
        default_root_dir=out,
    )
    if kind == "ptq":  # the inner calibration/evaluation passes on rank 0 must not enter that barrier
        trainer.fit(model, datamodule=Data())
    else:
        trainer.fit(model, train, val)
    if strategy == "ddp":  # every rank holds rank 0's int8 model: same quantization parameters everywhere
        qparams = {k: v for k, v in cb.quantized_model.state_dict().items() if "scale" in k or "zero_point" in k}
        torch.save(qparams, os.path.join(out, f"qparams_r{trainer.global_rank}.pt"))
        activation_qparams = [  # activation scales and zero points are literals in the graph
            tuple(n.args[1:3]) for n in cb.quantized_model.graph.nodes if "quantize_per_tensor" in str(n.target)
        ]
        torch.save(activation_qparams, os.path.join(out, f"act_qparams_r{trainer.global_rank}.pt"))
    x = val.dataset.tensors[0][:8]
    model.eval()
    with torch.no_grad():
        torch.save(model.model(x), os.path.join(out, f"launcher_out_r{trainer.global_rank}.pt"))
    print(f"RESULT rank={trainer.global_rank} model={type(model.model).__name__}", flush=True)


if __name__ == "__main__":
    main()
