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
            raise UserError(f"unknown option {a!r}; allowed: --config-name NAME and key=value overrides")
        else:
            overrides.append(a)
        i += 1
    return name, overrides


def compose(default_name: str, argv=None, schema=None) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with the command-line overrides; typed and validated by ``schema``."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    name, overrides = parse_argv(sys.argv[1:] if argv is None else argv, default_name)
    available = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
    if name not in available:
        raise UserError(f"--config-name {name!r} not found; allowed: {', '.join(available)}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name=name, overrides=overrides)
    except Exception as e:  # Hydra's own messages name the key and the problem
        msg = " ".join(str(e).split())
        raise UserError(f"config: {msg}") from None
    if schema is not None:
        cfg = typed(cfg, schema)
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


def typed(cfg: DictConfig, schema) -> DictConfig:
    """``cfg`` merged onto the structured ``schema`` (types converted, unknown keys refused), resolved,
    and checked by every group's validator (``schemas.validate``)."""
    from omegaconf.errors import OmegaConfBaseException

    from minitron_nemo import schemas

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        obj = OmegaConf.to_object(merged)  # resolves interpolations, converts types, finds ??? keys
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
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
