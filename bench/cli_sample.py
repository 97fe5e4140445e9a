"""The CLI sampling path, timed as a user waits for it: ``python evaluate.py ckpt=... precision=P`` for N images.

1. Builds a MAR-B checkpoint in train.py's format (``experiment=mar_base_in256``, random weights; the module's own
   ``on_save_checkpoint`` writes the ``state_dict`` and ``contgen`` entries that ``load_module`` reads; the KL-16
   tokenizer is stored as ``random_init: true`` — no weights file is needed, control flow does not depend on the
   values).
2. For each precision and ``--compile`` setting runs ``evaluate.py`` in a fresh process (``metrics.num_samples=N``,
   ``metrics.batch_size=B``, ``sampler.num_iter``, ``compile``; ``module.cuda_graphs`` stays the preset's true)
   through ``bench/_timed_evaluate.py``, which runs evaluate.py
   unchanged and only wraps ``contgen.cli.evaluate.generate_balanced`` with two device synchronisations.

Reported per precision: the process wall time (interpreter start to exit; what ``time python evaluate.py`` says),
``startup_s`` (imports, config, checkpoint load, module build), ``generate_s`` (sampling + decode of the N images)
and ``after_s`` (writing metrics / grid / npz), with s/img including and excluding the process start.

    python bench/cli_sample.py --precisions bf16,fp32 --num-samples 256 --out bench/results/cli.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoint(path: Path, experiment: str, workdir: Path) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    import contgen.cli.config  # noqa: F401  (registers the config resolvers)
    from contgen.cli.build import build_module

    overrides = [f"paths.output_dir={workdir}"]
    if experiment:  # a paper recipe; it needs no data to sample
        overrides += [f"experiment={experiment}", "data.root=null"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
        if cfg.tokenizer._target_.endswith("KLTokenizer"):  # random KL-16 weights, no weights file
            cfg = compose("train.yaml", overrides=overrides + ["tokenizer.ckpt_path=null", "+tokenizer.random_init=true"])
    torch.manual_seed(0)
    module = build_module(cfg, 1000)
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    params = sum(p.numel() for p in module.net.parameters())
    return {"experiment": experiment, "ckpt_mb": round(path.stat().st_size / 2**20), "net_params_m": round(params / 1e6, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-iter", type=int, default=64, help="sampler.num_iter (the preset's 256 is ~4x slower)")
    p.add_argument("--experiment", default="mar_base_in256", help="'' = train.yaml's small default (CPU smoke run)")
    p.add_argument("--compile", default="off", help="comma list of evaluate.py's compile= settings (off, on)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=None, help="checkpoint and evaluate outputs (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    args = p.parse_args()

    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="contgen_cli_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "mar_b_random.ckpt"
    t0 = time.perf_counter()
    info = build_checkpoint(ckpt, args.experiment, workdir)
    info["build_s"] = round(time.perf_counter() - t0, 1)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    base = {"case": "cli_evaluate", "gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "num_samples": args.num_samples, "batch_size": args.batch_size, "num_iter": args.num_iter, **info}
    out = open(args.out, "a") if args.out else None
    variants = [(prec, c) for prec in args.precisions.split(",") for c in args.compile.split(",")]
    if any(c not in ("off", "on") for _, c in variants):
        p.error(f"--compile takes off and/or on, got {args.compile!r}")
    for precision, comp in variants:
        name = f"{precision}_compile_{comp}"
        timing = workdir / f"timing_{name}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "_timed_evaluate.py"), f"ckpt={ckpt}", f"precision={precision}",
               f"device={args.device}", f"metrics.num_samples={args.num_samples}",
               f"metrics.batch_size={args.batch_size}", f"sampler.num_iter={args.num_iter}",
               f"compile={str(comp == 'on').lower()}", f"out_dir={workdir / ('eval_' + name)}",
               f"hydra.run.dir={workdir / ('hydra_' + name)}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "CONTGEN_BENCH_TIMING": str(timing)},
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        row = {**base, "precision": precision, "compile": comp == "on", "process_wall_s": round(wall, 2)}
        if proc.returncode != 0 or not timing.is_file():
            row["error"] = (proc.stderr or proc.stdout)[-800:]
        else:
            t = json.loads(timing.read_text())
            n = args.num_samples
            row.update({k: round(v, 2) for k, v in t.items()},
                       s_per_img_incl_start=round(wall / n, 4), s_per_img_excl_start=round(t["generate_s"] / n, 4))
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
    if out:
        out.close()


if __name__ == "__main__":
    main()
