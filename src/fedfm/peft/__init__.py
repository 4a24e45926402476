"""WHAT IS TRAINED: tuners and the get/set of the trainable State."""

from fedfm.peft.base import apply_tuner, head_modules, register_tuner, tuners
from fedfm.peft.state import count_params, get_state, set_state, trainable_names
from fedfm.peft import full, lora  # noqa: F401  (register tuners)
from fedfm.peft import adapters, bitfit, feature_attention, ffa_lora, ia3, prompt, salience, sparse  # noqa: F401  (register tuners)
from fedfm.peft import dual_adapter, ffdapt, personal_prompt, discrete_prompt  # noqa: F401  (register dual_adapter, ffdapt, personal_prompt, discrete_prompt)
from fedfm.peft import fedapt  # noqa: F401  (registers fedapt)
from fedfm.peft import diprompt  # noqa: F401  (registers diprompt)

__all__ = [
    "apply_tuner",
    "count_params",
    "get_state",
    "head_modules",
    "register_tuner",
    "set_state",
    "trainable_names",
    "tuners",
]
