"""The search space of `python -m scaletune.search`: a YAML mapping of config keys to ranges, checked before any
trial starts, and turned into Optuna distributions.

    learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    warmup_steps: {type: int, low: 0, high: 100}
    per_device_train_batch_size: {type: categorical, choices: [8, 16]}

A key is checked as the config checks it (`canonical_key`: unknown keys with a did-you-mean), and each end of a
range and each choice by building the base config with it (the key's own type and range rules), so a space
never proposes a value a trial would refuse. No torch; Optuna only for the distributions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from .config import ConfigError, load_config
from .config.sources import canonical_key
from .errors import suggestion

TYPES = ("float", "int", "categorical")
FIELDS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
          "categorical": {"type", "choices"}}


def read_space(path: str | Path) -> dict:
    """The YAML file's mapping, or one line saying why it is not one."""
    try:
        space = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the search space {path}: {e.strerror}; give --space a YAML file.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"the search space {path} is not valid YAML ({str(e).splitlines()[0]}).") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"the search space {path} must map config keys to ranges, e.g. "
                          f"`learning_rate: {{type: float, low: 1.0e-5, high: 1.0e-3, log: true}}`.")
    return space


def distributions(space: Mapping[str, Any], base: Mapping[str, Any]) -> dict:
    """{config key: optuna distribution} for a space mapping, every entry checked against the base config values
    (a dict as `load_config` takes it). Raises ConfigError (one line) on the first bad entry."""
    return {_key(key): _distribution(_key(key), spec, base) for key, spec in space.items()}


def _key(key: str) -> str:
    try:
        return canonical_key(key)
    except ConfigError as e:
        raise ConfigError(f"search space: {e}") from None


def _distribution(key: str, spec: Any, base: Mapping[str, Any]):
    import optuna.distributions as d

    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise ConfigError(f"search space {key}: give {{type: float|int|categorical, ...}}, got {spec!r}.")
    kind = spec["type"]
    extra = set(spec) - FIELDS[kind]
    if extra:
        name = sorted(extra)[0]
        raise ConfigError(f"search space {key}: unknown field {name!r} for type {kind}."
                          f"{suggestion(name, FIELDS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"search space {key}: a categorical needs a non-empty list, e.g. choices: [8, 16].")
        for value in choices:
            check_value(key, value, base)
        return d.CategoricalDistribution(choices)
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"search space {key}: a {kind} range needs low and high.")
    cast = float if kind == "float" else int
    try:
        low, high = cast(spec["low"]), cast(spec["high"])
        step = None if spec.get("step") is None else cast(spec["step"])
    except (TypeError, ValueError):
        raise ConfigError(f"search space {key}: low, high and step must be {kind} numbers.") from None
    if kind == "int" and (low != spec["low"] or high != spec["high"]):
        raise ConfigError(f"search space {key}: an int range needs whole numbers, got {spec['low']}..{spec['high']}.")
    if not low < high:
        raise ConfigError(f"search space {key}: low ({low}) must be below high ({high}).")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"search space {key}: a log range needs low > 0, got {low}.")
    if log and step is not None:
        raise ConfigError(f"search space {key}: give log or step, not both (Optuna samples one or the other).")
    for value in (low, high):
        check_value(key, value, base)
    if kind == "float":
        return d.FloatDistribution(low, high, log=log, step=step)
    return d.IntDistribution(low, high, log=log, step=step or 1)


def check_value(key: str, value: Any, base: Mapping[str, Any]) -> None:
    """The config's own check of `key = value` on the base config, as one line naming the search space."""
    try:
        load_config(dict(base), {key: value})
    except ConfigError as e:
        raise ConfigError(f"search space {key}: {value!r} is outside what {key} accepts: {e}") from None


def check_params(params: Mapping[str, Any], base: Mapping[str, Any]) -> dict:
    """The parameters an `hp_space(trial)` callable returned, keys and values checked as a YAML space's are."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"hp_space(trial) must return a dict of config keys, got {type(params).__name__}.")
    checked = {_key(key): value for key, value in params.items()}
    for key, value in checked.items():
        check_value(key, value, base)
    return checked
