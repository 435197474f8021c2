"""Configs are strict: a value is used as given or refused with one line naming the key, the value and the
rule -- never rounded, stringified or replaced by a default -- and refused before torch is imported.

Every case runs through the real `load_config`; a handful also through `python -m scaletune.train`, as a user
sees them.
"""

from __future__ import annotations

import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from scaletune.config import (
    ConfigError,
    DataArguments,
    TaskName,
    TrainingArguments,
    help_text,
    load_config,
    reference_markdown,
)

DATA = ["--train_file", "train.csv"]  # satisfies "no training data"; files are only opened at run time

# (CLI arguments, a substring the one-line error must contain)
BAD_CLI = {
    "int given a fraction (trained 1 step)": (["--max_steps", "1.5"], "max_steps='1.5' is not a valid int"),
    "int given a fraction (batch 8)": (["--per_device_train_batch_size", "8.7"],
                                       "per_device_train_batch_size='8.7' is not a valid int"),
    "int given a boolean": (["--gradient_accumulation_steps", "true"],
                            "gradient_accumulation_steps='true' is not a valid int"),
    "int given a word": (["--seed", "forty-two"], "seed='forty-two' is not a valid int"),
    "int given infinity": (["--save_total_limit", "inf"], "save_total_limit='inf' is not a valid int"),
    "learning rate nan": (["--learning_rate", "nan"], "learning_rate=nan must be a finite number"),
    "learning rate inf": (["--learning_rate", "inf"], "learning_rate=inf must be a finite number"),
    "learning rate negative": (["--learning_rate", "-1"], "learning_rate=-1 must be > 0"),
    "learning rate zero": (["--learning_rate", "0"], "learning_rate=0 must be > 0"),
    "max_seq_length zero (was silently 128)": (["--max_seq_length", "0"], "max_seq_length=0 must be >= 1"),
    "weight decay negative": (["--weight_decay", "-0.01"], "weight_decay=-0.01 must be >= 0"),
    "max_grad_norm negative": (["--max_grad_norm", "-1"], "max_grad_norm=-1 must be >= 0"),
    "adam beta1 one": (["--adam_beta1", "1"], "adam_beta1=1 must be in [0, 1)"),
    "adam beta2 negative": (["--adam_beta2", "-0.5"], "adam_beta2=-0.5 must be in [0, 1)"),
    "adam epsilon zero": (["--adam_epsilon", "0"], "adam_epsilon=0 must be > 0"),
    "epochs infinite": (["--num_train_epochs", "inf"], "num_train_epochs=inf must be a finite number"),
    "dataloader workers negative": (["--dataloader_num_workers", "-2"], "dataloader_num_workers=-2 must be >= 0"),
    "pad_to_multiple_of zero": (["--pad_to_multiple_of", "0"], "pad_to_multiple_of=0 must be >= 1"),
    "max_train_samples zero": (["--max_train_samples", "0"], "max_train_samples=0 must be >= 1"),
    "max_eval_samples negative": (["--max_eval_samples", "-5"], "max_eval_samples=-5 must be >= 1"),
    "max_predict_samples zero": (["--max_predict_samples", "0"], "max_predict_samples=0 must be >= 1"),
    "seed negative": (["--seed", "-1"], "seed=-1 must be in [0, 2**32)"),
    "seed too large": (["--seed", str(2**32)], "seed=4294967296 must be in [0, 2**32)"),
    "data_seed too large": (["--data_seed", str(2**40)], "data_seed=1099511627776 must be in [0, 2**32)"),
    "bool given a word": (["--fp16", "maybe"], "fp16='maybe' is not a valid bool"),
    "strategy not in its Literal": (["--save_strategy", "always"], "save_strategy='always' is not one of no, steps"),
    "scheduler not in its Literal": (["--lr_scheduler_type", "cosine_restarts"],
                                     "lr_scheduler_type='cosine_restarts' is not one of linear, cosine"),
    "task not in its Literal": (["--task", "summarization"], "task='summarization' is not one of classification, "),
    "mlm probability one": (["--mlm_probability", "1"], "mlm_probability=1 must be in (0, 1)"),
    "unknown key": (["--max_stepz", "3"], "Unknown config key 'max_stepz'. Did you mean 'max_steps'?"),
}

# YAML values that used to be converted with str()/int() or passed through; (file text, substring)
BAD_YAML = {
    "YAML boolean for a str field": ("run_name: yes\n", "run_name=True is not a valid str (in YAML, put it in quotes)"),
    "YAML number for a str field": ("model_revision: 2024\n", "model_revision=2024 is not a valid str"),
    "YAML bare no for a strategy": ("save_strategy: no\n", "save_strategy=False is not one of no, steps, epoch"),
    "list for a scalar": ("learning_rate: [1.0e-5, 2.0e-5]\n", "learning_rate=[1e-05, 2e-05] is not a valid float"),
    "fraction for an int": ("per_device_train_batch_size: 8.7\n", "per_device_train_batch_size=8.7 is not a valid int"),
    "boolean for an int": ("max_steps: true\n", "max_steps=True is not a valid int"),
    "boolean for a float": ("learning_rate: false\n", "learning_rate=False is not a valid float"),
    "number for a bool": ("fp16: 1\n", "fp16=1 is not a valid bool"),
    "empty value for a required str": ("output_dir:\n", "output_dir has no value"),
    "tracker list with a number": ("report_to: [wandb, 3]\n", "report_to=['wandb', 3] is not valid"),
}


def one_line_error(source) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(source)
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("args, expected", BAD_CLI.values(), ids=BAD_CLI.keys())
def test_bad_cli_value_is_one_line_naming_key_value_and_rule(args, expected):
    assert expected in one_line_error([*DATA, *args])


@pytest.mark.parametrize("text, expected", BAD_YAML.values(), ids=BAD_YAML.keys())
def test_bad_yaml_value_is_refused_not_converted(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: train.csv\n" + text)
    assert expected in one_line_error(str(path))


def test_values_that_mean_exactly_one_number_are_accepted(tmp_path):
    cfg = load_config([*DATA, "--max_steps", "1e3", "--learning_rate", "3e-5", "--seed", "0",
                       "--save_strategy", "no", "--fp16", "--max_seq_length", "none"])
    t = cfg.training
    assert (t.max_steps, t.learning_rate, t.seed, t.save_strategy, t.fp16) == (1000, 3e-5, 0, "no", True)
    assert type(t.max_steps) is int and cfg.data.max_seq_length is None
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.csv\nmax_steps: 20.0\nsave_strategy: 'no'\nwarmup_steps: 0.1\n")
    t = load_config(str(path)).training
    assert (t.max_steps, type(t.max_steps), t.save_strategy, t.warmup_steps) == (20, int, "no", 0.1)


def test_dataclasses_are_strict_however_they_are_built():
    with pytest.raises(ConfigError, match=r"max_steps=1\.5 is not a valid int"):
        TrainingArguments(max_steps=1.5)
    with pytest.raises(ConfigError, match="max_seq_length=0 must be >= 1"):
        DataArguments(max_seq_length=0)
    with pytest.raises(ConfigError, match="learning_rate=nan must be a finite number"):
        TrainingArguments(learning_rate=math.nan)


def test_choices_come_from_the_literal_alone():
    from scaletune.tasks import TASKS  # the registry of task modules

    tasks = typing.get_args(TaskName)
    assert set(tasks) == set(TASKS)
    assert "One of " + ", ".join(f"`{t}`" for t in tasks) + "." in reference_markdown()
    assert "--task {" + ",".join(tasks) + "}" in help_text("scaletune.train")


def test_derived_values_are_properties_of_the_config():
    t = load_config([*DATA, "--seed", "7", "--per_device_train_batch_size", "4",
                     "--gradient_accumulation_steps", "3", "--logging_steps", "25"]).training
    assert t.resolved_data_seed == 7 and t.resolved_eval_steps == 25 and t.global_batch_size(2) == 24
    t = load_config([*DATA, "--seed", "7", "--data_seed", "11", "--eval_steps", "0.5"]).training
    assert t.resolved_data_seed == 11 and t.resolved_eval_steps == 0.5


CLI_CASES = ["int given a fraction (trained 1 step)", "learning rate nan", "max_seq_length zero (was silently 128)",
             "seed negative", "unknown key"]


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
@pytest.mark.parametrize("name", CLI_CASES)
def test_train_cli_reports_a_bad_config_as_one_line_and_exit_code_2(name):
    args, expected = BAD_CLI[name]
    proc = subprocess.run([sys.executable, "-m", "scaletune.train", *DATA, *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scaletune: error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_config_errors_are_raised_before_torch_is_imported():
    code = ("import sys\n"
            "from scaletune.train import main\n"
            f"rc = main({[*DATA, '--max_steps', '1.5']!r})\n"
            "print(rc, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr


def test_a_deepspeed_checkpoint_from_outside_the_output_dir_needs_trust(tmp_path):
    from scaletune.resume import check_trusted
    from scaletune.errors import CheckpointError

    outside, root = tmp_path / "elsewhere" / "checkpoint-4", tmp_path / "run"
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true"}
    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        check_trusted(outside, root, False, deepspeed)
    check_trusted(outside, root, True, deepspeed)  # the user vouches for it
    check_trusted(root / "checkpoint-4", root, False, deepspeed)  # the run's own checkpoint
    check_trusted(outside, root, False, {})  # DDP loads with weights_only=True
