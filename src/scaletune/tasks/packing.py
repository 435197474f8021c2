"""`padding_free`: a training batch's examples packed end to end in one row -- causal LM from the examples
(`FlatteningCollator`), the per-token encoder tasks from their own padded batch (`flatten_padded`) -- and the
check, once at load, that the model's attention keeps the packed examples apart and numbers positions from 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..errors import ConfigError
from ..losses import IGNORE_INDEX, model_inputs


class FlatteningCollator:
    """`padding_free`: the batch's examples end to end in one row, no padding. transformers'
    `DataCollatorWithFlattening` does the flattening: position ids restart at 0 per example, and each example's
    first label is -100, so no position is scored on the next example's first token and `ShiftedCrossEntropy`
    counts exactly the tokens the padded batch counts. It adds `use_cache=False`: with a cache (the default in
    transformers 5 even in training) the model builds a plain causal mask over the whole row and attends
    across examples; without one it builds the per-example block mask from the position ids."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, examples: list[Mapping]) -> dict:
        batch = self.flatten([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        batch["use_cache"] = False
        return batch


def flatten_padded(batch: Mapping) -> dict:
    """A padded batch (B x T tensors, `attention_mask` 1 on real tokens, padding on either side) as one row of its
    real tokens end to end: every per-token key keeps the positions the mask keeps, `position_ids` restart at 0
    per example, and there is no attention mask (the model builds the per-example block mask from the position
    ids). Labels are kept as they are: an encoder scores each token in place, so no boundary needs a -100. A
    batch without a mask has rows of one length, all real."""
    import torch

    rows, width = batch["input_ids"].shape
    mask = batch.get("attention_mask")
    keep = torch.ones(rows, width, dtype=torch.bool) if mask is None else mask.bool()
    flat = {}
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        if not torch.is_tensor(value) or tuple(value.shape) != (rows, width):
            raise ConfigError(f"padding_free=true puts the batch's tokens in one row, but its {key!r} is not one "
                              f"value per token (shape {tuple(getattr(value, 'shape', ()))}, tokens {rows} x "
                              f"{width}); set padding_free=false.")
        flat[key] = value[keep].unsqueeze(0)
    flat["position_ids"] = (keep.long().cumsum(dim=1) - 1)[keep].unsqueeze(0)
    return flat


class FlattenedPadding:
    """`padding_free` for an encoder task: the task's own padded collator (so its labels, and MLM's masks, are
    exactly the padded batch's), then `flatten_padded`."""

    def __init__(self, padded: Callable[[list], Mapping]):
        self.padded = padded

    def __call__(self, examples: list[Mapping]) -> dict:
        return flatten_padded(self.padded(examples))


PACKING_TOLERANCE = 1e-4
"""Largest |logit difference| allowed, relative to the largest |logit|, between one example packed after two
different examples of the same length. Attention kept per example leaves it unchanged (the same kernels on the
same shapes: 0 in fp32 and bf16 alike); a model that attends across examples changes it far more (0.3-0.4% for
a 2-layer random BLOOM, whose ALiBi bias fades with distance)."""


def _one_layer_copy(model, name: str):
    """The model's class and config with one layer and fresh weights, built outside ZeRO-3's partitioning."""
    import copy

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 1
    try:
        return type(model)(config)
    except Exception as e:  # an architecture whose config cannot shrink that way
        raise ConfigError(f"padding_free=true: ZeRO-3 partitioned the weights of {name} at load, and a one-layer "
                          f"copy to check its attention could not be built ({e}); set attn_implementation="
                          f"flash_attention_2, or padding_free=false.") from e


def check_packed_attention(model) -> None:
    """Refuse `padding_free` for a model whose attention would mix the examples of a flattened row: pack one
    short example after another, as FlatteningCollator does, then after a different one of the same length, and
    compare its logits. (Comparing with the example alone would also compare two kernels, whose bf16 rounding
    differs by up to 25% of a logit.) Also refuse a model that numbers its own positions other than from 0 (RoBERTa
    starts after the padding id), which the flattened row's position ids would shift: the example alone, with and
    without position ids 0..n-1 (one kernel, one shape). flash_attention_2/3 are trusted for causal LMs, whose
    varlen kernels take the example boundaries from the position ids; an encoder under them is refused (not
    checkable before the model is on the GPU). Weights that ZeRO-3 partitioned at load are checked on a one-layer
    copy of the architecture."""
    import torch

    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    causal = model.can_generate()
    flash_fix = ", or attn_implementation=flash_attention_2 on a GPU" if causal else ""
    name = f"{model.config.model_type} with {impl} attention"
    if impl.startswith("flash_attention"):
        if causal:
            return
        raise ConfigError(f"padding_free=true: {name} is an encoder, whose packed attention scaletune checks under "
                          f"sdpa or eager only; set attn_implementation=sdpa, or padding_free=false.")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        # ZeRO-3 loaded the weights straight into shards: this model cannot run a forward before `prepare`.
        # Whether attention keeps packed examples apart is a property of the architecture, not of the weights.
        model = _one_layer_copy(model, name)
    vocab = model.get_input_embeddings().num_embeddings
    flatten = FlatteningCollator()
    example = [i % vocab for i in range(23, 27)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the forwards must differ only if attention crosses examples or positions shift

    def last_logits(rows: list[list[int]], positions: bool = True):
        row = flatten([{"input_ids": r, "labels": r} for r in rows])
        if not positions:
            del row["position_ids"]
        # What the loop's forward gets from a flattened batch (flags as they are, tensors on the device).
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(row).items()}
        return model(**inputs).logits[0, -len(rows[-1]):].float()

    try:
        with torch.no_grad():
            packed = [last_logits([[i % vocab for i in before], example]) for before in (range(11, 16), range(31, 36))]
            alone = [last_logits([example], positions) for positions in (True, False)]
    except (TypeError, ValueError) as e:  # e.g. a forward that takes no position_ids
        raise ConfigError(f"padding_free=true: {name} cannot run a flattened batch ({e}); set "
                          f"padding_free=false{flash_fix}.") from e
    finally:
        model.train(was_training)
    # Host-device sync points: once, at load.
    mixed, shifted = (float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in (packed, alone))
    if mixed > PACKING_TOLERANCE:
        raise ConfigError(f"padding_free=true: {name} attends across the examples packed in one row (an example's "
                          f"logits change by {mixed:.2%} with the example before it); set padding_free=false"
                          f"{flash_fix}.")
    if shifted > PACKING_TOLERANCE:
        raise ConfigError(f"padding_free=true: {model.config.model_type} does not number positions from 0 (an "
                          f"example's logits change by {shifted:.2%} given position ids 0..n-1), so the position ids "
                          f"of a flattened row would shift its position embeddings; set padding_free=false.")
