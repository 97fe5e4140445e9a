"""Cache tokens once: `python cache_tokens.py data=imagefolder data.root=... tokenizer=kl16 tokenizer.ckpt_path=... out=...`."""

import hydra
from omegaconf import DictConfig

import contgen.cli.config  # noqa: F401


@hydra.main(version_base="1.3", config_path="conf", config_name="cache_tokens")
def main(cfg: DictConfig) -> None:
    from contgen.cli.cache_tokens import cache_tokens

    cache_tokens(cfg)


if __name__ == "__main__":
    main()
