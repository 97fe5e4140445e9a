"""Linear probe of a stage-1 GPT: `python linear_probe.py ckpt=<run>/checkpoints/last.ckpt data=shapes`."""

import hydra
from omegaconf import DictConfig

import contgen.cli.config  # noqa: F401


@hydra.main(version_base="1.3", config_path="conf", config_name="linear_probe")
def main(cfg: DictConfig) -> None:
    from contgen.cli.linear_probe import linear_probe

    linear_probe(cfg)


if __name__ == "__main__":
    main()
