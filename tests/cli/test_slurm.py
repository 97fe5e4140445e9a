"""cluster=slurm against a real SLURM cluster (CI: .ci/slurm_up.sh brings up one node on localhost): a 2-point sweep
as a submitit job array, and a job that gets the requeue signal mid-training, is requeued and resumes its run (same
run dir, step, W&B run). The dry run and the checks before submission need no cluster."""

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contgen.callbacks.wandb_run_id import wandb_run_id
from contgen.cli.checkpoint_io import load_checkpoint
from tests.helpers import TINY_MAR_HEAD_RUN, run_script


def _cluster_up() -> str | None:
    """None where a SLURM node is up, else why not."""
    if shutil.which("sinfo") is None:
        return "no SLURM here (sinfo not on PATH; .ci/slurm_up.sh starts a one-node cluster)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if proc.returncode != 0 or not {"idle", "mixed", "allocated"} & set(proc.stdout.split()):
        return f"no SLURM node up (sinfo: {proc.stdout.strip() or proc.stderr.strip()}; run .ci/slurm_up.sh)"
    return None


needs_cluster = pytest.mark.skipif(_cluster_up() is not None, reason=str(_cluster_up()))

# tiny, single-threaded, one CPU per job, no GPU; W&B offline beside the CSV logs
SLURM = ["cluster=slurm", "cluster.gpus_per_node=null", "cluster.cpus_per_task=1", "cluster.time_min=10",
         "trainer.accelerator=cpu", "threads=1", "logger=csv_wandb", "evaluate_after_fit=false"]
ENV = {"WANDB_MODE": "offline"}


def _squeue(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout.strip()


def _jobs(sweep: Path) -> list[str]:
    """The SLURM job ids of a sweep, from submitit's folders: <sweep>/.submitit/<job> (and <job>_<task> for an array)."""
    return sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir())


def _wait_gone(job: str, timeout: float, log_dir: Path) -> None:
    end = time.time() + timeout
    while _squeue(job) and time.time() < end:
        time.sleep(1)
    if _squeue(job):
        subprocess.run(["scancel", job])
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(log_dir.rglob("*_log.*")))
        raise AssertionError(f"SLURM job {job} still queued after {timeout:.0f} s:\n{logs}")


def test_dry_run_prints_the_array_without_submitting(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_script("train.py", "-m", *SLURM, "cluster.dry_run=true", "optim.blr=1e-4,1e-3", "trainer.devices=2",
                     "trainer.num_nodes=3", "cluster.partition=gpu", "cluster.setup=[module load cuda]",
                     f"hydra.sweep.dir={sweep}").stdout
    assert "2 job(s) would be submitted (nothing submitted)" in out
    assert f"#0 {sweep}/0:" in out and "optim.blr=0.0001" in out and f"#1 {sweep}/1:" in out
    for flag in ("--array=0-1%2", "--ntasks-per-node=2", "--nodes=3", "--cpus-per-task=1", "--partition=gpu",
                 "--time=10", "--signal=USR2@120", "--requeue"):
        assert f"#SBATCH {flag}\n" in out, flag
    assert "--gpus-per-node" not in out and "\nmodule load cuda\n" in out
    assert not (sweep / ".submitit").exists() and not (sweep / "0").exists()


@pytest.mark.slow
def test_checks_before_submission(tmp_path):
    with pytest.raises(AssertionError, match=r"trainer.devices must be a positive number .* got -1"):
        run_script("train.py", "-m", *SLURM, "cluster.dry_run=true", "trainer.devices=-1",
                   f"hydra.sweep.dir={tmp_path / 's'}")
    with pytest.raises(AssertionError, match=r"'\$\{trainer.devices\}': Value 'auto'(.|\n)*hydra.launcher.tasks_per_node"):
        run_script("train.py", "-m", *SLURM, "cluster.dry_run=true", "trainer.devices=auto",
                   f"hydra.sweep.dir={tmp_path / 's'}")
    with pytest.raises(AssertionError, match="sbatch is not on PATH"):
        run_script("train.py", "-m", *SLURM, f"hydra.sweep.dir={tmp_path / 's'}",
                   env={"PATH": str(Path(sys.executable).parent)})  # the interpreter's bin only
    with pytest.raises(AssertionError, match=r"add -m \(python train.py -m cluster=slurm"):
        run_script("train.py", *SLURM, f"hydra.run.dir={tmp_path / 'r'}")


@pytest.mark.slow
@needs_cluster
def test_sweep_runs_as_a_job_array(tmp_path):
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", *SLURM, *TINY_MAR_HEAD_RUN, "optim.blr=1e-4,1e-3", f"hydra.sweep.dir={sweep}",
               env=ENV, timeout=600)  # the launcher waits for both jobs
    tasks = [j for j in _jobs(sweep) if "_" in j]
    assert len(tasks) == 2 and tasks == [f"{tasks[0].split('_')[0]}_{i}" for i in (0, 1)]  # one array, a task per point
    for job in ("0", "1"):
        ckpt = load_checkpoint(sweep / job / "checkpoints" / "last.ckpt")
        assert ckpt["global_step"] == 4
        assert wandb_run_id(ckpt) and list((sweep / job / "wandb").glob(f"offline-run-*-{wandb_run_id(ckpt)}"))
        rows = list(csv.DictReader(open(sweep / job / "csv" / "metrics.csv")))
        assert [r["step"] for r in rows if r.get("train/loss")] == ["0", "1", "2", "3"]
    assert [r["job"] for r in csv.DictReader(open(sweep / "summary.csv"))] == ["0", "1"]


@pytest.mark.slow
@needs_cluster
def test_requeue_signal_resumes_the_same_run(tmp_path):
    """USR2 (what SLURM sends signal_delay_s before the time limit) mid-training: last.ckpt is written at that step,
    submitit requeues the job (a time-out to submitit: any signal in the last 10 min of a job counts as one), and the
    restarted job continues from that step in the same run dir and W&B run."""
    sweep = tmp_path / "sweep"
    steps = 24
    proc = subprocess.Popen(
        [sys.executable, "train.py", "-m", *SLURM, *TINY_MAR_HEAD_RUN,
         f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "trainer.limit_train_batches=null",
         "+callbacks.slow._target_=tests.helpers.SlowSteps", "+callbacks.slow.seconds=0.5",
         f"hydra.sweep.dir={sweep}"],
        cwd=Path(__file__).resolve().parents[2], env={**os.environ, **ENV}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    run = sweep / "0"
    try:
        end = time.time() + 300
        while not list((run / "checkpoints").glob("step*.ckpt")) and time.time() < end:  # step 2 is saved
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        assert list((run / "checkpoints").glob("step*.ckpt")), "no checkpoint within 300 s"
        (job,) = _jobs(sweep)  # one point: a plain job
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        end = time.time() + 120
        while "BeginTime" not in _squeue(job) and time.time() < end:  # requeued: held 2 min by SLURM
            time.sleep(0.5)
        ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
        saved_step, run_id = ckpt["global_step"], wandb_run_id(ckpt)
        assert 2 <= saved_step < steps and run_id
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
        _wait_gone(job, 300, sweep / ".submitit")
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    log = "\n".join(p.read_text() for p in sorted((sweep / ".submitit").rglob("*_log.out")))
    assert f"USR2: saved {run / 'checkpoints' / 'last.ckpt'} at step {saved_step}" in log
    assert "SLURM job requeued (1 restart(s)): ckpt_path=last resume_mode=exact" in log
    assert f"continuing W&B run {run_id}" in log
    final = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == steps and wandb_run_id(final) == run_id
    # two attempts of one W&B run; the second attempt trains on from the saved step (its CSV log: Lightning's
    # CSVLogger starts the file afresh on a resume)
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2
    logged = [int(r["step"]) for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert logged == list(range(saved_step, steps))
