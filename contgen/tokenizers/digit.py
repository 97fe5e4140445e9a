"""DiGIT's discriminative tokenizer (reference/digit.md §1): a frozen feature encoder, then the id of the nearest
K-means centroid for every patch feature. Tokens are (B, h*w) int64 ids in raster order; ``vocab_size`` = K.

The "moments" of an image (what the token cache stores, base.py) are its ids as (B, L, 1) int64: the tokenizer is
deterministic, so ``sample`` only drops the last axis. DiGIT runs the encoder online on every step
(``stage1/model.py:151-160``); ``cache_tokens.py tokenizer=digit_kmeans dtype=int32`` stores the ids of each image
and its flip instead (DiGIT's augmentation flips too).

There is no ``decode``: ids of a discriminative encoder do not determine pixels. DiGIT renders them with a second
model (stage 2, the pixel decoder, digit.md §3), so ``decodes`` is False and sampling pixels from a stage-1 model is
refused before any compute (train.py: sample grids, online FID, evaluation after fit; ``generate``).
"""

from __future__ import annotations

import hashlib
import os

import torch

from contgen.encoders import BuiltinEncoder, DINOv2Encoder, FeatureEncoder
from contgen.tokenizers.base import Tokenizer
from contgen.tokenizers.kmeans import KMeans, assign

ENCODERS = ("dinov2", "builtin")
FIT_HINT = "fit it with `python fit_kmeans.py data=... tokenizer.encoder=... k=K out=FILE`"
NO_PIXELS = ("tokenizer=digit_kmeans gives K-means ids of encoder features, which do not determine pixels: in DiGIT "
             "pixels come from stage 2, the pixel decoder (reference/digit.md §3)")
# what must agree between the encoder a centroids file was fitted on (its meta "encoder") and the configured one
ENCODER_KEYS = {"dinov2": ("arch", "layer", "input_size"), "builtin": ("stage",)}


def encoder_spec(encoder: str, image_size: int, ckpt_path: str | None = None, arch: str = "vitb14_reg4",
                 layer: int = 3, input_size: int = 224, classifier: str | None = None, stage: int = 3) -> dict:
    """The settings that define the features (stored in a centroids file's meta by fit_kmeans.py)."""
    if encoder not in ENCODERS:
        raise ValueError(f"tokenizer.encoder={encoder!r}: choose one of {ENCODERS}")
    if encoder == "dinov2":
        return {"name": encoder, "image_size": image_size, "ckpt_path": ckpt_path, "arch": arch, "layer": layer,
                "input_size": input_size}
    return {"name": encoder, "image_size": image_size, "classifier": classifier, "stage": stage}


def build_encoder(spec: dict, random_init: bool = False) -> FeatureEncoder:
    if spec["name"] == "dinov2":
        return DINOv2Encoder(spec["ckpt_path"], spec["arch"], spec["layer"], spec["image_size"], spec["input_size"],
                             random_init=random_init, config_key="tokenizer.ckpt_path")
    if spec["classifier"] is None:
        raise ValueError("tokenizer.classifier is required with tokenizer.encoder=builtin (a builtin_classifier_*.pt "
                         "file; fit_kmeans.py records the one it used in the centroids file, which is read when this "
                         "is null)")
    enc = BuiltinEncoder(spec["classifier"], spec["stage"])
    if enc.image_size != spec["image_size"]:
        raise ValueError(f"tokenizer.classifier={spec['classifier']!r} takes {enc.image_size}px images, but "
                         f"tokenizer.image_size={spec['image_size']}")
    return enc


class DigitKMeansTokenizer(Tokenizer):
    """``centroids_path``: a (K, D) file of ``KMeans.save`` (fit_kmeans.py) or a bare ``.npy`` (DiGIT's
    ``km_8k.npy``). The other arguments are :func:`encoder_spec`'s; ``random_init`` (DINOv2 only) is for tests."""

    decodes = False
    id_moments = True  # a token cache stores the ids (cache_tokens.py dtype=int32)
    channels = 3
    token_dim = moment_dim = 1  # one id per token

    def __init__(self, centroids_path: str | None, encoder: str = "dinov2", image_size: int = 256,
                 ckpt_path: str | None = None, arch: str = "vitb14_reg4", layer: int = 3, input_size: int = 224,
                 classifier: str | None = None, stage: int = 3, random_init: bool = False):
        super().__init__()
        if not centroids_path:
            raise ValueError(f"tokenizer.centroids_path is required (K-means centroids over the encoder's features; "
                             f"{FIT_HINT})")
        if not os.path.isfile(centroids_path):
            raise FileNotFoundError(f"tokenizer.centroids_path: file not found: {centroids_path!r} ({FIT_HINT})")
        km = KMeans.load(centroids_path)
        fitted = km.file_meta.get("encoder", {})
        if encoder == "builtin" and classifier is None:
            classifier = fitted.get("classifier")
        spec = encoder_spec(encoder, image_size, ckpt_path, arch, layer, input_size, classifier, stage)
        differ = [f"{k}: file {fitted[k]!r} vs config {spec[k]!r}" for k in ("name", *ENCODER_KEYS[encoder])
                  if k in fitted and fitted[k] != spec[k]]
        if differ:
            raise ValueError(f"tokenizer.centroids_path={centroids_path!r} was fitted on other features than "
                             f"tokenizer.* configures ({'; '.join(differ)}); {FIT_HINT}")
        self.encoder = build_encoder(spec, random_init)
        k, dim = km.centroids.shape
        if dim != self.encoder.feature_dim:
            raise ValueError(f"tokenizer.centroids_path={centroids_path!r} holds K={k} centroids of D={dim}, but "
                             f"tokenizer.encoder={encoder} gives D={self.encoder.feature_dim} features; {FIT_HINT}")
        self.register_buffer("centroids", km.centroids)
        self.vocab_size, self.image_size, self.grid = k, image_size, self.encoder.grid
        self.freeze()

    def digest(self) -> str:
        """The centroids' identity (a stage-1 checkpoint records it; DiGIT's stage 2 checks its ids are the same)."""
        return hashlib.sha256(self.centroids.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]

    def moments(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> ids (B, L, 1) int64: fp32 squared-L2 argmin (stage1/model.py:131-136), no
        host sync (``check_finite=False``: the training step's NaN guard sees the loss)."""
        self.check_images(img)
        return assign(self.encoder(img).float(), self.centroids, check_finite=False)[..., None]

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return moments[..., 0].long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{NO_PIXELS}; a stage-1 model samples ids only")
