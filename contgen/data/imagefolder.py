"""An ImageNet-layout folder (``root/<class>/<image>``) with MAR's augmentation: the ADM centre crop, a
random horizontal flip, and [-1, 1] scaling (main_mar.py:160-166)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion image_datasets.py): halve with a box filter while the short side is
    at least twice ``size``, resize the short side to ``size`` with bicubic, then cut the centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


class ImageFolder(Dataset):
    """Labels follow the sorted class-folder names. ``split`` picks ``root/<split>`` when that folder exists
    (``root=/data/imagenet split=train``); otherwise ``root`` itself holds the class folders. For the token cache
    build it with ``hflip=False``: :func:`~contgen.data.cached.cache_tokens` stores both views itself."""

    def __init__(self, root: str, image_size: int = 256, split: str | None = None, hflip: bool = True,
                 skip_bad_images: bool = False):
        base = Path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"data.root: no such folder: {root}")
        if split is not None and (base / split).is_dir():
            base = base / split
        elif split is not None and any((base / s).is_dir() for s in ("train", "val")):
            # a split layout without the requested split: reading root itself would make "train"/"val" the classes
            raise FileNotFoundError(f"data.root: {root} has split folders but no {split}/ folder (data.train.split)")
        self.root, self.image_size, self.hflip, self.skip_bad_images = str(root), image_size, hflip, skip_bad_images
        self.class_names = sorted(d.name for d in base.iterdir() if d.is_dir())
        self.samples = [(p, label) for label, name in enumerate(self.class_names)
                        for p in sorted((base / name).rglob("*")) if p.suffix.lower() in EXTENSIONS]
        if not self.samples:
            raise ValueError(f"data.root: no images ({', '.join(EXTENSIONS)}) in class folders under {base}")
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, path: Path) -> np.ndarray | None:
        """The centre-cropped RGB array, or None for a file that does not decode (named on stderr) when
        ``skip_bad_images``; otherwise a clear error naming the file."""
        try:
            with Image.open(path) as image:
                return center_crop_arr(image.convert("RGB"), self.image_size)
        except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified, truncated or corrupt files
            if not self.skip_bad_images:
                raise ValueError(f"data.root: cannot decode {path} ({e}); remove it, or set "
                                 "data.train.skip_bad_images=true to skip such files (each is named)") from e
            print(f"skipping {path}: cannot decode ({e})", file=sys.stderr)
            return None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for offset in range(len(self.samples)):  # a skipped file is replaced by the next one that decodes
            path, label = self.samples[(index + offset) % len(self.samples)]
            arr = self.decode(path)
            if arr is not None:
                break
        else:
            raise ValueError(f"data.root: no image under {self.root} decodes")
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1
        # the flip happens in the loader worker (whose torch RNG Lightning seeds per worker); the training step
        # itself draws everything from its per-step generator
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x, "label": torch.tensor(label)}
