"""Score a checkpoint: `python evaluate.py ckpt=outputs/.../checkpoints/last.ckpt [metrics.num_samples=...]`."""

import hydra
from omegaconf import DictConfig

import contgen.cli.config  # noqa: F401


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from contgen.cli.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
