"""Hydra config composition for the recipes.

Recipes compose ``conf/<name>.yaml`` with Hydra's compose API and the command line's overrides
(``key=value``, ``+key=value``, ``group=option``, ``--config-name NAME``), merge the result onto the
recipe's structured schema (``minitron_nemo/schemas.py``: a wrong type or a mistyped key is an error)
and run every group's range validator. Every failure becomes a one-line ``UserError``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def compose(default_name: str, argv=None, schema=None) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with the command-line overrides; typed and validated by ``schema``.
    ``--help`` and ``--cfg job [--package KEY]`` print and exit 0, as Hydra apps do."""
    import re

    flags, argv = split_flags(sys.argv[1:] if argv is None else argv)
    name, overrides = parse_argv(argv, default_name)
    available = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
    if name not in available:
        raise UserError(f"--config-name {name!r} not found; allowed: {', '.join(available)}")
    if flags["help"]:
        from minitron_nemo.cli import print_help

        print_help(name, _hydra_compose(name, []), available)
        sys.exit(0)
    try:
        cfg = _hydra_compose(name, overrides)
    except Exception as e:  # Hydra's own messages name the key and the problem
        msg = " ".join(str(e).split())
        m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
        hint = suggest(m.group(1), all_keys(_hydra_compose(name, []))) if m else ""
        raise UserError(f"config: {msg}{hint}") from None
    if schema is not None:
        cfg = typed(cfg, schema, check=not flags["cfg"])
    if flags["cfg"]:
        from minitron_nemo.cli import print_config

        print_config(cfg, flags["package"])
        sys.exit(0)
    OmegaConf.set_struct(cfg, True)
    return cfg


KINDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _omegaconf_error(e) -> UserError:
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
    return UserError(f"config: {key}: {msg}" if key and key not in msg else f"config: {msg}")


def typed(cfg: DictConfig, schema, check: bool = True) -> DictConfig:
    """``cfg`` merged onto the structured ``schema`` (types converted, unknown keys refused), resolved,
    and (``check``) checked by every group's validator (``schemas.validate``)."""
    from omegaconf.errors import OmegaConfBaseException

    from minitron_nemo import schemas

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        if not check:
            return merged
        obj = OmegaConf.to_object(merged)  # resolves interpolations, converts types, finds ??? keys
    except OmegaConfBaseException as e:
        err = _omegaconf_error(e)
        if type(e).__name__ == "ConfigKeyError" and getattr(e, "full_key", None):
            err = UserError(f"{err}{suggest(e.full_key, all_keys(OmegaConf.structured(schema)))}")
        raise err from None
    schemas.validate(obj)
    return merged


def require(cfg: DictConfig, *keys: str) -> None:
    """One-line error for mandatory (``???``) keys left unset."""
    for k in keys:
        if OmegaConf.is_missing(cfg, k) or OmegaConf.select(cfg, k) is None:
            raise UserError(f"{k} is required; pass {k}=...")


def dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"dtype={name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def model_config(node) -> ModelConfig:
    """Validate a ``model`` config node against the ``ModelConfig`` schema."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
    except Exception as e:
        raise UserError(f"model config: {' '.join(str(e).split())}") from None
    return ModelConfig.from_dict(OmegaConf.to_container(merged, resolve=True))
