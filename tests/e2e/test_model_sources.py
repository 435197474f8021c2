"""Models come from where the user said, and run only torch's own layers unless asked (GPU issue, item 1).

transformers 5.25 with the `kernels` package loads every model with Hub kernels on, and each `train()`/`eval()`
switch kernelizes it: on CUDA that looks up `kernels-community/...` on the Hub (offline: a traceback at the
first evaluation). On CPU the lookup replaces nothing, so here `kernelize` is made to raise, as it does on an
offline GPU machine, and the runs must still finish with their evaluations.
"""

from __future__ import annotations

import os

import pytest

from support.inprocess import main_in_process


def make_hub_kernels_raise(monkeypatch) -> list:
    """transformers' `kernelize` raises whenever it could look up a Hub kernel. Resetting a model to torch's
    layers (`use_kernels = False`) also goes through `kernelize`, with an explicitly empty mapping that
    inherits nothing: that call looks nothing up, so it is let through."""
    import transformers.modeling_utils as modeling_utils

    real = modeling_utils.kernelize
    calls = []

    def kernelize(model, *args, kernel_config=None, **kwargs):
        resetting = kernel_config is not None and not kernel_config.kernel_mapping and not getattr(
            kernel_config, "inherit_mapping", True)
        calls.append("reset" if resetting else "lookup")
        if not resetting:
            raise ValueError("Cannot reach kernels-community/activation: offline mode is enabled.")
        return real(model, *args, kernel_config=kernel_config, **kwargs)

    monkeypatch.setattr(modeling_utils, "kernelize", kernelize)
    return calls


@pytest.fixture
def hub_kernels_raise(monkeypatch):
    return make_hub_kernels_raise(monkeypatch)


def _evaluating_run(tiny_bert, sentiment_files, out, **extra):
    from scaletune.train import run

    return run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(out), "max_steps": 4,
                "eval_strategy": "steps", "eval_steps": 2, "save_steps": 2, "load_best_model_at_end": True,
                "disable_tqdm": True, "report_to": "none"}, **extra)


@pytest.mark.slow
def test_a_model_scaletune_loads_runs_no_hub_kernel(hub_kernels_raise, tiny_bert, sentiment_files, tmp_path):
    result = _evaluating_run(tiny_bert, sentiment_files, tmp_path / "run")
    assert [h["step"] for h in result.log_history if "eval_loss" in h] == [2, 4]
    assert "eval_accuracy" in result.metrics and result.predictions_file
    assert "lookup" not in hub_kernels_raise


@pytest.mark.slow
def test_a_users_model_has_its_hub_kernels_turned_off(tiny_bert, sentiment_files, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)  # transformers' default: kernels on
    assert model.use_kernels
    calls = make_hub_kernels_raise(monkeypatch)  # after the user's load, as on a GPU machine
    result = _evaluating_run(tiny_bert, sentiment_files, tmp_path / "run", model=model)
    assert [h["step"] for h in result.log_history if "eval_loss" in h] == [2, 4]
    assert not model.use_kernels and "lookup" not in calls


@pytest.mark.slow
def test_use_hub_kernels_true_kernelizes_before_training(tiny_bert, sentiment_files, tmp_path):
    """On: both modes are kernelized before the first update (on CPU nothing is replaced, and the run trains)."""
    result = _evaluating_run(tiny_bert, sentiment_files, tmp_path / "run", overrides={"use_hub_kernels": True})
    assert result.global_step == 4


def test_hub_kernels_that_cannot_be_had_are_one_line_before_training(hub_kernels_raise, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from scaletune.errors import ConfigError
    from scaletune.model_source import check_hub_kernels

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, use_kernels=False)
    with pytest.raises(ConfigError, match="use_hub_kernels=true, but the Hub kernels for "
                                          "BertForSequenceClassification could not be had .*set use_hub_kernels "
                                          "false") as raised:
        check_hub_kernels(model)
    assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_a_model_that_cannot_be_found_writes_nothing(tiny_bert, sentiment_files, tmp_path):
    """Before: a 77-97-line traceback, exit 1, and an empty output dir left behind."""
    out = tmp_path / "never_made"
    proc = main_in_process(["--model_name_or_path", str(tmp_path / "nope"), "--train_file",
                            sentiment_files["train_file"], "--output_dir", str(out)],
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"scaletune: error: model_name_or_path={str(tmp_path / 'nope')!r} does not exist: no such folder. "
        f"Check the path."]
    assert not out.exists()


def test_trainer_525_crashes_where_scaletune_runs(tiny_bert, sentiment_files, tmp_path, monkeypatch):
    """The documented difference (docs/migrating-from-trainer.md): Trainer keeps transformers' default, so
    the same offline kernel lookup stops its run; a change on Trainer's side makes this fail."""
    from support.parity import make_trainer, tokenized_classification

    data, tok = tokenized_classification(tiny_bert, {k: sentiment_files[f"{k}_file"] for k in ("train", "validation")})
    trainer = make_trainer(tiny_bert, tmp_path / "trainer", data, tok, max_steps=2, eval_strategy="steps",
                           eval_steps=1)
    make_hub_kernels_raise(monkeypatch)
    with pytest.raises(ValueError, match="kernels-community"):
        trainer.train()
