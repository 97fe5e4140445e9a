"""TokenARModule wiring: any head on any token backbone, optimizer groups, EMA per optimizer step."""

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from contgen.backbones.ear import EARBackbone
from contgen.backbones.mar import MARBackbone
from contgen.data.shapes import Shapes
from contgen.heads.diffusion import DiffusionHead
from contgen.heads.energy import EnergyHead
from contgen.modules.optim import param_groups, warmup_then
from contgen.modules.token_ar import TokenARModule
from contgen.samplers.masked import MaskedARSampler
from contgen.samplers.schedules import mask_from_order, random_orders
from contgen.tokenizers.kl16 import KLTokenizer
from contgen.tokenizers.patch import PatchTokenizer
from contgen.utils.ema import EMA
from tests.helpers import train_optim

BACKBONES = {
    "mar": functools.partial(MARBackbone, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2),
    "ear": functools.partial(EARBackbone, embed_dim=32, depth=2, num_heads=2, buffer_size=2),
}
HEADS = {
    "diffusion": functools.partial(DiffusionHead, width=32, depth=1, num_sampling_steps=4, batch_mul=2),
    "energy": functools.partial(EnergyHead, width=32, depth=1, noise_channels=8),
}


def make(backbone="mar", head="diffusion", optim=None, sampler_num_iter=4, **kw):
    torch.manual_seed(0)
    return TokenARModule(PatchTokenizer(16, 4), BACKBONES[backbone], HEADS[head],
                         MaskedARSampler(num_iter=sampler_num_iter, cfg=2.0),
                         num_classes=12, optim=train_optim(**(optim or {})), **kw)


@pytest.mark.parametrize("backbone", ["mar", "ear"])
@pytest.mark.parametrize("head", ["diffusion", "energy"])
def test_any_head_on_any_backbone_trains_and_samples(backbone, head):
    module = make(backbone, head)
    batch = {"image": torch.stack([Shapes(16, 8)[i]["image"] for i in range(8)]), "label": torch.arange(8)}
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-3)
    for step in range(2):
        g, g_cpu = module.step_generators(step)
        loss = module.masked_loss(module.tokens_from_batch(batch, g), batch["label"], g, g_cpu)
        loss.backward()
        opt.step(), opt.zero_grad()
    assert torch.isfinite(loss)
    images = module.generate(torch.tensor([0, 11]), generator=torch.Generator().manual_seed(0), use_ema=False)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_param_groups_follow_the_reference_rules():
    module = make("ear", "energy")
    groups = {g["name"]: g for g in param_groups(module.net.backbone, module.net.head, 0.02, head_lr_scale=0.25)}
    head_ids = {id(p) for p in module.net.head.parameters()}
    assert all(id(p) in head_ids and p.ndim >= 2 for p in groups["head"]["params"])  # EAR: head matrices only
    assert groups["head"]["lr_scale"] == 0.25 and groups["head"]["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in groups["no_decay"]["params"]) and groups["no_decay"]["lr_scale"] == 1.0
    assert any(id(p) in head_ids for p in groups["no_decay"]["params"])  # head biases/norms train at the full LR
    assert all(id(p) not in head_ids for p in groups["decay"]["params"]) and groups["decay"]["weight_decay"] == 0.02
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(module.net.parameters()))


def test_lr_schedule_warmup_then_constant_or_cosine():
    assert [warmup_then(s, 4, 10, "constant") for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert warmup_then(10, 4, 10, "cosine", 0.1) == pytest.approx(0.1)
    # fairseq inverse_sqrt (DiGIT): lr · √(warmup / step) after the warm-up, continuous at the end of it
    assert [warmup_then(s, 4, 100, "inverse_sqrt") for s in (2, 4, 16, 64)] == [0.5, 1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="optim.schedule"):
        warmup_then(5, 4, 10, "step")


def test_ema_updates_once_per_optimizer_step_under_accumulation(tmp_path):
    """accumulate_grad_batches=2 over 4 batches = 2 optimizer steps = 2 EMA updates (EAR updates EMA per step)."""
    module = make(optim={"ema_decay": 0.5, "warmup_steps": 0, "lr": 1e-2})
    updates = []
    module.ema.update = functools.partial(lambda orig, net: (updates.append(1), orig(net)), module.ema.update)
    ds = Shapes(16, 16)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, DataLoader(ds, batch_size=4))
    assert trainer.global_step == 2 and len(updates) == 2


def test_unknown_optim_key_is_a_clear_error():
    with pytest.raises(ValueError, match="optim: unknown keys"):
        make(optim={"learning_rate": 1e-3})


def test_step_streams_are_independent_on_the_cpu():
    """Issue 6 defect 3: with one seed for the CPU (mask count) and device (order, noise) generators, a CPU run drew
    the mask ratio and image 0's first order key from the same number, so image 0's position 0 was masked with
    probability 1.000. Over 400 steps, P(masked) = E[ceil(L r)]/L ≈ 0.87 for every position; its binomial standard
    error is sqrt(.87·.13/400) ≈ 0.017, so ±0.07 (> 4 s.e.) fails by chance with probability < 1e-4."""
    module = make("mar", "diffusion")
    seq_len, hits = 16, torch.zeros(2, 16)
    for step in range(400):
        g, g_cpu = module.step_generators(step)
        num_masked = module.mask_ratio.num_masked(seq_len, g_cpu)
        order = random_orders(2, seq_len, g)
        hits += mask_from_order(order, num_masked).float()
    expected = module.mask_ratio.dist.mean()  # of r; ceil adds < 1/L
    freq = hits / 400
    assert (freq - expected).abs().max() < 0.07 + 1 / seq_len, freq


def test_uncached_images_are_encoded_in_fp32_under_the_training_autocast():
    """Issue 6 defect 4: the references encode images outside their autocast (engine_mar.py:62-68)."""
    module = make("mar", "diffusion")
    module.tokenizer = KLTokenizer(None, ch=32, image_size=32, random_init=True)
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1}
    expected = module.tokenizer.moments(batch["image"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moments = module.tokens_from_batch(batch, torch.Generator().manual_seed(0))
    fp32 = module.tokens_from_batch(batch, torch.Generator().manual_seed(0))
    assert moments.dtype == torch.float32 and torch.equal(moments, fp32)
    assert torch.equal(module.tokenizer.sample(expected, torch.Generator().manual_seed(0)), fp32)


def test_sample_precision_runs_sampling_under_autocast_and_checks_its_value():
    """Issue 6 defect 5: module.sample_precision picks the autocast of generate(); fp32 is exact, bf16 rounds."""
    labels, images = torch.tensor([0, 5]), {}

    def generate(**kw):
        module = make("mar", "diffusion", **kw)
        with torch.no_grad():  # the zero-initialised output layers would make every precision give ε̂ = 0
            for p in module.net.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        return module.generate(labels, generator=torch.Generator().manual_seed(0), use_ema=False)

    for precision in ("fp32", "bf16"):
        images[precision] = generate(sample_precision=precision)
        assert images[precision].dtype == torch.float32
    auto = generate()
    assert torch.equal(auto, images["fp32"])  # auto = fp32 on the CPU
    assert not torch.equal(images["bf16"], images["fp32"])  # the autocast region is really entered
    with pytest.raises(ValueError, match="module.sample_precision"):
        make("mar", "diffusion", sample_precision="half")


def test_ema_copies_only_state_buffers():
    """Issue 6 defect 9: the head's noise schedules are constant (non-persistent) buffers; EMA must not copy them
    every step, but a buffer in the state dict (e.g. BatchNorm statistics) is still copied."""
    module = make("mar", "diffusion")
    assert module.ema._state_buffers == []
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, 0.5)
    net(torch.randn(8, 2) * 3 + 1)
    ema.update(net)
    assert "1.running_mean" in ema._state_buffers
    assert torch.equal(ema.shadow[1].running_mean, net[1].running_mean)


def test_optim_keys_are_checked_against_the_config():
    with pytest.raises(ValueError, match=r"missing keys \['blr'\]"):
        TokenARModule(PatchTokenizer(16, 4), BACKBONES["mar"], HEADS["diffusion"], MaskedARSampler(), num_classes=12,
                      optim={k: v for k, v in train_optim().items() if k != "blr"})


def test_ema_warmup_ramps_the_decay_and_resumes_where_it_was():
    """decay_n = min(decay, (1 + n)/(10 + n)): the first update keeps 1/10 of the initial weights, not 99.5%."""
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, 0.995, warmup=True)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)
    assert ema.shadow.weight.item() == pytest.approx(0.9)
    for _ in range(2000):
        ema.update(net)
    assert ema.current_decay() == 0.995
    restored = EMA(net, 0.995, warmup=True)
    restored.load_state_dict(ema.state_dict())
    assert restored.current_decay() == 0.995 and int(restored.num_updates) == 2001
    assert EMA(net, 0.995).current_decay() == 0.995  # the references: no warm-up


def test_gradient_clipping_under_bf16_mixed_with_a_fused_adamw(tmp_path):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer even under bf16 (no GradScaler), which
    made every default GPU run (bf16-mixed, fused AdamW, clip 3.0) fail at its first step; the module clips itself.
    On the CPU the fused kernel is forced here to reproduce the GPU's configuration."""

    class Fused(TokenARModule):
        def configure_optimizers(self):
            out = super().configure_optimizers()
            opt = out["optimizer"]
            fused = torch.optim.AdamW(opt.param_groups, fused=True)
            out["lr_scheduler"]["scheduler"].optimizer = fused
            return {"optimizer": fused, "lr_scheduler": out["lr_scheduler"]}

    torch.manual_seed(0)
    module = Fused(PatchTokenizer(16, 4), BACKBONES["mar"], HEADS["diffusion"], MaskedARSampler(num_iter=4),
                   num_classes=12, optim=train_optim(warmup_steps=0))
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", gradient_clip_val=1e-3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu")
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer.fit(module, DataLoader(Shapes(16, 16), batch_size=4))
    assert trainer.optimizers[0].defaults["fused"] and trainer.global_step == 2
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(module.net.parameters(), before)])
    assert torch.isfinite(step).all() and step.abs().max() > 0


def test_compile_mode_is_checked_before_any_compute():
    """module.compile_mode: a mode torch.compile does not take here, and CUDA-graphed blocks with activation
    checkpointing (the recompute would replay inside the backward), under FSDP or with gradient accumulation are
    refused."""
    with pytest.raises(ValueError, match=r"module.compile_mode='max-autotune': use one of default, reduce-overhead"):
        make(compile=True, compile_mode="max-autotune")
    ckpt_backbone = functools.partial(BACKBONES["mar"], grad_checkpointing=True)
    with pytest.raises(ValueError, match="module.compile_mode=reduce-overhead with model.grad_checkpointing=true"):
        TokenARModule(PatchTokenizer(16, 4), ckpt_backbone, HEADS["diffusion"], MaskedARSampler(num_iter=4),
                      num_classes=12, optim=train_optim(), compile=True, compile_mode="reduce-overhead")
    from lightning.pytorch.strategies import FSDPStrategy

    module = make(compile=True, compile_mode="reduce-overhead")
    module._trainer = type("T", (), {"strategy": FSDPStrategy(), "accumulate_grad_batches": 1})()
    with pytest.raises(ValueError, match="module.compile_mode=reduce-overhead under FSDP"):
        module.setup("fit")
    module._trainer = L.Trainer(accelerator="cpu", accumulate_grad_batches=2, logger=False)
    with pytest.raises(ValueError, match="reduce-overhead with trainer.accumulate_grad_batches=2"):
        module.setup("fit")
    module._trainer = L.Trainer(accelerator="cpu", logger=False)
    module.setup("fit")
    # compile_mode is the trained net's compile mode: without compile it has nothing to apply to
    assert make(compile_mode="reduce-overhead").compile_mode == "default"
