"""Sample a class-balanced set from a trained module and score it.

* Built-in data (``shapes``, ``digits``): the offline classifier gives FD_builtin (a Fréchet distance on its
  features, comparable only across runs on the same data and classifier version) and the class accuracy of
  the conditional samples.
* Any data, with ``metrics.inception_weights``: FID and IS with torch-fidelity's InceptionV3, against
  ``metrics.ref_stats`` (an ``.npz`` with ``mu``/``sigma``) or statistics computed from the data set.

``sweep.<knob>=[...]`` scores every combination of sampler settings from one loaded checkpoint: one directory per
point, ``sweep.csv``, a plot of the FID against a knob (``sweep.png``) and, with ``logger=wandb``, a table, the plot and
each point's samples in W&B. Under ``torch.distributed`` every rank samples its share of the set (``generate_balanced``)
and rank 0 scores it.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from contgen.cli.console import progress
from contgen.metrics import (FeatureStats, InceptionFeatures, builtin_metrics, frechet_distance, inception_score,
                             load_or_compute_ref_stats, load_or_train_classifier, load_stats)
from contgen.utils.images import save_grid, save_npz, to_uint8

BUILTIN = {"contgen.data.shapes.Shapes": "shapes", "contgen.data.digits.Digits": "digits"}


def check_metrics(m: DictConfig) -> None:
    for key in ("num_samples", "batch_size"):
        if m[key] < 1:
            raise ValueError(f"metrics.{key} must be >= 1, got {m[key]}")
    if m.inception_weights and not Path(m.inception_weights).is_file():
        raise FileNotFoundError(f"metrics.inception_weights: no file at {m.inception_weights} (torch-fidelity's "
                                "weights-inception-2015-12-05-6726825d.pth)")


def chunk_generator(device, seed: int, chunk: int) -> torch.Generator:
    """The generator of chunk ``chunk`` of an evaluation set: depends on (seed, chunk) only, not on who draws it."""
    return torch.Generator(device).manual_seed(hash((seed, chunk)) & (2**62 - 1))


def generate_balanced(module, num_samples: int, batch_size: int, seed: int, use_ema: bool = True, sampler=None):
    """``num_samples`` images, labels cycling over the classes, drawn in chunks of ``batch_size``. Chunk i has its own
    generator, seeded by (seed, i), so the set is the same however many processes draw it: under torch.distributed
    rank r of W draws chunks r, r + W, ... and rank 0 gathers them in order. Returns (images, labels) on the CPU on
    rank 0 and (None, None) on the other ranks. ``sampler``: a sampler to use instead of the module's own.

    Every rank makes the same number of ``generate`` calls: a rank short of a chunk draws its first one again and
    drops it. A model sharded with FSDP gathers its layers collectively in every forward, so ranks must stay in
    step; it costs no time, since the others would wait for the slowest rank at the gather anyway."""
    labels = torch.arange(num_samples) % module.num_classes
    chunks = labels.split(batch_size)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    share = f" on rank {rank} of {world}" if world > 1 else ""
    mine = list(range(rank, len(chunks), world))
    calls = mine + mine[:1] * (-(-len(chunks) // world) - len(mine))  # ceil(chunks / world) calls on every rank
    drawn = {}
    for n, i in enumerate(progress(calls or [0], f"sampling {num_samples} images (batches){share}")):
        g = chunk_generator(module.device, seed, i)
        images = module.generate(chunks[i].to(module.device), generator=g, use_ema=use_ema, sampler=sampler).cpu()
        if n < len(mine):
            drawn[i] = images
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(drawn, parts, dst=0)
        if rank != 0:
            return None, None
        drawn = {i: images for part in parts for i, images in part.items()}
    return torch.cat([drawn[i] for i in range(len(chunks))]), labels


def builtin_classifier(data_train: dict, cache_dir: str):
    """(the built-in classifier of a built-in data set, trained once and cached in ``cache_dir``, its description,
    the training set)."""
    name = BUILTIN[data_train["_target_"]]
    data_train = {k: v for k, v in data_train.items() if k != "repeat"}  # the classifier sees each image once
    train_set, heldout = instantiate(data_train), instantiate({**data_train, "split": "val"})
    # a few thousand images train the classifier to ~100% held-out accuracy; more only costs time on first use
    fit_set = instantiate({**data_train, "num_samples": 4096}) if "num_samples" in data_train else train_set
    description = {"name": name, "image_size": train_set.image_size, "num_classes": train_set.num_classes,
                   "seed": data_train.get("seed", 0), "num_samples": len(fit_set)}
    return load_or_train_classifier(fit_set, heldout, description, cache_dir), description, train_set


def builtin_scores(data_train: dict, images: torch.Tensor, labels: torch.Tensor, cache_dir: str) -> dict:
    classifier, description, train_set = builtin_classifier(data_train, cache_dir)
    ref = load_or_compute_ref_stats(classifier, train_set, {**description, "num_samples": len(train_set)}, cache_dir)
    scores = builtin_metrics(classifier, images, labels, ref)
    return {"fd_builtin": scores["fd"], "class_acc": scores["class_acc"], "classifier_acc": classifier.heldout_accuracy}


def inception_scores(weights: str, ref_stats: str | None, images: torch.Tensor, dataset, batch_size: int,
                     device: torch.device) -> dict:
    net = InceptionFeatures(weights).to(device)

    def features(batches, what: str, total: int):
        stats, logits = FeatureStats(), []
        for batch in progress(batches, f"Inception features of {what} (batches)", total):
            out = net(batch.to(device))
            stats.update(out["pool"].double().cpu())
            logits.append(out["logits"].cpu())
        return stats, torch.cat(logits)

    chunks = to_uint8(images).split(batch_size)
    fake, logits = features(chunks, "the samples", len(chunks))
    if ref_stats is not None:
        mu, sigma = load_stats(ref_stats)
    else:  # statistics of the training images themselves
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        mu, sigma = features((to_uint8(b["image"]) for b in loader), "the data set", len(loader))[0].mu_sigma()
    is_mean, is_std = inception_score(logits, splits=min(10, len(images)))
    return {"fid": frechet_distance(*fake.mu_sigma(), mu, sigma), "is": is_mean, "is_std": is_std}


def fid_metric(cfg: DictConfig) -> str:
    """The FID that sweeps and the online callback report: Inception ``fid`` with ``metrics.inception_weights``, else
    ``fd_builtin`` on built-in data; refused (before any compute) when neither can be computed."""
    if cfg.metrics.inception_weights:
        return "fid"
    if cfg.metrics.builtin == "auto" and cfg.data.train.get("_target_") in BUILTIN:
        return "fd_builtin"
    raise ValueError(f"no FID to report: the data ({cfg.data.train.get('_target_')}) is not built-in and "
                     "metrics.inception_weights is not set (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")


def score(images: torch.Tensor, labels: torch.Tensor, cfg: DictConfig, dataset=None, device="cpu") -> dict:
    """The metrics ``cfg.metrics`` asks for on ``images`` (``cfg`` also holds ``data.train`` and ``paths.cache_dir``)."""
    m = cfg.metrics
    results: dict = {"num_samples": len(images)}
    data_train = OmegaConf.to_container(cfg.data.train, resolve=True)
    if m.builtin == "auto" and data_train.get("_target_") in BUILTIN:
        results.update(builtin_scores(data_train, images, labels, cfg.paths.cache_dir))
    if m.inception_weights:
        results.update(inception_scores(m.inception_weights, m.ref_stats, images,
                                        dataset if dataset is not None else instantiate(data_train), m.batch_size,
                                        device))
    elif data_train.get("_target_") not in BUILTIN:
        print("metrics.inception_weights is not set: no FID/IS. Place weights-inception-2015-12-05-6726825d.pth "
              "(torch-fidelity release v0.2.0) on disk and pass metrics.inception_weights=/path/to/it")
    return results


def evaluate_module(module, cfg: DictConfig | dict, dataset=None, out_dir: str | Path = ".", sampler=None) -> dict:
    """Score ``module`` as ``cfg.metrics`` says; writes metrics.json, a sample grid and the samples' .npz. Under
    torch.distributed every rank must call it (each samples its share); rank 0 scores, the others return {}."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    m, out = cfg.metrics, Path(out_dir)
    images, labels = generate_balanced(module, m.num_samples, m.batch_size, m.seed, m.use_ema, sampler)
    if images is None:
        return {}
    results = score(images, labels, cfg, dataset, module.device)
    per_row = min(10, max(1, m.num_samples // module.num_classes))
    order = torch.argsort(labels[: per_row * module.num_classes], stable=True)
    save_grid(images[order], out / "eval_samples.png", nrow=per_row)
    save_npz(images, labels, out / "eval_samples.npz")
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


def sweep_points(sweep: DictConfig, fixed: DictConfig, sampler_cfg: dict) -> list[tuple[dict, dict]]:
    """Every combination of the ``sweep.<knob>`` lists (the first knob varies slowest) as (knob values, sampler
    overrides); refuses knobs the checkpoint's sampler lacks, non-lists, and knobs also fixed with ``sampler.*``."""
    axes = {}
    for knob, values in sweep.items():
        if values is None:
            continue
        if not OmegaConf.is_list(values) or len(values) == 0:
            raise ValueError(f"sweep.{knob} must be a non-empty list, e.g. sweep.{knob}=[1,2], got {values}")
        # sweep.steps is the step count of either family: the token-AR samplers call it num_iter
        key = "num_iter" if knob == "steps" and "steps" not in sampler_cfg else knob
        if key not in sampler_cfg or key == "_target_":
            raise ValueError(f"sweep.{knob}: not a setting of this checkpoint's sampler ({sampler_cfg['_target_']}); "
                             f"its settings: {sorted(k for k in sampler_cfg if k != '_target_')}")
        if fixed.get(key) is not None:
            raise ValueError(f"sampler.{key}={fixed[key]} and sweep.{knob}={list(values)} both set the sampler's "
                             f"{key}: drop one")
        axes[(knob, key)] = list(values)
    return [({knob: v for (knob, _), v in zip(axes, combo)}, {key: v for (_, key), v in zip(axes, combo)})
            for combo in itertools.product(*axes.values())]


def evaluate(cfg: DictConfig) -> dict | list[dict]:
    from contgen.cli.console import setup
    from contgen.cli.load import load_module
    from contgen.cli.train import build_loggers

    setup(cfg.get("threads", "auto"), cfg.get("device", "auto"))
    check_metrics(cfg.metrics)
    overrides = {f"sampler.{k}": v for k, v in OmegaConf.to_container(cfg.sampler).items()}
    overrides["tokenizer.ckpt_path"] = cfg.tokenizer_ckpt_path
    overrides["module.sample_precision"] = cfg.precision
    overrides["module.compile"], overrides["module.cuda_graphs"] = cfg.compile, cfg.cuda_graphs
    module, stored = load_module(cfg.ckpt, cfg.device, overrides, cfg.reference, cfg.allow_pickle)
    merged = OmegaConf.create({"data": stored["data"], "metrics": cfg.metrics, "paths": {"cache_dir": cfg.paths.cache_dir}})
    points = sweep_points(cfg.sweep, cfg.sampler, stored["sampler"])
    if points == [({}, {})]:  # no sweep
        loggers = build_loggers(cfg)
        results = evaluate_module(module, merged, out_dir=cfg.out_dir)
        log_results(loggers, [({}, results)], Path(cfg.out_dir))
        return results
    metric = fid_metric(merged)
    samplers = []
    for knobs, changes in points:  # every point's sampler is built (and its settings checked) before any compute
        try:
            samplers.append(instantiate({**stored["sampler"], **changes}))
            module.check_sampler(samplers[-1])
        except ValueError as e:
            raise ValueError(f"sweep point {point_name(knobs)}: {e}") from e
    loggers = build_loggers(cfg)
    out, rows = Path(cfg.out_dir), []
    for (knobs, _), sampler in zip(points, samplers):
        print(f"sweep point {point_name(knobs)}")
        rows.append((knobs, evaluate_module(module, merged, out_dir=out / point_name(knobs), sampler=sampler)))
    write_sweep(rows, metric, out)
    log_results(loggers, rows, out, metric)
    return [{**knobs, **results} for knobs, results in rows]


def point_name(knobs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in knobs.items())


def plot_axes(rows: list[tuple[dict, dict]]) -> tuple[str, dict[str, list[tuple]]]:
    """(the knob on the x axis: the one with the most values, the first on ties; {line name: [(x, row index)]}),
    one line per combination of the other knobs."""
    knobs = list(rows[0][0])
    x = max(knobs, key=lambda k: len({r[0][k] for r in rows}))
    lines: dict[str, list[tuple]] = {}
    for i, (values, _) in enumerate(rows):
        lines.setdefault(point_name({k: v for k, v in values.items() if k != x}) or "all", []).append((values[x], i))
    return x, lines


def write_sweep(rows: list[tuple[dict, dict]], metric: str, out: Path) -> None:
    """``sweep.csv`` (one row per point: knobs, then every metric) and ``sweep.png`` (``metric`` against a knob)."""
    from contgen.utils.plot import line_plot

    knobs, metrics = list(rows[0][0]), list(dict.fromkeys(k for _, r in rows for k in r))
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*knobs, *metrics])
        w.writerows([[k[n] for n in knobs] + [r.get(n, "") for n in metrics] for k, r in rows])
    x, lines = plot_axes(rows)
    line_plot({name: [(xv, rows[i][1][metric]) for xv, i in pts] for name, pts in lines.items()},
              out / "sweep.png", x, metric, f"{metric} vs {x}")
    print(f"sweep: {out / 'sweep.csv'}, {out / 'sweep.png'}")


def log_results(loggers: list, rows: list[tuple[dict, dict]], out: Path, metric: str | None = None) -> None:
    """Each point's knobs and numbers to every logger (step = the point's index); to W&B also its sample grid and,
    for a sweep, the table and a line plot of ``metric`` against the plotted knob."""
    from lightning.pytorch.loggers import WandbLogger

    for i, (knobs, results) in enumerate(rows):
        numbers = {f"sweep/{k}": v for k, v in knobs.items() if isinstance(v, (int, float))}
        numbers.update({f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))})
        for logger in loggers:
            logger.log_metrics(numbers, step=i)
            if isinstance(logger, WandbLogger):
                logger.log_image("eval/samples", [str(out / point_name(knobs) / "eval_samples.png")], step=i,
                                 caption=[point_name(knobs) or "samples, rows = class"])
    for logger in loggers:
        if metric is not None and isinstance(logger, WandbLogger):
            import wandb

            x, lines = plot_axes(rows)
            series = {i: name for name, pts in lines.items() for _, i in pts}
            columns = ["line", *rows[0][0], *dict.fromkeys(k for _, r in rows for k in r)]
            table = wandb.Table(columns=columns, data=[[series[i], *(({**k, **r}).get(c) for c in columns[1:])]
                                                       for i, (k, r) in enumerate(rows)])
            logger.experiment.log({"sweep/table": table,
                                   f"sweep/{metric}_vs_{x}": wandb.plot.line(table, x, metric, stroke="line",
                                                                             title=f"{metric} vs {x}")})
        logger.finalize("success")
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()
