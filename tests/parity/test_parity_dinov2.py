"""DINOv2-reg4 features (DiGIT's encoder) against outputs of DiGIT's own code (DAMO-NLP-SG/DiGIT cd6d8ca;
tests/fixtures/make_dinov2_fixture.py): its vendored ``vits.py`` with the patched ``get_intermediate_layers`` and
its ``prepare_semantic`` (normalise, bicubic 256 -> 224, layer 3, final LayerNorm, patch tokens, K-means argmin).

The small reference ViT's state dict goes through contgen's strict importer (the ``DINOv2Encoder`` constructor),
so a naming divergence fails as a key error and a maths divergence as a value mismatch. Tolerance ``TOL`` (1e-5
abs + rel, tests/parity/test_parity_mar.py): both sides run fp32 on the CPU; they differ only in the order of
floating-point operations (SDPA vs explicit softmax attention; contgen's [-1, 1] images, u8 / 127.5 - 1, mapped
back to [0, 1] vs the reference's u8 / 255). A wrong layer, resize, position interpolation or token order moves
the features by O(1) (layer 3 vs layer 1 differ by up to 0.9 here).
"""

import json

import pytest
import torch

from contgen.encoders import DINOv2Encoder
from tests.parity.replay import FIXTURES, TOL, load

DIR = FIXTURES / "dinov2"
CKPT = str(DIR / "dinov2_small_reg4.pth")
OUT = load("dinov2/dinov2_outputs.pt")
SMALL = OUT["config"]

pytestmark = pytest.mark.usefixtures("one_thread")


def images() -> torch.Tensor:
    """The fixture's uint8 images in contgen's convention ([-1, 1], as the data sets load them)."""
    return OUT["images"].float() / 127.5 - 1


def encoder(layer: int = 3) -> DINOv2Encoder:
    return DINOv2Encoder(CKPT, arch=SMALL, layer=layer)


def test_importer_loads_the_reference_state_dict():
    enc = encoder()
    ref = torch.load(CKPT, weights_only=True)
    mine = enc.vit.state_dict()
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) for k in mine)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training


@pytest.mark.parametrize("layer", sorted(OUT["layers"]))
def test_features_match_the_reference(layer):
    """Layer 3 is DiGIT's (block depth-3 only); 1 is the last block, ``depth`` the first."""
    enc = encoder(layer)
    assert enc.grid == (16, 16) and enc.feature_dim == SMALL["embed_dim"]
    with torch.no_grad():
        feats = enc(images())
    torch.testing.assert_close(feats, OUT["layers"][layer]["features"], **TOL)


def test_layers_differ():
    """The fixture tells the layers apart: matching all three rules out an off-by-one block."""
    f = {k: v["features"] for k, v in OUT["layers"].items()}
    assert (f[3] - f[1]).abs().max() > 0.1 and (f[3] - f[SMALL["depth"]]).abs().max() > 0.1


def test_preprocessing_matches_the_reference():
    """[-1, 1] -> [0, 1] -> ImageNet mean/std -> bicubic 256 -> 224: the ViT input, at the top-left corner."""
    enc = encoder()
    seen = {}
    enc.vit.patch_embed.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        enc(images())
    corner = OUT["vit_input_corner"]
    assert seen["x"].shape[-2:] == (224, 224)
    torch.testing.assert_close(seen["x"][..., : corner.shape[-2], : corner.shape[-1]], corner, **TOL)


def test_kmeans_ids_from_these_features_match_the_reference():
    """The reference's argmin over its random centroids (model.py:131-136) gives the same ids on our features."""
    with torch.no_grad():
        feats = encoder()(images())
    ids = torch.cdist(feats, OUT["centroids"].expand(feats.shape[0], -1, -1)).argmin(-1)
    assert torch.equal(ids, OUT["layers"][3]["ids"])


@pytest.mark.parametrize("arch", ["vitb14_reg4", "vitl14_reg4"])
def test_released_layouts(arch):
    """Names and shapes of the released dinov2_vit{b,l}14_reg4_pretrain.pth, from the reference's vit_base/vit_large."""
    ref = json.loads((DIR / "layouts.json").read_text())[arch]
    with torch.device("meta"):
        enc = DINOv2Encoder(None, arch=arch, random_init=True)
    assert {k: list(v.shape) for k, v in enc.vit.state_dict().items()} == ref
    assert enc.block == {"vitb14_reg4": 9, "vitl14_reg4": 21}[arch]  # digit.md §1: block 9 of 12, 21 of 24


def test_missing_file_names_the_file_and_the_key(tmp_path):
    path = str(tmp_path / "dinov2_vitb14_reg4_pretrain.pth")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.encoder\.ckpt_path: file not found.*"
                                                r"dinov2_vitb14_reg4_pretrain\.pth.*dl\.fbaipublicfiles"):
        DINOv2Encoder(path)
    with pytest.raises(ValueError, match=r"my\.key is required"):
        DINOv2Encoder(None, config_key="my.key")


def test_wrong_file_lists_the_problems():
    with torch.device("meta"), pytest.raises(ValueError, match=r"does not match DINOv2 vitb14_reg4 \(\d+ problems"):
        DINOv2Encoder(CKPT)
    with pytest.raises(ValueError, match=r"missing blocks\.4\.attn\.proj\.bias"):
        DINOv2Encoder(CKPT, arch={**SMALL, "depth": SMALL["depth"] + 1})


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown DINOv2 architecture"):
        DINOv2Encoder(None, arch="vitg14_reg4", random_init=True)
    with pytest.raises(ValueError, match=r"encoder\.layer=5 must lie in 1\.\.depth=4"):
        DINOv2Encoder(CKPT, arch=SMALL, layer=5)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 256, 256\)"):
        encoder()(torch.zeros(1, 3, 224, 224))
