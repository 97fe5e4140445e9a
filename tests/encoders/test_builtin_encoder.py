"""The built-in classifier's feature maps behind the encoder interface (contgen/encoders/builtin.py)."""

from pathlib import Path

import pytest
import torch

from contgen.data.shapes import Shapes
from contgen.encoders import BuiltinEncoder
from contgen.metrics.builtin import BuiltinClassifier, load_or_train_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
DESC = {"name": "shapes", "image_size": SIZE, "num_classes": 12, "seed": 0, "num_samples": 4000}


def _shapes(split, n):
    return Shapes(image_size=SIZE, num_samples=n, seed=0, split=split)


def _images(ds):
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.stack([torch.as_tensor(it["label"]) for it in items])


@pytest.mark.parametrize("size,stage,grid,dim", [(32, 1, 16, 32), (32, 2, 8, 64), (32, 3, 4, 128), (20, 3, 3, 128)])
def test_grid_and_features_are_the_conv_maps(size, stage, grid, dim):
    clf = BuiltinClassifier(num_classes=4, image_size=size).eval()
    enc = BuiltinEncoder(clf, stage=stage)
    assert (enc.image_size, enc.grid, enc.feature_dim, enc.seq_len) == (size, (grid, grid), dim, grid * grid)
    img = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        feats = enc(img)
        maps = clf.convs[:stage](img)
    assert feats.shape == (2, grid * grid, dim)
    assert torch.equal(feats, maps.flatten(2).transpose(1, 2))  # raster order, channels last
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


def test_bad_input_is_refused(tmp_path):
    clf = BuiltinClassifier(num_classes=4, image_size=16)
    with pytest.raises(ValueError, match=r"encoder\.stage=4 must lie in 1\.\.3"):
        BuiltinEncoder(clf, stage=4)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 16, 16\)"):
        BuiltinEncoder(clf)(torch.zeros(1, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match=r"encoder\.classifier: file not found.*load_or_train_classifier"):
        BuiltinEncoder(str(tmp_path / "nope.pt"))
    torch.save({"state_dict": clf.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="not a built-in classifier file of version"):
        BuiltinEncoder(str(tmp_path / "old.pt"))


def test_trained_features_are_discriminative_and_load_from_the_cache(cache_dir):
    """Trained on the built-in shapes in-framework: per-image mean features separate the 12 classes on held-out
    images (nearest class mean), far better than the same rule on raw pixels; the cached file gives the same."""
    clf = load_or_train_classifier(_shapes("train", 4000), _shapes("val", 1000), DESC, cache_dir)  # ~6 s
    enc = BuiltinEncoder(clf)
    (fit_x, fit_y), (val_x, val_y) = _images(_shapes("train", 2000)), _images(_shapes("val", 600))

    def nearest_mean_accuracy(f_fit, f_val):
        means = torch.stack([f_fit[fit_y == c].mean(0) for c in range(DESC["num_classes"])])
        return (torch.cdist(f_val, means).argmin(1) == val_y).double().mean().item()

    with torch.no_grad():
        acc = nearest_mean_accuracy(enc(fit_x).mean(1), enc(val_x).mean(1))
    pixels = nearest_mean_accuracy(fit_x.flatten(1), val_x.flatten(1))
    assert acc > 0.9 and acc > pixels + 0.2, (acc, pixels)  # measured 0.97 vs 0.63

    (path,) = Path(cache_dir).glob(f"builtin_classifier_shapes_{clf.cache_key}.pt")
    with torch.no_grad():
        assert torch.equal(BuiltinEncoder(str(path))(val_x[:4]), enc(val_x[:4]))
