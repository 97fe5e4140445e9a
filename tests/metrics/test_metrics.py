"""contgen.metrics: FID maths against closed forms, IS limits, stats files, Inception wrapper offline, FD_builtin."""

import time

import numpy as np
import pytest
import torch

from contgen.data.shapes import Shapes
from contgen.metrics import (
    FeatureStats,
    InceptionFeatures,
    builtin_metrics,
    frechet_distance,
    inception_score,
    load_or_compute_ref_stats,
    load_or_train_classifier,
    load_stats,
    save_stats,
    to_uint8,
)
from contgen.metrics import builtin as builtin_mod


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- Fréchet distance


def test_fd_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), _spd(rng, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fd_diagonal_closed_form():
    # Commuting (diagonal) covariances: Tr sqrt(S1 S2) = sum sqrt(a_i b_i), so FD = |dmu|² + sum (sqrt a - sqrt b)².
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fd_1d_closed_form():
    mu1, s1, mu2, s2 = 0.3, 1.7, -1.2, 0.4
    assert frechet_distance(mu1, s1**2, mu2, s2**2) == pytest.approx((mu1 - mu2) ** 2 + (s1 - s2) ** 2, rel=1e-12)


def test_fd_singular_covariances_finite():
    # 3 samples in 10-d: rank-2 covariances, as with too few generated images.
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((3, 10)), rng.standard_normal((3, 10))
    fd = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(fd) and fd > 0


def test_fd_rejects_large_imaginary_part_and_bad_shapes():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))  # not a covariance
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_matches_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 6)) * rng.uniform(0.5, 2, 6) + rng.standard_normal(6)
    stats = FeatureStats()
    for chunk in np.array_split(x, 7):  # uneven chunks, mixed numpy/torch input
        stats.update(torch.from_numpy(chunk).float() if len(chunk) % 2 else chunk)
    mu, sigma = stats.mu_sigma()
    assert stats.num == 1000
    # tolerances cover the float32 rounding of the torch chunks (relative 6e-8 on values of order 1)
    np.testing.assert_allclose(mu, x.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-5)
    with pytest.raises(ValueError, match="feature dim"):
        stats.update(np.zeros((2, 5)))


# ---------------------------------------------------------------- Inception Score


def test_inception_score_limits():
    k = 10
    assert inception_score(torch.full((100, k), 1.0 / k), from_logits=False) == pytest.approx((1.0, 0.0))
    assert inception_score(torch.zeros(100, k))[0] == pytest.approx(1.0)  # zero logits = uniform
    onehot = torch.eye(k)[torch.arange(200) % k]  # every split of 20 holds each class twice
    assert inception_score(onehot, from_logits=False, shuffle_seed=None) == pytest.approx((k, 0.0))
    mean, _ = inception_score(onehot * 50.0)  # confident logits, shuffled as torch-fidelity does: close to K
    assert 0.8 * k < mean <= k + 1e-9


# ---------------------------------------------------------------- stats files


def test_stats_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(5), _spd(rng, 5)
    save_stats(tmp_path / "ref.npz", mu, sigma)
    mu2, sigma2 = load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    # ADM's VIRTUAL_imagenet256_labeled.npz carries extra arrays; only mu/sigma are read.
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    assert load_stats(tmp_path / "adm.npz")[0].shape == (5,)
    with pytest.raises(FileNotFoundError, match=r"metrics\.ref_stats.*missing\.npz"):
        load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(KeyError, match=r"metrics\.ref_stats.*sigma"):
        load_stats(tmp_path / "bad.npz")


# ---------------------------------------------------------------- Inception wrapper (offline)


def test_inception_missing_weights_error(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as e:
        InceptionFeatures(path)
    msg = str(e.value)
    for part in (str(path), "metrics.inception_weights", "weights-inception-2015-12-05-6726825d.pth", "v0.2.0"):
        assert part in msg


def test_inception_random_weights_end_to_end(tmp_path, monkeypatch):
    """Builds torch-fidelity's network without its weights, saves a random state dict, and runs the wrapper on it
    with downloading made impossible."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with monkeypatch.context() as m:
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "random_inception.pth")
    del net

    def no_download(*a, **k):
        raise AssertionError("InceptionFeatures tried to download weights")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", no_download)
    model = InceptionFeatures(tmp_path / "random_inception.pth")
    model.train()  # must stay in eval
    assert not model.extractor.training
    images = to_uint8(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    out = model(images)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert torch.isfinite(out["pool"]).all() and torch.isfinite(out["logits"]).all()
    with pytest.raises(ValueError, match="uint8"):
        model(images.float())


def test_inception_rejects_pickled_objects(tmp_path):
    torch.save({"model": Shapes(8, 1)}, tmp_path / "pickle.pth")  # arbitrary object: not a plain state dict
    with pytest.raises(ValueError, match="not a plain state dict"):
        InceptionFeatures(tmp_path / "pickle.pth")


def test_to_uint8_convention():
    x = torch.tensor([-1.0, -2.0, 0.0, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]


# ---------------------------------------------------------------- FD_builtin

SIZE = 16  # 16-px shapes keep the test fast; the 32-px default is timed in the slow test below
DESC = {"name": "shapes", "image_size": SIZE, "num_classes": 12, "seed": 0, "num_samples": 4000}


def _shapes(split, n):
    return Shapes(image_size=SIZE, num_samples=n, seed=0, split=split)


def _images(ds):
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin_cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return load_or_train_classifier(_shapes("train", 4000), _shapes("val", 1000), DESC, cache_dir)


def test_builtin_classifier_accuracy_and_cache(classifier, cache_dir, monkeypatch):
    assert classifier.heldout_accuracy > 0.95  # observed 0.98-0.99 over init seeds at 16 px
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())

    def no_training(*a, **k):
        raise AssertionError("retrained although a cached classifier exists")

    monkeypatch.setattr(builtin_mod, "train_classifier", no_training)
    again = load_or_train_classifier(_shapes("train", 4000), _shapes("val", 1000), DESC, cache_dir)
    assert again.cache_key == classifier.cache_key and again.heldout_accuracy == classifier.heldout_accuracy
    for a, b in zip(again.state_dict().values(), classifier.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="description lacks"):
        load_or_train_classifier(_shapes("train", 10), _shapes("val", 10), {"name": "shapes"}, cache_dir)
    with pytest.raises(ValueError, match="image_size"):
        load_or_train_classifier(_shapes("train", 10), _shapes("val", 10), {**DESC, "image_size": 32}, cache_dir)


def test_builtin_metrics_real_vs_noise(classifier, cache_dir):
    ref_desc = {**DESC, "split": "train", "num_samples": 2000}
    ref = load_or_compute_ref_stats(classifier, _shapes("train", 2000), ref_desc, cache_dir)
    assert len(list(cache_dir.glob("builtin_ref_*.npz"))) == 1
    np.testing.assert_array_equal(load_or_compute_ref_stats(classifier, None, ref_desc, cache_dir)[0], ref[0])  # cached

    images, labels = _images(_shapes("test", 2000))
    real = builtin_metrics(classifier, images, labels, ref)
    noise = builtin_metrics(classifier, torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                            labels, ref)
    one_class = labels == 5
    collapsed = builtin_metrics(classifier, images[one_class].repeat(12, 1, 1, 1), labels[one_class].repeat(12), ref)
    assert real["class_acc"] > 0.95 and collapsed["class_acc"] > 0.95
    # real["fd"] is the two-sample floor (2000 vs 2000 independent real images); noise and a single-class
    # (mode-collapsed) set must sit far above it: 10x the floor is a loose margin (observed ratios are >100x).
    assert noise["fd"] > 10 * real["fd"] and collapsed["fd"] > 10 * real["fd"]
    assert noise["class_acc"] < 0.5


@pytest.mark.slow
def test_builtin_classifier_32px_default_recipe(tmp_path):
    """The laptop default: 32-px shapes, 4000 training images, default recipe; budget < ~60 s on 2 slow cores."""
    desc = {**DESC, "image_size": 32}
    t0 = time.perf_counter()
    clf = load_or_train_classifier(Shapes(32, 4000, 0, "train"), Shapes(32, 1000, 0, "val"), desc, tmp_path)
    print(f"32-px builtin classifier: {time.perf_counter() - t0:.1f} s, held-out accuracy {clf.heldout_accuracy:.4f}")
    assert clf.heldout_accuracy > 0.95
