"""Pack a data set into WebDataset shards: `python pack_shards.py data=shapes data.train.num_samples=51200 out=...`."""

import hydra
from omegaconf import DictConfig

import contgen.cli.config  # noqa: F401


@hydra.main(version_base="1.3", config_path="conf", config_name="pack_shards")
def main(cfg: DictConfig) -> None:
    from contgen.cli.pack_shards import pack_shards

    pack_shards(cfg)


if __name__ == "__main__":
    main()
