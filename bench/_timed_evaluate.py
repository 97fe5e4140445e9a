"""``python bench/_timed_evaluate.py <evaluate.py overrides>``: evaluate.py, unchanged, with its sampling timed.

Used by ``bench/cli_sample.py``. ``contgen.cli.evaluate.generate_balanced`` (sampling + decode of every image) is
wrapped with a device synchronisation on each side; the phases are written as JSON to $CONTGEN_BENCH_TIMING.
"""

import time

T_START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import contgen.cli.evaluate as ev  # noqa: E402

phases: dict = {}
_generate = ev.generate_balanced


def _sync(module) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def timed_generate(module, *args, **kwargs):
    _sync(module)
    t0 = time.perf_counter()
    out = _generate(module, *args, **kwargs)
    _sync(module)
    phases.update(startup_s=t0 - T_START, generate_s=time.perf_counter() - t0)
    phases["_t_end_generate"] = time.perf_counter()
    return out


ev.generate_balanced = timed_generate
sys.argv = [str(ROOT / "evaluate.py"), *sys.argv[1:]]
try:
    runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
finally:
    if "_t_end_generate" in phases:
        phases["after_s"] = time.perf_counter() - phases.pop("_t_end_generate")
        Path(os.environ["CONTGEN_BENCH_TIMING"]).write_text(json.dumps(phases))
