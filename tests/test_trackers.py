"""Experiment trackers (report_to): a real TensorBoard run whose event files are read back, and clear errors
for trackers whose package is missing."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from opdistill.config import load_config
from opdistill.errors import ConfigError
from opdistill.methods import train

from test_engine import seqkd_overrides


def test_tensorboard_gets_every_metric_per_step_and_the_config_as_hyperparameters(tiny_model, selfinstruct, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    config = load_config(None, seqkd_overrides(tiny_model, selfinstruct, out, max_steps=3, batch_size=4, micro_batch_size=4,
                                               checkpoint_every=0, eval_data=f"{selfinstruct}[48:56]", report_to="tensorboard"))
    assert config.report_to == ["tensorboard"]
    train(config)
    runs = [path.parent for path in (out / "trackers").rglob("events.out.tfevents.*")]
    assert runs, "no TensorBoard event file was written"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for run in set(runs):
        events = EventAccumulator(str(run))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [step for step, _ in sorted(scalars["loss"])] == [line["step"] for line in steps] == [1, 2, 3]
    for (step, value), line in zip(sorted(scalars["loss"]), steps):
        assert value == pytest.approx(line["loss"], rel=1e-6)
    for name in ("lr", "grad_norm", "tokens", "step_seconds", "eval/nll"):
        assert name in scalars, f"{name} missing from TensorBoard (has {sorted(scalars)})"
    hparams = [yaml.safe_load(path.read_text()) for path in (out / "trackers").rglob("hparams.yml")]
    assert hparams and hparams[0]["lr"] == 1e-3 and hparams[0]["method"] == "seqkd" and hparams[0]["report_to"] == "tensorboard"


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_whose_package_is_missing_is_a_config_error(tracker):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(ConfigError, match=f"needs the {tracker} package") as info:
        load_config(None, ["data=d.jsonl", f"report_to=[tensorboard, {tracker}]"])
    assert f"pip install {tracker}" in info.value.fix


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, ["data=d.jsonl", "report_to=comet"])
