"""WebDataset shards: pack → read back exactly, split over ranks × workers, bad shards named, resampled epochs,
resume, and a train.py run on shards."""

import csv
import io
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from contgen.data.cached import CachedTokens, cache_tokens
from contgen.data.imagefolder import ImageFolder
from contgen.data.shapes import Shapes
from contgen.data.webdataset import ShardError, WebDatasetShards, pack_shards
from contgen.tokenizers.patch import PatchTokenizer
from contgen.utils.images import to_uint8
from tests.helpers import TINY_MAR_HEAD_RUN, run_script

pytestmark = pytest.mark.usefixtures("one_thread")


def fingerprint(item: dict) -> tuple:
    """(label, exact bytes) of a sample: images as the 8-bit values a PNG stores, moments as float32."""
    data = to_uint8(item["image"]) if "image" in item else item["moments"]
    return int(item["label"]), data.numpy().tobytes()


@pytest.fixture
def shapes_shards(tmp_path):
    source = Shapes(16, 64, seed=0)
    return source, pack_shards(source, tmp_path / "shards", maxcount=8, progress=False)


def stream(shards, **kw) -> WebDatasetShards:
    return WebDatasetShards(str(shards), **{"batch_size": 4, "num_workers": 2, "hflip": False, **kw})


def test_round_trip_two_ranks_two_workers_each_sample_once_per_epoch(shapes_shards):
    source, out = shapes_shards
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-{k:06d}.tar" for k in range(8)]
    expected = Counter(fingerprint(source[i]) for i in range(len(source)))
    ds = stream(out)
    ds.set_rank(0, 2)
    orders = []
    for epoch in (0, 1):
        slots = {(r, w): [fingerprint(s) for s in ds.samples(epoch, r, w)] for r in (0, 1) for w in (0, 1)}
        assert Counter(x for s in slots.values() for x in s) == expected  # none lost, none twice, bytes exact
        assert len(slots[0, 0]) + len(slots[0, 1]) == len(slots[1, 0]) + len(slots[1, 1]) == 32
        orders.append(slots[0, 0])
    assert orders[0] != orders[1]  # a new shuffle each epoch
    again = stream(out)
    again.set_rank(0, 2)
    assert [fingerprint(s) for s in again.samples(1, 0, 0)] == orders[1]  # ... reproducible from the seed

    # the real DataLoader path: two worker processes of rank 1 read what the plan gives them
    loader = ds.loader(rank=1, world=2, epoch_fn=lambda: 1, pin_memory=False)
    got = [fingerprint({"image": x, "label": y}) for b in loader for x, y in zip(b["image"], b["label"])]
    assert len(loader) == 8 and Counter(got) == Counter(fingerprint(s) for w in (0, 1) for s in ds.samples(1, 1, w))


def test_round_trip_token_cache_and_image_folder(tmp_path):
    cache = CachedTokens(str(cache_tokens(Shapes(16, 12, seed=1), PatchTokenizer(16, 4), tmp_path / "cache",
                                          batch_size=6, shard_size=6, dtype="float16", progress=False)))
    ds = stream(pack_shards(cache, tmp_path / "tok", maxcount=5, progress=False), num_workers=0, batch_size=2)
    assert (ds.seq_len, ds.token_dim, ds.image_size, len(ds)) == (16, 48, 16, 12)
    assert Counter(fingerprint(s) for s in ds.samples(0, 0, 0)) == Counter(fingerprint(cache[i]) for i in range(12))

    for i, (cls, size, fmt) in enumerate((("ant", (40, 30), "PNG"), ("bee", (24, 48), "JPEG"), ("bee", (32, 32), "PNG"))):
        (tmp_path / "img" / cls).mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "img" / cls / f"{i}.{fmt.lower()}", format=fmt)
    folder = ImageFolder(str(tmp_path / "img"), image_size=16, hflip=False)
    out = pack_shards(folder, tmp_path / "folder", progress=False)
    assert tarfile.open(out / "shard-000000.tar").extractfile("000000001.jpeg").read() == folder.samples[1][0].read_bytes()
    with pytest.raises(ValueError, match="data.image_size: .* own sizes"):
        stream(out, num_workers=0, batch_size=1)
    ds = stream(out, num_workers=0, batch_size=1, image_size=16)
    assert Counter(fingerprint(s) for s in ds.samples(0, 0, 0)) == Counter(fingerprint(folder[i]) for i in range(3))


def rewrite_member(shard, name: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, content in members:
            content = data if m.name == name else content
            m.size = len(content)
            tar.addfile(m, io.BytesIO(content))


@pytest.mark.parametrize("damage", ["garbled_png", "truncated_tar", "garbled_header"])
def test_bad_shard_is_named_stop_raises_skip_counts(shapes_shards, damage, capfd):
    _, out = shapes_shards
    shard = out / "shard-000003.tar"
    if damage == "garbled_png":  # sample 27 = the 4th of shard 3
        rewrite_member(shard, "000000027.png", b"\x89PNG not really")
    elif damage == "truncated_tar":
        shard.write_bytes(shard.read_bytes()[:5 * 2048 + 700])  # inside sample 5 (a member: 512 B header + 512 B)
    else:  # a broken header mid-archive: Python's tarfile takes it for the end of the archive, silently
        raw = bytearray(shard.read_bytes())
        raw[2048:2560] = b"\x07" * 512  # the header of the 2nd sample's first member
        shard.write_bytes(bytes(raw))
    ds = stream(out, num_workers=0, batch_size=1, shuffle_buffer=1)
    ds.set_rank(0, 1)
    with pytest.raises(ShardError, match=r"shard-000003\.tar.*data\.train\.on_error=stop"):
        list(ds.samples(0, 0, 0))
    skipping = stream(out, num_workers=0, batch_size=1, shuffle_buffer=1, on_error="skip")
    capfd.readouterr()
    n = len(list(skipping.samples(0, 0, 0)))
    err = capfd.readouterr().err
    assert "skipping: data.shards: shard shard-000003.tar" in err and re.search(r"skipped \d+ bad sample", err)
    # the epoch still holds its 64 samples: the stream re-reads from its start rather than leave a rank short
    assert n == 64
    if damage == "garbled_png":
        assert "sample 000000027: " in err
    else:
        assert "of its 8 samples (meta.json): truncated or corrupt tar" in err


def test_resampled_epoch_length_and_seeding(shapes_shards):
    _, out = shapes_shards
    ds = stream(out, resampled=True, epoch_steps=5, num_workers=2, batch_size=3)
    ds.set_rank(0, 2)
    assert len(ds) == 5 * 3 * 2 and ds.worker_batches(0) == [[3, 2], [3, 2]]
    per_worker = [[fingerprint(s) for s in ds.samples(0, 1, w)] for w in (0, 1)]
    assert [len(p) for p in per_worker] == [9, 6]
    assert [fingerprint(s) for s in ds.samples(0, 1, 0)] == per_worker[0]  # the same (seed, epoch, rank, worker)
    assert [fingerprint(s) for s in ds.samples(1, 1, 0)] != per_worker[0]  # a new epoch draws anew
    single = stream(out, resampled=True, epoch_steps=5, num_workers=0, batch_size=3)
    loader = single.loader(rank=0, world=1, epoch_fn=lambda: 0, pin_memory=False)
    assert len(loader) == 5 and [len(b["label"]) for b in loader] == [3] * 5
    with pytest.raises(ValueError, match="data.train.epoch_steps"):
        stream(out, resampled=True)


def test_resume_skips_the_consumed_batches_and_uneven_shards_stay_in_lockstep(shapes_shards, tmp_path):
    _, out = shapes_shards
    ds = stream(out, num_workers=0)
    full = [fingerprint(s) for s in ds.samples(0, 0, 0)]
    ds.resume_at(0, 3 * 4)  # 3 batches of 4 done
    assert [fingerprint(s) for s in ds] == full[12:]
    assert [fingerprint(s) for s in ds] == full  # once only
    assert ds.skipped_batches([3, 1], 3) == [2, 1] and ds.skipped_batches([2, 2], 3) == [2, 1]

    uneven = stream(pack_shards(Shapes(16, 50), tmp_path / "uneven", maxcount=8, progress=False), batch_size=4)
    uneven.set_rank(0, 2)  # 7 shards (the last of 2 samples) over 2 ranks × 2 workers
    for epoch in range(4):
        assert len({sum(b) for b in uneven.worker_batches(epoch)}) == 1
    with pytest.raises(ValueError, match="data.batch_size=64 .* maxcount"):
        stream(out, batch_size=64).worker_batches(0)


@pytest.mark.slow  # ~15 s: keeps make test under ~10 min (CI runs the slow tier too)
def test_train_on_shards_end_to_end(tmp_path):
    shards = tmp_path / "shards"
    run_script("pack_shards.py", "data=shapes", "data.image_size=16", "data.train.num_samples=64", "maxcount=16",
               f"out={shards}", "threads=1", f"hydra.run.dir={tmp_path / 'pack'}")
    tiny = [o for o in TINY_MAR_HEAD_RUN if not o.startswith("data.train.num_samples")]
    run = tmp_path / "run"
    proc = run_script("train.py", "data=webdataset", f"data.shards='{shards}/shard-{{000000..000002}}.tar'", *tiny,
                      "data.train.shuffle_buffer=8", "evaluate_after_fit=false", "threads=1", f"hydra.run.dir={run}")
    assert (run / "checkpoints" / "last.ckpt").is_file(), proc.stdout[-2000:]
    with open(run / "csv" / "metrics.csv") as f:  # 3 shards × 16 samples = 3 batches of 16: one epoch of 3 steps
        assert len([r for r in csv.DictReader(f) if r.get("train/loss")]) == 3
