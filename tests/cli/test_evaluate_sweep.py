"""evaluate.py's sampler sweeps (one checkpoint load, CSV, PNG, W&B table/plot/images) and sampling sharded over
processes with per-chunk seeds."""

import csv
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from contgen.cli.evaluate import generate_balanced, plot_axes, sweep_points, write_sweep
from tests.cli.test_end_to_end import TINY
from tests.helpers import run_script
from tests.modules.test_token_ar import make

MAR_SAMPLER = {"_target_": "contgen.samplers.masked.MaskedARSampler", "num_iter": 4, "cfg": 5.0,
               "cfg_schedule": "constant", "temperature": 1.0}
NO_FIXED = OmegaConf.create({"num_iter": None, "cfg": None})


def test_sweep_points_are_every_combination_first_knob_slowest():
    sweep = OmegaConf.create({"cfg": [1, 3], "temperature": [0.9, 1.0], "steps": [2]})
    points = sweep_points(sweep, NO_FIXED, MAR_SAMPLER)
    assert [knobs for knobs, _ in points] == [{"cfg": c, "temperature": t, "steps": 2} for c in (1, 3) for t in (0.9, 1.0)]
    assert points[0][1] == {"cfg": 1, "temperature": 0.9, "num_iter": 2}  # steps is a token-AR sampler's num_iter
    assert sweep_points(OmegaConf.create({"cfg": None}), NO_FIXED, MAR_SAMPLER) == [({}, {})]
    transport = {"_target_": "contgen.transport.solvers.EulerSampler", "steps": 60, "cfg_scale": 0.0}
    assert sweep_points(OmegaConf.create({"steps": [1, 2]}), NO_FIXED, transport)[1][1] == {"steps": 2}


@pytest.mark.parametrize("sweep, fixed, match", [
    ({"cfg_scale": [1.0]}, {}, r"sweep.cfg_scale: not a setting of this checkpoint's sampler \(contgen.samplers.masked"),
    ({"cfg": 2.0}, {}, r"sweep.cfg must be a non-empty list, e.g. sweep.cfg=\[1,2\]"),
    ({"cfg": []}, {}, "sweep.cfg must be a non-empty list"),
    ({"steps": [2, 4]}, {"num_iter": 8}, r"sampler.num_iter=8 and sweep.steps=\[2, 4\] both set"),
])
def test_bad_sweeps_are_refused_naming_the_key(sweep, fixed, match):
    with pytest.raises(ValueError, match=match):
        sweep_points(OmegaConf.create(sweep), OmegaConf.create({"num_iter": None, **fixed}), MAR_SAMPLER)


def test_write_sweep_csv_and_plot(tmp_path):
    rows = [({"cfg": c, "temperature": t}, {"num_samples": 12, "fd_builtin": c + t, "class_acc": 0.5})
            for c in (1, 2, 3) for t in (0.9, 1.0)]
    x, lines = plot_axes(rows)  # x: the knob with the most values; one line per value of the others
    assert x == "cfg" and lines == {"temperature=0.9": [(1, 0), (2, 2), (3, 4)], "temperature=1.0": [(1, 1), (2, 3), (3, 5)]}
    write_sweep(rows, "fd_builtin", tmp_path)
    table = list(csv.reader(open(tmp_path / "sweep.csv")))
    assert table[0] == ["cfg", "temperature", "num_samples", "fd_builtin", "class_acc"] and len(table) == 7
    assert table[6] == ["3", "1.0", "12", "4.0", "0.5"]
    from PIL import Image

    assert Image.open(tmp_path / "sweep.png").size == (640, 420)


def test_wandb_group_is_the_sweep_dir_name_in_a_multirun():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    import contgen.cli.config  # noqa: F401  (registers the resolver)
    from tests.helpers import ROOT

    wandb = OmegaConf.load(ROOT / "conf" / "logger" / "wandb.yaml").wandb
    assert wandb.group is None and "entity" in wandb  # a single run: no group
    hydra = {"mode": RunMode.MULTIRUN, "sweep": {"dir": "multirun/train/sweep7"}, "job": {"num": 1},
             "overrides": {"task": ["optim.blr=1e-3"]}}
    HydraConfig.instance().cfg = OmegaConf.create({"hydra": hydra})  # what a -m job sees
    try:
        assert wandb.group == "sweep7"
    finally:
        HydraConfig.instance().cfg = None


def _draw(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        module, calls = make(), []
        generate = module.generate
        module.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
        images, labels = generate_balanced(module, 10, 3, seed=5)
        Path(f"{out}.calls{rank}").write_text(str(len(calls)))
        if rank == 0:
            torch.save({"images": images, "labels": labels}, out)
        else:
            assert images is None and labels is None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~15 s: keeps make test under ~10 min (CI runs the slow tier too)
def test_sharded_sampling_gives_the_images_of_one_process(tmp_path, one_thread):
    """10 images in chunks of 3 (the last one short): three gloo processes draw chunks {0, 3}, {1} and {2}, rank 0
    gathers them; the set is bit-identical (fp32, one thread) to the one drawn by a single process. Every rank makes
    the same number of generate calls (2), as a model sharded with FSDP needs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_draw, args=(3, port, str(tmp_path / "two.pt")), nprocs=3)
    assert [int((tmp_path / f"two.pt.calls{r}").read_text()) for r in range(3)] == [2, 2, 2]
    two = torch.load(tmp_path / "two.pt")
    images, labels = generate_balanced(make(), 10, 3, seed=5)
    assert images.shape == (10, 3, 16, 16) and labels.tolist() == [i % 12 for i in range(10)]
    assert torch.equal(two["images"], images) and torch.equal(two["labels"], labels)
    assert not torch.equal(images[:3], images[3:6])  # chunks have their own seeds, not one seed each
    assert not torch.equal(generate_balanced(make(), 10, 3, seed=6)[0], images)


@pytest.mark.slow
def test_evaluate_sweep_writes_csv_png_and_wandb(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_script("train.py", *TINY, "evaluate_after_fit=false", "trainer.max_steps=2", f"hydra.run.dir={run}")
    ckpt = run / "checkpoints" / "last.ckpt"
    ev = tmp_path / "ev"
    run_script("evaluate.py", f"ckpt={ckpt}", "metrics.num_samples=12", "metrics.batch_size=12", "sweep.cfg=[1,3]",
               "sweep.temperature=[0.5,1.0]", "logger=wandb", "threads=1", f"hydra.run.dir={ev}",
               env={"CONTGEN_CACHE": cache_dir, "WANDB_MODE": "offline"})
    rows = list(csv.DictReader(open(ev / "sweep.csv")))
    assert [(r["cfg"], r["temperature"]) for r in rows] == [("1", "0.5"), ("1", "1.0"), ("3", "0.5"), ("3", "1.0")]
    assert all(float(r["fd_builtin"]) > 0 and r["num_samples"] == "12" for r in rows)
    assert rows[0]["fd_builtin"] != rows[1]["fd_builtin"]  # the temperature reached the sampler
    for r in rows:  # each point's own files
        point = ev / f"cfg={r['cfg']},temperature={r['temperature']}"
        assert json.loads((point / "metrics.json").read_text())["fd_builtin"] == pytest.approx(float(r["fd_builtin"]))
        assert (point / "eval_samples.png").is_file()
    assert (ev / "sweep.png").stat().st_size > 1000
    [wandb_run] = (ev / "wandb").glob("offline-run-*")
    [table] = (wandb_run / "files" / "media" / "table" / "sweep").glob("table_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"][:3] == ["line", "cfg", "temperature"] and len(table["data"]) == 4
    assert len(list((wandb_run / "files" / "media" / "images" / "eval").glob("samples_*.png"))) == 4
    history = next(wandb_run.glob("*.wandb")).read_bytes()
    assert b"sweep/fd_builtin_vs_cfg" in history and b"wandb/line/v0" in history  # the line plot (a custom chart)

    with pytest.raises(AssertionError, match=r"sweep point steps=99: sampler.num_iter must be in \[1, 16\]"):
        run_script("evaluate.py", f"ckpt={ckpt}", "sweep.steps=[2,99]", f"hydra.run.dir={tmp_path / 'bad'}")
    assert not (tmp_path / "bad" / "steps=2").exists()  # refused before any point was sampled
