"""WebDataset tar shards: :func:`pack_shards` writes a data set into them, :class:`WebDatasetShards` streams them.

Layout of a shard folder: ``shard-000000.tar``, … and ``meta.json`` (written last: a folder without it is
incomplete), which lists every shard with its sample count. A sample is ``<key>.cls`` (the label as text) and either
the image (``<key>.png`` for built-in sets, quantised to 8 bits like any exported image; an image folder's original
file bytes, ``<key>.jpg`` etc.) or ``<key>.moments.npy`` (a token cache's (2, L, M) moments, in the cache's dtype).

Reading is deterministic from (seed, epoch, rank, loader worker). Without resampling, every epoch deals a shuffled
shard list out to the ranks, then to each rank's loader workers, so the ranks read disjoint samples; each worker
yields whole batches, trimmed so that every rank gets the same number of batches (DDP steps in lockstep). With
resampling, every worker draws shards with replacement and an epoch is ``epoch_steps`` batches per rank.

The shard sample counts of meta.json are checked as each shard is read: a truncated tar or a garbled tar header
(which Python's tarfile takes for the end of the archive) is reported by its shard name, like an undecodable sample.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from contgen.data.cached import read_store_meta
from contgen.data.imagefolder import EXTENSIONS, center_crop_arr

FORMAT_VERSION = 1
ON_ERROR = ("skip", "stop")
IMAGE_FIELDS = tuple(e.lstrip(".") for e in EXTENSIONS)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _samples(dataset: Dataset):
    """(kind, fields of one sample, without __key__) for each sample of ``dataset``, in order."""
    from contgen.data.cached import CachedTokens
    from contgen.data.imagefolder import ImageFolder

    if isinstance(dataset, CachedTokens):
        for moments, labels in zip(dataset.moments, dataset.labels):
            for m, label in zip(moments, labels):
                buf = io.BytesIO()
                np.save(buf, np.asarray(m))  # the cache's dtype: float16 caches stay half the size
                yield {"moments.npy": buf.getvalue(), "cls": str(int(label))}
    elif isinstance(dataset, ImageFolder):  # the original files: no re-encoding, the loader crops at train time
        for path, label in dataset.samples:
            yield {path.suffix.lower().lstrip("."): path.read_bytes(), "cls": str(label)}
    else:
        from contgen.utils.images import to_uint8

        for i in range(len(dataset)):
            item = dataset[i]
            buf = io.BytesIO()
            Image.fromarray(to_uint8(item["image"]).permute(1, 2, 0).numpy()).save(buf, format="PNG")
            yield {"png": buf.getvalue(), "cls": str(int(item["label"]))}


def pack_shards(dataset: Dataset, out_dir: str | Path, maxcount: int = 1000, source: dict | None = None,
                progress: bool = True) -> Path:
    """Write every sample of ``dataset`` (built without random flips: the loader flips) into ``shard-%06d.tar``
    files of ``maxcount`` samples, then ``meta.json``. ``source``: the data set's config, recorded in meta.json."""
    from contgen.data.cached import CachedTokens, new_store

    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    out = new_store(dataset, out_dir, "pack_shards", "build it with hflip=False (data.train.hflip of the "
                    "webdataset config flips at load time)")
    shards: list[dict] = []
    writer = wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=maxcount, verbose=0,
                             post=lambda fname: shards.append({"name": Path(fname).name, "num_samples": writer.count}))
    items = _samples(dataset)
    if progress:
        from contgen.cli.console import progress as track

        items = track(items, f"packing {len(dataset)} samples", total=len(dataset))
    with writer:
        for i, fields in enumerate(items):
            writer.write({"__key__": f"{i:09d}", **fields})
    meta = {"format_version": FORMAT_VERSION, "num_samples": sum(s["num_samples"] for s in shards),
            "num_classes": dataset.num_classes, "class_names": list(dataset.class_names), "shards": shards,
            "source": source or {}}
    if isinstance(dataset, CachedTokens):
        meta.update(holds="tokens", **{k: dataset.meta[k] for k in ("seq_len", "moment_dim", "token_dim",
                                                                      "image_size", "dtype", "tokenizer")})
    else:  # an image folder's files keep their own sizes: the loader crops them to data.image_size
        meta.update(holds="images", image_size=None if hasattr(dataset, "samples") else dataset.image_size)
    _write_json_atomic(out / "meta.json", meta)
    return out


def resolve_shards(shards: str) -> tuple[dict, list[tuple[str, int]]]:
    """``data.shards`` — a shard folder, its meta.json, or shards in one folder as a path or brace pattern
    (``/d/shard-{000000..000009}.tar``) — as (meta.json, [(shard path, sample count)])."""
    path = Path(str(shards))
    folder = path if path.is_dir() else path.parent
    meta = read_store_meta(folder, f"data.shards={shards}", "pack_shards.py", FORMAT_VERSION)
    counts = {s["name"]: s["num_samples"] for s in meta["shards"]}
    if path.is_dir() or path.name == "meta.json":
        names = list(counts)
    else:
        names = [Path(u).name for u in wds.shardlists.expand_urls(str(shards))]
        if unknown := [n for n in names if n not in counts]:
            raise ValueError(f"data.shards: {unknown[:3]} not listed in {folder / 'meta.json'}")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"data.shards: {len(missing)} shard(s) listed in {folder / 'meta.json'} are missing, "
                                f"e.g. {folder / missing[0]}")
    return meta, [(str(folder / n), counts[n]) for n in names]


class ShardError(ValueError):
    """A sample or shard that cannot be read, under ``data.train.on_error=stop``."""


class WebDatasetShards(IterableDataset):
    """Streams samples ({"image"} or {"moments"}, with {"label"}) from shards written by :func:`pack_shards`.

    The DataModule treats it as its own sampler: ``set_epoch``, ``set_rank`` and ``resume_at`` as
    :class:`~contgen.data.sampling.EpochSampler` has them. ``len()`` is the samples of one epoch over all ranks
    (resampled: ``epoch_steps × batch_size × world size``)."""

    def __init__(self, shards: str, batch_size: int, num_workers: int, image_size: int | None = None, seed: int = 0,
                 resampled: bool = False, epoch_steps: int | None = None, shuffle_buffer: int = 1000,
                 hflip: bool = True, on_error: str = "stop"):
        if on_error not in ON_ERROR:
            raise ValueError(f"data.train.on_error must be one of {ON_ERROR}, got {on_error!r}")
        if resampled and (epoch_steps is None or epoch_steps < 1):
            raise ValueError(f"data.train.epoch_steps must be >= 1 with data.train.resampled=true, got {epoch_steps}")
        if not resampled and epoch_steps is not None:
            raise ValueError("data.train.epoch_steps is for data.train.resampled=true; without resampling an epoch "
                             "is one pass over the shards (set data.train.epoch_steps=null)")
        if shuffle_buffer < 1:
            raise ValueError(f"data.train.shuffle_buffer must be >= 1 (1 = no shuffling), got {shuffle_buffer}")
        self.meta, self.shard_list = resolve_shards(shards)
        self.holds = self.meta["holds"]
        fixed = self.meta["image_size"]
        if fixed is not None and image_size not in (None, fixed):
            raise ValueError(f"data.image_size={image_size} but the shards in {shards} hold {fixed}-px "
                             f"{self.holds} (meta.json); set data.image_size=null or {fixed}")
        if fixed is None and image_size is None:
            raise ValueError(f"data.image_size: the shards in {shards} hold image files of their own sizes; "
                             "set the size to crop them to (data.image_size=256)")
        self.image_size = fixed or image_size
        if self.holds == "tokens":
            self.seq_len, self.moment_dim, self.token_dim = (self.meta[k]
                                                             for k in ("seq_len", "moment_dim", "token_dim"))
        self.num_classes, self.class_names = self.meta["num_classes"], self.meta["class_names"]
        self.shards, self.batch_size, self.num_workers, self.seed = str(shards), batch_size, num_workers, seed
        self.resampled, self.epoch_steps, self.shuffle_buffer = resampled, epoch_steps, shuffle_buffer
        self.hflip, self.on_error = hflip and self.holds == "images", on_error
        self.epoch, self.rank, self.world = 0, *wds.utils.pytorch_worker_info()[:2]
        self._skip: tuple[int, int] | None = None

    # --- the EpochSampler interface the DataModule drives
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_rank(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Skip the first ``consumed`` samples (all ranks together) of ``epoch`` once: a resumed run continues with
        the batches the uninterrupted one would have seen (exactly, unless skipped bad samples were among them)."""
        self._skip = (epoch, consumed)

    def __len__(self) -> int:
        if self.resampled:
            return self.epoch_steps * self.batch_size * self.world
        return sum(n for _, n in self.shard_list)

    # --- the plan of an epoch: which shards each (rank, worker) reads and how many batches it yields
    def worker_batches(self, epoch: int) -> list[list[int]]:
        """Batches per [rank][worker] in ``epoch``: equal totals per rank, so no rank waits for another at the end."""
        nw = max(1, self.num_workers)
        if self.resampled:
            return [[self.epoch_steps // nw + (w < self.epoch_steps % nw) for w in range(nw)]] * self.world
        per_slot = [[sum(n for _, n in self.assigned(epoch, r, w)) // self.batch_size for w in range(nw)]
                    for r in range(self.world)]
        target = min(sum(b) for b in per_slot)
        if target == 0:
            raise ValueError(f"data.shards: {len(self.shard_list)} shard(s) give some rank no full batch of "
                             f"data.batch_size={self.batch_size} over {self.world} rank(s) × {nw} loader worker(s); "
                             "pack smaller shards (pack_shards.py maxcount=...) or use fewer data.num_workers")
        for b in per_slot:  # trim the fullest workers first until the rank holds `target` batches
            while sum(b) > target:
                b[b.index(max(b))] -= 1
        return per_slot

    def assigned(self, epoch: int, rank: int, worker: int) -> list[tuple[str, int]]:
        """The shards of (rank, worker) in a non-resampled epoch: one shuffled list, dealt to ranks, then workers."""
        order = list(self.shard_list)
        random.Random(wds.utils.make_seed(self.seed, epoch)).shuffle(order)
        return order[rank::self.world][worker::max(1, self.num_workers)]

    def skipped_batches(self, batches: list[int], done: int) -> list[int]:
        """Batches each worker had delivered when the rank had consumed ``done``: the DataLoader takes batches from
        its workers in turn, passing over those that are exhausted."""
        taken, w = [0] * len(batches), 0
        for _ in range(min(done, sum(batches))):
            while taken[w] >= batches[w]:
                w = (w + 1) % len(batches)
            taken[w] += 1
            w = (w + 1) % len(batches)
        return taken

    def __iter__(self):
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw != max(1, self.num_workers):
            raise ValueError(f"data.num_workers={self.num_workers} but the DataLoader runs {nw} worker(s)")
        skip = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            done = self._skip[1] // (self.batch_size * self.world)
            skip = self.skipped_batches(self.worker_batches(self.epoch)[self.rank], done)[worker] * self.batch_size
        self._skip = None
        return self.samples(self.epoch, self.rank, worker, skip)

    def samples(self, epoch: int, rank: int, worker: int, skip: int = 0):
        """The stream of one (rank, loader worker) in ``epoch``, after the first ``skip`` samples."""
        quota = self.worker_batches(epoch)[rank][worker] * self.batch_size
        if quota <= skip:  # DataPipeline.with_epoch(0) would not stop
            return
        rng = random.Random(wds.utils.make_seed(self.seed, epoch, rank, worker))
        if self.resampled:
            shards = ({"url": u, "count": n} for u, n in iter(lambda: rng.choice(self.shard_list), None))
        else:
            shards = [{"url": u, "count": n} for u, n in self.assigned(epoch, rank, worker)]
        errors = ErrorLog(self.on_error, f"rank {rank} worker {worker} epoch {epoch}")
        pipeline = wds.DataPipeline(
            lambda: iter(shards),
            lambda src: read_shards(src, errors),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng),
            # the flip is drawn before a resume skips samples, so a resumed epoch flips as the uninterrupted one
            lambda src: ({**s, "__flip__": self.hflip and rng.random() < 0.5} for s in src),
            lambda src: islice(src, skip, None),
            lambda src: filter(None, (self.decode(s, errors) for s in src)),
        ).with_epoch(quota - skip)  # a worker short of samples (bad ones skipped) wraps around rather than hang DDP
        yield from pipeline
        errors.summary()

    def decode(self, sample: dict, errors: ErrorLog) -> dict | None:
        try:
            label = int(sample["cls"])
            if not 0 <= label < self.num_classes:
                raise ValueError(f"label {label} outside [0, {self.num_classes})")
            if self.holds == "tokens":
                moments = np.load(io.BytesIO(sample["moments.npy"]), allow_pickle=False)
                return {"moments": torch.from_numpy(moments.astype(np.float32)), "label": torch.tensor(label)}
            field = next((f for f in IMAGE_FIELDS if f in sample), None)
            if field is None:
                raise KeyError(f"no image ({', '.join(IMAGE_FIELDS)}) among {sorted(k for k in sample if k[0] != '_')}")
            with Image.open(io.BytesIO(sample[field])) as image:
                arr = center_crop_arr(image.convert("RGB"), self.image_size)
        except (KeyError, ValueError, OSError, SyntaxError) as err:  # PIL: unidentified, truncated, corrupt files
            errors.report(sample["__url__"], f"sample {sample['__key__']}: {type(err).__name__}: {err}")
            return None
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1
        return {"image": x.flip(-1) if sample["__flip__"] else x, "label": torch.tensor(label)}

    def loader(self, rank: int, world: int, epoch_fn, pin_memory: bool) -> "ShardLoader":
        self.set_rank(rank, world)
        return ShardLoader(self, epoch_fn, batch_size=self.batch_size, num_workers=self.num_workers,
                           drop_last=True, pin_memory=pin_memory)


class ErrorLog:
    """Bad samples and shards of one worker's epoch: each named on stderr (skip), or the first one raised (stop)."""

    def __init__(self, on_error: str, where: str):
        self.on_error, self.where, self.count = on_error, where, 0

    def report(self, url: str, what: str) -> None:
        message = f"data.shards: shard {Path(url).name} ({url}): {what}"
        if self.on_error == "stop":
            raise ShardError(f"{message} — data.train.on_error=stop; set data.train.on_error=skip to skip such "
                             "samples (each is named)")
        self.count += 1
        print(f"skipping: {message} [{self.count} skipped, {self.where}]", file=sys.stderr, flush=True)

    def summary(self) -> None:
        if self.count:
            print(f"data.shards: skipped {self.count} bad sample(s)/shard(s) in {self.where}", file=sys.stderr)


def read_shards(shards, errors: ErrorLog):
    """Samples (dicts of raw fields, with ``__key__`` and ``__url__``) of each shard in turn; a shard that ends
    before the count of meta.json or raises is reported by name."""
    for shard in shards:
        url, count, n, err = shard["url"], shard["count"], 0, None
        try:
            with tarfile.open(url, mode="r|") as tar:
                sample: dict = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, field = member.name.partition(".")
                    if sample and key != sample["__key__"]:
                        yield sample
                        n += 1
                        sample = {}
                    sample.setdefault("__key__", key)
                    sample.update({"__url__": url, field: tar.extractfile(member).read()})
            if sample:
                yield sample
                n += 1
        except (OSError, tarfile.TarError) as e:
            err = e
        if err is not None or n != count:
            errors.report(url, f"read {n} of its {count} samples (meta.json): truncated or corrupt tar"
                               + (f" ({type(err).__name__}: {err})" if err else ""))


class ShardLoader(DataLoader):
    """A DataLoader over :class:`WebDatasetShards` that hands the stream the trainer's epoch as each epoch starts
    (Lightning calls ``set_epoch`` only on samplers, which an iterable data set has none of) and knows its length
    in batches of this rank. Workers restart every epoch, so they see the new epoch."""

    def __init__(self, dataset: WebDatasetShards, epoch_fn, **kwargs):
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self):
        self.dataset.set_epoch(self.epoch_fn())
        return super().__iter__()

    def __len__(self) -> int:
        return sum(self.dataset.worker_batches(self.dataset.epoch)[self.dataset.rank])

    # the position in the epoch is restored by DataModule.load_state_dict → WebDatasetShards.resume_at
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
