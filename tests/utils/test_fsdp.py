"""FSDP's wrap policy for contgen modules (FSDP itself needs a GPU: bench/scale.py runs it; here the policy)."""

import pytest
import torch

from contgen.data.shapes import Shapes
from contgen.utils.fsdp import ShardedStrategy
from tests.modules.test_token_ar import make as make_token_ar
from tests.modules.test_transport_module import make as make_transport


@pytest.mark.parametrize("make", [make_token_ar, lambda: make_token_ar(backbone="ear", head="energy"), make_transport])
def test_every_trained_parameter_and_its_twins_sit_in_units_of_the_same_shapes(make):
    """The EMA (and a UCGM teacher) update shard-locally: each copy's parameters must be in units of their own,
    wrapped by the same rule as the trained net's, so that their flat shards line up. Nothing trained or averaged
    may be left to the root unit (which FSDP gathers only around the training step) or sit beside another copy."""
    module = make()
    units = module.sharded_units()
    blocks = ShardedStrategy().blocks
    owner = {}  # parameter -> the innermost unit holding it (a block inside a backbone unit is its own unit)
    for unit in units:
        for p in unit.parameters():
            owner.setdefault(id(p), unit)
        for block in (m for m in unit.modules() if isinstance(m, blocks)):
            for p in block.parameters():
                owner[id(p)] = block
    outside = [n for n, p in module.named_parameters() if id(p) not in owner and not n.startswith("tokenizer.")]
    assert not outside
    copies = [module.net, module.ema.shadow] + ([module.teacher.net] if getattr(module, "teacher", None) else [])
    layouts = [[(type(owner[id(p)]).__name__, p.shape) for p in c.parameters()] for c in copies]
    assert all(layout == layouts[0] for layout in layouts)
    # no unit holds parameters of two copies
    for unit in set(owner.values()):
        held = {i for i, c in enumerate(copies) if any(owner.get(id(p)) is unit for p in c.parameters())}
        assert len(held) <= 1
    # FSDP gathers a unit's parameters around its forward only: each unit of the trained net runs forward in a
    # training step, each unit of the EMA copy when sampling
    called = set()
    for unit in units:
        unit.register_forward_hook(lambda m, *_: called.add(id(m)))
    shapes = Shapes(16, 4)
    batch = {"image": torch.stack([shapes[i]["image"] for i in range(4)]), "label": torch.arange(4)}
    module.log = lambda *a, **k: None
    module.training_step(batch, 0)
    module.generate(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert {id(u) for u in units} <= called


def test_optimizer_groups_use_the_dims_as_built():
    """FSDP hands configure_optimizers 1-D shard pieces: weight decay still goes to the weight matrices."""
    from contgen.modules.optim import param_groups

    module = make_token_ar()
    flat = {id(p): p for p in module.net.parameters()}
    with torch.no_grad():
        for p in flat.values():
            p.data = p.data.flatten()  # what FSDP's use_orig_params views look like
    groups = {g["name"]: len(g["params"]) for g in param_groups(module.net.backbone, module.net.head, 0.02, 1.0,
                                                                 module._param_ndims)}
    assert groups["decay"] > 0 and groups["head"] > 0
    assert "decay" not in {g["name"] for g in param_groups(module.net.backbone, module.net.head, 0.02)}


def test_a_causal_gpt_is_refused():
    """Its KV-cache decode reads the backbone's tables outside a forward, where FSDP has them sharded."""
    from contgen.modules.causal_ar import CausalARModule
    from contgen.samplers.causal import CausalARSampler
    from contgen.tokenizers.patch import PatchTokenizer
    from contgen.utils.fsdp import check_shardable
    from tests.backbones.test_gpt import GPT_SMALL, HEADS
    from tests.helpers import train_optim

    module = CausalARModule(PatchTokenizer(16, 4), GPT_SMALL, HEADS["diffusion"], CausalARSampler(), num_classes=4,
                            optim=train_optim())
    with pytest.raises(ValueError, match="strategy=fsdp: CausalARModule samples .* strategy=ddp"):
        check_shardable(module)
    check_shardable(make_token_ar())  # the masked family shards
