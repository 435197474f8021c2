"""Secrets from the environment: which variables count, how values are redacted, and the W&B login preflight.

The login check reads a real netrc file written to a temp folder and plain env dicts, so nothing global is patched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scaletune.errors import ConfigError
from scaletune.secrets import REDACTED, is_secret_name, redact, redact_values, secret_values
from scaletune.tracking import check_report_to

KEY = "wandb-fake-key-0123456789"
HF = "hf_fakeTokenValue42"
SERVICE = "svc-fake-token-9876"

# --------------------------------------------------------------------------- which variables are secret


@pytest.mark.parametrize("name", ["WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MY_SERVICE_TOKEN",
                                  "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY", "DB_PASSWORD", "CLIENT_SECRET_ID",
                                  "my_service_token"])
def test_secret_names(name):
    assert is_secret_name(name)
    assert secret_values({name: "value-long-enough"}) == ("value-long-enough",)


@pytest.mark.parametrize("name", ["HOME", "PATH", "TOKENIZERS_PARALLELISM", "KEYBOARD", "WANDB_PROJECT",
                                  "HF_HOME", "MONKEY"])
def test_ordinary_names_are_not_secret(name):
    assert not is_secret_name(name)
    assert secret_values({name: "value-long-enough"}) == ()


def test_short_values_are_ignored_and_whitespace_stripped():
    env = {"A_TOKEN": "main", "B_KEY": "1234567", "C_SECRET": "12345678", "D_PASSWORD": "  padded-secret\n",
           "E_TOKEN": ""}
    assert secret_values(env) == ("padded-secret", "12345678")  # longest first
    # "main" is everywhere (git revisions, module names): redacting it would garble the output, not protect it.
    assert redact("model_revision=main", env) == "model_revision=main"


# --------------------------------------------------------------------------- redaction


def test_redact_nested_structures_returns_a_redacted_copy():
    env = {"WANDB_API_KEY": KEY, "HF_TOKEN": HF, "MY_SERVICE_TOKEN": SERVICE, "HOME": "/home/someone"}
    original = {
        "run_name": f"run-{SERVICE}",
        "lr": 1e-3,
        "steps": 10,
        "flag": True,
        "none": None,
        "tags": ["a", HF, ("x", f"Bearer {KEY}")],
        "nested": {"deeper": [{"url": f"https://u:{HF}@host/path"}], KEY: "key as a dict key"},
        "path": Path(f"/out/{SERVICE}/ckpt"),
        "home": "/home/someone",
    }
    out = redact(original, env)
    assert out == {
        "run_name": "run-***",
        "lr": 1e-3,
        "steps": 10,
        "flag": True,
        "none": None,
        "tags": ["a", "***", ("x", "Bearer ***")],
        "nested": {"deeper": [{"url": "https://u:***@host/path"}], "***": "key as a dict key"},
        "path": Path("/out/***/ckpt"),
        "home": "/home/someone",  # not a secret-named variable
    }
    assert isinstance(out["tags"][2], tuple)
    assert original["tags"][1] == HF and original["run_name"].endswith(SERVICE)  # the input is untouched
    assert out["nested"] is not original["nested"] and out["nested"]["deeper"] is not original["nested"]["deeper"]


def test_a_secret_containing_another_is_replaced_whole():
    env = {"SHORT_TOKEN": "abcdefgh", "LONG_TOKEN": "abcdefgh-and-more"}
    assert redact("x abcdefgh-and-more y abcdefgh z", env) == f"x {REDACTED} y {REDACTED} z"


def test_only_values_are_matched_not_names():
    env = {"HF_TOKEN": HF}
    text = "set HF_TOKEN to log in to the Hub"
    assert redact(text, env) == text
    assert redact(text, {}) == text


def test_redact_values_rejects_a_single_string():
    with pytest.raises(TypeError, match="not one string"):
        redact_values("some text", "secret-value")


# --------------------------------------------------------------------------- W&B login preflight


def write_netrc(path: Path, *entries: tuple[str, str]) -> Path:
    path.write_text("".join(f"machine {host}\n  login user\n  password {pw}\n" for host, pw in entries))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("mode", ["offline", "disabled", "dryrun", "OFFLINE"])
def test_local_wandb_modes_need_no_login(tmp_path, mode):
    check_report_to(["wandb"], {"WANDB_MODE": mode}, tmp_path / "missing-netrc")


def test_api_key_in_env_is_a_login(tmp_path):
    check_report_to(["wandb", "tensorboard"], {"WANDB_API_KEY": KEY}, tmp_path / "missing-netrc")


def test_netrc_entry_for_the_wandb_host_is_a_login(tmp_path):
    netrc = write_netrc(tmp_path / "netrc", ("api.wandb.ai", "k" * 40))
    check_report_to(["wandb"], {}, netrc)
    check_report_to(["wandb"], {"WANDB_MODE": "online"}, netrc)
    # $NETRC is where W&B looks first, and so do we when no path is given.
    check_report_to(["wandb"], {"NETRC": str(netrc)})


def test_netrc_entry_must_match_wandb_base_url(tmp_path):
    netrc = write_netrc(tmp_path / "netrc", ("api.wandb.ai", "k" * 40), ("wandb.example.com:8443", "s" * 40))
    check_report_to(["wandb"], {"WANDB_BASE_URL": "https://wandb.example.com:8443"}, netrc)
    with pytest.raises(ConfigError, match="no login for wandb.internal.org"):
        check_report_to(["wandb"], {"WANDB_BASE_URL": "https://wandb.internal.org"}, netrc)


@pytest.mark.parametrize("netrc_text", [None, "machine github.com\n  login u\n  password p\n",
                                        "machine api.wandb.ai\n  login user\n", "machine api.wandb.ai login\n"])
def test_no_login_is_a_config_error_naming_the_three_fixes(tmp_path, netrc_text):
    """No file, another host only, an entry without a key, an unparsable file: W&B would stop to ask."""
    netrc = tmp_path / "netrc"
    if netrc_text is not None:
        netrc.write_text(netrc_text)
        netrc.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        check_report_to(["wandb"], {"WANDB_MODE": "online"}, netrc)
    message = str(err.value)
    assert "\n" not in message
    for fix in ("`wandb login`", "WANDB_API_KEY=...", "WANDB_MODE=offline", str(netrc), "api.wandb.ai"):
        assert fix in message


def test_tensorboard_alone_needs_no_wandb_login(tmp_path):
    check_report_to(["tensorboard"], {"WANDB_MODE": "online"}, tmp_path / "missing-netrc")
    check_report_to([], {}, tmp_path / "missing-netrc")
    check_report_to(None, {}, tmp_path / "missing-netrc")


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_login_check_imports_neither_wandb_nor_torch(tmp_path):
    """It runs in preflight, before anything heavy: importing wandb alone costs seconds."""
    netrc = write_netrc(tmp_path / "netrc", ("api.wandb.ai", "k" * 40))
    code = ("import sys; from scaletune.tracking import check_report_to; "
            f"check_report_to(['wandb', 'tensorboard'], {{'WANDB_MODE': 'online'}}, {str(netrc)!r}); "
            "print(sorted(m for m in ('wandb', 'torch', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the tracker's sinks


def make_cfg(tmp_path, **overrides):
    from scaletune.config import load_config

    return load_config({"train_file": str(tmp_path / "unused.csv"), "output_dir": str(tmp_path / "out"),
                        "disable_tqdm": True, **overrides})


def test_wandb_init_kwargs_redact_what_wandb_displays(tmp_path):
    from scaletune.tracking import wandb_init_kwargs

    env = {"HF_TOKEN": HF, "MY_SERVICE_TOKEN": SERVICE, "WANDB_TAGS": f"x,{SERVICE}"}
    cfg = make_cfg(tmp_path, run_name=f"exp-{SERVICE}", wandb_group=f"g-{HF}")
    kw = wandb_init_kwargs(cfg.training, {"run_name": f"exp-{SERVICE}", "nested": {"url": f"u:{HF}@h"}}, "id1", env)
    assert (kw["name"], kw["group"], kw["tags"]) == ("exp-***", "g-***", ["x", "***"])
    assert kw["config"] == {"run_name": "exp-***", "nested": {"url": "u:***@h"}}


def test_tracker_redacts_jsonl_tensorboard_and_printed_lines(tmp_path, accelerator, capsys):
    """String metrics (a custom compute_metrics may return any) and the summary pass through the same filter."""
    from scaletune.tracking import RunTracker, read_jsonl

    env = {"HF_TOKEN": HF, "MY_SERVICE_TOKEN": SERVICE}
    cfg = make_cfg(tmp_path, run_name=f"exp-{SERVICE}", report_to="tensorboard", wandb_tags=f"t,{HF}")
    tracker = RunTracker(cfg, accelerator, env=env)
    tracker.start(2, 0)
    tracker.log({"loss": 0.5, "note": f"pushed with {HF}"}, 1)
    tracker.finish({"global_step": 1, "best_model_checkpoint": f"/ckpt/{SERVICE}/checkpoint-1"})
    printed = capsys.readouterr().out

    out = tmp_path / "out"
    assert read_jsonl(out / "metrics.jsonl") == [{"step": 1, "loss": 0.5, "note": "pushed with ***"}]
    assert "[step 1] loss=0.5  note=pushed with ***" in printed
    assert "exp-***" in printed and "/ckpt/***/checkpoint-1" in printed
    assert (out / "runs" / "exp-***").is_dir()
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"t,***" in written  # the hparams reached TensorBoard, redacted
    for secret in (HF, SERVICE):
        assert secret not in printed and secret.encode() not in written
