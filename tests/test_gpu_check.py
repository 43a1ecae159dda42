"""benchmarks/gpu_check.py cannot rot: its --dry-run runs every section on the CPU at tiny shapes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from opdistill.objectives import divergences
from opdistill.objectives.divergences import KINDS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# Named here, not read from the script: a section dropped from the script fails this test.
SECTIONS = ["build_models", "cuda_checks", "opd/smollm2-135m", "trl/smollm2-135m", "gad/smollm2-135m", "vllm/smollm2-135m", "fsdp/seqkd", "fsdp/opd",
            "opd/qwen2.5-0.5b", "trl/qwen2.5-0.5b", "gad/qwen2.5-0.5b"]
TIMED = [name for name in SECTIONS if name.split("/")[0] in ("opd", "trl", "gad")]
# What divergence_check compares: every kind, plus the chunked paths of two of them.
DIVERGENCE_NAMES = [*KINDS, "rkl_chunked", "jsd_chunked"]


def run_script(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "tmp.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(out.read_text())


def test_dry_run_runs_every_section_ok(tmp_path):
    done, report = run_script(tmp_path, "--dry-run")
    sections = report["sections"]
    problems = {name: result for name, result in sections.items() if result["status"] != "ok"
                and not (name.startswith(("trl/", "vllm/")) and result["status"] == "not installed")}
    assert not problems, json.dumps(problems, indent=1)[-4000:]
    vllm = sections["vllm/smollm2-135m"]
    if importlib.util.find_spec("vllm") is None:
        assert vllm["note"] == "vllm: not installed"
    else:  # the sync is checked (the stale engine disagrees, the synced one agrees) and the OPD row is timed
        assert vllm["agreement_after_sync"]["mean"] < 1e-3 < vllm["agreement_after_step_unsynced"]["mean"], vllm
        assert vllm["step_s_median"] > 0, vllm
    assert list(sections) == SECTIONS
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["dry_run"] is True and report["machine"]["torch"] and report["machine"]["transformers"]

    trl_installed = importlib.util.find_spec("trl") is not None
    for name in TIMED:
        result = sections[name]
        if result["status"] == "not installed":
            assert not trl_installed and result["note"] == "trl: not installed"
            continue
        assert result["step_s_median"] > 0 and result["peak_mem_mb"] > 0 and len(result["step_seconds"]) >= 1, (name, result)

    checks = sections["cuda_checks"]
    assert set(checks["checks"]) == {"bf16_forward_backward", "hf_sampler", "divergences_vs_cpu"}
    assert all(check["status"] == "ok" for check in checks["checks"].values())
    # A dry run compares the CPU with itself, so every kind must agree exactly; that the comparison catches a
    # device that differs is test_divergence_check_fails_where_the_device_differs_from_the_cpu's job.
    compared = checks["checks"]["divergences_vs_cpu"]
    assert compared["device"] == "cpu"
    assert compared["max_abs_difference"] == {name: 0.0 for name in DIVERGENCE_NAMES}
    assert checks["cuda_tests"]["status"] in ("none", "ok")  # none today: the JSON says so
    for name in ("fsdp/seqkd", "fsdp/opd"):
        assert sections[name]["steps"] >= 1 and sections[name]["student_saved"], sections[name]
        assert sections[name]["accelerate_use_fsdp"] == "true", "the launch must carry the FSDP config"
    assert "| opd/smollm2-135m | ok |" in done.stdout


def test_budget_skips_the_remaining_sections(tmp_path):
    done, report = run_script(tmp_path, "--dry-run", "--budget-s", "0", timeout=300)
    assert done.returncode == 0
    assert {result["status"] for result in report["sections"].values()} == {"skipped: budget"}
    assert list(report["sections"]) == SECTIONS


def test_cuda_tests_are_found_by_marker_or_skip():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.CUDA_TEST.search("import torch\n\n@pytest.mark.cuda\ndef test_x(): ...")
    assert gpu_check.CUDA_TEST.search("    @pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')\n")
    assert gpu_check.CUDA_TEST.search("pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='GPU')\n")
    assert not gpu_check.CUDA_TEST.search("def test_vllm_engine_fails_with_a_clear_error_without_vllm_or_cuda(): ...")
    assert not gpu_check.CUDA_TEST.search('    x = "@pytest.mark.cuda"\n')
    assert gpu_check.find_cuda_tests(ROOT / "tests") == [], "none today; the check says so in its JSON"


def sections_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check_sections

    return gpu_check_sections


def test_divergence_check_fails_where_the_device_differs_from_the_cpu(monkeypatch):
    """The comparison itself, on a CPU machine too: the second per_token call of each pair is the device's, and
    it is made to differ (only in the values, then only in the gradients) or to agree within the tolerance."""
    gpu_check_sections = sections_module(monkeypatch)
    real = divergences.per_token

    def run(shift: float, in_gradient: bool) -> dict[str, Any]:
        calls: list[str] = []

        def per_token(student: torch.Tensor, teacher: torch.Tensor, kind: str, **kwargs: Any) -> torch.Tensor:
            value = real(student, teacher, kind, **kwargs)
            calls.append(kind)
            if len(calls) % 2 == 1:  # the CPU's own reference
                return value
            # student - student.detach() is 0 but has gradient 1: the values stay, the gradients move by `shift`
            return value + shift * (student - student.detach()).sum(-1) if in_gradient else value + shift

        monkeypatch.setattr(divergences, "per_token", per_token)  # divergence_check imports it when it runs
        try:
            return gpu_check_sections.divergence_check(torch.device("cpu"), vocab=16, rows=4)
        finally:
            assert len(calls) == 2 * len(DIVERGENCE_NAMES)  # each kind once on the CPU, once on the "device"

    for in_gradient in (False, True):
        with pytest.raises(AssertionError, match="cpu differs from the CPU for") as failed:
            run(1e-3, in_gradient)
        assert str(DIVERGENCE_NAMES) in str(failed.value), failed.value  # every kind is named
    # Inside the tolerance (atol 1e-5): ok, and the difference reported is the one injected. 2^-20 is added exactly
    # to float32 values under 8 in magnitude, as this check's seeded values are, so no rounding blurs it.
    close = run(2.0 ** -20, False)
    assert close["device"] == "cpu" and list(close["max_abs_difference"]) == DIVERGENCE_NAMES
    assert all(value == pytest.approx(2.0 ** -20, rel=1e-6) for value in close["max_abs_difference"].values()), close


def test_isolation_falls_back_to_spawn_when_forked_children_cannot_reach_cuda(tmp_path, monkeypatch):
    import multiprocessing.forkserver

    gpu_check_sections = sections_module(monkeypatch)
    server = multiprocessing.forkserver._forkserver  # the process's one fork server

    # Told to expect CUDA while the fork server's children cannot reach it (what a server that had initialised
    # CUDA would cause), the check must give each section a fresh interpreter. CUDA is hidden from the server so
    # that this holds on a GPU machine as on a CPU one; a running server would not see the variable, so none runs
    # before, and none with CUDA hidden is left behind (_stop is the method CPython's own tests use).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    server._stop()
    try:
        chosen = gpu_check_sections.choose_isolation("auto", True, tmp_path / "probe.log")
    finally:
        server._stop()
    reason = "spawn (a child of the fork server could not use CUDA: "
    assert chosen.startswith(reason) and len(chosen) > len(reason) + 1, chosen  # the probe's error is quoted
    assert gpu_check_sections._context.get_start_method() == "spawn"
    assert (tmp_path / "probe.result.json").is_file()  # the probe really ran in a child

    # The other branches, with the probe's result injected: no probe without CUDA, the fork server when it works.
    probes: list[dict[str, Any]] = []

    def probe(target: Any, params: dict, timeout_s: float, log: Path) -> dict[str, Any]:
        probes.append(params)
        return {"status": "ok"}

    monkeypatch.setattr(gpu_check_sections, "run_isolated", probe)
    assert gpu_check_sections.choose_isolation("auto", False, tmp_path / "probe.log") == "forkserver" and probes == []
    assert gpu_check_sections.choose_isolation("auto", True, tmp_path / "probe.log") == "forkserver (a forked child reached CUDA)"
    assert gpu_check_sections._context.get_start_method() == "forkserver" and len(probes) == 1
    assert gpu_check_sections.choose_isolation("spawn", True, tmp_path / "probe.log") == "spawn" and len(probes) == 1
    assert gpu_check_sections._context.get_start_method() == "spawn"
