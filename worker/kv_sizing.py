"""How big the KV pool is: from --kv-cache-tokens, or from a fraction of the memory the device has free."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from worker.config import WorkerConfig
from worker.model.dims import ModelDims


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """What warm-up decided: the KV pool size (values found at run time, kept out of the config)."""

    num_blocks: int
    block_size: int
    bytes_per_token: int
    max_context: int  # min(model's context, pool capacity)

    def with_num_blocks(self, num_blocks: int) -> CacheLayout:
        """The same layout shrunk to num_blocks (what every tensor-parallel rank can hold)."""
        return replace(self, num_blocks=num_blocks, max_context=min(self.max_context, num_blocks * self.block_size))


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_kv_cache(config: WorkerConfig, hf_config, dtype: torch.dtype, device: torch.device) -> CacheLayout:
    """This rank's KV pool: config.kv_cache_tokens if set, else kv_memory_fraction of what the device has free
    (on the CPU shared by every rank), never more than max_num_seqs full-context sequences need."""
    bytes_per_token = ModelDims.from_config(hf_config, config.tp_size).kv_bytes_per_token(dtype.itemsize)
    model_context = int(hf_config.max_position_embeddings)
    useful_tokens = config.max_num_seqs * model_context
    if config.kv_cache_tokens is not None:
        tokens = config.kv_cache_tokens
    else:
        budget = int(available_memory_bytes(device) * config.kv_memory_fraction)
        if device.type == "cpu":
            budget //= config.tp_size  # the ranks share the host's memory
        tokens = min(budget // bytes_per_token, useful_tokens)
    num_blocks = tokens // config.block_size
    if num_blocks < 1:
        raise ValueError("the KV cache budget does not hold a single block; raise --kv-cache-tokens")
    return CacheLayout(num_blocks, config.block_size, bytes_per_token,
                       min(model_context, num_blocks * config.block_size))
