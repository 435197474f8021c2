"""Causal language modelling, as transformers' `run_clm.py`: fine-tune a pretrained causal LM, or train one from
scratch (`model_name_or_path: null` with `config_name` and `tokenizer_name`: `AutoModelForCausalLM.from_config`).

The data path is run_clm.py's:

* the text column is `text_column_name`, else `text`, else the first string column;
* every text is tokenized, the tokens of each `datasets.map` batch of 1000 texts are concatenated and cut into
  blocks of `max_seq_length` (alias `block_size`; default min(1024, tokenizer limit, model context)); the
  batch's remainder that does not fill a block is dropped, as run_clm.py does (the count is in the run info);
* `line_by_line: true` keeps one example per non-empty text instead, truncated to `max_seq_length` (the number
  of truncated texts is logged) and padded per batch;
* labels are the input ids; the shift (position t predicts token t+1) happens in the loss, `ShiftedCrossEntropy`,
  which counts exactly the predicted tokens, so accumulation and distribution normalise as one big batch;
* `validation_split_percentage` carves validation out of train when it is missing; `streaming` tokenizes
  lazily (needs max_steps); `max_*_samples` count blocks, after grouping;
* metrics: eval_loss, perplexity = exp(eval_loss), next-token accuracy. The baseline is a unigram model: the
  perplexity of the validation tokens under the train split's token frequencies (add-one smoothed);
* after training, the exported model continues a few held-out prompts (the first words of test texts):
  `output_dir/samples.txt`, also printed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..losses import IGNORE_INDEX, ItemLoss, row_cross_entropy
from ..model_source import load_config
from .base import PreparedData, Task
from .packing import FlatteningCollator
from .text import (column_names, group_texts, is_stream, map_settings, perplexity, resize_token_embeddings,
                   row_indices, text_splits, tokenized_splits)

logger = logging.getLogger(__name__)

GROUP_BATCH_SIZE = 1000  # texts per `datasets.map` batch when grouping: run_clm.py's, which decides the remainders
PROMPT_WORDS = 8
"""A sample's prompt: the first words of a held-out text."""
SAMPLES_FILE = "samples.txt"


# --------------------------------------------------------------------------- the loss


@dataclass(frozen=True)
class ShiftedCrossEntropy(ItemLoss):
    """Next-token cross-entropy: the logits at position t score the label at t+1 (B x T x V logits, B x T labels).

    The items are the predicted tokens, `labels[:, 1:] != -100`: a row's first label is never predicted, so
    counting it (as `labels != -100` would) would shrink every loss by T/(T-1) and weigh short rows wrongly
    under accumulation. Same numbers as transformers' `ForCausalLMLoss` with `num_items_in_batch` and Trainer's
    count of shifted labels.
    """

    label_smoothing: float = 0.0

    def count(self, labels):
        return (labels[:, 1:] != IGNORE_INDEX).sum().float()

    def per_sample(self, logits, labels):
        import torch.nn.functional as F

        batch, width = labels.shape
        # The labels move left, not the logits: logits[:, :-1] is not contiguous, and flattening it would copy
        # all B x T x V of them. The last position predicts nothing (target -100, loss 0).
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        flat = row_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 label_smoothing=self.label_smoothing)
        return flat.view(batch, width).sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1).float()


# --------------------------------------------------------------------------- pure pieces


def unigram_perplexity(train_counts: np.ndarray, tokens: np.ndarray) -> float:
    """exp of the cross-entropy of `tokens` under the unigram distribution of `train_counts` (one count per
    vocabulary id), add-one smoothed so a token unseen in train has a finite cost."""
    counts = np.asarray(train_counts, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size == 0:
        return float("nan")
    log_p = np.log(counts[tokens] + 1.0) - math.log(counts.sum() + len(counts))
    return perplexity(float(-log_p.mean()))


def next_token_accuracy(predictions: np.ndarray, label_ids: np.ndarray) -> float:
    """Share of predicted positions whose argmax is the next token. `predictions` are already shifted (the
    prediction for label t sits at t; -100 at a row's first position, which nothing predicts)."""
    preds = np.asarray(predictions).reshape(-1)
    labels = np.asarray(label_ids).reshape(-1)
    counted = (preds != IGNORE_INDEX) & (labels != IGNORE_INDEX)
    if not counted.any():
        return float("nan")
    return float((preds[counted] == labels[counted]).mean())


def predicted_tokens(label_rows) -> np.ndarray:
    """The tokens a causal LM is scored on: every label after a row's first, -100 excluded."""
    parts = [np.asarray(row[1:], dtype=np.int64) for row in label_rows]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return flat[flat != IGNORE_INDEX]


# --------------------------------------------------------------------------- collator


class PadCollator:
    """Pads input_ids (with the pad id, or 0 when the tokenizer has none: those positions are masked), the
    attention mask (0) and labels (-100). Grouped blocks all have one length and pass through unchanged."""

    def __init__(self, pad_id: Optional[int], pad_to_multiple_of: Optional[int] = None):
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[Mapping]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key, value in fill.items():
            if key not in examples[0]:
                continue
            rows = [list(e[key]) + [value] * (width - len(e[key])) for e in examples]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch


# --------------------------------------------------------------------------- the task


class _Tokenize:
    """texts -> token ids (no special handling beyond the tokenizer's own, as run_clm.py). A class, not a
    closure, so the `datasets` cache key is the tokenizer and the settings."""

    def __init__(self, tokenizer, text_column: str, truncate_to: Optional[int]):
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.truncate_to = truncate_to

    def __call__(self, examples):
        texts = [t for t in examples[self.text_column] if isinstance(t, str) and t.strip()]
        if self.truncate_to is None:
            enc = self.tokenizer(texts, return_token_type_ids=False, verbose=False)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        enc = self.tokenizer(texts, return_token_type_ids=False, verbose=False)
        cut = [len(ids) > self.truncate_to for ids in enc["input_ids"]]
        ids = [row[: self.truncate_to] for row in enc["input_ids"]]
        return {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": [list(r) for r in ids],
                "truncated": cut}


def _add_labels(examples):
    return {"labels": [list(ids) for ids in examples["input_ids"]]}


class CausalLMTask(Task):
    """Causal-LM training (`task: clm`); metrics: eval_loss, perplexity, next-token accuracy."""

    name = "clm"
    metric_names = ("loss", "perplexity", "accuracy")

    def __init__(self):
        self._train_counts: Optional[np.ndarray] = None
        self.prompts: list[str] = []
        self._sample_settings = (0, 0, 0)
        self._tokenizer = None

    # ----------------------------------------------------------------- data

    def prepare_data(self, raw, tokenizer, cfg, main_process_first: Callable) -> PreparedData:
        d = cfg.data
        splits, text_column, block_size = text_splits(raw, tokenizer, cfg)
        if d.padding_free and not d.line_by_line:
            logger.warning("padding_free=true with grouped blocks (line_by_line=false): every block holds %d tokens, "
                           "so there is no padding to save, and under sdpa/eager attention the attention spans the "
                           "whole flattened batch, which is slower. Set line_by_line=true, or padding_free=false.",
                           block_size)
        self._tokenizer = tokenizer
        self._sample_settings = (d.sample_prompts, d.sample_max_new_tokens, cfg.training.seed)
        held_out = splits.get("test", splits.get("validation"))
        if held_out is not None and d.sample_prompts:
            self.prompts = _prompts(held_out, text_column, d.sample_prompts)

        info = {"block_size": block_size, "text_column": text_column,
                "mode": "line_by_line" if d.line_by_line else "grouped"}

        def tokenize(split, ds):
            self._count_blank(split, ds, text_column)
            return self._tokenize(ds, tokenizer, text_column, block_size, d, split, info)

        out = tokenized_splits(splits, tokenize, d, main_process_first, info, block_size, "run_clm.py")
        train = out.get("train")
        if train is not None and not is_stream(train):
            self._train_counts = _token_counts(train, len(tokenizer))
        test = out.get("test")
        return PreparedData(train=train, validation=out.get("validation"), test=test, test_ids=row_indices(test),
                            info=info, text_columns=(text_column,))

    @staticmethod
    def _count_blank(split: str, ds, text_column: str) -> None:
        if is_stream(ds):
            return
        blank = sum(1 for t in ds[text_column] if not isinstance(t, str) or not t.strip())
        if blank:
            logger.warning("%d of %d %s texts are empty or not text: they add no tokens.", blank, len(ds), split)

    def _tokenize(self, ds, tokenizer, text_column, block_size, d, split, info):
        stream = is_stream(ds)
        columns = column_names(ds)
        map_kw, desc = map_settings(ds, d, split)
        if d.line_by_line:
            tokenized = ds.map(_Tokenize(tokenizer, text_column, block_size), batched=True, remove_columns=columns,
                               **map_kw, **desc("Tokenizing line by line"))
            if not stream:
                cut = sum(tokenized["truncated"])
                if cut:
                    logger.warning("%d of %d %s texts are longer than max_seq_length=%d tokens and were truncated "
                                   "(line_by_line).", cut, len(tokenized), split, block_size)
                    info[f"{split}_truncated_texts"] = cut
            return tokenized.remove_columns("truncated")
        tokenized = ds.map(_Tokenize(tokenizer, text_column, None), batched=True, remove_columns=columns, **map_kw,
                           **desc("Tokenizing"))
        blocks = tokenized.map(group_texts, fn_kwargs={"block_size": block_size}, batched=True,
                               batch_size=GROUP_BATCH_SIZE, **map_kw, **desc(f"Grouping into blocks of {block_size}"))
        blocks = blocks.map(_add_labels, batched=True, **map_kw, **desc("Labels"))
        if not stream:
            total = int(sum(len(ids) for ids in tokenized["input_ids"]))
            kept = len(blocks) * block_size
            info[f"{split}_tokens_dropped"] = total - kept
            if total - kept:
                logger.info("%s: %d of %d tokens left over after cutting into blocks of %d (run_clm.py drops each "
                            "map batch's remainder).", split, total - kept, total, block_size)
        return blocks

    # ----------------------------------------------------------------- model

    def build_model(self, cfg, prepared: PreparedData, tokenizer):
        from transformers import AutoModelForCausalLM

        from ..model_source import load_pretrained

        m = cfg.model
        config = load_config(m)
        if m.model_name_or_path is None:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code,
                                                     attn_implementation=m.attn_implementation)
            logger.warning("Training a causal LM from scratch (%s, %.1fM parameters, random init).",
                           config.model_type, sum(p.numel() for p in model.parameters()) / 1e6)
        else:
            model = load_pretrained(AutoModelForCausalLM, m, config=config)
        resize_token_embeddings(model, len(tokenizer))
        return model

    def loss(self, cfg) -> ItemLoss:
        return ShiftedCrossEntropy(label_smoothing=cfg.training.label_smoothing_factor)

    def collator(self, tokenizer, cfg, for_training: bool) -> Callable:
        # Evaluation stays padded: its per-example outputs (predictions, samples) need one row per example.
        if for_training and cfg.data.padding_free:
            return FlatteningCollator()
        return PadCollator(tokenizer.pad_token_id, cfg.data.pad_to_multiple_of)

    # ----------------------------------------------------------------- metrics and outputs

    def preprocess_logits(self, logits, labels):
        """Argmax token ids moved one position right, so the prediction for label t sits at t (gather ids, not
        a batch x length x vocabulary float tensor)."""
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        predicted = logits.argmax(dim=-1)
        shifted = predicted.new_full(predicted.shape, IGNORE_INDEX)
        shifted[:, 1:] = predicted[:, :-1]
        return shifted

    def compute_metrics(self, predictions: np.ndarray, label_ids: np.ndarray) -> dict:
        return {"accuracy": next_token_accuracy(predictions, label_ids)}

    def metrics_from_loss(self, eval_loss: float) -> dict:
        return {"perplexity": perplexity(eval_loss)}

    def baseline(self, dataset) -> Optional[str]:
        if self._train_counts is None or dataset is None or "labels" not in getattr(dataset, "column_names", ()):
            return None
        tokens = predicted_tokens(dataset["labels"])
        if tokens.size == 0 or tokens.max() >= len(self._train_counts):
            return None
        return f"unigram perplexity {unigram_perplexity(self._train_counts, tokens):.5g} (train token frequencies)"

    def write_predictions(self, path, predictions: np.ndarray, prepared: PreparedData, model_config) -> None:
        """No prediction file (the test split gives test_loss, test_perplexity, test_accuracy, as run_clm.py).
        Instead the exported model -- `output_dir`, written before the test pass -- continues a few held-out
        prompts: `samples.txt` next to it, also printed."""
        count, max_new_tokens, seed = self._sample_settings
        if not count or not self.prompts:
            return
        folder = Path(path).parent
        samples = sample_continuations(str(folder), self.prompts, max_new_tokens, seed)
        text = "".join(f"prompt: {p}\ncontinuation: {c}\n\n" for p, c in samples)
        (folder / SAMPLES_FILE).write_text(text, encoding="utf-8")
        print(f"Sampled continuations of {len(samples)} held-out prompts ({folder / SAMPLES_FILE}):\n{text}",
              flush=True)


def sample_continuations(model_dir: str, prompts: list[str], max_new_tokens: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, sampled continuation) with the exported model, top-k 50 sampling from a fixed seed (on the GPU
    when there is one). Loaded from disk, so this works the same after any distributed backend."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model_source import load_exported

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_exported(AutoModelForCausalLM, model_dir).to(device).eval()
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = []
    for i, prompt in enumerate(prompts):
        enc = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        ids = enc["input_ids"]
        if eos is not None and ids.shape[1] > 1 and ids[0, -1].item() == eos:
            ids = ids[:, :-1]  # a BERT-style tokenizer closes the text with [SEP]: the continuation comes first
        torch.manual_seed(seed + i)
        with torch.no_grad():
            generated = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                       do_sample=True, top_k=50, max_new_tokens=max_new_tokens,
                                       pad_token_id=pad, eos_token_id=eos)
        out.append((prompt, tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip()))
    return out


def _prompts(ds, text_column: str, count: int) -> list[str]:
    rows = islice(iter(ds), 10 * count) if is_stream(ds) else (ds[i] for i in range(min(len(ds), 10 * count)))
    out = []
    for row in rows:
        text = row.get(text_column)
        words = text.split() if isinstance(text, str) else []
        if len(words) > PROMPT_WORDS:
            out.append(" ".join(words[:PROMPT_WORDS]))
        if len(out) == count:
            break
    return out


def _token_counts(ds, vocab_size: int) -> np.ndarray:
    """Token frequencies of the tokenized train split (what the model is trained on)."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(ds.with_format("arrow")["input_ids"]).to_numpy(zero_copy_only=False)
    flat = np.asarray(flat, dtype=np.int64)
    return np.bincount(flat, minlength=max(vocab_size, int(flat.max()) + 1 if flat.size else 0))


__all__ = ["CausalLMTask", "ShiftedCrossEntropy", "PadCollator", "unigram_perplexity", "next_token_accuracy",
           "sample_continuations"]
