"""Which keys a command's config may hold: those its schema dataclasses declare.

Hydra checks an override against the schema (`lattent_dim=20` fails), but lets `+key=` and `++key=` add keys and
`~key` delete them: a typo would then be ignored, and a deleted setting read anyway. Every command refuses both
(vae.common.errors.entry_point, vae.settings.config.validate_ranges). This module imports nothing of ours, so both can use it.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf


def unknown_settings(cfg: DictConfig, prefix: str = "") -> Tuple[List[str], List[str]]:
    """(keys that no schema declares, keys a schema declares that are gone), as dotted paths, in every part of `cfg`
    that Hydra built on a schema dataclass. Hydra's own `hydra` node is not a setting of ours."""
    schema = OmegaConf.get_type(cfg)
    unknown: List[str] = []
    missing: List[str] = []
    names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        if names is not None and key not in names and not (prefix == "" and key == "hydra"):
            unknown.append(prefix + str(key))
        elif OmegaConf.is_dict(cfg._get_node(key)) and key != "hydra":
            more_unknown, more_missing = unknown_settings(cfg._get_node(key), f"{prefix}{key}.")
            unknown += more_unknown
            missing += more_missing
    missing += [prefix + name for name in names or () if name not in cfg]
    return unknown, missing


def undeclared_settings(cfg: DictConfig) -> Optional[str]:
    """The one-line error for a key that the command's schema does not declare (`+lattent_dim=20`, which Hydra's own
    message about a typo suggests), or a declared one deleted with `~key` (None if there is none): the first would be
    ignored, the second read anyway."""
    unknown, missing = unknown_settings(cfg)
    if unknown:
        key = unknown[0]
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        schema = OmegaConf.get_type(node)
        close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(schema)], n=1)
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
        return (f"{key} is not a setting of this command ({hint}`--cfg job` lists them): a + or ++ before a key "
                "cannot add settings")
    if missing:
        return (f"{missing[0]} is a setting every run needs and cannot be deleted (~{missing[0]}); set it instead, "
                f"e.g. {missing[0]}=...")
    return None
