"""FSDP2 set-up: which launches can give real FSDP2, its CPU switch, the layers it shards as units, and the
tied parameters it cannot shard.

FSDP2 is chosen by the Accelerate config (`distributed_type: FSDP`, `fsdp_version: 2`: `ACCELERATE_USE_FSDP=true`
plus `FSDP_*` variables). accelerate 1.15 runs FSDP on GPUs only and silently falls back to DDP on CPU; with
the switch `SCALETUNE_FSDP_ON_CPU=1` (set by `./launch <fsdp preset> --cpu N`, never on a GPU launch) the
Accelerator is turned into a real FSDP2 one over gloo (`switch_to_fsdp_on_cpu`). Without the switch, FSDP on
CPU is an error rather than a DDP run that calls itself FSDP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from ..errors import ConfigError
from .backend import Backend, cpu_requested

if TYPE_CHECKING:
    from accelerate import Accelerator

FSDP_ON_CPU_SWITCH = "SCALETUNE_FSDP_ON_CPU"


def check_fsdp_launch(env: Mapping[str, str], cuda_available: bool) -> bool:
    """Whether this FSDP launch needs the CPU workaround; a launch that cannot give real FSDP2 is a ConfigError.

    Pure (the environment and whether a GPU is visible in, a decision out), so it is checked before anything
    is built: FSDP1 is not supported (its checkpoint and state-dict paths differ), and FSDP on CPU without the
    switch would silently be DDP.
    """
    if not Backend.requested(env).is_fsdp:
        return False
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"The accelerate config asks for FSDP version {version}, but scaletune supports FSDP2 only: "
                          f"set fsdp_version: 2 in its fsdp_config (see accelerate_configs/fsdp2.yaml).")
    on_cpu = cpu_requested(env) or not cuda_available
    if on_cpu and env.get(FSDP_ON_CPU_SWITCH) != "1":
        raise ConfigError(f"FSDP was requested on CPU, where accelerate silently trains DDP instead: launch with "
                          f"`./launch <fsdp preset> --cpu N`, or set {FSDP_ON_CPU_SWITCH}=1 for real FSDP2 over gloo.")
    return on_cpu


def switch_to_fsdp_on_cpu(accelerator: Accelerator, plugin) -> None:
    """Make a CPU Accelerator a real FSDP2 one (only behind SCALETUNE_FSDP_ON_CPU=1, i.e. `./launch --cpu`).

    accelerate 1.15 decides the distributed type once, in the shared state, and never picks FSDP on CPU
    (MULTI_CPU: plain DDP). `fully_shard` itself runs on CPU over gloo, so the decision is overridden where
    accelerate reads it: PartialState's shared dict (operations, barriers) and AcceleratorState's, which
    copied it at construction (`prepare`, `save_state`, `get_state_dict`). The plugin is attached as
    AcceleratorState would on a GPU, with the same mixed-precision policy. Must run before `prepare`.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.num_processes < 2:
        raise ConfigError("FSDP on CPU needs at least 2 processes (it shards over them): use `./launch <fsdp preset> "
                          "--cpu 2`, or single_gpu --cpu 1 for one process.")
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and plugin.cpu_offload.pin_memory:
        # Pinned host memory is for copies to a GPU and needs one; on CPU the shards stay where they are.
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)


def fsdp_layers_to_wrap(model) -> list[str]:
    """The module classes FSDP2 shards as units (TRANSFORMER_BASED_WRAP): the model's `_no_split_modules`, minus
    any that holds the input embedding.

    accelerate 1.15 gives the input embedding (with a tied output layer) a unit of its own after the
    auto-wrap; when a wrapped parent already owns it (BERT and RoBERTa list BertEmbeddings /
    RobertaEmbeddings in `_no_split_modules`), `fully_shard` fails in `prepare`. An explicit
    `fsdp_transformer_layer_cls_to_wrap` in the accelerate config is used as is.
    """
    names = list(getattr(model, "_no_split_modules", None) or [])
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    path = next((n for n, m in model.named_modules() if m is embedding), None) if embedding is not None else None
    if path is None:
        return names
    holders = {type(m).__name__ for n, m in model.named_modules() if n == "" or path.startswith(n + ".")}
    return [n for n in names if n not in holders]


def _embedding_aliases(model) -> list[str]:
    """Names of parameters registered outside the input/output embedding modules but shared with them."""
    embeddings = [m for m in (getattr(model, "get_input_embeddings", lambda: None)(),
                              getattr(model, "get_output_embeddings", lambda: None)()) if m is not None]
    inside = {id(m) for e in embeddings for m in e.modules()}
    shared = {id(p) for e in embeddings for p in e.parameters()}
    return [f"{owner_name}.{name}" if owner_name else name
            for owner_name, owner in model.named_modules() if id(owner) not in inside
            for name, p in owner.named_parameters(recurse=False) if id(p) in shared]


def untie_fsdp_aliases(model) -> list[str]:
    """Drops the second registration of an embedding parameter that another module also holds, so FSDP2 can
    shard the model; returns the dropped names.

    BERT's and RoBERTa's MLM output bias is registered twice: `cls.predictions.bias` is
    `cls.predictions.decoder.bias`. accelerate 1.15 gives the embeddings (with the tied decoder) a unit of
    their own and leaves the head module in the root unit, so the one tensor would belong to two units, which
    `fully_shard` refuses. The head's own name is never read in a forward (the decoder adds the bias), so the
    parameter stays registered on the decoder only, and the model's tie map forgets the pair, or
    `tie_weights()` (accelerate calls it while sharding) would register it again. The export then stores the
    bias once, under the decoder's name, which `from_pretrained` ties back (it ties in either direction).
    """
    aliases = _embedding_aliases(model)
    if not aliases:
        return []
    for full_name in aliases:
        owner_name, _, name = full_name.rpartition(".")
        del model.get_submodule(owner_name)._parameters[name]
    for attribute in ("_tied_weights_keys", "all_tied_weights_keys"):
        mapping = getattr(model, attribute, None)
        if isinstance(mapping, dict):
            setattr(model, attribute, {target: source for target, source in mapping.items()
                                       if target not in aliases and source not in aliases})
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # what accelerate will do: a tie map this did not understand shows up now
    if _embedding_aliases(model):
        raise ConfigError(
            f"FSDP2 cannot shard {type(model).__name__}: {', '.join(aliases)} is tied to a parameter of its "
            f"embedding layers, and accelerate puts the two in different FSDP units; train this model with "
            f"deepspeed_zero3 (or multi_gpu).")
    return aliases

