"""The PEFT argument group (LoRA adapters through peft), under peft's names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..errors import ConfigError
from .checks import check_types
from .checks import require as _require

LoraBias = Literal["none", "all", "lora_only"]


@dataclass
class PEFTArguments:
    """Parameter-efficient fine-tuning: LoRA adapters (peft) instead of training every weight."""

    use_peft: bool = False
    """Train LoRA adapters (peft) on a frozen pretrained model: checkpoints hold the adapter and its optimizer
    state only; the export writes `output_dir/adapter/` (and the merged model, see merge_adapters_at_export).
    Works under DDP, DeepSpeed ZeRO-1/2/3 and FSDP2."""
    lora_r: int = 8
    """LoRA rank (>= 1): the adapter of a d x k weight has r x (d + k) parameters."""
    lora_alpha: int = 16
    """LoRA scaling numerator (>= 1): the adapter's update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.1
    """Dropout on the adapters' input, in [0, 1)."""
    lora_target_modules: Optional[str] = None
    """Module names that get adapters, comma separated (`query,value`), or `all-linear`. Default: peft's choice
    for the architecture (`query,value` for BERT-family models)."""
    modules_to_save: Optional[str] = None
    """Modules trained whole next to the adapters, comma separated (`""` for none). Default: the task head
    (`classifier`); of a language-model head (MLM) only the modules the checkpoint lacks (an encoder-only
    checkpoint has no MLM head), never the decoder tied to the embeddings."""
    lora_bias: LoraBias = "none"
    """Which biases train (peft's LoraConfig `bias`): none, all biases of the model, or those of the adapted
    modules; trained biases are saved with the adapter."""
    merge_adapters_at_export: bool = True
    """Also export the model with the adapters merged into its weights (`output_dir`, loadable with
    `from_pretrained` without peft); the adapter alone is always written to `output_dir/adapter/`."""

    def __post_init__(self):
        for name in ("lora_target_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                setattr(self, name, ",".join(value))  # a YAML list means the same names
        check_types(self)
        _require(self, "lora_r", self.lora_r >= 1, ">= 1")
        _require(self, "lora_alpha", self.lora_alpha >= 1, ">= 1")
        _require(self, "lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)")
        if self.lora_target_modules is not None and not [n for n in self.lora_target_modules.split(",") if n.strip()]:
            raise ConfigError("lora_target_modules is empty: give module names (query,value), all-linear, or leave it "
                              "unset for the architecture's default.")
