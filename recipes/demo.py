"""make demo: SmolLM2-135M teacher corrected on Shakespeare, width-pruned to ~half, distilled (2 CPU cores).

    make demo        (or: python recipes/demo.py [key=value ...], passed to both steps)

Runs ``recipes/correct_teacher.py`` then ``recipes/distill.py`` with ``conf/smollm2_demo.yaml``; the
second prints the held-out (test plays) perplexities of the teacher, the zero-shot pruned student and
the distilled student. Both steps resume where a previous run stopped (WORKDIR=runs/smollm2_demo); Ctrl-C
reaches the running step, which checkpoints and stops (``minitron_nemo/children.py``).
"""

import sys
import time
from pathlib import Path

from minitron_nemo import children
from minitron_nemo.entry import user_errors_exit

ROOT = Path(__file__).resolve().parents[1]


@user_errors_exit
def main():
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(__doc__.strip() + "\n\nOptions: any override of conf/smollm2_demo.yaml (python recipes/distill.py --help "
              "lists them); --cfg job prints the composed config.", flush=True)
        return
    if "--cfg" in sys.argv[1:]:
        sys.exit(children.run([sys.executable, str(ROOT / "recipes" / "distill.py"), "--config-name", "smollm2_demo",
                               *sys.argv[1:]], cwd=ROOT))
    t0 = time.time()
    for script in ("correct_teacher.py", "distill.py"):
        code = children.run([sys.executable, str(ROOT / "recipes" / script), "--config-name", "smollm2_demo",
                             *sys.argv[1:]], cwd=ROOT)
        if code != 0:
            sys.exit(code)
    print(f"[demo] done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
