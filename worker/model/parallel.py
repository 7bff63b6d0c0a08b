"""Tensor-parallel layers: each parameter knows its shard and loads only this rank's slice of a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.model.dims import ModelDims, divide


@dataclass(frozen=True, slots=True)
class TPInfo:
    """This process's place in its tensor-parallel group; size 1 never touches torch.distributed."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when size > 1 (None: the default group)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside a group of size {self.size}")


def _shape(loaded) -> tuple[int, ...]:
    # a torch.Tensor or a safetensors slice (PySafeSlice), which is read only where it is indexed
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def _read(loaded, dim: int | None = None, start: int = 0, size: int = 0) -> torch.Tensor:
    """The whole of `loaded` (dim None) or its [start, start + size) range along dim 0 or 1, as a tensor."""
    if dim is None:
        return loaded[:]
    if dim == 0:
        return loaded[start : start + size]
    return loaded[:, start : start + size]


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{name}: checkpoint slice has shape {tuple(src.shape)}, not {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded, shard_id=None) -> None:
    """A replicated parameter (norm weights): every rank reads the whole tensor."""
    _copy(param.data, _read(loaded), "parameter")


def _all_reduce(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(x, group=tp.group)
    return x


def _set_shard_ids(layer: nn.Module, shard_ids: tuple) -> None:
    # a fused parameter is fully loaded once every one of its shards has arrived
    for param in layer.parameters(recurse=False):
        param.shard_ids = shard_ids


class LinearBase(nn.Module):
    """y = x W^T (+ b) with W of shape [out_local, in_local], sharded along tp_dim over the ranks."""

    def __init__(self, in_local: int, out_local: int, bias: bool, tp: TPInfo | None, tp_dim: int | None):
        super().__init__()
        self.tp = tp or TPInfo()
        self.tp_dim = tp_dim
        self.weight = nn.Parameter(torch.empty(out_local, in_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        dim = self.tp_dim if param.dim() > self.tp_dim else None
        size = param.shape[dim] if dim is not None else 0
        _copy(param.data, _read(loaded, dim, self.tp.rank * size, size), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; the output stays sharded (no communication)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPInfo | None = None):
        tp = tp or TPInfo()
        super().__init__(input_size, divide(output_size, tp.size, "output features"), bias, tp, tp_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp: TPInfo | None = None):
        tp = tp or TPInfo()
        self.output_sizes = [divide(n, tp.size, "output features") for n in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, tp)
        _set_shard_ids(self, tuple(range(len(output_sizes))))

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int | None = None) -> None:
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        shard = _read(loaded, 0, self.tp.rank * size, size)
        _copy(param.data.narrow(0, offset, size), shard, f"{type(self).__name__}[{shard_id}]")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; each rank holds its dims.num_local_heads query and num_local_kv_heads kv heads."""

    def __init__(self, dims: ModelDims, bias: bool = False, tp: TPInfo | None = None):
        tp = tp or TPInfo()
        assert dims.tp_size == tp.size, f"dims for {dims.tp_size} ranks, group of {tp.size}"
        self.head_dim = dims.head_dim
        self.num_heads = dims.num_local_heads
        self.num_kv_heads = dims.num_local_kv_heads
        out = (dims.num_heads + 2 * dims.num_kv_heads) * dims.head_dim
        super().__init__(dims.hidden_size, out, bias, tp)
        _set_shard_ids(self, ("q", "k", "v"))

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str | None = None) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        shard = _read(loaded, 0, self.tp.rank * size, size)
        _copy(param.data.narrow(0, offset, size), shard, f"{type(self).__name__}[{shard_id}]")


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial outputs are summed with all_reduce (bias added once)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPInfo | None = None):
        tp = tp or TPInfo()
        super().__init__(divide(input_size, tp.size, "input features"), output_size, bias, tp, tp_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        return _all_reduce(y, self.tp) if self.tp.size > 1 else y


def _chunked_linear(x: torch.Tensor, weight: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """x @ weight.T over row blocks of a tall weight (the LM head): on CPU each block's output stays in
    cache, which measured 1.5x faster for 16-64 rows of x against a 32000-row head (slower below 8 rows)."""
    # x: [N, K], weight: [V, K] -> [N, V]
    if weight.shape[0] <= rows or x.shape[0] < 8 or x.device.type != "cpu":
        return F.linear(x, weight)
    return torch.cat([F.linear(x, w) for w in weight.split(rows)], dim=-1)


class VocabParallelEmbedding(nn.Module):
    """Rows split over ranks: each rank looks up the ids it owns, zeros the others, then all_reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPInfo | None = None):
        super().__init__()
        self.tp = tp or TPInfo()
        self.num_embeddings = num_embeddings
        self.rows = divide(num_embeddings, self.tp.size, "vocabulary size")
        self.start = self.rows * self.tp.rank
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        _copy(param.data, _read(loaded, 0, self.start, self.rows), type(self).__name__)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, embedding_dim]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.start) & (input_ids < self.start + self.rows)
        y = F.embedding((input_ids - self.start) * mine, self.weight)
        return _all_reduce(y * mine.unsqueeze(1), self.tp)

    def attend(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits against the (sharded) embedding matrix, gathered to full vocabulary on rank 0 only (the
        sampler's rank); the other ranks send their slice and get None."""
        # hidden: [N, embedding_dim] -> [N, num_embeddings] on rank 0
        logits = _chunked_linear(hidden, self.weight)
        if self.tp.size == 1:
            return logits
        import torch.distributed as dist

        dst = 0 if self.tp.group is None else dist.get_global_rank(self.tp.group, 0)
        if self.tp.rank != 0:
            dist.gather(logits.contiguous(), None, dst=dst, group=self.tp.group)
            return None
        parts = [torch.empty_like(logits) for _ in range(self.tp.size)]
        dist.gather(logits.contiguous(), parts, dst=dst, group=self.tp.group)
        return torch.cat(parts, dim=-1)


class ParallelLMHead(VocabParallelEmbedding):
    """An untied output projection sharded over the vocabulary; forward returns full logits on rank 0."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.attend(hidden)
