"""Checkpoints whose every file is checked, a lock that holds, an atomic export (issue #26, items 3, 4, 6, 7, 12).

Real runs, as in the fault suite (test_faults.py, whose helpers and fixtures these reuse): the output dirs of
finished runs are copied, damaged the way a user or the storage would, and resumed as `python -m scaletune.train`
would resume them, in this process (support/inprocess.py); the two-run race starts real processes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from scaletune.checkpoint import MANIFEST_FILE, verify, write_manifest
from scaletune.errors import CheckpointError
from scaletune.state import STATE_FILE
from support.faults import (LOCK_FILE, assert_one_line_error, describe, logs, nonempty_lines, partials, start, stop,
                            train_cmd, tree_digest, wait_for)
from support.inprocess import main_in_process
from test_faults import (START_TIMEOUT, base, cli, resumed_from, setup_run, state_of,  # noqa: F401 (fixtures)
                         small_disk)

pytestmark = pytest.mark.slow  # every test here launches a training run or a process


def finished_cfg(tiny_bert: str, files: dict, out: Path) -> dict:
    """The configuration of conftest's `finished_run` (2 steps, a checkpoint per step), in another output dir."""
    return {"model_name_or_path": tiny_bert, **files, "output_dir": str(out), "max_steps": 2, "save_steps": 1,
            "do_predict": False, "disable_tqdm": True}


@pytest.fixture
def copied_run(finished_run, tiny_bert, sentiment_files, tmp_path) -> tuple[Path, dict]:
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)  # the shared run stays as it is
    return out, finished_cfg(tiny_bert, sentiment_files, out)


def assert_refused_then_falls_back(cfg: dict, out: Path, problem: str) -> None:
    """An explicit resume of the damaged checkpoint-2 is refused in one line, changing nothing; `latest` skips
    it with one true line, resumes checkpoint-1 and saves step 2 again."""
    ckpt = out / "checkpoint-2"
    before = tree_digest(out)
    explicit = main_in_process(cli({**cfg, "resume_from_checkpoint": str(ckpt)}))
    assert_one_line_error(explicit, f"checkpoint {str(ckpt)!r} is damaged: {problem}. Resume from another")
    assert tree_digest(out) == before

    latest = main_in_process(cli({**cfg, "resume_from_checkpoint": "latest"}))
    assert latest.returncode == 0, describe(latest)
    said = [line for line in nonempty_lines(latest.stderr) if "damaged" in line]
    assert said == [f"scaletune: checkpoint-2 is damaged ({problem}); falling back to the previous checkpoint."], \
        describe(latest)
    assert resumed_from(latest.stdout) == (str(out / "checkpoint-1"), 1)
    assert state_of(out)["global_step"] == 2
    assert verify(out / "checkpoint-2") is None  # saved again, whole


# ============================================================================ 3: trainer_state.json is checked


def test_an_edited_trainer_state_is_damage_and_state_files_must_agree(copied_run):
    out, cfg = copied_run
    ckpt = out / "checkpoint-2"
    state_file = ckpt / STATE_FILE
    state_file.write_text(json.dumps({**state_of(ckpt), "global_step": 1}, indent=2))  # an edit, or bit rot
    problem = f"{str(state_file)!r} is corrupt (checksum differs from the one written)"

    assert_refused_then_falls_back(cfg, out, problem)

    # Edited and checksummed again (a tool that rewrites manifests, or a bug): the state files must agree.
    saved = state_of(ckpt)
    state_file.write_text(json.dumps({**saved, "global_step": 1}, indent=2))
    write_manifest(ckpt)
    assert verify(ckpt) == f"{str(state_file)!r} says global step 1 in checkpoint-2"
    state_file.write_text(json.dumps({**saved, "world_size": 2}, indent=2))
    write_manifest(ckpt)
    assert verify(ckpt) == f"{str(state_file)!r} says 2 process(es) wrote it, and it holds the random state of 1"
    state_file.write_text(json.dumps(saved, indent=2))
    write_manifest(ckpt)
    (ckpt / "random_states_1.pkl").write_bytes((ckpt / "random_states_0.pkl").read_bytes())  # not in the manifest
    assert verify(ckpt) == f"{str(ckpt / 'random_states_1.pkl')!r} is not in {str(ckpt / MANIFEST_FILE)!r} " \
                           f"(added after the save)"
    (ckpt / "random_states_1.pkl").unlink()
    write_manifest(ckpt)
    assert verify(ckpt) is None
    # A schedule of another step: behind (no fp16 here, so no overflow can have held it back) or ahead.
    one = out / "checkpoint-1"
    for source, target, stepped, says in ((one, ckpt, 1, 2), (ckpt, one, 2, 1)):
        own = target.parent / "own-scheduler.bin"
        shutil.copy(target / "scheduler.bin", own)
        shutil.copy(source / "scheduler.bin", target / "scheduler.bin")
        write_manifest(target)
        with pytest.raises(CheckpointError, match=re.escape(
                f"{str(target / 'scheduler.bin')!r} has stepped the learning-rate schedule {stepped} time(s), and "
                f"{str(target / STATE_FILE)!r} says {says} updates were applied")):
            setup_run({**cfg, "resume_from_checkpoint": str(target)})
        shutil.move(own, target / "scheduler.bin")
        write_manifest(target)


# ============================================================================ 4: one lock, two runs

RACES = 12
"""Two whole runs per race; the lock itself is raced 300 times, forked, in tests/unit/test_lock.py. These check
the run's wiring of it: the winner goes on, the loser's one line names it."""


def test_two_runs_started_together_on_one_output_dir_never_both_proceed(tiny_bert, sentiment_files, tmp_path):
    """Each time, both runs start at once; the one that takes the lock says it starts fresh (then it is stopped
    by the test, holding the lock), the other is refused in one line naming the first. A run that went on
    without the lock would say it starts fresh too."""
    for i in range(RACES):
        out = tmp_path / f"out-{i}"
        cfg = base(tiny_bert, sentiment_files, out, max_steps=100000, resume_from_checkpoint="latest")
        procs = [start(train_cmd(cli(cfg)), tmp_path / "logs", f"{i}-{k}") for k in range(2)]
        try:
            def decided(p) -> bool:
                return p.poll() is not None or "starting fresh" in logs(p)[1]

            for p in procs:
                wait_for(lambda: decided(p), None, START_TIMEOUT, f"race {i}: pid {p.pid} past the lock")
            went_on = [p for p in procs if "starting fresh" in logs(p)[1]]
            assert len(went_on) == 1, "\n".join(describe(p) for p in procs)
            winner, = went_on
            loser, = [p for p in procs if p is not winner]
            loser.wait(timeout=60)
            stdout, stderr = logs(loser)
            lines = nonempty_lines(stderr)
            assert loser.returncode == 2 and len(lines) == 1, describe(loser)
            assert lines[0].startswith(f"scaletune: error: output_dir {str(out)!r} is in use by another run (pid "
                                       f"{winner.pid} on"), describe(loser)
            assert json.loads((out / LOCK_FILE).read_text())["pid"] == winner.pid
        finally:
            for p in procs:
                stop(p)


# ============================================================================ 6: disk full during the export


def test_disk_full_during_the_export_is_one_line_and_keeps_the_checkpoints(tiny_bert, sentiment_files, small_disk):
    model = Path(tiny_bert, "model.safetensors").stat().st_size // 1024
    tokenizer = Path(tiny_bert, "tokenizer.json").stat().st_size // 1024
    checkpoint = 3 * model + tokenizer + 64  # as in test_faults: weights + AdamW's 2 moments + tokenizer + small
    out = small_disk(checkpoint + model // 2) / "out"  # the checkpoint fits; the exported weights do not
    cfg = base(tiny_bert, sentiment_files, out, max_steps=1, save_steps=1)
    proc = main_in_process(cli(cfg))
    line = assert_one_line_error(proc, str(out / ".export.partial"))
    assert re.search(r"no space left on (the )?device", line, re.I), line
    assert verify(out / "checkpoint-1") is None  # the checkpoint is kept, whole
    assert not (out / "model.safetensors").exists()  # no half model where a model is read
    assert not (out / ".export.partial").exists()  # the space is given back
    assert not partials(out)
    assert not (out / LOCK_FILE).exists()


# ============================================================================ 7: a missing manifest


def test_a_checkpoint_without_its_manifest_is_damaged_and_falls_back(copied_run):
    out, cfg = copied_run
    ckpt = out / "checkpoint-2"
    (ckpt / MANIFEST_FILE).unlink()
    (ckpt / "scheduler.bin").unlink()  # and one more file: nothing can tell which others are whole
    problem = f"{str(ckpt / MANIFEST_FILE)!r} is missing"

    assert_refused_then_falls_back(cfg, out, problem)


# 12 (fewer processes than saved): test_faults.py::
# test_resuming_on_fewer_processes_says_whose_random_state_is_dropped, on the two-process run it launches anyway.
