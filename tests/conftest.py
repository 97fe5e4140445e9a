import os
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def cache_dir(tmp_path_factory):
    """Built-in classifier cache shared by the whole session (trained once)."""
    return os.environ.get("CONTGEN_CACHE") or str(tmp_path_factory.getbasetemp() / "contgen-cache")
