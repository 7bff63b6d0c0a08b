"""Llama (Llama-2 family) on a paged KV cache, tensor-parallel aware, numerically matching transformers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from worker.model.attention import AttentionPlan, paged_attention, plan_attention
from worker.model.context import AttentionContext
from worker.model.dims import ModelDims
from worker.model.flex_decode import FlexDecode
from worker.model.parallel import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TPInfo,
    VocabParallelEmbedding,
    default_weight_loader,
)

KVCache = tuple[torch.Tensor, torch.Tensor]

# rope types whose frequencies depend on the batch's longest sequence (transformers recomputes them per call)
_UNSUPPORTED_ROPE = {"dynamic": "dynamic NTK scaling", "longrope": "longrope"}


class RMSNorm(nn.Module):
    """RMSNorm in transformers' operation order; given a residual, first adds x to it in place."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # x, residual: [T, H] -> normed [T, H] (and the updated residual stream [T, H])
        if residual is not None:
            x = residual.add_(x)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = self.weight * h.to(x.dtype)
        return normed if residual is None else (normed, x)


class RotaryEmbedding(nn.Module):
    """cos/sin of positions from transformers' own rope init functions (rope_theta, linear, llama3, yarn)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type in _UNSUPPORTED_ROPE:
            raise ValueError(f"rope_type {rope_type!r} ({_UNSUPPORTED_ROPE[rope_type]}) is not supported: "
                             "its frequencies depend on the batch's longest sequence, which paged batching "
                             "cannot reproduce")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unknown rope_type {rope_type!r}")
        init = LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default" else \
            ROPE_INIT_FUNCTIONS[rope_type]
        with torch.device("cpu"):  # even while the model is built on the meta device: computed, never loaded
            inv_freq, scaling = init(config)
        if 2 * inv_freq.numel() != ModelDims.from_config(config).head_dim:
            raise ValueError("partial rotary embeddings are not supported by Llama")
        self.inv_freq = inv_freq.float()  # [D/2]; a plain attribute, moved to the positions' device when used
        self.scaling = scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, D/2] (transformers repeats the same half twice)
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)
        cos = (freqs.cos() * self.scaling).to(dtype)
        sin = (freqs.sin() * self.scaling).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D], cos/sin: [T, 1, D/2] -> [T, H, D]; equals x * cos + rotate_half(x) * sin bit for bit
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, tp: TPInfo):
        super().__init__()
        dims = ModelDims.from_config(config, tp.size)
        self.head_dim, self.num_heads, self.num_kv_heads = dims.head_dim, dims.num_local_heads, dims.num_local_kv_heads
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(dims, bias=bias, tp=tp)
        self.o_proj = RowParallelLinear(dims.num_heads * dims.head_dim, config.hidden_size, bias=bias, tp=tp)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext,
                plan: AttentionPlan, kv_cache: KVCache) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, -1, self.head_dim)  # [T, Hq + 2 Hkv, D]
        qk = apply_rope(qkv[:, : self.num_heads + self.num_kv_heads], cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads :]
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], ctx, self.scale, plan)
        return self.o_proj(o.view(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig, tp: TPInfo):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (Llama uses silu)")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       bias=bias, tp=tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, tp: TPInfo):
        super().__init__()
        self.self_attn = LlamaAttention(config, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext, plan: AttentionPlan, kv_cache: KVCache):
        # x: [T, hidden] (the previous layer's MLP output), residual: [T, hidden] stream before it
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, ctx, plan, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, tp: TPInfo):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.flex_decode: FlexDecode | None = None  # set by the runner for `--decode-attention flex`

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                kv_caches: list[KVCache]) -> torch.Tensor:
        # input_ids, positions: [T] -> [T, hidden]
        plan = plan_attention(ctx, self.flex_decode)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, ctx, plan, kv_cache)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Llama for the paged engine: forward() returns final hidden states, compute_logits() the chosen rows."""

    # HF checkpoint name -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: LlamaConfig, tp: TPInfo | None = None):
        super().__init__()
        self.config = config
        self.tp = tp or TPInfo()
        self.model = LlamaModel(config, self.tp)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else ParallelLMHead(config.vocab_size, config.hidden_size, self.tp)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                kv_caches: list[KVCache]) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden after the final norm: [T, hidden]
        return self.model(input_ids, positions, ctx, kv_caches)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden: [N, hidden] -> [N, vocab] on tensor-parallel rank 0, None on the others
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> None:
        """Load (HF name, tensor or safetensors slice) pairs; raise naming any weight that never arrived."""
        params = dict(self.named_parameters())
        pending = {name: set(getattr(p, "shard_ids", (None,))) for name, p in params.items()}
        unexpected = []
        for hf_name, loaded in weights:
            if hf_name.endswith("rotary_emb.inv_freq") or (self.tied and hf_name == "lm_head.weight"):
                continue
            name, shard_id = self._param_name(hf_name)
            param = params.get(name)
            if param is None:
                unexpected.append(hf_name)
                continue
            getattr(param, "weight_loader", default_weight_loader)(param, loaded, shard_id)
            pending[name].discard(shard_id)
        if unexpected:
            raise ValueError(f"checkpoint has weights this Llama does not: {sorted(unexpected)[:8]}")
        missing = [self._hf_name(name, sid) for name, ids in pending.items() for sid in ids]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights: {sorted(missing)[:16]}")

    def _param_name(self, hf_name: str) -> tuple[str, str | int | None]:
        for hf_part, (part, shard_id) in self.packed_modules_mapping.items():
            if f".{hf_part}." in hf_name:
                return hf_name.replace(f".{hf_part}.", f".{part}."), shard_id
        return hf_name, None

    def _hf_name(self, name: str, shard_id: str | int | None) -> str:
        for hf_part, (part, sid) in self.packed_modules_mapping.items():
            if sid == shard_id and f".{part}." in name:
                return name.replace(f".{part}.", f".{hf_part}.")
        return name
