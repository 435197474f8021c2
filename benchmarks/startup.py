"""How fast a bad config is reported: `python -m scaletune.train` with a misspelt key, against its peers.

Each case runs in a fresh process, alternating, `--repeats` times; prints the median wall-clock of each and the
ratios to the floor (`python -c pass`) and to `python -c "import torch"` (what the report would cost if torch
were imported first). The issue asks for < 1 s.

* floor:       `python -c pass` -- the interpreter itself;
* torch:       `python -c "import torch"`;
* typo:        `python -m scaletune.train --train_file train.csv --learning_rat 1e-4` (a misspelt key);
* bad_file:    `python -m scaletune.train --train_file missing.csv` (a data file that is not there).

    python benchmarks/startup.py [--repeats 5] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, median

CASES = {
    "floor": (["-c", "pass"], 0, None),
    "torch": (["-c", "import torch"], 0, None),
    "typo": (["-m", "scaletune.train", "--train_file", "train.csv", "--learning_rat", "1e-4"], 2, "learning_rat"),
    "bad_file": (["-m", "scaletune.train", "--train_file", "missing.csv"], 2, "missing.csv"),
}


def one(case: str, cwd: str) -> float:
    argv, code, said = CASES[case]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    took = time.perf_counter() - start
    if proc.returncode != code or (said and said not in proc.stderr):
        raise SystemExit(f"{case}: exit {proc.returncode} (expected {code}); stderr:\n{proc.stderr[-2000:]}")
    if said and len([line for line in proc.stderr.splitlines() if line.strip()]) != 1:
        raise SystemExit(f"{case}: expected one line on stderr, got:\n{proc.stderr}")
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="one repeat (CI's smoke run)")
    args = p.parse_args()
    repeats = 1 if args.tiny else args.repeats
    times: dict[str, list[float]] = {c: [] for c in CASES}
    with tempfile.TemporaryDirectory() as cwd:
        Path(cwd, "train.csv").write_text("text,label\ngood,1\nbad,0\n")
        for case in CASES if not args.tiny else ():  # warm the page cache: torch's first import reads ~1 GB
            one(case, cwd)
        for _ in range(repeats):
            for case in CASES:
                times[case].append(one(case, cwd))
    print(f"machine: {machine()}")
    print(f"{repeats} repeat(s) per case, alternating{'' if args.tiny else ', after one warm-up run each'}")
    med = {c: median(t) for c, t in times.items()}
    for case, t in times.items():
        print(f"  {case:10s} {med[case] * 1000:8.0f} ms  (each: {', '.join(f'{x * 1000:.0f}' for x in t)})")
    for case in ("typo", "bad_file"):
        print(f"{case}: {med[case]:.2f} s wall-clock (target < 1 s); ratio to python alone "
              f"{med[case] / med['floor']:.2f}, to importing torch {med[case] / med['torch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
