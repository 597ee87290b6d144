"""Process start in CPU mode: the imports of a recipe with Megatron-Core's fusions applied eagerly (this project's
default in CPU mode, ``minitron_nemo/eager_fusions.py``) vs compiled (``torch.compile``, what Megatron-Core
applies when imported before this package). Each side is a fresh interpreter importing ``recipes/RECIPE.py``'s
modules; the two sides alternate round by round; median and spread.

    python bench/bench_process_start.py [--rounds 8] [--recipe distill] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchlib import fmt, summary, write_json

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys, time
t0 = time.perf_counter()
if sys.argv[1] == "compiled":
    import megatron.core  # before the package: its import hook does not apply
sys.argv = [sys.argv[2]]
sys.path.insert(0, "recipes")
source = open(sys.argv[0]).read().split("@user_errors_exit")[0]  # the recipe's imports and definitions
exec(compile(source, sys.argv[0], "exec"), {"__name__": "probe"})
from minitron_nemo.eager_fusions import fusions_are_eager
print(json.dumps({"seconds": time.perf_counter() - t0, "eager": fusions_are_eager(),
                  "inductor": "torch._inductor.compile_fx" in sys.modules}))
"""


def start(side: str, recipe: Path) -> dict:
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE, side, str(recipe)], capture_output=True,
                       text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                                 "MINITRON_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"}, check=True)
    return json.loads(p.stdout.splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--recipe", default="distill")
    ap.add_argument("--json")
    a = ap.parse_args()
    recipe = ROOT / "recipes" / f"{a.recipe}.py"
    per = {"eager": [], "compiled": []}
    start("eager", recipe)  # warm the file cache
    for r in range(a.rounds):
        for side in per:
            out = start(side, recipe)
            assert out["eager"] == (side == "eager"), out
            per[side].append(out["seconds"])
        print(f"[bench] round {r + 1}/{a.rounds}: " + "  ".join(f"{s} {per[s][-1]:.2f}s" for s in per), flush=True)
    ratio = summary(c / e for c, e in zip(per["compiled"], per["eager"]))
    result = {"recipe": a.recipe, "eager_s": summary(per["eager"]), "compiled_s": summary(per["compiled"]),
              "compiled_over_eager": ratio}
    print(f"imports of recipes/{a.recipe}.py: eager {fmt(result['eager_s'])} s, compiled {fmt(result['compiled_s'])} s;"
          f" compiled / eager {fmt(ratio)} (median [min, max] of {a.rounds} rounds)")
    write_json(a.json, result)


if __name__ == "__main__":
    main()
