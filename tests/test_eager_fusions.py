"""CPU mode applies Megatron-Core's fusions eagerly (minitron_nemo/eager_fusions.py); with a GPU it keeps them
compiled. Each case runs in a fresh interpreter, since the choice is made when Megatron-Core is imported."""

import json
import subprocess
import sys

from conftest import ROOT

PROBE = """
import json, sys
import minitron_nemo
from minitron_nemo import runtime
if sys.argv[1] == 'gpu':
    runtime._CPU_MODE = False  # what runtime.cpu_mode() decides on a machine with a GPU
import megatron.core.jit as jit
import megatron.core.transformer.moe.experts, megatron.core.activations as act
from minitron_nemo.eager_fusions import fusions_are_eager
print(json.dumps({"eager": fusions_are_eager(), "compiled": jit.jit_fuser is __import__('torch').compile,
                  "squared_relu_is_plain": not hasattr(act.squared_relu, "_torchdynamo_orig_callable")}))
"""


def probe(mode: str) -> dict:
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MINITRON_FORCE_CPU": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.splitlines()[-1])


def test_cpu_mode_runs_the_fusions_eagerly():
    assert probe("cpu") == {"eager": True, "compiled": False, "squared_relu_is_plain": True}


def test_with_a_gpu_the_fusions_stay_compiled():
    out = probe("gpu")
    assert out["eager"] is False and out["compiled"] is True and out["squared_relu_is_plain"] is False, out
