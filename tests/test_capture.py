from __future__ import annotations

import pickle

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from helpers import DataDependent, KwargsNet, TinyConvNet
from torch import nn

from lightning_quant.capture import CaptureError, default_targets, export, graph_to_cpu, resolve_targets, swapped

# ------------------------------------------------------------------------------------------ LightningModules


class WithModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyConvNet()
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.model(x)


class NoForward(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyConvNet()

    def training_step(self, batch, batch_idx):
        return self.model(batch).sum()


class ProjectedCrossEntropy(nn.CrossEntropyLoss):
    """A loss that holds a Linear layer: still a loss, never a quantization target."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)


class EmbeddingDistance(torchmetrics.Metric):
    """A metric that holds a Linear layer: still a metric, never a quantization target."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 2)
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds, target):
        self.total += (self.embed(preds) - self.embed(target)).abs().sum()

    def compute(self):
        return self.total


class BackboneHead(pl.LightningModule):
    def __init__(self, extras_with_layers: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(4 * 6 * 6, 2))
        if extras_with_layers:
            self.val_metric = EmbeddingDistance()
            self.loss_fn = ProjectedCrossEntropy()
        else:
            self.val_metric = torchmetrics.classification.MulticlassAccuracy(num_classes=2)
            self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.head(self.backbone(x))


class LayersOnSelf(pl.LightningModule):
    """Lightning's own examples: layers defined directly on the LightningModule and used by its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 2)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


class BareLinearHeadNoForward(pl.LightningModule):
    """``training_step`` calls ``head(backbone(x))``; the head is a bare Linear child and there is no forward."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 6 * 6, 2)

    def training_step(self, batch, batch_idx):
        return self.head(self.backbone(batch)).sum()


class NoLayers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.act = nn.ReLU()
        self.loss_fn = nn.MSELoss()

    def forward(self, x):
        return self.act(self.norm(x))


# ------------------------------------------------------------------------------------------ default targets


def test_default_targets_model_attribute():
    assert default_targets(WithModel()) == ("model",)


@pytest.mark.parametrize("extras_with_layers", [False, True], ids=["plain-metric-loss", "metric-loss-with-linear"])
def test_default_targets_backbone_and_head_exclude_metrics_and_losses(extras_with_layers):
    root = BackboneHead(extras_with_layers)
    assert default_targets(root) == ("backbone", "head")
    assert resolve_targets(root, None) == ("backbone", "head")


def test_default_targets_layers_on_self():
    assert default_targets(LayersOnSelf()) == ("self",)
    assert resolve_targets(LayersOnSelf(), None) == ("self",)


def test_resolve_targets_accepts_explicit_names():
    root = BackboneHead()
    assert resolve_targets(root, ("backbone.0", "head")) == ("backbone.0", "head")
    assert resolve_targets(LayersOnSelf(), ("self",)) == ("self",)


def test_default_targets_bare_linear_child_means_self():
    """A Conv/Linear child directly on the root selects the root's forward (documented), even next to a backbone."""
    root = BackboneHead()
    root.head = nn.Linear(4 * 6 * 6, 2)
    assert default_targets(root) == ("self",)


@pytest.mark.parametrize(
    "make_root",
    [
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)),
        BareLinearHeadNoForward,
    ],
    ids=["sequential-root", "bare-linear-head-no-forward"],
)
def test_default_targets_are_always_resolvable(make_root):
    root = make_root()
    assert resolve_targets(root, None) == default_targets(root)


# ------------------------------------------------------------------------------------------ resolve errors


@pytest.mark.parametrize(
    ("root", "modules", "match"),
    [
        (
            WithModel,
            ("modle",),
            r"`modules` to name submodules of `WithModel`, but 'modle' does not exist\. "
            r"Did you mean 'model'",
        ),
        (BackboneHead, ("head", "backbone.9"), r"'backbone.9' does not exist.*Its children are: 'backbone', 'head'"),
        (NoForward, ("self",), r"'self' was chosen and `NoForward` defines no `forward`"),
        (BackboneHead, ("backbone.1",), r"'backbone.1' \(ReLU\) has no Conv/Linear layer"),
        (BackboneHead, ("loss_fn",), r"'loss_fn' \(CrossEntropyLoss\) has no Conv/Linear layer"),
        (NoLayers, None, r"`NoLayers` has no quantizable layers .*Pass `modules=\[\.\.\.\]`"),
        (NoLayers, ("norm",), r"'norm' \(BatchNorm1d\) has no Conv/Linear layer"),
    ],
    ids=["typo", "missing-nested", "self-without-forward", "no-layers-in-target", "loss-target", "no-layers", "bn"],
)
def test_resolve_targets_errors(root, modules, match):
    with pytest.raises(ValueError, match=match):
        resolve_targets(root(), modules)


@pytest.mark.parametrize("modules", [None, ("model",), ("model._orig_mod",), ("model._orig_mod.conv",)])
def test_resolve_targets_refuses_a_torch_compile_wrapper_and_accepts_in_place_compile(modules):
    root = WithModel()
    root.model = torch.compile(root.model)  # a wrapper: calls run code compiled for the module it hides
    with pytest.raises(ValueError, match=r"'model' is a `torch.compile` wrapper \(OptimizedModule\) around `TinyConv"):
        resolve_targets(root, modules)
    root.model = root.model._orig_mod
    root.model.compile()  # in place: the module stays itself
    plain = None if modules is None else tuple(m.replace("._orig_mod", "") for m in modules)
    assert resolve_targets(root, plain) == (plain or ("model",))


# ------------------------------------------------------------------------------------------ swapping


class Echo(nn.Module):
    """Returns what it was called with, to check that args and kwargs are routed unchanged."""

    def forward(self, *args, **kwargs):
        return ("echo", args, kwargs)


class Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyConvNet()
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.model(x))


@pytest.mark.parametrize("body_raises", [False, True])
def test_swapped_restores_submodules_and_forward(body_raises):
    root = Root().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = root(x)
    model, head = root.model, root.head
    keys = list(root.state_dict())
    new_model, new_head = nn.Identity(), nn.Identity()

    class Boom(Exception):
        pass

    try:
        with swapped(root, {"self": Echo(), "model": new_model, "head": new_head}):
            assert root.model is new_model and root.head is new_head
            assert root(x, scale=2.0) == ("echo", (x,), {"scale": 2.0})
            pickle.loads(pickle.dumps(root))  # the routing keeps the root picklable
            if body_raises:
                raise Boom
    except Boom:
        assert body_raises

    assert root.model is model and root.head is head
    assert "forward" not in vars(root)
    assert "_lightning_quant_forward" not in root._modules
    assert list(root.state_dict()) == keys
    torch.testing.assert_close(root(x), expected, rtol=0, atol=0)


def test_swapped_restores_earlier_names_when_a_later_one_is_missing():
    root = Root()
    model = root.model
    with pytest.raises(AttributeError), swapped(root, {"model": nn.Identity(), "nope": nn.Identity()}):
        pass
    assert root.model is model


# ------------------------------------------------------------------------------------------ export


def test_export_data_dependent_control_flow_raises_capture_error_naming_submodule():
    with pytest.raises(CaptureError, match=r"could not capture 'backbone' \(DataDependent\)") as info:
        export(DataDependent(), (torch.randn(2, 4),), {}, max_batch_size=8, name="backbone")
    assert info.value.__cause__ is not None  # the torch.export error is chained for debugging
    assert "modules=[...]" in str(info.value)


def test_export_batch_one_example_gives_dynamic_batch_up_to_max():
    ep = export(TinyConvNet().eval(), (torch.randn(1, 3, 8, 8),), {}, max_batch_size=16, name="model")
    assert ep.module()(torch.randn(5, 3, 8, 8)).shape == (5, 2)
    assert ep.module()(torch.randn(1, 3, 8, 8)).shape == (1, 2)
    (rng,) = ep.range_constraints.values()
    assert int(rng.upper) == 16


def test_export_kwargs_share_one_dynamic_batch_dim():
    net = KwargsNet().eval()
    ep = export(net, (), {"x": torch.randn(4, 16), "mask": torch.ones(4, 4)}, max_batch_size=32, name="self")
    x, mask = torch.randn(7, 16), torch.rand(7, 4)
    torch.testing.assert_close(ep.module()(x=x, mask=mask), net(x, mask=mask))


class _MakesTensors(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(x.shape[1], device=x.device)


def test_graph_to_cpu_moves_devices_recorded_in_the_graph():
    # export records `device=x.device` as a constant; a graph traced on a GPU names cuda:0 in its nodes
    x = torch.randn(2, 3)
    gm = torch.export.export(_MakesTensors(), (x,)).module()
    made = [n for n in gm.graph.nodes if "device" in n.kwargs]
    assert made
    for node in made:
        node.update_kwarg("device", torch.device("cuda", 0))
    gm.recompile()
    assert graph_to_cpu(gm) is gm
    assert all(n.kwargs["device"] == torch.device("cpu") for n in made)
    torch.testing.assert_close(gm(x), x + 1)


@pytest.mark.parametrize(
    ("later", "match"),
    [
        ({"mask": None}, r"An evaluation call of 'net' passes mask=None, but it was captured with a tensor there"),
        ({}, r"An evaluation call of 'net' passes mask=None, but it was captured with a tensor there"),
        (
            {"mask": torch.ones(4, 4), "scale": 3.0},
            r"passes scale=3.0, but it was captured with scale=2.0, a value baked",
        ),
    ],
    ids=["tensor-now-None", "left-out", "other-constant"],
)
def test_a_qat_graph_called_unlike_its_capture_names_the_argument(later, match):
    """`training_step` calling `self(x, mask=m)` and `validation_step` `self(x)` failed deep in the graph
    ("'NoneType' object has no attribute 'size'", or torch's "Guard failed: scale == 2.0")."""
    from lightning_quant import QATGraph, QuantConfig

    graph = QATGraph(KwargsNet(), "net", QuantConfig(backend="x86")).train()
    x = torch.randn(4, 16)
    graph(x, scale=2.0, mask=torch.ones(4, 4))
    graph.eval()
    with pytest.raises(ValueError, match=match):
        graph(x, **{"scale": 2.0, **later})


@pytest.mark.parametrize(
    ("later", "match"),
    [
        ({"mask": torch.zeros(4, 4)}, r"passes mask=<tensor \[4, 4\]>, but it was captured from a call that left"),
        ({"scale": 100.0}, r"passes scale=100.0, .* left `scale` out: its graph runs with the default scale=1.0 baked"),
    ],
    ids=["tensor-given-now", "other-value-given-now"],
)
def test_an_argument_the_capture_left_out_is_refused_when_given_later(later, match):
    """Captured from `self(x)` (`training_step`), a graph ran `self(x, mask=m)` (`validation_step`) ignoring the mask:
    normalization dropped what the capture lacked before the check saw it (silently wrong outputs)."""
    from lightning_quant import QATGraph, QuantConfig

    graph = QATGraph(KwargsNet(), "net", QuantConfig(backend="x86")).train()
    x = torch.randn(4, 16)
    graph(x)
    graph.eval()
    graph(x, scale=1.0, mask=None)  # the defaults, given explicitly: what the graph runs anyway
    with pytest.raises(ValueError, match=match):
        graph(x, **later)


class _VarKeywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, size: tuple = (2, 2), **extra: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) * size[0]
        return h * extra["mask"] if "mask" in extra else h


def test_keywords_for_var_keyword_the_capture_lacked_are_refused_and_equal_defaults_pass():
    from lightning_quant import QATGraph, QuantConfig

    graph = QATGraph(_VarKeywords(), "net", QuantConfig(backend="x86")).train()
    x = torch.randn(4, 8)
    graph(x)
    graph.eval()
    graph(x, size=[2, 2])  # a list for the default tuple: the same call
    with pytest.raises(ValueError, match=r"passes the keyword arguments \['mask'\], .* \(they go to `\*\*extra`\)"):
        graph(x, mask=torch.zeros(4, 8))  # was dropped silently: the graph ran without it


def test_calibration_items_called_unlike_the_first_name_the_argument():
    from lightning_quant.quantize import quantize_ptq

    x, mask = torch.randn(4, 16), torch.ones(4, 4)
    items = [{"x": x, "mask": mask}, {"x": x}]  # the second leaves `mask` at its default None
    with pytest.raises(ValueError, match=r"Calibration batch 2 of 'KwargsNet' passes mask=None, but it was captured"):
        quantize_ptq(KwargsNet().eval(), items, backend="x86")


def test_qat_and_ptq_do_not_repeat_torchs_treespec_warning():
    """Every deepcopy of an exported graph warned "`isinstance(treespec, LeafSpec)` is deprecated" (torch 2.13):
    about 120 lines per QAT run, burying the warnings that matter."""
    import warnings

    from lightning_quant import QATGraph, QuantConfig
    from lightning_quant.quantize import quantize_ptq

    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = QATGraph(TinyConvNet(), "net", QuantConfig(backend="x86")).train()
        graph(x).sum().backward()
        graph.eval().convert()
        quantize_ptq(TinyConvNet().eval(), [x], backend="x86")
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
