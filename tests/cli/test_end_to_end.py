"""train.py → sample.py → evaluate.py as a user runs them, at tiny size on the CPU; resume; multirun."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contgen.cli.checkpoint_io import load_checkpoint
from tests.helpers import run_script

TINY = [
    "data.image_size=16", "data.train.num_samples=256", "data.batch_size=32", "data.num_workers=0",
    "model.encoder_embed_dim=32", "model.decoder_embed_dim=32", "model.encoder_depth=1", "model.decoder_depth=1",
    "model.encoder_num_heads=2", "model.decoder_num_heads=2", "loss.width=32", "loss.depth=1", "loss.num_sampling_steps=5",
    "sampler.num_iter=4", "trainer.log_every_n_steps=1", "callbacks.sample_grid.every_n_steps=0",
    "callbacks.checkpoint.every_n_train_steps=3", "metrics.num_samples=24", "metrics.batch_size=24",
]


UCGM_TINY = ["method=ucgm", "data.image_size=16", "data.train.num_samples=128", "data.batch_size=32", "model.hidden_size=32",
             "model.depth=1", "model.num_heads=2", "sampler.steps=4", "trainer.log_every_n_steps=1",
             "callbacks.sample_grid.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=3",
             "metrics.num_samples=24", "metrics.batch_size=24"]


SHORTCUT_TINY = ["method=shortcut", "data.train.num_samples=128", "data.batch_size=32", "model.hidden_size=32",
                 "model.depth=1", "model.num_heads=2", "objective.bootstrap_every=4", "objective.denoise_timesteps=8",
                 "trainer.log_every_n_steps=1", "callbacks.sample_grid.every_n_steps=0",
                 "callbacks.checkpoint.every_n_train_steps=3", "metrics.num_samples=24", "metrics.batch_size=24"]


def losses(run_dir: Path) -> dict[int, float]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_train_sample_evaluate(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = run_script("train.py", *TINY, "trainer.max_epochs=2", f"hydra.run.dir={run}", env={"CONTGEN_CACHE": cache_dir})
    console = proc.stdout + proc.stderr
    assert console.count("Seed set to 0") == 1  # Lightning's INFO lines once (was: its handler and Hydra's)
    assert f"config (full resolved config: {run / 'config.yaml'})" in console and "encoder_embed_dim: 32" not in console
    for noise in ("litlogger", "module(s) in eval mode", "pin_memory", "already configured with model summary",
                  "LeafSpec"):
        assert noise not in console, noise
    assert "sampling 24 images (batches): 1/1 done" in console
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and list((run / "samples").glob("step_*.png"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"fd_builtin", "class_acc"} <= set(metrics) and 0.0 <= metrics["class_acc"] <= 1.0
    assert len(losses(run)) == 16  # 256 / 32 = 8 steps per epoch, 2 epochs, logged every step

    state = load_checkpoint(ckpt)  # weights_only=True: the checkpoint holds no pickled objects
    assert isinstance(state["contgen"]["config"], dict) and not any(k.startswith("tokenizer.") for k in state["state_dict"])

    out1, out2 = tmp_path / "s1", tmp_path / "s2"
    # the stored sample_precision "auto" is fp32 on a CPU; CUDA graphs are never used on a CPU
    for out, precision, graphs in ((out1, "null", "null"), (out2, "fp32", "false")):
        run_script("sample.py", f"ckpt={ckpt}", "classes=[0,5]", "per_class=3", "seeds=[7]", f"precision={precision}",
                   f"cuda_graphs={graphs}", f"hydra.run.dir={out}")
    a, b = np.load(out1 / "samples_seed7.npz"), np.load(out2 / "samples_seed7.npz")
    assert a["arr_0"].shape == (6, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    assert np.array_equal(a["arr_0"], b["arr_0"]) and a["labels"].tolist() == [0, 0, 0, 5, 5, 5]  # same seed, same images
    assert Image.open(out1 / "samples_seed7.png").size[0] > 16

    ev = tmp_path / "ev"
    run_script("evaluate.py", f"ckpt={ckpt}", "metrics.num_samples=24", "metrics.batch_size=12", f"hydra.run.dir={ev}",
               env={"CONTGEN_CACHE": cache_dir})
    scores = json.loads((ev / "metrics.json").read_text())
    assert scores["num_samples"] == 24 and np.isfinite(scores["fd_builtin"])


@pytest.mark.parametrize("family", ["token_ar", "transport"])
def test_killed_run_resumes_exactly(tmp_path, family):
    """A run SIGKILLed mid-epoch (after 7 steps; its last.ckpt is from step 6) and resumed with ckpt_path=last
    reproduces the uninterrupted run's losses and final weights bit for bit on the CPU — for the transport family
    its EMA teacher's ramp too."""
    import subprocess
    import sys

    full, part = tmp_path / "full", tmp_path / "part"
    size, total = (TINY, 16) if family == "token_ar" else (UCGM_TINY, 8)  # 8 / 4 steps per epoch, 2 epochs
    # threads=1: with threads=auto a busy machine can give the two runs different thread counts (other GEMM rounding)
    common = [*size, "evaluate_after_fit=false", "trainer.max_epochs=2", "logger.csv.flush_logs_every_n_steps=1",
              "threads=1"]
    run_script("train.py", *common, f"hydra.run.dir={full}")
    killed = subprocess.run([sys.executable, "train.py", *common, f"hydra.run.dir={part}",
                             "+callbacks.kill._target_=tests.helpers.KillAtStep", "+callbacks.kill.step=7"],
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert load_checkpoint(part / "checkpoints" / "last.ckpt")["global_step"] == 6
    before = losses(part)
    assert sorted(before) == list(range(7))
    proc = run_script("train.py", *common, "ckpt_path=last", f"hydra.run.dir={part}")
    assert "not resumable" not in proc.stdout + proc.stderr  # the DataModule resumes mid-epoch exactly
    reference, resumed = losses(full), {**before, **losses(part)}
    assert sorted(resumed) == sorted(reference) == list(range(total))
    assert all(resumed[s] == reference[s] for s in reference), (reference, resumed)
    a = load_checkpoint(full / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(part / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steps_seen(record_dir: Path) -> dict[int, set[str]]:
    """The samples of every optimizer step, all ranks together (a step replayed after a resume: its last record)."""
    per_rank: dict[tuple[str, int], list[str]] = {}
    for path in record_dir.glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            per_rank[(path.name, row["step"])] = row["samples"]
    steps: dict[int, set[str]] = {}
    for (_, step), samples in per_rank.items():
        steps.setdefault(step, set()).update(samples)
    return steps


@pytest.mark.slow
def test_two_process_ddp_resumes_exactly_and_on_one_process_continues_the_data_order(tmp_path):
    """strategy=ddp_spawn, 2 CPU processes, global batch 32 (16 per process): a run SIGKILLed at step 7 (last.ckpt from
    step 6) and resumed on 2 processes reproduces the uninterrupted run's losses and weights bit for bit; resumed
    instead on 1 process (32 per step) it continues the same data order: every step sees the same 32 samples as
    the uninterrupted 2-process run."""
    import subprocess
    import sys

    common = [*TINY, "data.batch_size=null", "data.global_batch_size=32", "evaluate_after_fit=false",
              "trainer.max_epochs=2", "logger.csv.flush_logs_every_n_steps=1", "threads=1", "trainer.accelerator=cpu",
              "+callbacks.record._target_=tests.helpers.RecordBatches"]
    ddp = [*common, "strategy=ddp_spawn", "trainer.devices=2"]
    full, part, one = tmp_path / "full", tmp_path / "part", tmp_path / "one"
    for d in (full, part, one):
        d.mkdir()
    run_script("train.py", *ddp, f"+callbacks.record.dir={full}", f"hydra.run.dir={full}")
    for run in (part, one):  # (a copied run dir would not do: Lightning versions last.ckpt in a moved directory)
        killed = subprocess.run([sys.executable, "train.py", *ddp, f"+callbacks.record.dir={run}", f"hydra.run.dir={run}",
                                 "+callbacks.kill._target_=tests.helpers.KillAtStep", "+callbacks.kill.step=7"],
                                cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
        assert killed.returncode != 0 and load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    before = losses(part)
    run_script("train.py", *ddp, "ckpt_path=last", f"+callbacks.record.dir={part}", f"hydra.run.dir={part}")
    reference, resumed = losses(full), {**before, **losses(part)}
    assert sorted(resumed) == sorted(reference) == list(range(16))
    assert all(resumed[s] == reference[s] for s in reference), (reference, resumed)
    a = load_checkpoint(full / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(part / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    proc = run_script("train.py", *common, "ckpt_path=last", f"+callbacks.record.dir={one}", f"hydra.run.dir={one}")
    assert "data.batch_size=32 per device" in proc.stdout
    seen, expected = steps_seen(one), steps_seen(full)
    assert sorted(seen) == sorted(expected) == list(range(16)) and all(len(s) == 32 for s in expected.values())
    assert all(seen[s] == expected[s] for s in expected)
    assert load_checkpoint(one / "checkpoints" / "last.ckpt")["global_step"] == 16


def test_multirun_two_points(tmp_path):
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", *TINY, "evaluate_after_fit=false", "trainer.max_epochs=1", "optim.blr=1e-4,1e-3",
               f"hydra.sweep.dir={sweep}")
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    import csv

    rows = list(csv.DictReader(open(sweep / "summary.csv")))  # one row per point: the swept override, results
    assert [(r["job"], float(r["optim.blr"])) for r in rows] == [("0", 1e-4), ("1", 1e-3)]
    assert all(np.isfinite(float(r["train/loss"])) for r in rows)
    assert (sweep / "summary.md").read_text().startswith("| job | optim.blr | train/loss |")
    blrs = {json.loads(json.dumps(load_checkpoint(sweep / j / "checkpoints" / "last.ckpt")["contgen"]["config"]["optim"]["blr"]))
            for j in ("0", "1")}
    assert blrs == {1e-4, 1e-3}


def test_cache_tokens_then_train_from_cache(tmp_path):
    cache = tmp_path / "cache"
    run_script("cache_tokens.py", "data=shapes", "data.image_size=16", "data.train.num_samples=64", "tokenizer=patch",
               "num_workers=0", "device=cpu", f"out={cache}", f"hydra.run.dir={tmp_path / 'c'}")
    assert (cache / "meta.json").is_file()
    overrides = [o for o in TINY if not o.startswith("data.train.")]
    run_script("train.py", "data=cached", f"data.root={cache}", *overrides, "evaluate_after_fit=false",
               "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    mismatch = [o if o != "data.image_size=16" else "data.image_size=32" for o in overrides]
    with pytest.raises(AssertionError, match="data.image_size=32 but the data set has image_size=16"):
        run_script("train.py", "data=cached", f"data.root={cache}", *mismatch, "trainer.max_epochs=1",
                   f"hydra.run.dir={tmp_path / 'bad'}")


def test_wandb_offline_run_files(tmp_path):
    """logger=wandb with WANDB_MODE=offline writes a local W&B run (losses, LR, throughput, sample grids)."""
    run = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("callbacks.sample_grid")]
    run_script("train.py", *overrides, "logger=wandb", "evaluate_after_fit=false", "trainer.max_epochs=1",
               "callbacks.sample_grid.every_n_steps=4", f"hydra.run.dir={run}", env={"WANDB_MODE": "offline"})
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("files/media/images/samples_*.png"))
    history = next(runs[0].glob("*.wandb")).read_bytes()  # the offline run's record stream, synced later
    assert all(key in history for key in (b"train/loss", b"train/img_per_s", b"lr-AdamW", b"samples"))


EAR_TINY = [o for o in TINY if not o.startswith(("model.", "loss."))] + [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "loss.width=32", "loss.depth=1"]


def test_method_ear_trains_samples_and_evaluates(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_script("train.py", "method=ear", *EAR_TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}",
               env={"CONTGEN_CACHE": cache_dir})
    config = load_checkpoint(run / "checkpoints" / "last.ckpt")["contgen"]["config"]
    assert config["loss"]["_target_"].endswith("EnergyHead") and config["optim"]["head_lr_scale"] == 0.25
    assert {"fd_builtin", "class_acc"} <= set(json.loads((run / "metrics.json").read_text()))


def test_method_ucgm_trains_samples_and_evaluates(tmp_path, cache_dir):
    """The transport family through the same entry points: module chosen by the preset, no branching on names."""
    run = tmp_path / "run"
    run_script("train.py", *UCGM_TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}",
               env={"CONTGEN_CACHE": cache_dir})
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    config = state["contgen"]["config"]
    assert config["module"]["_target_"].endswith("TransportModule") and "loss" not in config
    assert any(k.startswith("teacher.") for k in state["state_dict"])  # the EMA teacher of ζ 0.47 resumes with the run
    assert {"fd_builtin", "class_acc"} <= set(json.loads((run / "metrics.json").read_text()))
    out = tmp_path / "s"
    run_script("sample.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "classes=[1]", "per_class=2",
               "+sampler.steps=2", "+sampler.stochast_ratio=1.0", f"hydra.run.dir={out}")
    assert np.load(out / "samples_seed0.npz")["arr_0"].shape == (2, 16, 16, 3)
    with pytest.raises(AssertionError, match="sampler.num_iter=4: not a setting of this checkpoint's sampler"):
        run_script("sample.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "sampler.num_iter=4",
                   f"hydra.run.dir={tmp_path / 'bad'}")


@pytest.mark.slow
def test_shortcut_train_sample_evaluate_at_any_step_count(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_script("train.py", *SHORTCUT_TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}",
               env={"CONTGEN_CACHE": cache_dir})
    import csv

    with open(run / "csv" / "metrics.csv") as f:
        logged = set(next(csv.DictReader(f)).keys())
    assert {"train/loss_flow", "train/loss_bootstrap", "train/target_rms_bootstrap", "train/loss_level0",
            "train/loss_level3"} <= logged  # levels 0..2 shortcut, 3 = flow (denoise_timesteps 8)
    ckpt = run / "checkpoints" / "last.ckpt"
    for steps in (1, 8):
        out = tmp_path / f"s{steps}"
        run_script("sample.py", f"ckpt={ckpt}", "classes=[1]", "per_class=2", f"+sampler.steps={steps}",
                   f"hydra.run.dir={out}")
        assert np.load(out / "samples_seed0.npz")["arr_0"].shape == (2, 16, 16, 3)
    with pytest.raises(AssertionError, match="sampler.steps must be a power of two"):
        run_script("evaluate.py", f"ckpt={ckpt}", "+sampler.steps=3", f"hydra.run.dir={tmp_path / 'bad'}")
    run_script("evaluate.py", f"ckpt={ckpt}", "+sampler.steps=2", "metrics.use_ema=false",
               f"hydra.run.dir={tmp_path / 'ev'}", env={"CONTGEN_CACHE": cache_dir})
    assert {"fd_builtin", "class_acc"} <= set(json.loads((tmp_path / "ev" / "metrics.json").read_text()))


@pytest.mark.slow
def test_shortcut_levels_over_the_global_batch_under_two_process_ddp(tmp_path, cache_dir):
    """Two CPU processes (gloo, ddp_spawn), 8 rows each, bootstrap_every 4: 4 self-consistency rows over the global
    batch of 16 for the 3 levels of denoise_timesteps 8 — global layout [2, 1, 0, 0], rank r takes rows r::2, so
    each rank has 2 rows (fewer than the levels) and together they are the one-device layout. With 4 rows per device
    the global rows (2) are fewer than the levels: refused before any training step."""
    ddp = [*SHORTCUT_TINY, "objective.denoise_timesteps=8", "objective.bootstrap_every=4", "strategy=ddp_spawn",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=1", "evaluate_after_fit=false",
           "+callbacks.levels._target_=tests.helpers.RecordShortcutLevels", f"+callbacks.levels.dir={tmp_path}"]
    run_script("train.py", *ddp, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'run'}",
               env={"CONTGEN_CACHE": cache_dir})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rows"] for r in ranks] == [2, 2]
    assert ranks[0]["levels"] == [2, 0] and ranks[1]["levels"] == [1, 0]
    with pytest.raises(AssertionError, match=r"data.batch_size 4 x 2 device\(s\) // objective.bootstrap_every 4"):
        run_script("train.py", *ddp, "data.batch_size=4", f"hydra.run.dir={tmp_path / 'bad'}",
                   env={"CONTGEN_CACHE": cache_dir})
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_evaluate_inception_fid_offline(tmp_path, monkeypatch):
    """FID/IS through torch-fidelity's InceptionV3 from a local weights file (random weights here: the pipeline,
    not the value, is under test) against an .npz of reference statistics; nothing is downloaded."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    from contgen.metrics import save_stats

    with monkeypatch.context() as m:  # build the network without weights, save a random state dict
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.save(tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), tmp_path / "inc.pth")
    save_stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    run = tmp_path / "run"
    run_script("train.py", *TINY, "evaluate_after_fit=false", "trainer.max_epochs=1", f"hydra.run.dir={run}")
    ev = tmp_path / "ev"
    run_script("evaluate.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "metrics.num_samples=20",
               "metrics.batch_size=10", "metrics.builtin=none", f"metrics.inception_weights={tmp_path / 'inc.pth'}",
               f"metrics.ref_stats={tmp_path / 'ref.npz'}", f"hydra.run.dir={ev}")
    scores = json.loads((ev / "metrics.json").read_text())
    # IS = exp(mean KL) >= 1 exactly; with near-uniform logits of random weights the mean KL rounds to ~-1e-16
    assert np.isfinite(scores["fid"]) and scores["fid"] > 0 and scores["is"] >= 1.0 - 1e-12 and "fd_builtin" not in scores
