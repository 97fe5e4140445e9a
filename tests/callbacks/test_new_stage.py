"""Resuming the same run vs starting a new stage from a checkpoint (issue 6 defect 2: the EAR fine-tune's lr)."""

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from contgen.callbacks.new_stage import NewStage
from contgen.cli.train import check_resume
from contgen.data.shapes import Shapes
from tests.helpers import train_optim
from tests.modules.test_token_ar import make

STAGE1 = dict(lr=1e-3, warmup_steps=0, schedule="constant", head_lr_scale=0.25)
STAGE2 = dict(lr=7e-4, warmup_steps=0, schedule="constant", head_lr_scale=0.25, betas=[0.8, 0.9])


class Probe(L.Callback):
    """What the first step of the resumed fit sees: group lrs and betas, and the first parameter's Adam moment."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "lrs"):
            opt = trainer.optimizers[0]
            self.lrs = [g["lr"] for g in opt.param_groups]
            self.betas = [tuple(g["betas"]) for g in opt.param_groups]
            self.exp_avg = opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].clone()
            self.step = trainer.global_step


def fit(module, tmp_path, max_steps, ckpt_path=None, callbacks=()):
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                        callbacks=list(callbacks))
    trainer.fit(module, DataLoader(Shapes(16, 16), batch_size=4), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1")
    trainer = fit(make("ear", "energy", optim=STAGE1), tmp, max_steps=2)
    trainer.save_checkpoint(tmp / "stage1.ckpt")
    saved = torch.load(tmp / "stage1.ckpt", weights_only=True)["optimizer_states"][0]["state"][0]["exp_avg"]
    return tmp / "stage1.ckpt", saved


def test_new_stage_applies_the_new_recipe_and_keeps_the_optimizer_moments(stage1, tmp_path):
    path, saved_exp_avg = stage1
    probe = Probe()
    fit(make("ear", "energy", optim=STAGE2), tmp_path, max_steps=3, ckpt_path=str(path), callbacks=[NewStage(), probe])
    assert probe.step == 2  # counters carried over
    assert probe.lrs == pytest.approx([7e-4, 7e-4, 7e-4 * 0.25])  # decay, no_decay, head (EAR's lr scale)
    assert probe.betas == [(0.8, 0.9)] * 3
    assert torch.equal(probe.exp_avg, saved_exp_avg)  # Adam moments carried over


def test_exact_resume_keeps_the_checkpoint_recipe(stage1, tmp_path):
    path, saved_exp_avg = stage1
    probe = Probe()
    fit(make("ear", "energy", optim=STAGE1), tmp_path, max_steps=3, ckpt_path=str(path), callbacks=[probe])
    assert probe.step == 2 and probe.lrs == pytest.approx([1e-3, 1e-3, 1e-3 * 0.25])
    assert torch.equal(probe.exp_avg, saved_exp_avg)


def _cfg(mode, **optim):
    return OmegaConf.create({"resume_mode": mode, "optim": train_optim(**optim)})


def test_exact_resume_with_a_changed_recipe_is_refused_before_compute(tmp_path):
    path = tmp_path / "run.ckpt"
    torch.save({"contgen": {"config": {"optim": train_optim(blr=1e-4)}}}, path)
    check_resume(_cfg("exact", blr=1e-4), str(path))  # the same recipe: fine
    with pytest.raises(ValueError, match=r"optim.blr: checkpoint 0.0001 vs config 7e-05.*resume_mode=new_stage"):
        check_resume(_cfg("exact", blr=7e-5), str(path))
    check_resume(_cfg("new_stage", blr=7e-5), str(path))


def test_resume_mode_errors():
    with pytest.raises(ValueError, match="resume_mode=new_stage starts from a checkpoint: set ckpt_path"):
        check_resume(_cfg("new_stage"), None)
    with pytest.raises(ValueError, match="resume_mode must be one of"):
        check_resume(_cfg("restart"), None)
