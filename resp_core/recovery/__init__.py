"""Recovery after pruning: the machinery the recoverers share (``recovery:`` in a recipe).

* :mod:`.divergence` — decode-token losses: cross-entropy, and forward KL / reverse KL / JS
  between the dense model's stored top-k distribution and the student's;
* :mod:`.teacher` — the dense model's top-k log-probabilities on the calibration traces, stored
  once in the run folder;
* :mod:`.trainer` — the bounded training settings and the resumable training loop (full
  weights or LoRA);
* :mod:`.lora` — LoRA through peft, and the checked merge back into the weights.

The stage that runs recovery inside a run is :mod:`resp_core.recovery_stage`; the built-in
recoverers are ``resp_plugins.recovery`` (``self_distill``, ``lora_sft``).
"""
