"""Rewrite tests/golden/losses.json: the per-step loss and grad_norm of the two pinned jobs in
tests/support/golden.py, which tests/unit/test_golden_loss.py compares against at rtol 1e-5.

Regenerating is a decision, not a fix. Run it only when a change is *meant* to change the training numbers
and you can say why, in the commit message: a deliberate change to the loss normalisation, optimizer, data
order or masking; a change to the golden jobs themselves; a torch/transformers upgrade whose kernels move the
numbers beyond 1e-5 (check first that the upgrade is the only cause). Never run it to make a refactor's
failing test pass: a refactor that is meant to keep behaviour must keep these numbers, and a failure means it
did not.

    .venv/bin/python tests/golden/regenerate.py

To pin the numbers of a given release rather than of your working tree, run it against a clean worktree of
that commit, with these tests:

    git worktree add /tmp/st-golden <commit>
    PYTHONPATH=/tmp/st-golden/src:tests .venv/bin/python tests/golden/regenerate.py
    git worktree remove /tmp/st-golden

The script prints which scaletune source it ran and records that source's git commit in the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The same environment as tests/conftest.py, and CPU as in the test: GPU kernels give other numbers.
for key, value in {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}.items():
    os.environ.setdefault(key, value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `support` without PYTHONPATH=tests

from support.golden import GOLDEN_FILE, JOBS, run_job  # noqa: E402


def source_of_scaletune() -> tuple[str, str]:
    """(folder, git commit) of the scaletune that ran; the commit ends in "+dirty" if that tree has changes."""
    import scaletune.train

    folders = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith("scaletune.") and path:
            path = Path(path).resolve()
            folders.add(path.parents[name.count(".") + (path.name == "__init__.py")])
    # scaletune is a namespace package: another checkout on sys.path could supply modules this one lacks.
    assert len(folders) == 1, f"scaletune modules were loaded from several places: {sorted(map(str, folders))}"
    src = Path(scaletune.train.__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "."):
        commit += "+dirty"
    return str(src), commit


def main() -> None:
    import accelerate
    import torch
    import transformers

    jobs = {}
    with tempfile.TemporaryDirectory(prefix="scaletune-golden-") as tmp:
        for name in JOBS:
            jobs[name] = run_job(name, Path(tmp) / name)
            print(f"{name}: {len(jobs[name])} steps, loss {[round(e['loss'], 6) for e in jobs[name]]}")
    src, commit = source_of_scaletune()
    print(f"scaletune from {src} at {commit}")
    record = {
        "about": "Per-step loss and grad_norm of the jobs in tests/support/golden.py; rewrite only with "
                 "tests/golden/regenerate.py (read its docstring first).",
        "generated_from": {"scaletune_commit": commit, "torch": torch.__version__,
                           "transformers": transformers.__version__, "accelerate": accelerate.__version__},
        "jobs": jobs,
    }
    GOLDEN_FILE.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {GOLDEN_FILE}")


if __name__ == "__main__":
    main()
