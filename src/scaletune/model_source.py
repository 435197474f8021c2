"""Where a model comes from: checked before anything is written, loaded in one way, no Hub code unless asked.

- `check_sources(m)` (preflight, no torch): every model, config and tokenizer name resolves to a model folder,
  a cached Hub model (offline) or a packaged asset, or the run stops in one line before the output dir exists.
- `load_config` / `load_pretrained`: the one way scaletune reads a model's config and weights. A failure is one
  line (`ModelError`), never transformers' traceback.
- `hub_kernels_off(model)` / `check_hub_kernels(model)`: transformers 5.25 loads every model with `use_kernels=True` when the `kernels`
  package is installed (a dependency of transformers), and every `model.eval()`/`model.train()` then
  re-kernelizes it, which on CUDA resolves `kernels-community/...` code on the Hub: offline that is a traceback
  at the first evaluation, online a silent download and other kernels in evaluation than in training. So Hub
  kernels are off unless `use_hub_kernels` is set, for scaletune's models and the user's alike.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .errors import ConfigError, ModelError, ScaletuneError, first_line

MODELS_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DATASETS_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_offline(variables: tuple = MODELS_OFFLINE) -> bool:
    """The Hub is switched off by any of `variables` (as huggingface_hub reads them)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in variables)


# --------------------------------------------------------------------------- preflight (no torch)


def check_sources(m, needs_model: bool = True, needs_tokenizer: bool = True) -> None:
    """Each name the run will load resolves, before the output dir is touched. `needs_model` is false when the
    user passed their own model to run(), `needs_tokenizer` when the run reads no tokenizer from these names
    (the user passed theirs, or their model and tokenized data)."""
    tokenizer_from = "tokenizer_name" if m.tokenizer_name else "model_name_or_path" if needs_tokenizer else None
    names = [("config_name", m.config_name), ("tokenizer_name", m.tokenizer_name)]
    if needs_model:
        names.insert(0, ("model_name_or_path", m.model_name_or_path))
    for key, name in names:
        if name:
            check_source(key, name, m.cache_dir, m.model_revision, wants_config=key != "tokenizer_name",
                         wants_weights=key == "model_name_or_path", wants_tokenizer=key == tokenizer_from)


def check_source(key: str, name: str, cache_dir: Optional[str], revision: str, wants_config: bool,
                 wants_weights: bool = False, wants_tokenizer: bool = False) -> None:
    from .assets import check_packaged_model, is_packaged

    if is_packaged(name):
        check_packaged_model(name)
        return
    path = Path(name).expanduser()
    if path.is_file():
        raise ModelError(f"{key}={name!r} is a file; it must be a model folder (what save_pretrained writes, with "
                         f"config.json) or a Hub model id.")
    if path.is_dir():
        _check_folder(key, name, path, wants_config, wants_weights, wants_tokenizer)
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise ModelError(f"{key}={name!r} does not exist: no such folder. Check the path.")
    if hub_offline():
        if not _cached(name, cache_dir, revision, wants_config):
            raise ModelError(f"{key}={name!r} is neither a local folder nor in the Hub cache, and the Hub is "
                             f"offline (HF_HUB_OFFLINE=1): download it once where there is network (or set "
                             f"cache_dir), or pass a local model folder.")
    elif wants_config:
        _fetch_config(key, name, cache_dir, revision)


# A tokenizer's own files (transformers' names): with none of them, AutoTokenizer builds an empty tokenizer (its
# special tokens only) from a model's config.json and says nothing, so every word would be an unknown token.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt")


def _check_folder(key: str, name: str, path: Path, wants_config: bool, wants_weights: bool,
                  wants_tokenizer: bool) -> None:
    """A local folder holds what the run will read from it: a config.json that parses, weights, a tokenizer."""
    files = {p.name for p in path.iterdir() if p.is_file()}
    if wants_config:
        if "config.json" not in files:
            raise ModelError(f"{key}={name!r} is a folder without config.json, so it holds no model: point it at "
                             f"the folder save_pretrained wrote, or use a Hub model id.")
        _check_config_json(key, name, path / "config.json")
    if wants_weights and not any(f.endswith((".safetensors", ".bin", ".index.json", ".pt", ".pth")) for f in files):
        raise ModelError(f"{key}={name!r} holds config.json but no weights (model.safetensors, pytorch_model.bin or a "
                         f"sharded index): point it at the folder the model's save_pretrained wrote.")
    if wants_tokenizer and not (files.intersection(TOKENIZER_FILES) or any(f.endswith(".model") for f in files)):
        other = "" if key == "model_dir" else ", or set tokenizer_name to a folder or Hub id that has one"
        raise ModelError(f"{key}={name!r} holds no tokenizer (no {', '.join(TOKENIZER_FILES[:3])} or other "
                         f"vocabulary file): save the tokenizer there too (tokenizer.save_pretrained){other}.")


def _check_config_json(key: str, name: str, file: Path) -> None:
    """transformers reports a damaged config.json from wherever it first reads it (the tokenizer's loader, after
    the output dir exists): said here, before anything is written."""
    import json

    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{key}={name!r}: its config.json is not valid JSON ({first_line(e)}): restore the file, "
                         f"or save the model again with save_pretrained.") from None
    if not isinstance(value, dict):
        raise ModelError(f"{key}={name!r}: its config.json holds a JSON {type(value).__name__}, not the object "
                         f"save_pretrained writes: restore the file, or save the model again.")


def _fetch_config(key: str, repo_id: str, cache_dir: Optional[str], revision: str) -> None:
    """Online: the model's config.json, which loading fetches first anyway, fetched now, so that a wrong name,
    a private repo or no network is said before the output dir is made."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception as e:  # huggingface_hub's own kinds: not found, gated, offline, HTTP errors
        raise ModelError(f"{key}={repo_id!r} could not be had from the Hub ({first_line(e)}): check the name and "
                         f"your access (HF_TOKEN), or pass a local model folder.") from None


def _cached(repo_id: str, cache_dir: Optional[str], revision: str, wants_config: bool) -> bool:
    """A Hub model is usable offline when the cache holds its snapshot (and its config.json, for a model)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        if wants_config:
            return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir,
                                                     revision=revision), str)
    except ValueError:  # not a valid repo id: transformers would say the same, later and with a traceback
        return False
    snapshots = Path(cache_dir or HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


# --------------------------------------------------------------------------- loading


@contextmanager
def _loading(name: str, what: str):
    """A model-loading failure becomes one line: transformers' own (a missing file, an unknown architecture) and
    what the file readers under it raise (safetensors' SafetensorError for a damaged weights file, torch's
    UnpicklingError, a KeyError for a config field a model class expects), named by kind."""
    try:
        yield
    except ScaletuneError:
        raise
    except (OSError, ValueError) as e:
        raise ModelError(f"Could not load the {what} from {name!r}: {first_line(e)}") from None
    except Exception as e:  # every reader's own kind; the line names it
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            raise  # too little memory is not a damaged model
        raise ModelError(f"Could not load the {what} from {name!r} ({type(e).__name__}): {first_line(e)}. Check "
                         f"that its files are complete (save it again with save_pretrained).") from None


def load_config(m, **kwargs):
    """The model's config: `config_name` when set (from scratch, or instead of the weights' own), else the
    model's; `kwargs` override its fields (label maps, head size)."""
    from transformers import AutoConfig

    from .assets import model_path

    name = m.config_name or m.model_name_or_path
    with _loading(name, "model config"):
        return AutoConfig.from_pretrained(model_path(name), cache_dir=m.cache_dir, revision=m.model_revision,
                                          trust_remote_code=m.trust_remote_code, **kwargs)


def max_position_embeddings(m) -> Optional[int]:
    """The model's position table size (None when its config has none): an input longer than it would crash the
    first forward pass, so the tasks cap their maximum length by it."""
    return getattr(load_config(m), "max_position_embeddings", None)


def load_pretrained(auto_class, m, **kwargs):
    """`auto_class.from_pretrained` of `model_name_or_path` with the run's model settings."""
    from .assets import model_path

    with _loading(m.model_name_or_path, "model"):
        return auto_class.from_pretrained(
            model_path(m.model_name_or_path), cache_dir=m.cache_dir, revision=m.model_revision,
            trust_remote_code=m.trust_remote_code, ignore_mismatched_sizes=m.ignore_mismatched_sizes,
            attn_implementation=m.attn_implementation, use_kernels=m.use_hub_kernels, **kwargs)


def load_exported(auto_class, model_dir: str):
    """A model that scaletune exported (predict, samples): plain torch layers, no Hub kernels."""
    with _loading(model_dir, "model"):
        return auto_class.from_pretrained(model_dir, use_kernels=False)


def hub_kernels_off(model) -> None:
    """Hub kernels off for `model` and every transformers model inside it (a PEFT wrapper's base). Called as soon
    as the model exists, before any `train()`/`eval()` could kernelize a model the user already moved to CUDA."""
    from transformers import PreTrainedModel

    for module in model.modules():
        # reset_kernels (the setter) puts torch's layers back with an empty kernel mapping: nothing is looked up
        if isinstance(module, PreTrainedModel) and module.use_kernels:
            module.use_kernels = False


def check_hub_kernels(model) -> None:
    """use_hub_kernels=true: kernelize now, on the training device, for evaluation and for training (the two
    modes `eval()`/`train()` switch between), so that a kernel that cannot be had (offline, not cached) stops
    the run here in one line instead of at the first evaluation."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        try:
            from kernels import Mode

            module.set_use_kernels(True, mode=Mode.INFERENCE)
            module.set_use_kernels(True, mode=Mode.TRAINING if module.training else Mode.INFERENCE)
        except Exception as e:  # the kernels package and the Hub client raise kinds of their own
            raise ConfigError(f"use_hub_kernels=true, but the Hub kernels for {type(module).__name__} could not be "
                              f"had ({first_line(e)}): connect to the Hub once to cache them, or set "
                              f"use_hub_kernels false.") from None


def load_tokenizer(m, name: str):
    """The tokenizer the run tokenizes with (`name`: tokenizer_name, the model's, or a user model's source)."""
    from transformers import AutoTokenizer

    from .assets import model_path

    with _loading(name, "tokenizer"):
        return AutoTokenizer.from_pretrained(model_path(name), cache_dir=m.cache_dir, revision=m.model_revision,
                                             trust_remote_code=m.trust_remote_code)
