"""A released reference MAR .pth (``model`` / ``model_ema`` under the reference's names) loads for sampling."""

import argparse

import pytest
import torch

from contgen.cli.load import load_reference

# the mar_base_in256 recipe, shrunk so the test runs in seconds (names and structure are unchanged)
SMALL = {"model.encoder_depth": 1, "model.decoder_depth": 1, "loss.width": 64, "loss.depth": 1,
         "tokenizer.ckpt_path": "null", "+tokenizer.random_init": "true", "sampler.num_iter": 2, "loss.num_sampling_steps": 2}


def _reference_layout(module, prefix="diffloss."):
    def flat(net):
        state = dict(net.backbone.state_dict())
        state.update({prefix + k: v for k, v in net.head.state_dict().items()})
        return state
    return {"model": flat(module.net), "model_ema": flat(module.ema.shadow)}


def test_released_checkpoint_loads_raw_and_ema(tmp_path):
    from contgen.cli.build import build_module
    from hydra import compose, initialize_config_dir

    from tests.helpers import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=["experiment=mar_base_in256", "paths.output_dir=.", "data.root=null",
                                                *[f"{k}={v}" for k, v in SMALL.items()]])
    torch.manual_seed(1)
    source = build_module(cfg, 1000)
    for p in source.ema.shadow.parameters():  # make the EMA differ from the raw weights
        p.data.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "checkpoint-last.pth"
    torch.save(_reference_layout(source), path)

    module, _ = load_reference(str(path), "mar_base_in256", "cpu", SMALL)
    for mine, ref in ((module.net, source.net), (module.ema.shadow, source.ema.shadow)):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), ref.state_dict().values()))
    images = module.generate(torch.tensor([3, 999]), generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 256, 256) and torch.isfinite(images).all()

    torch.save({**_reference_layout(source), "args": argparse.Namespace(model="mar_base")}, path)
    with pytest.raises(ValueError, match="allow_pickle=true"):
        load_reference(str(path), "mar_base_in256", "cpu", SMALL)
    load_reference(str(path), "mar_base_in256", "cpu", SMALL, allow_pickle=True)
