"""``resume_mode=new_stage``: start a new stage of training from a checkpoint with this config's recipe.

``ckpt_path`` alone resumes the *same* run exactly: Lightning restores the optimizer's hyperparameters and the
scheduler's ``base_lrs`` from the checkpoint, so a changed ``optim.blr`` would never take effect. A new stage — EAR's
fine-tune, 50 more epochs at T_train 0.99 with blr 7e-5 (ear.md §3) — keeps the weights, the EMA, the optimizer's
moments and the step/epoch counters, but takes lr, betas, weight decay and the LR schedule from the current config,
as the reference does by recomputing the lr from its arguments every iteration (util/lr_sched.py). Loss and
sampler settings (train_temperature, ...) always come from the current config.
"""

from __future__ import annotations

import lightning as L

RECIPE_KEYS = ("lr", "initial_lr", "betas", "weight_decay", "lr_scale")


class NewStage(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the optimizer and schedule this config builds (an optimizer holds no state before its first step)
        fresh = pl_module.configure_optimizers()
        fresh_opt, fresh_sched = fresh["optimizer"], fresh["lr_scheduler"]["scheduler"]
        opt, sched = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
        names = [g.get("name") for g in opt.param_groups], [g.get("name") for g in fresh_opt.param_groups]
        if names[0] != names[1]:
            raise ValueError(f"resume_mode=new_stage: the checkpoint's parameter groups {names[0]} differ from this "
                             f"config's {names[1]}; the optimizer state cannot be carried over")
        for group, new in zip(opt.param_groups, fresh_opt.param_groups):
            group.update({k: new[k] for k in RECIPE_KEYS if k in new})
        sched.base_lrs, sched.lr_lambdas = list(fresh_sched.base_lrs), fresh_sched.lr_lambdas
        for group, lr in zip(opt.param_groups, sched.get_lr()):  # the lr of the step at the restored position
            group["lr"] = lr
