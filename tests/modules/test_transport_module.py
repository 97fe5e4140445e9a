"""TransportModule wiring: the second family under the shared GenerativeModule — training step with the teacher,
sampling shape and determinism, init from a previous stage, refusals before compute."""

import functools

import pytest
import torch

from contgen.backbones.tit import TiT
from contgen.data.shapes import Shapes
from contgen.modules.transport import TransportModule
from contgen.tokenizers.patch import PatchTokenizer
from contgen.transport.solvers import EulerSampler, UCGMSampler
from contgen.transport.ucgm import UCGMObjective
from tests.helpers import train_optim

TINY_TIT = functools.partial(TiT, patch_size=4, hidden_size=32, depth=1, num_heads=2)


def make(objective=None, sampler=None, **kw):
    torch.manual_seed(0)
    objective = objective or UCGMObjective(enhanced_ratio=0.47, enhanced_style="ft-vs-fe", ema_decay_rate=0.999)
    return TransportModule(PatchTokenizer(16, 1), TINY_TIT, objective, sampler or UCGMSampler(steps=4),
                           num_classes=12, optim=train_optim(), **kw)


def batch(n=8):
    shapes = Shapes(16, n)
    return {"image": torch.stack([shapes[i]["image"] for i in range(n)]), "label": torch.arange(n)}


def test_trains_with_its_teacher_and_samples():
    module = make()
    assert module.teacher is not None and module.teacher.policy == "ema"  # ζ ≠ 0 reads a teacher (ucgm.md §1.5)
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-3)
    before = [p.clone() for p in module.teacher.net.parameters()]
    for step in range(2):
        loss = module.training_step(batch(), step)
        loss.backward()
        opt.step(), opt.zero_grad()
    assert torch.isfinite(loss)
    # the ramped EMA (decay 0 at the first update) copied the online weights into the teacher
    assert any(not torch.equal(a, b) for a, b in zip(before, module.teacher.net.parameters()))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    images = module.generate(torch.tensor([0, 11]), generator=g(), use_ema=False)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert torch.equal(images, module.generate(torch.tensor([0, 11]), generator=g(), use_ema=False))


def test_plain_flow_matching_builds_no_teacher_and_optimizer_groups_cover_the_denoiser():
    module = make(UCGMObjective(loss="mse", weight_function=None, wt_cosine_loss=False))
    assert module.teacher is None
    decay, head = module.decay_and_head()
    assert decay is module.net.denoiser and head is None


def test_transport_mismatch_is_refused_before_compute():
    with pytest.raises(ValueError, match="objective.transport and sampler.transport differ"):
        make(sampler=EulerSampler(steps=4, transport="relinear"))


def test_init_ckpt_loads_weights_and_ema_and_the_frozen_teacher_copies_the_init(tmp_path):
    first = make()
    with torch.no_grad():
        for p in first.net.parameters():
            p.add_(torch.randn_like(p))
    ckpt = {"state_dict": first.state_dict(), "epoch": 0, "global_step": 0}
    first.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "stage1.ckpt")
    fewstep = UCGMObjective(consistc_ratio=1.0, enhanced_ratio=2.0, enhanced_style="fc-vs-xz", scaled_cbl_eps=5.0,
                            ema_decay_rate=1.0)
    second = make(fewstep, init_ckpt=str(tmp_path / "stage1.ckpt"))
    second.setup("fit")  # read when fitting starts (sample.py never needs the file)
    for mine, theirs in ((second.net, first.net), (second.ema.shadow, first.ema.shadow)):
        assert all(torch.equal(a, b) for a, b in zip(mine.parameters(), theirs.parameters()))
    assert second.teacher.policy == "frozen"
    assert all(torch.equal(a, b) for a, b in zip(second.teacher.net.parameters(), first.net.parameters()))
    # a released {"model", "ema"} file (the reference's layout) loads the same way
    torch.save({"model": first.net.denoiser.state_dict(), "ema": first.ema.shadow.denoiser.state_dict()},
               tmp_path / "released.pt")
    third = make(fewstep, init_ckpt=str(tmp_path / "released.pt"))
    third.setup("fit")
    assert all(torch.equal(a, b) for a, b in zip(third.ema.shadow.parameters(), first.ema.shadow.parameters()))
    with pytest.raises(FileNotFoundError, match="module.init_ckpt: no file at"):
        make(init_ckpt=str(tmp_path / "missing.ckpt")).setup("fit")


def test_trains_from_the_token_cache_layout_with_flip_views():
    """A cached batch holds (image, h-flip) moments per sample (contgen/data/cached.py); the family picks one view per
    sample with the step's generator, as the UCGM reference's dataset picks latents or latents_flip."""
    module = make(UCGMObjective(loss="mse", weight_function=None))
    images = batch(4)["image"]
    views = torch.stack([module.tokenizer.moments(images), module.tokenizer.moments(images.flip(-1))], dim=1)
    g, _ = module.step_generators(0)
    tokens = module.tokens_from_batch({"moments": views, "label": torch.arange(4)}, g)
    picked = [any(torch.equal(tokens[i], views[i, v]) for v in (0, 1)) for i in range(4)]
    assert all(picked)
    assert torch.isfinite(module.training_step({"moments": views, "label": torch.arange(4)}, 0))


def test_shortcut_half_steps_read_the_module_ema_or_the_online_net():
    """bootstrap_ema (the reference default): the half steps run the module's EMA copy, updated after each optimizer
    step (train_state.py:55-59); false: the online weights. No second copy either way."""
    from contgen.backbones.dit import ShortcutDiT
    from contgen.transport.shortcut import ShortcutObjective, ShortcutSampler

    tiny = functools.partial(ShortcutDiT, patch_size=4, hidden_size=32, depth=1, num_heads=2)
    for ema in (True, False):
        torch.manual_seed(0)
        module = TransportModule(PatchTokenizer(16, 1), tiny, ShortcutObjective(bootstrap_every=1, bootstrap_ema=ema),
                                 ShortcutSampler(steps=2), num_classes=12, optim=train_optim())
        expected = module.ema.shadow.denoiser if ema else module.net.denoiser
        assert module.teacher.module is expected and module.teacher.net is None
        loss = module.training_step(batch(8), 0)
        loss.backward()
        assert torch.isfinite(loss) and module.net.denoiser.dt_embedder.mlp[0].weight.grad is not None
        images = module.generate(torch.tensor([0, 11]), generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 3, 16, 16)
