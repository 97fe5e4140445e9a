"""DiGIT's pipeline on the built-in data: `python digit.py out=DIR` (encoder -> K-means -> VQ -> stage 1 -> stage 2)."""

import hydra
from omegaconf import DictConfig

import contgen.cli.config  # noqa: F401


@hydra.main(version_base="1.3", config_path="conf", config_name="digit")
def main(cfg: DictConfig) -> None:
    from contgen.cli.digit import run_pipeline

    run_pipeline(cfg)


if __name__ == "__main__":
    main()
