"""When the CUDA-graph path may be taken (its replay = eager: tests/gpu/test_cuda.py, tests/transport on a GPU)."""

import copy

import torch

from contgen.utils import cuda_graphs


def test_graphs_only_inside_the_context_on_cuda_without_grad():
    x = torch.zeros(2)
    with torch.no_grad():
        assert not cuda_graphs.active(x)  # outside the context
        with cuda_graphs.enabled(True):
            assert not cuda_graphs.active(x)  # a CPU tensor: the eager path, the CPU code unchanged
            with cuda_graphs.enabled(False):
                assert not getattr(cuda_graphs._state, "on")
            assert cuda_graphs._state.on  # restored on exit
    if torch.cuda.is_available():
        y = x.cuda()
        with cuda_graphs.enabled(True):
            assert not cuda_graphs.active(y)  # gradients on
            with torch.no_grad():
                assert cuda_graphs.active(y)


def test_a_copied_cache_starts_empty():
    """EMA copies and pickled modules must not share (or carry) captured graphs."""
    cache = cuda_graphs.GraphCache(max_graphs=3)
    cache._graphs["k"] = ("stale",)
    clone = copy.deepcopy(cache)
    assert len(clone) == 0 and clone.max_graphs == 3 and len(cache) == 1
