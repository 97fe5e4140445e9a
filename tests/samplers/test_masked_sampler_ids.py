"""MaskedARSampler over a discrete tokenizer's ids: a (B, L) int64 token tensor, the head samples ids."""

import pytest
import torch

from contgen.backbones.ear import EARBackbone
from contgen.backbones.mar import MARBackbone
from contgen.heads.categorical import CategoricalHead
from contgen.samplers.masked import MaskedARSampler

pytestmark = pytest.mark.usefixtures("one_thread")

L, V, K = 10, 7, 3


def backbone(name):
    torch.manual_seed(0)
    if name == "mar":
        return MARBackbone(L, None, K, 16, 1, 2, 16, 1, 2, buffer_size=2, vocab_size=V).eval()
    return EARBackbone(L, None, K, 16, 1, 2, buffer_size=2, vocab_size=V).eval()


class Spy(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seq_len, self.vocab_size, self.seen = inner, inner.seq_len, inner.vocab_size, []

    def forward(self, tokens, *args):
        self.seen.append((tokens.dtype, tuple(tokens.shape)))
        return self.inner(tokens, *args)


@pytest.mark.parametrize("name", ["mar", "ear"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_sampler_returns_valid_ids(name, cfg):
    bb, head = Spy(backbone(name)), CategoricalHead(16, V)
    sampler = MaskedARSampler(num_iter=4, cfg=cfg, cfg_schedule="linear")
    labels = torch.tensor([0, 2, 1])
    out = sampler(bb, head, labels, torch.Generator().manual_seed(0))
    assert out.dtype == torch.long and out.shape == (3, L)
    assert ((out >= 0) & (out < V)).all()
    rows = 6 if cfg != 1.0 else 3
    assert bb.seen == [(torch.long, (rows, L))] * 4  # ids all the way through, one backbone call per step
    again = sampler(bb, head, labels, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # everything from the generator


def test_every_position_is_written_once():
    """A head that answers each step's rows with the step's index: position p ends with the step that predicted it,
    and each step predicts as many positions as the cosine schedule says."""
    from contgen.samplers.schedules import cosine_mask_schedule

    class StepHead:
        calls = 0

        def sample(self, z, temperature=1.0, cfg=None, generator=None):
            StepHead.calls += 1
            return torch.full((z.shape[0],), StepHead.calls, dtype=torch.long)

    out = MaskedARSampler(num_iter=5, cfg=1.0)(backbone("ear"), StepHead(), torch.tensor([0, 1]))
    sched = cosine_mask_schedule(L, 5)
    per_step = [a - b for a, b in zip([L] + sched[:-1], sched)]
    for row in out:
        assert [int((row == s + 1).sum()) for s in range(5)] == per_step
