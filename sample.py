"""Sample from a checkpoint: `python sample.py ckpt=outputs/.../checkpoints/last.ckpt classes=[0,1] seeds=[0,1]`."""

import hydra
from omegaconf import DictConfig

import contgen.cli.config  # noqa: F401


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from contgen.cli.sample import sample

    sample(cfg)


if __name__ == "__main__":
    main()
