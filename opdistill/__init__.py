"""opdistill: on-policy distillation of large language models."""

__version__ = "0.1.0"
