"""`python -m scaletune.ray`'s arguments: Ray's options are taken out, the training arguments kept in order, and
bad input (an option, the config, Ray missing) is one line and exit code 2 before Ray starts. The runs are in
tests/e2e/test_ray.py."""

from __future__ import annotations

import sys

import pytest

from scaletune import ray as ray_entry
from scaletune.errors import ConfigError


def test_ray_options_are_taken_out_and_training_arguments_kept_in_order():
    opts, train = ray_entry.parse(["job.yaml", "--num_workers", "4", "--max_steps", "3", "--use_gpu",
                                   "--max-failures=2", "--address", "auto", "--seed", "7"])
    assert opts == {"num_workers": 4, "use_gpu": True, "max_failures": 2, "address": "auto"}
    assert train == ["job.yaml", "--max_steps", "3", "--seed", "7"]


@pytest.mark.parametrize("argv, fragment", [
    (["job.yaml"], "--num_workers is required"),
    (["--num_workers", "0"], "--num_workers must be at least 1, got 0."),
    (["--num_workers", "two"], "--num_workers must be a whole number, got 'two'."),
    (["--num_workers", "2", "--max_failures", "-1"], "--max_failures must be a whole number, got '-1'."),
    (["--num_workers"], "--num_workers needs a value"),
    (["--num_workers", "--max_steps", "3"], "--num_workers needs a value"),
    (["--num_workers", "2", "--address="], "--address needs a value"),
    (["--num_workers", "2", "--address", ""], "--address needs a value"),
])
def test_a_bad_option_is_one_line(argv, fragment):
    with pytest.raises(ConfigError, match=fragment) as raised:
        ray_entry.parse(argv)
    assert "\n" not in str(raised.value)


def run_main(argv, capsys) -> tuple[int, list[str]]:
    code = ray_entry.main(argv)
    return code, capsys.readouterr().err.splitlines()


def test_ray_missing_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray.train.torch", None)  # import fails as where ray is not installed
    code, err = run_main(["--num_workers", "2", "--max_steps", "3"], capsys)
    assert code == 2 and len(err) == 1 and "pip install 'scaletune[ray]'" in err[0], err


def test_a_bad_config_is_one_line_before_ray_starts(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray is never reached: the config is checked first
    code, err = run_main(["--num_workers", "2", "--learning_rate", "fast"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("scaletune: error: ") and "learning_rate" in err[0], err


def test_the_metrics_reported_with_a_checkpoint_are_the_step_and_the_latest_evaluation():
    from scaletune.state import TrainingState

    state = TrainingState(global_step=8, epoch=0.5, log_history=[
        {"eval_loss": 0.7, "eval_accuracy": 0.5, "step": 4}, {"loss": 0.6, "learning_rate": 1e-5, "step": 8},
        {"eval_loss": 0.65, "eval_accuracy": 0.6, "eval_runtime_note": "text", "step": 8}])
    assert ray_entry.last_metrics(state) == {"step": 8, "epoch": 0.5, "eval_loss": 0.65, "eval_accuracy": 0.6}
    assert ray_entry.last_metrics(TrainingState(global_step=2, epoch=0.1)) == {"step": 2, "epoch": 0.1}
