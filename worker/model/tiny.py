"""Seeded random Llama-2-chat checkpoints in Hugging Face's layout, with a real trained BPE tokenizer."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig

from worker.model.dims import ModelDims

# The template Meta ships in Llama-2-*-chat-hf's tokenizer_config.json (the "\\n" are Jinja string escapes).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)
NUM_RESERVED = len(SPECIAL_TOKENS) + 256  # ids 3..258 are the byte tokens <0x00>..<0xFF>, as in Llama-2
CORPUS_PATH = Path(__file__).with_name("tiny_corpus.txt")
SPACE = "\u2581"  # "▁", SentencePiece's visible space

LOGIT_STD = 4.0  # typical logit spread: greedy argmaxes are robust, sampling at temperature ~1 still varies
RESIDUAL_GAIN = 3.0  # layer outputs outweigh the (small) embedding in the residual: less self-repetition
QK_GAIN = 1.5  # q and k entries have std ~1.5, so attention scores have std ~2 (peaked but not one-hot)
ROW_SCALE_NEVER = 0.1  # lm_head rows of <unk> and <s>: never the argmax, as in a trained chat model
ROW_SCALE_BYTES = 0.85  # rows of byte tokens: argmax now and then (multi-byte text), not a third of the time
ROW_SCALE_UNUSED = 0.25  # rows of padding <unused_N> ids: the model speaks the tokenizer's real vocabulary


def make_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    intermediate_size: int = 176,
    vocab_size: int | None = None,
    max_position_embeddings: int = 4096,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    tie_word_embeddings: bool = False,
    num_shards: int = 2,
    tokenizer_vocab_size: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random Llama-2-chat checkpoint to out_dir (created) and return it as a Path.

    The layout is that of meta-llama/Llama-2-7b-chat-hf: config.json, generation_config.json, sharded
    safetensors with model.safetensors.index.json (a single model.safetensors when num_shards is 1), and
    tokenizer.json, tokenizer_config.json, special_tokens_map.json. The tokenizer is a byte-fallback BPE
    trained on tiny_corpus.txt to at most tokenizer_vocab_size ids; when the model's vocab_size is larger,
    the tokenizer is padded with <unused_N> tokens so both sizes match. The same arguments always give
    byte-identical files."""
    if num_heads % num_kv_heads or hidden_size % num_heads:
        raise ValueError("num_heads must divide hidden_size and be a multiple of num_kv_heads")
    if num_shards < 1:
        raise ValueError("num_shards must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = vocab_size or tokenizer_vocab_size
    tokenizer, num_real = build_tokenizer(tokenizer_vocab_size, vocab_size)
    config = LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, hidden_act="silu", max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5, rope_theta=rope_theta, rope_scaling=dict(rope_scaling) if rope_scaling else None,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2, dtype=_dtype_name(dtype),
    )
    weights = random_weights(config, seed, num_real)
    _write_safetensors(out, {name: w.to(dtype).contiguous() for name, w in weights.items()}, num_shards)
    _write_config(out, config, rope_theta, rope_scaling, dtype)
    _write_json(out / "generation_config.json", {  # Llama-2-chat's sampling defaults
        "bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": max_position_embeddings,
        "pad_token_id": 0, "temperature": 0.6, "top_p": 0.9,
        "transformers_version": config.transformers_version,
    })
    _write_tokenizer_files(out, tokenizer, max_position_embeddings)
    return out


def build_tokenizer(target_size: int = 1024, vocab_size: int | None = None) -> tuple[Tokenizer, int]:
    """A Llama-2-style tokenizer trained on the shipped corpus, and its number of real (non-padding) ids.

    Ids: <unk> 0, <s> 1, </s> 2, byte tokens 3..258, merged pieces in merge order, then the corpus's
    characters by frequency (SentencePiece's BPE layout), then <unused_N> up to vocab_size."""
    if target_size <= NUM_RESERVED:
        raise ValueError(f"tokenizer_vocab_size must exceed {NUM_RESERVED} (specials and byte tokens)")
    lines = [line for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=target_size - NUM_RESERVED, show_progress=False)
    trained.train_from_iterator(lines, trainer)  # same merges on every run and process
    bpe = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    counts = Counter(ch for line in lines for ch in SPACE + line.replace(" ", SPACE))
    chars = sorted((t for t in bpe["vocab"] if len(t) == 1), key=lambda ch: (-counts[ch], ch))
    pieces = [a + b for a, b in merges]
    tokens = [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), *pieces, *chars]
    num_real = len(tokens)
    vocab_size = vocab_size or target_size
    if vocab_size < num_real:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {num_real} tokens")
    tokens += [f"<unused_{i}>" for i in range(vocab_size - num_real)]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == vocab_size, "duplicate token in the tiny vocabulary"

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    # what transformers 5's LlamaTokenizer builds (legacy=False): "▁" before the first piece of text only
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    return tok, num_real


def random_weights(config: LlamaConfig, seed: int, num_real_tokens: int) -> dict[str, torch.Tensor]:
    """Float32 weights named as in HF's LlamaForCausalLM, drawn in a fixed order from torch.Generator(seed).

    Projections have std gain/sqrt(fan_in), so activations stay O(1) over layers and positions; token rows
    have std LOGIT_STD/sqrt(hidden), so logits have std ~LOGIT_STD. Norm weights are drawn from [0.8, 1.2]
    so that a norm weight the engine forgets to load shows up as a mismatch."""
    g = torch.Generator().manual_seed(seed)
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    dims = ModelDims.from_config(config)
    nq, nkv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm_weight() -> torch.Tensor:
        return 0.8 + 0.4 * torch.rand(h, generator=g)

    token_std = LOGIT_STD / math.sqrt(h)
    weights = {"model.embed_tokens.weight": normal(v, h, std=token_std)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = normal(nq, h, std=QK_GAIN / math.sqrt(h))
        weights[p + "self_attn.k_proj.weight"] = normal(nkv, h, std=QK_GAIN / math.sqrt(h))
        weights[p + "self_attn.v_proj.weight"] = normal(nkv, h, std=1 / math.sqrt(h))
        weights[p + "self_attn.o_proj.weight"] = normal(h, nq, std=RESIDUAL_GAIN / math.sqrt(nq))
        weights[p + "mlp.gate_proj.weight"] = normal(inter, h, std=1 / math.sqrt(h))
        weights[p + "mlp.up_proj.weight"] = normal(inter, h, std=1 / math.sqrt(h))
        weights[p + "mlp.down_proj.weight"] = normal(h, inter, std=RESIDUAL_GAIN / math.sqrt(inter))
        weights[p + "input_layernorm.weight"] = norm_weight()
        weights[p + "post_attention_layernorm.weight"] = norm_weight()
    weights["model.norm.weight"] = norm_weight()
    head = weights["model.embed_tokens.weight"] if config.tie_word_embeddings else normal(v, h, std=token_std)
    head[:2] *= ROW_SCALE_NEVER  # tied: these embeddings shrink too, harmlessly (RMSNorm comes first)
    head[len(SPECIAL_TOKENS):NUM_RESERVED] *= ROW_SCALE_BYTES
    head[num_real_tokens:] *= ROW_SCALE_UNUSED
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = head
    return weights


def _write_safetensors(out: Path, weights: dict[str, torch.Tensor], num_shards: int) -> None:
    for stale in out.glob("model*.safetensors*"):  # transformers would pick a leftover model.safetensors
        stale.unlink()
    if num_shards == 1:
        _save(weights, out / "model.safetensors")
        return
    sizes = {name: w.numel() * w.element_size() for name, w in weights.items()}
    total = sum(sizes.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    before = 0
    for name, w in weights.items():  # contiguous runs of tensors, balanced by bytes
        shards[min(num_shards - 1, int((before + sizes[name] / 2) * num_shards / total))][name] = w
        before += sizes[name]
    if not all(shards):
        raise ValueError(f"num_shards={num_shards} leaves a shard empty for this model")
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        filename = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
        _save(shard, out / filename)
        weight_map.update(dict.fromkeys(shard, filename))
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates files owner-only; checkpoints are shared read-only data


def _write_config(out: Path, config: LlamaConfig, rope_theta: float, rope_scaling: dict | None,
                  dtype: torch.dtype) -> None:
    raw = json.loads(config.to_json_string())  # what save_pretrained writes
    if raw.get("pad_token_id") is None:
        raw.pop("pad_token_id", None)  # Llama-2's config.json has no pad token
    # transformers 4's spellings too (as Meta's checkpoints have them), so readers of either version and
    # hand-written loaders find the rope settings and dtype
    raw.update(rope_theta=rope_theta, rope_scaling=dict(rope_scaling) if rope_scaling else None,
               torch_dtype=_dtype_name(dtype))
    _write_json(out / "config.json", raw)


def _write_tokenizer_files(out: Path, tokenizer: Tokenizer, model_max_length: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))

    def special(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): special(t) for i, t in enumerate(SPECIAL_TOKENS)},
        "bos_token": BOS,
        "chat_template": LLAMA2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": False,
        "model_max_length": model_max_length,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": UNK,
        "use_default_system_prompt": False,
    })
    _write_json(out / "special_tokens_map.json", {
        name: {k: v for k, v in special(t).items() if k != "special"}
        for name, t in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", UNK))
    })


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
