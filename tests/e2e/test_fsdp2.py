"""FSDP2 (`fully_shard`) on CPU: the decisions made before anything loads, and `./launch`'s CPU switch.

The launched runs (`./launch fsdp2 --cpu 2` against `./launch multi_gpu --cpu 2` step by step, the sharded
checkpoints, the best-model reload and the export evaluated in one process, the mid-epoch resume, the resume on
4 processes and bf16) are in tests/e2e/test_scale_out.py, where the DDP run they are compared with is made
anyway: one launch fewer.
"""

from __future__ import annotations

import shlex
import sys

import pytest

from scaletune.config import ConfigError
from scaletune.distributed import check_fsdp_launch, fsdp_layers_to_wrap, untie_fsdp_aliases
from support.tiny import REPO, make_tiny_bert, run_cli

LAUNCH = str(REPO / "launch")


# --------------------------------------------------------------------------- decisions (nothing launched)


def test_fsdp_on_cpu_runs_only_behind_the_switch_and_only_fsdp2():
    cpu = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_USE_CPU": "true"}
    # Without the switch accelerate would train DDP and call it FSDP: refused, naming the command that works.
    with pytest.raises(ConfigError, match=r"silently trains DDP.*\./launch <fsdp preset> --cpu N"):
        check_fsdp_launch(cpu, cuda_available=False)
    assert check_fsdp_launch({**cpu, "SCALETUNE_FSDP_ON_CPU": "1"}, cuda_available=False)
    gpu = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert not check_fsdp_launch({**gpu, "SCALETUNE_FSDP_ON_CPU": "1"}, cuda_available=True)  # GPUs: accelerate's own
    with pytest.raises(ConfigError, match="FSDP2 only: set fsdp_version: 2"):
        check_fsdp_launch({**gpu, "FSDP_VERSION": "1"}, cuda_available=True)
    assert not check_fsdp_launch({"ACCELERATE_USE_CPU": "true"}, cuda_available=False)  # not FSDP at all


def _dry_run(*args, gpus: str = "") -> list[str]:
    env = {"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": gpus, "SLURM_NNODES": "", "SLURM_NODEID": "",
           "MASTER_ADDR": "", "MASTER_PORT": ""}
    out = run_cli([LAUNCH, *args, "--train_file", "train.csv", "--dry-run"], env=env, cwd=REPO, timeout=60)
    return shlex.split(out.stdout.splitlines()[1][len("command: "):])


@pytest.mark.slow
def test_launch_sets_the_cpu_switch_only_for_fsdp_with_cpu():
    cmd = _dry_run("fsdp2", "--cpu", "2")
    assert cmd[:2] == ["ACCELERATE_USE_CPU=true", "SCALETUNE_FSDP_ON_CPU=1"]
    assert cmd[cmd.index("--config_file") + 1].endswith("accelerate_configs/fsdp2.yaml")
    for words in (_dry_run("fsdp2", gpus="0,1"), _dry_run("fsdp2_offload", gpus="0,1"),
                  _dry_run("multi_gpu", "--cpu", "2")):
        assert not any(w.startswith("SCALETUNE_FSDP_ON_CPU") for w in words)
    one = run_cli([LAUNCH, "fsdp2", "--cpu", "1", "--train_file", "train.csv", "--dry-run"], check=False, cwd=REPO,
                  env={"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    assert one.returncode == 2 and "needs at least 2" in one.stderr


def test_model_checks_made_before_prepare(tmp_path):
    import torch
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertForMaskedLM

    classifier = AutoModelForSequenceClassification.from_pretrained(make_tiny_bert(tmp_path / "cls"))
    # BertEmbeddings is in _no_split_modules, but accelerate shards the word embedding on its own.
    assert fsdp_layers_to_wrap(classifier) == ["BertLayer"]
    assert untie_fsdp_aliases(classifier) == []
    # BERT's MLM bias has two names; the head's goes (the decoder, in the embeddings' unit, keeps it) and stays
    # gone when accelerate calls tie_weights() while sharding. The decoder weight stays tied.
    mlm_path = make_tiny_bert(tmp_path / "mlm", mlm=True, dropout=0.0)
    mlm = AutoModelForMaskedLM.from_pretrained(mlm_path)
    ids = torch.tensor([[101, 2023, 2003, 102]])
    before = mlm(input_ids=ids).logits
    assert untie_fsdp_aliases(mlm) == ["cls.predictions.bias"]
    mlm.tie_weights()
    assert "cls.predictions.bias" not in dict(mlm.named_parameters(remove_duplicate=False))
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(mlm(input_ids=ids).logits, before, rtol=0, atol=0)
    # A model whose own tie_weights registers the alias again cannot be sharded: said before prepare.

    class RetiesItsHead(BertForMaskedLM):
        def tie_weights(self, *args, **kwargs):
            super().tie_weights(*args, **kwargs)
            self.cls.predictions.bias = self.cls.predictions.decoder.bias

    with pytest.raises(ConfigError, match=r"cls\.predictions\.bias is tied .* deepspeed_zero3"):
        untie_fsdp_aliases(RetiesItsHead.from_pretrained(mlm_path))
