"""minitron_nemo: Minitron pruning and distillation on Megatron-Core."""

from minitron_nemo.console import quiet as _quiet
from minitron_nemo.eager_fusions import install as _eager_fusions_on_cpu

__version__ = "0.1.0"
_quiet()
_eager_fusions_on_cpu()
