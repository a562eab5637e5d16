"""mgrpo_pl: MGRPO (Multi-layer GRPO) self-correction training on PyTorch Lightning."""

__version__ = "0.1.0"
