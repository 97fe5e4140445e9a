"""InceptionV3 features for FID/IS from a LOCAL weights file (never downloads).

Wraps torch-fidelity's `FeatureExtractorInceptionV3` ("inception-v3-compat", the port of the TF 2015-12-05 graph with
TF1-compatible bilinear resize that MAR/EAR/ADM numbers are computed with; framework.md §4e). torch-fidelity only
downloads when `feature_extractor_weights_path` is None, so a path is always passed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from contgen.utils.images import to_uint8  # noqa: F401  (re-exported: the one [-1,1] → uint8 convention)

INCEPTION_WEIGHTS_KEY = "metrics.inception_weights"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


class InceptionFeatures(nn.Module):
    """uint8 images (N,3,H,W) -> {"pool": (N,2048) float32, "logits": (N,1008) float32}.

    `pool` is the 2048-d pool3 feature used by FID; `logits` are torch-fidelity's 'logits_unbiased' (fc without
    bias, 1008 classes of the TF graph), which torch-fidelity uses for the Inception Score.
    """

    def __init__(self, weights_path):
        super().__init__()
        if weights_path is None or not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"{INCEPTION_WEIGHTS_KEY}: Inception weights not found at '{weights_path}'. contgen never downloads "
                f"them: get {INCEPTION_WEIGHTS_FILE} from the torch-fidelity GitHub release v0.2.0 "
                f"({INCEPTION_WEIGHTS_URL}), place it at that path (or anywhere) and set "
                f"{INCEPTION_WEIGHTS_KEY}=/path/to/{INCEPTION_WEIGHTS_FILE}"
            )
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch-fidelity loads the path with weights_only=False (arbitrary pickle); refuse anything that is not a
        # plain tensor state dict before it gets there.
        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{INCEPTION_WEIGHTS_KEY}: '{weights_path}' is not a plain state dict ({e}); expected "
                f"{INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}"
            ) from e
        self.extractor = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_path)
        )

    def train(self, mode: bool = True):
        """Always eval: a parent's `.train()` must not switch the extractor's BatchNorm to batch statistics."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"InceptionFeatures: expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}; "
                "convert [-1, 1] floats with contgen.metrics.to_uint8"
            )
        pool, logits = self.extractor(images)
        return {"pool": pool, "logits": logits}
