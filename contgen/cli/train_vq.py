"""``python train_vq.py``: train ``tokenizer=vq_small`` on a data set, save the weights it loads, score it.

Plain PyTorch (no Lightning): Adam on MSE + VQ loss (``VQSmallTokenizer.training_loss``), batches drawn with a
seeded generator; after training, the held-out PSNR of ``decode(encode(x))`` on ``eval_samples`` images of the data
set's ``val`` split and the codebook usage (distinct codes, perplexity) go to ``metrics.json``.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from contgen.cli.console import setup
from contgen.cli.load import pick_device
from contgen.tokenizers.vq_small import VQSmallTokenizer


def build(cfg: DictConfig) -> tuple[VQSmallTokenizer, object, object]:
    """The untrained tokenizer and the train / held-out data sets; config errors before any compute."""
    tok = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    if tok.get("_target_") != "contgen.tokenizers.vq_small.VQSmallTokenizer":
        raise ValueError(f"train_vq.py trains tokenizer=vq_small, got tokenizer._target_={tok.get('_target_')!r}")
    for key in ("steps", "batch_size", "eval_samples"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    tok.pop("_target_")
    tok.update(ckpt_path=None, random_init=True)
    model = VQSmallTokenizer(**tok)
    train_cfg = OmegaConf.to_container(cfg.data.train, resolve=True)
    if "split" not in inspect.signature(get_class(train_cfg["_target_"])).parameters:
        raise ValueError(f"data.train._target_={train_cfg['_target_']}: train_vq.py scores on the data set's val "
                         "split and this data set has no `split` argument")
    train = instantiate(train_cfg)
    held = {k: v for k, v in train_cfg.items() if k not in ("fresh_each_epoch", "repeat", "hflip")}
    held["split"] = "val"
    if "num_samples" in held:
        held["num_samples"] = int(cfg.eval_samples)
    return model, train, instantiate(held)


def batch(dataset, idx: torch.Tensor) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["image"] for i in idx])


@torch.no_grad()
def evaluate(model: VQSmallTokenizer, dataset, num: int, device: torch.device, batch_size: int = 256) -> dict:
    """PSNR (images in [-1, 1], peak-to-peak 2) of decode(encode(x)) and code usage over ``num`` held-out images."""
    num = min(num, len(dataset))
    se, counts = 0.0, torch.zeros(model.vocab_size, dtype=torch.int64)
    for start in range(0, num, batch_size):
        x = batch(dataset, torch.arange(start, min(start + batch_size, num))).to(device)
        ids = model.encode(x)
        se += (model.decode(ids) - x).pow(2).flatten(1).mean(1).sum().item()
        counts += torch.bincount(ids.flatten().cpu(), minlength=model.vocab_size)
    mse = se / num
    p = counts.double() / counts.sum()
    perplexity = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
    return {"psnr": 10 * math.log10(4.0 / mse), "mse": mse, "codes_used": int((counts > 0).sum()),
            "perplexity": perplexity, "vocab_size": model.vocab_size, "eval_images": num}


def train_vq(cfg: DictConfig) -> dict:
    setup(cfg.get("threads", "auto"), cfg.get("device", "auto"))
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)  # the initialisation
    model, train, held = build(cfg)
    device = pick_device(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)
    model.to(device).requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(train)
    for step in range(int(cfg.steps)):
        x = batch(train, torch.randint(n, (cfg.batch_size,), generator=g)).to(device)
        if step == 0:
            model.init_codes_from(x, g)
        loss, parts = model.training_loss(x, cfg.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step == 0:
            used = parts["ids"].unique().numel()
            print(f"step {step + 1}: rec {parts['rec'].item():.4f} vq {parts['vq'].item():.4f} codes in batch {used}")
    model.freeze()
    metrics = evaluate(model, held, int(cfg.eval_samples), device)
    metrics["steps"] = int(cfg.steps)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.checkpoint(), out / "vq_small.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"held-out PSNR {metrics['psnr']:.2f} dB, {metrics['codes_used']}/{model.vocab_size} codes used "
          f"(perplexity {metrics['perplexity']:.1f}); use: tokenizer=vq_small "
          f"tokenizer.ckpt_path={out / 'vq_small.pt'}")
    return metrics
