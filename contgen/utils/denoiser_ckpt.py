"""Import released DiT / SiT / TiT checkpoints into contgen's denoisers (:mod:`contgen.backbones.dit`, ``tit``).

contgen's denoisers keep the reference parameter names, so the map is the identity; what this module handles is
the file around the weights:

* **layouts** — a bare state dict (facebookresearch ``DiT-XL-2-256x256.pt``; REPA's released ``last.pt``, which
  is the EMA state dict) or a training checkpoint ``{"model": ..., "ema": ..., "opt": ..., ...}`` (UCGM
  main.py:227-233 and the few-step recipe's ``{"model": ema, "ema": ema}``; DiT/REPA train.py). ``use_ema`` picks
  ``ema`` (what every reference samples from, UCGM eval.py:74-77) over ``model``. A DDP ``module.`` or
  ``torch.compile`` ``_orig_mod.`` prefix on every key is removed.
* **REPA's projector heads** — REPA's SiT (models/sit.py) adds ``projectors.{i}.{0,2,4}.{weight,bias}``: MLPs from
  the block-``encoder_depth`` features to the DINOv2 width, used only by REPA's alignment loss; they never touch
  the denoiser's output. They are **dropped** (``drop_prefixes``, default ``("projectors.",)``) and the dropped
  keys are returned and logged, so REPA / REPA-E SiT files load as UCGM's tuning recipes use them (UCGM's own SiT
  has no projectors, networks/sit.py). Pass ``drop_prefixes=()`` to refuse them instead.
* **a strict check** — every other key must match by name and shape, or a ValueError names the file, each
  missing / unexpected key and each shape mismatch, and what the file's shapes say its configuration is.

* **Shortcut models' Flax pickles** — converted by :mod:`contgen.utils.flax_ckpt` (``params`` = ``model``,
  ``params_ema`` = ``ema``); their fixed ``pos_embed`` is not stored, so the network's own is kept.

Files are read with ``torch.load(weights_only=True)``. Training checkpoints of DiT and REPA also pickle an
``argparse.Namespace`` under ``args``, which that refuses: ``allow_pickle=True`` opts in, for trusted files only.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from contgen.utils.flax_ckpt import is_shortcut_checkpoint, read_shortcut_checkpoint
from contgen.utils.reference_ckpt import read_released

log = logging.getLogger(__name__)

REPA_PROJECTOR_PREFIXES = ("projectors.",)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# hidden size -> heads of the reference presets (DiT/SiT/TiT S, B, L, XL; TiT 1p0B, 1p6B): heads are not in a file.
REFERENCE_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16, 1536: 24, 1792: 28}


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_denoiser_state(path: str, use_ema: bool = True, allow_pickle: bool = False) -> tuple[dict, str]:
    """The state dict held by ``path`` and where it came from (``"ema"``, ``"model"`` or ``"state_dict"`` for a
    bare file), with a whole-file ``module.`` / ``_orig_mod.`` prefix removed."""
    if is_shortcut_checkpoint(path):
        obj = read_shortcut_checkpoint(path, allow_pickle)
    else:
        obj = read_released(path, allow_pickle, what="denoiser checkpoint")
    if _is_state_dict(obj):
        state, source = obj, "state_dict"
    elif isinstance(obj, dict):
        key = "ema" if use_ema else "model"
        if key not in obj or not _is_state_dict(obj[key]):
            hint = " (set use_ema=False to load 'model')" if use_ema and "model" in obj else ""
            raise ValueError(f"denoiser checkpoint: {path} is neither a state dict nor holds one under '{key}'"
                             f"{hint}; top-level keys: {sorted(map(str, obj))}")
        state, source = obj[key], key
    else:
        raise ValueError(f"denoiser checkpoint: {path} holds a {type(obj).__name__}, not a state dict")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state), source


def infer_denoiser_kwargs(state: dict) -> dict:
    """Constructor fields recoverable from a DiT/SiT/TiT state dict's shapes (``family`` is ``"tit"`` or ``"dit"``,
    which covers SiT). ``num_heads`` is not stored in a file: it is the reference preset's for that width, if any.
    ``time_scale`` is not stored either: DiT releases expect 1000, SiT/TiT 1."""
    out: dict = {}
    if "x_embedder.proj.weight" in state:
        w = state["x_embedder.proj.weight"]
        out.update(hidden_size=w.shape[0], in_channels=w.shape[1], patch_size=w.shape[-1])
    if "pos_embed" in state and "patch_size" in out:
        grid = round(state["pos_embed"].shape[1] ** 0.5)
        out["input_size"] = grid * out["patch_size"]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        out["depth"] = max(blocks) + 1
    table = state.get("y_embedder.embedding_table.weight")
    out["num_classes"] = table.shape[0] - 1 if table is not None else 0
    tit = any(k.startswith("feat_rope.") or ".mlp.w12." in k or ".attn.q_norm." in k for k in state) or (
        "blocks.0.adaLN_modulation.1.weight" in state and "hidden_size" in out
        and state["blocks.0.adaLN_modulation.1.weight"].shape[0] == 4 * out["hidden_size"])
    out["family"] = "tit" if tit else "dit"
    if "blocks.0.mlp.fc1.weight" in state and "hidden_size" in out:
        out["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / out["hidden_size"]
    if "final_layer.linear.weight" in state and {"patch_size", "in_channels"} <= out.keys():
        out_ch = state["final_layer.linear.weight"].shape[0] // out["patch_size"] ** 2
        out["learn_sigma"] = out_ch == 2 * out["in_channels"]
    if out.get("hidden_size") in REFERENCE_HEADS:
        out["num_heads"] = REFERENCE_HEADS[out["hidden_size"]]
    if tit:
        out["use_rope"] = "feat_rope.freqs_cos" in state
        out["use_swiglu"] = "blocks.0.mlp.w12.weight" in state
        out["wo_shift"] = "hidden_size" in out and "blocks.0.adaLN_modulation.1.weight" in state and \
            state["blocks.0.adaLN_modulation.1.weight"].shape[0] == 4 * out["hidden_size"]
    return out


def _describe(net: nn.Module) -> str:
    fields = ("input_size", "in_channels", "num_classes", "patch_size", "hidden_size", "depth", "learn_sigma")
    return f"{type(net).__name__}(" + ", ".join(f"{f}={getattr(net, f)}" for f in fields if hasattr(net, f)) + ")"


def check_denoiser_state(path: str, net: nn.Module, state: dict) -> None:
    """Strict key and shape check, listing every problem at once (names, shapes, and the file's own config)."""
    own = net.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return
    lines = [f"denoiser checkpoint: {path} does not match {_describe(net)}:"]
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = items if len(items) <= 12 else items[:12] + [f"... ({len(items) - 12} more)"]
            lines.append(f"  {what} ({len(items)}): " + ", ".join(shown))
    inferred = infer_denoiser_kwargs(state)
    lines.append("  the file's shapes say: " + ", ".join(f"{k}={v}" for k, v in inferred.items()))
    if "y_embedder.embedding_table.weight" in state and getattr(net, "num_classes", None) is not None \
            and inferred["num_classes"] != net.num_classes:
        lines.append(f"  (the label table has num_classes + 1 rows, the last being the null class: set "
                     f"num_classes={inferred['num_classes']})")
    raise ValueError("\n".join(lines))


def load_denoiser(path: str, net: nn.Module, use_ema: bool = True, allow_pickle: bool = False,
                  drop_prefixes: tuple[str, ...] = REPA_PROJECTOR_PREFIXES, assign: bool = False) -> dict:
    """Load a reference DiT / SiT / TiT checkpoint into ``net`` in place, strictly.

    Returns a report ``{"source": "ema" | "model" | "state_dict", "dropped": [keys]}``. ``assign`` is passed to
    ``load_state_dict`` (use it for a network built on the meta device).
    """
    state, source = read_denoiser_state(path, use_ema=use_ema, allow_pickle=allow_pickle)
    dropped = sorted(k for k in state if k.startswith(tuple(drop_prefixes)))
    if dropped:
        log.info("denoiser checkpoint %s: dropped %d keys under %s (REPA's alignment projectors; not part of the "
                 "denoiser)", path, len(dropped), ", ".join(drop_prefixes))
        state = {k: v for k, v in state.items() if not k.startswith(tuple(drop_prefixes))}
    if is_shortcut_checkpoint(path):  # the reference recomputes its fixed sin-cos table instead of storing it
        state["pos_embed"] = net.state_dict()["pos_embed"]
    check_denoiser_state(path, net, state)
    net.load_state_dict(state, assign=assign)  # assign keeps the module's requires_grad: pos_embed stays frozen
    return {"source": source, "dropped": dropped}


__all__ = ["load_denoiser", "read_denoiser_state", "check_denoiser_state", "infer_denoiser_kwargs",
           "REPA_PROJECTOR_PREFIXES"]
