"""What each setting may be, declared once: beside the setting, in the schema (dataclass) of the command that takes
it, with the words the user reads when a value is outside it.

    iw_chunk: int = setting(100, integer(1, note="importance samples evaluated at once"))

`check_schema(cfg, Schema)` walks a composed config against its schema and raises the first value outside its rule
as one line: `iw_chunk=0 is not allowed: must be an integer >= 1 (...)`. Rules that several commands share (a seed,
a device name, the size of an image grid) are defined here once and every schema that takes such a setting reuses
them. What relates two settings (temp_min <= temperature) is checked by the command's own validate function, and
what depends on the machine (a GPU that exists, memory, files) by vae/settings/checks.py.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from vae.common.errors import UserError

SEED_LIMIT = 2**63  # torch's generators take a 64-bit seed; [0, 2^63) is what every platform reads the same way
MAX_IMAGES = 1024  # pictures drawn as one grid (recon_images, prior_samples, and the tools' own): a readable bound


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise the one-line error for a setting outside what is allowed."""
    if not ok:
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        raise UserError(f"{key}={value!r} is not allowed: {allowed} (set it on the command line, e.g. {key}=...)")


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    allowed: Union[str, Callable[[], str]]  # a callable for a list that is read when it is needed (a registry)

    def check(self, key: str, value: Any) -> None:
        if not self.ok(value):
            check(False, key, value, self.allowed if isinstance(self.allowed, str) else self.allowed())


def _note(text: str, note: str) -> str:
    return f"{text} ({note})" if note else text


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(minimum: int, maximum: Optional[int] = None, note: str = "") -> Rule:
    """A whole number in [minimum, maximum] (no upper bound for maximum=None)."""
    text = f"must be an integer >= {minimum}" if maximum is None else f"must be an integer in [{minimum}, {maximum}]"
    return Rule(lambda v: _is_int(v) and v >= minimum and (maximum is None or v <= maximum), _note(text, note))


def number(above: Optional[float] = None, at_least: Optional[float] = None, below: Optional[float] = None,
           note: str = "") -> Rule:
    """A finite number: > `above`, or >= `at_least`; and < `below` when given."""
    def ok(v: Any) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (above is None or v > above) and (at_least is None or v >= at_least)
                and (below is None or v < below))

    if below is not None:
        text = f"must be a number in [{at_least}, {below})"
    else:
        text = f"must be a number > {above:g}" if above is not None else f"must be a number >= {at_least:g}"
    return Rule(ok, _note(text, note))


def optional(rule: Rule, meaning: str = "") -> Rule:
    """null, or a value the rule allows. `meaning`: what null does (e.g. "PyTorch's default")."""
    text = rule.allowed if isinstance(rule.allowed, str) else rule.allowed()
    return Rule(lambda v: v is None or rule.ok(v), text.replace("must be ", "must be null or ", 1)
                + (f"; null = {meaning}" if meaning else ""))


def one_of(names: Union[Iterable[str], Callable[[], Iterable[str]]], hint: str = "") -> Rule:
    """One of `names` (a callable: a registry, read when a value is checked)."""
    get = names if callable(names) else (lambda fixed=tuple(names): fixed)
    return Rule(lambda v: v in tuple(get()), lambda: f"one of {', '.join(get())}{hint}")


def each_of(names: Iterable[str], non_empty: bool = False) -> Rule:
    """A list drawn from `names`."""
    names = tuple(names)
    return Rule(lambda v: all(x in names for x in v) and (bool(v) or not non_empty),
                f"a {'non-empty ' if non_empty else ''}list drawn from {', '.join(names)}")


def fraction_or_count(zero_ok: bool) -> Rule:
    def ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
            (v >= 0 if zero_ok else v > 0) and (v < 1 or float(v).is_integer())

    return Rule(ok, f"a fraction in (0, 1) or a whole count{' (0 = none)' if zero_ok else ''}")


SEED = Rule(lambda v: _is_int(v) and 0 <= v < SEED_LIMIT, "must be an integer in [0, 2^63)")
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICE = Rule(lambda v: isinstance(v, str) and _DEVICE_NAME.fullmatch(v) is not None,
              "auto, cpu, cuda or cuda:N with N a GPU number (e.g. cuda:0)")
THREADS = optional(integer(1))
IMAGES = integer(1, MAX_IMAGES, "images in a grid")


def setting(default: Any = dataclasses.MISSING, rule: Optional[Rule] = None, *,
            factory: Any = dataclasses.MISSING) -> Any:
    """A schema field with its rule: `x: int = setting(1, integer(1))`; `factory` for a list or a dict."""
    meta = {"rule": rule} if rule is not None else {}
    if isinstance(default, Rule):
        raise TypeError("setting(): a rule was given as the default; pass it as rule=")
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_schema(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """Every setting of `cfg` that `schema` gives a rule, checked against it (nested schemas too), in the order
    the schema declares them."""
    for f in dataclasses.fields(schema):
        if f.name not in cfg or OmegaConf.is_missing(cfg, f.name):
            continue
        value = cfg[f.name]
        rule = f.metadata.get("rule")
        if rule is not None:
            rule.check(prefix + f.name, value)
        if dataclasses.is_dataclass(f.default_factory) and isinstance(value, DictConfig):
            check_schema(value, f.default_factory, f"{prefix}{f.name}.")
