"""Train a model: `python train.py [group=option ...] [key=value ...]`; `python train.py --help` lists the groups."""

import hydra
from omegaconf import DictConfig

import contgen.cli.config  # noqa: F401  (registers the config resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from contgen.cli.train import train

    return train(cfg).get("train/loss")


if __name__ == "__main__":
    main()
