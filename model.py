"""
One hand-written Transformer for the GPT-2, Llama (Llama 3, SmolLM2, Qwen2) and Gemma 3 families,
with TransformerLens-style hook points, a KV cache and generation. Only torch and the standard
library: checkpoint files live in checkpoint.py, tokenizers in tokenizer.py, and LoRA and steering
vectors (lora.py, steer.py) attach from outside through modules and hook points; nothing here knows
them.

Read top to bottom: config -> hook points -> layers -> the model -> hooks API -> generation.

The one layer rule: "layer l" is the output of block l = blocks.{l}.hook_resid_post
= HF hidden_states[l + 1].
"""

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


GEMMA3_FIELDS = ("layer_types", "sliding_window", "rope_local_theta", "query_pre_attn_scalar",
                 "final_logit_softcap")


@dataclass
class ModelConfig:
    # "gpt2" (learned positions, LayerNorm, GELU), "llama" (RoPE, RMSNorm, SwiGLU) or "gemma3"
    # (llama plus q/k norms, norms after attention and MLP, GeGLU, sliding-window layers)
    arch: str = "gpt2"
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
    # Gemma 3 only: local ("sliding_attention") layers see the last `sliding_window` keys and use
    # their own RoPE base; the others ("full_attention") are global. Default: every 6th is global.
    layer_types: list | None = None
    sliding_window: int | None = None
    rope_local_theta: float = 10000.0
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power, not d_head's
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    hf_model_type: str = ""  # the HF module names it maps to: gpt2, llama, qwen2, gemma3_text
    name: str = ""  # where it came from (path or name), for run records

    def __post_init__(self):
        families = {"gpt2": ("gpt2",), "llama": ("llama", "qwen2"), "gemma3": ("gemma3_text",)}
        if self.arch not in families:
            raise ValueError(f"unknown arch {self.arch!r}: expected one of {', '.join(families)}")
        self.hf_model_type = self.hf_model_type or families[self.arch][0]
        if self.hf_model_type not in families[self.arch]:
            raise ValueError(f"hf_model_type {self.hf_model_type!r} is not of arch {self.arch!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.arch == "gemma3" and self.layer_types is None:
            self.layer_types = [gemma3_layer_type(i) for i in range(self.n_layers)]
        if self.layer_types is not None and len(self.layer_types) != self.n_layers:
            raise ValueError(f"{len(self.layer_types)} layer_types for {self.n_layers} layers")

    def is_sliding(self, layer):
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    def to_dict(self):
        fields = asdict(self)
        if self.arch != "gemma3":  # other families' records (and toy cache keys) stay as they were
            for key in GEMMA3_FIELDS:
                del fields[key]
        return fields

    def check_layers(self, layers):
        """A one-line ValueError unless `layers` is a non-empty list of this model's block indices."""
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
        if bad or not layers:
            last = self.n_layers - 1
            raise ValueError(f"layers {bad or layers} out of range: the model has layers 0..{last}")


def gemma3_layer_type(layer, pattern=6):
    """Gemma 3's default: five local (sliding-window) layers, then one global."""
    return "full_attention" if (layer + 1) % pattern == 0 else "sliding_attention"


# -----------------------------------------------------------------------------
# Hook points: identity modules whose forward hooks may read or replace the activation. Each is
# declared on its own line with its shape; Transformer names them all once, when it is built.


class HookPoint(nn.Module):
    name = ""  # e.g. "blocks.3.attn.hook_pattern", set by Transformer.__init__

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
        self.hook_scale = HookPoint()  # (B, T, 1): sqrt(variance + eps)
        self.hook_normalized = HookPoint()  # (B, T, d_model): after weight and bias

    def forward(self, x):
        if not self.hook_scale.has_hooks():  # the fused kernel: bit-identical to HF
            normalized = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
            return self.hook_normalized(normalized)
        # spelled out only when someone reads or replaces the scale (e.g. to freeze it)
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.weight + self.bias)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps
        self.hook_scale = HookPoint()  # (B, T, 1): sqrt(mean(x^2) + eps), in fp32
        self.hook_normalized = HookPoint()  # (B, T, d_model): before the weight, as in TransformerLens

    def forward(self, x):
        # in fp32 as HF does: the mean of squares overflows / loses precision in bf16
        x32 = x.float()
        mean_square = x32.pow(2).mean(-1, keepdim=True)
        if self.hook_scale.has_hooks():
            x32 = x32 / self.hook_scale((mean_square + self.eps).sqrt())
        else:  # HF's exact arithmetic: logits bit-identical
            x32 = x32 * torch.rsqrt(mean_square + self.eps)
        return self.weight * self.hook_normalized(x32.to(x.dtype))


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 (zeros at init) and multiplies in
    fp32 before the cast back, where Llama casts first."""

    def __init__(self, d, eps):
        super().__init__(d, eps)
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        x32 = x.float()
        mean_square = x32.pow(2).mean(-1, keepdim=True)
        if self.hook_scale.has_hooks():
            x32 = x32 / self.hook_scale((mean_square + self.eps).sqrt())
        else:
            x32 = x32 * torch.rsqrt(mean_square + self.eps)
        return (self.hook_normalized(x32) * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(cfg, d=None):
    d = d or cfg.d_model
    norm = {"gpt2": LayerNorm, "llama": RMSNorm, "gemma3": GemmaRMSNorm}[cfg.arch]
    return norm(d, cfg.norm_eps)


def rope_frequencies(cfg):
    """{buffer name: RoPE inverse frequencies (d_head / 2,)}; Gemma 3's local layers have their
    own."""
    if cfg.arch == "gpt2":
        return {}
    freqs = {"inv_freq": rope_inv_freq(cfg.d_head, cfg.rope_theta, cfg.rope_scaling)}
    if cfg.arch == "gemma3":
        freqs["inv_freq_local"] = rope_inv_freq(cfg.d_head, cfg.rope_local_theta, None)
    return freqs


def rope_inv_freq(d_head, theta, scaling=None):
    """Inverse frequencies of RoPE, with linear or Llama-3 (frequency-dependent) scaling."""
    exponents = torch.arange(0, d_head, 2, dtype=torch.float32) / d_head
    inv_freq = 1.0 / (theta**exponents)  # (d_head / 2,)
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":  # positions divided by `factor` (Gemma 3's global layers from 4B up)
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        supported = "default, linear, llama3"
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: {supported})")
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between
    # interpolated
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
    def __init__(self, cfg, layer=0):
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
        if cfg.arch == "gemma3":  # RMSNorm of each head's query and key, before RoPE
            self.q_norm = make_norm(cfg, dh)
            self.k_norm = make_norm(cfg, dh)
        # None: SDPA's default 1/sqrt(d_head), kept as is so that Llama's logits stay bit-identical
        self.scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.hook_q = HookPoint()  # (B, T, n_heads, d_head), before q_norm and RoPE (as TL)
        self.hook_k = HookPoint()  # (B, T, n_kv_heads, d_head), before k_norm and RoPE
        self.hook_v = HookPoint()  # (B, T, n_kv_heads, d_head)
        if cfg.arch != "gpt2":
            self.hook_rot_q = HookPoint()  # (B, T, n_heads, d_head), after RoPE
            self.hook_rot_k = HookPoint()  # (B, T, n_kv_heads, d_head), after RoPE
        self.hook_attn_scores = HookPoint()  # (B, n_heads, T_query, T_key), masked with -inf
        self.hook_pattern = HookPoint()  # (B, n_heads, T_query, T_key), rows sum to 1
        self.hook_z = HookPoint()  # (B, T, n_heads, d_head): pattern @ v, per head

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
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.cfg.arch == "gemma3":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope[0][:, None], rope[1][:, None]  # (T, 1, dh): broadcast over heads
            q = self.hook_rot_q(apply_rope(q, cos, sin))
            k = self.hook_rot_k(apply_rope(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KV, T, dh)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, KV, T_past + T, dh)
        Tk = k.shape[2]
        visible = attention_mask(T, Tk, self.window, x.device)  # (T, Tk)
        # grouped-query attention: the fused kernel shares each KV head among its queries, no copies
        gqa = self.cfg.n_kv_heads < self.cfg.n_heads
        windowed = self.window is not None and Tk > self.window
        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            # the fused kernel never materialises the (T, T) scores, so a hook that reads or edits
            # them needs the explicit softmax (same numbers up to float rounding, more memory)
            z = self.explicit_attention(q, k, v, visible)
        elif T == Tk and not windowed:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=gqa)
        else:  # after a KV cache the mask is not square; a sliding window cuts it further
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.scale,
                                               enable_gqa=gqa)
        z = self.hook_z(z.transpose(1, 2))  # (B, T, H, dh)
        return self.o_proj(z.reshape(B, T, -1))

    def explicit_attention(self, q, k, v, visible):
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, dh)
        v = v.repeat_interleave(group, dim=1)
        scale = self.scale or 1 / math.sqrt(q.shape[-1])
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
        scores = self.hook_attn_scores(scores.masked_fill(~visible, float("-inf")))
        pattern = self.hook_pattern(scores.float().softmax(dim=-1).to(q.dtype))
        return pattern @ v  # (B, H, Tq, dh)


def attention_mask(T, Tk, window, device):
    """(T, Tk) bool, True where a query sees a key: the T queries are the last T of Tk positions;
    query i sees the keys up to past + i, and with a window only the last `window` of them."""
    visible = torch.ones(T, Tk, dtype=torch.bool, device=device).tril(Tk - T)
    if window is not None:
        visible = visible.triu(Tk - T - window + 1)
    return visible


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.arch != "gpt2"
        # SwiGLU (Llama) or GeGLU with tanh GELU (Gemma); GPT-2's "gelu_new" is the same tanh GELU
        self.activation = F.silu if cfg.arch == "llama" else partial(F.gelu, approximate="tanh")
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.hook_pre = HookPoint()  # (B, T, d_mlp): pre-activation (the gate's, in SwiGLU)
        if self.gated:
            self.hook_pre_linear = HookPoint()  # (B, T, d_mlp): up_proj's output, ungated
        self.hook_post = HookPoint()  # (B, T, d_mlp): what down_proj reads
        self.hook_out = HookPoint()  # (B, T, d_model): down_proj's output

    def forward(self, x):
        if self.gated:
            post = self.activation(self.hook_pre(self.gate_proj(x)))
            post = post * self.hook_pre_linear(self.up_proj(x))
        else:
            post = self.activation(self.hook_pre(self.up_proj(x)))
        return self.hook_out(self.down_proj(self.hook_post(post)))  # (B, T, d_model)


class Block(nn.Module):
    def __init__(self, cfg, layer=0):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ln2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        # Gemma normalises the attention and MLP outputs again before the residual add
        # (TransformerLens' ln1_post / ln2_post). hook_attn_out and hook_mlp_out hold what is added,
        # after these norms, so resid_post = resid_mid + mlp_out holds in every family; the MLP
        # module's own output before the norm, where a down_proj LoRA acts and where the seed paper
        # hooks "the MLP output", is mlp.hook_out.
        self.post_norms = cfg.arch == "gemma3"
        if self.post_norms:
            self.ln1_post = make_norm(cfg)
            self.ln2_post = make_norm(cfg)
        self.hook_resid_pre = HookPoint()  # (B, T, d_model)
        self.hook_attn_out = HookPoint()  # (B, T, d_model)
        self.hook_resid_mid = HookPoint()  # (B, T, d_model): resid_pre + attn_out
        self.hook_mlp_out = HookPoint()  # (B, T, d_model)
        self.hook_resid_post = HookPoint()  # (B, T, d_model): resid_mid + mlp_out = "layer l"

    def forward(self, x, rope, cache):
        x = self.hook_resid_pre(x)
        attn_out = self.attn(self.ln1(x), rope, cache)
        if self.post_norms:
            attn_out = self.ln1_post(attn_out)
        x = self.hook_resid_mid(x + self.hook_attn_out(attn_out))
        mlp_out = self.mlp(self.ln2(x))
        if self.post_norms:
            mlp_out = self.ln2_post(mlp_out)
        return self.hook_resid_post(x + self.hook_mlp_out(mlp_out))


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

    def repeat_rows(self, k):
        """Each cached row becomes k consecutive rows: k continuations of one prompt (the options
        of a multiple-choice item, or k samples) share the prompt's keys and values."""
        self.k = self.k.repeat_interleave(k, dim=0)
        self.v = self.v.repeat_interleave(k, dim=0)


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()  # (B, T, d_model)
        if cfg.arch == "gpt2":
            self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
            self.hook_pos_embed = HookPoint()  # (B, T, d_model)
        for name, inv_freq in rope_frequencies(cfg).items():
            self.register_buffer(name, inv_freq, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = make_norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.apply(self.init_weights)
        self.hook_dict = {}  # {TransformerLens name: HookPoint}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def init_weights(self, module):
        # GPT-2's init; only matters for models trained from scratch (checkpoints overwrite it)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def rope(self, start, T, dtype, inv_freq):
        pos = torch.arange(start, start + T, device=inv_freq.device, dtype=torch.float32)
        angles = torch.outer(pos, inv_freq)  # (T, dh/2), in fp32 like HF
        angles = torch.cat([angles, angles], dim=-1)  # (T, dh)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def ropes(self, start, T, dtype):
        """(cos, sin) of every block, (T, d_head) each; None for learned positions."""
        if self.cfg.arch == "gpt2":
            return [None] * self.cfg.n_layers
        rope = self.rope(start, T, dtype, self.inv_freq)
        if self.cfg.arch != "gemma3":
            return [rope] * self.cfg.n_layers
        local = self.rope(start, T, dtype, self.inv_freq_local)
        return [local if self.cfg.is_sliding(i) else rope for i in range(self.cfg.n_layers)]

    def forward(self, tokens, cache=None, at=None, start_at_layer=0):
        """tokens (B, T) -> logits (B, T, vocab). `cache` is a list of LayerCache (see new_cache).
        at: a bool mask (B, T) -> logits (n, vocab) only at its n True positions, row by row. The
        unembedding is a large share of a small model's FLOPs and memory (49k x 576 of SmolLM2's
        135M weights, at every position), and a loss on a few answer tokens needs only those.
        start_at_layer=L (TransformerLens' name): `tokens` is instead the residual stream
        (B, T, d_model) entering block L, and blocks 0..L-1 do not run (a patch at layer L leaves
        everything before it unchanged, so patching needs only the blocks from L on)."""
        if start_at_layer:
            x = tokens  # (B, T, d_model)
            start = len(cache[start_at_layer]) if cache else 0
        else:
            start = len(cache[0]) if cache else 0
            x = self.embed_tokens(tokens, start)  # (B, T, d_model)
        ropes = self.ropes(start, x.shape[1], x.dtype)
        for i in range(start_at_layer, self.cfg.n_layers):
            x = self.blocks[i](x, ropes[i], cache[i] if cache else None)
        x = self.ln_final(x)
        if at is not None:
            x = x[at]  # (n, d_model)
        logits = self.unembed(x)
        if self.cfg.final_logit_softcap:
            cap = self.cfg.final_logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def embed_tokens(self, tokens, start):
        """tokens (B, T) -> the residual stream entering block 0, (B, T, d_model)."""
        B, T = tokens.shape
        x = self.embed(tokens)  # (B, T, d_model)
        if self.cfg.arch == "gemma3":  # times sqrt(d_model), rounded to the model's dtype as HF
            x = x * torch.tensor(self.cfg.d_model**0.5, dtype=x.dtype)
        x = self.hook_embed(x)
        if self.cfg.arch == "gpt2":
            if start + T > self.cfg.n_ctx:
                raise ValueError(f"sequence of {start + T} tokens exceeds the model's n_ctx={self.cfg.n_ctx}")
            positions = torch.arange(start, start + T, device=tokens.device)
            x = x + self.hook_pos_embed(self.pos_embed(positions).expand(B, T, -1))
        return x

    def new_cache(self):
        return [LayerCache() for _ in self.blocks]

    # --- hooks API (TransformerLens names) ---

    def hook_points(self):
        return dict(self.hook_dict)

    @contextmanager
    def hooks(self, fwd_hooks):
        """Attach [(name, fn)] for the duration of the block. fn(activation, hook) may return a
        replacement tensor; `hook.name` is the hook's name. Always detached on exit."""
        handles = []
        try:
            for name, fn in fwd_hooks:
                if name not in self.hook_dict:
                    raise KeyError(f"no hook point named {name!r} (e.g. 'blocks.0.hook_resid_post')")
                handles.append(self.hook_dict[name].register_forward_hook(call_with_hook(fn)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def run_with_hooks(self, tokens, fwd_hooks=()):
        with self.hooks(fwd_hooks):
            return self(tokens)

    def run_with_cache(self, tokens, names_filter=None):
        """Returns (logits, {hook name: activation}). names_filter: None (all), a name, a list of
        names, or a predicate on names."""
        keep = name_predicate(names_filter)
        activations = {}

        def save(x, hook):
            activations[hook.name] = x.detach()

        logits = self.run_with_hooks(tokens, [(n, save) for n in self.hook_dict if keep(n)])
        return logits, activations


def call_with_hook(fn):
    """TransformerLens' hook signature fn(activation, hook) as a torch forward hook."""

    def forward_hook(module, inputs, output):
        return fn(output, module)

    return forward_hook


def name_predicate(names_filter):
    if names_filter is None:
        return lambda name: True
    if callable(names_filter):
        return names_filter
    wanted = {names_filter} if isinstance(names_filter, str) else set(names_filter)
    return lambda name: name in wanted


# -----------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(model, tokens, max_new_tokens, temperature=0.0, top_k=None, eos_ids=(), use_cache=True,
             generator=None, repeats=1):
    """tokens (B, T) -> (B * repeats, T + n) with n <= max_new_tokens, each prompt's `repeats`
    continuations consecutive (samples of one prompt share its prefill: the KV cache's rows are
    repeated after it). Greedy when temperature == 0. Stops when every row has produced an EOS
    id (rows that finished keep emitting EOS)."""
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=tokens.device)
    cache = model.new_cache() if use_cache else None
    done = torch.zeros(tokens.shape[0] * repeats, dtype=torch.bool, device=tokens.device)
    out, step_input = tokens, tokens
    for step in range(max_new_tokens):
        inputs = step_input if use_cache else out
        logits = model(inputs, cache, at=last_position(inputs)).float()  # (B, vocab)
        if step == 0 and repeats > 1:  # the prefill ran once per prompt: now one row per sample
            logits, out = logits.repeat_interleave(repeats, 0), out.repeat_interleave(repeats, 0)
            for layer_cache in cache or ():
                layer_cache.repeat_rows(repeats)
        nxt = sample_next(logits, temperature, top_k, generator)  # (B,)
        if len(eos):
            nxt = torch.where(done, eos[0], nxt)
            done |= torch.isin(nxt, eos)
        out = torch.cat([out, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if done.all():
            break
    return out


def last_position(tokens):
    """(B, T) -> bool mask (B, T), True at the last position of each row."""
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -1] = True
    return mask


def sample_next(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
