"""Bad settings are refused before any compute (issue 7 §3)."""

import pytest
from omegaconf import OmegaConf

from contgen.callbacks.sample_grid import SampleGrid
from contgen.cli.build import batch_plan, world_size
from contgen.cli.evaluate import check_metrics
from contgen.cli.train import check_length_and_metrics
from contgen.samplers.masked import MaskedARSampler
from tests.modules.test_token_ar import make


@pytest.mark.parametrize("key,value", [("num_iter", 0), ("cfg", -1.0), ("temperature", -0.5)])
def test_sampler_settings(key, value):
    with pytest.raises(ValueError, match=f"sampler.{key} must be >= "):
        MaskedARSampler(**{key: value})


def test_num_iter_beyond_the_sequence_and_an_unknown_schedule_fail_when_the_module_is_built():
    with pytest.raises(ValueError, match=r"sampler.num_iter must be in \[1, 16\]"):
        make(sampler_num_iter=17)
    with pytest.raises(ValueError, match="optim.schedule must be 'constant', 'cosine' or 'inverse_sqrt', got 'cosin'"):
        make(optim={"schedule": "cosin"})


def test_sample_grid_settings():
    with pytest.raises(ValueError, match="callbacks.sample_grid"):
        SampleGrid(per_class=0)
    with pytest.raises(ValueError, match=r"callbacks.sample_grid.classes: \[12\] outside \[0, 12\)"):
        SampleGrid(classes=[12]).setup(None, make(), "fit")


def _cfg(**trainer):
    return OmegaConf.create({"trainer": {"max_steps": -1, "max_epochs": 6, "accumulate_grad_batches": 1, **trainer},
                             "evaluate_after_fit": True,
                             "metrics": {"num_samples": 240, "batch_size": 120, "inception_weights": None}})


def test_run_length(capsys):
    with pytest.raises(ValueError, match="nothing would be trained"):
        check_length_and_metrics(_cfg(max_steps=0), 100)
    check_length_and_metrics(_cfg(max_steps=20, max_epochs=1), 8)
    assert "trainer.max_steps=20 is not reached: trainer.max_epochs=1 ends training after 8 steps" in capsys.readouterr().out


def test_metrics_settings():
    with pytest.raises(ValueError, match="metrics.batch_size must be >= 1"):
        check_metrics(OmegaConf.create({"num_samples": 10, "batch_size": 0, "inception_weights": None}))
    with pytest.raises(FileNotFoundError, match="metrics.inception_weights: no file at /nope.pth"):
        check_metrics(OmegaConf.create({"num_samples": 10, "batch_size": 5, "inception_weights": "/nope.pth"}))


def test_an_image_that_does_not_decode_is_named(tmp_path):
    from PIL import Image

    from contgen.data.imagefolder import ImageFolder

    (tmp_path / "a").mkdir()
    Image.new("RGB", (20, 20), "red").save(tmp_path / "a" / "good.png")
    full = (tmp_path / "a" / "good.png").read_bytes()
    (tmp_path / "a" / "truncated.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "a" / "notes.jpg").write_text("not an image")
    data = ImageFolder(str(tmp_path), image_size=16)
    names = [p.name for p, _ in data.samples]
    with pytest.raises(ValueError, match=r"cannot decode .*notes.jpg.*skip_bad_images=true"):
        data[names.index("notes.jpg")]
    with pytest.raises(ValueError, match=r"cannot decode .*truncated.png"):
        data[names.index("truncated.png")]
    skipping = ImageFolder(str(tmp_path), image_size=16, skip_bad_images=True)
    assert all(skipping[i]["image"].shape == (3, 16, 16) for i in range(len(names)))


@pytest.mark.parametrize("content", [b"", b"garbage" * 10])
def test_an_empty_or_garbage_checkpoint_is_not_a_checkpoint(tmp_path, content):
    from contgen.cli.checkpoint_io import load_checkpoint

    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"not a checkpoint: {path}"):
        load_checkpoint(path)


def test_a_nan_in_the_data_is_blamed_on_the_data():
    import torch

    module = make()
    batch = {"image": torch.zeros(2, 3, 16, 16), "label": torch.tensor([0, 1])}
    batch["image"][1, 0, 3, 3] = float("nan")
    module.log = lambda *a, **k: None
    module.training_step(batch, 0)
    with pytest.raises(FloatingPointError, match="non-finite values in the training data"):
        module.check_finite()


def test_sample_settings_are_checked_before_loading():
    from contgen.cli.sample import sample

    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        sample(OmegaConf.create({"batch_size": 0, "per_class": 8, "seeds": [0], "ckpt": "/nope.ckpt"}))


def _plan(global_batch=None, batch=None, cap=None, devices=1, nodes=1, accumulate=1):
    return batch_plan(OmegaConf.create({"global_batch_size": global_batch, "batch_size": batch,
                                        "max_device_batch_size": cap}),
                      OmegaConf.create({"devices": devices, "num_nodes": nodes, "accumulate_grad_batches": accumulate,
                                        "accelerator": "cpu"}))


def test_global_batch_plan():
    """data.global_batch_size is what the optimizer sees on any device count: split over devices x nodes, the rest
    of a capped share accumulated; without it data.batch_size is per device, as before."""
    assert _plan(batch=64, accumulate=3) == (64, 3)
    assert _plan(2048, devices=8, nodes=4) == (64, 1)
    assert _plan(2048, cap=32, devices=8, nodes=4) == (32, 2)  # EAR: 32 per device x 32 GPUs x 2
    assert _plan(2048, cap=64, devices=4) == (64, 8) and _plan(2048, cap=100) == (64, 32)
    assert _plan(96, cap=40, devices=2) == (24, 2)  # the fewest micro-batches whose size divides the share
    with pytest.raises(ValueError, match=r"data.global_batch_size=100 does not split over 3 device\(s\)"):
        _plan(100, devices=3)
    with pytest.raises(ValueError, match="data.global_batch_size=64 and data.batch_size=32 are both set"):
        _plan(64, batch=32)
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches=2 with data.global_batch_size=64"):
        _plan(64, accumulate=2)
    with pytest.raises(ValueError, match="data.max_device_batch_size must be >= 1"):
        _plan(64, cap=0)
    assert world_size(OmegaConf.create({"devices": [0, 2], "num_nodes": 3, "accelerator": "gpu"})) == 6
