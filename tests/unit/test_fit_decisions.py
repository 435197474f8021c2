"""Cadence and decisions of the real `loop.fit`, driven by fakes in milliseconds: which steps log, evaluate and
save, which checkpoints stay, which step is best, when training stops and why.

The real parts: `fit`, the config (load_config), the plan (schedule.resolve_plan), `TrainData` (windows and
epoch ends over a fake loader) and `Evaluator.track` (best metric, patience). The fakes: the update (Stepper),
the evaluation's inference (scripted metrics), the disk (a Checkpointer keeping the steps it would have on disk,
rotated by schedule's rules), the tracker and the preemption watcher. The real weights of a best-model reload
are checked by one real run (tests/e2e/test_decisions.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scaletune import schedule
from scaletune.config import load_config
from scaletune.evaluation import Evaluator
from scaletune.loop import Loop, fit
from scaletune.state import TrainingState
from scaletune.stepper import NonFiniteWatch, TrainData, Update

TRAIN_ROWS, BATCH = 96, 16  # 6 updates per epoch, as the e2e runs on the toy sentiment CSVs


class FakeAccelerator:
    device = torch.device("cpu")
    num_processes = 1
    is_main_process = True

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def print(self, *args, **kwargs):
        pass


class FakeLoader:
    """What TrainData reads of a DataLoader: length, iteration, the epoch seed and the collator."""

    collate_fn = None

    def __init__(self, batches: int):
        self.batches = batches

    def __len__(self):
        return self.batches

    def __iter__(self):
        return iter({"input_ids": torch.zeros(1, 1)} for _ in range(self.batches))

    def set_epoch(self, epoch: int) -> None:
        pass


class FakeStepper:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.model = torch.nn.Linear(1, 1)
        self.nonfinite = NonFiniteWatch(accelerator.device)
        self.windows = []

    def update(self, window: list) -> Update:
        self.windows.append(len(window))
        return Update(loss=torch.tensor(1.0), grad_norm=None, learning_rate=1e-3, finite=None,
                      tokens=torch.tensor(0))

    def after_evaluation(self, metrics: dict) -> None:
        pass


class ScriptedEvaluator(Evaluator):
    """The real best-metric and patience tracking; evaluation returns the next scripted value (the last repeats)."""

    def __init__(self, args, values: list, name: str):
        self.args, self.values, self.name, self.calls = args, values, name, []

    def evaluate(self, dataloader=None, prefix: str = "eval"):
        value = self.values[min(len(self.calls), len(self.values) - 1)]
        self.calls.append(value)
        return SimpleNamespace(metrics={f"{prefix}_{self.name}": value})


class FakeCheckpointer:
    """The steps a Checkpointer would hold on disk: each save records the best checkpoint and rotates by
    schedule's rule (§11); `reload_best` does the final rotation of load_best_model_at_end."""

    def __init__(self, args):
        self.args = args
        self.saved: list[int] = []
        self.on_disk: set[int] = set()

    def save(self, state: TrainingState) -> None:
        step = state.global_step
        if state.best_global_step == step:
            state.best_checkpoint_step = step
        self.saved.append(step)
        self.on_disk.add(step)
        self.on_disk -= set(schedule.checkpoints_to_delete(sorted(self.on_disk), self.args.save_total_limit,
                                                           state.best_checkpoint_step, step))

    def flush(self) -> None:
        pass

    def latest_name(self):
        return f"checkpoint-{max(self.on_disk)}" if self.on_disk else None

    def reload_best(self, state: TrainingState) -> None:
        if self.args.load_best_model_at_end and state.best_checkpoint_step is not None:
            self.on_disk -= set(schedule.final_checkpoints_to_delete(sorted(self.on_disk), self.args.save_total_limit,
                                                                     state.best_checkpoint_step))


class FakeTracker:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def start(self, max_steps: int, step: int) -> None:
        pass

    def log(self, logs: dict, step: int) -> None:
        self.logged.append((step, logs))

    def progress(self, step, loss, learning_rate) -> None:
        pass


class FakeWatcher:
    def __init__(self, stop_at=None):
        self.stop_at, self.step = stop_at, 0

    def should_stop(self, accelerator) -> bool:
        self.step += 1
        return self.step == self.stop_at


class FakeMeter:
    def data_wait(self, seconds: float) -> None:
        pass

    def interval_metrics(self) -> dict:
        return {}


def fit_with_fakes(tmp_path, cfg: dict, values=(0.1,), name="score", stop_at=None, accumulation_batches=None):
    config = load_config({"model_name_or_path": "tiny", "train_file": "train.csv", "validation_file": "val.csv",
                          "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": BATCH,
                          "logging_steps": 1, "eval_strategy": "steps", "do_predict": False, **cfg})
    t = config.training
    accelerator = FakeAccelerator()
    meter = FakeMeter()
    loader = FakeLoader(accumulation_batches or TRAIN_ROWS // BATCH)
    data = TrainData(loader, accelerator, t.gradient_accumulation_steps, meter)
    plan = schedule.resolve_plan(t, data.batches_per_epoch)
    loop = Loop(args=t, data=data, stepper=FakeStepper(accelerator), evaluator=ScriptedEvaluator(t, list(values), name),
                checkpointer=FakeCheckpointer(t), tracker=FakeTracker(), meter=meter, watcher=FakeWatcher(stop_at))
    state = TrainingState()
    reason = fit(loop, state, plan)
    loop.checkpointer.reload_best(state)  # as the run's finish does
    return SimpleNamespace(loop=loop, state=state, reason=reason, plan=plan)


def steps_with(logged, prefix: str) -> list[int]:
    return [step for step, logs in logged if any(k.startswith(prefix) for k in logs)]


# The cases of tests/e2e/test_decisions.py (which ran each as a real training run), with the saves and stop reason.
CASES = {
    # save_steps = 2 x eval_steps, limit 2: best at 4 protected; every new best is saved (ours, §10).
    "save_twice_eval_limit2": dict(
        cfg=dict(max_steps=10, eval_steps=2, save_steps=4, save_total_limit=2, metric_for_best_model="score",
                 load_best_model_at_end=True),
        seq=[0.1, 0.5, 0.3, 0.2, 0.4], evals=[2, 4, 6, 8, 10], saved=[2, 4, 8, 10], left=[4, 10], best=4, stop=10),
    # Trainer's bug case: best at step 6 falls between saves. Trainer reloads checkpoint-4; we saved 6.
    "best_between_saves": dict(
        cfg=dict(max_steps=10, eval_steps=2, save_steps=4, metric_for_best_model="score",
                 load_best_model_at_end=True),
        seq=[0.1, 0.2, 0.9, 0.3, 0.3], evals=[2, 4, 6, 8, 10], saved=[2, 4, 6, 8, 10], left=[2, 4, 6, 8, 10],
        best=6, stop=10),
    # limit 1: best (2) and latest kept during training, only the best at the end.
    "limit1": dict(
        cfg=dict(max_steps=6, eval_steps=2, save_steps=2, save_total_limit=1, metric_for_best_model="score",
                 load_best_model_at_end=True),
        seq=[0.5, 0.3, 0.4], evals=[2, 4, 6], saved=[2, 4, 6], left=[2], best=2, stop=6),
    # ties keep the earlier best; patience 2 stops after two non-improving evaluations.
    "ties_patience": dict(
        cfg=dict(max_steps=12, eval_steps=2, save_steps=2, metric_for_best_model="score",
                 early_stopping_patience=2),
        seq=[0.5, 0.5, 0.5, 0.9], evals=[2, 4, 6], saved=[2, 4, 6], left=[2, 4, 6], best=2, stop=6,
        reason="early_stopping"),
    # threshold: improvements of <= 0.1 count as no improvement; lower is better for a *loss name.
    "threshold_loss_metric": dict(
        cfg=dict(max_steps=14, eval_steps=2, save_steps=2, metric_for_best_model="myloss",
                 early_stopping_patience=2, early_stopping_threshold=0.1),
        seq=[1.0, 0.95, 0.5, 0.45, 0.44, 0.1], name="myloss", evals=[2, 4, 6, 8, 10], saved=[2, 4, 6, 8, 10],
        left=[2, 4, 6, 8, 10], best=10, stop=10, reason="early_stopping"),
    # max_steps off the interval: one more evaluation and save at the last step.
    "max_steps_off_interval": dict(
        cfg=dict(max_steps=7, eval_steps=3, save_steps=3), seq=[0.1], evals=[3, 6, 7], saved=[3, 6, 7],
        left=[3, 6, 7], best=None, stop=7),
    # epoch strategy: 96 rows / batch 16 = 6 updates per epoch.
    "epoch_strategy": dict(
        cfg=dict(num_train_epochs=2, eval_strategy="epoch", save_strategy="epoch", metric_for_best_model="score",
                 greater_is_better=False, load_best_model_at_end=True, save_total_limit=1),
        seq=[0.2, 0.3], evals=[6, 12], saved=[6, 12], left=[6], best=6, stop=12),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decisions(name, tmp_path):
    case = CASES[name]
    done = fit_with_fakes(tmp_path, case["cfg"], case["seq"], case.get("name", "score"))
    assert steps_with(done.loop.tracker.logged, "eval_") == case["evals"]
    assert [e["step"] for e in done.state.log_history if any(k.startswith("eval_") for k in e)] == case["evals"]
    assert done.state.global_step == case["stop"]
    assert done.reason == case.get("reason", "max_steps")
    assert done.loop.checkpointer.saved == case["saved"]
    assert sorted(done.loop.checkpointer.on_disk) == case["left"]
    assert done.state.best_global_step == case["best"]
    assert done.state.best_checkpoint_step == case["best"]
    # logging_steps=1: the training loss is logged at every update, once.
    assert steps_with(done.loop.tracker.logged, "loss") == list(range(1, case["stop"] + 1))


def test_logging_follows_logging_steps_only_and_nothing_else_runs_when_switched_off(tmp_path):
    # As Trainer: the last step (7) is not an extra log step; evaluation and saving are off.
    done = fit_with_fakes(tmp_path, dict(max_steps=7, logging_steps=3, eval_strategy="no", save_strategy="no"))
    assert steps_with(done.loop.tracker.logged, "loss") == [3, 6]
    assert done.loop.checkpointer.saved == [] and done.loop.evaluator.calls == []


def test_accumulation_windows_and_a_short_last_window_still_updates(tmp_path):
    # 7 batches per epoch, 3 per update: windows of 3, 3, 1 -> 3 updates per epoch (§1).
    done = fit_with_fakes(tmp_path, dict(num_train_epochs=2, gradient_accumulation_steps=3, eval_strategy="no",
                                         save_strategy="epoch"), accumulation_batches=7)
    assert done.loop.stepper.windows == [3, 3, 1, 3, 3, 1]
    assert done.loop.checkpointer.saved == [3, 6]
    assert done.state.epoch == 2.0


def test_a_preempted_run_saves_and_stops_at_the_agreed_step(tmp_path):
    done = fit_with_fakes(tmp_path, dict(max_steps=10, eval_steps=4, save_steps=4), stop_at=3)
    assert done.reason == "preempted"
    assert done.state.global_step == 3
    assert done.loop.checkpointer.saved == [3]
