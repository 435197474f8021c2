"""Kubeflow Trainer v2, without a cluster and without a process: k8s/trainjob.yaml against the TrainJob CRD's
schema (vendored from kubeflow/trainer, tests/data/), and the entry's mapping of Kubeflow's PET_* variables onto
./launch (scaletune.k8s.launch_args). The launched entry (training, SIGTERM, resume) is tests/e2e/test_k8s.py.
"""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml

from scaletune.k8s import launch_args
from scaletune.errors import ConfigError
from support.tiny import REPO

SCHEMA = json.loads((REPO / "tests" / "data" / "kubeflow_trainjob_v1alpha1.schema.json").read_text())
MANIFEST = REPO / "k8s" / "trainjob.yaml"
PET = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1",
       "PET_MASTER_PORT": "29500", "CUDA_VISIBLE_DEVICES": ""}
TRAIN = ["--train_file", "train.csv", "--max_steps", "5"]


def strict(schema):
    """The schema with unknown fields refused, as the API server's strict field validation does (kubectl's
    default): a CRD schema only lists fields, and plain JSON Schema would let a misspelled one through."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


VALIDATOR = jsonschema.Draft4Validator(strict(SCHEMA["openAPIV3Schema"]))


def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_the_vendored_schema_names_its_source():
    assert "kubeflow/trainer" in SCHEMA["source"] and "trainer.kubeflow.org_trainjobs.yaml" in SCHEMA["source"]
    assert SCHEMA["openAPIV3Schema"]["properties"]["spec"]["required"] == ["runtimeRef"]


def test_the_trainjob_validates_against_kubeflows_crd_schema():
    job = manifest()
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(job)]
    assert not errors, errors
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == ["python", "-m", "scaletune.k8s"]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"
    # The output dir is on the PVC that outlives the pods (a restarted pod finds its checkpoint there).
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "output")
    volume = next(v for v in pod["volumes"] if v["name"] == "output")
    assert "persistentVolumeClaim" in volume and not mount.get("readOnly")
    output_dir = trainer["args"][trainer["args"].index("--output_dir") + 1]
    assert output_dir.startswith(mount["mountPath"] + "/")
    # The eviction grace period leaves room for the agent's wait for its workers' checkpoint.
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("path, value, message", [
    (("spec", "trainer", "numProcPerNod"), 2, "'numProcPerNod' was unexpected"),
    (("spec", "trainer", "numNodes"), "2", "is not of type 'integer'"),
    (("spec", "runtimeRef", "name"), None, "None is not of type 'string'"),
])
def test_a_broken_trainjob_fails_the_schema(path, value, message):
    job = copy.deepcopy(manifest())
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(message in e.message for e in VALIDATOR.iter_errors(job))


def test_kubeflows_variables_become_launch_options_and_a_resume():
    args = launch_args(["--dry-run", *TRAIN], PET, REPO)
    assert args == ["multi_gpu", "--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
                    "--main_process_port", "29500", "--cpu", "2", "--dry-run", *TRAIN,
                    "--resume_from_checkpoint", "latest"]


def test_gpu_nodes_take_their_process_count_from_kubeflow_or_the_visible_gpus():
    env = {**PET, "PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "job-node-0-0.job",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    args = launch_args(["deepspeed_zero3", *TRAIN], env, REPO)
    assert args[:9] == ["deepspeed_zero3", "--num_machines", "4", "--machine_rank", "3", "--main_process_ip",
                        "job-node-0-0.job", "--main_process_port", "29500"]
    assert args[9:11] == ["--num_processes", "2"] and "--cpu" not in args
    # `auto` (a GPU request without numProcPerNode): ./launch counts the visible GPUs; no preset: multi_node.
    args = launch_args(TRAIN, {**env, "PET_NPROC_PER_NODE": "auto"}, REPO)
    assert args[0] == "multi_node" and "--num_processes" not in args


def test_an_accelerate_config_file_is_a_preset_and_a_training_config_is_not(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    job = tmp_path / "job.yaml"
    job.write_text("max_steps: 5\n")
    assert launch_args([str(own), *TRAIN], PET, REPO)[0] == str(own)
    args = launch_args([str(job), *TRAIN], PET, REPO)
    assert args[0] == "multi_gpu" and args[args.index("--cpu") + 2] == str(job)


@pytest.mark.parametrize("env, argv, message", [
    ({"PET_NODE_RANK": ""}, TRAIN, "PET_NODE_RANK not set: scaletune.k8s runs as the command of a Kubeflow TrainJob"),
    ({"PET_NNODES": "two"}, TRAIN, "PET_NNODES must be a whole number, got 'two'"),
    ({"ACCELERATE_CONFIG": "deepspeed_zero9"}, TRAIN, "accelerate config 'deepspeed_zero9' is neither a preset"),
    ({}, [*TRAIN, "--resume_from_checkpoint", "/old/checkpoint-5"],
     "resume_from_checkpoint '/old/checkpoint-5' would be resumed again by every restarted pod"),
    ({}, [*TRAIN, "--max_stepz", "3"], "Unknown config key 'max_stepz'"),
])
def test_bad_environment_or_config_is_one_error_before_anything_starts(env, argv, message):
    with pytest.raises(ConfigError) as e:  # LaunchError is one too
        launch_args(argv, {**PET, **env}, REPO)
    assert message in str(e.value)
