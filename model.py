"""
One hand-written Transformer for the GPT-2 and Llama families (Llama 3, SmolLM2, Qwen2), with
TransformerLens-style hook points, a KV cache and generation. Only torch and the standard library:
checkpoint files live in checkpoint.py, tokenizers in tokenizer.py, and LoRA and steering vectors
(lora.py, steer.py) attach from outside through modules and hook points; nothing here knows them.

Read top to bottom: config -> hook points -> layers -> the model -> hooks API -> generation.

The one layer rule: "layer l" is the output of block l = blocks.{l}.hook_resid_post
= HF hidden_states[l + 1].
"""

import math
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
    hf_model_type: str = ""  # which HF module names this model maps to: gpt2, llama, qwen2
    name: str = ""  # where it came from (path or name), for run records

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"unknown arch {self.arch!r}: expected 'gpt2' or 'llama'")
        families = {"gpt2": ("gpt2",), "llama": ("llama", "qwen2")}[self.arch]
        self.hf_model_type = self.hf_model_type or families[0]
        if self.hf_model_type not in families:
            raise ValueError(f"hf_model_type {self.hf_model_type!r} is not of arch {self.arch!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    def to_dict(self):
        return asdict(self)

    def check_layers(self, layers):
        """A one-line ValueError unless `layers` is a non-empty list of this model's block indices."""
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
        if bad or not layers:
            last = self.n_layers - 1
            raise ValueError(f"layers {bad or layers} out of range: the model has layers 0..{last}")


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


def make_norm(cfg):
    if cfg.arch == "gpt2":
        return LayerNorm(cfg.d_model, cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


def rope_inv_freq(cfg):
    """Inverse frequencies of RoPE, with Llama-3 frequency-dependent scaling when configured."""
    exponents = torch.arange(0, cfg.d_head, 2, dtype=torch.float32) / cfg.d_head
    inv_freq = 1.0 / (cfg.rope_theta**exponents)  # (d_head / 2,)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
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
        self.hook_q = HookPoint()  # (B, T, n_heads, d_head), before RoPE as in TransformerLens
        self.hook_k = HookPoint()  # (B, T, n_kv_heads, d_head), before RoPE
        self.hook_v = HookPoint()  # (B, T, n_kv_heads, d_head)
        if cfg.arch == "llama":
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
        if rope is not None:
            cos, sin = rope[0][:, None], rope[1][:, None]  # (T, 1, dh): broadcast over heads
            q = self.hook_rot_q(apply_rope(q, cos, sin))
            k = self.hook_rot_k(apply_rope(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KV, T, dh)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, KV, T_past + T, dh)
        Tk = k.shape[2]
        # query i sees the keys up to past + i
        causal = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)
        # grouped-query attention: the fused kernel shares each KV head among its queries, no copies
        gqa = self.cfg.n_kv_heads < self.cfg.n_heads
        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            # the fused kernel never materialises the (T, T) scores, so a hook that reads or edits
            # them needs the explicit softmax (same numbers up to float rounding, more memory)
            z = self.explicit_attention(q, k, v, causal)
        elif T == Tk:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # new tokens after a KV cache: the mask is not square
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=gqa)
        z = self.hook_z(z.transpose(1, 2))  # (B, T, H, dh)
        return self.o_proj(z.reshape(B, T, -1))

    def explicit_attention(self, q, k, v, causal):
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, dh)
        v = v.repeat_interleave(group, dim=1)
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
        self.hook_pre = HookPoint()  # (B, T, d_mlp): pre-activation (the gate's, in SwiGLU)
        if self.gated:
            self.hook_pre_linear = HookPoint()  # (B, T, d_mlp): up_proj's output, ungated
        self.hook_post = HookPoint()  # (B, T, d_mlp): what down_proj reads

    def forward(self, x):
        if self.gated:  # SwiGLU
            post = F.silu(self.hook_pre(self.gate_proj(x))) * self.hook_pre_linear(self.up_proj(x))
        else:  # GPT-2 uses the tanh approximation of GELU ("gelu_new")
            post = F.gelu(self.hook_pre(self.up_proj(x)), approximate="tanh")
        return self.down_proj(self.hook_post(post))  # (B, T, d_model)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # (B, T, d_model)
        self.hook_attn_out = HookPoint()  # (B, T, d_model)
        self.hook_resid_mid = HookPoint()  # (B, T, d_model): resid_pre + attn_out
        self.hook_mlp_out = HookPoint()  # (B, T, d_model)
        self.hook_resid_post = HookPoint()  # (B, T, d_model): resid_mid + mlp_out = "layer l"

    def forward(self, x, rope, cache):
        x = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(self.ln1(x), rope, cache))
        x = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(x)))
        return self.hook_resid_post(x + mlp_out)


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
        else:
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
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

    def rope(self, start, T, dtype):
        pos = torch.arange(start, start + T, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)  # (T, dh/2), in fp32 like HF
        angles = torch.cat([angles, angles], dim=-1)  # (T, dh)
        return angles.cos().to(dtype), angles.sin().to(dtype)

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
        T = x.shape[1]
        rope = None if self.cfg.arch == "gpt2" else self.rope(start, T, x.dtype)
        for i in range(start_at_layer, self.cfg.n_layers):
            x = self.blocks[i](x, rope, cache[i] if cache else None)
        x = self.ln_final(x)
        if at is not None:
            x = x[at]  # (n, d_model)
        return self.unembed(x)

    def embed_tokens(self, tokens, start):
        """tokens (B, T) -> the residual stream entering block 0, (B, T, d_model)."""
        B, T = tokens.shape
        x = self.hook_embed(self.embed(tokens))  # (B, T, d_model)
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
             generator=None):
    """tokens (B, T) -> (B, T + n) with n <= max_new_tokens. Greedy when temperature == 0.
    Stops when every row has produced an EOS id (rows that finished keep emitting EOS)."""
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=tokens.device)
    cache = model.new_cache() if use_cache else None
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    out, step_input = tokens, tokens
    for _ in range(max_new_tokens):
        inputs = step_input if use_cache else out
        logits = model(inputs, cache, at=last_position(inputs)).float()  # (B, vocab)
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
