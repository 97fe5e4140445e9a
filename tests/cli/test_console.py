"""The console: each log line once, a compact config, no known-harmless noise (real warnings kept), CPU threads,
progress lines, the sweep summary; all at unit level (the end-to-end tests assert on real runs' output)."""

import csv
import logging
import threading
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from contgen.cli import console, sweep
from contgen.cli.config import print_config

CONF = Path(__file__).resolve().parents[2] / "conf"


class Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def root_handler():
    """A root handler standing in for Hydra's; Lightning's logger state restored afterwards."""
    import lightning  # noqa: F401  (its package logger gets its own console handler on import)

    names = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, list(logging.getLogger(n).filters))
             for n in names}
    handler = Count()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)
    for n, (handlers, propagate, filters) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.propagate, lg.filters[:] = handlers, propagate, filters


def test_each_lightning_line_once_and_no_tip(root_handler):
    from lightning.pytorch.utilities import rank_zero_info

    console.quiet_logging()
    assert not [h for h in logging.getLogger("lightning").handlers if type(h) is logging.StreamHandler]
    rank_zero_info("Seed-like message")
    rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
    assert root_handler.messages == ["Seed-like message"]  # reaches Hydra's handlers (console + log file) once


def test_no_duplicate_model_summary_note(root_handler):
    import lightning as L
    from lightning.pytorch.callbacks import RichModelSummary

    console.quiet_logging()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train.yaml")
    GlobalHydra.instance().clear()
    trainer = L.Trainer(enable_model_summary=cfg.trainer.enable_model_summary, callbacks=[RichModelSummary()],
                        logger=False, accelerator="cpu")
    assert not [m for m in root_handler.messages if "already configured with model summary" in m]
    assert sum(isinstance(c, RichModelSummary) for c in trainer.callbacks) == 1  # the summary is still shown


def test_compact_config_lines_and_full_yaml(tmp_path, capsys):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=["data.batch_size=32", "optim.blr=1e-3"], return_hydra_config=True)
    try:
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # as the task function sees it
        lines = print_config(cfg, save_to=tmp_path / "config.yaml")
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    printed = capsys.readouterr().out.splitlines()
    assert printed == lines and len(lines) == 3  # was a ~150-line tree, cut at 80 columns in logs
    assert str(tmp_path / "config.yaml") in lines[0]
    assert "model=mar_tiny" in lines[1] and "data=shapes" in lines[1] and "hydra" not in lines[1]
    assert lines[2].endswith("data.batch_size=32 optim.blr=1e-3")
    full = (tmp_path / "config.yaml").read_text()
    assert "batch_size: 32" in full and "encoder_embed_dim" in full


def test_compact_config_outside_hydra(capsys):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"seed": 0, "optim": {"blr": 1e-3, "betas": [0.9, 0.95]}})
    assert print_config(cfg) == ["config", "  seed: 0", "  optim: {blr: 0.001, betas: [0.9, 0.95]}"]


def test_harmless_warnings_filtered_real_ones_kept():
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.filter_warnings()
        warnings.warn("Found 104 module(s) in eval mode at the start of training. This may ...", PossibleUserWarning)
        warnings.warn("The dataloader does not have many workers", PossibleUserWarning)
    assert [str(w.message) for w in caught] == ["The dataloader does not have many workers"]


def test_check_train_mode_names_trained_modules_in_eval_only():
    from contgen.utils.ema import EMA

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    module = torch.nn.Module()
    module.net, module.ema, module.tokenizer = net, EMA(net), torch.nn.Identity().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert console.check_train_mode(module) == []  # EMA copy and tokenizer are in eval on purpose
        net[1].eval()
        assert console.check_train_mode(module) == ["net.1"]
    assert len(caught) == 1 and "net.1" in str(caught[0].message)


def test_wandb_logger_without_anonymous(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="contgen", save_dir=str(tmp_path), offline=True)
    assert "anonymous" in logger._wandb_init  # Lightning always passes it; wandb then warns that it has no effect
    console.quiet_wandb_logger(logger)
    assert "anonymous" not in logger._wandb_init


def test_datamodule_cpu_loader_resumable_without_pinning():
    from lightning.fabric.utilities.types import _Stateful

    from contgen.data.shapes import Shapes
    from contgen.modules.datamodule import DataModule

    dm = DataModule(Shapes(image_size=16, num_samples=64), batch_size=16, num_workers=0)
    loader = dm.train_dataloader()
    # Lightning warns "dataloader is not resumable" on a mid-epoch resume unless the loader is _Stateful
    assert isinstance(loader, _Stateful)
    assert loader.pin_memory == torch.cuda.is_available()  # pinning warns (and does nothing) without CUDA


@pytest.mark.parametrize("cores, load, threads", [(2, 0.1, 2), (2, 1.2, 1), (2, 7.0, 1), (16, 4.4, 12), (1, 0.0, 1)])
def test_auto_threads(cores, load, threads):
    assert console.auto_threads(cores, load) == threads


def test_setup_threads(capsys):
    before = torch.get_num_threads()
    try:
        assert console.setup_threads(1) == 1 and torch.get_num_threads() == 1
        n = console.setup_threads("auto", "cpu")
        assert 1 <= n <= console.available_cores() and torch.get_num_threads() == n
        assert capsys.readouterr().out.startswith(f"threads: {n} (")
        with pytest.raises(ValueError, match="threads must be 'auto' or >= 1"):
            console.setup_threads(0)
    finally:
        torch.set_num_threads(before)


def test_progress_lines_in_a_log(capsys):
    assert list(console.progress(range(5), "features")) == list(range(5))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "features: 0/5" and out[-1].startswith("features: 5/5 done in")


def test_sweep_summary_parallel_jobs(tmp_path):
    """8 jobs finishing at once: each row lands in summary.csv/.md (one file per job, tables rebuilt under a lock)."""
    def job(i):
        sweep.record_point(tmp_path, str(i), [f"optim.blr={i}e-4", "trainer.max_epochs=1"],
                           {"train/loss": 1.0 / (i + 1), "class_acc": 0.5}, tmp_path / str(i))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["job"] for r in rows] == [str(i) for i in range(8)]
    assert list(rows[0]) == ["job", "optim.blr", "train/loss", "class_acc"]  # only the overrides that vary
    assert rows[3]["optim.blr"] == "3e-4" and float(rows[3]["train/loss"]) == pytest.approx(0.25)
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "| job | optim.blr | train/loss | class_acc |" and len(md) == 2 + 8


def test_busy_cores_sees_another_process_at_once():
    """A process spinning on one core counts as ~1 busy core within the 0.25 s window (the 1-minute load average
    would take a minute to show it, and a minute to forget it)."""
    import subprocess
    import sys
    import time

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # the interpreter is up and spinning
        assert console.busy_cores() > 0.5
    finally:
        spinner.kill()
        spinner.wait()
