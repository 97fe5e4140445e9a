"""bench/scale.py's training path (issues 10 and 13) on the CPU with tiny models: the composed recipe, the batch plan
and random cached moments shaped by the recipe's tokenizer (KL-16 for MAR, SD-VAE for UCGM's TiT) train under
Lightning's DDP strategy on one process, and the JSON line carries what the scaling tables read. Slow: each run
builds its recipe's 256-px tokenizer (random weights) in a fresh process."""

import json
import math

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("model", "override", "net"), [("mar_base", "model=mar_tiny", "MARBackbone"),
                                                         ("ucgm_multistep", "model=tit_tiny", "TiT")])
def test_tiny_training_run_on_the_cpu(model, override, net, tmp_path):
    out = tmp_path / "scale.jsonl"
    run_script("bench/scale.py", "train", "--accelerator", "cpu", "--model", model, "--override", override,
               "--global-batch", "4", "--warmup", "1", "--steps", "2", "--workers", "0", "--out", str(out))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["net"] == net and row["overrides"] == [override] and row["gpu"] == "cpu"
    assert (row["devices"], row["global_batch"], row["device_batch"], row["accumulate"]) == (1, 4, 4, 1)
    assert len(row["losses"]) == 3 and all(math.isfinite(x) for x in row["losses"]) and row["img_per_s"] > 0
