"""linear_probe.py (DiGIT's stage-1 linear probe): hooks read the right states, the probe is deterministic and
learns, errors come before compute, and the whole script on a tiny stage-1 GPT beats chance."""

import json

import pytest
import torch

from contgen.backbones.gpt import GPTBackbone
from contgen.cli.linear_probe import (PooledStates, chance_quantile, check_checkpoint, fit_linear, pooled_features,
                                      probe_layers, untrained_copy)
from tests.helpers import run_script

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(**kw) -> GPTBackbone:
    torch.manual_seed(0)
    return GPTBackbone(seq_len=6, num_classes=3, embed_dim=16, depth=2, num_heads=2, dropout=0.0, **kw).eval()


@pytest.mark.parametrize("kind", ["ids", "continuous"])
def test_pooled_states_are_the_null_class_inner_states(kind):
    """Layer 0 = the embedded sequence [null class, t_1..t_{L-1}] + positions, layer n = block n's output, each
    averaged over the sequence; the hooks are gone afterwards."""
    model = tiny_gpt(vocab_size=11) if kind == "ids" else tiny_gpt(token_dim=4, order=[5, 4, 3, 2, 1, 0])
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(11, (5, 6), generator=g) if kind == "ids" else torch.randn(5, 6, 4, generator=g)
    feats = pooled_features(model, [tokens[:3], tokens[3:]], [0, 1, 2], "fp32", "test")
    assert feats.shape == (3, 5, 16)
    null = (model.embed_scale * model.class_emb.weight[model.num_classes]).expand(5, 1, -1)  # the null class's row
    x = torch.cat([null, model.embed_tokens(tokens.index_select(1, model.order[:-1]))], 1) + model.pos_emb
    want = [x.mean(1)]
    for block in model.decoder_blocks:
        x = block(x, causal=True)
        want.append(x.mean(1))
    torch.testing.assert_close(feats, torch.stack(want).detach())
    assert not model.embed_drop._forward_hooks and not model.decoder_blocks[0]._forward_hooks
    with PooledStates(model, [1]) as hooks:  # the label does not matter: the null class replaces it
        model(tokens, torch.full((5,), 2), torch.ones(5, dtype=torch.bool))
        torch.testing.assert_close(hooks.pop()[0], want[1].detach())


def test_untrained_copy_is_fresh_and_seeded():
    model = tiny_gpt(vocab_size=11)
    with torch.no_grad():
        model.pos_emb.add_(1.0)
    state = torch.random.get_rng_state()
    a, b = untrained_copy(model, 3), untrained_copy(model, 3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.pos_emb, model.pos_emb) and a.pos_emb.abs().mean() < 0.5
    assert not torch.equal(a.decoder_blocks[1].mlp.fc1.weight, model.decoder_blocks[1].mlp.fc1.weight)


def test_fit_linear_learns_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 8, generator=g)
    y = torch.arange(400) % 4
    x = centres[y] + torch.randn(400, 8, generator=g) + 50  # an offset: the standardization takes it out
    a = fit_linear(x[:300], y[:300], x[300:], y[300:], 4)
    assert a == fit_linear(x[:300], y[:300], x[300:], y[300:], 4)
    assert a["val_top1"] > 0.9 and a["train_top1"] > 0.9
    noise = torch.randn(400, 8, generator=g)  # no label information: near chance on val
    assert fit_linear(noise[:300], y[:300], noise[300:], y[300:], 4)["val_top1"] < chance_quantile(100, 4)


def test_chance_quantile():
    assert chance_quantile(1, 2) == 1.0 and chance_quantile(10, 1) == 1.0
    q = chance_quantile(600, 12)
    assert 1 / 12 < q < 0.13  # mean 0.083, sd 0.011: about 0.083 + 3.1 sd
    assert chance_quantile(600, 12, 0.5) == pytest.approx(50 / 600)


def test_errors_before_compute(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt=.*nope.ckpt: no such file"):
        check_checkpoint(str(tmp_path / "nope.ckpt"))
    masked = tmp_path / "mar.ckpt"
    torch.save({"contgen": {"config": {"module": {"_target_": "contgen.modules.token_ar.TokenARModule"},
                                       "model": {"_target_": "contgen.backbones.mar.MARBackbone"}}}}, masked)
    with pytest.raises(ValueError, match=r"module._target_=contgen.modules.token_ar.TokenARModule is not a causal GPT"):
        check_checkpoint(str(masked))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not written by contgen"):
        check_checkpoint(str(foreign))
    assert probe_layers(None, 4) == [0, 1, 2, 3] and probe_layers([4, 0, 0], 4) == [0, 4]
    with pytest.raises(ValueError, match=r"layers=\[0, 5\]: indices must lie in 0..4"):
        probe_layers([0, 5], 4)


def test_config_composes_with_and_without_data(tmp_path):
    """``data`` is optional: ``data=<group>`` picks the data set, none = the checkpoint's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    from tests.helpers import ROOT

    try:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            bare = compose("linear_probe.yaml", overrides=["ckpt=x.ckpt", "paths.output_dir=."])
            assert bare.get("data") is None and bare.layers is None and bare.baseline and bare.probe.max_iter == 200
            cfg = compose("linear_probe.yaml", overrides=["ckpt=x.ckpt", "data=digits", "paths.output_dir=."])
            assert cfg.data.train._target_ == "contgen.data.digits.Digits" and cfg.data.train.seed == cfg.seed
            with pytest.raises(MissingConfigException):
                compose("linear_probe.yaml", overrides=["ckpt=x.ckpt", "data=nope"])
            from contgen.cli.linear_probe import datasets

            train, val, _ = datasets(cfg, {})  # each image once: no `repeat` (data=digits has 4)
            assert len(train) + len(val) == 1797 and train.repeat == 1 and 150 < len(val) < 200  # sklearn: 1797 digits
            cfg.train_samples, cfg.val_samples = 100, 50  # no num_samples argument: a seeded random subset
            train, val, _ = datasets(cfg, {})
            assert len(train) == 100 and len(val) == 50 and train.num_classes == 10
            shapes = compose("linear_probe.yaml", overrides=["ckpt=x.ckpt", "data=shapes", "train_samples=24",
                                                             "paths.output_dir=."])
            train, val, _ = datasets(shapes, {})  # sized by num_samples; the fresh-each-epoch stream is off
            assert len(train) == 24 and not train.fresh_each_epoch and len(val) == 12800
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_linear_probe_py_on_a_tiny_stage1_gpt(tmp_path):
    """train.py trains a tiny causal GPT (pixel patches, diffusion head: continuous GPT inputs) for 30 steps;
    linear_probe.py probes its layers 0..depth-1 and an untrained copy. The best layer's val top-1 must beat the
    99.9% quantile of a label-independent predictor's accuracy on the val images (12 balanced classes: Binomial(n,
    1/12) / n: 72/600 = 0.12 at n = 600, against a mean of 0.083)."""
    run = tmp_path / "run"
    run_script("train.py", "module=causal_ar", "model=gpt_tiny", "sampler=causal", "sampler.cfg=1.0",
               "data.image_size=16", "data.train.num_samples=480", "data.batch_size=16", "data.num_workers=0",
               "trainer.max_epochs=1", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "loss.width=32",
               "loss.depth=1", "evaluate_after_fit=false", "callbacks.sample_grid=null", f"hydra.run.dir={run}")
    out = tmp_path / "probe"
    proc = run_script("linear_probe.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "data=shapes",
                      "train_samples=1200", "val_samples=600", f"hydra.run.dir={out}")
    result = json.loads((out / "linear_probe.json").read_text())
    assert result["val_images"] == 600 and result["train_images"] == 1200 and result["null_class"]
    assert [r["layer"] for r in result["layers"]] == [0, 1]  # depth 2: the embedding and block 1
    bound = chance_quantile(600, 12)
    assert bound == pytest.approx(72 / 600)
    assert result["best"]["val_top1"] > bound, result["best"]
    base = result["baseline_untrained"]
    assert [r["layer"] for r in base["layers"]] == [0, 1] and 0 <= base["best"]["val_top1"] <= 1
    assert "best: layer" in proc.stdout and "untrained val" in proc.stdout

    with pytest.raises(AssertionError, match="data.image_size=32, but the checkpoint's tokenizer takes 16 px"):
        run_script("linear_probe.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "data=shapes",
                   "data.image_size=32", f"hydra.run.dir={tmp_path / 'bad'}")
