import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def cache_dir(tmp_path_factory):
    """Built-in classifier cache shared by the whole session (trained once)."""
    return os.environ.get("CONTGEN_CACHE") or str(tmp_path_factory.getbasetemp() / "contgen-cache")


@pytest.fixture
def one_thread():
    """One intra-op thread: the tensors of these tests are small, and extra threads only add sync points (measured
    up to 5-20x slower on a loaded 2-core machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
