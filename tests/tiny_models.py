"""Tiny llama-architecture GGUF files with random weights, written with the `gguf` package.

They load in real llama.cpp in milliseconds, so tests exercise the true engine (decode, KV
rollback, logits views) where the logic, not the language quality, is under test. A "draft" is
the main model's weights plus noise: it agrees often but not always, so both the accept and the
reject paths of the speculative loop run.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

# SentencePiece-style vocabulary: control tokens, all 256 byte tokens, then words
WORDS = [
    "▁the", "▁a", "▁cat", "▁dog", "▁sat", "▁on", "▁mat", "▁and", "▁ran", "▁to", "▁def", "▁return",
    "▁if", "▁else", "▁for", "▁in", "(", ")", ":", "▁x", "▁y", "▁=", "▁+", "▁1", "▁2", "▁print",
    "▁hello", "▁world", "▁sort", "▁list", ".", ",",
]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocabulary(words: list[str] = WORDS, eos_id: int = 2) -> tuple[list[str], list[float], list[int]]:
    # llama.cpp ends a reply at "</s>" by its text too: with another end token, token 2 is a mere control token
    tokens = ["<unk>", "<s>", "</s>" if eos_id == 2 else "<pad>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    T = gguf.TokenType
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL, *([T.BYTE] * 256), *([T.NORMAL] * len(words))]
    scores = [0.0, 0.0, 0.0, *([0.0] * 256), *(-float(i) for i in range(len(words)))]
    return tokens, scores, [int(t) for t in types]


def random_weights(seed: int, n_vocab: int, n_embd: int = 64, n_layer: int = 2, n_ff: int = 128) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    w = {
        "token_embd.weight": mat(n_vocab, n_embd, 1.0),
        "output_norm.weight": np.ones(n_embd, dtype=np.float32),
        # large output weights make logits peaky: clear argmax gaps, as in a trained model
        "output.weight": mat(n_vocab, n_embd, 0.6),
    }
    for i in range(n_layer):
        w[f"blk.{i}.attn_norm.weight"] = np.ones(n_embd, dtype=np.float32)
        w[f"blk.{i}.ffn_norm.weight"] = np.ones(n_embd, dtype=np.float32)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w[f"blk.{i}.{name}.weight"] = mat(n_embd, n_embd, n_embd**-0.5)
        w[f"blk.{i}.ffn_gate.weight"] = mat(n_ff, n_embd, n_embd**-0.5)
        w[f"blk.{i}.ffn_up.weight"] = mat(n_ff, n_embd, n_embd**-0.5)
        w[f"blk.{i}.ffn_down.weight"] = mat(n_embd, n_ff, n_ff**-0.5)
    return w


def perturbed(weights: dict[str, np.ndarray], seed: int, noise: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.standard_normal(v.shape).astype(np.float32) * noise * v.std()).astype(np.float32) for k, v in weights.items()}


def write_model(
    path: Path,
    weights: dict[str, np.ndarray],
    words: list[str] = WORDS,
    n_head: int = 4,
    n_ctx: int = 1024,
    name: str = "tiny",
    eos_id: int = 2,
    quant: gguf.GGMLQuantizationType | None = None,
    chat_template: str | None = CHATML,
) -> Path:
    """Write a llama-architecture GGUF; `quant` stores the matrices quantized (norms stay F32); a
    `chat_template` of None writes none."""
    n_vocab, n_embd = weights["token_embd.weight"].shape
    assert n_vocab == len(vocabulary(words)[0]), n_vocab
    n_layer = sum(1 for k in weights if k.endswith("attn_q.weight"))
    n_ff = weights["blk.0.ffn_up.weight"].shape[0]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocabulary(writer, words, eos_id, chat_template)
    _write(writer, weights, quant)
    return path


def n_vocab(words: list[str] = WORDS) -> int:
    return 3 + 256 + len(words)


def quantize(source: Path, target: Path, ftype: int) -> Path:
    """Re-quantize a GGUF with llama.cpp's own quantizer (K-quants need rows of 256: n_embd=256 and up)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    assert rc == 0, f"llama_model_quantize failed ({rc})"
    return target


def k_quant_model(root: Path, seed: int = 7, noise: float = 0.0, name: str = "tiny-q4km") -> Path:
    """A tiny Q4_K_M model (the most common GGUF quantization): wide enough for K-quant blocks, so
    llama.cpp's repacked and tiled K-quant kernels see it as they see a real model."""
    import llama_cpp

    weights = random_weights(seed=seed, n_vocab=n_vocab(), n_embd=256, n_ff=512)
    if noise:
        weights = perturbed(weights, seed=seed + 1, noise=noise)
    f32 = write_model(root / f"{name}.f32.gguf", weights, name=name)
    return quantize(f32, root / f"{name}.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)


def mamba_model(path: Path, seed: int = 9, n_embd: int = 64, n_layer: int = 2) -> Path:
    """A tiny Mamba (recurrent state, no KV cache): llama.cpp cannot drop part of its state, so a
    rejected draft cannot be rolled back. Same vocabulary as the llama-architecture models."""
    rng = np.random.default_rng(seed)
    n_vocab_ = n_vocab()
    d_inner, d_state, d_conv, dt_rank = 2 * n_embd, 16, 4, 4

    def mat(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {
        "token_embd.weight": mat(n_vocab_, n_embd, scale=1.0),
        "output_norm.weight": np.ones(n_embd, dtype=np.float32),
        "output.weight": mat(n_vocab_, n_embd, scale=0.6),
    }
    for i in range(n_layer):  # numpy shapes are llama.cpp's dimensions reversed
        weights |= {
            f"blk.{i}.attn_norm.weight": np.ones(n_embd, dtype=np.float32),
            f"blk.{i}.ssm_in.weight": mat(2 * d_inner, n_embd, scale=n_embd**-0.5),
            f"blk.{i}.ssm_conv1d.weight": mat(d_inner, d_conv, scale=0.5),
            f"blk.{i}.ssm_conv1d.bias": mat(d_inner),
            f"blk.{i}.ssm_x.weight": mat(dt_rank + 2 * d_state, d_inner, scale=d_inner**-0.5),
            f"blk.{i}.ssm_dt.weight": mat(d_inner, dt_rank, scale=0.5),
            f"blk.{i}.ssm_dt.bias": mat(d_inner),
            f"blk.{i}.ssm_a": -np.exp(mat(d_inner, d_state, scale=0.5)),
            f"blk.{i}.ssm_d": np.ones(d_inner, dtype=np.float32),
            f"blk.{i}.ssm_out.weight": mat(n_embd, d_inner, scale=d_inner**-0.5),
        }
    return _write_ssm(path, "mamba", "tiny-mamba", weights, n_embd, n_layer, d_conv, d_inner, d_state, dt_rank)


def _write_ssm(path: Path, arch: str, name: str, weights: dict[str, np.ndarray], n_embd: int, n_layer: int, d_conv: int,
               d_inner: int, d_state: int, dt_rank: int, n_group: int | None = None, eos_id: int = 2) -> Path:  # fmt: skip
    """A Mamba-family GGUF: the SSM hyperparameters (`n_group` for Mamba-2), the shared vocabulary, the tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(1024)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_ssm_conv_kernel(d_conv)
    writer.add_ssm_inner_size(d_inner)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(dt_rank)
    if n_group is not None:
        writer.add_ssm_group_count(n_group)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocabulary(writer, WORDS, eos_id)
    _write(writer, weights)
    return path


def _add_vocabulary(writer: gguf.GGUFWriter, words: list[str], eos_id: int, chat_template: str | None = CHATML) -> None:
    tokens, scores, types = vocabulary(words, eos_id)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos_id)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _write(writer: gguf.GGUFWriter, weights: dict[str, np.ndarray], quant: gguf.GGMLQuantizationType | None = None) -> None:
    """The tensors (matrices quantized when `quant` is given; norms stay F32), then the file."""
    for key, value in weights.items():
        if quant is not None and value.ndim == 2:
            writer.add_tensor(key, gguf.quants.quantize(value, quant), raw_dtype=quant)
        else:
            writer.add_tensor(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _mat(rng: np.random.Generator, *shape: int, scale: float = 0.1) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def lfm2_weights(seed: int = 11, n_embd: int = 64, n_ff: int = 128, n_head: int = 4, l_cache: int = 3,
                 layers: str = "caca") -> dict[str, np.ndarray]:  # fmt: skip
    """Random weights of a tiny LFM2 (Liquid's hybrid: short-convolution layers "c", attention layers "a"), laid out as
    llama.cpp's src/models/lfm2.cpp loads them (numpy shapes are llama.cpp's dimensions reversed)."""
    rng = np.random.default_rng(seed)
    head = n_embd // n_head
    w = {
        "token_embd.weight": _mat(rng, n_vocab(), n_embd, scale=1.0),
        "token_embd_norm.weight": np.ones(n_embd, dtype=np.float32),  # LFM2's output norm (llama.cpp keeps the name)
        "output.weight": _mat(rng, n_vocab(), n_embd, scale=0.6),
    }
    for i, kind in enumerate(layers):
        w |= {
            f"blk.{i}.attn_norm.weight": np.ones(n_embd, dtype=np.float32),
            f"blk.{i}.ffn_norm.weight": np.ones(n_embd, dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": _mat(rng, n_ff, n_embd, scale=n_embd**-0.5),
            f"blk.{i}.ffn_up.weight": _mat(rng, n_ff, n_embd, scale=n_embd**-0.5),
            f"blk.{i}.ffn_down.weight": _mat(rng, n_embd, n_ff, scale=n_ff**-0.5),
        }
        if kind == "a":
            w |= {f"blk.{i}.attn_{x}.weight": _mat(rng, n_embd, n_embd, scale=n_embd**-0.5) for x in ("q", "k", "v", "output")}
            w |= {f"blk.{i}.attn_q_norm.weight": np.ones(head, dtype=np.float32),
                  f"blk.{i}.attn_k_norm.weight": np.ones(head, dtype=np.float32)}  # fmt: skip
        else:
            w |= {
                f"blk.{i}.shortconv.conv.weight": _mat(rng, n_embd, l_cache, scale=0.5),
                f"blk.{i}.shortconv.in_proj.weight": _mat(rng, 3 * n_embd, n_embd, scale=n_embd**-0.5),
                f"blk.{i}.shortconv.out_proj.weight": _mat(rng, n_embd, n_embd, scale=n_embd**-0.5),
            }
    return w


def lfm2_model(path: Path, weights: dict[str, np.ndarray] | None = None, n_head: int = 4, l_cache: int = 3,
               name: str = "tiny-lfm2", eos_id: int = 2) -> Path:  # fmt: skip
    """A tiny hybrid model (llama_model_is_hybrid: recurrent conv state and a KV cache), same vocabulary as the
    llama-architecture models."""
    weights = weights if weights is not None else lfm2_weights(n_head=n_head, l_cache=l_cache)
    n_embd = weights["token_embd.weight"].shape[1]
    n_layer = sum(1 for k in weights if k.endswith("ffn_norm.weight"))
    attention = [f"blk.{i}.attn_q.weight" in weights for i in range(n_layer)]
    writer = gguf.GGUFWriter(str(path), "lfm2")
    writer.add_name(name)
    writer.add_context_length(1024)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(weights["blk.0.ffn_up.weight"].shape[0])
    writer.add_head_count(n_head)
    writer.add_head_count_kv([n_head if a else 0 for a in attention])  # 0: a convolution layer
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_uint32("lfm2.shortconv.l_cache", l_cache)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocabulary(writer, WORDS, eos_id)
    _write(writer, weights)
    return path


MAMBA2 = {"d_state": 16, "d_conv": 4, "n_group": 1, "head_dim": 16}


def mamba2_weights(seed: int = 13, n_embd: int = 64, n_layer: int = 2) -> dict[str, np.ndarray]:
    """Random weights of a tiny Mamba-2, laid out as llama.cpp's src/models/mamba2.cpp loads them."""
    rng = np.random.default_rng(seed)
    d_state, d_conv, n_group = MAMBA2["d_state"], MAMBA2["d_conv"], MAMBA2["n_group"]
    d_inner = 2 * n_embd
    n_heads = d_inner // MAMBA2["head_dim"]  # llama.cpp's dt_rank for Mamba-2
    conv_dim = d_inner + 2 * n_group * d_state
    w = {
        "token_embd.weight": _mat(rng, n_vocab(), n_embd, scale=1.0),
        "output_norm.weight": np.ones(n_embd, dtype=np.float32),
        "output.weight": _mat(rng, n_vocab(), n_embd, scale=0.6),
    }
    for i in range(n_layer):
        w |= {
            f"blk.{i}.attn_norm.weight": np.ones(n_embd, dtype=np.float32),
            f"blk.{i}.ssm_in.weight": _mat(rng, d_inner + conv_dim + n_heads, n_embd, scale=n_embd**-0.5),
            f"blk.{i}.ssm_conv1d.weight": _mat(rng, conv_dim, d_conv, scale=0.5),
            f"blk.{i}.ssm_conv1d.bias": _mat(rng, conv_dim),
            f"blk.{i}.ssm_dt.bias": _mat(rng, n_heads),
            f"blk.{i}.ssm_a": -np.exp(_mat(rng, n_heads, 1, scale=0.5)),
            f"blk.{i}.ssm_d": np.ones((n_heads, 1), dtype=np.float32),
            f"blk.{i}.ssm_norm.weight": np.ones((n_group, d_inner // n_group), dtype=np.float32),
            f"blk.{i}.ssm_out.weight": _mat(rng, n_embd, d_inner, scale=d_inner**-0.5),
        }
    return w


def mamba2_model(path: Path, weights: dict[str, np.ndarray] | None = None, name: str = "tiny-mamba2", eos_id: int = 2) -> Path:
    """A tiny Mamba-2 (purely recurrent, no KV cache), same vocabulary as the llama-architecture models."""
    w = weights if weights is not None else mamba2_weights()
    n_embd = w["token_embd.weight"].shape[1]
    n_layer = sum(1 for k in w if k.endswith("ssm_out.weight"))
    d_inner = 2 * n_embd
    d_state, d_conv, n_group = MAMBA2["d_state"], MAMBA2["d_conv"], MAMBA2["n_group"]
    n_heads = d_inner // MAMBA2["head_dim"]
    return _write_ssm(path, "mamba2", name, w, n_embd, n_layer, d_conv, d_inner, d_state, n_heads, n_group, eos_id)


def perturbed_matrices(weights: dict[str, np.ndarray], seed: int, noise: float) -> dict[str, np.ndarray]:
    """A draft of a recurrent model: its matrices plus noise, its norms and state parameters (a decay that must stay
    negative, a convolution bias) as they were."""
    noisy = perturbed({k: v for k, v in weights.items() if v.ndim == 2 and k.endswith(".weight")}, seed, noise)
    return weights | noisy


def damped(weights: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """Each layer's output projections scaled down: the next token depends mostly on the current one, so greedy
    output falls into loops that prompt lookup can draft (the state still counts: rollback is still tested)."""
    layer_outputs = ("out_proj", "attn_output", "ffn_down", "ssm_out")
    return {k: v * factor if any(name in k for name in layer_outputs) else v for k, v in weights.items()}


def first_layers(weights: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The model cut to its first `n` layers: a cheaper draft that agrees with a damped model (same embeddings and
    output, most of what decides its next token)."""
    return {k: v for k, v in weights.items() if not k.startswith("blk.") or int(k.split(".")[1]) < n}


QWEN35 = {"n_head": 4, "n_ff": 128, "d_conv": 4, "head_dim": 16, "n_k_heads": 2, "n_v_heads": 4, "interval": 2}


def qwen35_weights(seed: int = 17, n_embd: int = 64, n_layer: int = 2, nextn: bool = True, damp: float = 1.0,
                   mtp_noise: float = 0.0, n_ff: int = QWEN35["n_ff"]) -> dict[str, np.ndarray]:  # fmt: skip
    """Random weights of a tiny Qwen3.5 (hybrid: gated-delta-net layers, every `interval`-th a gated attention
    layer), laid out as llama.cpp's src/models/qwen35.cpp loads them; `nextn`: one multi-token-prediction block
    after the trunk (`blk.<n_layer>.nextn.*`, Qwen3.5/3.6's built-in draft head).

    The MTP head reads [enorm(embedding of token t+1), hnorm(the trunk's last hidden state at t)] and predicts token
    t+2. Built to agree with a `damp`ed trunk (whose next token depends mostly on its current one): eh_proj passes
    the token half through, its attention and FFN add little, and the shared output matrix makes the logits; with
    `mtp_noise` it disagrees now and then, so MTP drafts are both accepted and rejected."""
    rng = np.random.default_rng(seed)
    c = QWEN35
    n_head, head = c["n_head"], c["head_dim"]
    key_dim, value_dim = head * c["n_k_heads"], head * c["n_v_heads"]
    conv_dim = 2 * key_dim + value_dim
    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    w = {
        "token_embd.weight": _mat(rng, n_vocab(), n_embd, scale=1.0),
        "output_norm.weight": ones(n_embd),
        "output.weight": _mat(rng, n_vocab(), n_embd, scale=0.6),
    }

    def attention(i: int, scale: float) -> dict[str, np.ndarray]:
        return {
            f"blk.{i}.attn_q.weight": _mat(rng, 2 * head * n_head, n_embd, scale=n_embd**-0.5),  # queries and their gate
            f"blk.{i}.attn_k.weight": _mat(rng, head * n_head, n_embd, scale=n_embd**-0.5),
            f"blk.{i}.attn_v.weight": _mat(rng, head * n_head, n_embd, scale=n_embd**-0.5),
            f"blk.{i}.attn_output.weight": _mat(rng, n_embd, head * n_head, scale=scale * (head * n_head) ** -0.5),
            f"blk.{i}.attn_q_norm.weight": ones(head),
            f"blk.{i}.attn_k_norm.weight": ones(head),
        }

    def block(i: int, scale: float) -> dict[str, np.ndarray]:
        return {
            f"blk.{i}.attn_norm.weight": ones(n_embd),
            f"blk.{i}.post_attention_norm.weight": ones(n_embd),
            f"blk.{i}.ffn_gate.weight": _mat(rng, n_ff, n_embd, scale=n_embd**-0.5),
            f"blk.{i}.ffn_up.weight": _mat(rng, n_ff, n_embd, scale=n_embd**-0.5),
            f"blk.{i}.ffn_down.weight": _mat(rng, n_embd, n_ff, scale=scale * n_ff**-0.5),
        }

    for i in range(n_layer):
        w |= block(i, damp)
        if (i + 1) % c["interval"] == 0:
            w |= attention(i, damp)
        else:
            w |= {
                f"blk.{i}.attn_qkv.weight": _mat(rng, conv_dim, n_embd, scale=n_embd**-0.5),
                f"blk.{i}.attn_gate.weight": _mat(rng, value_dim, n_embd, scale=n_embd**-0.5),
                f"blk.{i}.ssm_conv1d.weight": _mat(rng, conv_dim, c["d_conv"], scale=0.5),
                f"blk.{i}.ssm_dt.bias": _mat(rng, c["n_v_heads"]),
                f"blk.{i}.ssm_a": -np.exp(_mat(rng, c["n_v_heads"], scale=0.5)),
                f"blk.{i}.ssm_beta.weight": _mat(rng, c["n_v_heads"], n_embd, scale=n_embd**-0.5),
                f"blk.{i}.ssm_alpha.weight": _mat(rng, c["n_v_heads"], n_embd, scale=n_embd**-0.5),
                f"blk.{i}.ssm_norm.weight": ones(head),
                f"blk.{i}.ssm_out.weight": _mat(rng, n_embd, value_dim, scale=damp * value_dim**-0.5),
            }
    if nextn:
        i = n_layer
        eh = np.concatenate([np.eye(n_embd, dtype=np.float32), np.zeros((n_embd, n_embd), dtype=np.float32)], axis=1)
        w |= block(i, 0.05) | attention(i, 0.05)
        w |= {
            f"blk.{i}.nextn.eh_proj.weight": eh + _mat(rng, n_embd, 2 * n_embd, scale=mtp_noise),
            f"blk.{i}.nextn.enorm.weight": ones(n_embd),
            f"blk.{i}.nextn.hnorm.weight": ones(n_embd),
            f"blk.{i}.nextn.shared_head_norm.weight": ones(n_embd),
        }
    return w


def qwen35_model(path: Path, weights: dict[str, np.ndarray] | None = None, name: str = "tiny-qwen35", eos_id: int = 2) -> Path:
    """A tiny Qwen3.5 (llama_model_is_hybrid), with its MTP block when the weights have one; same vocabulary as the
    llama-architecture models."""
    w = weights if weights is not None else qwen35_weights()
    c = QWEN35
    n_embd = w["token_embd.weight"].shape[1]
    n_nextn = sum(1 for k in w if k.endswith("nextn.eh_proj.weight"))
    n_blocks = sum(1 for k in w if k.endswith("ffn_down.weight"))
    writer = gguf.GGUFWriter(str(path), "qwen35")
    writer.add_name(name)
    writer.add_context_length(1024)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_blocks)  # the trunk and the MTP blocks
    if n_nextn:
        writer.add_uint32("qwen35.nextn_predict_layers", n_nextn)
    writer.add_feed_forward_length(w["blk.0.ffn_up.weight"].shape[0])
    writer.add_head_count(c["n_head"])
    writer.add_head_count_kv(c["n_head"])
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_rope_dimension_sections([4, 2, 2, 0])
    writer.add_rope_freq_base(10000.0)
    writer.add_uint32("qwen35.full_attention_interval", c["interval"])
    writer.add_ssm_conv_kernel(c["d_conv"])
    writer.add_ssm_inner_size(c["head_dim"] * c["n_v_heads"])
    writer.add_ssm_state_size(c["head_dim"])
    writer.add_ssm_time_step_rank(c["n_v_heads"])
    writer.add_ssm_group_count(c["n_k_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocabulary(writer, WORDS, eos_id)
    _write(writer, w)
    return path
