"""The masked backbones (MAR, EAR) over a discrete tokenizer's ids (vocab_size): MAR Table 1's cross-entropy cells."""

import pytest
import torch
from torch import nn

from contgen.backbones.base import MaskedTokenBackbone
from contgen.backbones.ear import EARBackbone
from contgen.backbones.mar import MARBackbone
from contgen.samplers.schedules import random_orders

L, V, K = 12, 10, 5


def kwargs(name, **kw):
    common = dict(seq_len=L, token_dim=None, num_classes=K, buffer_size=3, attn_dropout=0.0, proj_dropout=0.0,
                  vocab_size=V)
    if name == "mar":
        return dict(common, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=4, decoder_embed_dim=24,
                    decoder_depth=1, decoder_num_heads=3, **kw)
    return dict(common, embed_dim=32, depth=2, num_heads=4, **kw)


def mar(**kw):
    return MARBackbone(**kwargs("mar", **kw))


def ear(**kw):
    return EARBackbone(**kwargs("ear", **kw))


BUILD = {"mar": mar, "ear": ear}


def inputs(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(V, (b, L), generator=g), torch.randint(K, (b,), generator=g), random_orders(b, L, g))


@pytest.mark.parametrize("name", ["mar", "ear"])
def test_ids_give_z_per_position(name):
    bb = BUILD[name]().eval()
    assert bb.embeds_ids and isinstance(bb.z_proj, nn.Embedding) and bb.z_proj.weight.shape[0] == V
    tokens, labels, order = inputs()
    z = bb(tokens, labels, order, num_masked=7)
    assert z.shape == (4, L, bb.cond_dim) and torch.isfinite(z).all()


@pytest.mark.parametrize("name", ["mar", "ear"])
def test_a_masked_id_cannot_leak(name):
    """Changing the id at a masked position (even to an out-of-range one) leaves every z unchanged; changing a
    visible one does not."""
    bb = BUILD[name]().eval()
    tokens, labels, order = inputs()
    z = bb(tokens, labels, order, num_masked=5)
    masked, visible = order[:, 0], order[:, -1]
    rows = torch.arange(4)
    changed = tokens.clone()
    changed[rows, masked] = (tokens[rows, masked] + 1) % V
    assert torch.equal(bb(changed, labels, order, num_masked=5), z)
    if name == "ear":  # masked ids are replaced before the embedding: any garbage is safe
        changed[rows, masked] = 10 ** 6
        assert torch.equal(bb(changed, labels, order, num_masked=5), z)
    changed = tokens.clone()
    changed[rows, visible] = (tokens[rows, visible] + 1) % V
    assert not torch.allclose(bb(changed, labels, order, num_masked=5), z)


@pytest.mark.parametrize("name", ["mar", "ear"])
def test_ids_are_a_one_hot_linear(name):
    """The embedding is the continuous backbone's z_proj on one-hot ids: same parameter name, same math."""
    ids, cont = BUILD[name](), BUILD[name](vocab_size=None, token_dim=V)
    state = ids.state_dict()
    state["z_proj.weight"] = ids.z_proj.weight.T
    state["z_proj.bias"] = torch.zeros(ids.z_proj.weight.shape[1])
    cont.load_state_dict(state)
    tokens, labels, order = inputs()
    z_ids = ids.eval()(tokens, labels, order, num_masked=6)
    z_cont = cont.eval()(nn.functional.one_hot(tokens, V).float(), labels, order, num_masked=6)
    torch.testing.assert_close(z_ids, z_cont, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mar", "ear"])
def test_token_dim_xor_vocab_size(name):
    for kw in ({"vocab_size": V, "token_dim": 4}, {"vocab_size": None, "token_dim": None}):
        with pytest.raises(ValueError, match="exactly one of token_dim .* and vocab_size"):
            BUILD[name](**kw)
    with pytest.raises(ValueError, match="model.vocab_size must be >= 1"):
        BUILD[name](vocab_size=0)


@pytest.mark.parametrize("name", ["mar", "ear"])
def test_ids_shape_and_dtype_are_checked(name):
    bb = BUILD[name]()
    tokens, labels, order = inputs()
    for bad in (tokens.float(), tokens[:, :, None], tokens[:, :-1]):
        with pytest.raises(ValueError, match=rf"model.vocab_size={V} expects token ids \(B, {L}\) int64"):
            bb(bad, labels, order if bad.shape[1] == L else order[:, :-1], num_masked=3)


def test_condition_tokens_is_the_one_plug_point():
    """The buffer holds condition_tokens(labels, drop): the class embedding in every slot, fake_latent where dropped;
    overriding the method changes what both MAR and EAR see."""
    bb = mar().eval()
    labels, drop = torch.tensor([1, 2]), torch.tensor([False, True])
    cond = bb.condition_tokens(labels, drop)
    assert cond.shape == (2, bb.buffer_size, 32)
    assert torch.equal(cond[0], bb.class_emb.weight[1].expand(3, -1))
    assert torch.equal(cond[1], bb.fake_latent.expand(3, -1))

    class Zeroed:  # a subclass with another condition: nothing else changes
        def condition_tokens(self, labels, drop):
            return torch.zeros(labels.shape[0], self.buffer_size, self.fake_latent.shape[1])

    tokens, labels, order = inputs()
    for name in ("mar", "ear"):
        base = BUILD[name]().eval()
        other = type("Other", (Zeroed, type(base)), {})(**kwargs(name))
        other.load_state_dict(base.state_dict())
        other.eval()
        assert not torch.allclose(other(tokens, labels, order, 4), base(tokens, labels, order, 4)), name
        assert isinstance(other, MaskedTokenBackbone)

