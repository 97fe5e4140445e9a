"""``python digit.py out=DIR``: DiGIT's stages in order, each a contgen command in a subprocess (its own Hydra run,
config and log in ``DIR/<stage>``), skipped when done and resumed when interrupted; see conf/digit.yaml."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("kmeans", "vq", "stage1", "stage2")


def dotted(node, prefix: str = "") -> list[str]:
    """A config node as Hydra overrides: {trainer: {max_epochs: 5}, module: x} -> [trainer.max_epochs=5, module=x]."""
    out = []
    for key, value in (OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node).items():
        if isinstance(value, dict):
            out += dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={'null' if value is None else value}")
    return out


def stage_commands(cfg: DictConfig, out: Path) -> dict[str, list[str]]:
    """The command of every stage (script + Hydra overrides), from the one set of encoder settings."""
    common, enc = [*dotted(cfg.common), f"threads={cfg.threads}"], OmegaConf.to_container(cfg.encoder)
    extra = {stage: dotted(cfg[stage]) for stage in STAGES}
    centroids, vq = out / "kmeans" / "centroids.pt", out / "vq" / "vq_small.pt"
    stage1_ckpt = out / "stage1" / "checkpoints" / "last.ckpt"
    tok = [f"tokenizer.{k}={v}" for k, v in enc.items()]
    return {
        "kmeans": ["fit_kmeans.py", *common, *tok, f"k={cfg.k}", f"out={centroids}", *extra["kmeans"]],
        "vq": ["train_vq.py", *common, f"out={vq.parent}", *extra["vq"]],
        "stage1": ["train.py", "method=digit", *common, *tok, f"tokenizer.centroids_path={centroids}",
                   "evaluate_after_fit=false", "callbacks.sample_grid=null", *extra["stage1"]],
        "stage2": ["train.py", "method=digit_decoder", *common, f"tokenizer.ckpt_path={vq}",
                   f"module.semantic.centroids_path={centroids}", *[f"module.semantic.{k}={v}" for k, v in enc.items()],
                   f"module.stage1_ckpt={stage1_ckpt}", *extra["stage2"]],
    }


def run_pipeline(cfg: DictConfig) -> None:
    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"stages={stages}: choose from {list(STAGES)} (in that order)")
    out = Path(cfg.out).resolve()
    commands = stage_commands(cfg, out)
    for i, stage in enumerate(STAGES):
        if stage not in stages:
            continue
        script, *overrides = commands[stage]
        command = " ".join([script, *overrides])  # what DONE records: a stage is done for these settings only
        run_dir, done = out / stage, out / stage / "DONE"
        if done.is_file():
            if done.read_text().strip() == command:
                print(f"[digit] {stage}: done ({run_dir}), skipped")
                continue
            for later in STAGES[i:]:  # its settings changed: it and what was built on it are redone, kept aside
                set_aside(out / later, "changed")
        overrides.append(f"hydra.run.dir={run_dir}")
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            overrides.append("ckpt_path=last")  # an interrupted training: continue the same run
        elif run_dir.exists():  # stopped before its first checkpoint (or vq / kmeans, which keep none): start afresh
            set_aside(run_dir, "failed")
        print(f"[digit] {stage}: python {script} {' '.join(overrides)}", flush=True)
        rc = subprocess.run([sys.executable, str(ROOT / script), *overrides]).returncode
        if rc:
            raise SystemExit(f"[digit] stage {stage} failed (exit {rc}); fix it and rerun the same command: finished "
                             f"stages are skipped and {stage} resumes")
        run_dir.mkdir(parents=True, exist_ok=True)
        done.write_text(command + "\n")
    print(f"[digit] done: {out}")


def set_aside(run_dir: Path, why: str) -> None:
    """Move a stage's directory out of the way (nothing is deleted): ``<stage>.<why>-<time>``."""
    if run_dir.exists():
        aside = run_dir.with_name(f"{run_dir.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"[digit] {run_dir.name}: {why} since it ran; moved it to {aside}")
