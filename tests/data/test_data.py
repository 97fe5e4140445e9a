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


def test_epoch_sampler_deals_the_epoch_out_to_ranks_and_resumes_on_another_world_size():
    """Every optimizer step (global batch 8 = 8 x 1 = 4 x 2 = 2 x 4) holds the same samples whatever the rank count;
    a run that consumed 3 steps on 2 ranks continues on 4 ranks (or 1) with step 4 of the 1-rank order; no sample is
    lost or seen twice within the epoch, and every rank runs the same number of batches."""
    def steps(world: int, skip: int = 0) -> list[set[int]]:
        ranks = []
        for r in range(world):
            s = EpochSampler(42, seed=3)
            s.set_epoch(2)
            s.set_rank(r, world)
            if skip:
                s.resume_at(2, skip)
            ranks.append(list(s))
        assert len({len(x) for x in ranks}) == 1  # the same number of samples (so of steps) on every rank
        per = 8 // world
        return [set().union(*(x[j * per:(j + 1) * per] for x in ranks)) for j in range(len(ranks[0]) // per)]

    one = steps(1)
    assert len(one) == 5 and len(set().union(*one)) == 40
    assert steps(2) == steps(4) == steps(8) == one
    assert steps(4, skip=3 * 8) == steps(1, skip=3 * 8) == one[3:]
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        EpochSampler(4).set_rank(2, 2)


def test_fresh_shapes_stream_new_images_every_epoch_and_resume_exactly():
    """fresh_each_epoch: epoch e reads images e·n … e·n + n − 1 of the endless stream (none seen twice), in an order
    that still depends only on (seed, e), so a mid-epoch resume skips into the same batches."""
    from contgen.modules.datamodule import DataModule

    shapes = Shapes(16, 24, seed=0, fresh_each_epoch=True)
    assert torch.equal(shapes[30]["image"], Shapes(16, 48, seed=0)[30]["image"])  # image i is image i of the set
    with pytest.raises(IndexError, match=">= 0"):
        shapes[-1]
    with pytest.raises(IndexError, match="out of range"):
        Shapes(16, 24, seed=0)[24]  # without the stream, 24 samples are all there is
    sampler = DataModule(shapes, batch_size=8, num_workers=0).sampler
    epochs = []
    for e in range(3):
        sampler.set_epoch(e)
        epochs.append(list(sampler))
        assert sorted(epochs[-1]) == list(range(24 * e, 24 * (e + 1)))
    again = DataModule(shapes, batch_size=8, num_workers=0).sampler
    again.set_epoch(2), again.resume_at(2, 8)
    assert list(again) == epochs[2][8:]
    assert not DataModule(Shapes(16, 24), batch_size=8, num_workers=0).sampler.stream  # a plain set repeats


def test_shapes_fast_and_separable_by_a_tiny_cnn():
    import time

    t = time.perf_counter()
    train = Shapes(16, 1200, seed=0, split="train")
    x, y = torch.stack([train[i]["image"] for i in range(1200)]), torch.stack([train[i]["label"] for i in range(1200)])
    # 1200 samples take ~0.3 s on a dev box (budget: 1000 at 32 px < 1 s); the bound leaves room for slow CI cores
    assert time.perf_counter() - t < 5
    val = Shapes(16, 240, seed=0, split="val")
    xv, yv = torch.stack([val[i]["image"] for i in range(240)]), torch.stack([val[i]["label"] for i in range(240)])
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                        nn.Linear(32, 12))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i: i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    with torch.no_grad():
        acc = (net(xv).argmax(1) == yv).float().mean().item()
    # chance is 1/12; unambiguous classes reach 1.0 here after 6-8 epochs at 16 px, the hardest resolution
    assert acc >= 0.95


def test_digits_split_disjoint_and_deterministic():
    train, val = Digits(8, "train"), Digits(8, "val")
    rows = {img.numpy().tobytes() for img in train.images}  # the 1797 digit images are pairwise distinct
    assert not any(img.numpy().tobytes() in rows for img in val.images)
    assert torch.equal(Digits(8, "val").images, val.images) and not torch.equal(Digits(8, "val", seed=1).images, val.images)
    assert Digits(32, "val")[0]["image"].shape == (3, 32, 32)


def test_imagefolder_split_layout(tmp_path):
    _image_tree(tmp_path / "train")
    ds = ImageFolder(str(tmp_path), image_size=16, split="train")
    assert ds.class_names == ["ant", "bee"] and len(ds) == 2
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        ImageFolder(str(tmp_path), image_size=16, split="val")  # not silently reading train/ as a class


def test_cache_guards_corrupt_shard_and_pickling(tmp_path):
    import pickle

    tok = PatchTokenizer(16, 4)
    with pytest.raises(ValueError, match="dtype"):
        cache_tokens(Shapes(16, 8), tok, tmp_path / "a", dtype="bfloat16", progress=False)
    _image_tree(tmp_path / "imgs")
    with pytest.raises(ValueError, match="hflip=False"):
        cache_tokens(ImageFolder(str(tmp_path / "imgs"), 16, hflip=True), tok, tmp_path / "b", progress=False)
    out = cache_tokens(Shapes(16, 8), tok, tmp_path / "c", batch_size=4, dtype="float16", progress=False)
    cached = CachedTokens(str(out))
    assert cached.moments[0].dtype == np.float16 and cached[3]["moments"].dtype == torch.float32
    assert torch.allclose(cached[3]["moments"][0], tok.moments(Shapes(16, 8)[3]["image"][None])[0], atol=1e-3)
    clone = pickle.loads(pickle.dumps(cached))  # what a "spawn" DataLoader worker receives
    assert len(pickle.dumps(cached)) < 4096 and isinstance(clone.moments[0], np.memmap)
    assert torch.equal(clone[5]["moments"], cached[5]["moments"])
    shard = out / "moments_00000.npy"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, as by a full disk
    with pytest.raises(ValueError, match="data.root: unreadable shard moments_00000.npy"):
        CachedTokens(str(out))


def test_digits_repeat_makes_an_epoch_of_several_passes():
    once, four = Digits(16), Digits(16, repeat=4)
    assert len(four) == 4 * len(once)
    assert torch.equal(four[len(once) + 5]["image"], once[5]["image"]) and four[len(once) + 5]["label"] == once[5]["label"]
    with pytest.raises(ValueError, match="data.train.repeat must be >= 1"):
        Digits(16, repeat=0)
