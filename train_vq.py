"""Train the small VQ tokenizer: `python train_vq.py data=shapes out=DIR` (then tokenizer=vq_small, ckpt DIR/vq_small.pt)."""

import hydra
from omegaconf import DictConfig

import contgen.cli.config  # noqa: F401


@hydra.main(version_base="1.3", config_path="conf", config_name="train_vq")
def main(cfg: DictConfig) -> None:
    from contgen.cli.train_vq import train_vq

    train_vq(cfg)


if __name__ == "__main__":
    main()
