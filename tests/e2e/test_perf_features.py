"""Issue #14's features in real runs: an exact resume inside a length-grouped epoch, disjoint length-grouped
batches on 2 DDP processes, masked-LM runs whose sparse-logits head trains, evaluates and exports like the
full-logits path, and the process set-up (no DeepSpeed import unless asked, huge pages for large CPU tensors)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scaletune.train import run
from support.tiny import REPO, free_port, make_tiny_bert, run_cli

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

QUIET = {"disable_tqdm": True, "report_to": "none", "do_predict": False, "logging_steps": 1}


def train_losses(result) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in result.log_history if "loss" in e}


def test_resume_inside_a_length_grouped_epoch_is_exact(tiny_bert, sentiment_files, tmp_path):
    """96 rows of 5-15 words in batches of 8: 12 updates per epoch. The checkpoint at step 5 is mid-epoch 0;
    the resumed run must replay epoch 0's grouped order from batch 5 and draw epoch 1's the same way."""
    cfg = {**QUIET, "model_name_or_path": tiny_bert, **sentiment_files, "per_device_train_batch_size": 8,
           "max_steps": 16, "save_steps": 5, "eval_strategy": "no", "learning_rate": 1e-3,
           "train_sampling_strategy": "group_by_length"}
    full = run({**cfg, "output_dir": str(tmp_path / "full")})
    # The state a run killed after step 5 leaves behind: its latest checkpoint, nothing newer.
    shutil.copytree(tmp_path / "full" / "checkpoint-5", tmp_path / "resumed" / "checkpoint-5")
    resumed = run({**cfg, "output_dir": str(tmp_path / "resumed"), "resume_from_checkpoint": "latest"})
    want, got = train_losses(full), train_losses(resumed)
    assert sorted(got) == list(range(1, 17))
    for step in range(6, 17):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert resumed.metrics["eval_loss"] == pytest.approx(full.metrics["eval_loss"], rel=1e-6)
    # The option is wired: a random order trains on other batches.
    shuffled = run({**cfg, "output_dir": str(tmp_path / "random"), "train_sampling_strategy": "random",
                    "save_strategy": "no", "max_steps": 3})
    assert [train_losses(shuffled)[s] for s in (1, 2, 3)] != [want[s] for s in (1, 2, 3)]


SHARDS = textwrap.dedent('''
    import json, sys
    import datasets, numpy as np, torch
    from scaletune.config import load_config
    from scaletune.data import build_dataloader, length_grouped_indices, sequence_lengths
    from scaletune.distributed import build_accelerator

    cfg = load_config({"train_file": "x.csv", "train_sampling_strategy": "group_by_length", "data_seed": 11,
                       "per_device_train_batch_size": 4})
    acc = build_accelerator(cfg)
    lengths = np.random.default_rng(0).integers(1, 100, size=64)
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * int(n) for n in lengths], "idx": list(range(64))})
    collate = lambda rows: {"idx": torch.tensor([r["idx"] for r in rows])}
    loader = acc.prepare(build_dataloader(ds, collate, 4, True, cfg.training))
    out = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        out[epoch] = [b["idx"].tolist() for b in loader]
    loader.set_epoch(1)
    out["resumed"] = [b["idx"].tolist() for b in acc.skip_first_batches(loader, 3)]
    out["order"] = {e: length_grouped_indices(sequence_lengths(ds), 4, 11, e) for e in (0, 1)}
    with open(f"{sys.argv[1]}/rank{acc.process_index}.json", "w") as f:
        json.dump(out, f)
''')


def test_two_ddp_processes_get_disjoint_length_grouped_batches(tmp_path):
    """Real `accelerate launch` with 2 processes over gloo: every rank computes the same order, accelerate
    deals its batches out round-robin, and a mid-epoch skip keeps each rank on its own batches."""
    script = tmp_path / "shards.py"
    script.write_text(SHARDS)
    run_cli([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
             str(free_port()), str(script), str(tmp_path)], env={"ACCELERATE_USE_CPU": "true"}, cwd=REPO)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        seen = [[i for b in rank[epoch] for i in b] for rank in ranks]
        assert not set(seen[0]) & set(seen[1]), epoch
        assert sorted(seen[0] + seen[1]) == list(range(64)), epoch
        order = ranks[0]["order"][epoch]
        assert ranks[1]["order"][epoch] == order
        batches = [order[i:i + 4] for i in range(0, 64, 4)]
        for r, rank in enumerate(ranks):
            assert rank[epoch] == batches[r::2], (epoch, r)  # batch k goes to rank k % 2
    for rank in ranks:
        assert rank["resumed"] == rank["1"][3:]


def test_mlm_sparse_logits_train_evaluate_and_export_like_full_logits(tmp_path, monkeypatch):
    """line_by_line masked-LM (uneven lines, length-grouped) with and without the sparse head: the same
    per-step losses and eval metrics, and the exported model fills masks in a transformers pipeline."""
    from transformers import pipeline

    from scaletune.tasks.mlm import MaskedLMTask

    model = make_tiny_bert(tmp_path / "bert", mlm=True)
    lines = tmp_path / "train.txt"
    words = "the a film plot actor scene story was very good bad dull moving".split()
    lines.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 17))
                               for i in range(120)) + "\n")
    cfg = {**QUIET, "task": "mlm", "model_name_or_path": str(model), "train_file": str(lines), "line_by_line": True,
           "validation_split_percentage": 20, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
           "max_steps": 6, "save_strategy": "no", "eval_strategy": "steps", "eval_steps": 3,
           "learning_rate": 1e-3, "train_sampling_strategy": "group_by_length"}
    sparse = run({**cfg, "output_dir": str(tmp_path / "sparse")})
    monkeypatch.setattr(MaskedLMTask, "sparse_logits", False)
    full = run({**cfg, "output_dir": str(tmp_path / "full")})
    got, want = train_losses(sparse), train_losses(full)
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    for key in ("eval_loss", "eval_perplexity", "eval_accuracy"):
        assert sparse.metrics[key] == pytest.approx(full.metrics[key], rel=1e-5), key
    fill = pipeline("fill-mask", model=str(tmp_path / "sparse"), device="cpu")
    assert len(fill("the film was [MASK]")) == 5


def test_a_run_without_deepspeed_never_imports_it(tiny_bert, sentiment_files, tmp_path):
    """DeepSpeed is installed here, and accelerate's unwrap_model imports it whenever it is: a DDP or
    one-process run must not pay for it (0.4 s and a stray warning line per process). One real run, with
    checkpoints, evaluation and export (each unwraps the model), in a fresh interpreter."""
    code = textwrap.dedent(f"""
        import sys
        from scaletune.train import run
        run({{"model_name_or_path": {tiny_bert!r}, "train_file": {sentiment_files["train_file"]!r},
              "validation_file": {sentiment_files["validation_file"]!r}, "max_steps": 2, "save_steps": 1,
              "eval_strategy": "steps", "eval_steps": 1, "load_best_model_at_end": True,
              "output_dir": {str(tmp_path / "out")!r}, "disable_tqdm": True, "report_to": "none"}})
        print("deepspeed imported:", "deepspeed" in sys.modules)
    """)
    proc = run_cli([sys.executable, "-c", code], cwd=REPO, timeout=300)
    assert "deepspeed imported: False" in proc.stdout, proc.stdout[-2000:]
    assert "Setting accelerator to CPU" not in proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_deepspeed_is_imported_without_mlflow_unless_the_run_logs_to_it():
    """mlflow is installed here (the test extra), and DeepSpeed imports it for its autotuner: 1.4 s of CPU and a
    `uname -p` subprocess in every DeepSpeed process. scaletune's import hides it, and mlflow still imports after.
    (A run that logs to mlflow imports it first: nothing is hidden then.)"""
    code = textwrap.dedent("""
        import sys
        from scaletune.distributed.deepspeed import import_deepspeed
        import_deepspeed(with_mlflow=False)
        print("deepspeed", "deepspeed" in sys.modules, "mlflow", "mlflow" in sys.modules)
        import mlflow
        print("mlflow importable", mlflow.__name__)
    """)
    proc = run_cli([sys.executable, "-c", code], cwd=REPO, timeout=300)
    assert "deepspeed True mlflow False" in proc.stdout and "mlflow importable mlflow" in proc.stdout, proc.stdout


def _thp_available() -> bool:
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _thp_available(), reason="the kernel has transparent huge pages off (or is not Linux)")
@pytest.mark.parametrize("user_setting", [None, "0"])
def test_large_cpu_tensors_go_on_huge_pages_unless_the_user_says(user_setting):
    """A run started before torch is imported (as `python -m scaletune.train` is) puts CPU tensors of 2 MB and
    more on transparent huge pages: a fresh 47 MB tensor (MiniLM's word-embedding gradient, made anew every
    update) then costs a few hundred page faults instead of one per 4 KB (11,444). THP_MEM_ALLOC_ENABLE=0 in the
    environment is the user's choice and kept."""
    code = textwrap.dedent("""
        import resource
        from scaletune.config import ConfigError
        from scaletune.train import run
        try:
            run(["--no_such_key", "1"])  # refused before torch is imported: only the process set-up has happened
        except ConfigError:
            pass
        import torch
        grad = torch.zeros(30522, 384)  # warm the allocator's own bookkeeping
        del grad
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        grad = torch.zeros(30522, 384)
        grad.add_(1.0)
        print("faults:", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_setting
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    faults = int(proc.stdout.split("faults:")[1])
    pages_of_4k = 30522 * 384 * 4 // 4096
    if user_setting is None:
        assert faults < pages_of_4k / 4, faults  # a huge page that could not be had falls back to 4 KB ones
    else:
        assert faults >= pages_of_4k * 0.9, faults
