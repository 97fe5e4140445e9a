"""callbacks.online_fid: FID of a small sample set every n optimizer steps, to every logger, also under DDP."""

import csv
import json

import pytest

from tests.cli.test_end_to_end import TINY
from tests.helpers import run_script

ONLINE = ["callbacks.online_fid.every_n_steps=2", "callbacks.online_fid.num_samples=12",
          "callbacks.online_fid.batch_size=6", "trainer.max_steps=4", "evaluate_after_fit=false"]


def online_steps(run) -> dict[int, float]:
    with open(run / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["online/fd_builtin"]) for r in csv.DictReader(f) if r.get("online/fd_builtin")}


@pytest.mark.slow  # ~15 s: keeps make test under ~10 min (CI runs the slow tier too)
def test_online_fid_is_logged_every_n_steps(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_script("train.py", *TINY, *ONLINE, "threads=1", f"hydra.run.dir={run}", env={"CONTGEN_CACHE": cache_dir})
    logged = online_steps(run)
    assert sorted(logged) == [2, 4] and all(v > 0 for v in logged.values())
    with open(run / "csv" / "metrics.csv") as f:
        assert "online/class_acc" in next(csv.DictReader(f))
    with pytest.raises(AssertionError, match="no FID to report: the data .* metrics.inception_weights is not set"):
        run_script("train.py", *TINY, *ONLINE, "metrics.builtin=none", f"hydra.run.dir={tmp_path / 'bad'}")
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_online_fid_and_evaluation_after_fit_under_two_process_ddp(tmp_path, cache_dir):
    """strategy=ddp on 2 CPU processes (gloo): the online FID and the final evaluation are sampled by both ranks
    (chunks of 6: 2 each), gathered and scored on rank 0."""
    run = tmp_path / "run"
    proc = run_script("train.py", *TINY, *ONLINE[:3], "trainer.max_steps=2", "strategy=ddp", "trainer.accelerator=cpu",
                      "trainer.devices=2", "metrics.num_samples=24", "metrics.batch_size=6", "threads=1",
                      f"hydra.run.dir={run}", env={"CONTGEN_CACHE": cache_dir})
    console = proc.stdout + proc.stderr
    assert "sampling 24 images (batches) on rank 1 of 2" in console and "sampling 12 images (batches) on rank 0 of 2" in console
    assert sorted(online_steps(run)) == [2]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == 24 and metrics["fd_builtin"] > 0
    assert json.loads((run / "results.json").read_text())["fd_builtin"] == metrics["fd_builtin"]
