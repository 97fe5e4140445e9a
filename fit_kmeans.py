"""Fit DiGIT's K-means tokens: `python fit_kmeans.py data=shapes tokenizer.encoder=builtin k=64 out=/path/centroids.pt`."""

import hydra
from omegaconf import DictConfig

import contgen.cli.config  # noqa: F401


@hydra.main(version_base="1.3", config_path="conf", config_name="fit_kmeans")
def main(cfg: DictConfig) -> None:
    from contgen.cli.fit_kmeans import fit_kmeans

    fit_kmeans(cfg)


if __name__ == "__main__":
    main()
