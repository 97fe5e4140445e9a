"""One run per run directory; last.ckpt is always the trained model (issue 7 §2)."""

import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from contgen.callbacks.final_checkpoint import FinalCheckpoint
from contgen.cli.checkpoint_io import resolve_ckpt_path
from contgen.cli.run_dir import LOCK, claim_run_dir
from contgen.data.shapes import Shapes
from tests.modules.test_token_ar import make


def test_a_used_run_directory_is_refused_unless_resuming(tmp_path):
    (tmp_path / ".hydra").mkdir()  # Hydra's own files do not count
    claim_run_dir(tmp_path, resuming=False)
    (tmp_path / LOCK).unlink()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(RuntimeError, match=r"already holds a run \(checkpoints\): resume it with ckpt_path=last"):
        claim_run_dir(tmp_path, resuming=False)
    (tmp_path / LOCK).unlink()
    claim_run_dir(tmp_path, resuming=True)


def test_a_directory_in_use_by_a_live_training_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(str(live.pid))
        with pytest.raises(RuntimeError, match=f"in use by another training \\(pid {live.pid}"):
            claim_run_dir(tmp_path, resuming=True)
    finally:
        live.kill()
        live.wait()
    claim_run_dir(tmp_path, resuming=True)  # the holder is dead: its lock is stale
    assert (tmp_path / LOCK).read_text() == str(__import__("os").getpid())


def test_a_killed_checkpoint_write_is_cleaned_up(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt.tmp").write_bytes(b"")
    claim_run_dir(tmp_path, resuming=True)
    assert not (tmp_path / "checkpoints" / "last.ckpt.tmp").exists() and "killed midway" in capsys.readouterr().out


def test_ckpt_path_last_in_a_directory_without_a_run_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no run to resume in {tmp_path}"):
        resolve_ckpt_path("last", str(tmp_path))
    (tmp_path / "config.yaml").write_text("seed: 0\n")  # started before, killed before its first checkpoint
    assert resolve_ckpt_path("last", str(tmp_path)) is None


def test_last_ckpt_holds_the_final_step_when_the_length_is_not_a_multiple_of_the_interval(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_last=True,
                                 save_on_train_epoch_end=True)
    trainer = L.Trainer(max_steps=7, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu", callbacks=[FinalCheckpoint(), checkpoint])
    trainer.fit(make(), DataLoader(Shapes(16, 64), batch_size=4))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("last*")) == ["last.ckpt"]
