"""The UCGM teacher policy (contgen/transport/teacher.py): the ramped EMA against the reference's own run
(fixture made by ``tests/fixtures/make_ucgm_training_fixtures.py``), online / frozen / frozen-from-another-
checkpoint, the state dict, and when the objective builds one. CPU, seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from contgen.transport.teacher import Teacher, build_teacher, load_teacher_state
from contgen.transport.ucgm import UCGMObjective
from tests.fixtures.make_ucgm_training_fixtures import TinyNet

pytestmark = pytest.mark.usefixtures("one_thread")
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "ucgm"


def _perturb(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_ema_matches_the_reference_run():
    """Five reference training steps with ema_decay_rate 0.9 (SGD steps between them): feeding contgen's EMA
    teacher the same online weights gives the reference's ``mod`` after each step and its decay sequence
    cmd = 0, 0.45, 0.574, ... Tolerance: bit for bit (the same mul_/add_ per element as update_ema, fused)."""
    d = torch.load(FIX / "training_teacher_ema.pt", weights_only=True)
    net = TinyNet()
    net.load_state_dict(d["online"][0])
    teacher = Teacher(net, "ema", d["ema_decay_rate"])
    for k, (online, ref) in enumerate(zip(d["online"], d["teacher"])):
        net.load_state_dict(online)
        assert teacher._decay == d["cmd"][k]
        teacher.update(net)
        mine = teacher.net.state_dict()
        for name, v in ref.items():
            assert torch.equal(mine[name], v), (k, name)
    assert teacher._decay == d["cmd_final"]
    assert float(teacher.decay_now) == d["cmd_final"]


def test_ramp_shape():
    """cmd_{k+1} = cmd_k + (1 − cmd_k)(emd − cmd_k)/2 rises monotonically to emd: ≈ 1 − 2/k, past 0.99 after
    ~200 updates for emd 0.999 (ucgm.md §1.5)."""
    t = Teacher(nn.Linear(2, 2), "ema", 0.999)
    seq = []
    for _ in range(3000):
        seq.append(t._decay)
        t.update(t.net)
    assert all(b > a for a, b in zip(seq, seq[1:]))
    k99 = next(k for k, v in enumerate(seq) if v >= 0.99)
    assert 150 < k99 < 250, k99
    assert 0.998 < seq[-1] < 0.999
    for k in (50, 100, 200):  # the 1 − 2/k law holds to within 10 % of 2/k from k = 50 on
        assert abs(seq[k] - (1 - 2 / k)) < 0.1 * 2 / k


def test_online_teacher_is_the_online_net_without_grad():
    net = TinyNet()
    t = Teacher(net, "online")
    assert list(t.state_dict()) == ["decay_now"] and not list(t.parameters())
    x, tt, y = torch.randn(2, 3, 4, 4), torch.rand(2), torch.tensor([0, 5])
    out = t(x, tt, y)
    assert not out.requires_grad
    assert torch.equal(out, net(x, tt, y).detach())
    _perturb(net, 0)  # follows the online weights
    t.update(net)  # no-op
    assert torch.equal(t(x, tt, y), net(x, tt, y).detach())


def test_frozen_copy_and_state_dict_round_trip():
    net = TinyNet()
    x, tt, y = torch.randn(2, 3, 4, 4), torch.rand(2), torch.tensor([1, 2])
    before = net(x, tt, y).detach()
    owner = nn.Module()
    owner.net, owner.teacher = net, Teacher(net, "frozen")
    assert all(not p.requires_grad for p in owner.teacher.parameters())
    assert len([p for p in owner.parameters() if p.requires_grad]) == len(list(net.parameters()))
    _perturb(net, 1)
    owner.teacher.update(net)
    assert torch.equal(owner.teacher(x, tt, y), before)  # frozen at the init
    sd = owner.state_dict()
    assert any(k.startswith("teacher.net.") for k in sd)
    other = nn.Module()
    other.net, other.teacher = TinyNet(), Teacher(TinyNet(), "frozen")
    other.load_state_dict(sd)
    assert torch.equal(other.teacher(x, tt, y), before)


def test_copy_from_resyncs_after_a_late_init_load():
    net = TinyNet()
    t = Teacher(net, "ema", 0.99)
    t.update(net)
    t.update(net)
    _perturb(net, 4)  # e.g. the init checkpoint loaded after the teacher was built
    t.copy_from(net)
    assert t._decay == 0.0 and float(t.decay_now) == 0.0
    assert all(torch.equal(p, q) for p, q in zip(t.net.parameters(), net.parameters()))


def test_ema_state_resumes():
    net = TinyNet()
    a = Teacher(net, "ema", 0.99)
    for s in range(3):
        _perturb(net, s)
        a.update(net)
    b = Teacher(TinyNet(), "ema", 0.99)
    b.load_state_dict(a.state_dict())
    assert b._decay == a._decay
    _perturb(net, 9)
    a.update(net)
    b.update(net)
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))


def test_frozen_teacher_from_another_checkpoint(tmp_path):
    """Issue #2 of the reference: a converged checkpoint as the frozen teacher, an earlier one as the trainable
    init. A reference-layout file ({"model": ..., "ema": ...}, DDP ``module.`` keys) loads strictly."""
    init, converged = TinyNet(), TinyNet()
    _perturb(converged, 3)
    path = tmp_path / "0100000.pt"
    torch.save({"model": {f"module.{k}": v for k, v in init.state_dict().items()},
                "ema": {f"module.{k}": v for k, v in converged.state_dict().items()}}, path)
    t = build_teacher(init, 1.0, checkpoint=path)  # default entry: "ema"
    assert t.policy == "frozen"
    x, tt, y = torch.randn(2, 3, 4, 4), torch.rand(2), torch.tensor([0, 1])
    assert torch.equal(t(x, tt, y), converged(x, tt, y).detach())
    assert not torch.equal(t(x, tt, y), init(x, tt, y).detach())
    t2 = build_teacher(init, 1.0, checkpoint=path, key="model")
    assert torch.equal(t2(x, tt, y), init(x, tt, y).detach())
    # Lightning layout with a prefix
    torch.save({"state_dict": {f"net.{k}": v for k, v in converged.state_dict().items()}}, tmp_path / "l.ckpt")
    sd = load_teacher_state(tmp_path / "l.ckpt", key="state_dict", prefix="net.")
    assert Teacher(init, "frozen", state_dict=sd)(x, tt, y).equal(converged(x, tt, y).detach())
    with pytest.raises(RuntimeError):  # strict: a wrong architecture does not load silently
        Teacher(init, "frozen", state_dict={"foo": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        build_teacher(init, 1.0, checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ValueError):
        build_teacher(init, 0.999, checkpoint=sd)


@pytest.mark.parametrize("lam,zeta,style,emd,policy", [
    (0.0, 0.0, None, 0.999, None), (1.0, 0.0, None, 1.0, None),  # ζ = 0: no teacher, also for λ = 1
    (0.0, 0.5, "ft-vs-fe", 0.999, "ema"), (1.0, 1.5, "fc-vs-xz", 1.0, "frozen"),
    (1.0, 2.0, "fc-vs-fe", 0.0, "online")])
def test_objective_builds_the_teacher_it_needs(lam, zeta, style, emd, policy):
    obj = UCGMObjective("linear", consistc_ratio=lam, enhanced_ratio=zeta, enhanced_style=style, ema_decay_rate=emd)
    t = obj.build_teacher(TinyNet())
    assert (t is None) == (policy is None) and obj.needs_teacher == (policy is not None)
    if t is not None:
        assert t.policy == policy
