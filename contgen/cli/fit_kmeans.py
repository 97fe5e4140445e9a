"""``python fit_kmeans.py``: K-means centroids over a frozen encoder's patch features, for tokenizer=digit_kmeans.

DiGIT (reference/digit.md §1) dumps the features of a random ~10% of the training images and clusters them with
faiss (20 iterations, at most 256·K points). Here the features are streamed: every pass of ``KMeans.fit`` runs the
encoder over the chosen images again (a scan and a gather when the features exceed 256·K rows, as at ImageNet
scale; every iteration otherwise), so nothing is dumped to disk. The passes must read the same features, so the data
set's random flip is off (DiGIT's dump flips at random).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from contgen.cli.console import progress, setup
from contgen.cli.load import pick_device
from contgen.tokenizers.digit import build_encoder, encoder_spec
from contgen.tokenizers.kmeans import KMeans


class EncodedFeatures:
    """Re-iterable (n·L, D) fp32 feature batches of ``loader``'s images, in the same order on every pass."""

    def __init__(self, loader: DataLoader, encoder: torch.nn.Module, device: torch.device):
        self.loader, self.encoder, self.device, self.passes = loader, encoder, device, 0

    def __iter__(self):
        self.passes += 1
        batches = self.loader  # a bar for the scan and the next pass (at scale, all there is); KMeans logs the rest
        if self.passes <= 2:
            batches = progress(batches, f"encoder features of {len(self.loader.dataset)} images, pass {self.passes}")
        for batch in batches:
            with torch.no_grad():
                yield self.encoder(batch["image"].to(self.device)).flatten(0, 1).float()


def builtin_classifier_path(data_train: dict, cache_dir: str) -> str:
    """The built-in classifier of a built-in data set (trained once and cached, as for FD_builtin)."""
    from contgen.cli.evaluate import BUILTIN, builtin_classifier

    if data_train.get("_target_") not in BUILTIN:
        raise ValueError(f"tokenizer.encoder=builtin on data.train._target_={data_train.get('_target_')}: set "
                         f"tokenizer.classifier=<builtin_classifier_*.pt>; it is trained here only on the built-in "
                         f"data sets ({', '.join(sorted(BUILTIN.values()))})")
    classifier, description, _ = builtin_classifier(data_train, cache_dir)
    return str(Path(cache_dir).resolve() / f"builtin_classifier_{description['name']}_{classifier.cache_key}.pt")


def fit_kmeans(cfg: DictConfig) -> Path:
    setup(cfg.get("threads", "auto"), cfg.get("device", "auto"))
    if not 0 < cfg.fraction <= 1:
        raise ValueError(f"fraction={cfg.fraction} must lie in (0, 1]")
    tok = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    train = OmegaConf.to_container(cfg.data.train, resolve=True)
    if tok["encoder"] == "builtin" and tok["classifier"] is None:
        tok["classifier"] = builtin_classifier_path(train, cfg.paths.cache_dir)
    spec = encoder_spec(tok["encoder"], tok["image_size"], tok["ckpt_path"], tok["arch"], tok["layer"],
                        tok["input_size"], tok["classifier"], tok["stage"])
    device = pick_device(cfg.device)
    encoder = build_encoder(spec).to(device)
    if "hflip" in train:
        train["hflip"] = False  # every pass must see the same features
    dataset = instantiate(train)
    n = math.ceil(cfg.fraction * len(dataset))
    points = n * encoder.seq_len
    if points < cfg.k:
        raise ValueError(f"k={cfg.k} centroids from {points} feature vectors ({n} images × {encoder.seq_len} tokens, "
                         f"fraction={cfg.fraction}): raise fraction or lower k")
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[:n].sort().values
    loader = DataLoader(Subset(dataset, chosen.tolist()), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    km = KMeans(cfg.k, iters=cfg.iters, init=cfg.init, seed=cfg.kmeans_seed,
                max_points_per_centroid=cfg.max_points_per_centroid, device=device)
    km.fit(EncodedFeatures(loader, encoder, device))
    out = Path(cfg.out)
    km.save(out, extra={"encoder": spec, "grid": list(encoder.grid), "num_images": n, "fraction": cfg.fraction,
                        "data": train.get("_target_")})
    print(f"wrote {cfg.k} centroids of D={encoder.feature_dim} ({points} vectors of {n} images, inertia "
          f"{km.inertia[-1] if km.inertia else float('nan'):.6g}) to {out}; train with: tokenizer=digit_kmeans "
          f"tokenizer.centroids_path={out} " + " ".join(f"tokenizer.{k}={v}" for k, v in spec.items()
                                                        if k not in ("image_size", "classifier")).replace(".name=", ".encoder="))
    return out
