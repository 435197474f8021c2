"""`padding_free` (causal LM): a batch's examples packed end to end in one row, and the check, once at load,
that the model's attention keeps the packed examples apart.
"""

from __future__ import annotations

from collections.abc import Mapping

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
    differs by up to 25% of a logit.) flash_attention_2/3 are trusted: their varlen kernels take the example
    boundaries from the position ids. Weights that ZeRO-3 partitioned at load are checked on a one-layer copy of
    the architecture."""
    import torch

    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl.startswith("flash_attention"):
        return
    name = f"{model.config.model_type} with {impl} attention"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        # ZeRO-3 loaded the weights straight into shards: this model cannot run a forward before `prepare`.
        # Whether attention keeps packed examples apart is a property of the architecture, not of the weights.
        model = _one_layer_copy(model, name)
    vocab = model.get_input_embeddings().num_embeddings
    flatten = FlatteningCollator()
    example = [i % vocab for i in range(23, 27)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the two forwards must differ only if attention crosses examples
    logits = []
    try:
        with torch.no_grad():
            for before in (range(11, 16), range(31, 36)):
                before = [i % vocab for i in before]
                row = flatten([{"input_ids": before, "labels": before}, {"input_ids": example, "labels": example}])
                # What the loop's forward gets from a flattened batch (flags as they are, tensors on the device).
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(row).items()}
                logits.append(model(**inputs).logits[0, len(before):].float())
    except (TypeError, ValueError) as e:  # e.g. a forward that takes no position_ids
        raise ConfigError(f"padding_free=true: {name} cannot run a flattened batch ({e}); set padding_free=false "
                          f"or attn_implementation=flash_attention_2.") from e
    finally:
        model.train(was_training)
    # Host-device sync point: once, at load.
    mixed = float((logits[0] - logits[1]).abs().max() / logits[1].abs().max().clamp(min=1e-12))
    if mixed > PACKING_TOLERANCE:
        raise ConfigError(f"padding_free=true: {name} attends across the examples packed in one row (an example's "
                          f"logits change by {mixed:.2%} with the example before it); set padding_free=false, or "
                          f"attn_implementation=flash_attention_2 on a GPU.")
