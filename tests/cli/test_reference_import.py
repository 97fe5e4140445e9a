"""Released reference checkpoints through the CLI importer (``load_module(..., reference=<experiment>)``).

The files are the reference-made fixtures (tests/fixtures/make_reference_fixtures.py): a MAR (``diffloss.*``) and an
EAR (``scoreloss.*``) checkpoint in the layout of the references' util/misc.py ``save_model``, both with 10
classes, and a KL-16-layout VAE. The paper experiments are shrunk to the fixtures' sizes by overrides only (names
and structure unchanged); whole sampling runs with the reference's draws replayed must give the reference's
tokens, and for MAR the reference's decoded images. Tolerance: see tests/parity/test_parity_mar.py.
"""

import argparse

import pytest
import torch

from contgen.cli.load import load_module
from contgen.utils.reference_ckpt import reference_num_classes
from tests.parity.replay import FIXTURES, Replay, load, sampling_draws

TOL = dict(rtol=1e-5, atol=1e-5)
VAE = load("kl16_outputs.pt")
TOKENIZER = {"tokenizer.ckpt_path": str(FIXTURES / "kl16_small.pth"), "+tokenizer.ch": 32, "tokenizer.ch_mult": "[2,1]",
             "+tokenizer.num_res_blocks": 1, "+tokenizer.attn_resolutions_enc": "[4]", "tokenizer.image_size": 8}
MAR = {"model.encoder_embed_dim": 32, "model.encoder_depth": 2, "model.encoder_num_heads": 4,
       "model.decoder_embed_dim": 24, "model.decoder_depth": 2, "model.decoder_num_heads": 3, "model.buffer_size": 4,
       "loss.width": 32, "loss.depth": 2, "loss.num_sampling_steps": 10, "loss.batch_mul": 2, "sampler.num_iter": 4,
       **TOKENIZER}  # num_iter: the paper recipes use 256 / 64 steps, more than the 16 tokens here
EAR = {"model.embed_dim": 32, "model.depth": 3, "model.num_heads": 4, "model.buffer_size": 4, "loss.width": 32,
       "loss.depth": 2, "loss.noise_channels": 8, "loss.score_batch_mul": 2, **TOKENIZER}


def _sampler(run: dict) -> dict:
    return {"sampler.num_iter": run["num_iter"], "sampler.cfg": run["cfg"], "sampler.cfg_schedule": run["cfg_schedule"],
            "sampler.temperature": run["temperature"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_class_count_comes_from_the_checkpoint():
    assert reference_num_classes(str(FIXTURES / "mar_ckpt.pth")) == 10
    assert reference_num_classes(str(FIXTURES / "ear_ckpt.pth")) == 10


def test_mar_checkpoint_samples_and_decodes_like_the_reference():
    """experiment=mar_base_in256 at the fixture's sizes: raw + EMA weights, 10 classes, and a linear-CFG run
    (sampling with the EMA weights, decoding with the KL-16 file) equal to the reference's images."""
    i = next(i for i, r in enumerate(load("mar_outputs.pt")["sampling"]) if r["cfg"] != 1.0 and r["cfg_schedule"] == "linear")
    run = load("mar_outputs.pt")["sampling"][i]
    module, cfg = load_module(str(FIXTURES / "mar_ckpt.pth"), "cpu", {**MAR, **_sampler(run)}, reference="mar_base_in256")
    ckpt = torch.load(FIXTURES / "mar_ckpt.pth", weights_only=True)
    for net, key in ((module.net, "model"), (module.ema.shadow, "model_ema")):
        state = {**net.backbone.state_dict(), **{f"diffloss.{k}": v for k, v in net.head.state_dict().items()}}
        assert all(torch.equal(state[k], ckpt[key][k]) for k in ckpt[key]) and state.keys() == ckpt[key].keys()
    assert module.net.backbone.num_classes == 10 and cfg["sampler"]["cfg"] == run["cfg"]
    with Replay(sampling_draws(run, module.net.backbone.seq_len, "mar")) as r:
        images = module.generate(run["labels"])
    r.done()
    torch.testing.assert_close(images, VAE["mar_run_decoded"][i].clamp(-1, 1), **TOL)


def test_released_ear_checkpoint_goes_through_the_same_importer():
    """An EAR .pth (``scoreloss.*`` head keys) via reference=ear_base_in256: a linear-CFG run at
    infer_temperature 0.7 gives the reference's tokens."""
    runs = load("ear_outputs.pt")["sampling"]
    run = next(r for r in runs if r["cfg"] != 1.0 and r["cfg_schedule"] == "linear" and r["temperature"] != 1.0)
    module, _ = load_module(str(FIXTURES / "ear_ckpt.pth"), "cpu", {**EAR, **_sampler(run)}, reference="ear_base_in256")
    assert module.net.backbone.num_classes == 10
    with Replay(sampling_draws(run, module.net.backbone.seq_len, "ear")) as r:
        tokens = module.generate_tokens(run["labels"])
    r.done()
    torch.testing.assert_close(tokens, run["tokens"], **TOL)


def test_pickled_args_need_opt_in(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({**torch.load(FIXTURES / "mar_ckpt.pth", weights_only=True),
                "args": argparse.Namespace(model="mar_base")}, path)  # as the reference's save_model writes it
    with pytest.raises(ValueError, match="allow_pickle=true"):
        load_module(str(path), "cpu", MAR, reference="mar_base_in256")
    module, _ = load_module(str(path), "cpu", MAR, reference="mar_base_in256", allow_pickle=True)
    assert module.net.backbone.num_classes == 10


def test_file_without_class_embedding_is_a_clear_error(tmp_path):
    ckpt = torch.load(FIXTURES / "mar_ckpt.pth", weights_only=True)
    for key in ("model", "model_ema"):
        del ckpt[key]["class_emb.weight"]
    path = tmp_path / "no_classes.pth"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="class_emb.weight"):
        load_module(str(path), "cpu", MAR, reference="mar_base_in256")


def test_released_denoiser_samples_through_the_transport_family():
    """UCGM's {"model", "ema"} TiT file (made by its networks/tit.py, tests/fixtures/make_denoiser_fixtures.py) via
    reference=ucgm_multistep_in256 shrunk to the fixture's sizes, decoded by the tiny diffusers SD-VAE fixture: the
    class count comes from the label table, ``model`` goes to the module, ``ema`` to its EMA copy, whose output on
    the fixture's inputs is the reference network's; then UCGM-S samples it."""
    path = FIXTURES / "denoisers" / "tit_ucgm.pt"
    sizes = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 2,
             "tokenizer.ckpt_path": str(FIXTURES / "sdvae" / "tiny"), "tokenizer.block_out_channels": "[8,8,16]",
             "tokenizer.norm_num_groups": 4, "data.image_size": 32, "sampler.steps": 4}
    module, cfg = load_module(str(path), "cpu", sizes, reference="ucgm_multistep_in256")
    assert module.num_classes == 10 and cfg["model"]["_target_"].endswith("TiT")
    ckpt = torch.load(path, weights_only=True)
    for net, key in ((module.net.denoiser, "model"), (module.ema.shadow.denoiser, "ema")):
        assert all(torch.equal(v, ckpt[key][k]) for k, v in net.state_dict().items()) and net.state_dict().keys() == ckpt[key].keys()
    ref = load("denoisers/outputs.pt")["tit"]
    torch.testing.assert_close(module.ema.shadow.denoiser(ref["x"], ref["t"], ref["y"]), ref["out"], **TOL)
    images = module.generate(torch.tensor([0, 9]), generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
