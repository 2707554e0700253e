"""
Steering vectors: a d_model vector per layer, added to the residual stream (or to an MLP's output)
through hook points, so model.py never changes and the base weights are never touched.

    vector = SteeringVector(d_model, layers=[6], hook="hook_mlp_out", positions="all")
    model.requires_grad_(False)                     # base weights: no gradients
    opt = torch.optim.Adam(vector.parameters(), lr=1e-2)
    with vector.apply(model, coeff=1.0):
        loss = answer_loss(model(tokens), targets)  # gradients reach only the vector

Where the vector is added (`positions`), each mode one class below:
    "all"       every position: the seed paper's trained and "natural" vectors, the simple case
    "from:K"    absolute positions >= K (e.g. skip a system prompt)
    "last"      only the last prompt token (lengths from apply(), else the input's last position)
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

llama.cpp control vectors (GGUF: `llama-cli --control-vector`, repeng's export_gguf):
save_control_vector, load_control_vector, `python steer.py export|import IN OUT` (last section).
"""

import argparse
import json
import os
import re
import sys
from contextlib import contextmanager

import gguf
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import lora
import tasks
from checkpoint import CheckpointError, atomic_write, first_line, gguf_field, open_gguf

# mlp.hook_out is the MLP's own output: on Gemma before its post-feedforward norm (where a down_proj
# LoRA acts, the seed paper's site), elsewhere the same as hook_mlp_out
HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "mlp.hook_out")
METHODS = ("trained", "diffmean", "pca", "lora_natural", "controlvector")
POSITION_MODES = ("all", "from:K", "last", "codename", "adaptive")


def parse_positions(positions):
    """'from:K' -> K; the other modes -> None. Bad modes are a one-line error."""
    if positions.startswith("from:"):
        k = positions[len("from:") :]
        if not k.isdigit():
            raise ValueError(f"positions {positions!r}: K in 'from:K' must be an integer >= 0")
        return int(k)
    if positions not in POSITION_MODES:
        modes = ", ".join(POSITION_MODES)
        raise ValueError(f"unknown positions mode {positions!r} (choose from: {modes})")
    return None


# -----------------------------------------------------------------------------
# Masks computed from the input tokens


def codename_mask(tokens, codenames):
    """tokens (B, N), codenames [[variant ids, ...] per codename] -> (B, N, C) float, 1 at every
    token of every occurrence of any variant of codename c. A word tokenizes differently after a
    space and after '(' (' kzx' vs 'kzx'), hence variants. Multi-token codenames are steered on all
    their tokens."""
    B, N = tokens.shape
    mask = torch.zeros(B, N, len(codenames), device=tokens.device)  # (B, N, C)
    for c, variants in enumerate(codenames):
        for ids in variants:
            m = len(ids)
            if m > N:
                continue
            pattern = torch.tensor(ids, device=tokens.device)
            # (B, N - m + 1): 1 where an occurrence starts
            starts = (tokens.unfold(1, m, 1) == pattern).all(-1).float()
            for k in range(m):
                mask[:, k : k + N - m + 1, c] += starts
    return mask.clamp(max=1.0)  # overlapping occurrences of one codename still steer once


def last_token_mask(positions, prompt_lengths):
    """positions (T,) absolute, prompt_lengths (B,) -> (B, T) float, 1 at position length - 1."""
    return (positions[None, :] == (prompt_lengths[:, None] - 1)).float()


def continued_rows(saved, n_rows):
    """A per-row tensor saved at a KV cache's start, for a later forward of n_rows rows. A cache
    of G rows may be continued by G * k rows (model.LayerCache.repeat_rows: k options or samples
    of each prompt, consecutive), so each saved row is repeated k times."""
    G = saved.shape[0]
    if n_rows % G:
        raise ValueError(f"a batch of {n_rows} rows cannot continue a KV cache of {G} rows")
    return saved.repeat_interleave(n_rows // G, dim=0)


def forward_inputs(args, kwargs):
    """(tokens (B, T), start) of a Transformer forward call; start > 0 after a KV cache."""
    tokens = args[0] if args else kwargs["tokens"]
    cache = args[1] if len(args) > 1 else kwargs.get("cache")
    start = len(cache[0]) if cache else 0
    return tokens, start


# -----------------------------------------------------------------------------
# Position modes: what a vector trains and where along the sequence it is added, one class per
# mode. apply() makes one instance per `with` block; read_tokens() sees each forward's input before
# the model runs (so model.py knows nothing of steering), delta() is what a layer's hook adds.


class Placement:
    """The interface of a position mode; its defaults are the plain case: one vector per layer."""

    @staticmethod
    def parameter_shapes(d_model, n_codenames):
        """{parameter name: its shape at each layer}."""
        return {"directions": (d_model,)}

    def __init__(self, vector, prompt_lengths=None):
        self.vector = vector

    def read_tokens(self, tokens, start):
        """tokens (B, T) of this forward; start = the number of tokens already in a KV cache."""

    def capture_hooks(self):
        """Extra (hook name, fn) pairs that must run before the steering hooks."""
        return []

    def delta(self, layer, x):
        """What is added to the activation x (B, T, d_model) at `layer`, broadcastable to x."""
        raise NotImplementedError

    def direction(self, layer, x):
        return self.vector.directions[str(layer)].to(x)  # (d_model,)


class AllPositions(Placement):
    """'all': one constant vector, added at every position."""

    def delta(self, layer, x):
        return self.direction(layer, x)


class FromPosition(Placement):
    """'from:K': positions >= K, counted from the start of the sequence (KV cache included)."""

    def __init__(self, vector, prompt_lengths=None):
        super().__init__(vector)
        self.first = vector.from_position

    def read_tokens(self, tokens, start):
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)  # (T,)
        self.mask = (positions >= self.first).float()

    def delta(self, layer, x):
        return self.mask[:, None].to(x) * self.direction(layer, x)  # (T, d_model)


class LastToken(Placement):
    """'last': the last prompt token only. A new sequence (start 0) fixes the prompt lengths, from
    apply(prompt_lengths=...) or else the input's length; tokens generated later are not steered."""

    def __init__(self, vector, prompt_lengths=None):
        super().__init__(vector)
        self.given_lengths = prompt_lengths

    def read_tokens(self, tokens, start):
        B, T = tokens.shape
        if start == 0:
            lengths = self.given_lengths if self.given_lengths is not None else [T] * B
            self.lengths = torch.as_tensor(lengths, device=tokens.device).reshape(-1)  # (B,)
            if self.lengths.shape[0] != B:
                n = self.lengths.shape[0]
                raise ValueError(f"prompt_lengths has {n} entries for a batch of {B}")
        self.lengths = continued_rows(self.lengths, B)
        positions = torch.arange(start, start + T, device=tokens.device)  # (T,)
        self.mask = last_token_mask(positions, self.lengths)  # (B, T)

    def delta(self, layer, x):
        return self.mask[..., None].to(x) * self.direction(layer, x)  # (B, T, d_model)


class Codenames(Placement):
    """'codename': one vector per codename, at the tokens of its occurrences. With a KV cache the
    codenames are matched in the whole token history; a codename cut by the cache boundary steers
    only its tokens in the later call (the earlier ones are already in the cache)."""

    @staticmethod
    def parameter_shapes(d_model, n_codenames):
        return {"codename_directions": (n_codenames, d_model)}

    def __init__(self, vector, prompt_lengths=None):
        super().__init__(vector)
        self.variants = list(vector.codenames.values())  # [[token ids, ...] per codename]

    def read_tokens(self, tokens, start):
        if start == 0:
            self.history = tokens
        else:
            history = continued_rows(self.history, tokens.shape[0])
            self.history = torch.cat([history, tokens], dim=1)  # (B, start + T)
        self.mask = codename_mask(self.history, self.variants)[:, start:]  # (B, T, C)

    def delta(self, layer, x):
        vectors = self.vector.codename_directions[str(layer)].to(x)  # (C, d_model)
        return self.mask.to(x) @ vectors  # (B, T, C) @ (C, d_model) -> (B, T, d_model)


class Adaptive(Placement):
    """'adaptive': every position, scaled by a gate 2 * sigmoid(w . r + b) learned from the residual
    stream r there. At hook_mlp_out the residual stream is hook_resid_mid, read by a capture hook;
    at the residual hooks it is the activation itself."""

    @staticmethod
    def parameter_shapes(d_model, n_codenames):
        return {"directions": (d_model,), "gate_weight": (d_model,), "gate_bias": (1,)}

    def __init__(self, vector, prompt_lengths=None):
        super().__init__(vector)
        self.resid = {}  # {layer: (B, T, d_model)} captured in this forward

    def capture_hooks(self):
        if self.vector.hook != "hook_mlp_out":
            return []
        layers = self.vector.layers
        return [(gate_site(self.vector, layer), self.capture(layer)) for layer in layers]

    def capture(self, layer):
        def save(x, hook):
            self.resid[layer] = x

        return save

    def delta(self, layer, x):
        gate = adaptive_gate(self.vector, layer, self.resid.pop(layer, x))  # (B, T)
        return gate[..., None] * self.direction(layer, x)  # (B, T, d_model)


def gate_site(vector, layer):
    """The hook whose activation an adaptive vector's gate at `layer` reads: the residual stream
    (hook_resid_mid beside hook_mlp_out), or the steered activation itself, before the vector."""
    if vector.hook == "hook_mlp_out":
        return f"blocks.{layer}.hook_resid_mid"
    return vector.hook_name(layer)


def adaptive_gate(vector, layer, resid):
    """The adaptive scale 2 * sigmoid(w . r + b) at every position: resid (B, T, d_model) read at
    gate_site -> (B, T), in (0, 2)."""
    weight = vector.gate_weight[str(layer)].to(resid)  # (d_model,)
    bias = vector.gate_bias[str(layer)].to(resid)  # (1,)
    return 2 * torch.sigmoid(resid @ weight + bias)


PLACEMENTS = {
    "all": AllPositions,
    "from:K": FromPosition,
    "last": LastToken,
    "codename": Codenames,
    "adaptive": Adaptive,
}


# -----------------------------------------------------------------------------
# The steering vector


def zero_parameters(layers, *shape):
    """{str(layer): a zero Parameter of `shape`}: a vector starts as a no-op."""
    return nn.ParameterDict({str(layer): nn.Parameter(torch.zeros(*shape)) for layer in layers})


def as_variants(ids):
    """A codename's token ids as a list of alternative sequences: [3, 4] -> [[3, 4]]."""
    ids = list(ids)
    sequences = [ids] if ids and isinstance(ids[0], int) else ids
    return [[int(i) for i in sequence] for sequence in sequences]


class SteeringVector(nn.Module):
    """The parameters, declared by the position mode's class, are ParameterDicts keyed by
    str(layer): `directions` (d_model,), or `codename_directions` (n_codenames, d_model) in codename
    mode; adaptive mode adds `gate_weight` (d_model,) and `gate_bias` (1,)."""

    def __init__(self, d_model, layers, hook="hook_mlp_out", method="trained", positions="all",
                 codenames=None, model_hint=""):
        """layers: block indices; codenames: {name: token ids, or a list of alternative token-id
        sequences}, required by positions="codename"."""
        super().__init__()
        if hook not in HOOKS:
            raise ValueError(f"unknown hook {hook!r} (choose from: {', '.join(HOOKS)})")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} (choose from: {', '.join(METHODS)})")
        layers = sorted({int(layer) for layer in layers})
        if not layers or layers[0] < 0:
            raise ValueError(f"layers must be a non-empty list of block indices >= 0, got {layers}")
        self.from_position = parse_positions(positions)
        if (positions == "codename") != bool(codenames):
            raise ValueError("positions='codename' needs codenames={name: token ids}, "
                             "and codenames need positions='codename'")
        self.codenames = {name: as_variants(ids) for name, ids in (codenames or {}).items()}
        if not all(variants and all(variants) for variants in self.codenames.values()):
            raise ValueError("every codename needs at least one token id")
        self.d_model = d_model
        self.layers = layers
        self.hook = hook
        self.method = method
        self.positions = positions
        self.model_hint = model_hint
        mode = "from:K" if self.from_position is not None else positions
        self.placement_class = PLACEMENTS[mode]
        shapes = self.placement_class.parameter_shapes(d_model, len(self.codenames))
        for name, shape in shapes.items():
            setattr(self, name, zero_parameters(layers, *shape))

    def extra_repr(self):
        return (f"d_model={self.d_model}, layers={self.layers}, hook={self.hook}, "
                f"method={self.method}, positions={self.positions}")

    def hook_name(self, layer):
        return f"blocks.{layer}.{self.hook}"

    def check_fits(self, model, source="steering vector"):
        if model.cfg.d_model != self.d_model:
            raise ValueError(f"{source}: vector has d_model={self.d_model} "
                             f"but the model has d_model={model.cfg.d_model}")
        try:
            model.cfg.check_layers(self.layers)
        except ValueError as e:
            raise ValueError(f"{source}: vector steers {first_line(e)}") from None

    @contextmanager
    def apply(self, model, coeff=1.0, prompt_lengths=None):
        """Add coeff * vector at the hook points while inside the block. prompt_lengths (B,) is for
        positions="last". The hooks are always removed, also when the forward raises."""
        self.check_fits(model)
        placement = self.placement_class(self, prompt_lengths)

        def read_tokens(module, args, kwargs):
            placement.read_tokens(*forward_inputs(args, kwargs))

        def adder(layer):
            def add(x, hook):
                return x + coeff * placement.delta(layer, x)

            return add

        steering = [(self.hook_name(layer), adder(layer)) for layer in self.layers]
        # only the modes that read token ids hook the model's input: a forward that starts from a
        # residual stream (start_at_layer, as analyze's patching does) has none to give them
        reads_tokens = type(placement).read_tokens is not Placement.read_tokens
        pre_hook = None
        if reads_tokens:
            pre_hook = model.register_forward_pre_hook(read_tokens, with_kwargs=True)
        try:
            with model.hooks(placement.capture_hooks() + steering):
                yield self
        finally:
            if pre_hook is not None:
                pre_hook.remove()

    # --- files ---

    def tensors(self):
        """Everything saved, fp32 on the CPU, under the file's names."""
        out = {}
        for name, tensor in self.state_dict().items():
            out[file_name(name)] = tensor.detach().float().cpu().contiguous()
        for i, variants in enumerate(self.codenames.values()):
            for v, ids in enumerate(variants):
                out[f"codename_tokens.{i}.{v}"] = torch.tensor(ids, dtype=torch.int64)
        return out

    def save(self, path):
        metadata = {
            "hook": self.hook,
            "method": self.method,
            "positions": self.positions,
            "d_model": str(self.d_model),
            "layers": json.dumps(self.layers),
            "model": self.model_hint,
            "codenames": json.dumps(list(self.codenames)),
        }
        atomic_write(path, lambda tmp: save_file(self.tensors(), tmp, metadata=metadata))

    @classmethod
    def load(cls, path, model=None):
        """Read a vector file; with `model`, check it fits and move it to the model's device."""
        tensors, meta = read_vector_file(path)
        try:
            names = json.loads(meta["codenames"])
            codenames = {name: codename_variants(tensors, i) for i, name in enumerate(names)}
            vector = cls(
                int(meta["d_model"]),
                json.loads(meta["layers"]),
                hook=meta["hook"],
                method=meta["method"],
                positions=meta["positions"],
                codenames=codenames or None,
                model_hint=meta.get("model", ""),
            )
            params = {param_name(k): v for k, v in tensors.items() if not is_codename_tokens(k)}
            vector.load_state_dict(params)
        except (KeyError, ValueError, RuntimeError, json.JSONDecodeError) as e:
            message = f"not a valid steering vector file ({first_line(e)})"
            raise ValueError(f"{path}: {message}") from None
        if model is not None:
            vector.check_fits(model, source=path)
            vector.to(next(model.parameters()).device)
        return vector


PARAM_TO_FILE = {
    "directions": "direction",
    "codename_directions": "codename_direction",
    "gate_weight": "gate_weight",
    "gate_bias": "gate_bias",
}
FILE_TO_PARAM = {file: param for param, file in PARAM_TO_FILE.items()}


def file_name(param_name):
    """state_dict key -> file tensor name, e.g. directions.6 -> direction.6."""
    kind, layer = param_name.split(".")
    return f"{PARAM_TO_FILE[kind]}.{layer}"


def param_name(file_name):
    """File tensor name -> state_dict key, e.g. direction.6 -> directions.6."""
    kind, layer = file_name.split(".")
    return f"{FILE_TO_PARAM[kind]}.{layer}"


def is_codename_tokens(file_name):
    return file_name.startswith("codename_tokens.")


def codename_variants(tensors, index):
    """The token-id sequences stored for codename `index`, in variant order."""
    prefix = f"codename_tokens.{index}."
    numbered = {}  # {variant number: token ids}
    for name, ids in tensors.items():
        if name.startswith(prefix):
            numbered[int(name[len(prefix) :])] = ids.tolist()
    return [numbered[v] for v in sorted(numbered)]


def read_vector_file(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such steering vector file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or corrupt header / data
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    required = ("hook", "method", "positions", "d_model", "layers", "codenames")
    missing = ", ".join(k for k in required if k not in meta)
    if missing:
        raise ValueError(f"{path}: not a steering vector file (metadata lacks {missing})")
    return tensors, meta


# -----------------------------------------------------------------------------
# Extraction from contrasting activations (no training)


def diff_of_means(acts_pos, acts_neg):
    """CAA (Rimsky et al.): mean positive activation minus mean negative one.
    (N, d), (M, d) -> (d,)."""
    return acts_pos.float().mean(0) - acts_neg.float().mean(0)


def top_direction(diffs):
    """Top right singular vector of diffs (N, d), uncentred, sign agreeing with the mean diff ->
    (d,), and the Gram eigenvalues (ascending). Uncentred because centring would subtract exactly
    the constant shift we are looking for. Via the (d, d) Gram matrix in float64: cheap for many
    rows."""
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
        shapes = f"{tuple(acts_pos.shape)} and {tuple(acts_neg.shape)}"
        raise ValueError(f"pca_direction needs paired activations of one shape, got {shapes}")
    if scale not in ("mean", "unit"):
        raise ValueError(f"unknown scale {scale!r} (choose from: mean, unit)")
    diffs = acts_pos.float() - acts_neg.float()  # (N, d)
    direction, _ = top_direction(diffs)
    return direction * (diffs.mean(0) @ direction) if scale == "mean" else direction


@torch.no_grad()
def collect_activations(model, prompts, hook_names, reduce="last", batch_size=16):
    """Activations at hook points for token-id prompts -> {name: (N, d_model) fp32 on CPU}.
    reduce="last": the last prompt token; "mean": the mean over the prompt's positions."""
    if reduce not in ("last", "mean"):
        raise ValueError(f"unknown reduce {reduce!r} (choose from: last, mean)")
    device = next(model.parameters()).device
    out = {name: [] for name in hook_names}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        if not all(chunk):
            raise ValueError("every prompt needs at least one token")
        tokens = tasks.right_pad(chunk, 0)  # (B, T)
        lengths = torch.tensor([len(p) for p in chunk])  # (B,)
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
    extract = diff_of_means if method == "diffmean" else pca_direction
    vector = SteeringVector(
        model.cfg.d_model,
        layers,
        hook=hook,
        method=method,
        positions=positions,
        model_hint=model.cfg.name,
    )
    vector.check_fits(model)
    names = [vector.hook_name(layer) for layer in vector.layers]
    pos = collect_activations(model, positive, names, reduce, batch_size)
    neg = collect_activations(model, negative, names, reduce, batch_size)
    for layer, name in zip(vector.layers, names):
        vector.directions[str(layer)].data.copy_(extract(pos[name], neg[name]))
    return vector


# -----------------------------------------------------------------------------
# The natural vector of a one-layer LoRA (Wang, Engels et al. 2025): the per-token change the LoRA
# makes to its layer's output is close to one constant direction; PC1 * mean norm replaces it.


@torch.no_grad()
def lora_token_diffs(model, batches, layer, hook="hook_mlp_out"):
    """Per-token output(with block `layer`'s LoRA) - output(without it) at blocks.{layer}.{hook}
    -> (N, d_model) fp32 on CPU. Adapters in other blocks stay on in both runs, so the difference
    is this block's adapter alone. batches: tokens (B, T), or (tokens, mask) with mask bool (B, T)
    True at real tokens."""
    if not any(lora.layer_of(path) == layer for path in lora.lora_modules(model)):
        raise ValueError(f"block {layer} has no LoRA module: nothing to take a natural vector of")
    name = f"blocks.{layer}.{hook}"
    was_training = model.training
    diffs = []
    model.eval()  # no LoRA dropout: the difference must be the adapter's, not noise
    try:
        for batch in batches:
            tokens, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
            if mask is not None and mask.dtype != torch.bool:
                raise ValueError(f"batch mask must be bool (True at real tokens), got {mask.dtype}")
            _, with_lora = model.run_with_cache(tokens, names_filter=name)
            with lora.lora_disabled(model, layers=[layer]):
                _, base = model.run_with_cache(tokens, names_filter=name)
            d = (with_lora[name] - base[name]).float().cpu()  # (B, T, d_model)
            diffs.append(d.flatten(0, 1) if mask is None else d[mask.cpu()])
    finally:
        model.train(was_training)
    return torch.cat(diffs)


def natural_vector_from_diffs(diffs):
    """(N, d) token diffs -> the natural vector (d,): PC1 (uncentred, sign of the mean diff) times
    the mean diff norm. How well one direction describes the diffs (PC1 share, |cos|, the sign per
    token) is analyze.py's lora_vs_steering."""
    if diffs.shape[0] == 0:
        raise ValueError("no tokens to compute the natural vector from")
    direction, _ = top_direction(diffs)
    return direction * diffs.norm(dim=1).mean()


def lora_natural_vector(model, batches, layer, hook="hook_mlp_out"):
    """The constant vector a LoRA at `layer` approximately adds -> SteeringVector; the model carries
    the LoRA (lora.attach_lora); the output without it is taken with only this block's adapters
    switched off (lora.lora_disabled(model, layers=[layer]))."""
    vector = SteeringVector(model.cfg.d_model, [layer], hook=hook, method="lora_natural",
                            model_hint=model.cfg.name)
    vector.check_fits(model)
    found = natural_vector_from_diffs(lora_token_diffs(model, batches, layer, hook))
    vector.directions[str(layer)].data.copy_(found)
    return vector.to(next(model.parameters()).device)


# -----------------------------------------------------------------------------
# llama.cpp control vectors: the GGUF file `llama-cli --control-vector FILE` reads and repeng's
# export_gguf writes. llama.cpp adds `direction.N` to the output of block N (its l_out, after the
# FFN's residual add) at every position: our blocks.N.hook_resid_post, positions "all". Its loader
# (common/common.cpp, common_control_vector_load_one) reads only the tensors, and rejects the file
# unless each is named direction.N with N >= 1 (it keeps no vector for block 0's output), is F32
# and 1-D, all of one length; a block given twice, or in several files, is summed. The metadata
# (general.architecture, controlvector.model_hint, .layer_count) is for people and repeng.

CONTROL_VECTOR_ARCH = "controlvector"
DIRECTION_NAME = re.compile(r"direction\.([0-9]+)")


def control_vector_block(hook, layer):
    """The block N whose output gets what `hook` at block `layer` adds. resid_pre of block l is
    block l - 1's output; hook_mlp_out is read only by the block's residual add, so adding v there
    adds v to the block's output (equal up to float rounding)."""
    return layer - 1 if hook == "hook_resid_pre" else layer


def export_problem(vector):
    """Why llama.cpp cannot add `vector` where apply() adds it, or None if it can."""
    if vector.positions != "all" and vector.from_position != 0:
        return (f"positions={vector.positions!r}, but llama.cpp adds a control vector at every "
                "position: train or extract it with positions='all'")
    if vector.hook == "mlp.hook_out":
        return ("mlp.hook_out is the MLP's output before Gemma's post-feedforward norm, not a "
                "constant added to the residual stream: train at hook_mlp_out or hook_resid_post")
    for layer in vector.layers:
        block = control_vector_block(vector.hook, layer)
        if block < 1:
            site = "the embeddings" if block < 0 else "block 0's output"
            first = 1 + layer - block  # the first block whose vector lands at direction.1
            return (f"{vector.hook} at block {layer} adds to {site}, which llama.cpp never steers "
                    f"(it rejects direction.0): use blocks >= {first}")
    return None


def save_control_vector(vector, path, model_hint=None):
    """Write `vector` as a llama.cpp control vector (GGUF), as it is: llama.cpp scales it when it
    loads it (`--control-vector-scaled FILE S` adds what apply(model, coeff=S) adds). model_hint
    (default: the vector's) is only a label. A vector llama.cpp cannot add where we do is a
    one-line ValueError saying what would work."""
    problem = export_problem(vector)
    if problem:
        raise ValueError(f"{path}: cannot export as a llama.cpp control vector: {problem}")
    hint = vector.model_hint if model_hint is None else model_hint
    directions = {}  # {block N: fp32 numpy (d_model,)}
    for layer in vector.layers:
        direction = vector.directions[str(layer)].detach().float().cpu()
        directions[control_vector_block(vector.hook, layer)] = direction.numpy()

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, CONTROL_VECTOR_ARCH)  # sets general.architecture
        try:
            writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", hint)
            writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(directions))
            for block, direction in directions.items():
                writer.add_tensor(f"direction.{block}", direction)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write)


def read_direction(tensor, path):
    """One GGUF tensor -> (block N, fp32 (n_embd,)), under llama.cpp's loader's rules."""
    match = DIRECTION_NAME.fullmatch(tensor.name)
    if not match:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} is not a direction.N "
                              "(llama.cpp rejects any other tensor)")
    block = int(match.group(1))
    if block == 0:
        raise CheckpointError(f"{path}: direction.0: llama.cpp never steers block 0's output "
                              "and rejects the file")
    if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
        raise CheckpointError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, "
                              "llama.cpp reads only F32 directions")
    if any(n != 1 for n in tensor.shape[1:]):  # ggml's dimensions, where trailing 1s don't count
        shape = "x".join(str(n) for n in tensor.shape)
        raise CheckpointError(f"{path}: {tensor.name} has shape {shape}, llama.cpp reads only "
                              "1-D directions")
    return block, torch.tensor(tensor.data).float().reshape(-1)


def read_directions(reader, path):
    """{block N: fp32 (n_embd,)} of a control vector file; a block given twice is summed, as
    llama.cpp sums it (two tensors may name one block: direction.5 and direction.05)."""
    directions = {}
    first = None  # (name, length) of the first tensor: every other must have its length
    for tensor in reader.tensors:
        block, values = read_direction(tensor, path)
        first = first or (tensor.name, len(values))
        if len(values) != first[1]:
            raise CheckpointError(f"{path}: {tensor.name} has {len(values)} values but "
                                  f"{first[0]} has {first[1]} (one n_embd per file)")
        directions[block] = directions.get(block, 0) + values
    if not directions:
        raise CheckpointError(f"{path}: no direction.N tensors (llama.cpp rejects the file)")
    return directions


def load_control_vector(path, model=None):
    """A llama.cpp control vector (GGUF) -> SteeringVector at hook_resid_post, positions "all",
    method "controlvector": direction.N steers block N's output, as in llama.cpp. A file
    llama.cpp would reject, or one not made for it (general.architecture), is a one-line
    CheckpointError; with `model`, check it fits and move it to the model's device (llama.cpp
    would ignore directions past the last block; we refuse them)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such control vector file")
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch != CONTROL_VECTOR_ARCH:
        raise CheckpointError(f"{path}: general.architecture is {arch!r}, not "
                              f"{CONTROL_VECTOR_ARCH!r}: not a control vector")
    directions = read_directions(reader, path)
    d_model = len(next(iter(directions.values())))
    hint = str(gguf_field(reader, f"{CONTROL_VECTOR_ARCH}.model_hint", ""))
    vector = SteeringVector(d_model, list(directions), hook="hook_resid_post",
                            method="controlvector", model_hint=hint)
    with torch.no_grad():
        for block, values in directions.items():
            vector.directions[str(block)].copy_(values)
    if model is not None:
        vector.check_fits(model, source=path)
        vector.to(next(model.parameters()).device)
    return vector


def main(argv=None):
    """`python steer.py export VECTOR.safetensors OUT.gguf` or `import IN.gguf OUT.safetensors`."""
    parser = argparse.ArgumentParser(description="Steering vector files to and from llama.cpp "
                                     "control vectors (GGUF, llama-cli --control-vector).")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="a steering_vector.safetensors -> a .gguf")
    export.add_argument("vector", help="a steering vector file (train.py's run directory)")
    export.add_argument("out", help="the control vector to write (.gguf)")
    export.add_argument("--model-hint", help="the controlvector.model_hint label "
                        "(default: the vector's own)")
    load = commands.add_parser("import", help="a control vector .gguf -> a .safetensors")
    load.add_argument("vector", help="a control vector (.gguf)")
    load.add_argument("out", help="the steering vector file to write (.safetensors)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            vector = SteeringVector.load(args.vector)
            save_control_vector(vector, args.out, args.model_hint)
        else:
            vector = load_control_vector(args.vector)
            vector.save(args.out)
    except ValueError as e:  # CheckpointError included: the file and the problem, one line
        sys.exit(f"error: {first_line(e)}")
    blocks = [control_vector_block(vector.hook, layer) for layer in vector.layers]
    names = ", ".join(f"direction.{block}" for block in blocks)
    print(f"wrote {args.out}: {names} (added to the output of blocks {blocks}), "
          f"d_model {vector.d_model}")


if __name__ == "__main__":
    main()
