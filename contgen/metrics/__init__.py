"""Evaluation metrics: FID/IS maths and reference statistics (`fid`), Inception features from a local weights file
(`inception`), and the offline FD_builtin/class accuracy for the built-in data sets (`builtin`)."""

from contgen.metrics.builtin import (
    BuiltinClassifier,
    builtin_metrics,
    load_or_compute_ref_stats,
    load_or_train_classifier,
)
from contgen.metrics.fid import FeatureStats, frechet_distance, inception_score, load_stats, save_stats
from contgen.metrics.inception import InceptionFeatures, to_uint8

__all__ = [
    "BuiltinClassifier",
    "FeatureStats",
    "InceptionFeatures",
    "builtin_metrics",
    "frechet_distance",
    "inception_score",
    "load_or_compute_ref_stats",
    "load_or_train_classifier",
    "load_stats",
    "save_stats",
    "to_uint8",
]
