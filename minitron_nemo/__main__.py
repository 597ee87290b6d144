"""``python -m minitron_nemo``: the list of recipes, or ``python -m minitron_nemo RECIPE ARGS`` to run one."""

import ast
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipes() -> dict:
    """``{name: first line of its docstring}`` for every recipe script."""
    out = {}
    for p in sorted((ROOT / "recipes").glob("*.py")) + [ROOT / "launchers" / "submit.py"]:
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        out[str(p.relative_to(ROOT))] = doc.splitlines()[0] if doc else ""
    return out


def main(argv=None) -> int:
    """``python -m minitron_nemo [--help]`` lists the recipes; ``python -m minitron_nemo RECIPE ARGS``
    runs one (``RECIPE`` = a script name such as ``distill``)."""
    argv = sys.argv[1:] if argv is None else argv
    table = recipes()
    if not argv or argv[0] in ("--help", "-h"):
        print("minitron_nemo: Minitron pruning and distillation on Megatron-Core.\n\n"
              "Recipes (python RECIPE --help for each; python -m minitron_nemo NAME ARGS runs one):")
        for path, line in table.items():
            print(f"  {path:<30} {line}")
        return 0
    names = {Path(p).stem: p for p in table}
    if argv[0] not in names:
        print(f"error: unknown recipe {argv[0]!r}; allowed: {', '.join(names)}", file=sys.stderr)
        return 2
    sys.argv = [str(ROOT / names[argv[0]]), *argv[1:]]
    sys.path.insert(0, str(ROOT))
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
