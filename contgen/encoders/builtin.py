"""The built-in classifier's conv feature maps as an offline feature encoder (no download, trained in-framework).

``contgen.metrics.builtin.BuiltinClassifier`` is a 3-stage stride-2 CNN trained on the built-in data set itself
(``load_or_train_classifier``: a few seconds on a CPU, cached); its feature maps are discriminative, which is
what DiGIT wants from DINOv2 (reference/digit.md §1, §6 "What works offline"). ``stage`` picks the map, as
``layer`` picks DINOv2's block: stage s gives a ceil(H / 2^s) grid of ``width * 2^(s-1)`` channels (after
BatchNorm and ReLU). The default, stage 3, is the map the classifier pools: the most discriminative (held-out
nearest-class-mean accuracy of its mean-pooled features on 16-px shapes 0.97, stage 2 0.78, raw pixels 0.63;
tests/encoders) and 4x4 tokens at 32 px, 8 px per token (DiGIT: 16 tokens of 16 px at 256 px).
"""

from __future__ import annotations

import os

import torch

from contgen.encoders.base import FeatureEncoder
from contgen.metrics.builtin import VERSION, BuiltinClassifier

STAGES = 3  # BuiltinClassifier.convs


class BuiltinEncoder(FeatureEncoder):
    """``classifier``: a trained ``BuiltinClassifier``, or the path of a file ``load_or_train_classifier`` cached."""

    def __init__(self, classifier: BuiltinClassifier | str, stage: int = 3):
        super().__init__()
        if isinstance(classifier, str):
            classifier = self._load(classifier)
        if not 1 <= stage <= STAGES:
            raise ValueError(f"encoder.stage={stage} must lie in 1..{STAGES}")
        self.stage = stage
        self.convs = classifier.convs[:stage]
        self.image_size = classifier.image_size
        self.feature_dim = classifier.width * 2 ** (stage - 1)
        side = self.image_size
        for _ in range(stage):
            side = (side + 1) // 2  # 3x3 conv, stride 2, padding 1
        self.grid = (side, side)
        self.freeze()

    @staticmethod
    def _load(path: str) -> BuiltinClassifier:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"encoder.classifier: file not found: {path!r} (a builtin_classifier_*.pt that "
                                    "contgen.metrics.load_or_train_classifier writes to paths.cache_dir)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("version") != VERSION or "state_dict" not in ckpt:
            raise ValueError(f"encoder.classifier={path!r}: not a built-in classifier file of version {VERSION}")
        classifier = BuiltinClassifier(**ckpt["config"])
        classifier.load_state_dict(ckpt["state_dict"])
        return classifier

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        self.check_images(img)
        return self.convs(img).flatten(2).transpose(1, 2)
