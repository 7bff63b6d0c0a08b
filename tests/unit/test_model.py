"""Our paged Llama against transformers in fp32: prefill, paged decode, mixed batches, loader, TP slices."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from worker.model.attention import plan_attention
from worker.model.context import AttentionContext
from worker.model.dims import ModelDims
from worker.model.llama import LlamaForCausalLM
from worker.model.loader import load_hf_config, load_model
from worker.model.parallel import TPInfo
from worker.model.tiny import make_tiny_model

VOCAB = 1024
CONFIGS = {  # make_tiny_model arguments: hidden 64, 2 layers, 4 query heads, logits of std ~4
    "mha": {},
    "gqa": dict(num_kv_heads=2),
    "rope_linear": dict(num_kv_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope_llama3": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 32}),
    "tied": dict(num_kv_heads=2, tie_word_embeddings=True),
}
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=176, vocab_size=1000, max_position_embeddings=256)


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(transformers' model, ours) loaded from the same tiny checkpoint."""
    path = make_tiny_model(tmp_path_factory.mktemp(request.param) / "ckpt", seed=len(request.param),
                           **CONFIGS[request.param])
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf, load_model(path)


def make_checkpoint(path: Path, seed: int = 0, **overrides) -> tuple[Path, transformers.LlamaForCausalLM]:
    """A random HF Llama saved by transformers itself, in many small safetensors shards."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **overrides})).eval()
    hf.save_pretrained(path, max_shard_size="100KB")
    return path, hf


def make_caches(model: LlamaForCausalLM, num_blocks: int, block_size: int) -> list:
    dims = ModelDims.from_config(model.config)
    shape = dims.kv_cache_shape(num_blocks, block_size)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(dims.num_layers)]


def run_step(model, caches, chunks: list[tuple[list[int], int, list[int]]], block_size: int) -> torch.Tensor:
    """chunks: (new token ids, position of the first, block table) per sequence -> logits of every token."""
    ids, positions, slots, query_lens, context_lens = [], [], [], [], []
    for tokens, start, table in chunks:
        end = start + len(tokens)
        ids += tokens
        positions += range(start, end)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        query_lens.append(len(tokens))
        context_lens.append(end)
    width = max(len(t) for _, _, t in chunks)
    tables = torch.tensor([t + [0] * (width - len(t)) for _, _, t in chunks])
    cu = torch.tensor([0] + query_lens).cumsum(0)
    ctx = AttentionContext(query_lens, context_lens, cu, torch.tensor(context_lens), torch.tensor(slots),
                           tables, block_size)
    hidden = model(torch.tensor(ids), torch.tensor(positions), ctx, caches)
    return model.compute_logits(hidden)


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([tokens])).logits[0]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert err <= rel, f"max relative error {err:.2e}"


def shuffled_blocks(n: int, seed: int = 0) -> list[int]:
    blocks = list(range(1, n + 1))
    random.Random(seed).shuffle(blocks)
    return blocks


def test_logits_are_several_units(checkpoint):
    hf, _ = checkpoint
    assert hf_logits(hf, list(range(3, 40))).std() > 2


def test_prefill_matches_transformers(checkpoint):
    hf, model = checkpoint
    tokens = random.Random(1).choices(range(VOCAB), k=37)
    caches = make_caches(model, num_blocks=8, block_size=16)
    ours = run_step(model, caches, [(tokens, 0, shuffled_blocks(3))], block_size=16)
    assert_close(ours, hf_logits(hf, tokens))


@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_decode_matches_transformers(checkpoint, block_size):
    hf, model = checkpoint
    tokens = random.Random(2).choices(range(VOCAB), k=45)
    ref = hf_logits(hf, tokens)
    table = shuffled_blocks(-(-len(tokens) // block_size), seed=block_size)
    caches = make_caches(model, num_blocks=len(table) + 1, block_size=block_size)
    logits = [run_step(model, caches, [(tokens[:5], 0, table)], block_size)]
    for pos in range(5, len(tokens)):
        logits.append(run_step(model, caches, [([tokens[pos]], pos, table)], block_size))
    ours = torch.cat(logits)
    assert_close(ours, ref)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_mixed_batch_matches_per_sequence_runs(checkpoint):
    """Decodes of very different lengths around a prefill chunk whose prefix is already cached."""
    hf, model = checkpoint
    bs = 4
    rng = random.Random(3)
    a, b, c, d = (rng.choices(range(VOCAB), k=n) for n in (62, 3, 21, 61))
    tables = [list(range(1, 17)), list(range(17, 18)), list(range(30, 24, -1)), list(range(40, 56))]
    caches = make_caches(model, num_blocks=64, block_size=bs)
    run_step(model, caches, [(a[:-1], 0, tables[0]), (b[:-1], 0, tables[1]), (c[:9], 0, tables[2]),
                             (d[:-1], 0, tables[3])], bs)
    mixed = run_step(model, caches, [(a[-1:], 61, tables[0]), (c[9:], 9, tables[2]), (b[-1:], 2, tables[1]),
                                     (d[-1:], 60, tables[3])], bs)
    assert_close(mixed[0], hf_logits(hf, a)[-1])
    assert_close(mixed[1:13], hf_logits(hf, c)[9:])
    assert_close(mixed[13], hf_logits(hf, b)[-1])
    assert_close(mixed[14], hf_logits(hf, d)[-1])


def test_decodes_are_grouped_by_length():
    ctx = AttentionContext([1, 1, 1, 1], [2, 60, 3, 61], torch.arange(5), torch.tensor([2, 60, 3, 61]),
                           torch.arange(4), torch.zeros(4, 16, dtype=torch.long), 4)
    plan = plan_attention(ctx)
    assert [g.num_blocks for g in plan.decode_groups] == [1, 16]
    assert [g.rows.tolist() for g in plan.decode_groups] == [[0, 2], [1, 3]]


def test_loader_reads_sharded_checkpoint(tmp_path):
    path, hf = make_checkpoint(tmp_path / "ckpt", seed=4)
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 3
    model = load_model(path)
    ours = model.model.layers[1].self_attn.qkv_proj.weight
    ref = hf.model.layers[1].self_attn
    assert torch.equal(ours, torch.cat([ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight]))
    assert load_hf_config(path).num_key_value_heads == 2


def test_loader_refuses_missing_weights(tmp_path):
    path, hf = make_checkpoint(tmp_path / "ckpt", seed=5)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    state = {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(broken)


def test_tensor_parallel_rank_loads_its_slice(tmp_path):
    path, hf = make_checkpoint(tmp_path / "ckpt", seed=6)
    model = load_model(path, tp=TPInfo(rank=1, size=2))
    ref = hf.model.layers[0]
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q, kv = 2 * 16, 1 * 16  # 2 of 4 query heads and 1 of 2 kv heads per rank, head_dim 16
    expected_qkv = torch.cat([ref.self_attn.q_proj.weight[q:], ref.self_attn.k_proj.weight[kv:],
                              ref.self_attn.v_proj.weight[kv:]])
    assert torch.equal(attn.qkv_proj.weight, expected_qkv)
    assert torch.equal(attn.o_proj.weight, ref.self_attn.o_proj.weight[:, q:])
    gate_up = torch.cat([ref.mlp.gate_proj.weight[88:], ref.mlp.up_proj.weight[88:]])
    assert torch.equal(mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(mlp.down_proj.weight, ref.mlp.down_proj.weight[:, 88:])
    assert torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight[500:])


def test_refuses_what_it_cannot_match():
    with pytest.raises(ValueError, match="key/value heads"):
        LlamaForCausalLM(transformers.LlamaConfig(**BASE), TPInfo(rank=0, size=4))
    dynamic = transformers.LlamaConfig(**BASE, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="dynamic"):
        LlamaForCausalLM(dynamic)


def test_kv_cache_bytes_per_token():
    config = transformers.LlamaConfig(**BASE)
    assert ModelDims.from_config(config).kv_bytes_per_token(torch.float32.itemsize) == 2 * 2 * 2 * 16 * 4
    assert ModelDims.from_config(config, tp_size=2).kv_bytes_per_token(torch.bfloat16.itemsize) == 2 * 2 * 1 * 16 * 2


def test_model_dims_per_rank():
    dims = ModelDims.from_config(transformers.LlamaConfig(**BASE), tp_size=2)
    assert (dims.head_dim, dims.num_local_heads, dims.num_local_kv_heads) == (16, 2, 1)
    assert dims.kv_cache_shape(4, 16) == (4, 16, 1, 16)
    with pytest.raises(ValueError, match="key/value heads"):
        ModelDims.from_config(transformers.LlamaConfig(**BASE), tp_size=4)


def test_config_json_is_what_we_read(tmp_path):
    path, _ = make_checkpoint(tmp_path / "ckpt", seed=7, num_hidden_layers=1)
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 1
    assert len(load_model(path).model.layers) == 1


def _tp_rank(rank: int, size: int, init_file: str, model_dir: str, tokens: list[int], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        model = load_model(model_dir, tp=TPInfo(rank, size))
        dims = ModelDims.from_config(model.config, size)
        caches = [(torch.zeros(dims.kv_cache_shape(4, 16)), torch.zeros(dims.kv_cache_shape(4, 16)))
                  for _ in range(dims.num_layers)]
        prefill = run_step(model, caches, [(tokens[:-1], 0, [2, 0, 3])], 16)
        decode = run_step(model, caches, [(tokens[-1:], len(tokens) - 1, [2, 0, 3])], 16)
        if rank == 0:
            torch.save(torch.cat([prefill, decode]), out)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_over_gloo_matches_transformers(tmp_path):
    """Two CPU ranks (gloo): sharded heads, MLP and vocabulary give transformers' logits."""
    path = make_tiny_model(tmp_path / "ckpt", seed=8, num_kv_heads=2)
    tokens = random.Random(4).choices(range(VOCAB), k=30)
    out = tmp_path / "logits.pt"
    args = (2, str(tmp_path / "rdzv"), str(path), tokens, str(out))
    torch.multiprocessing.spawn(_tp_rank, args=args, nprocs=2)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_close(torch.load(out), hf_logits(hf, tokens))
