"""DiGIT stage 2, the pixel decoder (contgen/modules/pixel_decoder.py): the prefix backbones (GPT prefix-LM with a KV
cache, the bidirectional MaskGIT stack), MaskGIT's confidence sampler, both modules overfitting a tiny set, the
stage-1 link and its errors, and `digit.py` (the pipeline) end to end on the built-in data."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from scipy.stats import binom

from contgen.backbones.gpt import GPTBackbone
from contgen.backbones.prefix import PrefixEARBackbone
from contgen.data.shapes import Shapes
from contgen.heads.categorical import CategoricalHead
from contgen.heads.diffusion import DiffusionHead
from contgen.modules.causal_ar import CausalARModule
from contgen.modules.pixel_decoder import CausalPixelDecoder, MaskedPixelDecoder
from contgen.samplers.causal import CausalARSampler
from contgen.samplers.maskgit import MaskGITSampler
from contgen.samplers.masked import MaskedARSampler
from contgen.samplers.schedules import cosine_mask_schedule
from contgen.tokenizers.patch import PatchTokenizer
from contgen.tokenizers.vq_small import VQSmallTokenizer
from tests.helpers import run_script, train_optim
from tests.tokenizers.test_digit import centroids, tokenizer  # noqa: F401 (the module-scoped K-means fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

P, L, V, PV, B = 5, 7, 11, 9, 3


def prefix_gpt(**kw):
    torch.manual_seed(0)
    return GPTBackbone(L, 1, embed_dim=32, depth=2, num_heads=4, vocab_size=V, prefix_len=P, prefix_vocab=PV,
                       **kw).eval()


def prefix_ear():
    torch.manual_seed(0)
    return PrefixEARBackbone(L, 1, prefix_len=P, prefix_vocab=PV, embed_dim=32, depth=2, num_heads=4,
                             vocab_size=V, attn_dropout=0.0, proj_dropout=0.0).eval()


def ids(high, n, seed):
    return torch.randint(0, high, (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm_first", [True, False])
def test_prefix_gpt_cache_equals_forward_and_is_causal(norm_first):
    """The prefix is written to the cache in one pass; every later step equals the full forward's row; a token
    changes no earlier output; the prefix conditions every output."""
    model, x, pre = prefix_gpt(norm_first=norm_first), ids(V, L, 0), ids(PV, P, 1)
    z = model(x, pre)
    cache, slots, prev = model.new_cache(B, "cpu"), torch.arange(L), None
    for i in range(L):
        torch.testing.assert_close(model.decode(prev, pre, slots[i:i + 1], cache), z[:, i], rtol=0, atol=2e-6)
        prev = x[:, i]
    x2 = x.clone()
    x2[:, 4] = (x2[:, 4] + 1) % V
    z2 = model(x2, pre)
    assert torch.equal(z2[:, :5], z[:, :5]) and (z2[:, 5:] - z[:, 5:]).abs().amax() > 1e-3
    pre2 = pre.clone()
    pre2[:, -1] = (pre2[:, -1] + 1) % PV
    assert ((model(x, pre2) - z).abs().amax(-1) > 1e-4).all()  # the last prefix id reaches every position


def test_prefix_ear_hides_masked_tokens_and_sees_the_prefix():
    model, x, pre = prefix_ear(), ids(V, L, 0), ids(PV, P, 1)
    order = torch.rand(B, L, generator=torch.Generator().manual_seed(2)).argsort(1)
    z = model(x, pre, order, 3)
    x2 = x.scatter(1, order[:, :3], (x.gather(1, order[:, :3]) + 1) % V)  # change the masked ids only
    assert torch.equal(model(x2, pre, order, 3), z)
    pre2 = (pre + 1) % PV
    assert (model(x, pre2, order, 3) - z).abs().amax() > 1e-3


@pytest.mark.parametrize("make", [prefix_gpt, prefix_ear], ids=["gpt", "ear"])
def test_every_parameter_gets_a_gradient(make):
    """DDP (find_unused_parameters false) needs a gradient for every parameter at every step: nothing of the class
    conditioning (the null class, fake_latent) may be left unused by the prefix."""
    model, x, pre = make().train(), ids(V, L, 0), ids(PV, P, 1)
    z = model(x, pre) if make is prefix_gpt else model(x, pre, torch.arange(L).expand(B, -1), 3)
    z.square().sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_prefix_errors_name_the_key():
    with pytest.raises(ValueError, match="model.label_drop_prob=0.1.*no null class"):
        prefix_gpt(label_drop_prob=0.1)
    with pytest.raises(ValueError, match="prefix_len and prefix_vocab go together"):
        GPTBackbone(L, 1, embed_dim=32, depth=1, num_heads=4, vocab_size=V, prefix_len=P)
    with pytest.raises(ValueError, match=rf"condition ids \(B, {P}\) int64"):
        prefix_gpt()(ids(V, L, 0), torch.zeros(B, P + 1, dtype=torch.long))


class CountingBackbone(torch.nn.Module):
    """A stand-in that records what the sampler shows it: the masked count and the kept tokens."""

    vocab_size, seq_len = V, 16

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, tokens, cond, order, num_masked, drop=None):
        masked = torch.zeros_like(tokens, dtype=torch.bool).scatter(1, order[:, :num_masked], True)
        self.calls.append((num_masked, tokens.clone(), masked))
        return torch.randn(tokens.shape[0], self.seq_len, 8, generator=torch.Generator().manual_seed(len(self.calls)))


def test_maskgit_sampler_follows_the_cosine_count_and_keeps_kept_tokens():
    backbone, head = CountingBackbone(), CategoricalHead(8, V)
    out = MaskGITSampler(num_iter=5)(backbone, head, torch.zeros(B, P, dtype=torch.long),
                                     torch.Generator().manual_seed(0))
    counts = [c[0] for c in backbone.calls]
    assert counts == [16] + cosine_mask_schedule(16, 5)[:-1]  # DiGIT: floor(L cos(π/2 · r)), clamped
    for (_, tokens, masked), (_, later, later_masked) in zip(backbone.calls, backbone.calls[1:]):
        assert (later_masked <= masked).all()  # a kept token is never masked again
        kept = ~masked
        assert torch.equal(later[kept], tokens[kept])
    assert out.shape == (B, 16) and out.dtype == torch.long and out.max() < V
    with pytest.raises(ValueError, match="loss=categorical"):
        MaskGITSampler()(backbone, DiffusionHead(8, 4, width=8, depth=1), torch.zeros(B, P, dtype=torch.long))


def test_maskgit_remasks_the_least_confident_draws():
    """Choice temperature 0: the positions masked again are exactly the drawn ones of lowest log-probability."""
    backbone, head = CountingBackbone(), CategoricalHead(8, V)
    MaskGITSampler(num_iter=3, choice_temperature=0.0)(backbone, head, torch.zeros(B, P, dtype=torch.long),
                                                       torch.Generator().manual_seed(0))
    (n0, _, masked0), (n1, tokens1, masked1) = backbone.calls[:2]
    z0 = torch.randn(B, 16, 8, generator=torch.Generator().manual_seed(1))  # what the stand-in returned at call 1
    logp = head.guided_logits(z0).log_softmax(-1).gather(-1, tokens1[..., None])[..., 0]  # of the drawn ids
    expected = logp.argsort(dim=1)[:, :n1]  # all 16 were drawn at step 0
    assert torch.equal(masked1, torch.zeros_like(masked1).scatter(1, expected, True))


def vq():
    torch.manual_seed(0)
    return VQSmallTokenizer(None, image_size=16, ch=8, levels=2, dim=4, vocab_size=16, random_init=True)


def images(n=8):
    data = Shapes(16, n, seed=3)
    return {"image": torch.stack([data[i]["image"] for i in range(n)]), "label": torch.arange(n) % 12}


SMALL_GPT = functools.partial(GPTBackbone, embed_dim=48, depth=2, num_heads=4, dropout=0.0, norm_first=True)
SMALL_EAR = functools.partial(PrefixEARBackbone, embed_dim=48, depth=2, num_heads=4, attn_dropout=0.0,
                              proj_dropout=0.0)
VARIANTS = {"ar": (CausalPixelDecoder, SMALL_GPT, CausalARSampler(temperature=0), {}),
            "maskgit": (MaskedPixelDecoder, SMALL_EAR, MaskGITSampler(num_iter=4, temperature=0,
                                                                      choice_temperature=0), {"mask_ratio": "cosine"})}


def decoder(variant, centroids, stage1=None):  # noqa: F811
    cls, backbone, sampler, knobs = VARIANTS[variant]
    module = cls(vq(), functools.partial(backbone, prefix_len=16, prefix_vocab=16), CategoricalHead, sampler,
                 num_classes=12, optim=train_optim(ema_decay=0.0, ema_warmup=False), **knobs)
    module.setup_stage2(tokenizer(centroids), stage1)
    return module


@pytest.mark.parametrize("variant", ["ar", "maskgit"])
def test_each_variant_overfits_a_tiny_set(variant, centroids):  # noqa: F811
    """8 fixed images: the label-smoothed CE drops from ≈ ln 16 to within 0.02 of its floor, and rendering their own
    semantic ids (argmax) gives back their VQ ids. The floor of CE against the smoothed target q (q_t = 1 - ε + ε/V,
    else ε/V; ε = 0.1, V = 16) is the entropy H(q) = 0.565."""
    module = decoder(variant, centroids)
    batch = images()
    opt = torch.optim.Adam(module.net.parameters(), lr=3e-3)
    module.train()
    for step in range(80):
        g, g_cpu = module.step_generators(step)
        loss = module.masked_loss(module.tokens_from_batch(batch, g), module.semantic.encode(batch["image"]), g,
                                  g_cpu)
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.ema.update(module.net)  # decay 0: the EMA copy is the trained net
    eps, vocab = module.net.head.label_smoothing, module.tokenizer.vocab_size
    q = torch.tensor([1 - eps + eps / vocab] + [eps / vocab] * (vocab - 1))
    floor = -(q * q.log()).sum().item()
    assert floor <= loss.item() < floor + 0.02
    target = module.tokenizer.encode(batch["image"])
    rendered = module.render_tokens(module.semantic.encode(batch["image"]))
    assert (rendered == target).float().mean() > 0.9
    pixels = module.render(module.semantic.encode(batch["image"][:2]))
    assert pixels.shape == (2, 3, 16, 16) and pixels.abs().max() <= 1


@pytest.mark.parametrize("variant", ["ar", "masked"])
def test_continuous_pixel_tokens_with_a_diffusion_head(variant, centroids):  # noqa: F811
    """Stage 2 over pixel patches (continuous) with MAR's diffusion head: a training step and a render."""
    cls, backbone, sampler = {"ar": (CausalPixelDecoder, SMALL_GPT, CausalARSampler()),
                              "masked": (MaskedPixelDecoder, SMALL_EAR, MaskedARSampler(num_iter=4))}[variant]
    head = functools.partial(DiffusionHead, width=32, depth=1, num_sampling_steps=4)
    module = cls(PatchTokenizer(16, 4), functools.partial(backbone, prefix_len=16, prefix_vocab=16), head, sampler,
                 num_classes=12, optim=train_optim())
    module.setup_stage2(tokenizer(centroids), None)
    batch = images(4)
    g, g_cpu = module.step_generators(0)
    tokens, semantic = module.tokens_from_batch(batch, g), module.semantic.encode(batch["image"])
    assert torch.isfinite(module.masked_loss(tokens, semantic, g, g_cpu))
    backbone, order = module.net.backbone.eval(), torch.arange(16).expand(4, -1)
    z = (lambda s: backbone(tokens, s)) if variant == "ar" else (lambda s: backbone(tokens, s, order, 8))
    assert (z(semantic) - z((semantic + 1) % 16)).abs().amax() > 1e-3  # the semantic ids condition the tokens
    rendered = module.render(module.semantic.encode(batch["image"]), torch.Generator().manual_seed(0))
    assert rendered.shape == (4, 3, 16, 16)


def test_stage1_link_and_errors(centroids, tmp_path):  # noqa: F811
    module = decoder("ar", centroids)
    with pytest.raises(ValueError, match="module.stage1_ckpt"):
        module.generate(torch.tensor([0]))
    with pytest.raises(ValueError, match="sampler.cfg=2.0.*set sampler.cfg=1"):
        CausalPixelDecoder(vq(), functools.partial(SMALL_GPT, prefix_len=16, prefix_vocab=16), CategoricalHead,
                           CausalARSampler(cfg=2.0), num_classes=12, optim=train_optim())
    with pytest.raises(ValueError, match="not a token cache"):
        module.training_step({"moments": torch.zeros(2, 2, 16, 4), "label": torch.zeros(2)}, 0)
    # a stage-1 module on the same semantic tokenizer: classes -> semantic ids -> VQ ids -> pixels
    torch.manual_seed(0)
    stage1 = CausalARModule(tokenizer(centroids), functools.partial(GPTBackbone, embed_dim=32, depth=1, num_heads=2),
                            CategoricalHead, CausalARSampler(), num_classes=12, optim=train_optim())
    module = decoder("ar", centroids, stage1.requires_grad_(False))
    out = module.generate(torch.tensor([0, 5]), torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16)
    state = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(state)
    assert not any(k.startswith(("semantic.", "stage1.", "tokenizer.")) for k in state["state_dict"])
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=True)


def compose_digit(*overrides: str):
    from hydra import compose, initialize_config_dir

    from tests.tokenizers.test_digit import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("digit.yaml", overrides=list(overrides))


def test_digit_pipeline_commands_skip_and_resume(tmp_path, monkeypatch):
    """One set of encoder settings reaches K-means, stage 1 and stage 2's semantic tokenizer; a finished stage is
    skipped, an interrupted training resumes from its last.ckpt, one that left no checkpoint is moved aside."""
    import subprocess

    from contgen.cli import digit

    cfg = compose_digit(f"out={tmp_path}", "encoder.stage=3", "k=8", "stage1.trainer.max_epochs=1",
                        "+stage2.module=pixel_decoder_maskgit")
    cmds = digit.stage_commands(cfg, tmp_path)
    assert "tokenizer.stage=3" in cmds["kmeans"] and "tokenizer.stage=3" in cmds["stage1"]
    assert "module.semantic.stage=3" in cmds["stage2"] and "k=8" in cmds["kmeans"]
    assert "trainer.max_epochs=1" in cmds["stage1"] and "module=pixel_decoder_maskgit" in cmds["stage2"]
    assert f"module.stage1_ckpt={tmp_path}/stage1/checkpoints/last.ckpt" in cmds["stage2"]

    ran = []
    monkeypatch.setattr(subprocess, "run", lambda argv: ran.append(argv) or subprocess.CompletedProcess(argv, 0))
    for stage in ("kmeans", "vq"):  # done with these settings
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "DONE").write_text(" ".join(cmds[stage]))
    (tmp_path / "stage1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "stage1" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "config.yaml").write_text("")  # failed before its first checkpoint
    digit.run_pipeline(cfg)
    assert [argv[1].rsplit("/", 1)[-1] for argv in ran] == ["train.py", "train.py"]
    assert "ckpt_path=last" in ran[0] and "ckpt_path=last" not in ran[1]
    assert len(list(tmp_path.glob("stage2.failed-*/config.yaml"))) == 1
    assert all((tmp_path / s / "DONE").is_file() for s in digit.STAGES)
    ran.clear()
    digit.run_pipeline(cfg)  # the same settings: nothing to do
    assert ran == []
    digit.run_pipeline(compose_digit(f"out={tmp_path}", "encoder.stage=3", "k=16", "stage1.trainer.max_epochs=1",
                                     "+stage2.module=pixel_decoder_maskgit"))  # K changed: every stage is redone
    assert [argv[1].rsplit("/", 1)[-1] for argv in ran] == ["fit_kmeans.py", "train_vq.py", "train.py", "train.py"]
    assert all(len(list(tmp_path.glob(f"{s}.changed-*/DONE"))) == 1 for s in digit.STAGES)
    with pytest.raises(ValueError, match=r"stages=\['stage3'\]"):
        digit.run_pipeline(compose_digit(f"out={tmp_path}", "stages=[stage3]"))


def stage1_checkpoint(centroids, path, **tok):  # noqa: F811
    """A method=digit stage-1 checkpoint as train.py writes it (config, class count, centroids digest)."""
    from omegaconf import open_dict

    from contgen.cli.build import build_module
    from tests.cli.test_configs import compose_train

    overrides = {"encoder": "builtin", "stage": 2, "centroids_path": str(centroids), **tok}
    cfg = compose_train("method=digit", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                        "paths.output_dir=.", *[f"tokenizer.{k}={v}" for k, v in overrides.items()])
    with open_dict(cfg):
        del cfg["hydra"]  # from_config stores the resolved config; hydra's runtime keys exist only in a run
    module = build_module(cfg, 12)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return cfg


def test_load_stage1_checks_the_ids(centroids, tmp_path):  # noqa: F811
    from omegaconf import OmegaConf

    from contgen.modules.pixel_decoder import load_stage1

    cfg = stage1_checkpoint(centroids, tmp_path / "s1.ckpt")
    semantic_cfg = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    semantic = tokenizer(centroids)
    stage1 = load_stage1(str(tmp_path / "s1.ckpt"), semantic, semantic_cfg, 12)
    assert stage1.tokenizer is semantic and not any(p.requires_grad for p in stage1.parameters())
    with pytest.raises(ValueError, match="stage: stage 1 2 vs module.semantic 3"):
        load_stage1(str(tmp_path / "s1.ckpt"), semantic, {**semantic_cfg, "stage": 3}, 12)
    with pytest.raises(ValueError, match="has 12 classes, the data 10"):
        load_stage1(str(tmp_path / "s1.ckpt"), semantic, semantic_cfg, 10)
    refit = tmp_path / "refit.pt"  # same path semantics, other centroids: the digest tells
    torch.save({**torch.load(centroids), "centroids": torch.load(centroids)["centroids"].flip(0)}, refit)
    with pytest.raises(ValueError, match="are not those stage 1 was trained on"):
        load_stage1(str(tmp_path / "s1.ckpt"), tokenizer(refit), {**semantic_cfg, "centroids_path": str(refit)}, 12)


def test_sampler_and_prefix_config_errors(centroids):  # noqa: F811
    from contgen.cli.build import build_module
    from tests.cli.test_configs import compose_train

    head = CategoricalHead
    with pytest.raises(ValueError, match="use sampler=mar, ear or maskgit"):
        MaskedPixelDecoder(vq(), functools.partial(SMALL_EAR, prefix_len=16, prefix_vocab=16), head,
                           CausalARSampler(), num_classes=12, optim=train_optim())
    with pytest.raises(ValueError, match="over ids samples with sampler=maskgit"):
        MaskedPixelDecoder(vq(), functools.partial(SMALL_EAR, prefix_len=16, prefix_vocab=16), head,
                           MaskedARSampler(num_iter=4, cfg=1.0), num_classes=12, optim=train_optim())
    cfg = compose_train("method=digit_decoder", "+model.prefix_len=16", "tokenizer.ckpt_path=null",
                        "+tokenizer.random_init=true", f"module.semantic.centroids_path={centroids}")
    with pytest.raises(ValueError, match="model.prefix_len: the pixel decoder sets the prefix"):
        build_module(cfg, 12)


@pytest.mark.slow
def test_digit_pipeline_end_to_end(tmp_path):
    """`python digit.py` (K-means -> VQ -> stage 1 -> stage 2) on the built-in shapes, short: the stage-2 images,
    sampled from classes through stage 1, are classified above chance by the built-in classifier. Bound: the
    1 - 1e-4 quantile of the accuracy of a chance-level generator (Binomial(n, 1/12) / n) on the n scored images.
    A rerun skips the finished stages."""
    out = tmp_path / "digit"
    args = [f"out={out}", "k=32", "threads=1", "+vq.steps=300", "stage1.trainer.max_epochs=2",
            "stage2.trainer.max_epochs=2", "+stage2.metrics.num_samples=120"]
    run_script("digit.py", *args)
    metrics = json.loads((out / "stage2" / "metrics.json").read_text())
    n = metrics["num_samples"]
    chance_bound = binom.ppf(1 - 1e-4, n, 1 / 12) / n
    assert metrics["class_acc"] > chance_bound, (metrics, chance_bound)
    rerun = run_script("digit.py", *args)
    assert rerun.stdout.count("skipped") == 4


@pytest.mark.parametrize("name,model,vocab,batch,params", [
    ("digit_base_in256_decoder", "GPTBackbone", 1024, 512, 214.0e6),
    ("digit_base_in256_decoder_maskgit", "PrefixEARBackbone", 1024, 1024, 214.0e6)])
def test_decoder_presets(name, model, vocab, batch, params):
    """DiGIT-B's pixel decoders (digit.md §3-4): ≈214M over the VQGAN's 1024 ids with the 8192-id, 256-long prefix
    (DiGIT's 1029 + 8197-row shared table, two position tables, 16 × 1024 layers), pre-LN, no class; the recipe's
    batch, schedule and sampler."""
    from hydra.utils import instantiate

    from tests.cli.test_configs import compose_train, recipe_batch

    cfg = compose_train(f"experiment={name}")
    assert cfg.model._target_.endswith(model) and recipe_batch(cfg) == batch
    assert cfg.optim.schedule == "inverse_sqrt" and cfg.optim.lr == 5e-4 and cfg.trainer.gradient_clip_val == 1.0
    with torch.device("meta"):
        net = instantiate(cfg.model)(seq_len=256, num_classes=1, vocab_size=vocab, prefix_len=256, prefix_vocab=8192)
        head = instantiate(cfg.loss)(cond_dim=net.cond_dim, vocab_size=vocab)
    n = sum(p.numel() for m in (net, head) for p in m.parameters())
    assert abs(n / params - 1) < 0.01, n
    assert net.decoder_blocks[0].norm_first
    stage1 = compose_train("experiment=digit_base_in256")
    assert (recipe_batch(stage1), stage1.loss.top_k, stage1.optim.lr) == (1024, 200, 3e-4)
