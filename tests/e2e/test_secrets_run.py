"""A real run with credentials in the environment writes and prints none of them.

The secrets reach the run the way they do in practice: as environment variables (W&B and the Hub read them),
and pasted into config values that every sink receives (run name, W&B tags and group). Every file under
output_dir is then read as bytes, W&B's offline transaction log as joined records (a value split across its
32 KiB blocks would escape a plain byte search), plus everything the process wrote to stdout/stderr.
"""

from __future__ import annotations

import pytest

from support.wandb_reader import find_runs, read_chunks, read_run

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

KEY = "fakewandbkey" + "7" * 28  # 40 characters: W&B checks an API key's format even offline
SECRETS = {
    "WANDB_API_KEY": KEY,
    "HF_TOKEN": "hf_FakeHubToken_q8w7e6r5",
    "MY_SERVICE_TOKEN": "svc-fake-token-31415926",
}


def leaks_in(data: bytes) -> list[str]:
    return [name for name, value in SECRETS.items() if value.encode() in data]


def test_run_with_secrets_in_env_and_config_leaks_none(tiny_bert, sentiment_files, tmp_path, monkeypatch, capfd):
    from scaletune.train import run

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # W&B's files land in output_dir, so they are scanned too
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    out = tmp_path / "out"
    run({"model_name_or_path": tiny_bert, "train_file": sentiment_files["train_file"],
         "validation_file": sentiment_files["validation_file"], "output_dir": str(out),
         "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64, "max_steps": 2,
         "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 2, "save_steps": 2, "do_predict": False,
         "disable_tqdm": True, "report_to": "wandb,tensorboard", "wandb_project": "st-secrets",
         "run_name": f"exp-{SECRETS['MY_SERVICE_TOKEN']}", "wandb_tags": f"base,{SECRETS['HF_TOKEN']}",
         "wandb_group": f"grp-{KEY}"})
    captured = capfd.readouterr()

    # The secrets did reach the sinks, redacted: the test would pass vacuously otherwise.
    (wandb_file,) = find_runs(out)
    wb = read_run(wandb_file)
    assert (wb.name, wb.group, wb.tags) == ("exp-***", "grp-***", ["base", "***"])
    assert wb.config["run_name"] == "exp-***" and wb.config["wandb_tags"] == "base,***"
    assert (out / "runs" / "exp-***").is_dir()  # TensorBoard's folder is named after the redacted run name
    assert "exp-***" in captured.out  # the end-of-run summary
    assert (out / "checkpoint-2").is_dir() and (out / "metrics.jsonl").is_file()

    leaks = {}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        rel = str(path.relative_to(out))
        found = leaks_in(rel.encode()) + leaks_in(path.read_bytes())
        if path.suffix == ".wandb":
            found += leaks_in(b"".join(read_chunks(path.read_bytes())))
        if found:
            leaks[rel] = sorted(set(found))
    for stream in ("out", "err"):
        if found := leaks_in(getattr(captured, stream).encode()):
            leaks[f"<std{stream}>"] = found
    assert leaks == {}
