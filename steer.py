"""
Steering vectors: a d_model vector per layer, added to the residual stream (or to an MLP's output)
through hook points, so model.py never changes and the base weights are never touched.

    vector = SteeringVector(d_model, layers=[6], hook="hook_mlp_out", positions="all")
    freeze(model)                                   # base weights: no gradients
    opt = torch.optim.Adam(vector.parameters(), lr=1e-2)
    with vector.apply(model, coeff=1.0):
        loss = answer_loss(model(tokens), targets)  # gradients reach only the vector

Where the vector is added (`positions`):
    "all"       every position (the seed paper's trained and "natural" vectors)
    "from:K"    absolute positions >= K (e.g. skip a system prompt)
    "last"      only the last prompt token (prompt lengths from apply(), else the input's last position)
    "codename"  conditional steering: one vector per codename, added only at the tokens where that
                codename's token sequence occurs (the seed paper's Locations / Functions setup)
    "adaptive"  token-wise learned scale (Sinii et al. 2025): 2 * sigmoid(w . r + b) * vector, r the
                residual at that position; w = b = 0 at init, so it starts out as "all"

Extraction without training: diff_of_means (CAA), pca_direction (repeng-style), and
lora_natural_vector: the seed paper's constant vector that a one-layer LoRA approximately adds.

File format (safetensors): `direction.{layer}` fp32 [d_model]; codename mode instead stores
`codename_direction.{layer}` fp32 [n_codenames, d_model] and `codename_tokens.{i}.{variant}` int64;
adaptive mode adds `gate_weight.{layer}` [d_model] and `gate_bias.{layer}` [1]. String metadata:
hook, method, positions, d_model, layers (JSON), model (a hint), codenames (JSON names).
"""

import json
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint import atomic_write, first_line
from lora import lora_disabled

HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out")
METHODS = ("trained", "diffmean", "pca", "lora_natural")
POSITION_MODES = ("all", "from:K", "last", "codename", "adaptive")


def parse_positions(positions):
    """'from:K' -> K; the other modes -> None. Bad modes are a one-line error."""
    if positions.startswith("from:"):
        k = positions[len("from:"):]
        if not k.isdigit():
            raise ValueError(f"positions {positions!r}: K in 'from:K' must be a non-negative integer")
        return int(k)
    if positions not in POSITION_MODES:
        raise ValueError(f"unknown positions mode {positions!r} (choose from: {', '.join(POSITION_MODES)})")
    return None


def freeze(model):
    """Turn off gradients of every base parameter: training a vector then neither computes nor
    stores gradients for the (much larger) model. The optimizer should get vector.parameters() only."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# -----------------------------------------------------------------------------
# Which positions get steered: masks computed from the input tokens


def codename_mask(tokens, codenames):
    """tokens (B, N), codenames [[variant ids, ...] per codename] -> (B, N, C) float, 1 at every token
    of every occurrence of any variant of codename c. A word tokenizes differently after a space and
    after '(' (' kzx' vs 'kzx'), hence variants. Multi-token codenames are steered on all their tokens."""
    B, N = tokens.shape
    mask = torch.zeros(B, N, len(codenames), device=tokens.device)
    for c, variants in enumerate(codenames):
        for ids in variants:
            m = len(ids)
            if m > N:
                continue
            pattern = torch.tensor(ids, device=tokens.device)
            starts = (tokens.unfold(1, m, 1) == pattern).all(-1).float()  # (B, N - m + 1): an occurrence starts here
            for k in range(m):
                mask[:, k : k + N - m + 1, c] += starts
    return mask.clamp(max=1.0)  # overlapping occurrences of one codename still steer once


def last_token_mask(positions, prompt_lengths):
    """positions (T,) absolute, prompt_lengths (B,) -> (B, T) float, 1 at position length - 1."""
    return (positions[None, :] == (prompt_lengths[:, None] - 1)).float()


# -----------------------------------------------------------------------------
# The steering vector


class SteeringVector(nn.Module):
    def __init__(self, d_model, layers, hook="hook_mlp_out", method="trained", positions="all",
                 codenames=None, model_hint=""):
        """layers: block indices; codenames: {name: token ids, or a list of alternative token-id
        sequences}, required by positions="codename"."""
        super().__init__()
        if hook not in HOOKS:
            raise ValueError(f"unknown hook {hook!r} (choose from: {', '.join(HOOKS)})")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} (choose from: {', '.join(METHODS)})")
        layers = sorted({int(l) for l in layers})
        if not layers or layers[0] < 0:
            raise ValueError(f"layers must be a non-empty list of block indices >= 0, got {layers}")
        self.from_position = parse_positions(positions)
        if (positions == "codename") != bool(codenames):
            raise ValueError("positions='codename' needs codenames={name: token ids}, and codenames need positions='codename'")
        as_variants = lambda ids: [ids] if ids and isinstance(ids[0], int) else ids
        codenames = {name: [[int(i) for i in v] for v in as_variants(list(ids))] for name, ids in (codenames or {}).items()}
        if not all(variants and all(variants) for variants in codenames.values()):
            raise ValueError("every codename needs at least one token id")
        self.d_model, self.layers, self.hook, self.method, self.positions = d_model, layers, hook, method, positions
        self.model_hint = model_hint
        self.codenames = codenames  # {name: [variant ids, ...]}
        zeros = lambda *shape: nn.ParameterDict({str(l): nn.Parameter(torch.zeros(*shape)) for l in layers})
        if positions == "codename":  # one vector per codename instead of one shared vector
            self.codename_directions = zeros(len(self.codenames), d_model)
        else:
            self.directions = zeros(d_model)
        if positions == "adaptive":
            self.gate_weight, self.gate_bias = zeros(d_model), zeros(1)

    def extra_repr(self):
        return f"d_model={self.d_model}, layers={self.layers}, hook={self.hook}, method={self.method}, positions={self.positions}"

    def hook_name(self, layer):
        return f"blocks.{layer}.{self.hook}"

    def check_fits(self, model, source="steering vector"):
        cfg = model.cfg
        if cfg.d_model != self.d_model:
            raise ValueError(f"{source}: vector has d_model={self.d_model} but the model has d_model={cfg.d_model}")
        if self.layers[-1] >= cfg.n_layers:
            raise ValueError(f"{source}: vector steers layer {self.layers[-1]} but the model has only {cfg.n_layers} layers")

    # --- what is added at one hook ---

    def delta(self, layer, x, state):
        """The steering added to activation x (B, T, d_model) at `layer`, broadcastable to x."""
        key = str(layer)
        if self.positions == "codename":
            vectors = self.codename_directions[key].to(x)  # (C, d_model)
            return state["codename_mask"].to(x) @ vectors  # (B, T, C) @ (C, d_model) -> (B, T, d_model)
        vector = self.directions[key].to(x)  # (d_model,)
        if self.positions == "adaptive":
            resid = state.pop(f"resid.{layer}", x)  # (B, T, d_model): what the gate reads
            gate = 2 * torch.sigmoid(resid @ self.gate_weight[key].to(x) + self.gate_bias[key].to(x))  # (B, T)
            return gate[..., None] * vector
        mask = state.get("mask")  # (B, T) or None for every position
        return vector if mask is None else mask[..., None].to(x) * vector

    def capture_positions(self, state, prompt_lengths, module, args, kwargs):
        """Forward pre-hook on the Transformer: build the position masks of this forward from its
        tokens. With a KV cache, positions are absolute and codenames are matched in the whole history;
        a codename cut by the cache boundary steers only its tokens in the later call (the earlier
        ones are already in the cache)."""
        tokens = args[0] if args else kwargs["tokens"]
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        start = len(cache[0]) if cache else 0
        B, T = tokens.shape
        positions = torch.arange(start, start + T, device=tokens.device)  # (T,)
        if self.from_position is not None:
            state["mask"] = (positions >= self.from_position).float().expand(B, T)
        elif self.positions == "last":
            if start == 0:  # a new sequence: the prompt is what we see now unless told otherwise
                lengths = prompt_lengths if prompt_lengths is not None else [T] * B
                state["prompt_lengths"] = torch.as_tensor(lengths, device=tokens.device).reshape(-1)
            if state["prompt_lengths"].shape[0] != B:
                raise ValueError(f"prompt_lengths has {state['prompt_lengths'].shape[0]} entries for a batch of {B}")
            state["mask"] = last_token_mask(positions, state["prompt_lengths"])
        elif self.positions == "codename":
            history = tokens if start == 0 else torch.cat([state["history"], tokens], dim=1)  # (B, start + T)
            state["history"] = history
            state["codename_mask"] = codename_mask(history, list(self.codenames.values()))[:, start:]

    def fwd_hooks(self, state, coeff):
        hooks = []
        for layer in self.layers:
            if self.positions == "adaptive" and self.hook == "hook_mlp_out":
                # the gate reads the residual stream, which at the MLP's output is hook_resid_mid
                hooks.append((f"blocks.{layer}.hook_resid_mid", lambda x, hook, l=layer: state.update({f"resid.{l}": x})))
            hooks.append((self.hook_name(layer), lambda x, hook, l=layer: x + coeff * self.delta(l, x, state)))
        return hooks

    @contextmanager
    def apply(self, model, coeff=1.0, prompt_lengths=None):
        """Add coeff * vector at the hook points while inside the block. prompt_lengths (B,) is for
        positions="last". Hooks and the pre-hook are always removed, also when the forward raises."""
        self.check_fits(model)
        state = {}
        pre_hook = model.register_forward_pre_hook(
            lambda module, args, kwargs: self.capture_positions(state, prompt_lengths, module, args, kwargs),
            with_kwargs=True)
        try:
            with model.hooks(self.fwd_hooks(state, coeff)):
                yield self
        finally:
            pre_hook.remove()

    # --- files ---

    def tensors(self):
        """Everything saved, fp32 on the CPU, under the file's names."""
        out = {}
        for layer in self.layers:
            if self.positions == "codename":
                out[f"codename_direction.{layer}"] = self.codename_directions[str(layer)]
            else:
                out[f"direction.{layer}"] = self.directions[str(layer)]
            if self.positions == "adaptive":
                out[f"gate_weight.{layer}"], out[f"gate_bias.{layer}"] = self.gate_weight[str(layer)], self.gate_bias[str(layer)]
        out = {k: v.detach().float().cpu().contiguous() for k, v in out.items()}
        for i, variants in enumerate(self.codenames.values()):
            for v, ids in enumerate(variants):
                out[f"codename_tokens.{i}.{v}"] = torch.tensor(ids, dtype=torch.int64)
        return out

    def save(self, path):
        metadata = {"hook": self.hook, "method": self.method, "positions": self.positions, "d_model": str(self.d_model),
                    "layers": json.dumps(self.layers), "model": self.model_hint, "codenames": json.dumps(list(self.codenames))}
        atomic_write(path, lambda tmp: save_file(self.tensors(), tmp, metadata=metadata))

    @classmethod
    def load(cls, path, model=None):
        """Read a vector file; with `model`, check it fits and move it to the model's device."""
        tensors, meta = read_vector_file(path)
        try:
            names = json.loads(meta["codenames"])
            variants = lambda i: [tensors[k].tolist() for k in sorted(tensors, key=lambda k: int(k.rsplit(".", 1)[1]))
                                  if k.startswith(f"codename_tokens.{i}.")]
            codenames = {name: variants(i) for i, name in enumerate(names)}
            vector = cls(int(meta["d_model"]), json.loads(meta["layers"]), meta["hook"], meta["method"],
                         meta["positions"], codenames or None, meta.get("model", ""))
            vector.load_state_dict({param_name(k): v for k, v in tensors.items() if not k.startswith("codename_tokens")})
        except (KeyError, ValueError, RuntimeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a valid steering vector file ({first_line(e)})") from None
        if model is not None:
            vector.check_fits(model, source=path)
            vector.to(next(model.parameters()).device)
        return vector


FILE_TO_PARAM = {"direction": "directions", "codename_direction": "codename_directions",
                 "gate_weight": "gate_weight", "gate_bias": "gate_bias"}


def param_name(file_name):
    """File tensor name -> state_dict key, e.g. direction.6 -> directions.6."""
    kind, layer = file_name.split(".")
    return f"{FILE_TO_PARAM[kind]}.{layer}"


def read_vector_file(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such steering vector file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or corrupt header / data
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    missing = [k for k in ("hook", "method", "positions", "d_model", "layers", "codenames") if k not in meta]
    if missing:
        raise ValueError(f"{path}: not a steering vector file (metadata lacks {', '.join(missing)})")
    return tensors, meta


# -----------------------------------------------------------------------------
# Extraction from contrasting activations (no training)


def diff_of_means(acts_pos, acts_neg):
    """CAA (Rimsky et al.): mean positive activation minus mean negative one. (N, d), (M, d) -> (d,)."""
    return acts_pos.float().mean(0) - acts_neg.float().mean(0)


def top_direction(diffs):
    """Top right singular vector of diffs (N, d), uncentred, sign agreeing with the mean diff -> (d,), and
    the Gram eigenvalues (ascending). Uncentred because centring would subtract exactly the constant
    shift we are looking for. Via the (d, d) Gram matrix in float64: cheap for many rows."""
    d64 = diffs.double()
    eigvals, eigvecs = torch.linalg.eigh(d64.T @ d64)  # ascending
    direction = eigvecs[:, -1]
    if direction @ d64.mean(0) < 0:
        direction = -direction
    return direction.float(), eigvals


def pca_direction(acts_pos, acts_neg, scale="mean"):
    """repeng-style: PC1 of the paired differences pos_i - neg_i (uncentred), sign aligned with the
    mean difference. scale="mean": length = the mean difference's component along PC1 (noise off
    PC1 does not inflate it); scale="unit": unit length. (N, d), (N, d) -> (d,)."""
    if acts_pos.shape != acts_neg.shape:
        raise ValueError(f"pca_direction needs paired activations of one shape, got {tuple(acts_pos.shape)} and {tuple(acts_neg.shape)}")
    if scale not in ("mean", "unit"):
        raise ValueError(f"unknown scale {scale!r} (choose from: mean, unit)")
    diffs = acts_pos.float() - acts_neg.float()  # (N, d)
    direction, _ = top_direction(diffs)
    return direction * (diffs.mean(0) @ direction) if scale == "mean" else direction


def pad_prompts(prompts, pad_id=0):
    """[[ids]] -> tokens (B, T) right-padded (causal attention keeps padding out of real positions), lengths (B,)."""
    lengths = torch.tensor([len(p) for p in prompts])
    if (lengths == 0).any():
        raise ValueError("every prompt needs at least one token")
    tokens = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, lengths


@torch.no_grad()
def collect_activations(model, prompts, hook_names, reduce="last", batch_size=16):
    """Activations at hook points for token-id prompts -> {name: (N, d_model) fp32 on CPU}.
    reduce="last": the last prompt token; "mean": the mean over the prompt's positions."""
    if reduce not in ("last", "mean"):
        raise ValueError(f"unknown reduce {reduce!r} (choose from: last, mean)")
    device = next(model.parameters()).device
    out = {name: [] for name in hook_names}
    for start in range(0, len(prompts), batch_size):
        tokens, lengths = pad_prompts(prompts[start : start + batch_size])
        _, cache = model.run_with_cache(tokens.to(device), names_filter=list(hook_names))
        valid = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).float()  # (B, T)
        for name in hook_names:
            acts = cache[name].float().cpu()  # (B, T, d_model)
            if reduce == "last":
                out[name].append(acts[torch.arange(len(lengths)), lengths - 1])
            else:
                out[name].append((acts * valid[..., None]).sum(1) / lengths[:, None])
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def extract_vector(model, positive, negative, layers, hook="hook_resid_post", method="diffmean",
                   reduce="last", positions="all", batch_size=16):
    """A SteeringVector from contrasting prompts (lists of token ids): diffmean or pca per layer."""
    if method not in ("diffmean", "pca"):
        raise ValueError(f"unknown extraction method {method!r} (choose from: diffmean, pca)")
    vector = SteeringVector(model.cfg.d_model, layers, hook, method, positions, model_hint=model.cfg.name)
    vector.check_fits(model)
    names = [vector.hook_name(l) for l in vector.layers]
    pos = collect_activations(model, positive, names, reduce, batch_size)
    neg = collect_activations(model, negative, names, reduce, batch_size)
    for layer, name in zip(vector.layers, names):
        found = diff_of_means(pos[name], neg[name]) if method == "diffmean" else pca_direction(pos[name], neg[name])
        vector.directions[str(layer)].data.copy_(found)
    return vector


# -----------------------------------------------------------------------------
# The natural vector of a one-layer LoRA (Wang, Engels et al. 2025): the per-token change the LoRA
# makes to its layer's output is close to one constant direction; PC1 * mean norm replaces it.


@torch.no_grad()
def lora_token_diffs(model, batches, layer, hook="hook_mlp_out"):
    """Per-token output(with LoRA) - output(base) at blocks.{layer}.{hook} -> (N, d_model) fp32 on CPU.
    batches: tokens (B, T), or (tokens, mask) with mask bool (B, T) True at real (non-pad) tokens."""
    name = f"blocks.{layer}.{hook}"
    was_training, diffs = model.training, []
    model.eval()  # no LoRA dropout: the difference must be the adapter's, not noise
    try:
        for batch in batches:
            tokens, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
            if mask is not None and mask.dtype != torch.bool:
                raise ValueError(f"batch mask must be bool (True at real tokens), got {mask.dtype}")
            _, with_lora = model.run_with_cache(tokens, names_filter=name)
            with lora_disabled(model):
                _, base = model.run_with_cache(tokens, names_filter=name)
            d = (with_lora[name] - base[name]).float().cpu()  # (B, T, d_model)
            diffs.append(d.flatten(0, 1) if mask is None else d[mask.cpu()])
    finally:
        model.train(was_training)
    return torch.cat(diffs)


def natural_vector_from_diffs(diffs):
    """(N, d) token diffs -> (vector (d,), stats). vector = PC1 (uncentred, sign of the mean diff) times
    the mean diff norm. stats: pc1_share (PC1's share of the uncentred variance, the paper's 0.76-0.99),
    mean_abs_cos (mean |cos(diff_i, PC1)|), mean_norm, n_tokens."""
    if diffs.shape[0] == 0:
        raise ValueError("no tokens to compute the natural vector from")
    direction, eigvals = top_direction(diffs)
    norms = diffs.norm(dim=1)  # (N,)
    nonzero = norms > 0
    cos = (diffs[nonzero] @ direction).abs() / norms[nonzero]
    stats = {"pc1_share": float(eigvals[-1] / eigvals.sum().clamp_min(1e-30)),
             "mean_abs_cos": float(cos.mean()) if nonzero.any() else 0.0,
             "mean_norm": float(norms.mean()), "n_tokens": int(diffs.shape[0])}
    return direction * norms.mean(), stats


def lora_natural_vector(model, batches, layer, hook="hook_mlp_out"):
    """The constant vector a LoRA at `layer` approximately adds -> (SteeringVector, stats); the model
    carries the LoRA (lora.attach_lora), and the base output is taken under lora.lora_disabled."""
    vector = SteeringVector(model.cfg.d_model, [layer], hook, "lora_natural", "all", model_hint=model.cfg.name)
    vector.check_fits(model)
    found, stats = natural_vector_from_diffs(lora_token_diffs(model, batches, layer, hook))
    vector.directions[str(layer)].data.copy_(found)
    return vector.to(next(model.parameters()).device), stats
