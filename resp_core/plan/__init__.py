"""``respctl plan``: the memory and time a recipe needs, from the model's config alone.

Nothing is loaded but ``config.json``: parameter counts come from the model built on the meta
device (``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``: exact counts, no
memory), everything else is arithmetic on the config and the recipe.

Here: the formulas (:mod:`.formulas`: memory of each phase, FLOPs and times) and the plan of a
recipe (:mod:`.fit`: the config and counts, the settings, the plan and what does not fit).
"""

from .fit import (KNOWN_CONFIGS, LM_EVAL_TASK_ITEMS, Plan, check_fits, count_parameters, fit_problems,
                  format_seconds, gib, load_config, make_plan, parse_size, recipe_settings)
from .formulas import (ACTIVATION_COEFFICIENTS, DEVICES, DTYPE_BYTES, GRADIENT_SCORERS, GiB, ModelCounts,
                       activation_elements_per_token_layer, forward_only_memory, generation_time,
                       hf_generation_memory, kv_bytes_per_token, scoring_flops, scoring_memory)

__all__ = ["ACTIVATION_COEFFICIENTS", "DEVICES", "DTYPE_BYTES", "GRADIENT_SCORERS", "GiB", "KNOWN_CONFIGS",
           "LM_EVAL_TASK_ITEMS", "ModelCounts", "Plan", "activation_elements_per_token_layer", "check_fits",
           "count_parameters", "fit_problems", "forward_only_memory", "format_seconds", "generation_time", "gib",
           "hf_generation_memory", "kv_bytes_per_token", "load_config", "make_plan", "parse_size",
           "recipe_settings", "scoring_flops", "scoring_memory"]
