"""Procedural class-conditional shapes: the built-in laptop data set.

Classes are (colour, shape) pairs on a black background; position and size vary per sample. Sample ``i`` of a
given (seed, split) is always the same image, because its random numbers come from a numpy Generator seeded by
``(seed, split, i)`` alone, so the data set needs no storage, no download and no worker-seeding care.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "cross")
# RGB in [-1, 1]; saturated primaries so colour alone separates them.
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
CLASS_NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # label = colour_index * len(SHAPES) + shape_index
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}
# Half-extent of a shape as a fraction of the image side: at 16 px the smallest shape spans ~8 px, still legible.
MIN_HALF, MAX_HALF = 0.25, 0.45


@lru_cache(maxsize=8)
def _subpixel_grid(image_size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centre coordinates (in pixel units, image spans [0, image_size]) of the supersampled grid."""
    n = image_size * supersample
    c = (np.arange(n, dtype=np.float32) + 0.5) / supersample
    return c[None, :], c[:, None]  # x (1, n), y (n, 1): broadcasting keeps the mask maths cheap


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of normalised coordinates (u right, v down; the shape fits in [-1, 1]^2)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.85  # area ~ circle's, so size does not give the class away
    if shape == "triangle":  # apex up at v=-1, base at v=0.85 with half-width 1
        return (v <= 0.85) & (au <= (v + 1.0) / 1.85)
    if shape == "cross":  # upright plus sign with arms 0.6 wide
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(label: int, rng: np.random.Generator, image_size: int = 32, supersample: int = 4) -> np.ndarray:
    """Render one sample of class ``label`` as float32 (3, image_size, image_size) in [-1, 1].

    Draws, in order, the half-extent r ~ U[MIN_HALF, MAX_HALF]*size and the centre ~ U[r, size-r]^2 (so the shape
    stays fully inside), then anti-aliases by averaging a ``supersample``-times finer membership mask.
    """
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label {label} out of range [0, {len(CLASS_NAMES)})")
    colour = np.asarray(list(COLOURS.values())[label // len(SHAPES)], dtype=np.float32)
    shape = SHAPES[label % len(SHAPES)]
    r = rng.uniform(MIN_HALF, MAX_HALF) * image_size
    cx, cy = rng.uniform(r, image_size - r, size=2)
    x, y = _subpixel_grid(image_size, supersample)
    mask = _inside(shape, (x - cx) / r, (y - cy) / r).astype(np.float32)
    alpha = mask.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))
    # Background is -1; blend towards the colour by coverage.
    return (-1.0 + alpha[None] * (colour[:, None, None] + 1.0)).astype(np.float32)


class Shapes(Dataset):
    """``len(CLASS_NAMES)`` = 12 classes (3 colours x 4 shapes), balanced: the label of sample i is i % 12.

    ``fresh_each_epoch``: the set is an endless stream of which each epoch reads the next ``num_samples`` images
    (the training sampler offsets its indices by epoch; any index >= 0 is a valid image). Rendering is cheap, so
    the built-in default never shows the model an image twice.
    """

    def __init__(self, image_size: int = 32, num_samples: int = 20000, seed: int = 0, split: str = "train",
                 supersample: int = 4, fresh_each_epoch: bool = False):
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"data.split: unknown split {split!r}; expected one of {list(SPLIT_OFFSETS)}")
        if image_size < 8:
            raise ValueError(f"data.image_size: {image_size} is too small for legible shapes (need >= 8)")
        if seed < 0:
            raise ValueError(f"data.seed: must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        if num_samples < 1:
            raise ValueError(f"data.num_samples: must be >= 1, got {num_samples}")
        self.image_size, self.num_samples, self.seed, self.split = image_size, num_samples, seed, split
        self.supersample, self.fresh_each_epoch = supersample, fresh_each_epoch
        self.class_names = list(CLASS_NAMES)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.fresh_each_epoch:  # the stream: image `index` exists for every index >= 0
            if index < 0:
                raise IndexError(f"index {index}: a fresh_each_epoch stream has only indices >= 0")
        elif -self.num_samples <= index < self.num_samples:
            index %= self.num_samples
        else:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, SPLIT_OFFSETS[self.split], index])
        image = render(label, rng, self.image_size, self.supersample)
        return {"image": torch.from_numpy(image), "label": torch.tensor(label, dtype=torch.int64)}
