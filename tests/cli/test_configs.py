"""Every option of every config group composes, and its object instantiates (tiny sizes where needed)."""

import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict

import contgen.cli.config  # noqa: F401
from contgen.cli.build import batch_plan, build_datamodule, world_size

CONF = Path(__file__).resolve().parents[2] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def compose_train(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train.yaml", overrides=list(overrides), return_hydra_config=True)


def test_train_help_lists_groups():
    from tests.helpers import run_script

    out = run_script("train.py", "--help").stdout
    for group in ("method", "model", "tokenizer", "loss", "sampler", "data", "trainer", "strategy", "logger",
                  "callbacks", "cluster", "experiment", "debug"):
        assert f"{group}:" in out, group


@pytest.mark.parametrize("name", options("model"))
def test_model_options_instantiate(name):
    cfg = compose_train(f"model={name}")
    with torch.device("meta"):  # the paper sizes are big: build on the meta device
        if "input_size" in inspect.signature(get_class(cfg.model._target_)).parameters:  # a transport denoiser
            net = instantiate(cfg.model)(input_size=32, in_channels=4, num_classes=1000)
            level = {"level": torch.zeros(2)} if "level" in inspect.signature(net.forward).parameters else {}  # Shortcut
            out = net(torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long), **level)
            assert out.shape == (2, 4, 32, 32)
        else:  # a token backbone (a prefix one, DiGIT's pixel decoder, also takes the semantic ids' sizes)
            prefix = {"prefix_len": 256, "prefix_vocab": 8192} if name.startswith("prefix_") else {}
            assert instantiate(cfg.model)(seq_len=256, token_dim=16, num_classes=1000, **prefix).cond_dim > 0


@pytest.mark.parametrize("name", options("loss"))
def test_loss_options_instantiate(name):
    cfg = compose_train(f"loss={name}")
    spec = {"vocab_size": 16} if getattr(get_class(cfg.loss._target_), "discrete", False) else {"token_dim": 16}
    head = instantiate(cfg.loss)(cond_dim=64, **spec)  # a discrete head (categorical) models ids
    assert hasattr(head, "loss") and hasattr(head, "sample")


@pytest.mark.parametrize("name", options("tokenizer"))
def test_tokenizer_options_instantiate(name, tmp_path):
    cfg = compose_train(f"tokenizer={name}")
    if name == "digit_kmeans":  # K-means centroids over its encoder's features (fit_kmeans.py; tests/tokenizers)
        torch.save({"centroids": torch.randn(4, 768)}, tmp_path / "centroids.pt")
        cfg.tokenizer.centroids_path = str(tmp_path / "centroids.pt")
    if "ckpt_path" in cfg.tokenizer.keys():  # needs weights: a missing file must be a clear error naming the key
        with open_dict(cfg):
            cfg.tokenizer.ckpt_path = str(tmp_path / "missing")
            cfg.data.image_size = 256
        with pytest.raises(InstantiationException, match="tokenizer.ckpt_path"):
            instantiate(cfg.tokenizer)
        with open_dict(cfg):
            cfg.tokenizer.ckpt_path = None
            cfg.tokenizer.random_init = True
    tok = instantiate(cfg.tokenizer)
    assert tok.seq_len == tok.grid[0] * tok.grid[1]


@pytest.mark.parametrize("name", options("sampler"))
def test_sampler_options_instantiate(name):
    objective = ["objective=shortcut"] if name == "shortcut" else []  # its level count is the objective's
    sampler = instantiate(compose_train(f"sampler={name}", *objective).sampler)
    assert callable(sampler) and getattr(sampler, "num_iter", 1) >= 1  # causal: one token per step, no num_iter


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate(name, tmp_path):
    cfg = compose_train(f"data={name}")
    for key in ("root", "shards"):
        if key in cfg.data.keys():  # `in` is False for a ??? (missing) value
            with open_dict(cfg):
                cfg.data[key] = str(tmp_path / "missing")
            with pytest.raises(InstantiationException, match=f"data.{key}"):
                build_datamodule(cfg)
            return
    dm = build_datamodule(cfg)
    assert dm.num_classes >= 10 and len(dm.train_set) >= dm.batch_size


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_instantiate(name, tmp_path):
    cfg = compose_train(f"trainer={name}", f"hydra.run.dir={tmp_path}")
    with open_dict(cfg):
        cfg.trainer.default_root_dir = str(tmp_path)
        if name == "gpu" and not torch.cuda.is_available():
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.precision = "bf16-mixed"
    assert instantiate(cfg.trainer).max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("name", options("strategy"))
def test_strategy_options_instantiate(name):
    cfg = compose_train(f"strategy={name}")
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == {"fsdp": "ShardedStrategy"}.get(name, "DDPStrategy")
    if name != "fsdp":  # buffers are constants or per-rank NaN flags: never overwritten from rank 0
        assert strategy._ddp_kwargs["broadcast_buffers"] is False


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(name, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train(f"logger={name}")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert len(loggers) == len(cfg.logger)


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_options_instantiate(name, tmp_path):
    cfg = compose_train(f"callbacks={name}")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    assert all(instantiate(c) is not None for c in cfg.callbacks.values())


@pytest.mark.parametrize("group", ["method", "cluster", "debug", "experiment"])
def test_global_presets_compose(group):
    for name in options(group):
        cfg = compose_train(f"{group}={name}")
        OmegaConf.to_container(cfg, resolve=False)
        family, size = (name.split("_") + [""])[:2]
        if group == "experiment" and family in ("mar", "ear") and size in ("base", "large", "huge"):  # a paper recipe
            assert cfg.optim.ema_decay == 0.9999 and cfg.trainer.gradient_clip_val == 3.0, name
            assert cfg.trainer.precision == "bf16-mixed" and list(cfg.optim.betas) == [0.9, 0.95], name
            assert cfg.optim.warmup_epochs == 100 and cfg.optim.schedule == "constant", name
            assert recipe_batch(cfg) == 2048, name


def recipe_batch(cfg) -> int:
    """The optimizer's batch that a composed config plans: per device × devices × nodes × accumulation."""
    batch, accumulate = batch_plan(cfg.data, cfg.trainer)
    return batch * world_size(cfg.trainer) * accumulate


def test_method_choice_and_cli_override_compose():
    cfg = compose_train("method=ear")
    assert cfg.loss._target_.endswith("EnergyHead") and cfg.model._target_.endswith("EARBackbone")
    cfg = compose_train("method=ear", "model=mar_tiny")  # the command line wins over the preset
    assert cfg.loss._target_.endswith("EnergyHead") and cfg.model._target_.endswith("MARBackbone")


def test_builtin_defaults_are_the_measured_ones():
    """The README's first screen quotes runs of exactly these settings (issue 7 §1): changing one means re-measuring."""
    cfg = compose_train()
    steps = cfg.trainer.max_epochs * cfg.data.train.num_samples // cfg.data.batch_size
    assert steps == 1500 and cfg.data.train.fresh_each_epoch and cfg.loss.width == 128 and cfg.optim.ema_warmup
    assert (cfg.sampler.cfg, cfg.sampler.cfg_schedule, cfg.sampler.num_iter) == (5.0, "constant", 16)
    assert compose_train("data=digits").data.train.repeat == 4
    ear = compose_train("method=ear")
    assert (ear.loss.width, ear.loss.score_batch_mul, ear.sampler.cfg) == (128, 1, 2.0)


def test_paper_recipe_values():
    cfg = compose_train("experiment=mar_large_in256")
    assert (cfg.model.encoder_depth, cfg.model.encoder_embed_dim, cfg.loss.depth, cfg.loss.width) == (16, 1024, 8, 1280)
    assert cfg.sampler.cfg == 3.0 and cfg.sampler.cfg_schedule == "linear" and cfg.loss.num_sampling_steps == 100
    assert cfg.optim.warmup_epochs == 100 and cfg.optim.schedule == "constant" and list(cfg.optim.betas) == [0.9, 0.95]
    assert cfg.model.attn_dropout == 0.1 and cfg.model.label_drop_prob == 0.1 and cfg.module.mask_ratio_min == 0.7
    assert cfg.optim.ema_decay == 0.9999 and cfg.optim.ema_warmup is False  # the reference averages from the init


def test_ear_recipe_values():
    cfg = compose_train("experiment=ear_huge_in256")
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.loss.depth, cfg.loss.width) == (40, 1280, 12, 1536)
    assert cfg.optim.head_lr_scale == 0.25 and cfg.optim.blr == 1e-4 and cfg.trainer.max_epochs == 750
    assert cfg.optim.ema_warmup is False
    assert batch_plan(cfg.data, cfg.trainer) == (32, 2)  # on the README's 32 GPUs: 32 per device, 2 accumulated
    assert cfg.loss.score_batch_mul == 2 and cfg.loss.train_temperature == 1.0
    assert (cfg.sampler.num_iter, cfg.sampler.cfg, cfg.sampler.cfg_schedule, cfg.sampler.temperature) == (64, 3.0, "linear", 0.7)
    ft = compose_train("experiment=ear_base_in256_ft")
    assert ft.loss.train_temperature == 0.99 and ft.optim.blr == 7e-5 and ft.trainer.max_epochs == 800
    assert ft.resume_mode == "new_stage"  # the fine-tune is a new stage: its lr takes effect
    assert (ft.model.depth, ft.loss.depth, ft.loss.width) == (24, 6, 1024)


def test_ucgm_recipe_values():
    """ucgm.md §1.7 and the reference configs (in1k256_tit_xl_sdvae.yaml, in1k256_sit_xl_sdvae_linear.yaml)."""
    multi = compose_train("experiment=ucgm_multistep_in256")
    assert multi.module._target_.endswith("TransportModule") and "loss" not in multi
    assert multi.model._target_.endswith("TiT") and (multi.model.hidden_size, multi.model.depth) == (1152, 28)
    assert multi.tokenizer._target_.endswith("SDVAETokenizer") and multi.tokenizer.scale_factor == 0.18215
    o = multi.objective
    assert (o.consistc_ratio, o.enhanced_ratio, o.enhanced_style, o.scaled_cbl_eps, o.wt_cosine_loss) == (
        0.0, 0.44, "ft-vs-fe", 0.0, True)
    assert list(o.time_dist_ctrl) == [2.4, 2.4, 1.0] and o.ema_decay_rate == 0.999 and o.weight_function == "cosine"
    assert (multi.optim.name, multi.optim.lr, list(multi.optim.betas), multi.optim.weight_decay) == (
        "adamw", 2e-4, [0.9, 0.95], 0.0)
    assert multi.trainer.gradient_clip_val is None and multi.optim.ema_decay == 0.9999
    assert (multi.sampler.steps, multi.sampler.extrapol_ratio, multi.sampler.cfg_scale) == (60, 0.21, 0.0)
    assert multi.sampler.transport == multi.objective.transport == "linear"
    for name, zeta, style, clip_ema in (("fewstep", 2.0, "fc-vs-xz", 0.9999), ("tune", 1.7, "fc-vs-fe", 0.99)):
        cfg = compose_train(f"experiment=ucgm_{name}_in256")
        o = cfg.objective
        assert (o.consistc_ratio, o.enhanced_ratio, o.enhanced_style, o.scaled_cbl_eps, o.ema_decay_rate) == (
            1.0, zeta, style, 5.0, 1.0), name
        assert list(o.time_dist_ctrl) == [0.8, 1.0, 1.0] and o.wt_cosine_loss is False, name
        assert (cfg.optim.name, cfg.optim.lr, list(cfg.optim.betas)) == ("radam", 1e-4, [0.9, 0.999]), name
        assert cfg.trainer.gradient_clip_val == 0.1 and cfg.optim.ema_decay == clip_ema, name
        assert (cfg.sampler.steps, cfg.sampler.stochast_ratio) == (2, 1.0), name
    for cfg in (multi, cfg):
        assert recipe_batch(cfg) == 1024 and batch_plan(cfg.data, cfg.trainer) == (128, 1)


def test_shortcut_recipe_values():
    """shortcut.md §3: the README recipes on the reference's optimiser, EMA and SD-VAE ft-MSE posterior samples."""
    for name, (hidden, depth, heads) in (("b", (768, 12, 12)), ("xl", (1152, 28, 16))):
        cfg = compose_train(f"experiment=shortcut_dit_{name}_in256")
        m, o = cfg.model, cfg.objective
        assert m._target_.endswith("ShortcutDiT") and (m.hidden_size, m.depth, m.num_heads, m.patch_size) == (
            hidden, depth, heads, 2) and m.reference_faithful and m.time_scale == 1.0
        assert (o.denoise_timesteps, o.bootstrap_every, o.bootstrap_ema, o.bootstrap_cfg, o.cfg_scale) == (
            128, 8, True, True, 1.5) and o.class_dropout_prob == 0.1 and o.clip_value == 4.0
        assert recipe_batch(cfg) == 256 and batch_plan(cfg.data, cfg.trainer) == (32, 1)
        assert cfg.trainer.max_steps == 810000
    celeba = compose_train("experiment=shortcut_dit_b_celebahq256")
    assert (celeba.objective.cfg_scale, celeba.objective.class_dropout_prob, celeba.sampler.cfg_scale) == (0.0, 1.0, 0.0)
    assert celeba.data.batch_size * celeba.trainer.devices == 64 and celeba.trainer.max_steps == 410000
    for cfg in (celeba, compose_train("experiment=shortcut_dit_xl_in256")):
        o = cfg.optim
        assert (o.name, o.lr, list(o.betas), o.weight_decay, o.schedule, o.warmup_epochs) == (
            "adamw", 1e-4, [0.9, 0.999], 0.1, "constant", 0)
        assert (o.ema_decay, o.ema_warmup, cfg.trainer.gradient_clip_val) == (0.999, False, None)
        assert cfg.tokenizer._target_.endswith("SDVAETokenizer") and cfg.tokenizer.variant == "mse"
        assert cfg.tokenizer.posterior == "sample" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.metrics.use_ema is False  # the reference samples with the online weights by default


def test_every_script_the_makefile_runs_exists():
    """`make bench` ran bench/run.py, which did not exist (issue 6 defect 9)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    scripts = re.findall(r"\$\(PY\) ([\w/]+\.py)", (root / "Makefile").read_text())
    assert "bench/mar_ear.py" in scripts and all((root / s).is_file() for s in scripts), scripts


TABLE1_CELLS = [f"{order}_{loss}" for order in ("causal_raster", "bidir_random") for loss in ("ce", "diff")]


@pytest.mark.parametrize("cell", TABLE1_CELLS)
def test_mar_table1_presets(cell):
    """MAR Table 1's four cells (experiment=mar_table1_*): MAR-L-sized backbones, one recipe, the cell's order and
    loss/tokenizer; every cell's network builds (on the meta device) from its tokenizer's ids or tokens."""
    name = f"mar_table1_{cell}_{'vq' if cell.endswith('ce') else 'kl'}"
    cfg = compose_train(f"experiment={name}")
    causal = cell.startswith("causal")
    assert cfg.model._target_.endswith("GPTBackbone" if causal else "MARBackbone"), name
    assert cfg.module._target_.endswith("CausalARModule" if causal else "TokenARModule"), name
    assert cfg.sampler._target_.endswith("CausalARSampler" if causal else "MaskedARSampler"), name
    ce = cell.endswith("ce")
    assert cfg.loss._target_.endswith("CategoricalHead" if ce else "DiffusionHead"), name
    assert cfg.tokenizer._target_.endswith("VQGANTokenizer" if ce else "KLTokenizer"), name
    depth = cfg.model.depth if causal else cfg.model.encoder_depth + cfg.model.decoder_depth
    width = cfg.model.embed_dim if causal else cfg.model.encoder_embed_dim
    assert (depth, width, cfg.trainer.max_epochs, cfg.sampler.cfg) == (32, 1024, 400, 1.0), name
    assert cfg.optim.ema_decay == 0.9999 and cfg.optim.warmup_epochs == 100 and recipe_batch(cfg) == 2048, name
    if not ce:
        assert (cfg.loss.width, cfg.loss.depth, cfg.loss.batch_mul) == (1024, 3, 4), name
    spec = {"vocab_size": 1024} if ce else {"token_dim": 16}
    with torch.device("meta"):
        bb = instantiate(cfg.model)(seq_len=256, num_classes=1000, **({"token_dim": None} if ce else {}), **spec)
        assert bb.cond_dim == 1024 and instantiate(cfg.loss)(cond_dim=bb.cond_dim, **spec) is not None


@pytest.mark.parametrize("cell", ["causal_raster_ce_vq", "causal_raster_diff_patch", "bidir_random_ce_vq",
                                  "bidir_random_diff_patch"])
def test_table1_builtin_presets_build(cell, tmp_path):
    """The built-in cells: equal width and depth (MAR 2 + 2 blocks vs GPT 4, 128 wide), the same steps and sampler
    settings; each module builds from its config (vq_small with random weights in place of tokenizer.ckpt_path)."""
    from contgen.cli.build import build_module

    cfg = compose_train(f"experiment=table1_builtin_{cell}")
    causal = cell.startswith("causal")
    depth = cfg.model.depth if causal else cfg.model.encoder_depth + cfg.model.decoder_depth
    width = cfg.model.embed_dim if causal else cfg.model.encoder_embed_dim
    assert (depth, width, cfg.trainer.max_steps, cfg.sampler.cfg, cfg.data.batch_size) == (4, 128, 400, 1.0, 128)
    assert cfg.evaluate_after_fit and cfg.sampler.get("num_iter", 16) == 16  # one token per step in every cell
    with open_dict(cfg):
        del cfg["hydra"]  # from_config stores the resolved config; hydra's runtime keys exist only in a run
        cfg.paths.output_dir = str(tmp_path)
        if cell.endswith("vq"):
            cfg.tokenizer.ckpt_path = None
            cfg.tokenizer.random_init = True
    module = build_module(cfg, num_classes=12)
    assert type(module).causal == causal and module.net.backbone.cond_dim == 128
    assert (module.net.backbone.vocab_size is not None) == cell.endswith("vq")
