"""``python linear_probe.py ckpt=<stage-1 run>/checkpoints/last.ckpt data=shapes``: linear-probe top-1 of a causal
GPT's hidden states (DiGIT's stage-1 probe, reference/digit.md §2 "Linear probe"; DiGIT reports 71.7 / 80.3 top-1
on ImageNet for DiGIT-B / -L).

What it does:

1. Rebuild the module from the checkpoint (``load_module``; the EMA weights with ``use_ema=true``, as evaluate.py
   samples) and freeze it. The checkpoint must be a ``module=causal_ar`` run with a ``model=gpt_*`` backbone.
2. Tokenize the data set's train and val splits with the checkpoint's own tokenizer (``module.tokens_from_batch``:
   ids of ``digit_kmeans`` / ``vq_small``, or continuous tokens — the GPT takes either).
3. Run the backbone on each token sequence with the **null class** (``drop=True`` for every image): the label is
   never fed in, so the probe reads what the model makes of the tokens alone. DiGIT probes its stage-1 decoder on the
   token sequence the same way (one ``Linear(d, 1000)`` per layer on mean-pooled ``inner_states[n]``).
4. Mean-pool over the sequence the hidden states after the embedding (layer 0; a forward hook on
   ``backbone.embed_drop``) and after blocks 1..depth-1 (layers 1..depth-1; hooks on ``backbone.decoder_blocks``):
   DiGIT's ``inner_states[n]``, n = 0..depth-1; the last block is not probed (``layers=[...]`` picks others, ``depth``
   = the last block's output, before a pre-LN model's final LayerNorm). contgen's GPT has L slots,
   ``[class, t_1 .. t_{L-1}]``, so the pooled sequence holds the null-class slot and every token but the last one;
   DiGIT's has ``[EOS(class), t_1 .. t_L]``.
5. Per layer, one linear classifier (multinomial logistic regression) on the train features, standardized with the
   train mean and std: full-batch L-BFGS (strong-Wolfe line search) from zero weights, with an L2 penalty
   ``probe.l2`` / 2 · |W|². Deterministic (zero init, no sampling). DiGIT trains its probe with SGD (lr 0.4, momentum
   0.9, cosine, ~80 epochs) through the frozen model with RandomResizedCrop; here the features are computed once,
   without augmentation, so each probe is a convex problem that L-BFGS solves to its optimum with no learning rate to
   tune. Numbers are therefore comparable across checkpoints here, not to DiGIT's 71.7 digit for digit.
6. Val top-1 per layer, the best layer (picked on val, as the best-of-layers figure is), ``linear_probe.json`` in the
   output dir and a table. ``baseline=true`` also probes an untrained copy of the same backbone (fresh init from
   ``seed``, same tokens): how much of the accuracy the tokens give without any training.

The features are held in memory: (layers, images, d) fp32. That suits the built-in data sets and subsets
(``train_samples`` / ``val_samples``); full ImageNet at d = 1024 and 16 layers would need ~84 GB.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from contgen.cli.checkpoint_io import load_checkpoint
from contgen.cli.console import progress, setup

GPT = "contgen.backbones.gpt.GPTBackbone"
CAUSAL = "contgen.modules.causal_ar.CausalARModule"


# --- checks before any compute ----------------------------------------------------------------------------------
def check_checkpoint(path: str) -> dict:
    """The stored config of a causal GPT checkpoint, or a clear error (the file is memory-mapped, not read)."""
    if path in (None, "", "???"):
        raise ValueError("ckpt: pass ckpt=<stage-1 run>/checkpoints/last.ckpt (a module=causal_ar run of train.py)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt={path}: no such file (pass ckpt=<stage-1 run>/checkpoints/last.ckpt, a "
                                "module=causal_ar model=gpt_* run of train.py)")
    ckpt = load_checkpoint(path, mmap=True)
    if "contgen" not in ckpt:
        raise ValueError(f"ckpt={path} was not written by contgen's train.py (no 'contgen' entry)")
    cfg = ckpt["contgen"]["config"]
    module = (cfg.get("module") or {}).get("_target_")
    model = (cfg.get("model") or {}).get("_target_")
    try:
        causal = module is not None and issubclass(get_class(module), get_class(CAUSAL))
    except (ImportError, AttributeError, ValueError):
        causal = False
    if not causal:
        raise ValueError(f"ckpt={path}: module._target_={module} is not a causal GPT model; linear_probe.py probes a "
                         f"stage-1 GPT (train.py module=causal_ar model=gpt_* ...)")
    if model != GPT:
        raise ValueError(f"ckpt={path}: model._target_={model}; linear_probe.py probes {GPT} (model=gpt_*)")
    return cfg


def probe_layers(layers, depth: int) -> list[int]:
    """DiGIT's default: 0 (embedding) .. depth-1; the last block (``depth``) only when asked for."""
    if layers is None:
        return list(range(depth))
    layers = sorted({int(i) for i in layers})
    if not layers or layers[0] < 0 or layers[-1] > depth:
        raise ValueError(f"layers={layers}: indices must lie in 0..{depth} (0 = after the embedding, n = after block "
                         f"n; model.depth={depth}), or null for DiGIT's 0..{depth - 1}")
    return layers


def datasets(cfg: DictConfig, stored: dict) -> tuple[object, object, dict]:
    """(train split, val split, the data config used): ``data=`` when given, else the checkpoint's data; each image
    once (no fresh-each-epoch stream, no repeat, no random flip)."""
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") is not None else stored["data"]
    train = dict(data["train"])
    params = inspect.signature(get_class(train["_target_"])).parameters
    if "split" not in params:
        raise ValueError(f"data.train._target_={train['_target_']}: the probe is scored on the data set's val split and "
                         "this data set has no `split` argument")
    for key, value in (("fresh_each_epoch", False), ("repeat", 1), ("hflip", False)):
        if key in params:
            train[key] = value
    val = {**train, "split": "val"}
    for split, n in ((train, cfg.train_samples), (val, cfg.val_samples)):
        if n is not None:
            if int(n) < 1:
                raise ValueError(f"train_samples / val_samples must be >= 1 or null, got {n}")
            if "num_samples" in params:
                split["num_samples"] = int(n)
    return subset(instantiate(train), cfg.train_samples, cfg.seed), subset(instantiate(val), cfg.val_samples,
                                                                            cfg.seed + 1), data


def subset(dataset, n, seed: int):
    """At most ``n`` images, drawn at random (sorted) when the data set cannot be sized itself."""
    if n is None or len(dataset) <= int(n):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: int(n)].sort().values
    out = Subset(dataset, idx.tolist())
    out.num_classes = getattr(dataset, "num_classes", None)
    return out


# --- features ---------------------------------------------------------------------------------------------------
class PooledStates:
    """Forward hooks on a GPTBackbone that keep the sequence mean of the states after the embedding (layer 0) and
    after block n (layer n), for the layers asked for. A context manager: the hooks go when it exits."""

    def __init__(self, backbone, layers: list[int]):
        self.layers, self.states, self.handles = layers, {}, []
        modules = [backbone.embed_drop, *backbone.decoder_blocks]
        for layer in layers:
            self.handles.append(modules[layer].register_forward_hook(self._keep(layer)))

    def _keep(self, layer: int):
        def hook(module, args, output):
            self.states[layer] = output.float().mean(1)
        return hook

    def pop(self) -> torch.Tensor:
        """(layers, B, d) of the last forward."""
        out = torch.stack([self.states[layer] for layer in self.layers])
        self.states = {}
        return out

    def __enter__(self) -> "PooledStates":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def tokenize(module, dataset, batch_size: int, num_workers: int, seed: int, what: str) -> tuple[list, torch.Tensor]:
    """The checkpoint tokenizer's tokens of every image (one seeded generator: a KL posterior is sampled) and labels."""
    device = module.device
    g = torch.Generator(device).manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    tokens, labels = [], []
    for batch in progress(loader, f"tokenizing {len(dataset)} {what} images"):
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        tokens.append(module.tokens_from_batch(batch, g))
        labels.append(batch["label"].cpu())
    return tokens, torch.cat(labels)


@torch.no_grad()
def pooled_features(backbone, tokens: list[torch.Tensor], layers: list[int], precision: str, what: str) -> torch.Tensor:
    """(layers, N, d) fp32 on the CPU: mean-pooled states of ``backbone`` run with the null class on each batch."""
    device = backbone.pos_emb.device
    feats = []
    with PooledStates(backbone, layers) as hooks:
        for t in progress(tokens, f"features of {what}"):
            b = t.shape[0]
            labels = torch.zeros(b, dtype=torch.long, device=device)  # ignored: drop=True feeds the null class
            drop = torch.ones(b, dtype=torch.bool, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                backbone(t, labels, drop)
            feats.append(hooks.pop().cpu())
    return torch.cat(feats, dim=1)


def untrained_copy(backbone, seed: int):
    """The same architecture, freshly initialised from ``seed`` (CPU RNG, the global RNG state untouched)."""
    device = backbone.pos_emb.device
    fresh = copy.deepcopy(backbone).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if m is not fresh and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        fresh.init_weights()
    return fresh.to(device).eval()


# --- the linear classifiers -------------------------------------------------------------------------------------
def fit_linear(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
               num_classes: int, l2: float = 1e-4, max_iter: int = 200) -> dict:
    """Multinomial logistic regression on standardized features: mean CE + l2/2·|W|², full-batch L-BFGS from zero.
    Returns train / val top-1 and the final training objective."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xt, xv = (x_train - mean) / std, (x_val - mean) / std
    w = torch.zeros(xt.shape[1], num_classes, dtype=xt.dtype, device=xt.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=xt.dtype, device=xt.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, y_train) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
        loss = float(objective().detach())
    with torch.no_grad():
        train_acc = ((xt @ w + b).argmax(1) == y_train).float().mean().item()
        val_acc = ((xv @ w + b).argmax(1) == y_val).float().mean().item()
    return {"train_top1": train_acc, "val_top1": val_acc, "objective": loss}


def probe(feats_train: torch.Tensor, y_train: torch.Tensor, feats_val: torch.Tensor, y_val: torch.Tensor,
          layers: list[int], num_classes: int, probe_cfg: dict, device: torch.device, what: str) -> list[dict]:
    rows = []
    for i, layer in enumerate(progress(layers, f"linear probes ({what})")):
        res = fit_linear(feats_train[i].to(device), y_train.to(device), feats_val[i].to(device), y_val.to(device),
                         num_classes, float(probe_cfg["l2"]), int(probe_cfg["max_iter"]))
        rows.append({"layer": layer, "name": "embedding" if layer == 0 else f"block {layer}", **res})
    return rows


def best(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (r["val_top1"], -r["layer"]))


def table(result: dict) -> str:
    base = {r["layer"]: r for r in result.get("baseline_untrained", {}).get("layers", [])}
    lines = [f"linear probe, val top-1 ({result['val_images']} val / {result['train_images']} train images, "
             f"{result['num_classes']} classes, chance {result['chance']:.4f}; null class fed)",
             f"{'layer':>5}  {'state':<10} {'val top-1':>9} {'train top-1':>11}" + ("  untrained val" if base else "")]
    for r in result["layers"]:
        extra = f"  {base[r['layer']]['val_top1']:>13.4f}" if r["layer"] in base else ""
        lines.append(f"{r['layer']:>5}  {r['name']:<10} {r['val_top1']:>9.4f} {r['train_top1']:>11.4f}{extra}")
    b = result["best"]
    lines.append(f"best: layer {b['layer']} ({b['name']}) val top-1 {b['val_top1']:.4f}"
                 + (f"; untrained best {result['baseline_untrained']['best']['val_top1']:.4f}" if base else ""))
    return "\n".join(lines)


def linear_probe(cfg: DictConfig) -> dict:
    setup(cfg.get("threads", "auto"), cfg.get("device", "auto"))
    stored = check_checkpoint(cfg.ckpt)
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision={cfg.precision}: auto (bf16 on a GPU, fp32 on a CPU) | bf16 | fp32")
    for key in ("batch_size", "probe.max_iter"):
        if int(OmegaConf.select(cfg, key)) < 1:
            raise ValueError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    if float(cfg.probe.l2) < 0:
        raise ValueError(f"probe.l2 must be >= 0, got {cfg.probe.l2}")
    layers = probe_layers(OmegaConf.to_container(cfg.layers) if cfg.layers is not None else None,
                          int(stored["model"]["depth"]))
    train_set, val_set, data = datasets(cfg, stored)
    num_classes = getattr(train_set, "num_classes", None) or getattr(getattr(train_set, "dataset", None),
                                                                    "num_classes", None)
    if not num_classes:
        raise ValueError(f"data.train._target_={data['train']['_target_']}: the data set does not say its "
                         "num_classes")

    image_size = data.get("image_size", data["train"].get("image_size"))

    def check_size(size) -> None:
        if size is not None and image_size is not None and int(image_size) != int(size):
            raise ValueError(f"data.image_size={image_size}, but the checkpoint's tokenizer takes {size} px images: "
                             f"pass data.image_size={size}")

    check_size((stored.get("tokenizer") or {}).get("image_size"))  # before the module is built
    from contgen.cli.load import load_module

    module, _ = load_module(cfg.ckpt, cfg.device, {"tokenizer.ckpt_path": cfg.tokenizer_ckpt_path})
    module.requires_grad_(False).eval()
    check_size(getattr(module.tokenizer, "image_size", None))
    device = module.device
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    backbone = module.sampling_net(cfg.use_ema).backbone

    tok_train, y_train = tokenize(module, train_set, cfg.batch_size, cfg.num_workers, cfg.seed, "train")
    tok_val, y_val = tokenize(module, val_set, cfg.batch_size, cfg.num_workers, cfg.seed + 1, "val")
    result = {"ckpt": str(cfg.ckpt), "use_ema": bool(cfg.use_ema), "data": data["train"]["_target_"],
              "train_images": len(y_train), "val_images": len(y_val), "num_classes": int(num_classes),
              "chance": 1.0 / int(num_classes), "null_class": True, "pooling": "mean over the sequence",
              "precision": precision, "depth": int(stored["model"]["depth"]),
              "probe": {"solver": "L-BFGS (strong Wolfe), full batch, zero init, standardized features",
                        **OmegaConf.to_container(cfg.probe)}}
    nets = [("trained", backbone)] + ([("untrained", untrained_copy(backbone, cfg.seed))] if cfg.baseline else [])
    for name, net in nets:
        f_train = pooled_features(net, tok_train, layers, precision, f"{len(y_train)} train images ({name})")
        f_val = pooled_features(net, tok_val, layers, precision, f"{len(y_val)} val images ({name})")
        rows = probe(f_train, y_train, f_val, y_val, layers, int(num_classes), cfg.probe, device, name)
        if name == "trained":
            result.update(layers=rows, best=best(rows))
        else:
            result["baseline_untrained"] = {"seed": int(cfg.seed), "layers": rows, "best": best(rows)}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_probe.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {out / 'linear_probe.json'}")
    return result


def chance_quantile(n: int, num_classes: int, q: float = 0.999) -> float:
    """The ``q`` quantile of the top-1 accuracy, over ``n`` images of balanced classes, of predictions independent
    of the labels (whatever their distribution, each is right with probability 1/num_classes): Binomial(n, 1/C) / n.
    A probe of features that carry no label information is such a predictor on the val split."""
    p, cdf = 1.0 / num_classes, 0.0
    for k in range(n + 1):
        cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf >= q:
            return k / n
    return 1.0
