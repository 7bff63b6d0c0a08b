"""Build a Llama on the meta device, then stream this rank's slices of a safetensors checkpoint into it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, LlamaConfig

from worker.model.llama import LlamaForCausalLM
from worker.model.parallel import LinearBase, ParallelLMHead, TPInfo

_INDEX = "model.safetensors.index.json"


def load_hf_config(model_dir: str | Path) -> LlamaConfig:
    """The checkpoint's config.json, read locally (never from the hub)."""
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    if config.model_type != "llama":
        raise ValueError(f"{model_dir}: model_type {config.model_type!r} is not a Llama checkpoint")
    return config


def load_model(model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", tp: TPInfo | None = None) -> LlamaForCausalLM:
    config = load_hf_config(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, tp)
    _materialize(model, torch.device(device), dtype)
    model.load_weights(_iter_weights(Path(model_dir)))
    return model.eval()


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / _INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors checkpoint found")
    return files


def _iter_weights(model_dir: Path) -> Iterator[tuple[str, object]]:
    # slices, not tensors: each weight_loader reads only this rank's rows or columns from disk
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_slice(name)


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace meta parameters by uninitialised ones, keeping their weight_loader and shard_ids attributes.

    On CPU, projection weights [out, in] are stored column-major (W^T contiguous): x @ W^T then streams the
    weights row by row, which makes the matrix-vector products of decoding up to 2x faster.
    """
    for module in model.modules():
        projection = device.type == "cpu" and isinstance(module, (LinearBase, ParallelLMHead))
        for name, param in list(module.named_parameters(recurse=False)):
            if projection and name == "weight":
                data = torch.empty(param.shape[::-1], dtype=dtype, device=device).t()
            else:
                data = torch.empty(param.shape, dtype=dtype, device=device)
            real = nn.Parameter(data, requires_grad=False)
            real.__dict__.update(param.__dict__)
            setattr(module, name, real)
