"""``cluster=slurm``: each point of a ``-m`` sweep is one SLURM job (a submitit job array), and a job that reaches its
time limit or is preempted is requeued and continues its run.

Requeue has one owner, submitit. Its sbatch script asks SLURM for SIGUSR2 ``signal_delay_s`` before the time limit;
its handler in the job tells a time-out from a preemption (counting time-outs against ``max_num_timeout``),
re-pickles the Hydra job (``BaseSubmititLauncher.checkpoint``: same overrides, job number and sweep directory — the
``${now:}`` of ``hydra.sweep.dir`` is resolved once, in the submitting process, and travels in the pickle) and runs
``scontrol requeue``. contgen adds what submitit cannot know: ``RequeueCheckpoint`` writes ``last.ckpt`` at a step
boundary before submitit's handler runs, and the requeued job (``SLURM_RESTART_COUNT`` > 0) resumes from it
(``resume_requeued``). Lightning's own SLURM auto-requeue (SIGUSR1, ``hpc_ckpt_*.ckpt`` that contgen's resume does
not read) is switched off in every SLURM job (``lightning_plugins``), so no signal has two owners.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf

from contgen.callbacks.requeue import RequeueCheckpoint


def check_submission(params: dict, dry_run: bool) -> None:
    """Before anything is submitted: one SLURM task per device, and sbatch to submit with."""
    for key, name in (("tasks_per_node", "trainer.devices"), ("nodes", "trainer.num_nodes")):
        if params[key] < 1:  # an int: the launcher's structured config refuses "auto" (naming hydra.launcher.<key>)
            raise ValueError(f"cluster=slurm: {name} must be a positive number (hydra.launcher.{key} = {name}: "
                             f"one SLURM task per device), got {params[key]}")
    if not dry_run and shutil.which("sbatch") is None:
        raise RuntimeError("cluster=slurm: sbatch is not on PATH (run on a SLURM login node, or print what would be "
                           "submitted with cluster.dry_run=true)")


def print_jobs(params: dict, sweep_dir: str, job_overrides, initial_job_idx: int) -> None:
    """``cluster.dry_run``: each point's overrides and run directory, and the sbatch script of the job array as
    submitit writes it (its executor configured as ``BaseSubmititLauncher.launch`` configures it)."""
    import submitit

    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params["max_num_timeout"])
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    slurm = executor._executor
    if len(job_overrides) > 1:
        slurm.parameters["map_count"] = len(job_overrides)  # as submitit's map_array does: one job array
    print(f"cluster.dry_run: {len(job_overrides)} job(s) would be submitted (nothing submitted); sweep dir {sweep_dir}")
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        print(f"  #{idx} {sweep_dir}/{idx}: {' '.join(overrides)}")
    print(f"sbatch script (array task i runs point #{initial_job_idx}+i):")
    print(slurm._make_submission_file_text(slurm._submitit_command_str, "dry_run"))


def in_submitit_job() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"  # exported by submitit's sbatch script


def resume_requeued(cfg: DictConfig, run_dir: Path) -> None:
    """Before anything else in ``train``: refuse ``cluster=slurm`` outside a submitted job, and make a requeued job
    continue its run — from ``<run dir>/checkpoints/last.ckpt`` exactly (whatever ``ckpt_path`` / ``resume_mode`` the
    first attempt started from), or, killed before its first save, from where the first attempt started."""
    if OmegaConf.select(cfg, "cluster.name") == "slurm" and not in_submitit_job():
        raise ValueError("cluster=slurm submits each point of a sweep as a SLURM job: add -m "
                         "(python train.py -m cluster=slurm ...)")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    if restarts == 0:
        return
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        cfg.ckpt_path, cfg.resume_mode = "last", "exact"
    elif cfg.ckpt_path in (None, ""):
        cfg.ckpt_path = "last"  # resolve_ckpt_path: started here, no checkpoint yet -> from scratch in this run dir
    print(f"SLURM job requeued ({restarts} restart(s)): ckpt_path={cfg.ckpt_path} resume_mode={cfg.resume_mode}")


def callbacks() -> list:
    return [RequeueCheckpoint()] if in_submitit_job() else []


def lightning_plugins() -> list:
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
