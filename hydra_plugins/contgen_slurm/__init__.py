"""The launcher of ``cluster=slurm`` (Hydra takes launchers only from the ``hydra_plugins`` namespace; the logic is in
contgen/cli/slurm.py). Pickled by value into each job, so that a job runs whatever its working directory."""

import sys

import cloudpickle
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from contgen.cli import slurm


class ContgenSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher, with checks before submission and ``cluster.dry_run``."""

    def launch(self, job_overrides, initial_job_idx):
        dry_run = bool(OmegaConf.select(self.config, "cluster.dry_run", default=False))
        slurm.check_submission(self.params, dry_run)
        if dry_run:
            slurm.print_jobs(self.params, str(self.config.hydra.sweep.dir), job_overrides, initial_job_idx)
            return []
        # by value: the job unpickles this class even where hydra_plugins/ is not importable (another working dir)
        cloudpickle.register_pickle_by_value(sys.modules[type(self).__module__])
        return super().launch(job_overrides, initial_job_idx)
