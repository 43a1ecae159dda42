"""GAD's discriminator (Ye et al., "Black-Box On-Policy Distillation of Large Language Models",
arXiv 2511.10643): a causal-LM backbone with a scalar head, scoring (prompt, response)
at the last non-padding token of the response.

Initialised from the student checkpoint by default (any causal LM works). Position ids are derived from
the attention mask, so a left-padded and a right-padded batch give the same scores. It has its own
weights, optimizer and checkpoint: `save` writes `discriminator.safetensors` plus the backbone config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, ModelError
from .models import merged_copy, replace_dir_atomic, resolve_model
from .logprobs import positions_from_mask

WEIGHTS = "discriminator.safetensors"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with attention_mask = 1 in each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


class Discriminator(nn.Module):
    """D_φ(x, y) -> a scalar per sequence."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        # A zero head starts every score at 0, so the first BT loss is log 2 whatever the backbone.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> Any:
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions_from_mask(attention_mask), use_cache=False)
        hidden = out.last_hidden_state
        last = last_token_index(attention_mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(picked.float()).squeeze(-1)

    def save(self, out_dir: str | Path) -> Path:
        """Weights (a LoRA backbone merged, in a copy) and the backbone config, swapped in atomically."""
        backbone = merged_copy(self.backbone)
        state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})

        def write(tmp: Path) -> None:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS))
            (tmp / "config.json").write_text(json.dumps(backbone.config.to_dict(), indent=2))

        return replace_dir_atomic(out_dir, write)


def keep_first_layers(backbone: nn.Module, layers: int) -> nn.Module:
    """Cut a decoder backbone to its first `layers` blocks (its config says so too, so a saved copy reloads)."""
    blocks = getattr(backbone, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ModelError(f"cannot shorten a {type(backbone).__name__} backbone: it has no `layers` list",
                         "set discriminator_layers: 0 to keep the whole backbone")
    if layers > len(blocks):
        raise ModelError(f"discriminator_layers is {layers} but the backbone has {len(blocks)} layers",
                         f"use a value from 1 to {len(blocks)}, or 0 for all")
    backbone.layers = blocks[:layers]
    config = backbone.config
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    return backbone


def load_discriminator(source: str, *, layers: int = 0, trust_remote_code: bool = False) -> Discriminator:
    """A discriminator from a saved discriminator dir, or a fresh one on the backbone of any causal LM
    (its first `layers` blocks when layers > 0)."""
    from transformers import AutoConfig, AutoModel

    path = Path(source)
    if (path / WEIGHTS).is_file():
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        model = Discriminator(AutoModel.from_config(config, trust_remote_code=trust_remote_code))
        try:
            model.load_state_dict(load_file(str(path / WEIGHTS)))
        except (RuntimeError, SafetensorError) as err:
            raise CheckpointError(f"{path / WEIGHTS} does not match its config: {str(err).splitlines()[0]}") from None
        return model
    try:
        backbone = AutoModel.from_pretrained(resolve_model(source), trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelError(f"cannot load a discriminator backbone from {source!r}: {str(err).splitlines()[0]}",
                         "pass a causal LM checkpoint (default: the student) or a saved discriminator directory") from None
    return Discriminator(keep_first_layers(backbone, layers) if layers else backbone)
