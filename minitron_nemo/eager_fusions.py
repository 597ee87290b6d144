"""CPU mode runs Megatron-Core's compiled fusions eagerly.

Megatron-Core decorates its fused element-wise functions (the MoE experts' SwiGLU with router
probabilities, squared ReLU, the GELU variants, the L2 norm, the output gate) with
``megatron.core.jit.jit_fuser``, which is ``torch.compile``. On a GPU that is what we want. On the CPU,
inductor generates and builds C++ for each new shape in each process (seconds each, and a C++ compiler on
the machine), and merely applying the decorator imports dynamo and inductor: about 1.3 s of every
process start, which every recipe, every rank and every test pays.

``install()`` (called once by ``minitron_nemo/__init__.py``; it imports nothing) adds an import hook.
When ``megatron.core.jit`` is first imported in a process that runs in CPU mode (``runtime.cpu_mode()``),
the hook calls Megatron's own ``disable_jit_fuser()`` right after that module runs, before any module
applies the decorator, so the fusions run as plain torch code. With a GPU nothing changes. A process that
imports Megatron-Core before this package keeps the compiled fusions (slower, same results within float
rounding).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

JIT_MODULE = "megatron.core.jit"


class _EagerOnCpu(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` through the other finders and wraps its loader (once)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != JIT_MODULE:
            return None
        sys.meta_path.remove(self)  # one wrap; the real finders find the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from minitron_nemo import runtime

            if runtime.cpu_mode() and hasattr(module, "disable_jit_fuser"):
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Add the hook unless ``megatron.core.jit`` is already imported (idempotent)."""
    if JIT_MODULE in sys.modules or any(isinstance(f, _EagerOnCpu) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _EagerOnCpu())


def fusions_are_eager() -> bool:
    """Whether this process's Megatron-Core applies its fusions eagerly (``jit_fuser`` is the no-op)."""
    jit = sys.modules.get(JIT_MODULE)
    return jit is not None and jit.jit_fuser is jit.noop_decorator
