import json

import numpy as np
import pytest
import torch
from PIL import Image

from contgen.data.cached import CachedTokens, cache_tokens
from contgen.data.digits import Digits
from contgen.data.imagefolder import ImageFolder, center_crop_arr
from contgen.data.sampling import EpochSampler
from contgen.data.shapes import Shapes
from contgen.tokenizers.patch import PatchTokenizer


@pytest.mark.parametrize("size", [16, 32, 48])
def test_shapes_deterministic_balanced_in_range(size):
    a, b, other = Shapes(size, 48, seed=0), Shapes(size, 48, seed=0), Shapes(size, 48, seed=1)
    x = torch.stack([a[i]["image"] for i in range(48)])
    assert x.shape == (48, 3, size, size) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(a[5]["image"], b[5]["image"]) and not torch.equal(a[5]["image"], other[5]["image"])
    assert torch.bincount(torch.stack([a[i]["label"] for i in range(48)])).tolist() == [4] * 12
    assert a.num_classes == 12 and len(a.class_names) == 12


def test_shapes_splits_differ():
    assert not torch.equal(Shapes(16, 4, split="train")[0]["image"], Shapes(16, 4, split="val")[0]["image"])


def test_digits_split_and_range():
    train, val = Digits(16, "train"), Digits(16, "val")
    assert len(train) + len(val) == 1797 and abs(len(val) - 180) < 10
    assert train[0]["image"].shape == (3, 16, 16) and train.images.min() >= -1 and train.images.max() <= 1
    assert set(val.labels.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        Digits(16, "test")


def _image_tree(root, sizes=((300, 200), (64, 96))):
    for cls, (w, h) in zip(("ant", "bee"), sizes):
        (root / cls).mkdir(parents=True)
        arr = np.zeros((h, w, 3), np.uint8)
        arr[:, : w // 2] = 255  # left half white: shows whether a flip happened
        Image.fromarray(arr).save(root / cls / "a.png")


def test_imagefolder_crop_labels_flip(tmp_path):
    _image_tree(tmp_path)
    ds = ImageFolder(str(tmp_path), image_size=32, hflip=False)
    assert ds.class_names == ["ant", "bee"] and [ds[i]["label"].item() for i in range(2)] == [0, 1]
    x = ds[0]["image"]
    assert x.shape == (3, 32, 32) and x[:, :, 0].mean() > 0.9 and x[:, :, -1].mean() < -0.9
    assert center_crop_arr(Image.new("RGB", (1000, 300)), 64).shape == (64, 64, 3)
    flipped = ImageFolder(str(tmp_path), image_size=32, hflip=True)
    torch.manual_seed(0)
    lefts = {flipped[0]["image"][:, :, 0].mean().item() > 0 for _ in range(20)}
    assert lefts == {True, False}  # both orientations appear


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        ImageFolder(str(tmp_path / "nope"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="data.root: no images"):
        ImageFolder(str(tmp_path / "empty"))


def test_cache_round_trip_memory_mapped(tmp_path):
    ds, tok = Shapes(16, 40, seed=3), PatchTokenizer(image_size=16, patch_size=4)
    out = cache_tokens(ds, tok, tmp_path / "cache", batch_size=16, shard_size=16, progress=False)
    cached = CachedTokens(str(out))
    assert len(cached) == 40 and len(cached.meta["shard_sizes"]) == 3 and cached.num_classes == 12
    assert isinstance(cached.moments[0], np.memmap)
    for i in (0, 17, 39):
        item = cached[i]
        image = ds[i]["image"][None]
        assert torch.equal(item["moments"][0], tok.moments(image)[0])
        assert torch.equal(item["moments"][1], tok.moments(image.flip(-1))[0])
        assert item["label"] == ds[i]["label"]
    with pytest.raises(FileExistsError):
        cache_tokens(ds, tok, out, progress=False)


def test_incomplete_cache_is_a_clear_error(tmp_path):
    out = cache_tokens(Shapes(16, 8), PatchTokenizer(16, 4), tmp_path / "c", batch_size=8, progress=False)
    (out / "meta.json").unlink()  # as after an interrupted run
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        CachedTokens(str(out))
    (out / "meta.json").write_text(json.dumps({"format_version": 0}))
    with pytest.raises(ValueError, match="format"):
        CachedTokens(str(out))


def test_epoch_sampler_deterministic_and_resumable():
    a, b = EpochSampler(20, seed=1), EpochSampler(20, seed=1)
    a.set_epoch(3), b.set_epoch(3)
    first = list(a)
    assert first == list(b) and sorted(first) == list(range(20))
    a.set_epoch(4)
    assert list(a) != first
    b.resume_at(3, 8)  # skip the 8 samples already consumed in epoch 3, once
    assert list(b) == first[8:] and list(b) == first
