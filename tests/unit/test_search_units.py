"""`python -m scaletune.search`'s decisions without a run: the space (parsing, one-line refusals), the command line,
the trials table, best.yaml, and the loop's pruned outcome."""

from __future__ import annotations

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from scaletune import schedule  # noqa: E402
from scaletune.config import ConfigError, TrainingArguments, load_config  # noqa: E402
from scaletune.search import main, parse_args  # noqa: E402
from scaletune.search_report import best_config, trials_table  # noqa: E402
from scaletune.search_space import check_params, distributions, read_space  # noqa: E402
from scaletune.trial_pruning import PRUNED_AT  # noqa: E402

BASE = {"model_name_or_path": "packaged:minilm", "output_dir": "out", "eval_strategy": "steps"}


def test_a_space_becomes_optuna_distributions():
    space = {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
             "warmup-steps": {"type": "int", "low": 0, "high": 100},
             "per_device_train_batch_size": {"type": "categorical", "choices": [8, 16]}}
    d = distributions(space, BASE)
    assert d == {"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True),
                 "warmup_steps": optuna.distributions.IntDistribution(0, 100),
                 "per_device_train_batch_size": optuna.distributions.CategoricalDistribution([8, 16])}


@pytest.mark.parametrize("space, fragments", [
    ({"learnig_rate": {"type": "float", "low": 1e-5, "high": 1e-3}}, ["search space: Unknown config key 'learnig_rate'",
                                                                   "Did you mean 'learning_rate'"]),
    ({"learning_rate": {"type": "float", "low": -1.0, "high": 1e-3}}, ["search space learning_rate", "-1.0"]),
    ({"per_device_train_batch_size": {"type": "categorical", "choices": [8, 0]}},
     ["per_device_train_batch_size", "0"]),
    ({"lr_scheduler_type": {"type": "categorical", "choices": ["linear", "cosinee"]}}, ["cosinee"]),
    ({"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-5}}, ["low", "below high"]),
    ({"learning_rate": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, ["log range needs low > 0"]),
    ({"learning_rate": {"type": "uniform", "low": 0.0, "high": 1e-3}}, ["float|int|categorical"]),
    ({"learning_rate": {"type": "float", "low": 1e-5, "hihg": 1e-3}}, ["hihg", "Did you mean 'high'"]),
    ({"warmup_steps": {"type": "int", "low": 0.5, "high": 10}}, ["whole numbers"]),
    ({"max_steps": {"type": "float", "low": 1.5, "high": 10.0}}, ["search space max_steps"]),
])
def test_a_bad_space_is_one_line_naming_the_entry(space, fragments):
    with pytest.raises(ConfigError) as e:
        distributions(space, BASE)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_space_file_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "s.yaml").write_text("- learning_rate\n")
    with pytest.raises(ConfigError, match="must map config keys to ranges"):
        read_space(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="cannot read the search space"):
        read_space(tmp_path / "missing.yaml")


def test_hp_space_values_are_checked_as_the_config_checks_them():
    assert check_params({"learning-rate": 1e-4}, BASE) == {"learning_rate": 1e-4}
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):
        check_params({"learnin_rate": 1e-4}, BASE)


def test_the_command_line_splits_search_options_from_training_arguments():
    train, opts = parse_args(["cfg.yaml", "--space", "s.yaml", "--n-trials=4", "--max_steps", "6", "--cpu", "2",
                              "--pruner", "none"])
    assert train == ["cfg.yaml", "--max_steps", "6"]
    assert opts == {"space": "s.yaml", "n_trials": 4, "cpu": 2, "pruner": "none"}


@pytest.mark.parametrize("argv, fragment", [
    (["--n_trials", "3"], "--space SPACE.yaml is required"),
    (["--space", "s.yaml", "--n_trials", "x"], "--n_trials must be a whole number"),
    (["--space", "s.yaml", "--pruner", "asha"], "--pruner 'asha'"),
    (["--space", "s.yaml", "--max_steps", "5", "--eval_strategy", "no"], "needs evaluations"),
])
def test_bad_search_options_are_one_line_before_anything_is_written(argv, fragment, tmp_path, capsys):
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scaletune.search: error:") and "\n" not in err and fragment in err
    assert not (tmp_path / "out").exists()


def test_model_init_is_refused_with_the_fix(tmp_path):
    from scaletune.search import search

    with pytest.raises(ConfigError, match="model_name_or_path"):
        search({**BASE, "output_dir": str(tmp_path)}, space={}, model_init=lambda: None)


def _trial(number, state, value=None, params=None, pruned_at=None):
    dists = {"learning_rate": optuna.distributions.FloatDistribution(1e-8, 1e-1, log=True)}
    trial = optuna.trial.create_trial(state=state, value=value, params=params or {"learning_rate": 1e-4},
                                     distributions=dists, user_attrs={PRUNED_AT: pruned_at} if pruned_at else {},
                                     intermediate_values={2: 0.9} if pruned_at else {})
    trial.number = number  # as the study numbers them
    return trial


def test_the_trials_table_has_a_row_per_trial_with_state_value_and_params():
    S = optuna.trial.TrialState
    table = trials_table([_trial(1, S.PRUNED, params={"learning_rate": 0.05}, pruned_at=2),
                          _trial(0, S.COMPLETE, 0.6941321, {"learning_rate": 1e-7})], "eval_loss")
    lines = table.strip().splitlines()
    assert lines[0] == "| trial | state | eval_loss | pruned at step | learning_rate | folder |"
    assert lines[2] == "| 0 | complete | 0.694132 |  | 1e-07 | trial-0 |"
    assert lines[3] == "| 1 | pruned |  | 2 | 0.05 | trial-1 |"


def test_best_yaml_is_the_base_config_with_the_best_values_writing_elsewhere(tmp_path):
    base = {**BASE, "max_steps": 6, "learning_rate": 5e-5}
    cfg = best_config(base, {"learning_rate": 1e-4, "warmup_steps": 3}, tmp_path)
    assert cfg == {**base, "learning_rate": 1e-4, "warmup_steps": 3, "output_dir": str(tmp_path / "best")}
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(str(path))
    assert loaded.training.learning_rate == 1e-4 and loaded.training.output_dir == str(tmp_path / "best")


def test_a_pruned_trial_stops_with_a_checkpoint_and_a_preemption_does_not_hide_it():
    args = TrainingArguments(output_dir="o", save_strategy="steps")
    none = schedule.StepActions()
    out = schedule.step_outcome(none, args, new_best=False, stop_early=False, epoch_ended=False, preempted=False,
                                pruned=True)
    assert out == schedule.StepOutcome(save=True, stop="pruned")
    out = schedule.step_outcome(none, args, new_best=False, stop_early=False, epoch_ended=False, preempted=True,
                                pruned=True)
    assert out.stop == "pruned"
    no_save = TrainingArguments(output_dir="o", save_strategy="no")
    assert schedule.step_outcome(none, no_save, new_best=False, stop_early=False, epoch_ended=False,
                                 preempted=False, pruned=True) == schedule.StepOutcome(save=False, stop="pruned")


@pytest.mark.slow  # launches a process (bash) (tests/conftest.py)
@pytest.mark.parametrize("argv, gpus, expected", [
    (["multi_gpu", "job.yaml", "--space", "s.yaml", "--n_trials", "8"], "2",
     ["--preset", "multi_gpu", "job.yaml", "--space", "s.yaml", "--n_trials", "8"]),
    (["job.yaml", "--space", "s.yaml", "--n_trials", "8"], "0", ["--cpu", "1", "job.yaml", "--space", "s.yaml",
                                                                 "--n_trials", "8"]),
])
def test_slurm_search_passes_the_preset_and_cpu_mode_to_each_worker(argv, gpus, expected, tmp_path):
    """slurm/search.sh's argument handling with a fake Slurm environment and a PYTHON that records its arguments."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3", "SLURM_GPUS_ON_NODE": gpus,
           "PYTHON": str(fake), "SCALETUNE_HOME": str(repo), "ARGS_FILE": str(tmp_path / "args")}
    proc = subprocess.run(["bash", str(repo / "slurm/search.sh"), *argv], env=env, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "args").read_text().splitlines() == ["-m", "scaletune.search", *expected]
    outside = subprocess.run(["bash", str(repo / "slurm/search.sh"), *argv], env={"PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=30)
    assert outside.returncode == 2 and "not inside a Slurm job array" in outside.stderr
