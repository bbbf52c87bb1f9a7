"""The one place that knows decoder architectures.

Everything else in RESP (scorers, allocators, compaction, benchmarks) asks a
:class:`DecoderAdapter` for layers, projections, head geometry and GQA grouping instead of
reaching into ``model.model.layers[i].self_attn.q_proj`` itself.  Qwen3, Qwen2, Llama,
Mistral and Gemma 3 (the text model, ``Gemma3ForCausalLM``) share the same module layout
(q/k/v/o projections, gated MLP with gate/up/down) and differ only in biases, q/k norms, extra
per-layer norms (Gemma 3's sandwich norms), attention scaling (Gemma 3's
``query_pre_attn_scalar``, independent of the number of heads) and sliding-window layers
(``config.layer_types``, kept per layer by compaction), none of which a structure cuts through.
Phi-3 is refused: its fused ``qkv_proj`` and ``gate_up_proj`` give no per-projection weights
(and no per-projection gradients) for scorers to read and masks to zero.

``head_dim`` always comes from ``config.head_dim`` when the config sets it; ``hidden_size /
num_attention_heads`` is only a fallback for configs that do not (the authors' code uses the
fallback unconditionally, which is wrong for Qwen3: Qwen3-0.6B has hidden 1024, 16 heads,
head_dim 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RespError

SUPPORTED_FAMILIES = ("qwen3", "qwen2", "llama", "mistral", "gemma3_text")

# Families transformers knows that the adapter refuses, with what is missing.
_REFUSED = {
    "phi3": "its fused qkv_proj and gate_up_proj projections have no separate q/k/v and gate/up "
            "weights for scores and masks",
    "gemma3": "the multimodal Gemma3ForConditionalGeneration is not a text decoder; load the text model "
              "(Gemma3ForCausalLM, model_type gemma3_text)",
}

# Output biases a scorer may add (FLAP's compensation: o_proj and down_proj) and the config flag
# that makes a standard model of the family carry them (every projection of the block then has a
# bias; the ones not added are zero).  Families without a flag cannot hold them in a standard config.
_OUTPUT_BIAS_FLAGS = {
    "llama": {"o": "attention_bias", "down": "mlp_bias"},
    "qwen3": {"o": "attention_bias"},
    "gemma3_text": {"o": "attention_bias"},
}


def check_supported(model_type: str | None, source: str = "model") -> None:
    """Raise a one-line :class:`RespError` unless the adapter supports ``model_type``."""
    if model_type in SUPPORTED_FAMILIES:
        return
    if model_type in _REFUSED:
        raise RespError(f"{source}: model type {model_type!r} is not supported: {_REFUSED[model_type]}")
    raise RespError(f"{source}: model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}")


def output_bias_flags(model_type: str, o_bias: bool, down_bias: bool, config) -> dict:
    """Config changes a standard ``model_type`` config needs to hold o_proj / down_proj biases.

    Raises :class:`RespError` when the family has no such flag."""
    flags = _OUTPUT_BIAS_FLAGS.get(model_type, {})
    out = {}
    for part, needed in (("o", o_bias), ("down", down_bias)):
        if not needed:
            continue
        name = "o_proj" if part == "o" else "down_proj"
        if part not in flags:
            raise RespError(f"the model carries {name} biases (added by a weight-editing scorer, e.g. FLAP's "
                            f"compensation) that a standard {model_type} config cannot hold; export it as "
                            f"'compacted'")
        if not getattr(config, flags[part], False):
            out[flags[part]] = True
    return out


@dataclass(frozen=True)
class Geometry:
    """Dense (original) geometry of a decoder; masks are indexed against it."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_group_of_head(self) -> torch.Tensor:
        """kv head index for each query head (dense GQA grouping: consecutive query heads)."""
        return torch.arange(self.num_heads) // self.heads_per_group

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class AttentionParts:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass
class MLPParts:
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


def geometry_from_config(config) -> Geometry:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Geometry(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
    )


class DecoderAdapter:
    """Access to the prunable parts of a Llama-family decoder-only model."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        model_type = getattr(model.config, "resp_base_model_type", None) or model_type  # a compacted model
        check_supported(model_type)
        self.model = model
        self.family = model_type
        self.geometry = geometry_from_config(model.config)

    # --- modules ---------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def attention_parts(self, layer: int) -> AttentionParts:
        a = self.attention(layer)
        return AttentionParts(a.q_proj, a.k_proj, a.v_proj, a.o_proj)

    def mlp_parts(self, layer: int) -> MLPParts:
        m = self.mlp(layer)
        return MLPParts(m.gate_proj, m.up_proj, m.down_proj)

    def prunable_linears(self) -> dict[str, nn.Linear]:
        """Qualified name -> Linear for every projection that structures cut through."""
        out = {}
        for i in range(len(self.layers)):
            a, m = self.attention_parts(i), self.mlp_parts(i)
            for name, lin in (("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o)):
                out[f"layers.{i}.attn.{name}"] = lin
            for name, lin in (("gate", m.gate), ("up", m.up), ("down", m.down)):
                out[f"layers.{i}.mlp.{name}"] = lin
        return out

    def attention_input(self, layer: int) -> nn.Module:
        """Module whose forward input is the concatenated head outputs (o_proj)."""
        return self.attention(layer).o_proj

    def mlp_input(self, layer: int) -> nn.Module:
        """Module whose forward input is the MLP's channel activations (down_proj)."""
        return self.mlp(layer).down_proj

    # --- the forward pass in two halves (scoring applies the head to labelled positions only) --
    def decoder_body(self) -> nn.Module:
        """The decoder without the output head: ``body(input_ids=…, attention_mask=…)``
        returns ``last_hidden_state`` (after the final norm)."""
        return self.model.model

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states ``[..., hidden]``, as the full model's forward makes them."""
        logits = self.model.lm_head(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)  # Gemma 3 (None in its configs)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # --- biases used by weight-editing scorers (FLAP's compensation) -----------------------
    @staticmethod
    def ensure_bias(linear: nn.Linear) -> torch.Tensor:
        """Give ``linear`` a (zero) bias if it has none and return it."""
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                   device=linear.weight.device))
        return linear.bias

    # --- counting ----------------------------------------------------------------------------
    def parameter_count(self) -> int:
        seen, total = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total


def adapter_for(model: nn.Module) -> DecoderAdapter:
    return DecoderAdapter(model)
