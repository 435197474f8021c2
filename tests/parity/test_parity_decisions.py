"""Decision parity with `transformers.Trainer`: the same job and the same scripted metric sequence on both
sides, compared on what users rely on -- which steps evaluate, when training stops, the best metric and its
step, which checkpoint is reloaded at the end (and that its weights really are the final model), and which
checkpoints are left on disk.

Every case must agree with Trainer, except where shared/notes/trainer-semantics.md marks a rule "ours"
(docs/migrating-from-trainer.md, "Where scaletune differs on purpose"). There the case asserts our rule *and*
records what Trainer does, so the test fails when either side changes behaviour.

Job: a 2-layer BERT, 8 training rows of one word (4 updates per epoch at batch 2), 2 validation rows, at most
12 updates. The metric is scripted per evaluation count (`support.parity.scripted_metric`), so the decisions
are what is compared, not the model's noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from scaletune.train import run
from support.parity import (checkpoints_on_disk, make_trainer, max_abs_diff, scripted_metric, step_of,
                            tokenized_classification, weights, write_rows)
from support.tiny import REPO

COMMON = dict(per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=1e-3, seed=3,
              logging_steps=1)
TRACK = dict(metric_for_best_model="score")  # greater_is_better defaults to True for a name not ending in loss
BEST = dict(load_best_model_at_end=True, **TRACK)


@dataclass
class Case:
    name: str
    args: dict
    metrics: list = field(default_factory=lambda: [0.0])
    # Ours (trainer-semantics.md): {outcome field: (scaletune's value, Trainer's value)}; every other field equal.
    ours: dict = field(default_factory=dict)
    why: str = ""


CASES = [
    # ---- cadence (§3, §4)
    Case("steps_every_2", dict(eval_strategy="steps", eval_steps=2, save_steps=2, max_steps=10)),
    Case("last_step_off_interval", dict(eval_strategy="steps", eval_steps=3, save_steps=3, max_steps=10)),
    Case("fractional_intervals_limit2_best", dict(eval_strategy="steps", eval_steps=0.25, save_steps=0.25,
                                                  max_steps=10, save_total_limit=2, **BEST), [1, 4, 2, 3]),
    Case("eval_delay", dict(eval_strategy="steps", eval_steps=2, save_steps=2, eval_delay=5, max_steps=10)),
    Case("save_only_limit2", dict(save_steps=3, max_steps=10, save_total_limit=2)),
    Case("limit1_without_best", dict(eval_strategy="steps", eval_steps=2, save_steps=2, max_steps=10,
                                     save_total_limit=1)),
    # ---- best model, rotation (§7-§11)
    Case("best_limit1", dict(eval_strategy="steps", eval_steps=2, save_steps=2, max_steps=10,
                             save_total_limit=1, **BEST), [1, 5, 2, 3, 4]),
    Case("best_lower_is_better_limit2", dict(eval_strategy="steps", eval_steps=2, save_steps=2, max_steps=10,
                                             save_total_limit=2, greater_is_better=False, **BEST), [5, 4, 1, 3, 2]),
    Case("ties_keep_the_earlier", dict(eval_strategy="steps", eval_steps=2, save_steps=2, max_steps=10,
                                       save_total_limit=1, **BEST), [1, 3, 3, 3, 2]),
    Case("best_with_max_steps_off_interval", dict(eval_strategy="steps", eval_steps=4, save_steps=4, max_steps=10,
                                                  save_total_limit=1, **BEST), [1, 3, 2]),
    Case("best_between_saves", dict(eval_strategy="steps", eval_steps=2, save_steps=4, max_steps=10, **BEST),
         [1, 2, 5, 3, 4],
         ours={"reloaded": (6, 4), "on_disk": ([2, 4, 6, 8, 10], [4, 8, 10])},
         why="§10: the best (step 6) has no checkpoint under Trainer, which reloads step 4; we save every new best"),
    Case("best_between_saves_lower_limit1", dict(eval_strategy="steps", eval_steps=2, save_steps=4, max_steps=12,
                                                 save_total_limit=1, greater_is_better=False, **BEST),
         [5, 4, 1, 3, 2, 3],
         ours={"reloaded": (6, 4), "on_disk": ([6], [4])},
         why="§10, with rotation: Trainer ends with only the stale step-4 checkpoint, we with the true best"),
    Case("best_tracked_without_reload", dict(eval_strategy="steps", eval_steps=3, save_strategy="epoch",
                                             max_steps=12, save_total_limit=2, **TRACK), [3, 1, 2, 1],
         ours={"on_disk": ([3, 12], [8, 12])},
         why="§10: the best (step 3) falls between epoch saves; we save it and rotation protects it"),
    # ---- early stopping (§12)
    Case("early_stop_patience2", dict(eval_strategy="steps", eval_steps=1, save_steps=1, max_steps=12,
                                      early_stopping_patience=2, **BEST), [1, 2, 3, 3, 2, 4]),
    Case("early_stop_threshold", dict(eval_strategy="steps", eval_steps=1, save_steps=1, max_steps=12,
                                      early_stopping_patience=2, early_stopping_threshold=0.5, **BEST),
         [1, 2, 2.3, 2.6, 2.9, 3.2, 4]),
    Case("early_stop_lower_is_better", dict(eval_strategy="steps", eval_steps=2, save_steps=2, max_steps=12,
                                            early_stopping_patience=1, greater_is_better=False, **BEST),
         [5, 4, 4, 3]),
    Case("early_stop_between_saves", dict(eval_strategy="steps", eval_steps=2, save_steps=4, max_steps=12,
                                          early_stopping_patience=2, **BEST), [1, 2, 5, 3, 4, 3],
         ours={"reloaded": (6, 4), "on_disk": ([2, 4, 6, 8], [4, 8])},
         why="§10 under early stopping: the stop is decided at the same step, the reloaded checkpoint differs"),
    Case("early_stop_without_saving", dict(eval_strategy="steps", eval_steps=2, save_strategy="no", max_steps=12,
                                           early_stopping_patience=1, **TRACK), [1, 3, 2],
         ours={"best_step": (4, None)},
         why="best_global_step is the step of the best evaluation even when nothing is saved; Trainer leaves it "
             "unset without a save strategy"),
    Case("early_stop_mid_epoch_saves_by_epoch", dict(eval_strategy="steps", eval_steps=3, save_strategy="epoch",
                                                     max_steps=12, early_stopping_patience=1, **TRACK),
         [1, 2, 2, 3],
         ours={"on_disk": ([3, 4, 6, 8, 9], [4, 8, 9])},
         why="§10: new bests at steps 3 and 6 are saved too; the epoch save at the stopping step is Trainer's"),
    # ---- epoch strategy (§6)
    Case("epochs_best_limit1", dict(eval_strategy="epoch", save_strategy="epoch", num_train_epochs=3,
                                    save_total_limit=1, **BEST), [1, 3, 2]),
    Case("epochs_max_steps_mid_epoch", dict(eval_strategy="epoch", save_strategy="epoch", max_steps=10, **BEST),
         [1, 3, 2]),
    Case("epochs_early_stop", dict(eval_strategy="epoch", save_strategy="epoch", num_train_epochs=4,
                                   early_stopping_patience=1, **BEST), [1, 3, 2, 4]),
    # ---- eval_on_start (§4): a sanity check, never a best-model candidate
    Case("eval_on_start_scores_best", dict(eval_strategy="steps", eval_steps=4, save_steps=4, max_steps=12,
                                           eval_on_start=True, **BEST), [9, 1, 3, 2]),
    Case("eval_on_start_early_stop", dict(eval_strategy="steps", eval_steps=2, save_steps=2, max_steps=12,
                                          eval_on_start=True, early_stopping_patience=1, **BEST), [9, 1, 2, 2, 3]),
]


@pytest.fixture(scope="module")
def job(tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("decisions_data")
    files = {"train": write_rows(d / "train.csv", [("good", 1), ("bad", 0)] * 4),
             "validation": write_rows(d / "validation.csv", [("good", 1), ("bad", 0)])}
    data, tok = tokenized_classification(tiny_bert, files)
    return dict(model=tiny_bert, files=files, data=data, tokenizer=tok)


@pytest.fixture(autouse=True)
def no_curves_png(monkeypatch):
    # The curves PNG (2-4 s of matplotlib per run) has nothing to do with decisions; 25 runs cannot afford it.
    import scaletune.tracking

    monkeypatch.setattr(scaletune.tracking, "plot_curves", lambda *a, **k: {})


@dataclass
class Outcome:
    evals: list
    stop: int
    best_metric: Optional[float]
    best_step: Optional[int]
    reloaded: Optional[int]
    on_disk: list
    final_weights: dict

    def fields(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "final_weights"}


def outcome(log_history, global_step, best_metric, best_step, best_checkpoint, output_dir, args, final) -> Outcome:
    return Outcome(evals=[h["step"] for h in log_history if "eval_score" in h], stop=global_step,
                   best_metric=best_metric, best_step=best_step,
                   reloaded=step_of(best_checkpoint) if args.get("load_best_model_at_end") else None,
                   on_disk=checkpoints_on_disk(output_dir), final_weights=final)


def run_scaletune(job, args, metrics, output_dir, **extra) -> Outcome:
    next_value, _ = scripted_metric(metrics)
    r = run(dict(model_name_or_path=job["model"], train_file=job["files"]["train"],
                 validation_file=job["files"]["validation"], output_dir=str(output_dir), do_eval=False,
                 do_predict=False, report_to="none", disable_tqdm=True, **COMMON, **args, **extra),
            compute_metrics=lambda predictions, label_ids: next_value())
    return outcome(r.log_history, r.global_step, r.best_metric, r.best_global_step, r.best_model_checkpoint,
                   output_dir, args, weights(output_dir))


def trainer_for(job, args, metrics, output_dir):
    """What a Trainer user writes: early stopping is a callback, the rest are TrainingArguments."""
    next_value, _ = scripted_metric(metrics)
    args = dict(args)
    early = None
    if "early_stopping_patience" in args:
        early = {"patience": args.pop("early_stopping_patience"),
                 "threshold": args.pop("early_stopping_threshold", 0.0)}
    return make_trainer(job["model"], output_dir, job["data"], job["tokenizer"],
                        compute_metrics=lambda eval_prediction: next_value(), early_stopping=early,
                        **COMMON, **args)


def trainer_outcome(trainer, args) -> Outcome:
    s = trainer.state
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return outcome(s.log_history, s.global_step, s.best_metric, s.best_global_step, s.best_model_checkpoint,
                   trainer.args.output_dir, args, final)


def run_trainer(job, args, metrics, output_dir) -> Outcome:
    trainer = trainer_for(job, args, metrics, output_dir)
    trainer.train()
    return trainer_outcome(trainer, args)


def assert_reload_happened(o: Outcome, output_dir, side: str):
    """The final model is the reloaded checkpoint's weights, not the last step's."""
    if o.reloaded is None:
        return
    assert o.reloaded in o.on_disk, f"{side}: reloaded checkpoint-{o.reloaded} is not on disk"
    assert max_abs_diff(weights(output_dir / f"checkpoint-{o.reloaded}"), o.final_weights) == 0, side


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decisions_match_trainer(case, job, tmp_path):
    ours = run_scaletune(job, case.args, case.metrics, tmp_path / "scaletune")
    theirs = run_trainer(job, case.args, case.metrics, tmp_path / "trainer")

    a, b = ours.fields(), theirs.fields()
    for name, (ours_value, trainer_value) in case.ours.items():
        assert a.pop(name) == ours_value, f"ours ({case.why}): {name}"
        assert b.pop(name) == trainer_value, f"Trainer changed ({case.why}): {name} -- update the docs"
    assert a == b

    assert_reload_happened(ours, tmp_path / "scaletune", "scaletune")
    assert_reload_happened(theirs, tmp_path / "trainer", "Trainer")
    if ours.reloaded is not None and ours.reloaded == theirs.reloaded:
        # Same checkpoint reloaded: the same weights, since the two trainings are step-for-step identical.
        assert max_abs_diff(ours.final_weights, theirs.final_weights) < 1e-6
    if case.ours.get("reloaded"):
        # Our rule (§10): the reloaded checkpoint is the best evaluated one.
        assert ours.reloaded == ours.best_step


def test_grid_covers_the_issue():
    """The grid spans what the parity issue lists (guards against cases silently dropped)."""
    seen = lambda key, value=None: any(  # noqa: E731
        key in c.args and (value is None or c.args[key] == value) for c in CASES)
    assert len(CASES) >= 20
    doc = (REPO / "docs" / "migrating-from-trainer.md").read_text()
    assert f"test_parity_decisions.py`, {len(CASES)} configurations" in doc, "update the count in docs/migrating-from-trainer.md"
    assert seen("eval_strategy", "steps") and seen("eval_strategy", "epoch")
    assert seen("save_strategy", "epoch") and seen("save_steps")
    assert seen("save_total_limit", 1) and seen("save_total_limit", 2)
    assert any("save_total_limit" not in c.args for c in CASES)
    assert seen("load_best_model_at_end") and seen("early_stopping_patience")
    assert seen("early_stopping_threshold") and seen("greater_is_better", False)
    assert any("greater_is_better" not in c.args and "metric_for_best_model" in c.args for c in CASES)
    assert seen("eval_on_start") and seen("max_steps", 10) and seen("max_steps", 12)


@pytest.mark.slow
def test_patience_counter_survives_resume_unlike_trainer(job, tmp_path):
    """Ours (§13): the early-stopping counter is part of the checkpoint. Part 1 stops at max_steps=3 with two
    evaluations without improvement; part 2 resumes to max_steps=12. We stop at the next evaluation without
    improvement (step 4); Trainer restarts the counter from 0 (restore_callback_states_from_checkpoint=False
    by default) and trains two more steps."""
    args = dict(eval_strategy="steps", eval_steps=1, save_steps=1, early_stopping_patience=3, **BEST)
    metrics = [5, 4, 4, 4, 4, 4, 4, 4, 4]  # best at step 1, then never better

    run_scaletune(job, {**args, "max_steps": 3}, metrics, tmp_path / "scaletune")
    ours = run_scaletune(job, {**args, "max_steps": 12}, metrics[3:], tmp_path / "scaletune",
                         resume_from_checkpoint="latest")

    first = trainer_for(job, {**args, "max_steps": 3}, metrics, tmp_path / "trainer")
    first.train()
    second = trainer_for(job, {**args, "max_steps": 12}, metrics[3:], tmp_path / "trainer")
    second.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-3"))
    theirs = trainer_outcome(second, args)

    assert (ours.stop, ours.evals[-1]) == (4, 4)
    assert theirs.stop == 6
    assert ours.best_step == theirs.best_step == 1 and ours.reloaded == theirs.reloaded == 1


@pytest.mark.slow
def test_resume_latest_without_checkpoint_starts_fresh_unlike_trainer(job, tmp_path):
    """Ours (§15): `latest` with no checkpoint trains from scratch, so a requeued job is idempotent; Trainer's
    `train(resume_from_checkpoint=True)` raises instead."""
    ours = run_scaletune(job, dict(max_steps=2), [0.0], tmp_path / "scaletune", resume_from_checkpoint="latest")
    assert ours.stop == 2 and ours.on_disk == [2]

    trainer = trainer_for(job, dict(max_steps=2), [0.0], tmp_path / "trainer")
    with pytest.raises(ValueError, match="No valid checkpoint"):
        trainer.train(resume_from_checkpoint=True)
