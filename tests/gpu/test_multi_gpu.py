"""Two GPUs: FSDP trains, evaluates after fit (every rank in step) and writes one full-state-dict checkpoint, which a
single GPU resumes exactly where it stopped and which sample.py / evaluate.py load on one device. Skipped with
fewer than 2 GPUs."""

import json

import pytest
import torch

from contgen.cli.checkpoint_io import load_checkpoint
from tests.cli.test_end_to_end import TINY
from tests.helpers import run_script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


def test_fsdp_on_two_gpus_then_one_gpu_resume_sample_evaluate(tmp_path, cache_dir):
    run, env = tmp_path / "run", {"CONTGEN_CACHE": cache_dir}
    common = [*TINY, "trainer.accelerator=gpu", "data.batch_size=null", "data.global_batch_size=64",
              "trainer.max_epochs=-1", "callbacks.checkpoint.every_n_train_steps=2", f"hydra.run.dir={run}"]
    run_script("train.py", *common, "strategy=fsdp", "trainer.devices=2", "trainer.max_steps=6", env=env)
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6 and ckpt["contgen"]["config"]["data"]["batch_size"] == 32
    weights = ckpt["state_dict"]  # gathered: every tensor has its full shape, the EMA copy beside the net
    for name, w in weights.items():
        if name.startswith("net."):
            assert weights["ema.shadow." + name[len("net."):]].shape == w.shape and w.dim() >= 1, name
    assert weights["net.backbone.encoder_pos_embed_learned"].dim() == 3
    assert json.loads((run / "metrics.json").read_text())["num_samples"] == 24

    proc = run_script("train.py", *common, "trainer.devices=1", "trainer.max_steps=10", "ckpt_path=last", env=env)
    assert "data.batch_size=64 per device" in proc.stdout
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 10

    run_script("sample.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "classes=[0,1]", "per_class=2",
               "seeds=[0]", f"hydra.run.dir={tmp_path / 's'}")
    run_script("evaluate.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "metrics.num_samples=24",
               "metrics.batch_size=24", f"hydra.run.dir={tmp_path / 'e'}", env=env)
    assert (tmp_path / "s" / "samples_seed0.npz").is_file() and (tmp_path / "e" / "metrics.json").is_file()
