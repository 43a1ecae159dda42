"""docs/contributing.md's worked example works as written: its method file plus one registry line train a student."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

from opdistill.config import config_help, load_config
from opdistill.methods import train
from opdistill.registry import METHODS, MethodEntry

DOC = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"


def test_the_worked_example_method_trains_from_its_file_and_one_registry_line(tiny_model, selfinstruct, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    module_code, registry_line = blocks[0], blocks[1].strip()
    path = tmp_path / "seqkd_ls.py"
    path.write_text(module_code)
    # Import the file as opdistill.methods.seqkd_ls, as if it had been added to the package.
    spec = importlib.util.spec_from_file_location("opdistill.methods.seqkd_ls", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "opdistill.methods.seqkd_ls", module)
    spec.loader.exec_module(module)
    name, entry = eval("{" + registry_line.rstrip(",") + "}", {"MethodEntry": MethodEntry}).popitem()
    monkeypatch.setitem(METHODS, name, entry)

    assert "smoothing (float, default 0.1)" in config_help(name)
    out = tmp_path / "run"
    summary = train(load_config(None, [f"method={name}", f"student={tiny_model}", f"data={selfinstruct}[:16]", f"out_dir={out}",
                                       f"eval_data={selfinstruct}[200:208]", "max_steps=3", "batch_size=4", "micro_batch_size=2",
                                       "max_response_tokens=16", "lr=1e-3", "smoothing=0.2", "precision=fp32"]))
    assert summary["steps"] == 3 and summary["final_eval"]["nll"] < summary["initial_eval"]["nll"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
