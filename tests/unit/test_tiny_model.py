"""The generated tiny checkpoint loads in transformers exactly as a published Llama-2-chat checkpoint does."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from worker.model.tiny import LLAMA2_CHAT_TEMPLATE, NUM_RESERVED, make_tiny_model

TEXTS = [
    "The morning train left the valley station.",
    "Straße, café, naïve — déjà vu!",
    "Η θάλασσα είναι ήσυχη. 今天天气很好。 bread 🍞 ✅",
    "Unseen: 龍 𝄞 🦜 ŋ ǂ, tabs\tand\nnew lines, double  spaces.",
    "def f(x):\n    return x[::-1]  # code",
]
ABSENT = "龍𝄞🦜ŋǂ"  # characters missing from tiny_corpus.txt: only byte fallback can encode them


def load_weights(model_dir) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights.update(load_file(str(model_dir / shard)))
    assert set(weights) == set(index["weight_map"])
    return weights


def hf_names(num_layers: int, tied: bool = False) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    for i in range(num_layers):
        names |= {f"model.layers.{i}.{n}.weight" for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    return names


def test_layout_is_llama2_chat_hf(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert files == {
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json"}
    weights = load_weights(tiny_model_dir)
    assert set(weights) == hf_names(2)
    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(w.numel() * w.element_size() for w in weights.values())
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_act"], config["bos_token_id"], config["eos_token_id"]) == ("silu", 1, 2)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    assert "pad_token_id" not in config and config["rope_scaling"] is None
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature",
                                "top_p", "max_length")} == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.6,
        "top_p": 0.9, "max_length": 4096}


def test_transformers_loads_the_files_weights(tiny_model_dir):
    model = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True, dtype=torch.float32)
    state = model.state_dict()
    for name, w in load_weights(tiny_model_dir).items():
        assert torch.equal(state[name], w), name
    cfg = model.config
    shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
             cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings)
    assert shape == (64, 2, 4, 4, 176, 1024, 4096)
    assert not cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5


@torch.inference_mode()
def test_logits_make_greedy_decoding_robust(tiny_model_dir):
    """Spread-out logits with clear top-1 margins, never <unk>/<s>; greedy does not stop at once."""
    model = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True).eval()
    rng = random.Random(0)
    ids = torch.tensor([[1] + [rng.randrange(3, 1024) for _ in range(127)] for _ in range(4)])
    logits = model(ids).logits.reshape(-1, 1024)
    top2 = logits.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    assert torch.isfinite(logits).all()
    assert 2.0 < logits.std(dim=-1).mean() < 8.0
    assert gap.median() > 0.3 and (gap < 1e-3).sum() <= 1
    assert not (logits.argmax(-1) < 2).any()
    out = model.generate(input_ids=ids[:, :9], attention_mask=torch.ones_like(ids[:, :9]), max_new_tokens=8,
                         do_sample=False, pad_token_id=0)
    assert not (out[:, 9:] == 2).any()


def test_same_seed_gives_identical_files(tmp_path):
    a = make_tiny_model(tmp_path / "a", seed=3)
    b = make_tiny_model(tmp_path / "b", seed=3)
    c = make_tiny_model(tmp_path / "c", seed=4)
    for path in sorted(a.iterdir()):
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    shard = "model-00001-of-00002.safetensors"
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


def test_grouped_query_variant(tiny_gqa_model_dir):
    config = AutoConfig.from_pretrained(str(tiny_gqa_model_dir), local_files_only=True)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    weights = load_weights(tiny_gqa_model_dir)
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert weights["model.layers.1.self_attn.v_proj.weight"].shape == (32, 64)
    LlamaForCausalLM.from_pretrained(str(tiny_gqa_model_dir), local_files_only=True)


def test_rope_scaling_survives_and_is_honoured(tiny_rope_model_dir):
    config = AutoConfig.from_pretrained(str(tiny_rope_model_dir), local_files_only=True)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    raw = json.loads((tiny_rope_model_dir / "config.json").read_text())
    assert raw["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    model = LlamaForCausalLM.from_pretrained(str(tiny_rope_model_dir), local_files_only=True)
    rotary = model.model.rotary_emb
    default = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    torch.testing.assert_close(rotary.inv_freq, default / 2.0)


def test_tied_single_file_bf16_variant(tmp_path):
    path = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True, num_shards=1, dtype=torch.bfloat16)
    assert not (path / "model.safetensors.index.json").exists()
    weights = load_file(str(path / "model.safetensors"))
    assert set(weights) == hf_names(2, tied=True)
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    model = LlamaForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.bfloat16)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, weights["model.embed_tokens.weight"])


def test_tokenizer_is_llama2_shaped(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert type(tok).__name__ == "LlamaTokenizer"
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, None)
    tokens = tok.convert_ids_to_tokens([0, 1, 2, 3, 3 + 0x41, 258])
    assert tokens == ["<unk>", "<s>", "</s>", "<0x00>", "<0x41>", "<0xFF>"]
    assert len(tok) == tok.vocab_size == 1024
    assert tok.model_max_length == 4096
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == 1 and ids[-1] != 2 and tok.convert_ids_to_tokens(ids[1]).startswith("\u2581")


def test_tokenizer_round_trips_with_byte_fallback(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert not set(ABSENT) & set(tok.get_vocab())
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text).ids  # tokenizer.json is exactly what transformers rebuilds
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert raw.decode(ids) == text
    tokens = tok.convert_ids_to_tokens(tok("\u9f8d")["input_ids"])
    assert tokens == ["<s>", "\u2581", "<0xE9>", "<0xBE>", "<0x8D>"]


def test_chat_template_renders_llama2_prompt(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert tok.chat_template == LLAMA2_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there "},
                {"role": "assistant", "content": " Hello!\n"}, {"role": "user", "content": "  Bye"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] Bye [/INST]")
    with pytest.raises(Exception, match="must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2, tokenize=False)


def test_model_vocab_larger_than_tokenizer_is_padded(tmp_path, tiny_model_dir):
    path = make_tiny_model(tmp_path / "wide", vocab_size=1500, num_layers=1)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    assert len(tok) == config.vocab_size == load_weights(path)["lm_head.weight"].shape[0] == 1500
    first_unused = tok.convert_tokens_to_ids("<unused_0>")
    assert NUM_RESERVED < first_unused <= 1024
    assert tok.convert_ids_to_tokens(1499) == f"<unused_{1499 - first_unused}>"
    unpadded = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert all(tok(t)["input_ids"] == unpadded(t)["input_ids"] for t in TEXTS)
