"""TokenARModule over a discrete tokenizer's ids: masked backbones + the categorical head (MAR Table 1's CE cells),
and the module.mask_ratio option."""

import functools

import pytest
import torch

from contgen.backbones.ear import EARBackbone
from contgen.backbones.mar import MARBackbone
from contgen.heads.categorical import CategoricalHead
from contgen.modules.token_ar import TokenARModule
from contgen.samplers.masked import MaskedARSampler
from contgen.samplers.schedules import CosineMaskCount, MaskRatio
from contgen.tokenizers.patch import PatchTokenizer
from contgen.tokenizers.vq_small import VQSmallTokenizer
from tests.helpers import train_optim

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONES = {
    "mar": functools.partial(MARBackbone, encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=4,
                             decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, buffer_size=2,
                             attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0),
    "ear": functools.partial(EARBackbone, embed_dim=64, depth=2, num_heads=4, buffer_size=2, attn_dropout=0.0,
                             proj_dropout=0.0, label_drop_prob=0.0),
}


def make(backbone="mar", tokenizer=None, head=None, **kw):
    torch.manual_seed(0)
    tokenizer = tokenizer or VQSmallTokenizer(None, image_size=16, vocab_size=32, random_init=True)  # 4x4 ids
    head = head or functools.partial(CategoricalHead, label_smoothing=0.0)
    return TokenARModule(tokenizer, BACKBONES[backbone], head,
                         MaskedARSampler(num_iter=4, cfg=1.0, temperature=0.0), num_classes=4, optim=train_optim(),
                         **kw)


@pytest.mark.parametrize("backbone", ["mar", "ear"])
def test_masked_backbone_overfits_a_fixed_id_set(backbone):
    """4 fixed id sequences, one per class: the masked cross-entropy falls from ln 32 ≈ 3.47 nats to below 0.2 (each
    masked id is a function of the class and the visible ids), and greedy sampling then returns the memorised
    sequences."""
    module = make(backbone, mask_ratio="cosine")
    seq_len, vocab = module.tokenizer.seq_len, module.tokenizer.vocab_size
    tokens = torch.randint(vocab, (4, seq_len), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(module.net.parameters(), lr=5e-3, weight_decay=0.0)
    losses = []
    for step in range(120):
        g, g_cpu = module.step_generators(step)
        loss = module.masked_loss(tokens, labels, g, g_cpu)
        loss.backward()
        opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 3.0 and sum(losses[-10:]) / 10 < 0.2, (losses[0], losses[-10:])
    out = module.generate_tokens(labels, torch.Generator().manual_seed(0), use_ema=False)
    assert out.dtype == torch.long and torch.equal(out, tokens)


def test_masked_loss_takes_ids_and_gathers_the_masked_rows():
    module = make("ear")
    seen = {}
    head = module.net.head
    original = head.loss

    def spy(target, z, **kw):
        seen["target"], seen["z"] = target, z
        return original(target, z, **kw)

    head.loss = spy
    tokens = torch.randint(32, (3, 16))
    g, g_cpu = module.step_generators(0)
    loss = module.masked_loss(tokens, torch.tensor([0, 1, 2]), g, g_cpu)
    n = seen["target"].shape[0]
    assert torch.isfinite(loss) and seen["target"].dtype == torch.long and seen["target"].ndim == 1
    assert n % 3 == 0 and 3 * 12 <= n <= 3 * 16 and seen["z"].shape == (n, module.net.backbone.cond_dim)


@pytest.mark.parametrize("name, cls", [("truncnorm", MaskRatio), ("cosine", CosineMaskCount)])
def test_mask_ratio_option(name, cls):
    assert isinstance(make(mask_ratio=name).mask_ratio, cls)


def test_bad_mask_ratio_names_the_key():
    with pytest.raises(ValueError, match=r"module.mask_ratio must be one of \['cosine', 'truncnorm'\], got 'linear'"):
        make(mask_ratio="linear")


def test_discrete_tokenizer_needs_the_categorical_head_and_continuous_the_reverse():
    with pytest.raises(ValueError, match="loss=categorical"):
        make(head=functools.partial(torch.nn.Identity))
    with pytest.raises(ValueError, match="continuous head"):
        make(tokenizer=PatchTokenizer(16, 4))
