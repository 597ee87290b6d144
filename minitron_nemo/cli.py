"""What the recipes print for ``--help`` and ``--cfg job``, and ``python -m minitron_nemo`` (the recipe list)."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from minitron_nemo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def _choices(name: str) -> dict:
    """The option each config group got in ``conf/<name>.yaml`` (Hydra's runtime choices)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name=name, overrides=[], return_hydra_config=True)
    return {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra") and v is not None}


def print_help(name: str, cfg, configs: list) -> None:
    script = Path(sys.argv[0]).name
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    lines = [doc, "", f"Config: conf/{name}.yaml (--config-name NAME picks another: {', '.join(configs)})", ""]
    groups = {k: v for k, v in _choices(name).items() if (CONF_DIR / k).is_dir()}
    if groups:
        lines.append("Groups (group=option), current choice first:")
        for g, chosen in groups.items():
            others = sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml") if p.stem != chosen)
            lines.append(f"  {g}: {chosen}" + (f" (also: {', '.join(others)})" if others else ""))
        lines.append("")
    lines.append("Main keys (key=value; `--cfg job` prints every key, resolved):")
    for k in cfg:
        node = cfg._get_node(k)
        if not OmegaConf.is_config(node):
            lines.append(f"  {k}={node._value()}")
        elif k not in groups:
            lines.append(f"  {k}.*  ({', '.join(str(x) for x in list(node)[:6])}{', ...' if len(node) > 6 else ''})")
    path = Path(sys.argv[0]).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else script
    lines += ["", "Options: --config-name NAME, --cfg job [--package KEY] (print the composed config and exit), --help",
              f"Example: python {shown} --config-name {name} --cfg job --package {next(iter(groups), 'parallel')}"]
    print("\n".join(lines), flush=True)


def print_config(cfg, package: str | None) -> None:
    node = cfg
    if package:
        node = OmegaConf.select(cfg, package, default=None)
        if node is None:
            from minitron_nemo.config import all_keys, suggest

            raise UserError(f"--package {package} is not a key of this config{suggest(package, all_keys(cfg))}")
    if not OmegaConf.is_config(node):
        print(f"{package}: {node}", flush=True)
        return
    try:
        text = OmegaConf.to_yaml(node, resolve=True)
    except Exception:  # an interpolation of a key left ??? : print it unresolved
        text = OmegaConf.to_yaml(node, resolve=False)
    print(text, end="", flush=True)


def recipes() -> dict:
    """``{name: first line of its docstring}`` for every recipe script."""
    import ast

    out = {}
    for p in sorted((ROOT / "recipes").glob("*.py")) + [ROOT / "launchers" / "submit.py"]:
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        out[str(p.relative_to(ROOT))] = doc.splitlines()[0] if doc else ""
    return out


def main(argv=None) -> int:
    """``python -m minitron_nemo [--help]`` lists the recipes; ``python -m minitron_nemo RECIPE ARGS``
    runs one (``RECIPE`` = a script name such as ``distill``)."""
    import runpy

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
