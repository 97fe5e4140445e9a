"""``python train.py``: fit, then (optionally) sample and score once; see conf/train.yaml."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from contgen.cli.build import batch_plan, build_datamodule, build_module, data_info, world_size
from contgen.callbacks.final_checkpoint import FinalCheckpoint
from contgen.callbacks.new_stage import NewStage
from contgen.callbacks.wandb_run_id import WandbRunId, wandb_run_id
from contgen.cli import console, slurm, sweep
from contgen.cli.checkpoint_io import AtomicCheckpointIO, load_checkpoint, resolve_ckpt_path
from contgen.cli.config import instantiate_group, print_config
from contgen.cli.run_dir import claim_run_dir

RESUME_MODES = ("exact", "new_stage")


def check_resume(cfg: DictConfig, ckpt_path: str | None) -> None:
    """Before any compute: ``resume_mode`` is known, a new stage has a checkpoint, and an exact resume does not
    silently drop a changed ``optim`` (Lightning restores the checkpoint's lr, betas and schedule)."""
    if cfg.resume_mode not in RESUME_MODES:
        raise ValueError(f"resume_mode must be one of {RESUME_MODES}, got {cfg.resume_mode!r}")
    if ckpt_path is None:
        if cfg.resume_mode == "new_stage":
            raise ValueError("resume_mode=new_stage starts from a checkpoint: set ckpt_path=/path/to/stage1.ckpt")
        return
    if cfg.resume_mode == "exact":
        stored = load_checkpoint(ckpt_path, mmap=True).get("contgen", {}).get("config", {}).get("optim", {})
        current = OmegaConf.to_container(cfg.optim, resolve=True)
        changed = sorted(k for k in current.keys() | stored.keys() if _plain(current.get(k)) != _plain(stored.get(k)))
        if stored and changed:
            diffs = ", ".join(f"optim.{k}: checkpoint {stored.get(k)!r} vs config {current.get(k)!r}" for k in changed)
            raise ValueError(f"ckpt_path={ckpt_path} is resumed exactly (resume_mode=exact), which restores the "
                             f"checkpoint's optimizer and LR schedule, but the config changes them ({diffs}). Undo the "
                             "change to continue the same run, or set resume_mode=new_stage to start a new stage "
                             "with this recipe (weights, EMA and optimizer moments carried over).")


def check_length_and_metrics(cfg: DictConfig, batches_per_epoch: int) -> None:
    """Before any compute: a run that trains at all, a ``max_steps`` that is reached, metrics that can be computed."""
    t = cfg.trainer
    if t.max_steps == 0 or t.max_epochs == 0:
        raise ValueError(f"trainer.max_steps={t.max_steps}, trainer.max_epochs={t.max_epochs}: nothing would be trained")
    steps_per_epoch = batches_per_epoch // max(1, t.accumulate_grad_batches)
    if t.max_steps > 0 and t.max_epochs is not None and t.max_epochs > 0 and t.max_steps > t.max_epochs * steps_per_epoch:
        print(f"note: trainer.max_steps={t.max_steps} is not reached: trainer.max_epochs={t.max_epochs} ends training "
              f"after {t.max_epochs * steps_per_epoch} steps ({steps_per_epoch} per epoch); set trainer.max_epochs=-1 "
              "to train for max_steps")
    if cfg.evaluate_after_fit:
        from contgen.cli.evaluate import check_metrics

        check_metrics(cfg.metrics)


def check_pixels(cfg: DictConfig, module) -> None:
    """Before any compute: what samples images during or after training needs a tokenizer that decodes."""
    callbacks = cfg.get("callbacks") or {}
    online_fid = callbacks.get("online_fid") or {}
    wants = [fix for fix, on in (("evaluate_after_fit=false", cfg.evaluate_after_fit),
                                 ("callbacks.sample_grid=null", callbacks.get("sample_grid") is not None),
                                 ("callbacks.online_fid.every_n_steps=0", online_fid.get("every_n_steps"))) if on]
    if wants:
        module.require_pixels(f"train without sampling images: {' '.join(wants)}")


def plan_batch(cfg: DictConfig) -> None:
    """Write the per-device batch and accumulation that ``data.global_batch_size`` gives into the config (what the
    run uses, and what its config.yaml and checkpoints record)."""
    if cfg.data.get("global_batch_size") is None:
        return
    batch, accumulate = batch_plan(cfg.data, cfg.trainer)
    cfg.data.batch_size, cfg.trainer.accumulate_grad_batches = batch, accumulate
    print(f"data.global_batch_size={cfg.data.global_batch_size} over {world_size(cfg.trainer)} device(s): "
          f"data.batch_size={batch} per device, trainer.accumulate_grad_batches={accumulate}")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def build_loggers(cfg: DictConfig, resume_from: str | None = None) -> list:
    """Instantiate ``logger.*``; W&B goes offline when WANDB_MODE=offline or no credentials are configured, and
    continues the W&B run stored in ``resume_from`` (an exact resume) unless ``logger.wandb.id`` is set."""
    loggers = []
    for name, conf in (cfg.logger or {}).items():
        if conf is None:
            continue
        if name == "wandb" and not conf.get("offline") and not _wandb_credentials():
            print("logger.wandb: no W&B credentials (WANDB_API_KEY / ~/.netrc) — logging offline; `wandb sync` later")
            os.environ.setdefault("WANDB_MODE", "offline")
        run_id = wandb_run_id(load_checkpoint(resume_from, mmap=True)) if name == "wandb" and resume_from else None
        if run_id and conf.get("id") is None:
            print(f"logger.wandb: continuing W&B run {run_id} (stored in {resume_from})")
            loggers.append(instantiate(conf, id=run_id, resume="allow"))
        else:
            loggers.append(instantiate(conf))
        console.quiet_wandb_logger(loggers[-1])
    return loggers


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()


def train(cfg: DictConfig) -> dict:
    console.setup(cfg.get("threads", "auto"), cfg.trainer.get("accelerator"))
    out = Path(cfg.paths.output_dir)
    slurm.resume_requeued(cfg, out)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, str(out))
    claim_run_dir(out, resuming=cfg.ckpt_path not in (None, ""))
    check_resume(cfg, ckpt_path)
    plan_batch(cfg)
    print_config(cfg, save_to=out / "config.yaml")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    check_length_and_metrics(cfg, len(datamodule.train_set) // (datamodule.batch_size * world_size(cfg.trainer)))
    module = build_module(cfg, datamodule.num_classes, data_info(datamodule.train_set))
    console.check_train_mode(module)
    check_pixels(cfg, module)
    loggers = build_loggers(cfg, resume_from=ckpt_path if cfg.resume_mode == "exact" else None)
    # FinalCheckpoint first: last.ckpt is written before anything else at the end of training can fail
    callbacks = [FinalCheckpoint(), *instantiate_group(cfg.callbacks)]
    callbacks += [NewStage()] if cfg.resume_mode == "new_stage" else []
    callbacks += [WandbRunId(lg) for lg in loggers if isinstance(lg, WandbLogger)] + slurm.callbacks()
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO(), *slurm.lightning_plugins()])
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    results = {"train/loss": float(trainer.callback_metrics["train/loss"])} if "train/loss" in trainer.callback_metrics else {}
    if cfg.evaluate_after_fit:  # every rank samples its share (strategy=ddp: the process group outlives fit)
        from contgen.cli.evaluate import evaluate_module

        module.to(trainer.strategy.root_device)  # Lightning's teardown moved it to the CPU
        results.update(evaluate_module(module, cfg, datamodule.train_set, out_dir=out))
        for logger in loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))},
                               step=trainer.global_step)
    if trainer.is_global_zero:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if trainer.is_global_zero and (job := sweep.hydra_sweep_job()) is not None:
        print(f"sweep summary: {sweep.record_point(*job, results, out)}")
    for logger in loggers:
        logger.finalize("success")
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()  # a multirun in one process must start a new W&B run per job
    return results
