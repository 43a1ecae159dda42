"""Masks of weight coordinates: the file format, and sparse-subnetwork training ("Dense Supervision,
Sparse Updates", arXiv 2606.13657).

A mask is a safetensors file of bool tensors named like the model's parameters (`opdistill analyze
--save-mask MASK` writes one: True where the tuned weight differs from the base). `train_mask: MASK` in
any method's config trains only the True coordinates; `train_mask: random:<density>` trains a random
subset of that density (the control of the sparse-subnetwork claim).

Only masked coordinates get gradient (the gradient is zeroed elsewhere by a hook, before accumulation and
clipping), so AdamW's moments stay exactly 0 there and the update there is exactly 0: unmasked weights
stay bitwise unchanged. That holds for weight_decay 0 only (decoupled decay shrinks every coordinate),
so the config rejects train_mask together with weight_decay > 0.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import ConfigError, ModelError
from .seeds import mix_seed

RANDOM_PREFIX = "random:"


# ---------------------------------------------------------------- files


def fraction_mask(values: torch.Tensor, fraction: float, largest: bool) -> torch.Tensor:
    """A bool mask of exactly round(fraction·N) coordinates (at least 1): the largest or smallest values.
    Ties at the cut are broken by position, so a quantised base with many equal weights still gets a mask
    of the asked size (a plain `values <= t` would take every tied weight)."""
    flat = values.reshape(-1)
    n = flat.numel()
    k = min(n, max(1, round(fraction * n)))
    order_value = -flat if largest else flat
    threshold = order_value.kthvalue(k).values
    mask = order_value < threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = (order_value == threshold).nonzero().reshape(-1)[:need]
        mask[ties] = True
    return mask.reshape(values.shape)


class MaskWriter:
    """Write a bool safetensors file one tensor at a time, so a mask of a model larger than memory never
    has to exist whole. The header (names, shapes, offsets) is known up front from the checkpoints'
    headers; tensors must then arrive in that order. Written to a temp file and renamed on close()."""

    def __init__(self, path: str | Path, entries: Iterable[tuple[str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.entries = [(name, tuple(int(d) for d in shape)) for name, shape in entries]
        header: dict[str, Any] = {}
        offset = 0
        for name, shape in self.entries:
            size = _numel(shape)
            header[name] = {"dtype": "BOOL", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header with spaces to 8-byte alignment
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._handle: Any = open(self._tmp, "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0
        self._closed = False

    def write(self, name: str, mask: torch.Tensor) -> None:
        expected_name, expected_shape = self.entries[self._next]
        if name != expected_name or tuple(mask.shape) != expected_shape:
            raise ValueError(f"mask writer expected {expected_name} {list(expected_shape)}, got {name} {list(mask.shape)}")
        self._handle.write(mask.to("cpu", torch.bool).contiguous().numpy().tobytes())
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self.entries):
            raise ValueError(f"mask writer got {self._next} of {len(self.entries)} tensors")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop an unfinished file (no-op after close())."""
        if not self._closed:
            self._handle.close()
            self._tmp.unlink(missing_ok=True)
            self._closed = True


def _numel(shape: Iterable[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def save_mask(masks: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write bool masks (name -> tensor) as safetensors."""
    writer = MaskWriter(path, [(name, tuple(mask.shape)) for name, mask in masks.items()], metadata)
    try:
        for name, mask in masks.items():
            writer.write(name, mask)
        return writer.close()
    finally:
        writer.abort()


def load_mask(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a mask file; every tensor must be bool."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"mask file {path} does not exist", "write one with `opdistill analyze BASE TUNED --out DIR --save-mask MASK`")
    masks: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if tensor.dtype != torch.bool:
                    raise ConfigError(f"{path}: tensor {name} is {tensor.dtype}, not bool",
                                      "a train_mask file holds bool tensors (opdistill analyze --save-mask writes one)")
                masks[name] = tensor
    except ConfigError:
        raise
    except Exception as err:  # a corrupt or non-safetensors file
        raise ConfigError(f"{path} is not a readable safetensors mask: {err}", "pass a file written by opdistill analyze --save-mask") from None
    return masks


def mask_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Share of True coordinates over all masks."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class MaskSpec:
    """A parsed train_mask value: a file, or a random mask of a density."""

    path: Path | None = None
    density: float | None = None


def parse_mask_spec(spec: str) -> MaskSpec:
    """'random:0.05' or a path to a .safetensors mask; errors name the config field and the fix."""
    text = spec.strip()
    if text.startswith(RANDOM_PREFIX):
        raw = text[len(RANDOM_PREFIX):]
        try:
            density = float(raw)
        except ValueError:
            raise ConfigError(f"config field `train_mask`: {raw!r} is not a number", "write train_mask: random:0.05 (a density in (0, 1])") from None
        if not 0 < density <= 1:
            raise ConfigError(f"config field `train_mask`: density {density} is outside (0, 1]", "write train_mask: random:0.05")
        return MaskSpec(density=density)
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"config field `train_mask`: mask file {path} does not exist",
                          "write one with `opdistill analyze BASE TUNED --out DIR --save-mask MASK`, or use random:<density>")
    return MaskSpec(path=path)


def random_masks(shapes: Mapping[str, tuple[int, ...]], density: float, seed: int) -> dict[str, torch.Tensor]:
    """Per tensor, exactly round(density·N) coordinates (at least one), uniformly at random. Each tensor's
    draw is seeded by (seed, its name), so the mask does not depend on the order the names come in."""
    masks = {}
    for name, shape in shapes.items():
        generator = torch.Generator().manual_seed(mix_seed(seed, zlib.crc32(name.encode())))
        scores = torch.rand(tuple(shape), generator=generator)
        masks[name] = fraction_mask(scores, density, largest=False)
    return masks


def build_masks(spec: str, shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """The masks a train_mask value stands for, for parameters of these shapes."""
    parsed = parse_mask_spec(spec)
    if parsed.density is not None:
        return random_masks(shapes, parsed.density, seed)
    assert parsed.path is not None
    return load_mask(parsed.path)


# ---------------------------------------------------------------- training


class _GradMask:
    """Tensor hook: zero the gradient outside the mask (masked_fill, so a NaN there is dropped too).
    Keeps a copy of the mask on the gradient's device (accelerate moves the model after we hook it)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.frozen = ~mask

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.frozen.device != grad.device:
            self.frozen = self.frozen.to(grad.device)
        return grad.masked_fill(self.frozen, 0.0)


@dataclass
class MaskStats:
    trainable: int = 0
    total: int = 0
    frozen_tensors: list[str] = field(default_factory=list)  # parameters with no masked coordinate
    ignored: list[str] = field(default_factory=list)  # mask tensors that name no parameter

    @property
    def density(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def apply_gradient_mask(model: Any, masks: Mapping[str, torch.Tensor]) -> MaskStats:
    """Train only masked coordinates. Parameters absent from the masks or with no True coordinate are
    frozen (requires_grad False, so the optimizer never holds them); the rest get a gradient hook.
    Tied weights (lm_head = embeddings) are one parameter: masks under either name are OR-ed."""
    aliases = dict(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): name for name, p in model.named_parameters()}
    combined: dict[str, torch.Tensor] = {}
    stats = MaskStats()
    for name, mask in masks.items():
        param = aliases.get(name)
        if param is None:
            stats.ignored.append(name)
            continue
        if tuple(mask.shape) != tuple(param.shape):
            raise ModelError(f"train_mask tensor {name} has shape {list(mask.shape)} but the student's parameter is {list(param.shape)}",
                             "use a mask saved from checkpoints of the student's architecture")
        key = canonical[id(param)]
        combined[key] = combined[key] | mask.bool() if key in combined else mask.bool()
    if not combined:
        raise ModelError(f"no train_mask tensor names a student parameter (mask has e.g. {list(masks)[:2]}, the student e.g. {list(canonical.values())[:2]})",
                         "use a mask saved from checkpoints of the student's architecture (opdistill analyze BASE TUNED --save-mask MASK)")
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        stats.total += param.numel()
        mask = combined.get(name)
        count = int(mask.sum()) if mask is not None else 0
        stats.trainable += count
        if count == 0:
            param.requires_grad_(False)
            stats.frozen_tensors.append(name)
        elif count < param.numel():
            param.register_hook(_GradMask(mask.to(param.device)))
    return stats


def apply_train_mask(model: Any, spec: str, seed: int) -> MaskStats:
    """Resolve a train_mask value for this model's parameters and apply it; says what it did on stderr."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    stats = apply_gradient_mask(model, build_masks(spec, shapes, seed))
    frozen = f"; {len(stats.frozen_tensors)} tensor(s) frozen whole" if stats.frozen_tensors else ""
    ignored = f"; {len(stats.ignored)} mask tensor(s) name no parameter: {', '.join(stats.ignored[:3])}" if stats.ignored else ""
    print(f"train_mask {spec}: training {stats.trainable:,} of {stats.total:,} coordinates ({100 * stats.density:.3f}%){frozen}{ignored}",
          file=sys.stderr)
    return stats
