"""The compiled training step (``module.compile``: MAR's encoder padded to a static length, blocks and head MLP
compiled) gives eager's loss. Slow: Inductor compiles on the CPU (~50 s)."""

import functools

import pytest
import torch

from contgen.backbones.mar import MARBackbone
from contgen.data.shapes import Shapes
from contgen.heads.diffusion import DiffusionHead
from contgen.modules.token_ar import TokenARModule
from contgen.samplers.masked import MaskedARSampler
from contgen.tokenizers.patch import PatchTokenizer
from tests.helpers import train_optim

pytestmark = pytest.mark.slow


def test_compiled_mar_step_gives_the_eager_loss_under_bf16():
    """Three steps (three mask ratios, so three visible counts through the one padded encoder shape). Dropout is off:
    Inductor draws its masks from its own stream. bf16 rounds to 2^-8 ≈ 0.4% relative; Inductor fuses and reorders the
    fp32 work between the bf16 matmuls, so the losses may differ by a few roundoffs: 1% relative is allowed."""
    backbone = functools.partial(MARBackbone, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=2,
                                 attn_dropout=0.0, proj_dropout=0.0)
    head = functools.partial(DiffusionHead, width=32, depth=1, num_sampling_steps=4, batch_mul=2)
    batch = {"image": torch.stack([Shapes(16, 8)[i]["image"] for i in range(8)]), "label": torch.arange(8)}
    losses, visible = {}, set()
    for compile in (False, True):
        torch.manual_seed(0)
        module = TokenARModule(PatchTokenizer(16, 4), backbone, head, MaskedARSampler(num_iter=4), num_classes=12,
                               optim=train_optim(), compile=compile)
        if compile:
            assert module.net.backbone.encoder_len == 2 + 16 - module.mask_ratio.min_masked(16)
        losses[compile] = []
        for step in range(3):
            g, g_cpu = module.step_generators(step)
            visible.add(16 - module.mask_ratio.num_masked(16, module.step_generators(step)[1]))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = module.masked_loss(module.tokens_from_batch(batch, g), batch["label"], g, g_cpu)
            loss.backward()
            losses[compile].append(loss.item())
    assert len(visible) > 1, "the steps should cover several visible counts"
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-2, atol=0)
