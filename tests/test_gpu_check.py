"""benchmarks/gpu_check.py cannot rot: its --dry-run runs every section on the CPU at tiny shapes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# Named here, not read from the script: a section dropped from the script fails this test.
SECTIONS = ["build_models", "cuda_checks", "opd/smollm2-135m", "trl/smollm2-135m", "gad/smollm2-135m", "fsdp/seqkd", "fsdp/opd",
            "opd/qwen2.5-0.5b", "trl/qwen2.5-0.5b", "gad/qwen2.5-0.5b"]
TIMED = [name for name in SECTIONS if name.split("/")[0] in ("opd", "trl", "gad")]


def run_script(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "tmp.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(out.read_text())


def test_dry_run_runs_every_section_ok(tmp_path):
    done, report = run_script(tmp_path, "--dry-run")
    sections = report["sections"]
    problems = {name: result for name, result in sections.items() if result["status"] != "ok"
                and not (name.startswith("trl/") and result["status"] == "not installed")}
    assert not problems, json.dumps(problems, indent=1)[-4000:]
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


def test_isolation_falls_back_to_spawn_when_forked_children_cannot_reach_cuda(tmp_path, monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check_sections

    # Told to expect CUDA on a machine without it, the probe child fails, which is what a fork server that had
    # initialised CUDA would cause on a GPU machine: the check must then give each section a fresh interpreter.
    chosen = gpu_check_sections.choose_isolation("auto", True, tmp_path / "probe.log")
    if torch.cuda.is_available():
        assert chosen.startswith("forkserver"), chosen
    else:
        assert chosen.startswith("spawn (a child of the fork server could not use CUDA"), chosen
        assert gpu_check_sections._context.get_start_method() == "spawn"
