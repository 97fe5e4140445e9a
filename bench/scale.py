"""Scale-out on one host (issues 10 and 13): training under DDP / FSDP through Lightning with contgen's own config,
strategy, batch plan and data sampler, and evaluation sampling sharded over GPUs. One JSON line per case.

    # training: the paper recipe (experiment=<model>_in256) at data.global_batch_size G on N GPUs
    python bench/scale.py train --model mar_base --strategy ddp --devices 2 --global-batch 128 --steps 60
    python bench/scale.py train --model ucgm_multistep --devices 8 --global-batch 1024   # TiT-XL/2 (SD-VAE latents)
    python bench/scale.py train --model ucgm_multistep --override model=dit_xl ...        # DiT-XL/2
    # sampling: the evaluation set's chunks dealt out to N GPUs, each chunk from its own (seed, chunk) generator
    python bench/scale.py sample --devices 4 --num-images 10000 --batch 256 --num-iter 64 --cfg 2.9
    # a CPU smoke run of the training path (tiny model)
    python bench/scale.py train --accelerator cpu --model mar_base --override model=mar_tiny --global-batch 4 ...

Training: random weights (seeded alike on every rank and in every run), random cached tokenizer moments (KL-16 for
MAR, SD-VAE for UCGM; the shape is the composed tokenizer's) drawn per sample index from a fixed seed, so runs on different device counts with one global batch see the same samples at
every step (contgen's EpochSampler deals them out). Reported: the loss of every step averaged over the ranks (the
global batch's loss), images/s over the timed steps (after ``--warmup``, between two device synchronisations), the
peak memory of every GPU. Sampling: ``module.generate`` with ``MaskedARSampler`` (linear CFG, temperature 1, the
head's 100 steps) and the KL-16 decode (random weights), every image hashed (md5 of its uint8 pixels) per chunk.
Needs hydra-core/omegaconf (the config is composed) and lightning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing contgen


def compose(model: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import contgen.cli.config  # noqa: F401  (registers contgen's config resolvers)

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train.yaml", overrides=[f"experiment={model}_in256", "tokenizer.ckpt_path=null",
                                                      "+tokenizer.random_init=true", "paths.output_dir=/tmp/scale",
                                                      "data.root=/unused", *overrides])


class Moments(torch.utils.data.Dataset):
    """Cached (view, flip) posterior moments as cache_tokens.py stores them, random but fixed per index."""

    def __init__(self, n: int, seq_len: int, dim: int, num_classes: int = 1000):
        self.n, self.shape, self.num_classes, self.image_size = n, (2, seq_len, dim), num_classes, 256

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"moments": torch.randn(self.shape, generator=g), "label": torch.tensor(i % self.num_classes)}


def train(args) -> None:
    import lightning as L
    from hydra.utils import instantiate

    from contgen.cli.build import batch_plan, build_module
    from contgen.modules.datamodule import DataModule

    gpu = args.accelerator == "gpu"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    class Probe(L.Callback):
        def __init__(self):
            self.losses, self.t0 = [], None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].detach().float())
            if trainer.global_step == args.warmup:
                sync()
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            sync()
            seconds = time.perf_counter() - self.t0
            losses = trainer.strategy.reduce(torch.stack(self.losses), reduce_op="mean").tolist()
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0], device=pl_module.device)
            peaks = trainer.strategy.all_gather(peak).flatten().tolist()
            if trainer.is_global_zero:
                row = dict(case="train", model=args.model, overrides=args.override, strategy=args.strategy,
                           net=cfg.model._target_.rsplit(".", 1)[-1],
                           net_params_m=round(sum(p.numel() for p in pl_module.net.parameters()) / 1e6, 1),
                           devices=args.devices,
                           global_batch=args.global_batch, device_batch=cfg.data.batch_size,
                           accumulate=cfg.trainer.accumulate_grad_batches, activation_checkpointing=args.act_ckpt,
                           timed_steps=args.steps, seconds=round(seconds, 3),
                           img_per_s=round(args.steps * args.global_batch / seconds, 1),
                           peak_gib_per_gpu=[round(p, 2) for p in peaks], losses=[round(x, 5) for x in losses],
                           gpu=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__)
                emit(row, args.out)

    overrides = [f"strategy={args.strategy}", f"trainer.devices={args.devices}", "trainer.num_nodes=1",
                 "data.batch_size=null", f"data.global_batch_size={args.global_batch}",
                 f"data.max_device_batch_size={args.max_device_batch or 'null'}"]
    if args.strategy == "fsdp":
        overrides.append(f"trainer.strategy.activation_checkpointing={str(args.act_ckpt).lower()}")
    cfg = compose(args.model, overrides + args.override)
    batch, accumulate = batch_plan(cfg.data, cfg.trainer)
    cfg.data.batch_size, cfg.trainer.accumulate_grad_batches = batch, accumulate
    L.seed_everything(0, verbose=False)
    module = build_module(cfg, 1000)
    steps = args.warmup + args.steps
    tok = module.tokenizer
    data = DataModule(Moments(steps * args.global_batch, tok.seq_len, tok.moment_dim), batch_size=batch,
                      num_workers=args.workers, seed=0)
    t = cfg.trainer
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=1, strategy=instantiate(t.strategy),
                        precision="bf16-mixed", max_steps=steps, accumulate_grad_batches=accumulate,
                        gradient_clip_val=t.gradient_clip_val, use_distributed_sampler=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Probe()])
    torch.backends.cuda.matmul.allow_tf32 = True
    trainer.fit(module, datamodule=data)


def _sample_worker(rank: int, args, barrier, queue) -> None:
    from contgen.cli.build import build_module
    from contgen.cli.evaluate import chunk_generator
    from contgen.samplers.masked import MaskedARSampler

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    cfg = compose(args.model, [f"module.compile={str(args.compile).lower()}", *args.override])
    torch.manual_seed(0)  # the same random weights in every process
    module = build_module(cfg, 1000).to(device).eval()
    sampler = MaskedARSampler(num_iter=args.num_iter, cfg=args.cfg, cfg_schedule="linear", temperature=1.0)
    labels = (torch.arange(args.num_images) % 1000).split(args.batch)
    mine = range(rank, len(labels), args.devices)[: args.max_chunks]
    module.generate(labels[0][:8].to(device), chunk_generator(device, 0, 0), sampler=MaskedARSampler(num_iter=2))
    torch.cuda.synchronize()
    barrier.wait()
    t0 = time.time()
    hashes = {}
    for i in mine:
        images = module.generate(labels[i].to(device), chunk_generator(device, args.seed, i), sampler=sampler)
        pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        hashes[i] = hashlib.md5(pixels.tobytes()).hexdigest()
    torch.cuda.synchronize()
    queue.put((rank, t0, time.time(), hashes, torch.cuda.max_memory_allocated() / 2**30))


def sample(args) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(args.devices), ctx.Queue()
    procs = [ctx.Process(target=_sample_worker, args=(r, args, barrier, queue)) for r in range(args.devices)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    start, end = min(r[1] for r in results), max(r[2] for r in results)
    hashes = {i: h for r in results for i, h in r[3].items()}
    chunks = sorted(hashes)
    images = sum(min(args.batch, args.num_images - i * args.batch) for i in chunks)
    emit(dict(case="sample", model=args.model, overrides=args.override, compile=args.compile, devices=args.devices, num_images_set=args.num_images,
              images_drawn=images, chunks=len(chunks), batch=args.batch, num_iter=args.num_iter, cfg=args.cfg,
              seconds=round(end - start, 2), s_per_img=round((end - start) / images * args.devices, 5),
              img_per_s=round(images / (end - start), 2),
              peak_gib_per_gpu=[round(r[4], 2) for r in sorted(results)], chunk_md5=hashes,
              gpu=torch.cuda.get_device_name(), torch=torch.__version__), args.out)


def emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["train", "sample"])
    ap.add_argument("--model", default="mar_base",
                    help="experiment=<model>_in256: mar_base | mar_large | mar_huge | ucgm_multistep (TiT-XL/2); "
                         "sample: a MAR model")
    ap.add_argument("--override", action="append", default=[],
                    help="an extra Hydra override, repeatable (e.g. model=dit_xl for DiT-XL/2 under UCGM)")
    ap.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"], help="train: cpu for a smoke run")
    ap.add_argument("--workers", type=int, default=6, help="train: data loader workers per rank")
    ap.add_argument("--compile", action="store_true", help="sample: module.compile=true (compiled once per GPU)")
    ap.add_argument("--strategy", default="ddp", help="ddp | fsdp (conf/strategy)")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--max-device-batch", type=int, default=None)
    ap.add_argument("--act-ckpt", action="store_true", help="FSDP: activation checkpointing")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--num-images", type=int, default=10000)
    ap.add_argument("--max-chunks", type=int, default=None, help="sample: at most this many chunks per GPU")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--num-iter", type=int, default=64)
    ap.add_argument("--cfg", type=float, default=2.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("SCALE_OUT"))
    args = ap.parse_args()
    train(args) if args.case == "train" else sample(args)


if __name__ == "__main__":
    main()
