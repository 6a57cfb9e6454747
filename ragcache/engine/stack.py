"""The model's decoder layers, run one at a time on any subset of tokens.

Blending recomputes different tokens at different layers, which transformers' forward
cannot express, so the runner drives the Llama-shaped layers itself: the same modules
and weights (norms, projections, rotary tables, MLP), with its own attention mask and KV
buffer. tests/test_stack.py holds this against the model's own forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn.functional as F

from ragcache.kernels.rope import apply_rope

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# The Llama-shaped modules the stack drives (loader.SUPPORTED_MODEL_TYPES: Llama, Mistral, Qwen2), as
# the stack uses them. nn.Module's __getattr__ types every submodule as `Tensor | Module`; these say
# what the model's attributes are. Calling a module returns Any (nn.Module.__call__).


class _Attention(Protocol):
    q_proj: torch.nn.Module
    k_proj: torch.nn.Module
    v_proj: torch.nn.Module
    o_proj: torch.nn.Module
    scaling: float  # head_dim ** -0.5


class _DecoderLayer(Protocol):
    self_attn: _Attention
    input_layernorm: torch.nn.Module
    post_attention_layernorm: torch.nn.Module
    mlp: torch.nn.Module


class _Backbone(Protocol):
    """The causal LM's inner model (LlamaModel and its kin)."""

    layers: Sequence[_DecoderLayer]  # an nn.ModuleList
    embed_tokens: torch.nn.Embedding
    norm: torch.nn.Module
    rotary_emb: torch.nn.Module  # (x, positions (1, tokens)) -> cos, sin (1, tokens, head_dim)


class DecoderStack:
    def __init__(self, model: PreTrainedModel) -> None:
        config = model.config  # its fields (PreTrainedConfig's __getattribute__) are Any
        backbone = cast(_Backbone, model.model)
        self.model = model
        self.layers = backbone.layers
        self.embed_tokens = backbone.embed_tokens
        self.norm = backbone.norm
        self.rotary = backbone.rotary_emb
        self.lm_head = cast(torch.nn.Module, model.lm_head)
        self.num_layers: int = config.num_hidden_layers
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.windows = layer_windows(config)
        self.device: torch.device = self.embed_tokens.weight.device
        self.dtype: torch.dtype = self.embed_tokens.weight.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)  # (tokens, hidden)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (tokens, head_dim) from the model's rotary module (scaling included)."""
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self.rotary(probe, positions.to(self.device)[None])
        return cos[0], sin[0]

    def project_qkv(
        self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (heads, tokens, dim) rotated; k_raw pre-RoPE, k rotated, v: (kv_heads, tokens, dim)."""
        attn = self.layers[layer].self_attn
        normed = self.layers[layer].input_layernorm(hidden)
        num_tokens = hidden.shape[0]
        q = attn.q_proj(normed).view(num_tokens, self.num_heads, self.head_dim).transpose(0, 1)
        k_raw = attn.k_proj(normed).view(num_tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(normed).view(num_tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)
        return apply_rope(q, cos, sin), k_raw, apply_rope(k_raw, cos, sin), v

    def attend(
        self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of q (heads, tokens, dim) over keys/values (kv_heads, slots, dim): (tokens, heads * dim).

        mask is boolean (tokens, slots), True where a query may attend; None means every slot.
        A decoding token (one query, every slot) takes the grouped path: each KV head is read
        once for its group of query heads, where SDPA's enable_gqa expands K/V first; decoding
        is bound by reading the KV, so this is a third less time per token at long contexts.
        """
        scale = self.layers[layer].self_attn.scaling
        if q.shape[1] == 1 and mask is None:
            grouped = q.reshape(self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
            scores = (grouped @ keys.transpose(1, 2)).float() * scale  # (kv_heads, group, slots)
            return (scores.softmax(-1).to(values.dtype) @ values).reshape(1, self.num_heads * self.head_dim)
        out = F.scaled_dot_product_attention(
            q[None],
            keys[None],
            values[None],
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )[0]  # (heads, tokens, dim)
        return out.transpose(0, 1).reshape(q.shape[1], self.num_heads * self.head_dim)

    def attend_parts(self, layer: int, q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One decoding query (heads, 1, dim) over KV held in several parts (a shared prefix, then its own
        slots), with one softmax across them and no copy of the KV: (1, heads * dim)."""
        scale = self.layers[layer].self_attn.scaling
        grouped = q.reshape(self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        scores = torch.cat([(grouped @ keys.transpose(1, 2)).float() for keys, _ in parts], dim=-1) * scale
        probs = scores.softmax(-1).to(q.dtype)  # (kv_heads, group, slots of every part)
        out: torch.Tensor | None = None
        start = 0
        for _, values in parts:
            piece = probs[..., start : start + values.shape[1]] @ values
            out = piece if out is None else out + piece
            start += values.shape[1]
        assert out is not None  # parts is never empty: there is at least the sequence's own slots
        return out.reshape(1, self.num_heads * self.head_dim)

    def output_and_mlp(self, layer: int, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the layer for rows of any number of sequences: output projection, residual, MLP."""
        block = self.layers[layer]
        hidden = hidden + block.self_attn.o_proj(attended)
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float32) for the given hidden rows."""
        return self.lm_head(self.norm(hidden)).float()


def layer_windows(config) -> list[int | None]:
    """The sliding-window size of each layer (None: full attention)."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2":
        kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        return [window if kind == "sliding_attention" else None for kind in kinds]
    if config.model_type == "mistral":
        return [window] * config.num_hidden_layers
    return [None] * config.num_hidden_layers
