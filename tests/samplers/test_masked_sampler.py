import pytest
import torch
from torch import nn

from contgen.samplers.masked import MaskedARSampler
from contgen.samplers.schedules import cfg_schedule, cosine_mask_schedule


class RecordingBackbone(nn.Module):
    """z = the token values, plus a flag column telling whether the row is unconditional (dropped)."""

    seq_len, token_dim, cond_dim, num_classes = 12, 2, 3, 4

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, tokens, labels, order, num_masked, drop):
        self.calls.append((tokens.clone(), num_masked, drop.clone()))
        flag = drop.float()[:, None, None].expand(-1, tokens.shape[1], 1)
        return torch.cat([tokens, flag], -1)


class RecordingHead(nn.Module):
    """Returns a token whose value encodes the step index, and records (rows, cfg) per call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def sample(self, z, temperature=1.0, cfg=None, generator=None):
        self.calls.append((z.shape[0], cfg, temperature))
        n = z.shape[0] // 2 if cfg is not None else z.shape[0]
        return torch.full((n, 2), float(len(self.calls)))


@pytest.mark.parametrize("num_iter", [12, 5])
def test_sampler_follows_the_schedule(num_iter):
    bb, head = RecordingBackbone(), RecordingHead()
    labels = torch.tensor([0, 1, 2])
    tokens = MaskedARSampler(num_iter=num_iter, cfg=1.0, temperature=0.5)(bb, head, labels, torch.Generator().manual_seed(0))
    schedule = cosine_mask_schedule(12, num_iter)
    expected_rows = [3 * (a - b) for a, b in zip([12] + schedule[:-1], schedule)]
    assert [c[0] for c in head.calls] == expected_rows
    assert all(c[1] is None and c[2] == 0.5 for c in head.calls)
    assert [c[1] for c in bb.calls] == [12] + schedule[:-1]  # backbone sees the masked count of each step
    # every position was written exactly once: its value is the step that predicted it
    steps = tokens[..., 0]
    assert steps.min() >= 1 and steps.max() == num_iter
    counts = torch.stack([(steps == s + 1).sum(1) for s in range(num_iter)], 1)
    assert torch.equal(counts, torch.tensor(expected_rows).div(3, rounding_mode="floor").expand(3, -1))
    if num_iter == 12:  # num_iter = L: exactly one token per step
        assert expected_rows == [3] * 12


def test_sampler_cfg_doubles_batch_with_null_class_and_ramps_scale():
    bb, head = RecordingBackbone(), RecordingHead()
    MaskedARSampler(num_iter=4, cfg=3.0, cfg_schedule="linear")(bb, head, torch.tensor([1, 2]))
    schedule = cosine_mask_schedule(12, 4)
    assert [c[1] for c in head.calls] == [cfg_schedule(3.0, "linear", 12, m) for m in schedule]
    for tokens, _, drop in bb.calls:
        assert tokens.shape[0] == 4 and drop.tolist() == [False, False, True, True]
        assert torch.equal(tokens[:2], tokens[2:])  # both halves see the same tokens
