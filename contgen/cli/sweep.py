"""A ``-m`` sweep's summary: one row per finished point (its overrides and final results) in ``<sweep dir>/summary.csv``
and ``summary.md``.

Each job writes its own ``<sweep dir>/summary/<job num>.json`` (never shared, so parallel jobs — joblib, SLURM —
cannot clobber each other), then rebuilds both tables from all the job files under an exclusive lock, written to a
temporary file and renamed; the last job to finish leaves the complete table. Columns: the job number, the
overrides whose values differ between points (all of them while one point is done), then the results.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path


def hydra_sweep_job() -> tuple[Path, str, list[str]] | None:
    """(sweep dir, job number, the job's overrides) inside a Hydra multirun job, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(hc.sweep.dir), str(hc.job.num), list(hc.overrides.task)


def record_point(sweep_dir: str | Path, job: str, overrides: list[str], results: dict, run_dir: str | Path) -> Path:
    """Write this point's row and rebuild the sweep's tables; returns summary.csv."""
    sweep_dir = Path(sweep_dir)
    (sweep_dir / "summary").mkdir(parents=True, exist_ok=True)
    row = {"job": job, "run_dir": str(run_dir), "overrides": overrides, "results": results}
    _write_atomic(sweep_dir / "summary" / f"{job}.json", json.dumps(row, indent=2))
    with _locked(sweep_dir / "summary" / ".lock"):
        rows = [json.loads(p.read_text()) for p in (sweep_dir / "summary").glob("*.json")]
        header, table = summary_table(rows)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header, *table])
        _write_atomic(sweep_dir / "summary.csv", buf.getvalue())
        md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in table]
        _write_atomic(sweep_dir / "summary.md", "\n".join(md) + "\n")
    return sweep_dir / "summary.csv"


def summary_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    rows = sorted(rows, key=lambda r: (int(r["job"]) if str(r["job"]).isdigit() else 1 << 30, str(r["job"])))
    overrides = [dict(o.split("=", 1) if "=" in o else (o, "") for o in r["overrides"]) for r in rows]
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    if len(rows) > 1:
        keys = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    metrics = list(dict.fromkeys(k for r in rows for k in r["results"]))
    header = ["job", *keys, *metrics]
    table = [[str(r["job"]), *(o.get(k, "") for k in keys), *(_fmt(r["results"].get(m)) for m in metrics)]
             for r, o in zip(rows, overrides)]
    return header, table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _locked:
    """An exclusive ``flock`` on ``path`` (no-op where fcntl is missing: Windows)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.f, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.f.close()  # closing releases the lock
