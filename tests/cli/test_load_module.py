"""contgen checkpoints through ``load_module`` (what sample.py / evaluate.py / linear_probe.py load)."""

import torch
from hydra import compose, initialize_config_dir

import contgen.cli.config  # noqa: F401  (registers the config resolvers)
from contgen.cli.build import build_module
from contgen.cli.load import load_module
from tests.helpers import ROOT


def test_a_loaded_module_compiles_its_trained_net_as_default(tmp_path):
    """``module.compile_mode=reduce-overhead`` is how the trained net compiles for training. A run that trained without
    compile (so the mode did not apply) and with activation checkpointing loads with ``compile=true`` to sample: the
    mode is reset to default, instead of refusing the pair or graphing a net that only samples."""
    overrides = [f"paths.output_dir={tmp_path}", "module.compile_mode=reduce-overhead", "model.grad_checkpointing=true"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
    module = build_module(cfg, 10)
    assert module.compile_mode == "default"  # compile is off: the mode has nothing to apply to
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "run.ckpt")
    loaded, stored = load_module(str(tmp_path / "run.ckpt"), "cpu", {"module.compile": True})
    assert loaded.compile_mode == "default" and stored["module"]["compile_mode"] == "default"
    assert stored["module"]["compile"] is True and stored["model"]["grad_checkpointing"] is True
