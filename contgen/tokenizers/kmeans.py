"""K-means for DiGIT's discriminative tokens (reference/digit.md §1): Lloyd's algorithm in plain PyTorch, over
features held in memory or streamed from a loader, on one process or several (torch.distributed).

The reference clusters with CPU ``faiss.Kmeans(d, K, niter=20)``. :class:`KMeans` keeps the parts of faiss's
``Clustering::train`` that shape the result:

- at most ``max_points_per_centroid`` (256) · K training points, drawn uniformly without replacement, and a
  warning under ``min_points_per_centroid`` (39) · K;
- random initial centroids: K distinct training points (``init="k-means++"`` is an opt-in);
- squared L2 expanded as |x|² − 2x·C + |C|² in fp32; the nearest centroid is the first minimum;
- ``inertia[i]`` is the objective of the centroids that enter iteration i (faiss's ``iteration_stats[i].obj``);
- an empty cluster gets a copy of a populated one, and the two are nudged apart by a factor 1 ± 1/1024 per
  coordinate (even coordinates one way, odd ones the other).

It differs in three ways. faiss picks the cluster to split at random, with probability ∝ (size − 1); this code
splits the largest one (ties go to the lowest id). The subsample and the init are drawn from one
``torch.Generator``, so for the same seed the points differ from faiss's. There is no ``nredo``, spherical or
integer mode (the reference uses none of them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

INITS = ("random", "k-means++")
SPLIT_EPS = 1.0 / 1024  # faiss Clustering.cpp's EPS


@contextlib.contextmanager
def _exact_fp32(device_type: str):
    """Full fp32 matmuls, whatever the caller has set: TF32 (``torch.set_float32_matmul_precision``) would round
    the features to 10 mantissa bits, and an autocast region would run the distances in bf16."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _chunk_rows(k: int, chunk_elements: int) -> int:
    """Rows per chunk, chosen so that one (rows, K) distance block holds at most ``chunk_elements`` values."""
    return max(1, chunk_elements // k)


def _nearest(x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to the nearest centroid, and its id, for each row of ``x`` (fp32)."""
    x_sq = (x * x).sum(1, keepdim=True)
    d, idx = torch.addmm(x_sq + c_sq, x, centroids.T, alpha=-2).min(1)
    return d.clamp_min_(0), idx  # the expansion can dip below 0 by rounding


@torch.no_grad()
def assign(
    x: torch.Tensor, centroids: torch.Tensor, *, chunk_elements: int = 2**24, check_finite: bool = True
) -> torch.Tensor:
    """The id of the nearest centroid for each feature vector: (..., D) -> (...,) int64, on ``x``'s device.

    This is the reference's squared-L2 argmin, computed in fp32. DiGIT's fairseq run most likely did it in fp16.
    The rows are processed in chunks, so that one (rows, K) block holds at most ``chunk_elements`` values.
    ``check_finite`` costs one host sync. A training step that must not sync passes False, and a NaN row then
    gets an arbitrary id.
    """
    if centroids.ndim != 2:
        raise ValueError(f"assign: centroids must be (K, D), got shape {tuple(centroids.shape)}")
    k, dim = centroids.shape
    if x.shape[-1:] != (dim,) or not x.is_floating_point():
        raise ValueError(f"assign: x must be floating (..., D={dim}) to match centroids, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("assign: x has NaN or infinite features")
    flat = x.reshape(-1, dim)
    with _exact_fp32(x.device.type):
        c = centroids.to(device=x.device, dtype=torch.float32)
        c_sq = (c * c).sum(1)
        rows = _chunk_rows(k, chunk_elements)
        ids = [_nearest(part.float(), c, c_sq)[1] for part in flat.split(rows)]
    return torch.cat(ids).reshape(x.shape[:-1]) if ids else flat.new_zeros(x.shape[:-1], dtype=torch.long)


class _Rows:
    """The training rows one process holds: a (N, D) tensor, or a re-iterable of (n_i, D) tensors (a list, a
    DataLoader) that is read once per pass, in the same order on every pass."""

    def __init__(self, data):
        self.n = self.dim = None
        if isinstance(data, torch.Tensor):
            self._tensor, self._data = data, None
        elif isinstance(data, Iterable) and not isinstance(data, Iterator):
            self._tensor, self._data = None, data
        else:
            raise TypeError(f"data must be a (N, D) tensor or a re-iterable of (n, D) tensors (a list, a DataLoader), "
                            f"got {type(data).__name__}: an iterator or generator is spent after one pass")

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "_Rows":
        """Rows that are already checked, such as a subsample."""
        rows = cls(tensor)
        rows.n, rows.dim = tensor.shape
        return rows

    def _batches(self) -> Iterator[torch.Tensor]:
        for i, b in enumerate([self._tensor] if self._tensor is not None else self._data):
            name = "data" if self._tensor is not None else f"data: batch {i}"
            if not isinstance(b, torch.Tensor) or b.ndim != 2 or not b.is_floating_point():
                what = f"{b.dtype} {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"{name} must be a floating (n, D) tensor, got {what}")
            if self.dim is None:
                self.dim = b.shape[1]
            elif b.shape[1] != self.dim:
                raise ValueError(f"{name} has D={b.shape[1]}, the batches before it D={self.dim}")
            yield b

    def scan(self, rows: int) -> tuple[torch.device | None, str | None]:
        """Count the rows and check them. Returns the data's device and an error message: in a distributed fit,
        every rank must learn of the error before any of them raises, or the others would hang in a collective."""
        n, device = 0, None
        try:
            for b in self._batches():
                device = device or b.device
                for start in range(0, b.shape[0], rows):  # bounded temporaries
                    bad = ~torch.isfinite(b[start : start + rows]).all(1)
                    if bad.any():
                        return device, f"data: row {n + start + int(bad.nonzero()[0])} has a NaN or infinite feature"
                n += b.shape[0]
        except ValueError as e:
            return device, str(e)
        if self.dim is None:
            return device, "data: no batches"
        self.n = n
        return device, None

    def _check_pass(self, seen: int) -> None:
        if seen != self.n:
            raise RuntimeError(f"data: this pass read {seen} rows, the first one {self.n}; the loader must yield the "
                               f"same rows in the same order on every pass")

    def chunks(self, rows: int, device: torch.device) -> Iterator[torch.Tensor]:
        """Fresh fp32 copies of consecutive ``rows``-row chunks on ``device`` (the last may be shorter). The grid
        does not depend on how the loader batches the data, so a streamed fit runs the very same arithmetic as an
        in-memory one."""
        buf, have, seen = [], 0, 0
        for b in self._batches():
            seen += b.shape[0]
            while b.shape[0]:
                take = min(rows - have, b.shape[0])
                buf.append(b[:take])
                b, have = b[take:], have + take
                if have == rows:
                    yield torch.cat(buf).to(device, torch.float32, copy=True)
                    buf, have = [], 0
        self._check_pass(seen)
        if have:
            yield torch.cat(buf).to(device, torch.float32, copy=True)

    def gather(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rows at the sorted local indices ``idx`` (CPU int64), as fp32 on ``device``; one pass over a stream."""
        if self._tensor is not None:
            return self._tensor[idx.to(self._tensor.device)].to(device, torch.float32)
        out, start = [], 0
        for b in self._batches():
            lo, hi = torch.searchsorted(idx, torch.tensor([start, start + b.shape[0]])).tolist()
            if hi > lo:
                out.append(b[(idx[lo:hi] - start).to(b.device)].to(device, torch.float32))
            start += b.shape[0]
        self._check_pass(start)
        return torch.cat(out) if out else torch.empty(0, self.dim, device=device)


class _Comm:
    """Collectives over ``group`` when torch.distributed is initialised; one process is world 1 and all no-ops."""

    def __init__(self, group, device: torch.device):
        self.on = dist.is_available() and dist.is_initialized()
        self.group, self.device = group, device
        self.world = dist.get_world_size(group) if self.on else 1
        self.rank = dist.get_rank(group) if self.on else 0

    def sum(self, *tensors: torch.Tensor) -> None:
        for t in tensors if self.on else ():
            dist.all_reduce(t, group=self.group)

    def raise_if_any(self, error: str | None) -> None:
        failed = torch.tensor([error is not None], dtype=torch.long, device=self.device)
        self.sum(failed)
        if error is not None:
            raise ValueError(error)
        if failed.item():
            raise ValueError("KMeans.fit: another process rejected its data (its error says why)")

    def check_same(self, **values: int) -> None:
        if not self.on:
            return
        lo = torch.tensor(list(values.values()), dtype=torch.long, device=self.device)
        hi = lo.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        differ = [name for name, a, b in zip(values, lo.tolist(), hi.tolist()) if a != b]
        if differ:
            raise ValueError(f"KMeans.fit: the processes disagree on {', '.join(differ)}")

    def sizes(self, n_local: int) -> tuple[int, int]:
        """(total rows over all ranks, rows held by the ranks before this one)."""
        sizes = torch.zeros(self.world, dtype=torch.long, device=self.device)
        sizes[self.rank] = n_local
        self.sum(sizes)
        sizes = sizes.cpu()
        return int(sizes.sum()), int(sizes[: self.rank].sum())


def _rows_at(rows: _Rows, pos: torch.Tensor, offset: int, comm: _Comm) -> torch.Tensor:
    """The rows at global positions ``pos`` (in that order), on every rank. Each rank fills in the rows it holds
    and a sum all_reduce merges them; adding the other ranks' zeros is exact."""
    out = torch.zeros(len(pos), rows.dim, device=comm.device)
    mine = ((pos >= offset) & (pos < offset + rows.n)).nonzero().flatten()
    local, order = (pos[mine] - offset).sort()
    out[mine[order].to(comm.device)] = rows.gather(local, comm.device)
    comm.sum(out)
    return out


def _kmeanspp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007). Each next centre is a point drawn with probability ∝ its
    squared distance to the nearest centre so far. Uniforms come from the CPU generator ``g``, and the draw is a
    cumsum search, so the picks do not depend on the device's RNG."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    centroids = x.new_empty(k, x.shape[1])

    def sq_dist(c: torch.Tensor) -> torch.Tensor:
        return (x_sq - 2 * (x @ c) + c @ c).clamp_min_(0)

    centroids[0] = x[int(torch.randint(n, (), generator=g))]
    d2 = sq_dist(centroids[0])
    for j in range(1, k):
        cum = d2.double().cumsum(0)
        u = torch.rand(1, generator=g, dtype=torch.float64).to(x.device)
        # all-zero d2 (fewer distinct points than K) finds no cumsum above 0: take the last point
        i = torch.searchsorted(cum, u * cum[-1], right=True).clamp_max_(n - 1)
        centroids[j : j + 1] = x[i]
        d2 = torch.minimum(d2, sq_dist(centroids[j]))
    return centroids


def _split_empty(centroids: torch.Tensor, sizes: torch.Tensor) -> int:
    """faiss-style repair of empty clusters, in place. Each empty cluster, in id order, takes a copy of the
    currently largest cluster, and the two copies are nudged apart. Both then count as holding half its points.
    Because there are at least K points, a cluster with two or more points always exists to split."""
    empty = (sizes == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    nudge = torch.ones(centroids.shape[1], device=centroids.device)
    nudge[1::2] = -1
    nudge *= SPLIT_EPS
    for ci in empty:
        cj = int(sizes.argmax())  # the first maximum: deterministic
        base = centroids[cj].clone()
        centroids[ci] = base * (1 + nudge)
        centroids[cj] = base * (1 - nudge)
        sizes[ci] = sizes[cj] // 2
        sizes[cj] -= sizes[ci]
    return len(empty)


class KMeans:
    """Lloyd's k-means. Call ``fit(data)``, then read ``centroids`` (K, D) fp32 and pass them to :func:`assign`.
    ``save`` and ``load`` store and restore the result.

    ``data`` is a (N, D) tensor, or a re-iterable of (n_i, D) tensors that is read once per pass: a list, or a
    DataLoader over feature files larger than memory. The pass order is (1) count the rows and check them; (2)
    gather ``max_points_per_centroid`` · K random rows, if N is larger, and keep them on ``device``; (3) gather the
    init rows; (4) one pass per iteration. Passes (3) and (4) read the subsample when there is one, and the stream
    otherwise. Every pass accumulates per-centroid sums and counts over fixed chunks of rows, and the chunk grid
    does not depend on the loader's batch sizes. A streamed fit therefore equals an in-memory fit on the same
    device bit for bit.

    Under torch.distributed, each process passes its own rows, and the ranks are taken in order (rank r's rows
    follow rank r−1's). The seed then draws the same points as one process fitting the concatenation, and sums and
    counts are all-reduced. The result equals that of one process, up to the fp32 rounding of a different
    summation grouping. The collectives run on ``device``, so it must suit the backend (CPU for gloo, CUDA for
    NCCL).

    Determinism: every draw comes from ``torch.Generator().manual_seed(seed)``. The sums are one-hot matmuls rather
    than ``index_add_``, whose CUDA kernel adds in a run-dependent order. This doubles an iteration's FLOPs.
    """

    def __init__(
        self,
        k: int,
        *,
        iters: int = 20,
        init: str | torch.Tensor = "random",
        seed: int = 1234,
        max_points_per_centroid: int | None = 256,
        min_points_per_centroid: int = 39,
        init_points_per_centroid: int = 32,
        chunk_elements: int = 2**24,
        device: str | torch.device | None = None,
        group=None,
    ):
        """``iters`` 20 and ``seed`` 1234 are the reference's ``niter`` and faiss's default seed. ``init`` can also
        be a (K, D) tensor of starting centroids (the same on every rank). ``max_points_per_centroid=None`` trains
        on every point. k-means++ runs on at most ``init_points_per_centroid`` · K random training points, because
        each of its K steps reads all of them. ``device`` defaults to the data's device."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        if not isinstance(init, torch.Tensor) and init not in INITS:
            raise ValueError(f"init must be one of {INITS} or a (K, D) tensor, got {init!r}")
        if max_points_per_centroid is not None and max_points_per_centroid < 1:
            raise ValueError(f"max_points_per_centroid must be >= 1 or None, got {max_points_per_centroid}")
        if init_points_per_centroid < 1 or chunk_elements < 1:
            raise ValueError("init_points_per_centroid and chunk_elements must be >= 1")
        self.k, self.iters, self.init, self.seed = k, iters, init, seed
        self.max_points_per_centroid, self.min_points_per_centroid = max_points_per_centroid, min_points_per_centroid
        self.init_points_per_centroid, self.chunk_elements = init_points_per_centroid, chunk_elements
        self.device, self.group = device, group
        self.centroids: torch.Tensor | None = None
        self.inertia: list[float] = []  # objective of the centroids entering each iteration
        self.splits: list[int] = []  # empty clusters repaired after each iteration
        self.sizes: torch.Tensor | None = None  # cluster sizes at the last assignment (sum = train_points)
        self.num_points = self.train_points = None
        self.file_meta: dict = {}  # the meta of the file ``load`` read (empty for a bare .npy)

    @torch.no_grad()
    def fit(self, data) -> "KMeans":
        rows_per_chunk = _chunk_rows(self.k, self.chunk_elements)
        rows = _Rows(data)
        data_device, error = rows.scan(rows_per_chunk)
        device = torch.device(self.device if self.device is not None else data_device or "cpu")
        comm = _Comm(self.group, device)
        comm.raise_if_any(error)
        init_code = -1 if isinstance(self.init, torch.Tensor) else INITS.index(self.init)
        comm.check_same(k=self.k, D=rows.dim, seed=self.seed, iters=self.iters, init=init_code,
                        max_points_per_centroid=self.max_points_per_centroid or 0)
        n, offset = comm.sizes(rows.n)
        if n < self.k:
            raise ValueError(f"k={self.k} is larger than the number of points in data ({n})")
        if n < self.k * self.min_points_per_centroid:
            want = self.k * self.min_points_per_centroid
            warnings.warn(f"KMeans: {n} points for k={self.k} centroids; faiss asks for at least {want} "
                          f"(min_points_per_centroid={self.min_points_per_centroid})")
        g = torch.Generator().manual_seed(self.seed)
        m = n
        if self.max_points_per_centroid is not None and n > self.k * self.max_points_per_centroid:
            m = self.k * self.max_points_per_centroid
            chosen = torch.randperm(n, generator=g)[:m].sort().values
            log.info("k-means: training on %d of %d points (max_points_per_centroid=%d)", m, n,
                     self.max_points_per_centroid)
            local = chosen[(chosen >= offset) & (chosen < offset + rows.n)] - offset
            rows, offset = _Rows.of(rows.gather(local, device)), int((chosen < offset).sum())
        self.num_points, self.train_points = n, m

        with _exact_fp32(device.type):
            centroids = self._initial(rows, offset, m, device, g, comm)
            self.inertia, self.splits = [], []
            ids = torch.arange(self.k, device=device)
            for it in range(self.iters):
                sums = torch.zeros(self.k, rows.dim, dtype=torch.float64, device=device)
                counts = torch.zeros(self.k, dtype=torch.long, device=device)
                inertia = torch.zeros((), dtype=torch.float64, device=device)
                c_sq = (centroids * centroids).sum(1)
                for x in rows.chunks(rows_per_chunk, device):
                    d, a = _nearest(x, centroids, c_sq)
                    sums += (a == ids[:, None]).float() @ x
                    counts += torch.bincount(a, minlength=self.k)
                    inertia += d.sum(dtype=torch.float64)
                comm.sum(sums, counts, inertia)
                self.sizes = counts.cpu()
                # empty clusters come out as 0 here, and are replaced by the split
                centroids = (sums / counts.clamp_min(1)[:, None]).float()
                self.inertia.append(float(inertia))
                self.splits.append(_split_empty(centroids, self.sizes.clone()))
                log.info("k-means iteration %d/%d: inertia %.6g, %d empty clusters split", it + 1, self.iters,
                         self.inertia[-1], self.splits[-1])
        self.centroids = centroids
        return self

    def _initial(self, rows: _Rows, offset: int, m: int, device, g: torch.Generator, comm: _Comm) -> torch.Tensor:
        if isinstance(self.init, torch.Tensor):
            if self.init.shape != (self.k, rows.dim):
                raise ValueError(f"init: expected starting centroids ({self.k}, {rows.dim}), got "
                                 f"{tuple(self.init.shape)}")
            return self.init.to(device, torch.float32, copy=True)
        if self.init == "random":
            return _rows_at(rows, torch.randperm(m, generator=g)[: self.k], offset, comm)
        pos = torch.randperm(m, generator=g)[: self.init_points_per_centroid * self.k]
        return _kmeanspp(_rows_at(rows, pos, offset, comm), self.k, g)

    def meta(self) -> dict:
        return {
            "k": self.k, "dim": None if self.centroids is None else self.centroids.shape[1], "seed": self.seed,
            "iters": self.iters, "init": self.init if isinstance(self.init, str) else "given",
            "max_points_per_centroid": self.max_points_per_centroid, "num_points": self.num_points,
            "train_points": self.train_points, "inertia": list(self.inertia), "splits": list(self.splits),
            "sizes": None if self.sizes is None else self.sizes.tolist(),
        }

    def save(self, path, extra: dict | None = None) -> None:
        """Write the centroids (K, D) fp32 and :meth:`meta` (plus ``extra``: plain containers, e.g. what made the
        features) to one file that ``torch.load(weights_only=True)`` reads; ``load`` returns it as ``file_meta``.
        The file is written to ``<path>.tmp`` and then renamed, so an interrupted write never leaves a partial file.
        Under torch.distributed, only one rank should call this."""
        if self.centroids is None:
            raise RuntimeError("KMeans.save: nothing to save yet (call fit or load first)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"centroids": self.centroids.cpu(), "meta": {**self.meta(), **(extra or {})}}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, *, dim: int | None = None, k: int | None = None) -> "KMeans":
        """Read a file written by :meth:`save`, or a bare (K, D) ``.npy`` array without meta, such as DiGIT's
        released ``km_8k.npy``. When ``dim`` or ``k`` is given, the file must match it: ``dim`` is the width of
        the features that will be assigned."""
        path = Path(path)
        if path.suffix == ".npy":
            import numpy as np

            centroids, meta = torch.from_numpy(np.load(path, allow_pickle=False)), {}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict) or not isinstance(obj.get("centroids"), torch.Tensor):
                raise ValueError(f"{path}: not a KMeans file (no 'centroids' tensor)")
            centroids, meta = obj["centroids"], obj.get("meta", {})
        if centroids.ndim != 2 or not centroids.is_floating_point():
            raise ValueError(f"{path}: centroids must be a floating (K, D) array, got {centroids.dtype} "
                             f"{tuple(centroids.shape)}")
        if dim is not None and centroids.shape[1] != dim:
            raise ValueError(f"{path}: centroids have D={centroids.shape[1]}, but dim={dim} was asked for")
        if k is not None and centroids.shape[0] != k:
            raise ValueError(f"{path}: the file holds K={centroids.shape[0]} centroids, but k={k} was asked for")
        if not torch.isfinite(centroids).all():
            raise ValueError(f"{path}: centroids hold NaN or infinite values")
        km = cls(centroids.shape[0], iters=meta.get("iters", 0), seed=meta.get("seed", 1234),
                 init=meta["init"] if meta.get("init") in INITS else "random",
                 max_points_per_centroid=meta.get("max_points_per_centroid", 256))
        km.centroids, km.file_meta = centroids.float(), dict(meta)
        km.inertia, km.splits = list(meta.get("inertia", [])), list(meta.get("splits", []))
        km.sizes = None if meta.get("sizes") is None else torch.tensor(meta["sizes"])
        km.num_points, km.train_points = meta.get("num_points"), meta.get("train_points")
        return km
