"""What `opdistill analyze` leaves in its output directory, each file replaced atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .report import render_report
from .updates import Analysis


def write_outputs(analysis: Analysis, out_dir: str | Path) -> dict[str, Path]:
    """DIR/summary.json, DIR/spectra.safetensors (σ of every 2-D ΔW) and DIR/report.html (self-contained)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "spectra": out / "spectra.safetensors", "report": out / "report.html"}
    _write_atomic(paths["summary"], json.dumps(analysis.summary, indent=1, default=_json_default).encode())
    if analysis.spectra:
        tmp = paths["spectra"].with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in analysis.spectra.items()}, str(tmp), metadata={"content": "singular values of ΔW, descending"})
        os.replace(tmp, paths["spectra"])
    _write_atomic(paths["report"], render_report(analysis.summary, analysis.spectra).encode())
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
