"""Several evaluation sets (issue #23, item 1): the name rules, metric_for_best_model against eval_<set>_<metric>,
the config key, and the evaluator over a dict of loaders with a real tiny BERT in this process."""

from __future__ import annotations

import json

import pytest

from scaletune import tracking as tr
from scaletune.config import load_config
from scaletune.config.training import lower_is_better
from scaletune.errors import ConfigError, DataError
from scaletune.eval_sets import set_names
from scaletune.metric_names import check_eval_set_names, check_metric_for_best_model

TASK_METRICS = ("loss", "accuracy", "f1")


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("sets, fragment", [
    ({}, "at least one set"),
    ({"a/b": "x.csv"}, "'a/b' would break the metric keys"),
    ({"dev set": "x.csv"}, "'dev set' would break the metric keys"),
    ({"test": "x.csv"}, "'test' collides with the test split"),
    ("a.csv", "at least one set"),
])
def test_bad_set_names_are_refused_in_one_line(sets, fragment):
    with pytest.raises(ConfigError) as e:
        check_eval_set_names(sets, "validation_files")
    assert fragment in _one_line(e) and _one_line(e).startswith("validation_files")


def test_good_set_names_pass():
    check_eval_set_names({"a": 1, "news_2024": 2, "en-US": 3}, "validation_files")


def test_metric_for_best_model_names_a_set_and_a_metric():
    sets = ["a", "b"]
    for ok in ("eval_b_accuracy", "b_accuracy", "eval_a_loss"):
        check_metric_for_best_model(ok, TASK_METRICS, "classification", sets)
    with pytest.raises(ConfigError) as e:
        check_metric_for_best_model("eval_c_accuracy", TASK_METRICS, "classification", sets)
    assert "eval_b_accuracy" in _one_line(e) and "Did you mean" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        check_metric_for_best_model("eval_b_acuracy", TASK_METRICS, "classification", sets)
    assert "Did you mean 'eval_b_accuracy'?" in _one_line(e)
    # Without sets, the same name is no metric of the task; with one set, eval_accuracy is not reported.
    with pytest.raises(ConfigError):
        check_metric_for_best_model("eval_b_accuracy", TASK_METRICS, "classification")
    with pytest.raises(ConfigError):
        check_metric_for_best_model("eval_accuracy", TASK_METRICS, "classification", ["a"])


def test_default_best_metric_with_several_sets_is_refused_up_front():
    """Trainer's default (eval_loss) fails at its first evaluation with a dict eval_dataset; here, before the run."""
    cfg = load_config({"train_file": "x.csv", "validation_files": {"a": "a.csv", "b": "b.csv"},
                       "load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "steps"})
    with pytest.raises(ConfigError) as e:
        check_metric_for_best_model(cfg.training.metric_for_best_model, TASK_METRICS, "classification",
                                    set_names(cfg, None))
    assert "eval_loss, the default" in _one_line(e) and "eval_a_loss" in _one_line(e)


def test_user_metrics_check_only_the_set_part():
    check_metric_for_best_model("eval_b_bleu", None, None, ["a", "b"])
    with pytest.raises(ConfigError) as e:
        check_metric_for_best_model("eval_bleu", None, None, ["a", "b"])
    assert "names no evaluation set" in _one_line(e)


def test_greater_is_better_reads_the_metric_under_a_set_name():
    assert lower_is_better("eval_b_loss") and lower_is_better("eval_b_rmse") and not lower_is_better("eval_b_f1")
    cfg = load_config({"train_file": "x.csv", "validation_files": {"a": "a.csv", "b": "b.csv"},
                       "metric_for_best_model": "eval_b_perplexity"})
    assert cfg.training.greater_is_better is False


def test_validation_files_from_yaml_and_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("train_file: t.csv\nvalidation_files:\n  a: a.csv\n  b: b.csv\n")
    assert load_config(str(tmp_path / "c.yaml")).data.validation_files == {"a": "a.csv", "b": "b.csv"}
    cli = load_config(["--train_file", "t.csv", "--validation_files", "a=a.csv,b=b.csv"])
    assert cli.data.validation_files == {"a": "a.csv", "b": "b.csv"}
    with pytest.raises(ConfigError) as e:
        load_config(["--train_file", "t.csv", "--validation_files", "a.csv"])
    assert "name=file,name=file" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        load_config({"train_file": "t.csv", "validation_file": "v.csv", "validation_files": {"a": "a.csv"}})
    assert "validation_file and validation_files are both set" in _one_line(e)


def test_run_eval_dataset_dict_names_and_empty_sets():
    import datasets

    cfg = load_config({"train_file": "x.csv"})
    rows = datasets.Dataset.from_dict({"text": ["good"], "label": [1]})
    assert set_names(cfg, {"a": rows, "b": rows}) == ["a", "b"]
    assert set_names(cfg, rows) == []
    with pytest.raises(DataError) as e:
        set_names(cfg, {"a": rows, "b": rows.select([])})
    assert "'b' is empty" in _one_line(e)
    with pytest.raises(ConfigError):
        set_names(cfg, {"a b": rows})


def test_a_missing_validation_files_entry_is_named(tmp_path):
    from scaletune import data

    (tmp_path / "a.csv").write_text("text,label\ngood,1\n")
    (tmp_path / "t.csv").write_text("text,label\ngood,1\n")
    cfg = load_config({"train_file": str(tmp_path / "t.csv"),
                       "validation_files": {"a": str(tmp_path / "a.csv"), "b": str(tmp_path / "nope.csv")}})
    with pytest.raises(DataError, match=r"validation_files\['b'\] .*nope.csv' does not exist"):
        data.check_files(cfg)
    (tmp_path / "b.csv").write_text("text,label\n")
    cfg = load_config({"train_file": str(tmp_path / "t.csv"),
                       "validation_files": {"a": str(tmp_path / "a.csv"), "b": str(tmp_path / "b.csv")}})
    with pytest.raises(DataError, match="validation set 'b' is empty"):
        data.check_files(cfg)


def test_trackers_summary_and_card_show_each_set(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from scaletune.modelcard import write_model_card

    assert tr.tracker_metrics({"eval_a_loss": 1.0, "eval_b_accuracy": 0.5}) == {"eval/a_loss": 1.0,
                                                                              "eval/b_accuracy": 0.5}
    text = tr.format_summary({"global_step": 4, "best_metric": 0.5, "best_global_step": 2, "eval_a_loss": 0.7,
                              "eval_b_loss": 0.5}, "eval_b_loss", {}, "r", 3)
    assert "eval_b_loss = 0.5 at step 2" in text and "a_loss 0.7  b_loss 0.5" in text
    history = [{"loss": 0.9, "step": 1}, {"eval_a_loss": 0.71, "eval_b_loss": 0.52, "epoch": 0.5, "step": 2},
               {"loss": 0.8, "step": 3}, {"eval_a_loss": 0.61, "eval_b_loss": 0.55, "epoch": 1.0, "step": 4}]
    cfg = load_config({"train_file": "t.csv", "validation_files": {"a": "a.csv", "b": "b.csv"},
                       "metric_for_best_model": "eval_b_loss", "output_dir": str(tmp_path)})
    card = write_model_card(tmp_path, cfg, AutoModelForSequenceClassification.from_pretrained(tiny_bert), history,
                            1, 0.52, 2, "max_steps").read_text()
    table = [line for line in card.splitlines() if line.startswith("|")]
    assert "A Loss" in table[0] and "B Loss" in table[0] and "Validation Loss" not in card
    assert len(table) == 4 and "0.52" in table[2] and "0.61" in table[3]  # header, rule, one row per evaluation
    assert "eval_b_loss: 0.52 at step 2" in card
    json.dumps(history)  # the history is left as it was given
    assert "eval_loss" not in history[1]


def test_evaluator_over_a_dict_is_each_set_alone(tiny_bert):
    """In this process, a real tiny BERT: {a, b} gives eval_a_* and eval_b_*, each equal to that set alone."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scaletune.evaluation import Evaluator, SingleProcess
    from scaletune.tasks import get_task

    cfg = load_config({"train_file": "t.csv", "per_device_eval_batch_size": 3})
    task = get_task("classification")
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["good film", "bad plot", "great acting", "dull story", "fine", "awful", "lovely scenes"]
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": words, "label": [1, 0, 1, 0, 1, 0, 1]})})
    sets = {"a": datasets.Dataset.from_dict({"text": words[:5], "label": [1, 0, 1, 0, 0]}),
            "b": datasets.Dataset.from_dict({"text": words[2:], "label": [1, 1, 1, 0, 1]})}
    from contextlib import nullcontext

    from scaletune.eval_sets import prepare_with_sets

    prepared = prepare_with_sets(task, raw, sets, tok, cfg, nullcontext)
    assert set(prepared.validation) == {"a", "b"} and len(prepared.validation["b"]) == 5
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    from scaletune.data import build_dataloader

    loaders = {n: build_dataloader(ds, task.collator(tok, cfg, False), 3, False, cfg.training, 0)
               for n, ds in prepared.validation.items()}
    evaluator = Evaluator(SingleProcess(), model, loaders, task, task.loss(cfg), cfg.training)
    both = evaluator.evaluate().metrics
    assert {k for k in both if k.endswith("_loss")} == {"eval_a_loss", "eval_b_loss"}
    for name, loader in loaders.items():
        alone = evaluator.evaluate(loader).metrics
        assert {f"eval_{name}_{k[5:]}": v for k, v in alone.items()} == {k: v for k, v in both.items()
                                                                          if k.startswith(f"eval_{name}_")}
    assert both["eval_a_loss"] != both["eval_b_loss"]


def test_plateau_schedule_with_several_sets_needs_a_named_metric(tmp_path):
    """reduce_lr_on_plateau steps on eval_loss when metric_for_best_model is unset: refused before the run."""
    from scaletune.preflight import preflight

    for name in ("t", "a", "b"):
        (tmp_path / f"{name}.csv").write_text("text,label\ngood,1\nbad,0\n")
    cfg = load_config({"train_file": str(tmp_path / "t.csv"), "output_dir": str(tmp_path / "out"),
                       "validation_files": {"a": str(tmp_path / "a.csv"), "b": str(tmp_path / "b.csv")},
                       "eval_strategy": "steps", "lr_scheduler_type": "reduce_lr_on_plateau"})
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    assert "eval_loss, the default" in _one_line(e)
    assert not (tmp_path / "out").exists()  # nothing written


def test_curves_put_each_sets_loss_with_the_losses():
    from scaletune.tracking.curves import curve_series

    panels = curve_series([{"step": 1, "loss": 1.0},
                           {"step": 2, "eval_a_loss": 0.5, "eval_b_loss": 0.6, "eval_b_accuracy": 0.5}])
    assert set(panels["Loss"]) == {"loss", "eval_a_loss", "eval_b_loss"}
    assert set(panels["Evaluation metrics"]) == {"eval_b_accuracy"}


def test_conll_validation_sets_are_refused_in_one_line():
    cfg = load_config({"task": "token_classification", "train_file": "t.conll",
                       "validation_files": {"a": "a.conll", "b": "b.conll"}})
    with pytest.raises(ConfigError) as e:
        set_names(cfg, None)
    assert "CoNLL" in _one_line(e)
