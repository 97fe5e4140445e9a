"""Import Shortcut models' Flax checkpoints (kvfrans/shortcut-models) into :class:`contgen.backbones.dit.ShortcutDiT`.

The reference saves ``pickle.dumps({"train_state": {"params", "params_ema", "opt_state", "step"}, "_timestamp"})``
(utils/checkpoint.py:58-66, utils/train_state.py:62-68) where ``params`` is the Flax tree of ``model.DiT``. Flax
names modules by creation order, so the map below follows model.py: in ``DiTBlock_i``, ``Dense_0`` is the adaLN
projection (L168), ``Dense_1``/``Dense_2``/``Dense_3`` are k, q, v (L172-174, k first) and ``Dense_4`` the output
projection; ``MlpBlock_0/Dense_{0,1}`` the MLP; ``TimestepEmbedder_0`` embeds t and ``TimestepEmbedder_1`` the
level (L261-262); LayerNorms have no parameters. Layouts: a Dense kernel is (in, out) = torch's weight transposed;
the patch Conv kernel is (kh, kw, in, out). The DiT's top-level ``Embed_0`` (the ``logvars`` table, model.py:286,
computed but never used by the loss) has no counterpart and is dropped and reported; ``pos_embed`` is a fixed
sin-cos table the reference recomputes, so contgen keeps its own (equal to float rounding).

Unpickling can run code: ``allow_pickle=True`` opts in, for trusted files only. Arrays may be numpy arrays or, as
the reference writes them, jax arrays (reading those needs ``jax`` installed).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile

import numpy as np
import torch

log = logging.getLogger(__name__)

UNUSED_KEYS = ("Embed_0/embedding",)  # the logvars table (model.py:286-287)


def shortcut_file(path: str) -> str | None:
    """The pickle of a Shortcut checkpoint at ``path``, or None: a plain pickle that opens with the reference's
    ``train_state`` key (torch files are zip archives). On a local path the reference's ``Checkpoint._save`` makes
    ``path`` a directory and moves its pickle into it as ``<path>/<name>.tmp`` (checkpoint.py:67-71); both layouts
    are accepted."""
    if os.path.isdir(path):
        path = os.path.join(path, os.path.basename(os.path.normpath(path)) + ".tmp")
    if not os.path.isfile(path) or zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(256)
    return path if head.startswith(b"\x80") and b"train_state" in head else None


def is_shortcut_checkpoint(path: str) -> bool:
    return shortcut_file(path) is not None


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if hasattr(value, "items"):
            out.update(flatten(value, name))
        else:
            out[name] = np.asarray(value, dtype=np.float32)
    return out


def _linear(flat: dict, name: str) -> dict[str, torch.Tensor]:
    return {"weight": torch.from_numpy(flat.pop(f"{name}/kernel").T.copy()),
            "bias": torch.from_numpy(flat.pop(f"{name}/bias").copy())}


def shortcut_state_dict(params) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(contgen state dict without ``pos_embed``, dropped reference keys) of a Flax ``model.DiT`` parameter tree.

    Raises ValueError listing any reference key left unmapped."""
    flat = flatten(params)
    state: dict[str, torch.Tensor] = {}

    def put(prefix: str, tensors: dict) -> None:
        state.update({f"{prefix}.{k}": v for k, v in tensors.items()})

    conv = flat.pop("PatchEmbed_0/Conv_0/kernel")
    state["x_embedder.proj.weight"] = torch.from_numpy(conv.transpose(3, 2, 0, 1).copy())
    state["x_embedder.proj.bias"] = torch.from_numpy(flat.pop("PatchEmbed_0/Conv_0/bias").copy())
    for ref, ours in (("TimestepEmbedder_0", "t_embedder"), ("TimestepEmbedder_1", "dt_embedder")):
        put(f"{ours}.mlp.0", _linear(flat, f"{ref}/Dense_0"))
        put(f"{ours}.mlp.2", _linear(flat, f"{ref}/Dense_1"))
    state["y_embedder.embedding_table.weight"] = torch.from_numpy(flat.pop("LabelEmbedder_0/Embed_0/embedding").copy())
    depth = 1 + max(int(m.group(1)) for k in flat if (m := re.match(r"DiTBlock_(\d+)/", k)))
    for i in range(depth):
        ref, ours = f"DiTBlock_{i}", f"blocks.{i}"
        put(f"{ours}.adaLN_modulation.1", _linear(flat, f"{ref}/Dense_0"))
        k, q, v = (_linear(flat, f"{ref}/Dense_{j}") for j in (1, 2, 3))
        put(f"{ours}.attn.qkv", {n: torch.cat([q[n], k[n], v[n]]) for n in ("weight", "bias")})
        put(f"{ours}.attn.proj", _linear(flat, f"{ref}/Dense_4"))
        put(f"{ours}.mlp.fc1", _linear(flat, f"{ref}/MlpBlock_0/Dense_0"))
        put(f"{ours}.mlp.fc2", _linear(flat, f"{ref}/MlpBlock_0/Dense_1"))
    put("final_layer.adaLN_modulation.1", _linear(flat, "FinalLayer_0/Dense_0"))
    put("final_layer.linear", _linear(flat, "FinalLayer_0/Dense_1"))
    dropped = sorted(k for k in flat if k in UNUSED_KEYS)
    left = sorted(set(flat) - set(dropped))
    if left:
        raise ValueError(f"Shortcut checkpoint: reference parameters with no contgen counterpart: {left}")
    return state, dropped


def read_shortcut_checkpoint(path: str, allow_pickle: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": params, "ema": params_ema}`` as ShortcutDiT state dicts (``pos_embed`` excluded)."""
    if not allow_pickle:
        raise ValueError(f"denoiser checkpoint: {path} is a Shortcut (Flax) checkpoint, a plain pickle. Unpickling can "
                         "run arbitrary code: only for a file you trust, pass allow_pickle=True (allow_pickle=true on "
                         "the command line)")
    try:
        with open(shortcut_file(path), "rb") as f:
            data = pickle.load(f)
    except ModuleNotFoundError as e:
        raise ValueError(f"denoiser checkpoint: {path} pickles {e.name} objects (the reference saves jax arrays and its "
                         f"optax optimizer state): install {e.name} (a CPU build is enough) to read it") from e
    train_state = data["train_state"]
    out = {}
    for ours, ref in (("model", "params"), ("ema", "params_ema")):
        out[ours], dropped = shortcut_state_dict(train_state[ref])
        if dropped:
            log.info("Shortcut checkpoint %s (%s): dropped %s (unused by the reference's loss)", path, ref, dropped)
    return out


__all__ = ["is_shortcut_checkpoint", "read_shortcut_checkpoint", "shortcut_file", "shortcut_state_dict"]
