"""Load the reference-made fixtures and replay the reference's random draws into contgen.

The fixtures in ``tests/fixtures/reference/`` come from ``tests/fixtures/make_reference_fixtures.py``, which runs
LTH14/mar (fe470ac) and shaochenze/EAR (9256a9f) themselves. A whole sampling run of the reference draws its
numbers in its own order and layout; :func:`sampling_draws` maps them onto the draws contgen makes, and
:class:`Replay` serves them to contgen's ``torch.rand`` / ``torch.randn`` / ``torch.randint`` calls one by one,
checking each call's function and shape, so both sides consume the very same numbers.

The mappings (each one a difference of random *streams*, not of the maths):

* **Orders.** The reference shuffles ``range(L)`` with ``np.random.shuffle`` per image (mar.py:152-160); contgen
  draws ``torch.rand(B, L).argsort(1)``. Keys ``k[b, perm[b, j]] = j`` argsort to exactly ``perm``.
* **Row order of a step.** The reference gathers the rows to predict with ``mask.nonzero()`` (batch-major,
  ascending position; mar.py:311); contgen gathers ``order[:, next:masked]`` (batch-major, in generation order;
  samplers/masked.py). Per-row noise is permuted accordingly: contgen row ``(b, j)`` takes reference row
  ``(b, rank of position order[b, next + j] among the step's positions)``.
* **Diffusion noise with CFG.** The reference carries 2n rows ([cond; uncond]) and draws ``randn_like`` of all of
  them at every step (gaussian_diffusion.py:412) but only the first half is ever read (``forward_with_cfg`` uses
  ``x[:n]``, diffloss.py:241) and returned (mar.py:321); contgen tracks the n cond rows: take the first half.
* **Last diffusion step.** The reference also draws noise at t = 0 and multiplies it by 0
  (gaussian_diffusion.py:412-419); contgen draws none there: that draw is dropped.
* The initial diffusion noise (``torch.randn(n, C)``, diffloss.py:38/43) and EAR's generator noise
  (``torch.rand(rows, noise_channels)``, scoreloss.py:361) map one to one (after the row permutation).
"""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
TOL = dict(rtol=1e-5, atol=1e-5)  # why this tolerance: the docstring of tests/parity/test_parity_mar.py


def load(name: str):
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


def order_keys(perm: torch.Tensor) -> torch.Tensor:
    """Float keys whose ``argsort(dim=1)`` is ``perm`` (distinct keys: argsort is unambiguous)."""
    keys = torch.empty(perm.shape, dtype=torch.float32)
    return keys.scatter_(1, perm, torch.arange(perm.shape[1], dtype=torch.float32).expand_as(perm).contiguous())


def _row_index(perm: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Reference row for each contgen row of a step predicting ``perm[:, lo:hi]`` (see the module docstring)."""
    positions = perm[:, lo:hi]
    rank = positions.argsort(dim=1).argsort(dim=1)  # rank of each position among the step's positions
    k = hi - lo
    return (torch.arange(perm.shape[0])[:, None] * k + rank).reshape(-1)


def sampling_draws(run: dict, seq_len: int, kind: str) -> list[tuple[str, torch.Tensor]]:
    """Map a recorded reference sampling run (``kind`` 'mar' or 'ear') to contgen's draws, in contgen's order."""
    tags, values = run["draws"]["tags"], list(run["draws"]["values"])
    batch = run["labels"].shape[0]
    guided = run["cfg"] != 1.0
    n_orders = sum(t == "order" for t in tags)
    assert tags[:n_orders] == ["order"] * batch and n_orders == batch, tags[:batch + 1]
    perm = torch.stack(values[:batch]).long()
    out = [("rand", order_keys(perm))]
    pos, masked = batch, seq_len
    for call in run["head_calls"]:
        n = call["rows"] // (2 if guided else 1) // batch  # tokens per image predicted at this step
        idx = _row_index(perm, masked - n, masked)
        rows = batch * n
        if kind == "ear":
            assert tags[pos] == "rand", tags[pos]
            out.append(("rand", values[pos][idx]))
            pos += 1
        else:
            assert tags[pos] == "randn" and values[pos].shape[0] == rows, (tags[pos], values[pos].shape)
            out.append(("randn", values[pos][idx]))
            pos += 1
            while pos < len(tags) and tags[pos] == "randn_like":
                last = pos + 1 == len(tags) or tags[pos + 1] != "randn_like"
                if not last:  # the t = 0 draw is multiplied by 0 in the reference: contgen makes none
                    out.append(("randn", values[pos][:rows][idx]))  # first half = the cond rows
                pos += 1
        masked -= n
    assert pos == len(tags) and masked == 0, (pos, len(tags), masked)
    return out


def _size(args, kwargs) -> tuple[int, ...]:
    size = kwargs.get("size", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args)
    return tuple(int(s) for s in size)


class Replay:
    """Patch ``torch.rand``, ``torch.randn`` and ``torch.randint`` to return ``draws`` in order.

    Each call must be the next expected function with the expected shape; the value is cast to the requested
    dtype/device. ``done()`` asserts that every draw was consumed.
    """

    def __init__(self, draws: list[tuple[str, torch.Tensor]]):
        self.draws, self.pos, self._saved = draws, 0, {}

    def _fake(self, name: str):
        def fn(*args, generator=None, device=None, dtype=None, **kwargs):
            if name == "randint":  # randint(low, high, size) or randint(high, size)
                args = args[-1:] if isinstance(args[-1], (tuple, list, torch.Size)) else args
            size = _size(args, kwargs)
            assert self.pos < len(self.draws), f"contgen made more draws than the reference ({name}{size})"
            want, value = self.draws[self.pos]
            assert want == name and tuple(value.shape) == size, \
                f"draw {self.pos}: contgen calls {name}{size}, the reference drew {want}{tuple(value.shape)}"
            self.pos += 1
            return value.to(device=device or "cpu", dtype=dtype or (torch.long if name == "randint" else torch.float32))
        return fn

    def __enter__(self):
        for name in ("rand", "randn", "randint"):
            self._saved[name] = getattr(torch, name)
            setattr(torch, name, self._fake(name))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch, name, fn)

    def done(self) -> None:
        assert self.pos == len(self.draws), f"contgen consumed {self.pos} of the reference's {len(self.draws)} draws"


def check_backbone_case(bb, fixture: dict, case: int) -> None:
    """The backbone's condition z for the fixture's tokens / labels / drop under mask ``case`` (row 1: null class)."""
    c = fixture["cases"][case]
    with torch.no_grad():
        z = bb(fixture["tokens"], fixture["labels"], c["order"], c["num_masked"], fixture["drop"])
    torch.testing.assert_close(z, c["z"], **TOL)


def check_sampling_run(bb, head, run: dict, seq_len: int, kind: str) -> None:
    """A whole reference ``sample_tokens`` run against contgen's sampler with the reference's draws replayed; first
    the CFG scale of every step, which the reference computes in fp32."""
    from contgen.samplers.masked import MaskedARSampler
    from contgen.samplers.schedules import cfg_schedule, cosine_mask_schedule

    schedule = cosine_mask_schedule(seq_len, run["num_iter"])
    if run["cfg"] != 1.0:
        scales = [cfg_schedule(run["cfg"], run["cfg_schedule"], seq_len, m) for m in schedule]
        torch.testing.assert_close(torch.tensor(scales), torch.tensor([c["cfg"] for c in run["head_calls"]]),
                                   rtol=1e-6, atol=0)
    sampler = MaskedARSampler(run["num_iter"], run["cfg"], run["cfg_schedule"], run["temperature"])
    with Replay(sampling_draws(run, seq_len, kind)) as r:
        tokens = sampler(bb, head, run["labels"])
    r.done()
    torch.testing.assert_close(tokens, run["tokens"], **TOL)
