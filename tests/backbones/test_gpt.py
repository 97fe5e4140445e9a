"""Causal GPT (DiGIT stage 1): KV-cache decoding = the full forward, exact causality in any fixed order, the causal
module with discrete (categorical) and continuous (diffusion, energy) heads, the paper size."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate

from contgen.backbones.gpt import GPTBackbone
from contgen.backbones.mar import MARBackbone
from contgen.heads.categorical import CategoricalHead
from contgen.heads.diffusion import DiffusionHead
from contgen.heads.energy import EnergyHead
from contgen.heads.transport import TransportHead
from contgen.modules.causal_ar import CausalARModule
from contgen.modules.token_ar import TokenARModule
from contgen.samplers.causal import CausalARSampler
from contgen.samplers.masked import MaskedARSampler
from contgen.tokenizers.base import unpatchify
from contgen.tokenizers.patch import PatchTokenizer
from tests.cli.test_configs import compose_train
from tests.helpers import run_script, train_optim

pytestmark = pytest.mark.usefixtures("one_thread")

L, V, D, K, B = 12, 11, 5, 7, 3
ORDER = [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6]


def gpt(discrete=True, **kw):
    torch.manual_seed(0)
    spec = {"vocab_size": V} if discrete else {"token_dim": D}
    return GPTBackbone(L, K, embed_dim=32, depth=2, num_heads=4, **spec, **kw).eval()


def tokens(discrete=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g) if discrete else torch.randn(B, L, D, generator=g)


LAYOUTS = [dict(norm_first=False), dict(norm_first=True), dict(norm_first=False, order=ORDER)]


@pytest.mark.parametrize("discrete", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["post_ln", "pre_ln", "post_ln_order"])
def test_kv_cache_decoding_equals_the_full_forward(discrete, layout):
    """Step by step, the cached z (and the categorical head's logits on it) equal the uncached forward's row."""
    model, x = gpt(discrete, **layout), tokens(discrete)
    labels, drop = torch.arange(B) % K, torch.tensor([False, True, False])
    head = CategoricalHead(model.cond_dim, V)
    z_full = model(x, labels, drop)
    cache, slots, prev = model.new_cache(B, "cpu"), torch.arange(L), None
    for i, pos in enumerate(model.order.tolist()):
        z = model.decode(prev, labels, slots[i:i + 1], cache, drop)
        torch.testing.assert_close(z, z_full[:, pos], rtol=0, atol=2e-6)
        torch.testing.assert_close(head.net(z), head.net(z_full[:, pos]), rtol=0, atol=2e-6)
        prev = x[:, pos]


@pytest.mark.parametrize("discrete", [True, False])
@pytest.mark.parametrize("order", [None, ORDER], ids=["raster", "fixed_order"])
def test_causality_is_exact_in_the_order(discrete, order):
    """Changing the token generated at step t leaves z of steps <= t bit-identical and changes every later one."""
    model, x = gpt(discrete, order=order), tokens(discrete)
    labels = torch.arange(B) % K
    steps = order or list(range(L))
    z = model(x, labels)
    for t in (0, 4, L - 1):
        y = x.clone()
        y[:, steps[t]] = (y[:, steps[t]] + 1) % V if discrete else y[:, steps[t]] + 1.0
        w = model(y, labels)
        earlier, later = steps[:t + 1], steps[t + 1:]
        assert torch.equal(w[:, earlier], z[:, earlier])
        assert all(not torch.allclose(w[:, p], z[:, p]) for p in later)


def test_class_and_null_class_condition_every_position():
    model, x = gpt(), tokens()
    z = model(x, torch.zeros(B, dtype=torch.long))
    assert not torch.allclose(model(x, torch.ones(B, dtype=torch.long))[:, 0], z[:, 0])
    dropped = model(x, torch.ones(B, dtype=torch.long), torch.ones(B, dtype=torch.bool))
    assert torch.equal(dropped, model(x, torch.full((B,), 3), torch.ones(B, dtype=torch.bool)))  # label ignored


@pytest.mark.parametrize("order", [None, ORDER], ids=["raster", "fixed_order"])
def test_sampler_follows_the_order_greedy_equals_uncached_decoding(order):
    """Greedy sampling through the cache = decoding with full forwards, writing position order[i] at step i."""
    model = gpt(order=order)
    head = CategoricalHead(model.cond_dim, V)
    labels = torch.tensor([0, 3, 6])
    out = CausalARSampler(temperature=0.0)(model, head, labels)
    ref = torch.zeros(B, L, dtype=torch.long)
    for pos in order or range(L):
        ref[:, pos] = head.net(model(ref, labels)[:, pos]).argmax(-1)
    assert torch.equal(out, ref)


def test_sampler_cfg_doubles_the_batch_with_the_null_class():
    model = gpt(label_drop_prob=0.1)
    head = CategoricalHead(model.cond_dim, V)
    labels = torch.tensor([0, 3, 6])
    out = CausalARSampler(cfg=3.0, temperature=0.0)(model, head, labels)
    ref = torch.zeros(B, L, dtype=torch.long)
    null = torch.ones(B, dtype=torch.bool)
    for pos in range(L):
        cond, uncond = head.net(model(ref, labels)[:, pos]), head.net(model(ref, labels, null)[:, pos])
        ref[:, pos] = (uncond + 3.0 * (cond - uncond)).argmax(-1)
    assert torch.equal(out, ref)


def test_bad_configs_name_their_keys():
    with pytest.raises(ValueError, match="model.order must be a permutation"):
        gpt(order=[0] * L)
    with pytest.raises(ValueError, match="exactly one of token_dim"):
        GPTBackbone(L, K, 32, 1, 4, token_dim=D, vocab_size=V)
    with pytest.raises(ValueError, match=r"model.vocab_size=11 expects token ids"):
        gpt()(tokens(False), torch.zeros(B, dtype=torch.long))


def test_grad_checkpointing_gives_the_same_gradients():
    x, labels = tokens(), torch.arange(B) % K
    grads = []
    for ckpt in (False, True):
        model = gpt(grad_checkpointing=ckpt, dropout=0.0).train()
        model(x, labels).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_overfits_a_tiny_discrete_set():
    """8 fixed id sequences, one per class, label smoothing 0: the loss goes to ~0 and greedy sampling returns them
    (digit.md §6 tiny plan)."""
    torch.manual_seed(0)
    data = torch.randint(0, V, (8, L), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8)
    model = GPTBackbone(L, 8, embed_dim=32, depth=2, num_heads=4, vocab_size=V, norm_first=True, dropout=0.0)
    head = CategoricalHead(model.cond_dim, V, label_smoothing=0.0)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(150):
        loss = head.loss(data.flatten(), model(data, labels).flatten(0, 1))
        opt.zero_grad(), loss.backward(), opt.step()
    assert loss.item() < 0.05
    assert torch.equal(CausalARSampler(temperature=0.0)(model.eval(), head, labels), data)


class LevelTokenizer(PatchTokenizer):
    """A toy discrete tokenizer: the mean of each p×p patch, quantized to ``vocab_size`` grey levels."""

    vocab_size = 8

    def sample(self, moments, generator=None):
        return ((moments.mean(-1) + 1) / 2 * self.vocab_size).long().clamp(0, self.vocab_size - 1)

    def decode(self, ids):
        grey = (ids.float() + 0.5) / self.vocab_size * 2 - 1
        return unpatchify(grey[..., None].expand(-1, -1, self.token_dim), self.patch_size, self.grid)


GPT_SMALL = functools.partial(GPTBackbone, embed_dim=32, depth=2, num_heads=2, label_drop_prob=0.1, dropout=0.0)
HEADS = {"categorical": CategoricalHead,
         "diffusion": functools.partial(DiffusionHead, width=32, depth=1, num_sampling_steps=4, batch_mul=2),
         "energy": functools.partial(EnergyHead, width=32, depth=1, noise_channels=8),
         "flow": functools.partial(TransportHead, width=32, depth=1, batch_mul=1, solver={
             "name": "euler", "steps": 3, "time_dist_ctrl": [1, 1, 1], "rfba_gap_steps": [0, 0]})}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_causal_module_trains_and_samples_with_any_head(head):
    tokenizer = LevelTokenizer(16, 4) if head == "categorical" else PatchTokenizer(16, 4)
    torch.manual_seed(0)
    module = CausalARModule(tokenizer, GPT_SMALL, HEADS[head], CausalARSampler(cfg=2.0), num_classes=12,
                            optim=train_optim())
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, "label": torch.arange(8)}
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-3)
    for step in range(2):
        g, g_cpu = module.step_generators(step)
        x = module.tokens_from_batch(batch, g)
        assert x.shape == ((8, 16) if head == "categorical" else (8, 16, 48))
        loss = module.masked_loss(x, batch["label"], g, g_cpu)
        loss.backward()
        opt.step(), opt.zero_grad()
    assert torch.isfinite(loss) and loss.ndim == 0
    images = module.generate(torch.tensor([0, 11]), generator=torch.Generator().manual_seed(0), use_ema=False)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_mismatched_pieces_are_clear_errors():
    make = functools.partial(CausalARModule, num_classes=4, optim=train_optim())
    with pytest.raises(ValueError, match="loss=categorical"):
        make(LevelTokenizer(16, 4), GPT_SMALL, HEADS["diffusion"], CausalARSampler())
    with pytest.raises(ValueError, match="a continuous head"):
        make(PatchTokenizer(16, 4), GPT_SMALL, CategoricalHead, CausalARSampler())
    with pytest.raises(ValueError, match="sampler=causal"):
        make(PatchTokenizer(16, 4), GPT_SMALL, HEADS["diffusion"], MaskedARSampler(num_iter=4))
    mar = functools.partial(MARBackbone, encoder_embed_dim=8, encoder_depth=1, encoder_num_heads=2,
                            decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, buffer_size=1)
    with pytest.raises(ValueError, match="module=token_ar"):
        make(PatchTokenizer(16, 4), mar, HEADS["diffusion"], CausalARSampler())
    with pytest.raises(ValueError, match="module=token_ar"):  # MAR embeds ids too (MAR Table 1), but is masked
        make(LevelTokenizer(16, 4), mar, CategoricalHead, CausalARSampler())

    class NoIds(torch.nn.Module):  # a backbone without embeds_ids: continuous tokens only
        pass

    with pytest.raises(ValueError, match="must embed ids"):
        make(LevelTokenizer(16, 4), NoIds, CategoricalHead, CausalARSampler())
    with pytest.raises(ValueError, match="module=causal_ar"):
        TokenARModule(PatchTokenizer(16, 4), GPT_SMALL, HEADS["diffusion"], MaskedARSampler(num_iter=4),
                      num_classes=4, optim=train_optim())


@pytest.mark.parametrize("name,vocab,params", [("gpt_digit_b", 8192, 219.4e6), ("gpt_digit_l", 16384, 731.9e6)])
def test_digit_sizes(name, vocab, params):
    """Stage-1 GPT + categorical head with DiGIT's vocabularies and 1000 classes: digit.md §2's ≈219.4M / ≈731.9M."""
    cfg = compose_train(f"model={name}", "loss=categorical")
    with torch.device("meta"):
        model = instantiate(cfg.model)(seq_len=256, num_classes=1000, vocab_size=vocab)
        head = instantiate(cfg.loss)(cond_dim=model.cond_dim, vocab_size=vocab)
    n = sum(p.numel() for m in (model, head) for p in m.parameters())
    assert abs(n / params - 1) < 0.01, n
    assert not model.decoder_blocks[0].norm_first and isinstance(model.norm, torch.nn.Identity)  # post-LN, no final LN


@pytest.mark.slow
def test_train_py_causal_gpt_with_a_continuous_head(tmp_path):
    """`python train.py module=causal_ar model=gpt_tiny sampler=causal` (pixel patches, diffusion head) at tiny size:
    4 steps, a checkpoint, the sample grid."""
    from contgen.cli.checkpoint_io import load_checkpoint

    run = tmp_path / "run"
    run_script("train.py", "module=causal_ar", "model=gpt_tiny", "sampler=causal", "sampler.cfg=2.0", "debug=limit",
               "data.image_size=16", "data.train.num_samples=64", "data.batch_size=16", "data.num_workers=0",
               "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "loss.width=32", "loss.depth=1",
               "loss.num_sampling_steps=4", "evaluate_after_fit=false", f"hydra.run.dir={run}")
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["contgen"]["config"]["module"]["_target_"].endswith("CausalARModule")
    assert any(k.startswith("net.backbone.decoder_blocks.0.") for k in state["state_dict"])
    assert list((run / "samples").glob("step_*.png"))
