"""Masked-language-model fine-tuning, as transformers' `run_mlm.py`.

Same arguments and the same data path as the example script:

* the text column is `text_column_name`, else `text`, else the first column;
* by default every text is tokenized (with its [CLS]/[SEP]), the tokens are concatenated and cut into
  blocks of `max_seq_length` (default min(1024, tokenizer limit)); the remainder of each `datasets.map`
  batch of 1000 texts that does not fill a whole block is dropped, exactly as `run_mlm.py` does;
* `line_by_line` keeps one example per non-empty line instead, truncated to `max_seq_length` and padded
  per batch;
* tokenization happens once, through the `datasets` cache (rank 0 first, the others read the cache);
  `streaming` tokenizes lazily instead (needs `max_steps`);
* `max_train_samples` / `max_eval_samples` count blocks (or lines), after grouping, as in `run_mlm.py`;
* the token embeddings are resized when the tokenizer has more tokens than the embedding matrix.

Where we differ from `run_mlm.py`, on purpose: which tokens are masked is a function of the example's
tokens, the seed and the epoch only (see `example_seed`), not of a global random stream. So masking is
the same whatever the batch size, accumulation, number of ranks, dataloader workers or resume point
(N micro-batches of b see exactly the masks of one batch of N*b), and evaluation masks the same tokens at
every evaluation, so successive `eval_loss` values are comparable.

And the head projects onto the vocabulary only the positions that carry a label (`SparseHead`), in training
and evaluation: same loss, ~5x less head work, no B x T x V logits. The exported model is the plain one.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..errors import ConfigError
from ..model_source import load_config
from ..losses import SparseTokenCrossEntropy, labelled_first
from .base import PreparedData, Task
from .packing import flatten_padded
from .text import (column_names, group_texts, map_settings, non_empty_lines, perplexity, resize_token_embeddings,
                   row_indices, text_splits, tokenized_splits, untrained_head_weights)

# torch and transformers are imported where they are used: train.preflight imports this module (for
# metric_names) before torch is imported, so that a bad config fails in well under a second.

logger = logging.getLogger(__name__)

# Texts per `datasets.map` batch when grouping: run_mlm.py's default, which decides where remainders fall.
GROUP_BATCH_SIZE = 1000
# Salts keep training and evaluation masks independent (an eval block equal to a train block is masked
# differently).
TRAIN_SALT, EVAL_SALT = 0, 1


# --------------------------------------------------------------------------- pure decisions


def example_seed(input_ids, seed: int, epoch: int, salt: int) -> int:
    """Masking seed of one example: a hash of its tokens, the run seed, the epoch and train/eval salt.

    Keyed by content rather than by position in the data stream so that batching, accumulation,
    sharding across ranks, dataloader workers and resuming cannot change which tokens get masked.
    Identical examples in one epoch get identical masks; the epoch re-draws them.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<qqq", int(seed), int(epoch), int(salt)))
    h.update(np.asarray(input_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def masked_token_accuracy(predictions: np.ndarray, label_ids: np.ndarray) -> float:
    """Share of masked positions (label != -100) where the argmax token is the original token."""
    labels = np.asarray(label_ids).reshape(-1)
    preds = np.asarray(predictions).reshape(-1)
    counted = labels != -100
    if not counted.any():
        return float("nan")
    return float((preds[counted] == labels[counted]).mean())


# --------------------------------------------------------------------------- collator

LABEL_POSITIONS = "mlm_label_positions"
"""Batch key of the labelled positions, B x K (`losses.labelled_first`): read (and removed from the forward's
inputs) by the model's `SparseHead`. Batch-major like every other tensor of the batch, so accelerate can
slice, shard and pad it (a flat index list would be cut to the batch size by its dispatcher)."""


ROWS_MULTIPLE = 8
"""B x K, the rows the sparse head projects, is made a multiple of this. CPU GEMM kernels sum a remainder of
rows in another order than full blocks of rows, so otherwise a position's gradient would depend on how many
positions share its micro-batch, and accumulation (4 x 2 vs 1 x 8) would drift by more than float noise
under Adam. Tensor cores like the multiple too."""


def label_positions(labels):
    """B x K labelled columns per row (`losses.labelled_first`), K the most any row has, raised until B x K is
    a multiple of ROWS_MULTIPLE; None when K would reach the row length (then full logits cost the same, and
    K < T is what tells the loss that logits are sparse)."""
    import math

    batch, width = labels.shape
    step = ROWS_MULTIPLE // math.gcd(batch, ROWS_MULTIPLE)
    k = -(-max(int((labels != -100).sum(dim=1).max()) if batch else 0, 1) // step) * step
    return labelled_first(labels, k) if k < width else None


def __getattr__(name: str):
    # The collator subclasses a transformers class: it is defined on first use, not at import (see the
    # note on imports above). `from scaletune.tasks.mlm import ContentSeededMLMCollator` and pickling (for
    # dataloader workers) both resolve it through here.
    if name == "ContentSeededMLMCollator":
        return _collator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _collator_class():
    from transformers import DataCollatorForLanguageModeling

    @dataclass
    class ContentSeededMLMCollator(_ContentSeededMasking, DataCollatorForLanguageModeling):
        __doc__ = _ContentSeededMasking.__doc__

        epoch: int = 0
        salt: int = TRAIN_SALT
        label_positions: bool = False
        """Also emit LABEL_POSITIONS, for a model whose head projects only the labelled positions."""
        flatten: bool = False
        """`padding_free`: the masked batch's real tokens in one row (`packing.flatten_padded`)."""

    ContentSeededMLMCollator.__qualname__ = "ContentSeededMLMCollator"  # pickled by name, found by __getattr__
    return ContentSeededMLMCollator


class _ContentSeededMasking:
    """`DataCollatorForLanguageModeling` (padding, 80/10/10 masking, special tokens never masked) whose
    randomness comes from `example_seed` per example instead of one stream per batch.

    Each example is masked on its own unpadded tokens with its own generator, so its mask does not depend
    on what else is in the batch or how long the batch is padded.
    """

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the training masks each epoch (dynamic masking); the loop calls this before an epoch."""
        self.epoch = int(epoch)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from transformers.data.data_collator import pad_without_fast_tokenizer_warning

        if not isinstance(examples[0], Mapping) or "input_ids" not in examples[0]:
            raise TypeError("ContentSeededMLMCollator expects dict examples with input_ids.")
        ids = [list(e["input_ids"]) for e in examples]
        batch = pad_without_fast_tokenizer_warning(
            self.tokenizer, examples, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of
        )
        special = batch.pop("special_tokens_mask", None)
        inputs = batch["input_ids"]
        labels = torch.full_like(inputs, -100)
        width = inputs.shape[1]
        for i, row_ids in enumerate(ids):
            n = len(row_ids)
            cols = slice(width - n, width) if self.tokenizer.padding_side == "left" else slice(0, n)
            row_special = special[i: i + 1, cols] if special is not None else None
            self.generator = torch.Generator().manual_seed(example_seed(row_ids, self.seed, self.epoch, self.salt))
            try:
                row_inputs, row_labels = self.torch_mask_tokens(inputs[i: i + 1, cols].clone(), row_special)
            finally:
                self.generator = None  # keep the collator picklable for dataloader workers
            inputs[i, cols] = row_inputs[0]
            labels[i, cols] = row_labels[0]
        batch["input_ids"] = inputs
        batch["labels"] = labels
        if self.flatten:  # after masking (each example on its own tokens), before the positions of its labels
            batch = flatten_padded(batch)
        if self.label_positions:
            positions = label_positions(batch["labels"])
            if positions is not None:
                batch[LABEL_POSITIONS] = positions
        return batch


# --------------------------------------------------------------------------- the task


class MaskedLMTask(Task):
    """Masked-LM fine-tuning (`task: mlm`); metrics: eval_loss, perplexity, masked-token accuracy."""

    name = "mlm"
    metric_names = ("loss", "perplexity", "accuracy")
    sparse_logits = True
    """Project only the labelled positions onto the vocabulary (`SparseHead`). False gives full B x T x V
    logits, the path before; benchmarks/mlm_sparse_logits.py times both."""

    def __init__(self):
        # Set once this task has built a model with a SparseHead: from then on its collators emit the label
        # positions that head reads. A collator of a task that built no such model (handed to
        # transformers.Trainer, say) stays the plain one.
        self._sparse_head_built = False

    # ----------------------------------------------------------------- data

    def prepare_data(self, raw, tokenizer, cfg, main_process_first: Callable) -> PreparedData:
        d = cfg.data
        if tokenizer.mask_token is None:
            raise ConfigError(f"The tokenizer of {cfg.model.model_name_or_path!r} has no mask token, so it cannot "
                              "do masked-LM; use a BERT/RoBERTa-style model or set tokenizer_name.")
        splits, text_column, block_size = text_splits(raw, tokenizer, cfg)
        info = {"block_size": block_size, "text_column": text_column,
                "mode": "line_by_line" if d.line_by_line else "grouped"}

        def tokenize(split, ds):
            return self._tokenize(ds, tokenizer, text_column, block_size, d, split)

        out = tokenized_splits(splits, tokenize, d, main_process_first, info, block_size, "run_mlm.py")
        test = out.get("test")
        return PreparedData(train=out.get("train"), validation=out.get("validation"), test=test,
                            test_ids=row_indices(test), info=info, text_columns=(text_column,))

    def _tokenize(self, ds, tokenizer, text_column, block_size, d, split):
        columns = column_names(ds)
        map_kw, desc = map_settings(ds, d, split)

        if d.line_by_line:
            def tokenize_lines(examples):
                lines = non_empty_lines(examples[text_column])
                return tokenizer(lines, truncation=True, max_length=block_size, return_special_tokens_mask=True)

            return ds.map(tokenize_lines, batched=True, remove_columns=columns, **map_kw,
                          **desc("Tokenizing line by line"))

        def tokenize(examples):
            # Texts longer than the model limit are fine here: they are cut into blocks next.
            texts = [t if isinstance(t, str) else "" for t in examples[text_column]]
            return tokenizer(texts, return_special_tokens_mask=True, verbose=False)

        tokenized = ds.map(tokenize, batched=True, remove_columns=columns, **map_kw, **desc("Tokenizing"))
        return tokenized.map(group_texts, fn_kwargs={"block_size": block_size}, batched=True,
                             batch_size=GROUP_BATCH_SIZE, **map_kw, **desc(f"Grouping into blocks of {block_size}"))

    # ----------------------------------------------------------------- model

    def build_model(self, cfg, prepared: PreparedData, tokenizer):
        from transformers import AutoModelForMaskedLM

        from ..model_source import load_pretrained

        m = cfg.model
        model, loading = load_pretrained(AutoModelForMaskedLM, m, config=load_config(m), output_loading_info=True)
        new_head = untrained_head_weights(loading.get("missing_keys", ()), model.base_model_prefix)
        if new_head:
            # Encoder-only checkpoints (e.g. the packaged MiniLM, a sentence encoder) ship no MLM head.
            logger.warning("%s has no pretrained masked-LM head (%d head tensors newly initialised, e.g. %s): "
                           "expect a high starting loss that falls as the head is learned.",
                           m.model_name_or_path, len(new_head), new_head[0])
        resize_token_embeddings(model, len(tokenizer))
        # After the resize, which may replace the output projection the head hooks into.
        if self.sparse_logits and SparseHead.install(model) is not None:
            self._sparse_head_built = True
        return model

    def loss(self, cfg):
        # Takes the labelled positions' logits from a SparseHead model, and full logits from any other.
        return SparseTokenCrossEntropy()

    def collator(self, tokenizer, cfg, for_training: bool) -> Callable:
        d, t = cfg.data, cfg.training
        pad_to = d.pad_to_multiple_of
        if pad_to is None and d.line_by_line and (t.fp16 or t.bf16):
            pad_to = 8  # run_mlm.py's default for padded lines under mixed precision (tensor cores)
        return _collator_class()(
            tokenizer=tokenizer, mlm_probability=d.mlm_probability, pad_to_multiple_of=pad_to,
            seed=t.seed, salt=TRAIN_SALT if for_training else EVAL_SALT, label_positions=self._sparse_head_built,
            flatten=for_training and d.padding_free,  # evaluation stays padded, one row per example, as for clm
        )

    # ----------------------------------------------------------------- metrics and outputs

    def preprocess_logits(self, logits, labels):
        # Gather token ids, not a (batch, length, vocab) float tensor.
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if labels is not None and logits.shape[1] < labels.shape[1]:  # a SparseHead's B x K x V logits
            # Back to batch x length (-100 where unlabelled): the shape evaluation pads and gathers per sample.
            columns = labelled_first(labels, logits.shape[1])
            ids = logits.argmax(dim=-1).masked_fill(labels.gather(1, columns) == -100, -100)
            return labels.new_full(labels.shape, -100).scatter_(1, columns, ids)
        return logits.argmax(dim=-1)

    def compute_metrics(self, predictions: np.ndarray, label_ids: np.ndarray) -> dict:
        return {"accuracy": masked_token_accuracy(predictions, label_ids)}

    def metrics_from_loss(self, eval_loss: float) -> dict:
        return {"perplexity": perplexity(eval_loss)}

    def write_predictions(self, path, predictions: np.ndarray, prepared: PreparedData, model_config) -> None:
        """Nothing to write: as in run_mlm.py, a masked-LM test split yields metrics only (test_loss,
        test_perplexity, test_accuracy). Argmax ids at randomly masked positions are not a useful file;
        use the exported model in a `fill-mask` pipeline to get predictions for given texts."""
        return None


class SparseHead:
    """Makes a masked-LM head project only the labelled positions onto the vocabulary.

    Training and evaluation need logits only where labels != -100 (~15% of the tokens), but the head's
    vocabulary projection (hidden x 30,522 for BERT) runs on every position: for MiniLM that costs more FLOPs
    than the whole encoder. Installed as hooks, not as a replacement module, so the parameters, their names and
    `save_pretrained` are untouched: the exported model is a plain `*ForMaskedLM` for a fill-mask pipeline.

    * a forward pre-hook on the model takes LABEL_POSITIONS (B x K, from the collator) out of the inputs,
      since the loop strips `labels` before the forward;
    * a forward pre-hook on the head gathers those positions' hidden states (B x T x H -> B x K x H), so its
      logits are B x K x V (`losses.SparseTokenCrossEntropy` reads them);
    * without LABEL_POSITIONS in the inputs the model computes full logits, as before.

    The hooks sit on the inner model, so calls through DDP / DeepSpeed / torch.compile wrappers (which must
    keep calling the wrapper's forward for gradient sync) reach them.
    """

    def __init__(self):
        self.positions = None

    @classmethod
    def install(cls, model) -> Optional["SparseHead"]:
        """Hooks `model`'s vocabulary head; None (nothing installed) when no position-wise head is found."""
        head = vocabulary_head(model)
        if head is None:
            return None
        hooks = cls()
        model.register_forward_pre_hook(hooks.take_positions, with_kwargs=True)
        model.register_forward_hook(hooks.forget_positions, always_call=True)
        head.register_forward_pre_hook(hooks.gather)
        return hooks

    def take_positions(self, module, args, kwargs):
        self.positions = kwargs.get(LABEL_POSITIONS)
        return args, {k: v for k, v in kwargs.items() if k != LABEL_POSITIONS}

    def forget_positions(self, module, args, output):
        self.positions = None  # also after an exception: a later plain forward must get full logits

    def gather(self, module, args):
        if self.positions is None:
            return None
        hidden = args[0]
        index = self.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return (hidden.gather(1, index), *args[1:])


def vocabulary_head(model):
    """The module mapping the final hidden states, position by position, to vocabulary logits: BERT's
    `cls.predictions` (transform + decoder), RoBERTa's `lm_head`, else the output projection itself."""
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if predictions is not None and hasattr(predictions, "decoder"):
        return predictions
    lm_head = getattr(model, "lm_head", None)
    output = model.get_output_embeddings()
    if lm_head is not None and output is not None and getattr(lm_head, "decoder", None) is output:
        return lm_head
    return output
