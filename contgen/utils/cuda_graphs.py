"""CUDA graphs for sampling loops with static shapes (``module.cuda_graphs``).

A sampling loop such as the diffusion head's 100 denoising steps issues ~10⁴ small kernels per call; the host
cannot launch them as fast as the GPU runs them, so the GPU idles (MAR-B sampling: 59% busy,
``bench/results/h200_2026-11-27_profile.jsonl``). Captured once per input shape and replayed, the whole loop
is one launch. What a replay computes is what the captured eager call computed: the same kernels on the same
shapes, reading the current parameter values. Randomness is drawn *outside* the graph, by the caller's
generator in eager order, and passed in as an input, so a seed gives the same samples with and without graphs.

Graphs are used only inside :func:`enabled` (``GenerativeModule.decode_images`` opens it with ``module.cuda_graphs``;
the transport module's training step too, for Shortcut's no-grad half steps), on CUDA tensors, with gradients off;
everywhere else the same function runs eagerly.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import nn

_state = threading.local()


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Within this context, :meth:`GraphCache.run` captures and replays on CUDA (``on``) or runs eagerly."""
    before = getattr(_state, "on", False)
    _state.on = on
    try:
        yield
    finally:
        _state.on = before


def active(*tensors: torch.Tensor) -> bool:
    """Whether a graph may be used for work on ``tensors`` now: inside :func:`enabled`, all on CUDA, no autograd."""
    return (getattr(_state, "on", False) and not torch.is_grad_enabled() and all(t.is_cuda for t in tensors)
            and not torch.cuda.is_current_stream_capturing())


class GraphCache:
    """Replays ``fn(*inputs)`` from a CUDA graph captured per ``key`` (the caller's shapes and flags).

    ``fn`` must be a pure function of its ``inputs`` and of ``owner``'s parameters and buffers: no host reads, no
    random draws, one output tensor. A float input reaches ``fn`` as a 0-d fp32 device tensor, so one graph serves
    every value (a CFG scale, a temperature) with the same arithmetic as the number. A graph is recaptured when
    ``owner``'s tensors moved (``.to()``, swapped parameters); in-place updates (EMA, ``load_state_dict``) need none. The autocast state is part of
    the capture, so it belongs in ``key``. At most ``max_graphs`` are kept (least recently used dropped); all share
    one memory pool, which is safe because replays never overlap (one stream, in order).
    """

    def __init__(self, max_graphs: int = 32):
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self._pool = None

    def __getstate__(self) -> dict:  # deepcopy / pickle (EMA copies, checkpoints) start with no graphs
        return {"max_graphs": self.max_graphs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_graphs"])

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor | float, ...], key: tuple,
            owner: nn.Module) -> torch.Tensor:
        tensors = [t.data_ptr() for t in (*owner.parameters(), *owner.buffers())]
        key = (*key, *((t.shape, t.dtype, t.device) if torch.is_tensor(t) else float for t in inputs),
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        entry = self._graphs.get(key)
        if entry is None or entry[0] != tensors:
            entry = (tensors, *self._capture(fn, inputs))
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        _, graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src) if torch.is_tensor(src) else dst.fill_(src)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, fn, inputs):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        device = next(t.device for t in inputs if torch.is_tensor(t))
        static_in = [t.clone() if torch.is_tensor(t) else torch.full((), t, device=device) for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, cuBLAS workspaces, compilation
            fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Weight casts that autocast cached before the capture would be read from memory the graph does not own,
        # and casts cached during it live in the graph's pool: clear the cache on both sides.
        torch.clear_autocast_cache()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = fn(*static_in)
        torch.clear_autocast_cache()
        return graph, static_in, static_out
