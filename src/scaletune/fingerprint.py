"""What `datasets` hashes of a tokenizer when it fingerprints a tokenizing `map`.

`Dataset.map` names its cache file by a fingerprint of the function, found by pickling it with dill, the tokenizer
it calls included. datasets' reducer for tokenizers pickles the tokenizer's whole `__dict__`: for a tokenizer
backed by the `tokenizers` library that is the backend (`_tokenizer`, whose serialised state holds the whole
vocabulary, normaliser, pre-tokeniser and post-processor) and, beside it, `_vocab`, the Python copy of the same
vocabulary the backend was built from. dill pickles that dict in pure Python: for BERT's 30,522 entries 0.13 s
of CPU per `map`, about 0.5 s of each run's start (train, validation and test are a map each), where everything
else the fingerprint needs costs 5 ms.

`hash_by_backend(tokenizer)` registers, for the tokenizer's class, datasets' own reducer applied to the state
without `_vocab` when a backend is there: the same fingerprint inputs minus a duplicate (tokenizing reads the
backend, never `_vocab`). A tokenizer without a backend (`backend == "python"`) is hashed as datasets does.
"""

from __future__ import annotations

import logging

_log = logging.getLogger(__name__)


def hash_by_backend(tokenizer) -> None:
    """Let datasets hash `tokenizer`'s class without the Python copy of the vocabulary (see the module)."""
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):  # a processor, say: datasets hashes it as it does
        return
    try:
        from datasets.utils import _dill
    except ImportError:  # no datasets: nothing is fingerprinted
        return
    save = getattr(_dill, "_save_transformersPreTrainedTokenizerBase", None)
    if save is None:  # another datasets: its own hashing stays, only slower
        _log.debug("datasets has no tokenizer reducer here: tokenizers are hashed by datasets alone")
        return

    def save_without_vocab_copy(pickler, obj) -> None:
        state = obj.__dict__
        if state.get("_tokenizer") is not None and "_vocab" in state:
            light = object.__new__(type(obj))  # shares the backend: datasets' reducer restores what it toggles
            light.__dict__.update((k, v) for k, v in state.items() if k != "_vocab")
            obj = light
        save(pickler, obj)

    _dill.pklregister(type(tokenizer))(save_without_vocab_copy)
