"""The bad-input table: each case through `scaletune.train.main`, as `python -m scaletune.train` calls it, into the
output dir of an earlier real run; all cases in one process (a process per case cost 2-8 s each), a few also
through `python -m scaletune.train` itself. Every case: exit code 2, exactly one line on stderr naming the
problem, no traceback, and no file of the earlier run changed (README states the count)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.faults import tree_digest as tree  # every file but the lock, by content

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def files(tmp: Path) -> dict:
    """Bad data files, made once per test."""
    made = {}
    (tmp / "latin1.csv").write_bytes("text,label\ncaf\xe9 au lait,pos\nbon,neg\n".encode("latin-1"))
    made["latin1"] = str(tmp / "latin1.csv")
    (tmp / "data.xlsx").write_text("not a format we read")
    made["xlsx"] = str(tmp / "data.xlsx")
    (tmp / "header_only.csv").write_text("text,label\n")
    made["header_only"] = str(tmp / "header_only.csv")
    (tmp / "train.json").write_text('{"text": "good", "label": "pos"}\n')
    made["json"] = str(tmp / "train.json")
    (tmp / "bad.yaml").write_text("learning_rate: [1e-4\n")
    made["bad_yaml"] = str(tmp / "bad.yaml")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    made["list_yaml"] = str(tmp / "list.yaml")
    for name, file, text in (
            ("one_row", "one_row.csv", "text,label\ngood film,pos\n"),
            ("one_line", "one_line.txt", "a single line of text\n"),
            ("mixed_labels", "mixed.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": "neg"}\n'),
            ("no_text", "no_text.csv", "text,label\n,pos\n,neg\n"),
            ("ragged", "ragged.csv", "text,label\ngood film,pos\nbad film,neg,extra\n")):
        (tmp / file).write_text(text)
        made[name] = str(tmp / file)
    return made


def model_folders(tmp: Path, model: str) -> dict:
    """Folders that are not a whole model, made from a real one: each lacks or damages one part."""
    made = {}
    for name, drop in (("no_weights", "model.safetensors"), ("no_tokenizer", "tokenizer"), ("bad_config", None)):
        folder = tmp / name
        shutil.copytree(model, folder)
        for f in folder.iterdir():
            if drop and f.name.startswith(drop):
                f.unlink()
        made[name] = str(folder)
    (tmp / "bad_config" / "config.json").write_text('{"model_type": "bert",\n')  # cut short
    (tmp / "empty_folder").mkdir()
    made["empty_folder"] = str(tmp / "empty_folder")
    return made


def cases(tiny_bert: str, data: dict, bad: dict, out: str) -> dict:
    base = ["--model_name_or_path", tiny_bert, "--train_file", data["train_file"], "--validation_file",
            data["validation_file"], "--output_dir", out, "--resume_from_checkpoint", "latest", "--max_steps", "4",
            "--save_steps", "1", "--disable_tqdm", "true"]
    fresh = [a for a in base if a not in ("--resume_from_checkpoint", "latest")]
    no_validation = [a for a in base if a not in ("--validation_file", data["validation_file"])]  # carved
    val = data["validation_file"]
    two_sets = [*base[:4], *base[6:], "--validation_files"]  # base without validation_file, then named sets
    return {
        # config: types, ranges, choices, combinations (before torch is imported)
        "unknown key": ([*base, "--learnig_rate", "1e-4"], "Did you mean 'learning_rate'"),
        "fractional max_steps": ([*base, "--max_steps", "1.5"], "max_steps"),
        "fractional batch size": ([*base, "--per_device_train_batch_size", "8.7"], "per_device_train_batch_size"),
        "word for an int": ([*base, "--per_device_train_batch_size", "eight"], "per_device_train_batch_size"),
        "zero max_seq_length": ([*base, "--max_seq_length", "0"], "max_seq_length"),
        "negative learning rate": ([*base, "--learning_rate", "-1"], "learning_rate"),
        "nan learning rate": ([*base, "--learning_rate", "nan"], "learning_rate"),
        "inf learning rate": ([*base, "--learning_rate", "inf"], "learning_rate"),
        "negative weight decay": ([*base, "--weight_decay", "-0.1"], "weight_decay"),
        "beta of one": ([*base, "--adam_beta1", "1"], "adam_beta1"),
        "unknown strategy": ([*base, "--eval_strategy", "sometimes"], "eval_strategy"),
        "misspelt choice": ([*base, "--eval_strategy", "step"], "Did you mean 'steps'"),
        "unknown scheduler": ([*base, "--lr_scheduler_type", "cosine_restarts"], "lr_scheduler_type"),
        "unknown optimizer": ([*base, "--optim", "lion"], "optim"),
        "unknown task": ([*base, "--task", "summarization"], "task"),
        "bf16 and fp16": ([*base, "--bf16", "--fp16"], "bf16 and fp16"),
        "best model without eval": ([*base, "--load_best_model_at_end", "true"], "load_best_model_at_end"),
        "cadence mismatch": ([*base, "--eval_strategy", "steps", "--eval_steps", "3", "--save_steps", "4",
                              "--load_best_model_at_end", "true"], "multiple of eval_steps"),
        "patience without eval": ([*base, "--early_stopping_patience", "2"], "early_stopping_patience"),
        "label smoothing of one": ([*base, "--label_smoothing_factor", "1"], "label_smoothing_factor"),
        "plateau without eval": ([*base, "--lr_scheduler_type", "reduce_lr_on_plateau"], "reduce_lr_on_plateau"),
        "scheduler kwargs not JSON": ([*base, "--lr_scheduler_kwargs", "{cycles"], "lr_scheduler_kwargs"),
        "optim_args not key=value": ([*base, "--optim", "sgd", "--optim_args", "momentum"], "optim_args"),
        "mlm probability one": ([*base, "--mlm_probability", "1"], "mlm_probability"),
        "a value missing": ([*base, "--output_dir"], "output_dir"),
        "unknown tracker": ([*base, "--report_to", "comet"], "report_to"),
        "invalid YAML": ([bad["bad_yaml"], *base], "bad.yaml"),
        "YAML that is no mapping": ([bad["list_yaml"], *base], "mapping"),
        "no recipe of that name": (["no_such_recipe", *base], "no_such_recipe"),
        "metric of another task": ([*base, "--eval_strategy", "steps", "--metric_for_best_model", "perplexity"],
                                   "metric_for_best_model"),
        "validation set name with a slash": ([*two_sets, f"a/b={val},b={val}"], "'a/b' would break the metric keys"),
        "validation set named test": ([*two_sets, f"a={val},test={val}"], "collides with the test split"),
        "validation_file and validation_files": ([*base, "--validation_files", f"a={val}"], "both set"),
        "metric of a validation set that does not exist": (
            [*two_sets, f"a={val},b={val}", "--eval_strategy", "steps", "--metric_for_best_model", "eval_c_accuracy"],
            "Did you mean 'eval_"),
        "default best metric with several sets": (
            [*two_sets, f"a={val},b={val}", "--eval_strategy", "steps", "--eval_steps", "1",
             "--load_best_model_at_end", "true"],
            "eval_loss, the default"),
        "tf32 without a GPU": ([*base, "--tf32", "true"], "tf32"),
        "fp16 without a GPU": ([*base, "--fp16", "true"], "fp16 mixed precision needs a GPU"),
        # data files (before the model loads)
        "missing train file": ([*base, "--train_file", str(Path(data["train_file"]).parent / "nope.csv")],
                               "does not exist"),
        "unsupported format": ([*base, "--train_file", bad["xlsx"]], ".xlsx"),
        "header-only file": ([*base, "--validation_file", bad["header_only"]], "empty"),
        "header-only validation set": ([*two_sets, f"a={val},b={bad['header_only']}"], "validation set 'b' is empty"),
        "mixed formats": ([*base, "--train_file", bad["json"]], "mix formats"),
        "wrong text column": ([*base, "--text_column_names", "review_body"], "review_body"),
        "wrong label column": ([*base, "--label_column_name", "sentiment"], "sentiment"),
        "too few rows to carve validation": ([*no_validation, "--train_file", bad["one_row"]],
                                             "of the 1 rows in train leaves 0 for training"),
        "streamed train too short to carve": ([*no_validation, "--train_file", bad["one_line"], "--task", "mlm",
                                               "--streaming", "true"], "fewer than 2 rows"),
        "label column of mixed types": ([*base, "--train_file", bad["mixed_labels"], "--validation_file",
                                         bad["mixed_labels"]], "mixes value types (int, str)"),
        "text column all empty": ([*base, "--train_file", bad["no_text"], "--validation_file", bad["no_text"]],
                                  "is empty in 2 of 2 rows"),
        "CSV row with an extra field": ([*base, "--train_file", bad["ragged"], "--validation_file", bad["ragged"]],
                                        "Expected 2 fields"),
        "Latin-1 file": ([*base, "--train_file", bad["latin1"], "--validation_file", bad["latin1"]], "latin1.csv"),
        # the model and a Hub dataset (before the output dir is touched; HF_HUB_OFFLINE=1 in tests)
        "model folder that does not exist": ([*base, "--model_name_or_path", str(Path(bad["json"]).parent / "nope")],
                                             "no such folder"),
        "model path that is a file": ([*base, "--model_name_or_path", bad["json"]], "is a file"),
        "folder without a model": ([*base, "--model_name_or_path", str(Path(bad["json"]).parent)],
                                   "without config.json"),
        "model folder without weights": ([*base, "--model_name_or_path", bad["no_weights"]], "no weights"),
        "model folder without a tokenizer": ([*base, "--model_name_or_path", bad["no_tokenizer"]], "no tokenizer"),
        "config.json cut short": ([*base, "--model_name_or_path", bad["bad_config"]], "not valid JSON"),
        "tokenizer_name an empty folder": ([*base, "--tokenizer_name", bad["empty_folder"]], "no tokenizer"),
        "Hub model offline, not cached": ([*base, "--model_name_or_path", "scaletune-tests/no-such-model"],
                                          "nor in the Hub cache"),
        "Hub dataset offline, not cached": ([*base, "--dataset_name", "scaletune-tests/no-such-data"],
                                            "could not be loaded"),
        # the output dir and the checkpoint
        "fresh run into checkpoints": (fresh, "already holds checkpoints"),
        "changed batch size on resume": ([*base, "--per_device_train_batch_size", "4"],
                                         "per_device_train_batch_size: 8 -> 4"),
        "missing checkpoint path": ([*fresh, "--resume_from_checkpoint", out + "/checkpoint-99"], "does not exist"),
    }


# Also run as the user runs them, `python -m scaletune.train` in a process of its own: a config error (before
# torch), a data file, a model folder (torch imported) and a resume against the earlier run's checkpoint.
AS_A_PROCESS = ("unknown key", "missing train file", "model folder without weights", "changed batch size on resume")


def judge(name: str, expected: str, exit_code, stdout: str, stderr: str) -> list[str]:
    """What is wrong with a case's outcome: exit 2 and one `scaletune: error:` line naming `expected`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    problems = []
    if exit_code != 2:
        problems.append(f"exit {exit_code}")
    if len(lines) != 1 or not lines[0].startswith("scaletune: error: ") or expected not in lines[0]:
        problems.append(f"stderr {lines[-3:]!r}")
    if "Traceback" in stderr + stdout:
        problems.append("traceback")
    return [f"{name}: {p}" for p in problems]


def test_bad_input_table(finished_run, tiny_bert, sentiment_files, tmp_path):
    """Every case in one process (support/bad_input_driver.py: `scaletune.train.main` with fds 1 and 2 caught
    per case), and the AS_A_PROCESS cases also as `python -m scaletune.train`."""
    import os

    before = tree(finished_run)
    table = cases(tiny_bert, sentiment_files, {**files(tmp_path), **model_folders(tmp_path, tiny_bert)},
                  str(finished_run))
    assert len(table) >= 30 and set(AS_A_PROCESS) <= set(table)
    tests = str(Path(__file__).resolve().parents[1])  # for support.bad_input_driver
    env = {**os.environ, **QUIET_ENV,
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    (tmp_path / "cases.json").write_text(json.dumps({name: args for name, (args, _) in table.items()}))
    driver = subprocess.run([sys.executable, "-m", "support.bad_input_driver", str(tmp_path / "cases.json"),
                             str(tmp_path / "results.json"), str(finished_run)], capture_output=True, text=True,
                            timeout=900, env=env)
    assert driver.returncode == 0, driver.stderr[-6000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == list(table)
    failures = []
    for name, (_, expected) in table.items():
        r = results[name]
        if "escaped" in r:  # main let an exception out: a traceback for the user
            failures.append(f"{name}: escaped main: {r['escaped'][-2000:]}")
            continue
        failures += judge(name, expected, r["exit"], r["stdout"], r["stderr"])
        if r["digest"] != before:
            failures.append(f"{name}: changed the earlier run's files")
    for name in AS_A_PROCESS:
        args, expected = table[name]
        proc = subprocess.run([sys.executable, "-m", "scaletune.train", *args], capture_output=True, text=True,
                              timeout=300, env={**os.environ, **QUIET_ENV})
        failures += [f"{p} (as a process)" for p in judge(name, expected, proc.returncode, proc.stdout, proc.stderr)]
        if tree(finished_run) != before:
            failures.append(f"{name}: changed the earlier run's files (as a process)")
    assert not failures, "\n".join(failures)
