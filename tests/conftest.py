from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch._inductor.config as inductor_config
from helpers import TinyConvNet
from torch import nn


@pytest.fixture(autouse=True)
def _restore_global_state() -> Iterator[None]:
    """Each test starts seeded and leaves the quantized engine, thread count and Inductor freezing as it found them."""
    engine = torch.backends.quantized.engine
    threads = torch.get_num_threads()
    freezing = inductor_config.freezing
    torch.manual_seed(0)
    yield
    torch.backends.quantized.engine = engine
    torch.set_num_threads(threads)
    inductor_config.freezing = freezing
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_net() -> Callable[..., nn.Module]:
    """Factory: ``tiny_net(seed=0)`` builds a fresh :class:`TinyConvNet` (eval mode, seeded weights)."""

    def make(seed: int = 0) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return TinyConvNet().eval()

    return make
