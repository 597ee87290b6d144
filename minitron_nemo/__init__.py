"""minitron_nemo: Minitron pruning and distillation on Megatron-Core."""

from minitron_nemo.console import quiet as _quiet

__version__ = "0.1.0"
_quiet()
