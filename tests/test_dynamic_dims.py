"""`dynamic_dims`: dimensions besides the batch that vary between batches (text lengths), on x86."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_quant import PTQCallback, QATCallback, load, quantize_ptq, save
from lightning_quant.capture import export
from lightning_quant.cli import main
from lightning_quant.config import QuantConfig


class TextCNN(nn.Module):
    """Token ids and a padding mask, both (batch, length): embedding, a Conv1d over the length, masked mean, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)
        return self.head((h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True))


def _batch(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length)
    mask[:, length - 2 :] = 0  # padding at the end
    return torch.randint(1, 100, (batch, length), generator=g), mask


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        ("1", TypeError, r"`dynamic_dims` to be None or a dict from a dimension to its largest size"),
        ({1: "512"}, TypeError, r"`dynamic_dims`"),
        ({"1": 512}, TypeError, r"`dynamic_dims`"),
        ({1: True}, TypeError, r"`dynamic_dims`"),
        ({}, TypeError, r"`dynamic_dims`"),
        ({0: 64}, ValueError, r"dimension 0 is the batch: see `max_batch_size`.*got 0: 64"),
        ({1: 1}, ValueError, r"largest sizes >= 2, but got 1: 1"),
    ],
)
def test_bad_dynamic_dims(value, exc, match):
    with pytest.raises(exc, match=match):
        QuantConfig(dynamic_dims=value)


def test_dynamic_dims_normalised_and_refused_for_arm():
    assert QuantConfig(dynamic_dims={2: 64, 1: 512}).dynamic_dims == ((1, 512), (2, 64))
    assert QATCallback(dynamic_dims={1: 8}).config.dynamic_dims == ((1, 8),)
    assert PTQCallback(dynamic_dims=((1, 8),)).config.dynamic_dims == ((1, 8),)  # as a QAT checkpoint stores it
    pytest.importorskip("executorch")
    with pytest.raises(ValueError, match=r"`dynamic_dims` to be None with backend='arm'.*use backend='x86'"):
        PTQCallback(backend="arm", dynamic_dims={1: 8})


def test_export_keeps_the_dims_the_model_fixes_static():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 10, 8)
    ep = export(lin, (x,), {}, max_batch_size=16, name="lin", dynamic_dims=((1, 32), (2, 32)))
    (shape,) = [n.meta["val"].shape for n in ep.graph.nodes if n.op == "placeholder" and n.name == "input"]
    assert not isinstance(shape[0], int) and not isinstance(shape[1], int)  # batch and length: dynamic
    assert shape[2] == 8  # the Linear's features: fixed
    with pytest.raises(ValueError, match=r"`dynamic_dims` \(\{1: 8\}\) to hold the size 10 of dimension 1"):
        export(lin, (x,), {}, max_batch_size=16, name="lin", dynamic_dims=((1, 8),))


def test_a_listed_dim_the_model_fixes_everywhere_warns():
    with pytest.warns(UserWarning, match=r"`dynamic_dims` names dimension 1, but no input of 'lin' kept it dynamic"):
        export(nn.Linear(8, 4), (torch.randn(3, 8),), {}, max_batch_size=16, name="lin", dynamic_dims=((1, 32),))


class TokensAndFeatures(nn.Module):
    """Token ids (batch, length) and per-sample features (batch, 64): only the tokens' dim 1 may vary."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.tok, self.feat = nn.Embedding(50, 8), nn.Linear(8, 4), nn.Linear(64, 4)

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.tok(self.emb(tokens)).mean(1) + self.feat(feats)


@pytest.mark.slow
def test_a_dim_the_model_fixes_stays_fixed_in_the_artifact(tmp_path):
    torch.manual_seed(0)
    model = TokensAndFeatures().eval()
    calib = [(torch.randint(0, 50, (4, n)), torch.randn(4, 64)) for n in (10, 6)]
    # 64 features > the largest length 32: refused before export ("to hold the size 64 of dimension 1")
    q = quantize_ptq(model, calib, dynamic_dims={1: 32})
    save(q, tmp_path / "mixed.pt2")
    inputs = json.loads(Path(str(tmp_path / "mixed.pt2") + ".json").read_text())["inputs"]
    assert [s["shape"] for s in inputs] == [[None, None], [None, 64]]  # the features were recorded as dynamic
    art = load(tmp_path / "mixed.pt2")
    tokens = torch.randint(0, 50, (2, 20))
    torch.testing.assert_close(art(tokens, torch.randn(2, 64)).shape, torch.Size([2, 4]))
    with pytest.raises(ValueError, match=r"input `args\[1\]` must have shape \[None, 64\]"):
        art(tokens, torch.randn(2, 7))  # ran, on memory past the features


@pytest.mark.slow
def test_x86_artifact_takes_any_length_up_to_the_largest(tmp_path, capsys):
    torch.manual_seed(0)
    model = TextCNN().eval()
    calib = [_batch(8, n, seed=n) for n in (12, 20, 7, 16)]  # padded per batch: another length in each
    q = quantize_ptq(model, calib, dynamic_dims={1: 32})
    save(q, tmp_path / "text.pt2")
    inputs = json.loads(Path(str(tmp_path / "text.pt2") + ".json").read_text())["inputs"]
    assert [s["shape"] for s in inputs] == [[None, None], [None, None]]
    assert inputs[0]["dynamic"] == inputs[1]["dynamic"] == {"0": "batch", "1": "dim1"}  # one batch, one length
    assert main(["inspect", str(tmp_path / "text.pt2")]) == 0
    assert "args[0]: int64[N, L1], args[1]: float32[N, L1] (N <= 1024, L1 <= 32)" in capsys.readouterr().out
    art = load(tmp_path / "text.pt2")
    for batch, length in [(3, 5), (1, 17), (4, 32)]:
        ids, mask = _batch(batch, length, seed=100 + length)
        torch.testing.assert_close(art(ids, mask), q(ids, mask), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"dim 1 takes sizes from 2 to 32 \(`dynamic_dims`\), but got `args\[0\]` 33"):
        art(*_batch(3, 33))
    with pytest.raises(ValueError, match=r"dim 1 takes sizes from 2 to 32"):
        art(*_batch(3, 1))
    with pytest.raises(ValueError, match=r"must share one size in dim 1 .*`args\[0\]` 10, `args\[1\]` 12"):
        art(_batch(3, 10)[0], _batch(3, 12)[1])  # the x86 runtime itself would read past the mask


class _LitText(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TextCNN()

    def training_step(self, batch, batch_idx):
        ids, mask, y = batch
        return F.cross_entropy(self.net(ids, mask), y)

    def validation_step(self, batch, batch_idx):
        ids, mask, y = batch
        self.log("val_acc", (self.net(ids, mask).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


def _loader(n: int, lengths: list[int], seed: int) -> DataLoader:
    batches = []
    for i in range(n):
        ids, mask = _batch(8, lengths[i % len(lengths)], seed=seed + i)
        batches.append((ids, mask, torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(i))))
    return DataLoader(batches, batch_size=None)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ptq", "qat"])
def test_callbacks_on_batches_padded_to_their_own_length(method, tmp_path):
    pl.seed_everything(0)
    if method == "ptq":
        cb = PTQCallback(num_calibration_samples=32, dynamic_dims={1: 24}, dirpath=str(tmp_path))
    else:
        cb = QATCallback(dynamic_dims={1: 24}, dirpath=str(tmp_path))
        assert cb.state_dict()["dynamic_dims"] == ((1, 24),)  # kept in checkpoints (load_qat_checkpoint)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    model = _LitText()
    trainer.fit(model, _loader(8, [16, 12, 20], seed=0), _loader(4, [9, 24], seed=50))  # failed at fit end
    assert "val_acc_int8" in trainer.callback_metrics
    art = load(cb.artifacts["net"])
    ids, mask = _batch(5, 22, seed=7)  # a length neither training nor validation had
    assert art(ids, mask).shape == (5, 2)


@pytest.mark.slow
def test_qat_without_dynamic_dims_names_it_on_another_length(tmp_path):
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[QATCallback(dirpath=str(tmp_path))], logger=False, enable_checkpointing=False
    )
    # a raw "AssertionError: Guard failed: ids.size()[1] == 16" from inside the captured graph before
    with pytest.raises(ValueError, match=r"A training call of 'net' does not match .*`dynamic_dims=\{1: 512\}`"):
        trainer.fit(_LitText(), _loader(4, [16, 12], seed=0), _loader(2, [16], seed=50))
