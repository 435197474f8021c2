"""Typed configuration: model, data and training argument groups, where they come from, and their docs.

* `schema`: the dataclasses (ModelArguments, DataArguments, TrainingArguments, Config), their validation
  and derived values; `checks`: the per-type field checks they share;
* `sources`: CLI flags, YAML/JSON files, dicts and packaged recipes -> a validated Config (`load_config`);
* `reference`: README's configuration reference and the `--help` text, generated from the schema.

Everything is importable from here (`from scaletune.config import load_config, TrainingArguments`), and
none of it imports torch, so a bad config is reported in a fraction of a second.
"""

from ..errors import ConfigError
from .reference import field_docs, help_text, reference_markdown
from .schema import (
    FIELD_GROUP,
    FIELD_TYPE,
    GROUPS,
    Config,
    DataArguments,
    ModelArguments,
    SchedulerType,
    Strategy,
    TaskName,
    TrainingArguments,
)
from .sources import (ALIASES, RESOLVED_SECTION, ConfigSource, load_config, load_file, parse_cli, recipe_path,
                      resolve_recipe)

__all__ = [
    "ALIASES", "FIELD_GROUP", "FIELD_TYPE", "GROUPS", "Config", "ConfigError", "ConfigSource", "DataArguments",
    "ModelArguments", "RESOLVED_SECTION", "SchedulerType", "Strategy", "TaskName", "TrainingArguments",
    "field_docs", "help_text", "load_config", "load_file", "parse_cli", "recipe_path", "reference_markdown", "resolve_recipe",
]
