"""A Llama's attention dimensions, whole and as one tensor-parallel rank holds them (no torch)."""

from __future__ import annotations

from dataclasses import dataclass


def divide(total: int, tp_size: int, what: str) -> int:
    if total % tp_size:
        raise ValueError(f"{what} ({total}) does not divide evenly over tensor-parallel size {tp_size}")
    return total // tp_size


@dataclass(frozen=True, slots=True)
class ModelDims:
    """Layers, head size and head counts of a checkpoint; `num_local_*` are one rank's share of the heads."""

    num_layers: int
    hidden_size: int
    head_dim: int
    num_heads: int  # query heads of the whole model
    num_kv_heads: int  # key/value heads of the whole model (== num_heads without grouped-query attention)
    tp_size: int = 1

    def __post_init__(self) -> None:
        divide(self.num_heads, self.tp_size, "attention heads")
        divide(self.num_kv_heads, self.tp_size, "key/value heads")

    @classmethod
    def from_config(cls, hf_config, tp_size: int = 1) -> ModelDims:
        """From a transformers LlamaConfig (or anything with its field names); ValueError when tp_size does not
        divide the heads."""
        num_heads = hf_config.num_attention_heads
        return cls(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            tp_size=tp_size,
        )

    @property
    def num_local_heads(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def num_local_kv_heads(self) -> int:
        return self.num_kv_heads // self.tp_size

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        """One layer's K (or V) cache on this rank: [num_blocks, block_size, num_local_kv_heads, head_dim]."""
        return num_blocks, block_size, self.num_local_kv_heads, self.head_dim

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of K and V cache one token takes on this rank, over all layers (itemsize: dtype.itemsize)."""
        return 2 * self.num_layers * self.num_local_kv_heads * self.head_dim * itemsize
