"""LoRA adapters with peft: which modules get an adapter, which are trained whole, and the adapter's file format.

With `use_peft: true` the model that `task.build_model` returns is wrapped by `apply` before `prepare`: the
pretrained weights are frozen, low-rank adapters are added to `lora_target_modules` (peft's per-architecture
default: `query,value` for BERT-family models), and `modules_to_save` are trained whole (default: the task's
new head). Everything else (DDP, DeepSpeed ZeRO-1/2/3, FSDP2, checkpoints, export) sees an ordinary model
whose trainable parameters happen to be few; the backend-specific disk formats are `checkpoint.py`'s.

On disk an adapter is peft's own format, `adapter/adapter_model.safetensors` + `adapter_config.json`, so it
loads with `PeftModel.from_pretrained(base_model, folder)`. A LoRA checkpoint holds that folder and the
adapter's optimizer state, not the frozen base. The export writes `output_dir/adapter/` and, with
`merge_adapters_at_export`, the merged model in `output_dir`, which loads with `from_pretrained` without peft.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
ADAPTER_CONFIG = "adapter_config.json"  # peft's CONFIG_NAME
_INSTALL = "pip install peft==0.21.2 (scripts/install.sh installs it)"


def enabled(cfg) -> bool:
    return bool(cfg.peft.use_peft)


def is_peft(model) -> bool:
    """Whether an unwrapped model carries a peft adapter."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


# --------------------------------------------------------------------------- before the model loads


def _model_type(cfg) -> Optional[str]:
    from .model_source import load_config

    try:
        config = load_config(cfg.model)
    except (OSError, ValueError):
        return None  # the model load reports an unreadable model in its own words
    return config.model_type


def preflight(cfg) -> None:
    """Checks that need no weights: peft is installed and the architecture has default target modules (or
    `lora_target_modules` is set). Reads config.json only."""
    if not enabled(cfg):
        return
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(f"use_peft=true needs the peft package, which is not installed: {_INSTALL}.") from None
    if cfg.peft.lora_target_modules is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        model_type = _model_type(cfg)
        if model_type is not None and model_type not in DEFAULTS:
            raise ConfigError(f"peft has no default LoRA target modules for model type {model_type!r}: set "
                              f"lora_target_modules (module names such as q_proj,v_proj, or all-linear).")


# --------------------------------------------------------------------------- wrapping the model


def _names(value: Optional[str]) -> Optional[list[str] | str]:
    if value is None:
        return None
    if value.strip() == "all-linear":
        return "all-linear"  # peft's keyword: every linear layer but the output layer
    return [n.strip() for n in value.split(",") if n.strip()]


def pretrained_keys(cfg) -> Optional[set]:
    """Tensor names stored in the pretrained checkpoint (safetensors header or index only: no tensor is read), or
    None when there is no safetensors file to read. Legacy gamma/beta names read as weight/bias, as transformers
    loads them."""
    from safetensors import safe_open

    from .assets import model_path

    m = cfg.model
    source = model_path(m.model_name_or_path)
    folder = Path(source)

    def resolve(name: str) -> Optional[Path]:
        if folder.is_dir():
            return folder / name if (folder / name).is_file() else None
        try:
            from transformers.utils import cached_file

            found = cached_file(source, name, cache_dir=m.cache_dir, revision=m.model_revision,
                                _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None
        return Path(found) if found else None

    keys = None
    index = resolve("model.safetensors.index.json")
    if index is not None:
        keys = set(json.loads(index.read_text())["weight_map"])
    else:
        single = resolve("model.safetensors")
        if single is not None:
            with safe_open(str(single), framework="pt") as f:
                keys = set(f.keys())
    if keys is None:
        return None
    return {k[:-6] + ".weight" if k.endswith(".gamma") else k[:-5] + ".bias" if k.endswith(".beta") else k
            for k in keys}


def default_modules_to_save(model, pretrained: Optional[set]) -> list[str]:
    """Modules trained whole next to the adapters: the heads, i.e. the top-level modules besides the encoder.

    A task head (`classifier`: classification, regression, multi-label, token classification) is new or
    task-specific, so it is trained whole. A language-model head (the one holding the output embeddings:
    MLM's `cls`, a causal LM's `lm_head`) is vocabulary-sized and usually pretrained: only its modules that
    the checkpoint lacks are trained (an encoder-only checkpoint such as MiniLM ships no MLM head), and a
    module holding a decoder tied to the input embeddings is never copied. A new output bias next to such a
    decoder stays at its initial zeros unless `lora_bias` trains biases.
    """
    base = getattr(model, "base_model_prefix", "")
    heads = [(name, child) for name, child in model.named_children()
             if name != base and any(True for _ in child.parameters())]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_heads = [(name, head) for name, head in heads if output is not None and any(m is output for m in head.modules())]
    chosen = [name for name, head in heads if (name, head) not in lm_heads]
    if not lm_heads:
        return chosen
    if pretrained is None:
        logger.warning("Cannot read the checkpoint's tensor names, so the language-model head is taken as pretrained "
                       "and stays frozen; set modules_to_save to train (part of) it.")
        return chosen

    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)

    def loaded(name: str) -> bool:
        short = name[len(base) + 1:] if base and name.startswith(base + ".") else None
        return name in pretrained or short in pretrained or f"{base}.{name}" in pretrained

    def new(p) -> bool:
        return not any(loaded(n) for n in aliases[id(p)])

    def visit(prefix: str, module) -> None:
        params = list(module.parameters())
        if params and all(new(p) for p in params):
            chosen.append(prefix)
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}", child)

    for name, head in lm_heads:
        visit(name, head)
    return chosen


def lora_config(model, cfg):
    from peft import LoraConfig

    p = cfg.peft
    if p.modules_to_save is None:
        to_save = default_modules_to_save(model, pretrained_keys(cfg))
    else:
        to_save = _names(p.modules_to_save) or None
    return LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                      target_modules=_names(p.lora_target_modules), modules_to_save=to_save or None, bias=p.lora_bias)


def apply(model, cfg):
    """The model with LoRA adapters (`use_peft: true`), else the model unchanged. Before `prepare`."""
    if not enabled(cfg):
        return model
    preflight(cfg)
    from peft import get_peft_model

    config = lora_config(model, cfg)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft: a target or module to save that the model does not have
        raise ConfigError(f"LoRA cannot be applied to {type(model).__name__}: {' '.join(str(e).split())} Fix "
                          f"lora_target_modules / modules_to_save (module names of the model).") from None
    # The export reads it from the model: the Checkpointer that calls it knows the training arguments only.
    setattr(peft_model, _MERGE_FLAG, cfg.peft.merge_adapters_at_export)
    return peft_model


_MERGE_FLAG = "scaletune_merge_at_export"


def merge_at_export(model) -> bool:
    """merge_adapters_at_export of the run that built this (unwrapped) peft model."""
    return bool(getattr(model, _MERGE_FLAG, True))


def trainable_summary(model) -> Optional[str]:
    """One line with the trainable share of a LoRA model (None without peft). Counts ZeRO-3-partitioned
    parameters at their full size (peft's own count)."""
    if not is_peft(model):
        return None
    trainable, total = model.get_nb_trainable_parameters()
    config = model.peft_config[model.active_adapter]
    targets = config.target_modules
    targets = targets if isinstance(targets, str) else ",".join(sorted(targets))
    saved = ",".join(sorted(config.modules_to_save or [])) or "none"
    return (f"LoRA r={config.r} on {targets} (trained whole: {saved}): trainable parameters {trainable:,} of "
            f"{total:,} ({100 * trainable / max(total, 1):.2f}%)")


# --------------------------------------------------------------------------- the adapter's tensors


def adapter_parameters(model) -> dict[str, torch.nn.Parameter]:
    """{name in peft's adapter file: the model's parameter}: what an adapter file stores, mapped to the live
    parameters (an unwrapped peft model). peft may store one parameter under two names (a head bias with
    `lora_bias: all`); both are kept."""
    from peft import get_peft_model_state_dict

    # Given the parameters themselves, peft picks the adapter's by name and returns them under its file names
    # (no tensor is copied). All of them, not the trainable ones only: a loaded adapter is frozen.
    return get_peft_model_state_dict(model, state_dict=dict(model.named_parameters()),
                                     adapter_name=model.active_adapter, save_embedding_layers=False)


def write_adapter(model, tensors: dict, folder: str | Path) -> None:
    """Main process: `folder/adapter_model.safetensors` + `adapter_config.json`, as `PeftModel.save_pretrained`
    writes them, from full (gathered) tensors keyed like `adapter_parameters`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory (one parameter under two names): one copy per name.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = model.peft_config[model.active_adapter]
    inference_mode = config.inference_mode
    config.inference_mode = True  # as peft saves it: a loaded adapter is for inference unless asked otherwise
    try:
        config.save_pretrained(str(folder))
    finally:
        config.inference_mode = inference_mode


def merged_model(model, full_state_dict: dict):
    """Main process, CPU: a plain transformers model with the adapter merged into its weights, built from a
    full state dict of the peft model (gathered from every backend), so the training model is left untouched.
    """
    import copy

    import torch
    from peft import get_peft_model

    base = model.get_base_model()
    with torch.device("meta"):
        skeleton = type(base)(copy.deepcopy(base.config))
    skeleton = get_peft_model(skeleton, copy.deepcopy(model.peft_config[model.active_adapter]))
    skeleton.to_empty(device="cpu")
    dtypes = {v.dtype for v in full_state_dict.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        skeleton.to(dtypes.pop())  # ZeRO in bf16 gathers bf16 weights: the export keeps them, as without LoRA
    missing, unexpected = skeleton.load_state_dict(full_state_dict, strict=False)
    inner = skeleton.get_base_model()
    if hasattr(inner, "tie_weights"):
        # A tied parameter is stored once (or not at all) in a gathered state dict, and to_empty gave each of
        # its names a tensor of its own: tie them again from the name that was loaded, in either direction, as
        # from_pretrained does (FSDP2 keeps MLM's output bias under the decoder's name only).
        prefix = next(name for name, m in skeleton.named_modules() if m is inner) + "."
        inner.tie_weights(missing_keys={k[len(prefix):] for k in missing if k.startswith(prefix)})
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in full_state_dict if k in params}
    missing = [k for k in missing if k in params and id(params[k]) not in loaded]
    if unexpected or missing:
        raise ValueError(f"the gathered state dict does not match the LoRA model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return skeleton.merge_and_unload()
