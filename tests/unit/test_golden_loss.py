"""Golden losses: two tiny fixed jobs (tests/support/golden.py) must log the per-step loss and grad_norm pinned
in tests/golden/losses.json, to rtol 1e-5, as torchtitan and torchtune pin theirs.

A refactor of the loop, the loss, the data order or the masking that changes the numbers fails here in
seconds, long before the parity suite would. If the change is meant to change the numbers, regenerate the
file deliberately (tests/golden/regenerate.py says when that is right); never to make this test pass.
"""

from __future__ import annotations

import pytest

from support.golden import JOBS, LOGGED, read_golden, run_job

RTOL = 1e-5


@pytest.fixture
def cpu_accelerator(monkeypatch):
    """The numbers were recorded on CPU; GPU kernels would give others."""
    from accelerate.state import AcceleratorState

    # An earlier in-process run may have left accelerate's singleton on a GPU; it refuses cpu=True then.
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # later tests must not inherit the CPU pin


def differences(got: list[dict], golden: list[dict]) -> list[str]:
    out = []
    for now, then in zip(got, golden):
        for key in LOGGED:
            if abs(now[key] - then[key]) > RTOL * abs(then[key]):
                out.append(f"  step {then['step']:>2} {key:<9}  golden {then[key]:.9g}  now {now[key]:.9g}  "
                           f"(relative change {(now[key] - then[key]) / then[key]:+.2e})")
    return out


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
@pytest.mark.parametrize("job", sorted(JOBS))
def test_per_step_loss_and_grad_norm_match_the_golden_file(job, cpu_accelerator, tmp_path):
    golden = read_golden()[job]
    got = run_job(job, tmp_path)
    advice = ("If the change is meant to change the training numbers, regenerate deliberately (read the "
              "docstring of tests/golden/regenerate.py); otherwise it changed behaviour it should have kept.")
    assert [e["step"] for e in got] == [e["step"] for e in golden], (
        f"{job}: logged steps {[e['step'] for e in got]}, golden {[e['step'] for e in golden]}.\n{advice}")
    changed = differences(got, golden)
    assert not changed, (f"{job}: {len(changed)} logged value(s) moved beyond rtol {RTOL}:\n"
                         + "\n".join(changed) + f"\n{advice}")
