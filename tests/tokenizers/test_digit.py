"""DiGIT's discriminative tokenizer (contgen/tokenizers/digit.py) and the command that fits its centroids
(contgen/cli/fit_kmeans.py), offline: the built-in classifier's conv maps as the encoder on built-in shapes."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import contgen.cli.config  # noqa: F401
from contgen.cli.fit_kmeans import fit_kmeans
from contgen.data.cached import CachedTokens, cache_tokens
from contgen.data.shapes import Shapes
from contgen.heads.categorical import CategoricalHead
from contgen.modules.base import GenerativeModule
from contgen.modules.causal_ar import CausalARModule
from contgen.samplers.causal import CausalARSampler
from contgen.tokenizers.digit import DigitKMeansTokenizer
from contgen.tokenizers.kmeans import KMeans, assign
from tests.backbones.test_gpt import GPT_SMALL
from tests.helpers import run_script, train_optim

pytestmark = pytest.mark.usefixtures("one_thread")

CONF = Path(__file__).resolve().parents[2] / "conf"
K, STAGE = 16, 2  # 16-px shapes, conv stage 2: a 4x4 grid of 64-d features
FIT = ["data=shapes", "data.train.num_samples=640", "tokenizer.encoder=builtin", f"tokenizer.stage={STAGE}",
       f"k={K}", "fraction=0.25", "batch_size=64", "device=cpu", "threads=1"]


def compose_fit(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("fit_kmeans.yaml", overrides=list(overrides))


@pytest.fixture(scope="module")
def centroids(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digit") / "centroids.pt"
    cfg = compose_fit(*FIT, f"out={out}")
    with open_dict(cfg):  # conftest's cache_dir (a function-scoped fixture)
        cfg.paths.cache_dir = os.environ.get("CONTGEN_CACHE") or str(tmp_path_factory.getbasetemp() / "contgen-cache")
    fit_kmeans(cfg)  # trains (or reuses) the built-in classifier, then 22 streamed passes over 160 images
    return out


def tokenizer(path, **kw) -> DigitKMeansTokenizer:
    return DigitKMeansTokenizer(path and str(path), encoder="builtin", image_size=16, **{"stage": STAGE, **kw})


def test_fit_then_tokenize(centroids):
    meta = KMeans.load(centroids).file_meta
    assert meta["encoder"]["name"] == "builtin" and meta["encoder"]["stage"] == STAGE
    assert Path(meta["encoder"]["classifier"]).is_file()  # recorded: the tokenizer reads it from here
    assert (meta["num_images"], meta["grid"], meta["k"], meta["iters"]) == (160, [4, 4], K, 20)
    assert meta["train_points"] == 160 * 16 and len(meta["inertia"]) == 20

    tok = tokenizer(centroids)
    assert (tok.vocab_size, tok.grid, tok.seq_len, tok.image_size) == (K, (4, 4), 16, 16)
    img = torch.stack([Shapes(16, 32, seed=5, split="val")[i]["image"] for i in range(32)])
    ids = tok.encode(img)
    assert ids.shape == (32, 16) and ids.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < K and len(ids.unique()) > K // 2
    with torch.no_grad():
        assert torch.equal(ids, assign(tok.encoder(img), tok.centroids))  # the nearest centroid of each feature
    with pytest.raises(NotImplementedError, match="stage 2, the pixel decoder"):
        tok.decode(ids)


def test_clear_errors(centroids, tmp_path):
    with pytest.raises(ValueError, match="tokenizer.centroids_path is required.*fit_kmeans.py"):
        tokenizer(None)
    with pytest.raises(FileNotFoundError, match="tokenizer.centroids_path: file not found.*fit_kmeans.py"):
        tokenizer(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match=r"fitted on other features.*stage: file 2 vs config 3"):
        tokenizer(centroids, stage=3)
    np.save(tmp_path / "km.npy", np.zeros((8, 5), np.float32))  # a bare array: no record of its encoder
    with pytest.raises(ValueError, match="tokenizer.classifier is required"):
        tokenizer(tmp_path / "km.npy")
    classifier = KMeans.load(centroids).file_meta["encoder"]["classifier"]
    with pytest.raises(ValueError, match=r"K=8 centroids of D=5, but tokenizer.encoder=builtin gives D=64"):
        tokenizer(tmp_path / "km.npy", classifier=classifier)
    with pytest.raises(ValueError, match="tokenizer.encoder='vq': choose one of"):
        DigitKMeansTokenizer(str(centroids), encoder="vq", image_size=16)
    with pytest.raises(ValueError, match=r"k=9999 centroids from 2560 feature vectors.*raise fraction or lower k"):
        fit_kmeans(compose_fit(*FIT, "k=9999", f"tokenizer.classifier={classifier}", f"out={tmp_path / 'x.pt'}"))


def test_token_cache_stores_ids(centroids, tmp_path):
    tok, ds = tokenizer(centroids), Shapes(16, 12, seed=3)
    with pytest.raises(ValueError, match="expected int32"):
        cache_tokens(ds, tok, tmp_path / "f", progress=False)
    cached = CachedTokens(str(cache_tokens(ds, tok, tmp_path / "c", batch_size=5, dtype="int32", progress=False)))
    assert cached.moments[0].dtype == np.int32 and (cached.seq_len, cached.moment_dim) == (16, 1)
    image = ds[7]["image"][None]
    both = cached[7]["moments"]
    assert torch.equal(tok.sample(both[:1]), tok.encode(image))
    assert torch.equal(tok.sample(both[1:]), tok.encode(image.flip(-1)))


def test_stage1_module_trains_on_ids_and_refuses_pixels(centroids):
    """A causal GPT with the categorical head over the ids, encoded online from images (as DiGIT's stage 1)."""
    torch.manual_seed(0)
    module = CausalARModule(tokenizer(centroids), GPT_SMALL, CategoricalHead, CausalARSampler(), num_classes=12,
                            optim=train_optim())
    batch = {"image": torch.stack([Shapes(16, 8, seed=1)[i]["image"] for i in range(8)]), "label": torch.arange(8)}
    g, g_cpu = module.step_generators(0)
    tokens = module.tokens_from_batch(batch, g)
    assert tokens.shape == (8, 16) and tokens.dtype == torch.int64
    loss = module.masked_loss(tokens, batch["label"], g, g_cpu)
    assert torch.isfinite(loss) and loss.item() > 1  # ≈ ln 16 at init
    ids = module.generate_tokens(torch.tensor([0, 3]), torch.Generator().manual_seed(0), use_ema=False)
    assert ids.shape == (2, 16) and ids.max() < K
    with pytest.raises(ValueError, match="does not decode token ids to pixels.*stage 2"):
        module.generate(torch.tensor([0]))


def test_train_py_refuses_image_sampling_before_training(centroids):
    from contgen.cli.train import check_pixels

    from tests.cli.test_configs import compose_train

    cfg = compose_train("tokenizer=digit_kmeans", "callbacks.online_fid.every_n_steps=5")
    module = type("M", (), {"tokenizer": tokenizer(centroids), "require_pixels": GenerativeModule.require_pixels})()
    with pytest.raises(ValueError, match="evaluate_after_fit=false callbacks.sample_grid=null "
                                         "callbacks.online_fid.every_n_steps=0"):
        check_pixels(cfg, module)
    check_pixels(compose_train("evaluate_after_fit=false", "~callbacks.sample_grid"), module)


@pytest.mark.slow
def test_train_py_stage1_end_to_end(centroids, tmp_path):
    """`python train.py module=causal_ar model=gpt_tiny sampler=causal loss=categorical tokenizer=digit_kmeans
    tokenizer.centroids_path=... debug=limit` on the built-in shapes: 4 steps, a checkpoint."""
    from contgen.cli.checkpoint_io import load_checkpoint

    run = tmp_path / "run"
    run_script("train.py", "module=causal_ar", "model=gpt_tiny", "sampler=causal", "loss=categorical",
               "tokenizer=digit_kmeans", f"tokenizer.centroids_path={centroids}", "tokenizer.encoder=builtin",
               f"tokenizer.stage={STAGE}", "debug=limit", "data.train.num_samples=64", "data.batch_size=16",
               "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "evaluate_after_fit=false",
               "callbacks.sample_grid=null", f"hydra.run.dir={run}")
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 4 and not any(k.startswith("tokenizer.") for k in state["state_dict"])
    assert state["contgen"]["config"]["tokenizer"]["centroids_path"] == str(centroids)
