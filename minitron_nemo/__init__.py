"""minitron_nemo: Minitron pruning and distillation on Megatron-Core."""

__version__ = "0.1.0"
