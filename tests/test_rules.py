"""vae/settings/rules.py: each setting's allowed values, declared beside it in its command's schema."""
from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from vae.common.errors import UserError
from vae.settings.rules import (DEVICE, SEED, THREADS, check_schema, each_of, fraction_or_count, integer, number,
                                one_of, optional, setting)


@pytest.mark.parametrize("rule, good, bad", [
    (integer(1), [1, 7, 2**40], [0, -1, 1.5, True, "3", None]),
    (integer(2, 10), [2, 10], [1, 11]),
    (number(above=0), [1e-9, 3, 2.5], [0, -1.0, float("nan"), float("inf"), True]),
    (number(at_least=0), [0, 0.0, 4.5], [-1e-9, float("nan")]),
    (number(at_least=0, below=1), [0, 0.5], [1, 1.5]),
    (optional(integer(1)), [None, 1], [0]),
    (one_of(("a", "b")), ["a", "b"], ["c", None]),
    (each_of(("a", "b")), [[], ["a", "b", "a"]], [["a", "c"]]),
    (each_of(("a", "b"), non_empty=True), [["a"]], [[]]),
    (fraction_or_count(zero_ok=True), [0, 0.25, 5000], [1.5, -1, float("nan")]),
    (fraction_or_count(zero_ok=False), [0.1, 3], [0]),
    (SEED, [0, 2**63 - 1], [-1, 2**63]),
    (DEVICE, ["auto", "cpu", "cuda", "cuda:1"], ["gpu", "cuda:", "cuda:x", 3]),
    (THREADS, [None, 1, 8], [0]),
])
def test_rules_allow_exactly_what_their_message_says(rule, good, bad):
    for v in good:
        rule.check("key", v)
    for v in bad:
        with pytest.raises(UserError, match=r"^key=.* is not allowed: "):
            rule.check("key", v)


def test_messages_read_as_one_line_with_the_key_the_value_and_what_is_allowed():
    cases = [(integer(1, note="steps"), 0, "must be an integer >= 1 (steps)"),
             (integer(1, 1024), 2000, "must be an integer in [1, 1024]"),
             (number(above=0), -1.0, "must be a number > 0"),
             (number(at_least=0, note="nats"), -1.0, "must be a number >= 0 (nats)"),
             (optional(integer(1)), 0, "must be null or an integer >= 1"),
             (one_of(lambda: ("x", "y"), " (choose with g=x|y)"), "z", "one of x, y (choose with g=x|y)")]
    for rule, value, allowed in cases:
        with pytest.raises(UserError) as e:
            rule.check("k", value)
        assert str(e.value) == f"k={value!r} is not allowed: {allowed} (set it on the command line, e.g. k=...)"


@dataclasses.dataclass
class Inner:
    size: int = setting(3, integer(1))


@dataclasses.dataclass
class Outer:
    rate: float = setting(0.5, number(above=0))
    free: int = 0  # no rule: anything its type allows
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_check_schema_walks_nested_settings_and_names_them_by_their_dotted_key():
    check_schema(OmegaConf.structured(Outer), Outer)
    check_schema(OmegaConf.create({"rate": 1.0, "free": -5, "inner": {"size": 1}}), Outer)
    with pytest.raises(UserError, match=r"^rate=0 is not allowed: must be a number > 0"):
        check_schema(OmegaConf.create({"rate": 0, "free": 0, "inner": {"size": 1}}), Outer)
    with pytest.raises(UserError, match=r"^inner\.size=0 is not allowed: must be an integer >= 1"):
        check_schema(OmegaConf.create({"rate": 1.0, "free": 0, "inner": {"size": 0}}), Outer)


def command_schemas():
    from vae.evaluate import EvaluateConfig
    from vae.gradients import GradientsConfig
    from vae.sample import SampleConfig
    from vae.settings.config import Config
    from vae.study import StudyConfig
    from vae.tools.bench_config import BenchConfig

    return [Config, EvaluateConfig, GradientsConfig, SampleConfig, StudyConfig, BenchConfig]


# Checked where they are declared: by each estimator beside its class (vae/estimators/), for the estimator in use.
ESTIMATOR_SETTINGS = {"estimator_samples", "baseline_decay"}
NUMBER_TYPES = ("int", "float", "Optional[int]", "Optional[float]")


def numeric_fields(schema, prefix=""):
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.default_factory):
            yield from numeric_fields(f.default_factory, f"{prefix}{f.name}.")
        elif f.type in NUMBER_TYPES:
            yield prefix + f.name, f


@pytest.mark.parametrize("schema", command_schemas(), ids=lambda s: s.__name__)
def test_every_number_a_command_takes_declares_its_rule(schema):
    """A number without a rule is either unchecked or checked by hand somewhere else: both are what this module
    exists to prevent."""
    missing = [key for key, f in numeric_fields(schema)
               if "rule" not in f.metadata and key.split(".")[-1] not in ESTIMATOR_SETTINGS]
    assert missing == []


@pytest.mark.parametrize("schema", command_schemas(), ids=lambda s: s.__name__)
def test_every_default_obeys_its_own_rule(schema):
    cfg = OmegaConf.structured(schema)
    for key, f in numeric_fields(schema):
        rule = f.metadata.get("rule")
        value = OmegaConf.select(cfg, key)
        if rule is not None:
            rule.check(key, value)
