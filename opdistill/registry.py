"""The one table of training methods. The config classes, the method classes and the CLI's choices all come
from it.

Adding a method: write `opdistill/methods/NAME.py` with its config dataclass (a `RunConfig` subclass whose
`method` default is NAME) and its `Method` subclass, then add one line to METHODS below
(docs/contributing.md has a worked example). Entries name their module instead of importing it, so listing
the methods (the CLI's --method choices, `--help`) costs no torch import, and this module imports nothing
from the methods: the dependency points one way, method files -> config.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MethodEntry:
    module: str  # where the two classes live
    config_class: str
    method_class: str
    summary: str  # one line for --help

    def config(self) -> Any:
        """The method's config dataclass."""
        return getattr(importlib.import_module(self.module), self.config_class)

    def method(self) -> Any:
        """The method's class: Method(config, tokenizer) reads the data; the engine runs it."""
        return getattr(importlib.import_module(self.module), self.method_class)


METHODS: dict[str, MethodEntry] = {
    "seqkd": MethodEntry("opdistill.methods.seqkd", "SeqKDConfig", "SeqKD", "supervised distillation on teacher text"),
    "gad": MethodEntry("opdistill.methods.gad", "GADConfig", "GAD", "black-box: a discriminator's reward, GRPO on student samples"),
    "opd": MethodEntry("opdistill.methods.opd", "OPDConfig", "OPD", "white-box: token-level divergence to a teacher on student samples"),
    "cod": MethodEntry("opdistill.methods.cod", "CoDConfig", "CoD", "two peers tutor each other on-policy, each on its own domain"),
    "kd": MethodEntry("opdistill.methods.kd", "KDConfig", "KD", "off-policy KD on the data's text (chat or plain), LM and KD losses mixed"),
    "spd": MethodEntry("opdistill.methods.spd", "SPDConfig", "SPD", "self-distillation on own samples with K/V projected into a capability subspace"),
}
