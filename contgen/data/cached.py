"""The token cache: tokenizer posterior moments of every image and of its horizontal flip, computed once
(MAR's main_cache.py) and stored as sharded, memory-mappable ``.npy`` arrays instead of one ``.npz`` per image.

Layout of ``root``: ``moments_00000.npy`` (n, 2, L, M) [view 0 = image, view 1 = its h-flip],
``labels_00000.npy`` (n,), …, and ``meta.json``, written last: a cache without it is incomplete.
Training picks one view per sample and samples the posterior on the device (``TokenARModule``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "int32")  # int32: a tokenizer whose moments are its token ids (``id_moments``:
# tokenizer=digit_kmeans), read back as float32 like moments (exact below 2^24), made int64 by its ``sample``


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def new_store(dataset: Dataset, out_dir: str | Path, command: str, flip_note: str) -> Path:
    """The folder a store of ``dataset`` (a token cache, WebDataset shards) is written to: the data set must not
    random-flip (``flip_note`` says why and what to do), and a folder holding a complete store (its meta.json) is
    never written over."""
    if getattr(dataset, "hflip", False):
        raise ValueError(f"{command}: the data set random-flips (hflip=True), {flip_note}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "meta.json").exists():
        raise FileExistsError(f"out: {out} already holds a complete store (meta.json); choose another folder")
    return out


def read_store_meta(folder: str | Path, key: str, command: str, version: int) -> dict:
    """The meta.json of a complete store (``command`` writes it last) in the format this contgen reads; ``key``: the
    config setting that points at it."""
    meta_path = Path(folder) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{key}: {folder} holds no complete store (no meta.json; {command} writes it last, an "
                                f"interrupted run leaves none) — run {command} first")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != version:
        raise ValueError(f"{key}: store format {meta.get('format_version')} in {meta_path}, this contgen reads "
                         f"{version}; re-run {command}")
    return meta


@torch.no_grad()
def cache_tokens(dataset: Dataset, tokenizer, out_dir: str | Path, batch_size: int = 64, shard_size: int = 65536,
                 dtype: str = "float32", num_workers: int = 0, device: str | torch.device = "cpu",
                 tokenizer_info: dict | None = None, progress: bool = True) -> Path:
    """Encode every image of ``dataset`` (which must not random-flip: pass ``hflip=False``) and its flip."""
    ids = getattr(tokenizer, "id_moments", False)
    if dtype not in DTYPES or (dtype == "int32") != ids:
        want = "int32 (the tokenizer's moments are token ids)" if ids else "float32 or float16"
        raise ValueError(f"dtype: {dtype!r} is not a cache dtype for {type(tokenizer).__name__}; expected {want}")
    out = new_store(dataset, out_dir, "cache_tokens", "which would corrupt view 0; build it with hflip=False (the "
                    "cache stores the image and its flip itself)")
    tokenizer = tokenizer.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    shard_sizes, buffer, labels, total = [], [], [], 0

    def flush() -> None:
        k = len(shard_sizes)
        _save_atomic(out / f"moments_{k:05d}.npy", np.concatenate(buffer).astype(dtype))
        _save_atomic(out / f"labels_{k:05d}.npy", np.concatenate(labels).astype(np.int64))
        shard_sizes.append(sum(len(b) for b in buffer))
        buffer.clear(), labels.clear()

    from contgen.cli.console import progress as track

    for batch in (track(loader, f"caching tokens of {len(dataset)} images (batches)") if progress else loader):
        image = batch["image"].to(device)
        both = torch.stack([tokenizer.moments(image), tokenizer.moments(image.flip(-1))], dim=1)
        buffer.append(both.float().cpu().numpy())
        labels.append(batch["label"].numpy())
        total += len(image)
        if sum(len(b) for b in buffer) >= shard_size:
            flush()
    if buffer:
        flush()
    meta = {"format_version": FORMAT_VERSION, "num_samples": total, "shard_sizes": shard_sizes,
            "seq_len": tokenizer.seq_len, "moment_dim": tokenizer.moment_dim, "token_dim": tokenizer.token_dim,
            "image_size": tokenizer.image_size, "num_classes": dataset.num_classes,
            "class_names": list(dataset.class_names), "dtype": dtype, "tokenizer": tokenizer_info or {}}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")
    return out


class CachedTokens(Dataset):
    """Reads a cache written by :func:`cache_tokens`; shards are memory-mapped, nothing is loaded up front."""

    def __init__(self, root: str):
        self.root = str(root)
        self.meta = meta = read_store_meta(root, f"data.root={root}", "cache_tokens.py", FORMAT_VERSION)
        for key in ("num_classes", "class_names", "seq_len", "moment_dim", "token_dim", "image_size"):
            setattr(self, key, meta[key])
        self.moments, self.labels = self._open()
        self.offsets = np.cumsum([0] + meta["shard_sizes"])

    def _open(self) -> tuple[list[np.memmap], list[np.memmap]]:
        """Memory-map every shard, checking its header against meta.json (a truncated or foreign shard fails here)."""
        moments, labels = [], []
        for k, n in enumerate(self.meta["shard_sizes"]):
            for name, shape, arrays in ((f"moments_{k:05d}.npy", (n, 2, self.seq_len, self.moment_dim), moments),
                                        (f"labels_{k:05d}.npy", (n,), labels)):
                try:
                    arrays.append(np.load(Path(self.root) / name, mmap_mode="r"))
                except (OSError, ValueError) as err:
                    raise ValueError(f"data.root: unreadable shard {name} in {self.root} ({err}); "
                                     "re-run cache_tokens.py") from err
                if arrays[-1].shape != shape:
                    raise ValueError(f"data.root: shard {name} in {self.root} has shape {arrays[-1].shape}, "
                                     f"meta.json says {shape}; re-run cache_tokens.py")
        return moments, labels

    # Pickling a memmap copies its whole content; DataLoader workers started with "spawn" (the macOS default)
    # pickle the data set, so ship only the paths and map the shards again in the worker.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "moments": None, "labels": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.moments, self.labels = self._open()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached samples")
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        i = index - int(self.offsets[shard])
        return {"moments": torch.from_numpy(np.array(self.moments[shard][i], dtype=np.float32)),
                "label": torch.tensor(int(self.labels[shard][i]))}
