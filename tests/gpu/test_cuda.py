"""GPU checks: bf16 training steps (eager and compiled) and sampling on CUDA. Skipped without a GPU."""

import functools
import math

import pytest
import torch

from contgen.backbones.ear import EARBackbone
from contgen.backbones.mar import MARBackbone
from contgen.heads.diffusion import DiffusionHead
from contgen.heads.energy import EnergyHead
from contgen.modules.token_ar import TokenARModule
from contgen.samplers.masked import MaskedARSampler
from contgen.tokenizers.patch import PatchTokenizer
from tests.helpers import train_optim

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODELS = {
    "mar": (functools.partial(MARBackbone, encoder_embed_dim=128, encoder_depth=2, encoder_num_heads=4,
                              decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, buffer_size=8),
            functools.partial(DiffusionHead, width=128, depth=2, num_sampling_steps=10)),
    "ear": (functools.partial(EARBackbone, embed_dim=128, depth=4, num_heads=4, buffer_size=8),
            functools.partial(EnergyHead, width=128, depth=2)),
}


def bf16_losses(module, steps: int) -> list[float]:
    """``steps`` bf16 training steps (fused AdamW, EMA) on one fixed batch; the mask ratio, and so the shapes, change
    between them."""
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator("cuda").manual_seed(1)
    batch = {"image": torch.rand(32, 3, 32, 32, device="cuda", generator=gen) * 2 - 1,
             "label": torch.randint(0, 10, (32,), device="cuda", generator=gen)}
    losses = []
    for step in range(steps):
        g, g_cpu = module.step_generators(step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.masked_loss(module.tokens_from_batch(batch, g), batch["label"], g, g_cpu)
        loss.backward()
        opt.step(), opt.zero_grad()
        module.ema.update(module.net)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["mar", "ear"])
@pytest.mark.parametrize("compile", [False, True])
def test_bf16_steps_and_sampling_on_cuda(method, compile):
    backbone, head = MODELS[method]
    module = TokenARModule(PatchTokenizer(32, 4), backbone, head, MaskedARSampler(num_iter=8, cfg=3.0), num_classes=10,
                           optim=train_optim(), compile=compile).cuda()
    assert all(math.isfinite(loss) for loss in bf16_losses(module, 4))
    # sample_precision "auto" = bf16 autocast on CUDA, inside generate
    a = module.generate(torch.arange(4, device="cuda"), generator=torch.Generator("cuda").manual_seed(0))
    b = module.generate(torch.arange(4, device="cuda"), generator=torch.Generator("cuda").manual_seed(0))
    assert a.dtype == torch.float32 and a.shape == (4, 3, 32, 32) and torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("method", ["mar", "ear"])
def test_reduce_overhead_training_gives_the_default_compiled_losses(method):
    """module.compile_mode=reduce-overhead replays the same Inductor kernels as CUDA graphs (forward and backward).
    Over six steps, with the weights updated in place under the graphs and the mask ratio (MAR: the visible count
    inside the padded encoder) changing every step, the losses are those of compile_mode=default up to one bf16
    rounding (2^-8 relative); dropout is off, as Inductor draws its masks from its own stream. Sampling afterwards
    (EMA copy, compiled as default, head loop graphed) is deterministic."""
    backbone, head = MODELS[method]
    backbone = functools.partial(backbone, attn_dropout=0.0, proj_dropout=0.0)
    losses = {}
    for mode in ("default", "reduce-overhead"):
        torch.manual_seed(0)
        module = TokenARModule(PatchTokenizer(32, 4), backbone, head, MaskedARSampler(num_iter=8, cfg=3.0),
                               num_classes=10, optim=train_optim(), compile=True, compile_mode=mode).cuda()
        losses[mode] = bf16_losses(module, 6)
    torch.testing.assert_close(torch.tensor(losses["reduce-overhead"]), torch.tensor(losses["default"]),
                               rtol=2**-8, atol=0)
    a = module.generate(torch.arange(4, device="cuda"), generator=torch.Generator("cuda").manual_seed(0))
    b = module.generate(torch.arange(4, device="cuda"), generator=torch.Generator("cuda").manual_seed(0))
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_reduce_overhead_under_lightning(tmp_path):
    """CUDA-graphed blocks under Lightning (bf16-mixed, clipping, the module's fused AdamW and EMA)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from contgen.data.shapes import Shapes

    backbone, head = MODELS["mar"]
    module = TokenARModule(PatchTokenizer(32, 4), backbone, head, MaskedARSampler(num_iter=4), num_classes=12,
                           optim=train_optim(warmup_steps=0), compile=True, compile_mode="reduce-overhead")
    trainer = L.Trainer(max_steps=4, precision="bf16-mixed", gradient_clip_val=3.0, accelerator="gpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(Shapes(32, 64), batch_size=8))
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_lightning_mixed_precision_training_with_gradient_clipping(precision, tmp_path):
    """fp16-mixed + GradScaler is the references' setting (engine_mar.py:68); with the fused AdamW Lightning refused to
    clip gradients (issue 6 defect 4), so fp16 takes the foreach AdamW."""
    import lightning as L
    from torch.utils.data import DataLoader

    from contgen.data.shapes import Shapes

    backbone, head = MODELS["mar"]
    module = TokenARModule(PatchTokenizer(32, 4), backbone, head, MaskedARSampler(num_iter=4), num_classes=12,
                           optim=train_optim(warmup_steps=0))
    trainer = L.Trainer(max_steps=3, precision=precision, gradient_clip_val=3.0, accelerator="gpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(Shapes(32, 32), batch_size=8))
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.optimizers[0].defaults["fused"] == (precision != "16-mixed")


@pytest.mark.parametrize("compile_blocks", [False, True])
@pytest.mark.parametrize("objective", ["multistep", "fewstep"])
def test_transport_family_lightning_bf16_training_and_sampling(objective, compile_blocks, tmp_path):
    """TransportModule under Lightning bf16-mixed with the fused AdamW or RAdam and clipping (UCGM few-step: 0.1), TiT
    with its blocks compiled on CUDA (the default) or eager; then UCGM-S sampling with the EMA copy, deterministic."""
    import lightning as L
    from torch.utils.data import DataLoader

    from contgen.backbones.tit import TiT
    from contgen.data.shapes import Shapes
    from contgen.modules.transport import TransportModule
    from contgen.transport.solvers import UCGMSampler
    from contgen.transport.ucgm import UCGMObjective

    settings = {"multistep": dict(enhanced_ratio=0.44, enhanced_style="ft-vs-fe", wt_cosine_loss=True),
                "fewstep": dict(consistc_ratio=1.0, enhanced_ratio=2.0, enhanced_style="fc-vs-xz", scaled_cbl_eps=5.0,
                                ema_decay_rate=1.0, time_dist_ctrl=(0.8, 1.0, 1.0))}[objective]
    denoiser = functools.partial(TiT, patch_size=2, hidden_size=64, depth=2, num_heads=4, compile_blocks=compile_blocks)
    module = TransportModule(PatchTokenizer(32, 1), denoiser, UCGMObjective(**settings), UCGMSampler(steps=4),
                             num_classes=12, optim=train_optim(warmup_steps=0, name="radam" if objective == "fewstep" else "adamw"))
    trainer = L.Trainer(max_steps=3, precision="bf16-mixed", gradient_clip_val=0.1, accelerator="gpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(Shapes(32, 32), batch_size=8))
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    module.cuda()  # Lightning's teardown returned the module to the CPU
    a = module.generate(torch.arange(4, device="cuda"), generator=torch.Generator("cuda").manual_seed(0))
    b = module.generate(torch.arange(4, device="cuda"), generator=torch.Generator("cuda").manual_seed(0))
    assert a.shape == (4, 3, 32, 32) and torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cuda_graph_sampling_gives_the_eager_samples(precision):
    """``module.cuda_graphs``: the head's denoising loop replays from CUDA graphs (one per row count) and gives the
    eager loop's images for the same seed — the same kernels on the same shapes, the noise drawn outside the graph in
    the eager order. Allowed: bf16's roundoff 2^-8 on pixels in [-1, 1] (fp32: 1e-5), should a kernel differ under
    capture; the images are in fact expected equal. A second batch replays the captured graphs, a weight change is
    seen by the replay (in-place update, as EMA does)."""
    backbone, head = MODELS["mar"]
    module = TokenARModule(PatchTokenizer(32, 4), backbone, head, MaskedARSampler(num_iter=8, cfg=3.0), num_classes=10,
                           optim=train_optim(), sample_precision=precision).cuda()
    with torch.no_grad():
        for p in module.ema.shadow.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # a fresh head outputs exactly 0: perturb it
    labels, tol = torch.arange(6, device="cuda"), (2**-8 if precision == "bf16" else 1e-5)

    def images():
        return module.generate(labels, generator=torch.Generator("cuda").manual_seed(0))

    graphs = module.ema.shadow.head._graphs
    module.cuda_graphs = False
    eager = images()
    assert len(graphs) == 0
    module.cuda_graphs = True
    first, again = images(), images()
    assert len(graphs) > 1  # several row counts: the cosine schedule predicts different counts per step
    torch.testing.assert_close(first, eager, rtol=0, atol=tol)
    assert torch.equal(first, again)
    with torch.no_grad():
        for p in module.ema.shadow.head.parameters():
            p.mul_(1.5)
    module.cuda_graphs = False
    eager = images()
    module.cuda_graphs = True
    torch.testing.assert_close(images(), eager, rtol=0, atol=tol)
