"""Everything that depends on the backend: which one runs (`backend.Backend`), the Accelerator
(`accelerator`), DeepSpeed's and FSDP2's set-up (`deepspeed`, `fsdp`), and what every rank does together
(`collectives`). The loop never branches on DDP vs DeepSpeed vs FSDP2 vs CPU; it asks `Backend`.

The names below are the ones the entry point and the tests import from `scaletune.distributed`; modules inside
the project import the submodule that owns a name.
"""

from .accelerator import build_accelerator, configure_model, free_finished_run
from .backend import Backend, effective_mixed_precision
from .collectives import all_agree, clip_gradients, wait_for_the_error_line
from .deepspeed import adjust_for_cpu_only, fill_deepspeed_config
from .fsdp import check_fsdp_launch, fsdp_layers_to_wrap, untie_fsdp_aliases

__all__ = [
    "Backend", "adjust_for_cpu_only", "all_agree", "build_accelerator", "check_fsdp_launch", "clip_gradients",
    "configure_model", "effective_mixed_precision", "fill_deepspeed_config", "fsdp_layers_to_wrap",
    "free_finished_run", "untie_fsdp_aliases", "wait_for_the_error_line",
]
