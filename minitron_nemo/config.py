"""The Hydra app of every recipe: composition, the command-line flags, ``--help`` and ``--cfg job``.

Recipes compose ``conf/<name>.yaml`` with Hydra's compose API and the command line's overrides
(``key=value``, ``+key=value``, ``group=option``, ``--config-name NAME``), merge the result onto the
recipe's structured schema (a job root of ``minitron_nemo/schemas.py``: a wrong type or a mistyped key is an
error) and run every group's range validator (``validate``). Every failure becomes a one-line ``UserError``.
``compose_job`` returns the validated typed job (built once, as Megatron-Core hands one ``TransformerConfig``
to every module) with the ``DictConfig`` it came from; ``compose`` only the latter.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig, dtype  # noqa: F401  (dtype: the recipes' `dtype` key)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


FLAGS_HELP = "--config-name NAME, --cfg job [--package KEY], --help, and key=value overrides"


def split_flags(argv) -> tuple[dict, list]:
    """``({"help": bool, "cfg": "job" | None, "package": KEY | None}, the other arguments)``."""
    flags, rest, i = {"help": False, "cfg": None, "package": None}, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--help", "-h"):
            flags["help"] = True
        elif a in ("--cfg", "-c", "--package", "-p") or a.startswith(("--cfg=", "--package=")):
            key = "cfg" if a.startswith(("--cfg", "-c")) else "package"
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise UserError(f"{a} needs a value; allowed: --cfg job, --package KEY")
            flags[key] = value
        else:
            rest.append(a)
        i += 1
    if flags["cfg"] not in (None, "job", "all"):
        raise UserError(f"--cfg {flags['cfg']}; allowed: --cfg job (the composed job config; 'all' is the same here)")
    if flags["package"] and not flags["cfg"]:
        raise UserError("--package needs --cfg job; allowed: --cfg job --package KEY")
    return flags, rest


def parse_argv(argv, default_name: str):
    name, overrides, i = default_name, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config-name", "-cn"):
            if i + 1 >= len(argv):
                raise UserError("--config-name needs a value; allowed: a config name under conf/")
            name, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config-name="):
            name = a.split("=", 1)[1]
        elif a.startswith("-"):
            raise UserError(f"unknown option {a!r}; allowed: {FLAGS_HELP}")
        else:
            overrides.append(a)
        i += 1
    return name, overrides


def _hydra_compose(name: str, overrides: list) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name=name, overrides=overrides)


def all_keys(cfg, prefix="") -> list:
    """Every dotted key of a config (for suggestions)."""
    out = []
    for k in cfg:
        v = cfg._get_node(k) if OmegaConf.is_config(cfg) else cfg[k]
        full = f"{prefix}{k}"
        out.append(full)
        if OmegaConf.is_dict(v):
            out += all_keys(v, full + ".")
    return out


def suggest(bad: str, keys) -> str:
    import difflib

    close = difflib.get_close_matches(bad, list(keys), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def compose_job(default_name: str, schema, argv=None) -> tuple[DictConfig, object]:
    """``(cfg, job)``: ``conf/<name>.yaml`` composed with the command-line overrides (``cfg``, a ``DictConfig``
    for Hydra-style access) and the typed ``schema`` object it validated to (``job``: pass it down).
    ``--help`` and ``--cfg job [--package KEY]`` print and exit 0, as Hydra apps do."""
    import re

    flags, argv = split_flags(sys.argv[1:] if argv is None else argv)
    name, overrides = parse_argv(argv, default_name)
    available = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
    if name not in available:
        raise UserError(f"--config-name {name!r} not found; allowed: {', '.join(available)}")
    if flags["help"]:
        print_help(name, _hydra_compose(name, []), available)
        sys.exit(0)
    try:
        cfg = _hydra_compose(name, overrides)
    except Exception as e:  # Hydra's own messages name the key and the problem
        msg = " ".join(str(e).split())
        m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
        hint = suggest(m.group(1), all_keys(_hydra_compose(name, []))) if m else ""
        raise UserError(f"config: {msg}{hint}") from None
    job = None
    if schema is not None:
        cfg = on_schema(cfg, schema)
        if not flags["cfg"]:
            job = typed(cfg)
    if flags["cfg"]:
        print_config(cfg, flags["package"])
        sys.exit(0)
    OmegaConf.set_struct(cfg, True)
    return cfg, job


def compose(default_name: str, argv=None, schema=None) -> DictConfig:
    """``compose_job``'s ``DictConfig`` alone (typed and validated by ``schema`` all the same)."""
    return compose_job(default_name, schema, argv)[0]


# ----------------------------------------------------------------------------- --help, --cfg job
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
            raise UserError(f"--package {package} is not a key of this config{suggest(package, all_keys(cfg))}")
    if not OmegaConf.is_config(node):
        print(f"{package}: {node}", flush=True)
        return
    try:
        text = OmegaConf.to_yaml(node, resolve=True)
    except Exception:  # an interpolation of a key left ??? : print it unresolved
        text = OmegaConf.to_yaml(node, resolve=False)
    print(text, end="", flush=True)


# ----------------------------------------------------------------------------- the typed job
KINDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def config_error(e) -> UserError:
    """One line naming the key, the bad value and what is allowed."""
    import re

    key = getattr(e, "full_key", None) or ""
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    if type(e).__name__ == "MissingMandatoryValue":
        return UserError(f"{key} is required; pass {key}=...")
    m = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", msg)
    if m:
        return UserError(f"{key}={m.group(1)!r}; allowed: {KINDS.get(m.group(2), m.group(2))}")
    if "is not a ListConfig" in msg:
        return UserError(f"{key} must be a list; allowed: a list such as {key}=[1,2]")
    if "is not a DictConfig" in msg or "is not a subclass" in msg:
        return UserError(f"{key} has the wrong type; allowed: a mapping of keys")
    m = re.match(r"Key '([^']+)' not in '\w+'", msg)
    if m and "." in key:  # name the group the user typed, not the schema class behind it
        msg = f"Key '{m.group(1)}' not in '{key.rsplit('.', 1)[0]}'"
    return UserError(f"config: {key}: {msg}" if key and key not in msg else f"config: {msg}")


def _schema_error(e, schema) -> UserError:
    """One line (``config_error``); a mistyped key gets the closest key of ``schema``."""
    err = config_error(e)
    if type(e).__name__ == "ConfigKeyError" and getattr(e, "full_key", None):
        err = UserError(f"{err}{suggest(e.full_key, all_keys(OmegaConf.structured(schema)))}")
    return err


def on_schema(cfg: DictConfig, schema) -> DictConfig:
    """``cfg`` merged onto the structured ``schema``: types converted, unknown keys refused."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as e:
        raise _schema_error(e, schema) from None


def typed(merged: DictConfig):
    """The schema object of ``merged`` (a config ``on_schema``): interpolations resolved, ``???`` keys found,
    and every group's ``check`` run (``validate``)."""
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _schema_error(e, OmegaConf.get_type(merged)) from None
    validate(obj)
    return obj


def validate(obj, at: str = "") -> None:
    """Call ``check(path)`` on ``obj`` and every nested schema object (depth first, parents last)."""
    if isinstance(obj, list):  # e.g. the stages of a chain
        for i, x in enumerate(obj):
            validate(x, f"{at}[{i}]")
        return
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        validate(getattr(obj, f.name), f"{at}.{f.name}" if at else f.name)
    if isinstance(obj, ModelConfig):
        obj.validate()
    elif hasattr(obj, "check"):
        obj.check(at)


def require(cfg: DictConfig, *keys: str) -> None:
    """One-line error for mandatory (``???``) keys left unset."""
    for k in keys:
        if OmegaConf.is_missing(cfg, k) or OmegaConf.select(cfg, k) is None:
            raise UserError(f"{k} is required; pass {k}=...")


def model_config(node) -> ModelConfig:
    """Validate a ``model`` config node against the ``ModelConfig`` schema."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
    except Exception as e:
        raise UserError(f"model config: {' '.join(str(e).split())}") from None
    return ModelConfig.from_dict(OmegaConf.to_container(merged, resolve=True))
