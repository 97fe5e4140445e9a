"""bench/digit.py (issue 11) at --small sizes on the CPU: every case runs, the JSON lines carry their keys, and the
uncached sampling loop draws the same tokens as CausalARSampler (KV cache) at fp32."""

import importlib.util
import json
import sys

import pytest
import torch

from tests.helpers import ROOT, run_script

# loaded under its own name: a root-level digit.py (the DiGIT entry point) may already be `digit` in sys.modules
sys.path.insert(0, str(ROOT / "bench"))  # for its `from timing import Timer`
_spec = importlib.util.spec_from_file_location("bench_digit", ROOT / "bench" / "digit.py")
digit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digit)
import timing  # noqa: E402  (bench/timing.py, on the path above)

KEYS = {
    "kmeans_fit": {"points", "k", "dim", "iters", "iter_s", "init_s", "points_iter_per_s", "fp32_tflops"},
    "kmeans_assign": {"points", "k", "dim", "assign_s", "points_per_s"},
    "train": {"batch", "seq_len", "step_s", "tokens_per_s", "img_per_s", "flops_per_token_g", "mfu", "peak_gib",
              "params_m", "loss"},
    "sample": {"kv_cache", "batch", "top_k", "s_per_img", "tokens_per_s", "peak_gib"},
    "sample_match": {"match_fraction", "images_equal", "kv_cache_speedup"},
}


def test_small_run_writes_every_case(tmp_path):
    out = tmp_path / "digit.jsonl"
    proc = run_script("bench/digit.py", "--small", "--device", "cpu", "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")] == rows
    assert [r["case"] for r in rows] == ["kmeans_fit", "kmeans_assign", "train", "train", "sample", "sample",
                                         "sample_match"]
    for r in rows:
        assert KEYS[r["case"]] <= set(r) and r["gpu"] == "cpu" and r["small"] and "torch" in r, r
    assert [r["batch"] for r in rows if r["case"] == "train"] == [4, 8]
    assert [r["kv_cache"] for r in rows if r["case"] == "sample"] == [True, False]
    match = rows[-1]
    assert match["match_fraction"] == 1.0 and match["images_equal"] == 1.0  # fp32 on the CPU: the same tokens
    assert all(r["mfu"] is None and r["peak_gib"] is None for r in rows if r["case"] == "train")  # no GPU peak on a CPU


@pytest.mark.parametrize("order", [None, "reversed"])
def test_uncached_loop_equals_the_kv_cache_sampler(order):
    from contgen.samplers.causal import CausalARSampler

    sz = digit.sizes(small=True)
    sz["model"] = {**sz["model"], "order": list(range(sz["seq_len"]))[::-1] if order else None, "dropout": 0.0}
    model, head = digit.build_gpt(sz, torch.device("cpu"), top_k=10, seed=3)
    model.eval(), head.eval()
    labels = torch.tensor([0, 3, 7])
    cached = CausalARSampler()(model, head, labels, generator=torch.Generator().manual_seed(5))
    uncached = digit.sample_uncached(model, head, labels, 1.0, generator=torch.Generator().manual_seed(5))
    assert cached.shape == (3, sz["seq_len"]) and torch.equal(cached, uncached)
    other = digit.sample_uncached(model, head, labels, 1.0, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(other, uncached)  # the seed matters: the equality above is not vacuous


def test_digit_b_flops_formula():
    """6·N_matmul + 12·layers·d·L for DiGIT-B: N_matmul = 16 blocks of 12·d² (+ the qkv/fc weights only, no biases)
    + the 1024 × 8192 output projection."""
    from contgen.backbones.gpt import GPTBackbone
    from contgen.heads.categorical import CategoricalHead

    with torch.device("meta"):
        model = GPTBackbone(seq_len=256, num_classes=1000, vocab_size=8192, embed_dim=1024, depth=16, num_heads=16)
        head = CategoricalHead(1024, 8192)
    n = 16 * 12 * 1024**2 + 1024 * 8192
    assert digit.matmul_params(model, head) == n
    assert digit.flops_per_token(model, head) == 6 * n + 12 * 16 * 1024 * 256
    assert timing.bf16_peak("NVIDIA H100 80GB HBM3") == 989.0 and timing.bf16_peak("NVIDIA H100 PCIe") == 756.0
