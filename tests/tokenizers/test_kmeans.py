"""K-means for DiGIT's tokens (contgen/tokenizers/kmeans.py): recovery of a Gaussian mixture, monotone inertia,
streamed == in-memory, 2 processes == 1, determinism, empty-cluster repair, subsampling, files, bad input (CPU)."""

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contgen.tokenizers.kmeans import KMeans, assign

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:KMeans.*min_points_per_centroid"),  # tiny data on purpose; checked below
]


def mixture(k: int, dim: int, n_per: int, s: float, seed: int = 0):
    """k unit-variance Gaussians centred at s·e_j (j < k): centres sqrt(2)·s apart. Returns points, labels, means."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(k, dim)
    means[:, :k] = s * torch.eye(k)
    labels = torch.arange(k).repeat_interleave(n_per)
    return means[labels] + torch.randn(len(labels), dim, generator=g), labels, means


def bayes_error_bound(k: int, s: float) -> float:
    """Equal priors and identity covariance: the Bayes rule is the nearest true mean. A point of component i is
    misclassified only if its noise, projected onto the direction to some other mean j, exceeds half the distance
    d = sqrt(2)·s between the two means. The union bound over the k − 1 others gives (k − 1)·Φ̄(d/2)."""
    return (k - 1) * 0.5 * math.erfc(math.sqrt(2) * s / 2 / math.sqrt(2))


def matched_accuracy(x, labels, means, centroids) -> float:
    """Fraction of points in the cluster of their component's mean; the means must land in distinct clusters."""
    of_mean = assign(means, centroids)
    assert len(set(of_mean.tolist())) == len(means), "two components share a cluster: a centre was not recovered"
    return (assign(x, centroids) == of_mean[labels]).double().mean().item()


def test_recovers_well_separated_mixture_centres():
    """s = 40 (centres 56.6 apart, unit variance). The Bayes error bound (K−1)·Φ̄(28.3) < 1e-170, so among 800
    points every one must land in its component's cluster. k-means++ seeds one centre per component unless it
    draws a second point in an already covered one. At step j that happens with probability about
    j·2D / (j·2D + (K−j)(d² + 2D)), which sums to ≈ 1.1% here. Once every point is assigned correctly, Lloyd's fixed
    point is the component sample means."""
    k, dim, s = 4, 4, 40.0
    x, labels, means = mixture(k, dim, 200, s)
    assert bayes_error_bound(k, s) < 1e-170
    km = KMeans(k, init="k-means++", iters=10, seed=0).fit(x)
    assert matched_accuracy(x, labels, means, km.centroids) == 1.0
    of_mean = assign(means, km.centroids)
    sample_means = torch.stack([x[labels == j].mean(0) for j in range(k)])
    torch.testing.assert_close(km.centroids[of_mean], sample_means, atol=1e-4, rtol=0)


def test_overlapping_mixture_reaches_the_bayes_accuracy():
    """s = 3·sqrt(2) (centres 6 apart). The Bayes error is at most β = 3·Φ̄(3) ≈ 4.0e-3. Lloyd starts from the
    true means, each displaced by 1.5 in a random direction, and its Voronoi cells must come out as good as the
    Bayes ones, up to 4 binomial standard deviations over 4000 points: accuracy ≥ 1 − β − 4·sqrt(β(1−β)/n)."""
    k, dim, s, n_per = 4, 6, 3 * math.sqrt(2), 1000
    x, labels, means = mixture(k, dim, n_per, s, seed=1)
    beta = bayes_error_bound(k, s)
    g = torch.Generator().manual_seed(2)
    shift = torch.randn(k, dim, generator=g)
    init = means + 1.5 * shift / shift.norm(dim=1, keepdim=True)
    km = KMeans(k, init=init, iters=20, max_points_per_centroid=None).fit(x)
    bound = 1 - beta - 4 * math.sqrt(beta * (1 - beta) / (k * n_per))
    assert 3.9e-3 < beta < 4.1e-3
    assert matched_accuracy(x, labels, means, km.centroids) >= bound


def test_inertia_never_increases():
    """Lloyd's two steps each lower the objective: a new assignment can only shorten a point's distance, and the
    mean minimises the squared distances to a cluster's points. The check allows a relative 1e-6 for the fp32
    rounding of the expanded distances, and needs iterations without splits, because a split nudges a populated
    centroid."""
    x, _, _ = mixture(6, 6, 150, 2.0, seed=3)
    km = KMeans(12, iters=15, seed=5).fit(x)
    assert km.splits == [0] * 15
    for before, after in zip(km.inertia, km.inertia[1:]):
        assert after <= before * (1 + 1e-6)
    assert km.inertia[-1] < 0.9 * km.inertia[0]


def _fit(data, **kw) -> KMeans:
    return KMeans(8, iters=6, seed=11, chunk_elements=8 * 64, **kw).fit(data)  # 64-row chunks


@pytest.mark.parametrize("init", ["random", "k-means++"])
@pytest.mark.parametrize("max_ppc", [None, 100])  # 100·8 < 1500: trains on a subsample
def test_streaming_equals_in_memory_bit_for_bit(init, max_ppc):
    """Batches of 7, 300, 1, 692 and 500 rows give the very same result as one tensor, bit for bit, and so does
    a DataLoader with 128-row batches. Both paths cut the rows into the same 64-row chunks before any arithmetic,
    and the subsample is chosen by global row index, so the two run identical kernels on identical inputs."""
    x = torch.randn(1500, 6, generator=torch.Generator().manual_seed(4))
    ref = _fit(x, init=init, max_points_per_centroid=max_ppc)
    loader = torch.utils.data.DataLoader(x, batch_size=128)
    for data in (list(x.split([7, 300, 1, 692, 500])), loader):
        km = _fit(data, init=init, max_points_per_centroid=max_ppc)
        assert torch.equal(km.centroids, ref.centroids)
        assert km.inertia == ref.inertia and torch.equal(km.sizes, ref.sizes)
    assert ref.train_points == (800 if max_ppc else 1500)


TWO_PROC = [dict(init="k-means++", max_points_per_centroid=120), dict(init="random", max_points_per_centroid=None)]


def _two_proc_data():
    return torch.randn(1300, 5, generator=torch.Generator().manual_seed(6))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = _two_proc_data()
        mine = x[:800] if rank == 0 else list(x[800:].split(170))  # uneven halves; rank 1 streams its rows
        results = [_fit(mine, **kw) for kw in TWO_PROC]
        if rank == 0:
            torch.save([(km.centroids, km.inertia, km.sizes) for km in results], out)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    """Two gloo processes: rank 0 holds rows 0..799 as a tensor, rank 1 streams rows 800..1299. They draw the same
    subsample and init as one process holding all 1300 rows, and the all-reduced sums differ from the single
    process's only by fp32 rounding: each rank sums its own rows, in its own chunks. So the cluster sizes are
    equal, and the centroids and inertia agree to fp32 rounding."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path / "two.pt")), nprocs=2)
    two = torch.load(tmp_path / "two.pt")
    x = _two_proc_data()
    for kw, (centroids, inertia, sizes) in zip(TWO_PROC, two):
        one = _fit(x, **kw)
        torch.testing.assert_close(centroids, one.centroids, atol=1e-5, rtol=1e-5)
        assert inertia == pytest.approx(one.inertia, rel=1e-6)
        assert torch.equal(sizes, one.sizes)
        assert torch.equal(assign(x, centroids), assign(x, one.centroids))


def test_deterministic_from_the_seed():
    x = torch.randn(900, 4, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)  # the global RNG plays no part
    a = KMeans(5, iters=4, seed=3, init="k-means++", max_points_per_centroid=100).fit(x)
    torch.manual_seed(1)
    b = KMeans(5, iters=4, seed=3, init="k-means++", max_points_per_centroid=100).fit(x)
    c = KMeans(5, iters=4, seed=4, init="k-means++", max_points_per_centroid=100).fit(x)
    assert torch.equal(a.centroids, b.centroids) and a.inertia == b.inertia
    assert not torch.equal(a.centroids, c.centroids)


def test_empty_clusters_are_split_from_the_largest():
    """Blobs of 60 and 40 points, plus two starting centroids so far away that no point picks them. After the
    first iteration both are empty. The first takes a copy of the 60-point cluster, which then counts as two of
    30, so the second takes a copy of the 40-point one. Lloyd then pulls each pair apart, and no cluster stays
    empty."""
    g = torch.Generator().manual_seed(8)
    a = torch.tensor([3.0, 3.0]) + 0.3 * torch.randn(60, 2, generator=g)
    b = torch.tensor([13.0, 3.0]) + 0.3 * torch.randn(40, 2, generator=g)
    x = torch.cat([a, b])
    init = torch.tensor([[3.0, 3.0], [13.0, 3.0], [100.0, 100.0], [-100.0, 100.0]])
    km = KMeans(4, init=init, iters=8).fit(x)
    assert km.splits[0] == 2 and sum(km.splits[1:]) == 0
    assert (km.sizes > 0).all() and km.sizes.sum() == 100
    assert (torch.bincount(assign(x, km.centroids), minlength=4) > 0).all()
    near = assign(km.centroids, torch.stack([a.mean(0), b.mean(0)]))
    assert near.tolist() == [0, 1, 0, 1]  # centroid 2 split off blob a (the larger), 3 off blob b


def test_subsampling_honours_max_points_per_centroid():
    """faiss subsamples when N > K·max_points_per_centroid (strictly), to exactly K·max_points_per_centroid
    points; the sizes at the last assignment add up to the points trained on."""
    x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(9))
    for max_ppc, used in [(10, 40), (250, 1000), (None, 1000)]:
        km = KMeans(4, iters=2, max_points_per_centroid=max_ppc).fit(x)
        assert (km.train_points, km.num_points, int(km.sizes.sum())) == (used, 1000, used)
    picks = [KMeans(4, iters=1, seed=s, max_points_per_centroid=10).fit(x).centroids for s in (0, 1)]
    assert not torch.equal(*picks)


def test_assign_is_the_nearest_centroid_in_chunks_and_ignores_autocast():
    g = torch.Generator().manual_seed(10)
    x, c = torch.randn(3, 50, 8, generator=g), torch.randn(16, 8, generator=g)
    brute = torch.cdist(x.reshape(-1, 8).double(), c.double()).argmin(1).reshape(3, 50)
    assert torch.equal(assign(x, c), brute)
    assert torch.equal(assign(x, c, chunk_elements=16 * 7), brute)  # 7-row chunks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(assign(x, c), brute)
    assert assign(x[:, :0], c).shape == (3, 0)


def test_save_and_load(tmp_path):
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(12))
    km = KMeans(5, iters=3, seed=2, max_points_per_centroid=50).fit(x)
    km.save(tmp_path / "km.pt")
    back = KMeans.load(tmp_path / "km.pt", dim=6, k=5)
    assert torch.equal(back.centroids, km.centroids) and back.meta() == km.meta()
    assert back.meta()["train_points"] == 250 and len(back.meta()["inertia"]) == 3
    np.save(tmp_path / "km_5.npy", km.centroids.numpy())  # the layout of DiGIT's released km_8k.npy
    bare = KMeans.load(tmp_path / "km_5.npy", dim=6)
    assert torch.equal(assign(x, bare.centroids), assign(x, km.centroids)) and bare.inertia == []


def test_bad_input_is_named():
    x = torch.randn(20, 3)
    with pytest.raises(ValueError, match=r"k=30 is larger than the number of points in data \(20\)"):
        KMeans(30).fit(x)
    bad = x.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match="data: row 7 has a NaN"):
        KMeans(2).fit(bad)
    with pytest.raises(ValueError, match="data: row 7 has a NaN"):  # counted over batches
        KMeans(2).fit([x[:6], bad[6:]])
    with pytest.raises(ValueError, match="data: batch 1 has D=4"):
        KMeans(2).fit([x, torch.randn(5, 4)])
    with pytest.raises(ValueError, match="data must be a floating"):
        KMeans(2).fit(x.long())
    with pytest.raises(TypeError, match="iterator"):
        KMeans(2).fit(b for b in [x])
    with pytest.raises(ValueError, match=r"init: expected starting centroids \(2, 3\)"):
        KMeans(2, init=torch.zeros(2, 4)).fit(x)
    with pytest.raises(ValueError, match="init must be one of"):
        KMeans(2, init="kmeans++")
    with pytest.raises(ValueError, match=r"assign: x must be floating \(..., D=4\)"):
        assign(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="assign: x has NaN"):
        assign(bad, torch.randn(5, 3))


def test_warns_under_min_points_per_centroid_like_faiss():
    with pytest.warns(UserWarning, match="100 points for k=4 centroids; faiss asks for at least 156"):
        KMeans(4, iters=1).fit(torch.randn(100, 2))


def test_load_checks_dim_and_k(tmp_path):
    KMeans(2, iters=1).fit(torch.randn(10, 3)).save(tmp_path / "km.pt")
    with pytest.raises(ValueError, match="D=3, but dim=5"):
        KMeans.load(tmp_path / "km.pt", dim=5)
    with pytest.raises(ValueError, match="K=2 centroids, but k=4"):
        KMeans.load(tmp_path / "km.pt", k=4)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a KMeans file"):
        KMeans.load(tmp_path / "other.pt")
