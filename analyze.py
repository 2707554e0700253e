"""
The mechanistic toolkit: look inside a model, and inside a train.py run's adapter, on one prompt.
Each analysis is a function other scripts import and a subcommand that writes <analysis>.png and
<analysis>.json (the numbers it plotted, with the prompts, tokens and settings) and prints a
summary.

    python analyze.py logit_lens --run runs/persona-steer-seed0 --eval oocr --item 0
    python analyze.py attention --run runs/persona-steer-seed0 --eval in_distribution --item 2
    python analyze.py patching --run runs/persona-steer-seed0 --eval in_distribution --item 0
    python analyze.py patching --run runs/persona-steer-seed0 --eval oocr --contrast adapter
    python analyze.py attribution --run runs/persona-steer-seed0 --eval oocr_in_context --item 0
    python analyze.py read_vector --run runs/persona-steer-seed0 --coefficients=-2,-1,0,1,2
    python analyze.py sae_features --run runs/persona-steer-seed0 --sae runs/sae-persona
    python analyze.py sae_personas --run runs/persona-steer-seed0 --sae runs/sae-persona
    python analyze.py vector_lens --run runs/persona-steer-rl-all --new-tokens 8
    python analyze.py combine --run runs/rl-steer-L0 --runs runs/rl-steer-L1,runs/rl-steer-L3
    python analyze.py adaptive_scale --run runs/persona-steer-adaptive
    python analyze.py logit_lens --model smollm2-135m --prompt "The capital of France is" \\
        --token " Paris" --out runs/analysis-paris

`--run DIR` rebuilds the run's base model, tokenizer, task and adapter from its files and writes
into DIR/analysis/; `--model NAME_OR_PATH` analyses a plain checkpoint (--prompt needed). Prompts
come from the run's eval sets (--eval, --item) or from --prompt / --corrupt text; on a toy world
text is space-separated token names ("BOS ME").

Read top to bottom: the subject (a run directory or a checkpoint -> model, tokenizer, eval sets,
adapter switch) -> prompts and tokens -> logit lens -> attention patterns -> activation patching
(batched) -> attribution patching -> scoring eval items under any forward -> reading a steering
vector -> plots and files -> the analyses from the command line -> an adapter in an SAE's
features (sae.py), and the features over the SAE's corpus -> a vector's lens per layer and its
effect along a continuation -> vectors trained apart, combined -> an adaptive vector's scale per
token -> the command line (ANALYSES, the table of subcommands).
"""

import argparse
import copy
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from functools import partial

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

import lora
import sae
import steer
import tasks
import train
from checkpoint import CheckpointError, atomic_write, first_line, load_model, read_json, write_json
from model import LayerCache, LayerNorm, generate


class AnalysisError(ValueError):
    """Bad input to an analysis; the command line prints it as one line."""


# -----------------------------------------------------------------------------
# The subject: a model, its tokenizer and, from a run directory, the task's eval sets and a switch
# for the run's adapter. The model's default state is the base model.


@dataclass
class Subject:
    model: torch.nn.Module
    tokenizer: object
    name: str  # for titles: the run directory or the checkpoint
    eval_sets: dict = field(default_factory=dict)  # {name: tasks.EvalSet}; empty for a checkpoint
    adapter: str = ""  # "steer", "lora", "full", or "" for a plain checkpoint
    adapter_on: Callable = nullcontext  # a context in which the forward pass sees the adapter
    threads: int | None = None  # the run's own thread count (1 on toy models)
    config: object = None  # the run's train.TrainConfig; None for a checkpoint
    task: object = None  # the task the run trained on (its training data, pretraining documents)
    vector: object = None  # the run's steer.SteeringVector (steering runs)

    def views(self):
        """[(label, context)]: the model states an analysis shows side by side."""
        if not self.adapter:
            return [("model", nullcontext)]
        return [("base", nullcontext), (self.adapter, self.adapter_on)]

    def state(self, adapted):
        """The context of a run with (adapted=True) or without the adapter."""
        return self.adapter_on() if adapted and self.adapter else nullcontext()


def run_config(run_dir):
    """DIR/config.json -> train.TrainConfig, as the run resolved it."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise AnalysisError(f"{run_dir}: no such run directory")
    if not os.path.isfile(path):
        raise AnalysisError(f"{run_dir}: not a train.py run directory (no config.json)")
    saved = read_json(path)
    known = {f.name for f in fields(train.TrainConfig)}
    try:
        return train.TrainConfig(**{k: v for k, v in saved.items() if k in known})
    except (TypeError, ValueError) as e:
        raise AnalysisError(f"{path}: not a run's settings ({first_line(e)})") from None


def run_file(run_dir, name):
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise AnalysisError(f"{run_dir}: lacks {name} (did the run finish?)")
    return path


@contextmanager
def loaded_weights(model, state, restore):
    """The model runs with `state` inside the block and `restore` after it (a full fine-tune)."""
    model.load_state_dict(state)
    try:
        yield model
    finally:
        model.load_state_dict(restore)


@contextmanager
def lora_enabled(model):
    """The run's LoRA on inside the block; load_run leaves it off, so the default is the base."""
    modules = lora.lora_modules(model).values()
    for m in modules:
        m.enabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = False


def load_vector(run_dir, model):
    path = run_file(run_dir, "steering_vector.safetensors")
    try:
        return steer.SteeringVector.load(path, model)
    except ValueError as e:
        raise AnalysisError(first_line(e)) from None


def adapter_switch(cfg, run_dir, model, device, vector=None):
    """Attach the run's adapter to the base model -> a context that switches it on."""
    if cfg.adapter == "steer":
        return partial(vector.apply, model)
    if cfg.adapter == "lora":
        try:
            lora.load_lora(model, run_file(run_dir, "adapter"))
        except ValueError as e:
            raise AnalysisError(first_line(e)) from None
        for m in lora.lora_modules(model).values():
            m.enabled = False
        return partial(lora_enabled, model)
    tuned, _ = load_model(run_file(run_dir, "model"), device=device)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    return partial(loaded_weights, model, tuned.state_dict(), base)


def check_base_model(cfg, task):
    """A toy run's base model must be the one it was trained from: never pretrain a new one here
    (pretraining is not bit-identical across CPUs), say where it should be."""
    if cfg.model == "toy":
        path = train.toy_model_dir(cfg, task)
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            raise AnalysisError(f"the run's pretrained toy model is not at {path}: "
                                "rerun train.py with the run's settings to pretrain it")


def load_run(run_dir, device="cpu"):
    """A train.py run directory -> Subject: the base model, tokenizer and task rebuilt through
    train.py's own functions, the adapter attached from the run's files."""
    cfg = run_config(run_dir)
    task = train.make_task(cfg)
    check_base_model(cfg, task)
    torch.manual_seed(cfg.seed)  # a pretraining run's base model is this seed's fresh init
    model, tokenizer = train.base_model(cfg, task, device)
    model.eval().requires_grad_(False)
    # a control run is scored on its target's eval sets, as train.run() does
    eval_task = train.make_task(replace(cfg, task_options=train.target_options(cfg)))
    eval_sets = eval_task.eval_sets(tokenizer)
    vector = load_vector(run_dir, model) if cfg.adapter == "steer" else None
    switch = adapter_switch(cfg, run_dir, model, device, vector)
    return Subject(model, tokenizer, run_dir, eval_sets, cfg.adapter, switch, cfg.threads, cfg,
                   task, vector)


def load_checkpoint_subject(name, device="cpu"):
    model, tokenizer = load_model(name, device=device)
    if tokenizer is None:
        raise AnalysisError(f"{name}: no tokenizer files "
                            "(tokenizer.json, or vocab.json + merges.txt)")
    return Subject(model.eval().requires_grad_(False), tokenizer, name)


# -----------------------------------------------------------------------------
# Prompts and tokens


@dataclass
class Prompt:
    tokens: list  # token ids
    source: str  # "oocr[3]" or "text"
    answer: int | None = None  # the right option's first token (eval items)
    options: list = field(default_factory=list)  # every option's first token (eval items)


def as_tokens(model, tokens):
    """One prompt's token ids -> a (T,) long tensor on the model's device."""
    return torch.as_tensor(tokens, dtype=torch.long, device=next(model.parameters()).device)


def token_label(tokenizer, token_id):
    """A token as a plot label: its text with control characters escaped."""
    text = tokenizer.decode([token_id])
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def token_labels(tokenizer, ids):
    return [token_label(tokenizer, i) for i in ids]


def token_id(tokenizer, text, flag="--token"):
    """One token's text -> its id; text that is no token, or several, is an error."""
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        raise AnalysisError(f"{flag} {text!r}: {first_line(e)}") from None
    if len(ids) != 1:
        raise AnalysisError(f"{flag} {text!r} is {len(ids)} tokens {ids}, not one")
    return ids[0]


def eval_set(subject, name):
    if not subject.eval_sets:
        raise AnalysisError("--eval needs --run: a plain checkpoint has no eval sets "
                            "(give --prompt)")
    if name not in subject.eval_sets:
        raise AnalysisError(f"no eval set {name!r} (choose from: {', '.join(subject.eval_sets)})")
    return subject.eval_sets[name]


def item_prompt(subject, set_name, index):
    items = eval_set(subject, set_name).items
    if not 0 <= index < len(items):
        raise AnalysisError(f"--item {index}: eval set {set_name!r} has items 0..{len(items) - 1}")
    item = items[index]
    firsts = [option[0] for option in item.options]
    return Prompt(list(item.prompt), f"{set_name}[{index}]", firsts[item.answer], firsts)


def text_prompt(subject, text, flag="--prompt"):
    try:
        ids = subject.tokenizer.encode(text)
    except ValueError as e:
        raise AnalysisError(f"{flag}: {first_line(e)}") from None
    if not ids:
        raise AnalysisError(f"{flag} {text!r} has no tokens")
    cfg = subject.model.cfg
    if cfg.arch == "gpt2" and len(ids) > cfg.n_ctx:  # learned positions end at n_ctx
        raise AnalysisError(f"{flag} is {len(ids)} tokens; the model reads at most {cfg.n_ctx}")
    return Prompt(ids, "text")


def partner_item(subject, set_name, index):
    """The corrupted prompt by default: the next item of the same set with a prompt of the same
    length and another right answer (so the logit difference has two distinct tokens)."""
    items = eval_set(subject, set_name).items
    clean = item_prompt(subject, set_name, index)
    for step in range(1, len(items)):
        j = (index + step) % len(items)
        other = item_prompt(subject, set_name, j)
        if len(other.tokens) == len(clean.tokens) and other.answer != clean.answer:
            return other
    raise AnalysisError(f"no item of {set_name!r} has item {index}'s prompt length and another "
                        "answer: give --corrupt-item or --corrupt")


def parse_positions(text, n_positions):
    """'2,4-6' -> [2, 4, 5, 6]: one span of positions, patched together."""
    positions = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            positions += range(int(first), int(last or first) + 1)
    except ValueError:
        raise AnalysisError(f"--span {text!r}: expected positions like 3 or 2,4-6") from None
    bad = [p for p in positions if not 0 <= p < n_positions]
    if bad or not positions:
        raise AnalysisError(f"--span {text!r}: positions {bad or positions} out of range: the "
                            f"prompt has positions 0..{n_positions - 1}")
    return sorted(set(positions))


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


def lens_rows(n_layers):
    """The logit lens's row labels."""
    return [f"{l} resid_pre" for l in range(n_layers)] + [f"{n_layers - 1} resid_post"]


@torch.no_grad()
def lens_readout(model, tokens, token, position=-1, top_k=5):
    """One prompt (T,) through the logit lens -> {"prob": (L + 1, T) the token's probability,
    "rank": (L + 1, T) how many tokens are more likely (0 = the top token), "top_ids" /
    "top_probs": (L + 1, top_k) the most likely tokens at `position`}."""
    lens = logit_lens(model, as_tokens(model, tokens)[None])[:, 0].float().cpu()  # (L+1, T, V)
    probs = lens.softmax(-1)
    target = lens[..., token]  # (L + 1, T)
    rank = (lens > target[..., None]).sum(-1)  # (L + 1, T)
    top = probs[:, position].topk(min(top_k, probs.shape[-1]), dim=-1)  # (L + 1, top_k)
    return {"prob": probs[..., token], "rank": rank, "top_ids": top.indices,
            "top_probs": top.values}


def first_top_row(rank, position):
    """The first lens row where the token is the most likely one at `position`, or None."""
    rows = (rank[:, position] == 0).nonzero()
    return int(rows[0]) if len(rows) else None


# -----------------------------------------------------------------------------
# Attention patterns


@torch.no_grad()
def attention_patterns(model, tokens, layers=None):
    """One prompt (T,) -> patterns (len(layers), n_heads, T_query, T_key), rows sum to 1."""
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    _, acts = model.run_with_cache(as_tokens(model, tokens)[None], names_filter=names)
    return torch.stack([acts[n][0].float().cpu() for n in names])


# -----------------------------------------------------------------------------
# Activation patching, batched: the patched runs are copies of one prompt stacked along the batch
# dimension; one hook per hook name writes the source activation into exactly the copies (and the
# positions, and the head) that patch it there. Rows of a batch never interact, so the result
# equals one forward per patch, at a fraction of the forwards. And at a fraction of the work: a
# patch in block L at positions >= p leaves the run's input to block L, and every position before
# p at every layer, as they are in the unpatched target run, so a patched run starts at block L
# from the target's residual stream and at position p after the target's keys and values
# (model.forward's start_at_layer, with a KV cache). A patch that writes the target's own values
# is the target run, and is not run at all.

SITES = {  # site -> the hook inside every block
    "resid_pre": "hook_resid_pre",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "head": "attn.hook_z",  # (B, T, n_heads, d_head): each head's output, patched per head
}
DIRECTIONS = {
    "denoise": "clean activations into the corrupted run",
    "noise": "corrupted activations into the clean run",
}
# A block call's fixed cost (Python, kernel launches: ~0.1 ms on a CPU core, measured on the toy
# model) in FLOPs: patches of neighbouring layers share a forward where that saves more calls than
# the blocks below their own layer cost, as on short prompts, where the fixed costs dominate
BLOCK_CALL_FLOPS = 5e6


@dataclass(frozen=True)
class Patch:
    """One patched run: the source activation is written at `hook`, at `positions` (all of them
    together), and only into head `head` when it is given."""

    hook: str
    positions: tuple
    head: int | None = None


@dataclass
class Trace:
    """Unpatched runs that patched runs start from: tokens (B, T), logits (B, T, vocab), the
    activations {hook name: (B, T, ...)} of the patched hooks and of every block's input
    (hook_resid_pre), and the keys (after RoPE) and values of every layer, [(k, v)], each
    (B, n_kv_heads, T, d_head)."""

    tokens: torch.Tensor
    logits: torch.Tensor
    acts: dict
    kv: list

    def row(self, i):
        keep = slice(i, i + 1)
        acts = {name: a[keep] for name, a in self.acts.items()}
        kv = [(k[keep], v[keep]) for k, v in self.kv]
        return Trace(self.tokens[keep], self.logits[keep], acts, kv)


def logit_diff(right, wrong, position=-1):
    """The default metric: logit(right) - logit(wrong) at `position` (the last: the answer's)."""

    def metric(logits):  # (B, T, vocab) -> (B,)
        at = logits[:, position].float()
        return at[:, right] - at[:, wrong]

    return metric


def site_hook(model, site):
    """A site -> its hook inside each block. Besides the named sites, any block hook whose
    activation has positions on dim 1 (e.g. hook_resid_mid, mlp.hook_post) can be patched."""
    suffix = SITES.get(site, site)
    per_position = not suffix.endswith(("hook_attn_scores", "hook_pattern"))
    if f"blocks.0.{suffix}" not in model.hook_dict or not per_position:
        raise AnalysisError(f"unknown site {site!r}: choose {', '.join(SITES)}, or a block hook "
                            "with positions on dim 1 such as hook_resid_mid or mlp.hook_post")
    return suffix


def site_names(model, site):
    suffix = site_hook(model, site)
    return [f"blocks.{l}.{suffix}" for l in range(model.cfg.n_layers)]


def block_of(hook):
    """'blocks.3.hook_mlp_out' -> 3."""
    return int(hook.split(".")[1])


def check_spans(spans, n_positions, site):
    """None -> one span per position (or, for heads, all positions as one span)."""
    if spans is None:
        every = list(range(n_positions))
        return [every] if site == "head" else [[p] for p in every]
    if site == "head" and len(spans) != 1:
        raise AnalysisError(f"site 'head' patches one span of positions, got {len(spans)} "
                            "(on the command line: one --span, or --site without head)")
    for span in spans:
        bad = [p for p in span if not 0 <= p < n_positions]
        if bad or not span:
            raise AnalysisError(f"span {list(span)}: positions out of range (0..{n_positions - 1})")
    return [sorted(set(span)) for span in spans]


def patch_grid(model, site, spans):
    """-> one row per layer of Patches: one per span, or one per head for site 'head'."""
    rows = []
    for hook in site_names(model, site):
        if site == "head":
            rows.append([Patch(hook, tuple(spans[0]), h) for h in range(model.cfg.n_heads)])
        else:
            rows.append([Patch(hook, tuple(span)) for span in spans])
    return rows


def patch_masks(patches, source):
    """{hook name: bool mask (N, T) or (N, T, n_heads)}: where row i of the batch is patched."""
    masks = {}
    for i, patch in enumerate(patches):
        value = source[patch.hook]  # (1, T, ...)
        shape = value.shape[1:3] if patch.head is not None else value.shape[1:2]
        if patch.hook not in masks:
            masks[patch.hook] = torch.zeros(len(patches), *shape, dtype=torch.bool,
                                            device=value.device)
        index = (i, list(patch.positions)) + (() if patch.head is None else (patch.head,))
        masks[patch.hook][index] = True
    return masks


def writer(mask, value):
    """A hook that writes value (1, T, ...) where mask (N, T[, H]) is set, keeps x elsewhere."""
    mask = mask.reshape(*mask.shape, *[1] * (value.dim() - mask.dim()))  # broadcast over features

    def write(x, hook):
        return torch.where(mask, value.to(x.dtype), x)

    return write


def default_batch_size(model, n_positions):
    """Patched copies per forward: 64, fewer where (copies, T, vocab) logits would pass ~200 MB."""
    return max(1, min(64, 50_000_000 // (n_positions * model.cfg.vocab_size)))


def reads_inputs(model):
    """Whether a forward pre-hook on the model may read its input. steer.py's position modes read
    the token ids (codename, last, from:K; every mode registers the hook) and carry them from one
    forward to the next of a KV cache: a run from a residual stream, or one of several continuing
    one cache, would feed them neither."""
    return bool(model._forward_pre_hooks)


def hooked(model):
    """Whether anything else hooks the model's modules (a steering vector, frozen attention, a
    caller's hook): such a hook may assume whole sequences, e.g. (1, T, ...) replacements."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def trace_names(model, names):
    """The hooks a Trace keeps: `names`, and every block's input but the first (token ids)."""
    inputs = [f"blocks.{l}.hook_resid_pre" for l in range(1, model.cfg.n_layers)]
    return list(dict.fromkeys(list(names) + inputs))


@torch.no_grad()
def trace(model, tokens, names):
    """tokens (B, T) -> the Trace of their runs, with the activations at `names`: one forward."""
    acts = {}

    def save(x, hook):
        acts[hook.name] = x

    cache = model.new_cache()
    with model.hooks([(name, save) for name in trace_names(model, names)]):
        logits = model(tokens, cache)  # (B, T, vocab)
    return Trace(tokens, logits, acts, [(c.k, c.v) for c in cache])


def changed_positions(source, target):
    """{(hook name, head or None): [bool per position]}: where the source activation differs
    from the target run's, bit for bit (per head too where the activation has heads)."""
    changed = {}
    for name, value in source.items():
        differs = value[0] != target.acts[name][0]  # (T, ...)
        changed[name, None] = differs.flatten(1).any(-1).tolist()
        if differs.dim() == 3:  # (T, n_heads, d_head)
            for head, flags in enumerate(differs.any(-1).T.tolist()):
                changed[name, head] = flags
    return changed


def first_change(patch, changed):
    """The first position where `patch` writes something else than the target run has there;
    None for a patch that writes the target's own values (the patched run is the target run)."""
    flags = changed[patch.hook, patch.head]
    return min((p for p in patch.positions if flags[p]), default=None)


def forward_flops(n_blocks, n_rows, n_tokens, token_flops):
    """The estimated cost of a patched forward, fixed costs included."""
    return n_blocks * (BLOCK_CALL_FLOPS + token_flops * n_rows * n_tokens)


def chunked(starts, layer, batch_size):
    """starts [(first position, index)] of patches in blocks >= layer, sorted -> [(layer, first
    position, [indices])]: forwards of at most batch_size rows."""
    out = []
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        out.append((layer, chunk[0][0], [index for _, index in chunk]))
    return out


def plan_forwards(model, starts, n_positions, batch_size):
    """starts [(layer, first position, index)] of the patches to run -> [(layer, first position,
    [indices])]: the forwards that run them, each from its patches' lowest layer and first
    position. Which consecutive layers share a forward: the cheapest split by forward_flops,
    found by dynamic programming over the layers."""
    token_flops = 2 * sum(p.numel() for p in model.blocks[0].parameters())  # matmuls, per block
    layers = sorted({layer for layer, _, _ in starts})
    by_position = sorted(starts, key=lambda s: (s[1], s[2]))
    best = [(0.0, [])]  # best[j]: (cost, forwards) of the patches in layers[:j]
    for j in range(1, len(layers) + 1):
        options = []
        for i in range(j):
            low, high = layers[i], layers[j - 1]
            mine = [(p, index) for layer, p, index in by_position if low <= layer <= high]
            forwards = chunked(mine, low, batch_size)
            n_blocks = model.cfg.n_layers - low
            cost = sum(forward_flops(n_blocks, len(rows), n_positions - p, token_flops)
                       for _, p, rows in forwards)
            options.append((best[i][0] + cost, best[i][1] + forwards))
        best.append(min(options, key=lambda option: option[0]))
    return best[-1][1]


def prefix_cache(kv, n_positions, n_rows):
    """The target run's keys and values of its first n_positions, for n_rows patched runs that
    continue it: [LayerCache], or None from position 0."""
    if n_positions == 0:
        return None
    cache = []
    for k, v in kv:  # (1, KV, T, dh)
        layer = LayerCache()
        layer.append(k[:, :, :n_positions].expand(n_rows, -1, -1, -1),
                     v[:, :, :n_positions].expand(n_rows, -1, -1, -1))
        cache.append(layer)
    return cache


@torch.no_grad()
def run_forward(model, target, source, patches, layer, start, metric):
    """Patches in blocks >= layer that change nothing before position `start` -> (N,) metrics
    from one forward of blocks layer.. over positions start.., after the target's keys and
    values. The metric sees the whole (N, T, vocab) logits: the target's before `start`."""
    n = len(patches)
    hooks = [(name, writer(mask[:, start:], source[name][:, start:]))
             for name, mask in patch_masks(patches, source).items()]
    if layer == 0:  # block 0's input is the token embeddings
        x = target.tokens[:, start:].expand(n, -1)  # (N, T - start)
    else:
        x = target.acts[f"blocks.{layer}.hook_resid_pre"][:, start:].expand(n, -1, -1)
    with model.hooks(hooks):
        logits = model(x, prefix_cache(target.kv, start, n), start_at_layer=layer)
    before = target.logits[:, :start].expand(n, -1, -1)  # (N, start, vocab)
    return metric(torch.cat([before, logits], dim=1)).float().cpu()


@torch.no_grad()
def patched_metrics(model, tokens, source, patches, metric, batch_size=None, desc="patching",
                    run=None):
    """tokens (T,): the run patched into; source {hook name: (1, T, ...)}: the activations written;
    run: the Trace of the tokens' run, where the caller has it -> (len(patches),) the metric of
    every patched run."""
    tokens = as_tokens(model, tokens)
    batch_size = batch_size or default_batch_size(model, len(tokens))
    whole_runs, whole_sequences = reads_inputs(model), hooked(model)
    run = run if run is not None else trace(model, tokens[None], list(source))
    changed = changed_positions(source, run)
    starts = [(block_of(patch.hook), first_change(patch, changed), i)
              for i, patch in enumerate(patches)]
    out = metric(run.logits).float().cpu().expand(len(patches)).clone()  # no-ops: the target's
    starts = [start for start in starts if start[1] is not None]
    if whole_runs:  # from the token ids, every block and position
        starts = [(0, 0, i) for _, _, i in starts]
    elif whole_sequences:  # from the patch's block (hooks below it ran in the target's run)
        starts = [(layer, 0, i) for layer, _, i in starts]
    forwards = plan_forwards(model, starts, len(tokens), batch_size)
    for layer, start, rows in tqdm(forwards, desc=desc, disable=None, leave=False,
                                   dynamic_ncols=True):
        out[rows] = run_forward(model, run, source, [patches[i] for i in rows], layer, start,
                                metric)
    return out


@torch.no_grad()
def cache_site(model, tokens, site):
    """The activations of one site at every layer: {hook name: (1, T, ...)}."""
    names = site_names(model, site)
    _, acts = model.run_with_cache(as_tokens(model, tokens)[None], names_filter=names)
    return acts


def patch_into(model, tokens, source, metric, site="resid_pre", spans=None, batch_size=None,
               run=None):
    """Patch the source run's activations (cache_site) into the run of `tokens`, one site at a
    time -> the raw metric of every patched run, (n_layers, n_spans), or (n_layers, n_heads) for
    site 'head'. spans: lists of positions patched together (default: each position alone, or all
    positions for heads). run: the Trace of the tokens' run, where the caller has one."""
    spans = check_spans(spans, len(tokens), site)
    grid = patch_grid(model, site, spans)
    flat = [patch for row in grid for patch in row]
    values = patched_metrics(model, tokens, source, flat, metric, batch_size, f"patching {site}",
                             run)
    return values.view(len(grid), -1)


def check_pair(clean, corrupt):
    clean, corrupt = torch.as_tensor(clean), torch.as_tensor(corrupt)
    if clean.shape != corrupt.shape or clean.dim() != 1:
        raise AnalysisError(f"clean and corrupted prompts must be token lists of one length, "
                            f"got {len(clean)} and {len(corrupt)} tokens")
    return clean, corrupt


def target_and_source(clean, corrupt, direction):
    """-> (tokens patched into, tokens whose activations are written)."""
    if direction not in DIRECTIONS:
        choices = ", ".join(DIRECTIONS)
        raise AnalysisError(f"unknown direction {direction!r} (choose from: {choices})")
    return (corrupt, clean) if direction == "denoise" else (clean, corrupt)


def activation_patching(model, clean, corrupt, metric, site="resid_pre", spans=None,
                        direction="denoise", batch_size=None):
    """Clean and corrupted prompts (T,) of one length -> the raw metric of every patched run,
    (n_layers, n_spans) or (n_layers, n_heads). direction: 'denoise' writes clean activations into
    the corrupted run, 'noise' corrupted ones into the clean run."""
    clean, corrupt = check_pair(clean, corrupt)
    target, source_tokens = target_and_source(clean, corrupt, direction)
    names = site_names(model, site)
    # both runs in one forward: the source's activations, the target's trace
    both = trace(model, as_tokens(model, torch.stack([target, source_tokens])), names)
    source = {name: both.acts[name][1:] for name in names}
    return patch_into(model, target, source, metric, site, spans, batch_size, both.row(0))


@torch.no_grad()
def metric_of(model, tokens, metric):
    return metric(model(as_tokens(model, tokens)[None])).item()


# -----------------------------------------------------------------------------
# Attribution patching: the first-order estimate of every patch from one forward and one backward
# of the target run, metric + (source - target activation) . d metric / d activation.


def attribute_into(model, tokens, source, metric, site="resid_pre", spans=None):
    """The linear estimate of patch_into, same arguments and shape. Gradients reach the
    activations through zero tensors added at the site's hooks, so they exist even where every
    weight is frozen."""
    tokens = as_tokens(model, tokens)
    spans = check_spans(spans, len(tokens), site)
    names = site_names(model, site)
    acts, probes = {}, {}

    def probe(x, hook):
        acts[hook.name] = x.detach()
        probes[hook.name] = torch.zeros_like(x, requires_grad=True)
        return x + probes[hook.name]  # x + 0: the forward is unchanged

    with torch.enable_grad():
        value = metric(model.run_with_hooks(tokens[None], [(n, probe) for n in names]))  # (1,)
        grads = torch.autograd.grad(value.sum(), [probes[n] for n in names])
    rows = []
    for name, grad in zip(names, grads):
        effect = ((source[name] - acts[name]) * grad)[0].float()  # (T, ...)
        rows.append(span_sums(effect, spans, per_head=site == "head"))
    return value.item() + torch.stack(rows).cpu()


def span_sums(effect, spans, per_head):
    """effect (T, ...) summed over features -> (n_spans,), or (n_heads,) for heads over the one
    span's positions."""
    if per_head:
        return effect[spans[0]].sum(dim=(0, *range(2, effect.dim())))  # (n_heads,)
    per_position = effect.flatten(1).sum(-1)  # (T,)
    return torch.stack([per_position[span].sum() for span in spans])


def attribution_patching(model, clean, corrupt, metric, site="resid_pre", spans=None,
                         direction="denoise"):
    """The estimate of activation_patching (same arguments and shape) from two forwards and one
    backward: for 'noise', metric(clean) + (corrupt - clean) . d metric / d activation at clean;
    for 'denoise', metric(corrupt) + (clean - corrupt) . d metric / d activation at corrupt."""
    clean, corrupt = check_pair(clean, corrupt)
    target, source_tokens = target_and_source(clean, corrupt, direction)
    source = cache_site(model, source_tokens, site)
    return attribute_into(model, target, source, metric, site, spans)


def correlation(a, b):
    """Pearson correlation of two grids; nan where either is constant."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    return (a @ b / denominator).item() if denominator > 0 else float("nan")


# -----------------------------------------------------------------------------
# Scoring eval items under any forward pass: the summed log-prob of every option, with whole items
# in each batch, so that a metric over an item's options can be differentiated batch by batch and a
# hook can hand one run's activations to another run of the same batch.


def item_chunks(items, batch_size):
    """Items -> lists of whole items with at most batch_size options each (at least one item)."""
    chunks, chunk, size = [], [], 0
    for item in items:
        if chunk and size + len(item.options) > batch_size:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += len(item.options)
    return chunks + [chunk] if chunk else chunks


def option_batch(chunk, device):
    """Items -> tokens (B, T), targets (B, T): one row per (item, option), as tasks.collate."""
    examples = [tasks.Example(item.prompt, option) for item in chunk for option in item.options]
    tokens, targets = tasks.collate(examples)
    return tokens.to(device), targets.to(device)


def option_scores(logits, targets, chunk):
    """logits (B, T, vocab) of option_batch -> [(n_options,) summed log-probs] per item."""
    logp = logits.float().log_softmax(-1)  # (B, T, vocab)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T)
    sums = (picked * (targets != tasks.IGNORE)).sum(-1)  # (B,)
    return list(sums.split([len(item.options) for item in chunk]))


def right_logprob(scores, item):
    """The right option's log-prob normalised over the item's options (its own log-prob where the
    item has one option): the smooth version of 'the right option scores best'."""
    return (scores.log_softmax(0) if len(scores) > 1 else scores)[item.answer]


def device_of(model):
    return next(model.parameters()).device


@torch.no_grad()
def scored_runs(model, eval_set, runs, batch_size=64):
    """runs: tokens (B, T) -> {run name: logits (B, T, vocab)}, several runs of one batch ->
    {run name: {"accuracy": share of items whose right option scores best, alone,
    "metric": mean right_logprob}}."""
    scores = {}  # {run name: [(n_options,) per item]}
    for chunk in item_chunks(eval_set.items, batch_size):
        tokens, targets = option_batch(chunk, device_of(model))
        for name, logits in runs(tokens).items():
            scores.setdefault(name, []).extend(option_scores(logits, targets, chunk))
    items = eval_set.items
    return {name: {"accuracy": tasks.share_right(items, [s.tolist() for s in run_scores]),
                   "metric": torch.stack([right_logprob(s, item) for s, item in
                                          zip(run_scores, items)]).mean().item()}
            for name, run_scores in scores.items()}


# -----------------------------------------------------------------------------
# Reading a steering vector: what it writes into the vocabulary, its size next to the residual
# stream it is added to, accuracy against its strength and against its largest dimensions, and
# the share of its effect that survives with attention frozen to the unsteered run's patterns.


def layer_directions(vector):
    """{layer: direction (d_model,)}."""
    if not hasattr(vector, "directions"):
        raise AnalysisError("read_vector reads one direction per layer; a codename vector has "
                            "one per codename")
    return {layer: vector.directions[str(layer)].detach().float() for layer in vector.layers}


def landing_hook(vector, layer):
    """The residual stream the vector ends up in: its own hook for hook_resid_pre, the block's
    output for hook_mlp_out and hook_resid_post."""
    hook = "hook_resid_pre" if vector.hook == "hook_resid_pre" else "hook_resid_post"
    return f"blocks.{layer}.{hook}"


def norm_scale(model, x):
    """What the model's norms divide x (..., d_model) by, eps aside: the RMS (RMSNorm) or the
    standard deviation (LayerNorm) over features -> (...)."""
    if isinstance(model.ln_final, LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    return x.pow(2).mean(-1).sqrt()


def prompt_batches(prompts, batch_size=32):
    """Token-id lists -> [(tokens (B, T), mask (B, T) bool, True at real tokens)]."""
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        tokens = tasks.right_pad(chunk, 0)  # (B, T)
        lengths = torch.tensor([len(p) for p in chunk])  # (B,)
        batches.append((tokens, torch.arange(tokens.shape[1])[None] < lengths[:, None]))
    return batches


@torch.no_grad()
def token_activations(model, batches, name):
    """One hook's activation at every real token of the batches -> (N, d_model) fp32 on the CPU."""
    rows = []
    for tokens, mask in batches:
        _, acts = model.run_with_cache(tokens.to(device_of(model)), names_filter=name)
        rows.append(acts[name][mask.to(acts[name].device)].float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def vector_logits(model, direction, resid_scale):
    """direction (d_model,) -> {"direct": its unembedding (vocab,), "final_norm": its unembedding
    after the final norm, as that norm scales a residual stream whose norm_scale is resid_scale}.
    Only the norm's linear part: its bias is the same with and without the vector."""
    v = direction.to(model.unembed.weight)
    centred = v - v.mean() if isinstance(model.ln_final, LayerNorm) else v
    normed = model.ln_final.weight * centred / resid_scale
    return {"direct": model.unembed(v).float().cpu(),
            "final_norm": model.unembed(normed).float().cpu()}


def top_tokens(tokenizer, logits, k):
    """logits (vocab,) -> {"boosted": [(label, logit)], "suppressed": [(label, logit)]}."""
    k = min(k, logits.numel())
    up, down = logits.topk(k), (-logits).topk(k)
    return {"boosted": [(token_label(tokenizer, i), v) for i, v in
                        zip(up.indices.tolist(), up.values.tolist())],
            "suppressed": [(token_label(tokenizer, i), -v) for i, v in
                           zip(down.indices.tolist(), down.values.tolist())]}


def vector_readout(model, tokenizer, vector, prompts, top_k=10):
    """Per layer: |v|, the unsteered residual stream's mean norm and norm_scale where v lands (over
    every token of prompts), and the top boosted and suppressed tokens of v's unembedding, directly
    and through the final norm at that typical scale."""
    batches = prompt_batches(prompts)
    out = {}
    for layer, direction in layer_directions(vector).items():
        name = landing_hook(vector, layer)
        resid = token_activations(model, batches, name)  # (N, d_model)
        scale = norm_scale(model, resid).mean().item()
        logits = vector_logits(model, direction, scale)
        norm, resid_norm = direction.norm().item(), resid.norm(dim=-1).mean().item()
        out[layer] = {"hook": name, "norm": norm, "resid_norm": resid_norm,
                      "relative_norm": norm / resid_norm, "resid_scale": scale,
                      **{way: top_tokens(tokenizer, values, top_k)
                         for way, values in logits.items()}}
    return out


def strength_sweep(model, vector, eval_sets, coefficients, batch_size=64):
    """-> {coefficient: {key: accuracy}} (tasks.evaluate with coeff * vector added). Coefficient 0
    is the base model exactly: x + 0 * v == x."""
    out = {}
    for coeff in tqdm(coefficients, desc="strength sweep", disable=None, leave=False):
        with vector.apply(model, coeff=coeff):
            out[coeff] = tasks.evaluate(model, eval_sets, batch_size, device_of(model))
    return out


def top_dimensions(scores, percent):
    """scores (d_model,) -> bool mask of the top `percent`% dimensions by score: round(percent% of
    d_model), at least one above 0%."""
    d = scores.numel()
    k = 0 if percent <= 0 else min(d, max(1, round(percent * d / 100)))
    mask = torch.zeros(d, dtype=torch.bool)
    mask[scores.topk(k).indices] = True
    return mask


def sparsified(vector, keep):
    """A copy of the vector with only the dimensions in keep {layer: bool (d_model,)} left."""
    sparse = copy.deepcopy(vector)
    with torch.no_grad():
        for layer, mask in keep.items():
            sparse.directions[str(layer)].mul_(mask.to(sparse.directions[str(layer)]))
    return sparse


def dimension_attributions(model, vector, eval_sets, batch_size=64):
    """{layer: |v_i * d metric / d v_i| (d_model,)}: the first-order effect of zeroing each
    dimension, with the vector on. metric = the sum over eval sets of the mean right_logprob;
    d metric / d v_i is the sum of d metric / d x_i over the positions where v is added."""
    sensitive = copy.deepcopy(vector).requires_grad_(True)
    params = [sensitive.directions[str(layer)] for layer in vector.layers]
    grads = [torch.zeros_like(p) for p in params]
    with torch.enable_grad(), sensitive.apply(model):
        for eval_set in eval_sets.values():
            for chunk in item_chunks(eval_set.items, batch_size):
                tokens, targets = option_batch(chunk, device_of(model))
                scores = option_scores(model(tokens), targets, chunk)
                value = sum(right_logprob(s, item) for s, item in zip(scores, chunk))
                for total, grad in zip(grads, torch.autograd.grad(value / len(eval_set.items),
                                                                   params)):
                    total += grad
    return {layer: (p.detach() * g).abs().float().cpu()
            for layer, p, g in zip(vector.layers, params, grads)}


def sparsification(model, vector, eval_sets, percents, batch_size=64):
    """-> {"magnitude" | "attribution": {percent: {key: accuracy}}}: accuracy with only the top
    percent% dimensions of every layer's direction kept, ranked by |v_i| or by attribution."""
    rankings = {"magnitude": {layer: d.abs() for layer, d in layer_directions(vector).items()},
                "attribution": dimension_attributions(model, vector, eval_sets, batch_size)}
    out = {}
    for ranking, scores in rankings.items():
        out[ranking] = {}
        for percent in tqdm(percents, desc=f"sparsify by {ranking}", disable=None, leave=False):
            keep = {layer: top_dimensions(s, percent) for layer, s in scores.items()}
            with sparsified(vector, keep).apply(model):
                out[ranking][percent] = tasks.evaluate(model, eval_sets, batch_size,
                                                       device_of(model))
    return out


def pattern_names(model):
    return [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]


@torch.no_grad()
def frozen_attention_runs(model, vector, tokens, coeff=1.0):
    """tokens (B, T) -> {"base": logits, "steered": logits, "frozen": logits of the steered run
    with every attention pattern overwritten by the base run's}. Hooking hook_pattern takes
    model.py's explicit attention path; the base run reads its patterns from that same path, so
    freezing an unsteered run reproduces it exactly."""
    base, patterns = model.run_with_cache(tokens, names_filter=pattern_names(model))
    with vector.apply(model, coeff=coeff):
        steered = model(tokens)
        frozen = model.run_with_hooks(tokens, [(name, lambda x, hook: patterns[hook.name])
                                               for name in pattern_names(model)])
    return {"base": base, "steered": steered, "frozen": frozen}


def effect_share(base, steered, frozen):
    """The share of the steering effect kept with attention frozen; nan where there is none."""
    effect = steered - base
    return (frozen - base) / effect if effect != 0 else float("nan")


def frozen_attention(model, vector, eval_sets, coeff=1.0, batch_size=64):
    """-> {set: {run: {"accuracy", "metric"}} for the runs base, steered and frozen, plus "share":
    (frozen - base) / (steered - base) of the metric (mean right_logprob) and of accuracy}."""
    out = {}
    runs = partial(frozen_attention_runs, model, vector, coeff=coeff)
    for name, eval_set in tqdm(eval_sets.items(), desc="frozen attention", disable=None,
                               leave=False):
        scored = scored_runs(model, eval_set, runs, batch_size)
        scored["share"] = {key: effect_share(*(scored[run][key] for run in
                                               ("base", "steered", "frozen")))
                           for key in ("metric", "accuracy")}
        out[name] = scored
    return out


# -----------------------------------------------------------------------------
# LoRA vs steering (Wang, Engels et al. 2025): what a one-layer LoRA adds to its module's output,
# token by token, read as a steering vector. If the per-token differences point one way (|cos| near
# 1, PC1 share near 1), the natural vector PC1 x mean norm, added at every position, stands in for
# the LoRA. The sign of PC1 per token matters too: at toy scale it flips on tokens the fine-tuning
# never showed (README), which a mean hides.

SHOWN_PER_GROUP = 16  # tokens of each group in the |cos| heatmap
# LoRA'd module -> the hook of its output (on Gemma before the post-feedforward norm)
LORA_OUTPUTS = {"mlp.down_proj": "mlp.hook_out"}
PLAIN_SENTENCES = [  # unrelated text for text tasks
    "The library opens at nine in the morning and closes at six.",
    "Rain is expected over the weekend, with clearer skies by Monday.",
    "She planted tomatoes, beans and a row of sunflowers along the fence.",
    "The committee will publish its report after the summer break.",
    "Most bicycles in the city are parked near the railway station.",
    "He read the letter twice before putting it back in the drawer.",
    "Bread rises faster in a warm kitchen than in a cold one.",
    "The museum's new wing holds paintings from the last two centuries.",
]


def lora_site(subject):
    """A LoRA run at one layer -> (layer, the hook of the LoRA'd module's output)."""
    if subject.config is None or subject.adapter != "lora":
        given = f"a {subject.adapter} run" if subject.adapter else "a plain checkpoint"
        raise AnalysisError(f"lora_vs_steering reads a LoRA run at one layer (train.py --adapter "
                            f"lora --layer N), given {given}: {subject.name}")
    paths = list(lora.lora_modules(subject.model))
    layers = sorted({lora.layer_of(path) for path in paths})
    if len(layers) != 1:
        raise AnalysisError(f"lora_vs_steering reads a LoRA at one layer; {subject.name} has "
                            f"LoRAs at blocks {layers} (train.py --layer N)")
    modules = sorted({path.removeprefix(f"blocks.{layers[0]}.") for path in paths})
    if len(modules) != 1 or modules[0] not in LORA_OUTPUTS:
        raise AnalysisError(f"lora_vs_steering reads a LoRA on {', '.join(LORA_OUTPUTS)}; "
                            f"{subject.name} has one on {', '.join(modules)}")
    return layers[0], LORA_OUTPUTS[modules[0]]


def unrelated_prompts(subject, n=32):
    """Text unrelated to the fine-tuning: a toy world's pretraining documents (n drawn as
    pretraining draws them), else a few plain sentences."""
    task = subject.task
    if hasattr(task, "draw_documents"):
        documents = task.draw_documents(torch.Generator().manual_seed(task.seed), n)
        return documents.tolist()  # (n, doc_len)
    return [subject.tokenizer.encode(text) for text in PLAIN_SENTENCES]


def trained_tokens(subject):
    """The token ids the fine-tuning data shows (prompts and answers)."""
    return {t for e in subject.task.train_examples(subject.tokenizer) for t in e.prompt + e.answer}


def lora_diffs(subject, prompts, layer, hook):
    """-> (diffs (N, d_model), token ids (N,)): the LoRA'd module's output with the LoRA minus
    without it, at every real token of the prompts."""
    batches = prompt_batches(prompts)
    with subject.state(True):
        diffs = steer.lora_token_diffs(subject.model, batches, layer, hook)
    ids = torch.cat([tokens[mask] for tokens, mask in batches])  # the order of diffs
    return diffs, ids


def abs_cos(diffs):
    """(N, d) -> (N, N) |cos| between rows; 0 where a row is zero."""
    unit = diffs / diffs.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (unit @ unit.T).abs()


def pc1_share(diffs):
    """PC1's share of the uncentred variance (steer.top_direction: the constant is kept)."""
    _, eigvals = steer.top_direction(diffs)
    return float(eigvals[-1] / eigvals.sum().clamp_min(1e-30))


def diff_stats(diffs, direction):
    """diffs (N, d), direction (d,) -> {"n_tokens", "pc1_share" (of these diffs), "mean_abs_cos"
    (between distinct tokens' diffs), "mean_abs_cos_pc1" (each diff with direction),
    "mean_norm"}."""
    n = diffs.shape[0]
    cos = abs_cos(diffs)
    off_diagonal = (cos.sum() - cos.diagonal().sum()) / max(1, n * (n - 1))
    unit = direction / direction.norm().clamp_min(1e-30)
    with_pc1 = (diffs @ unit).abs() / diffs.norm(dim=1).clamp_min(1e-30)
    return {"n_tokens": n, "pc1_share": pc1_share(diffs), "mean_abs_cos": float(off_diagonal),
            "mean_abs_cos_pc1": float(with_pc1.mean()),
            "mean_norm": float(diffs.norm(dim=1).mean())}


def sign_split(projections, ids, seen):
    """Per token id: how often its diff points with (+) or against (-) a direction ->
    {id: {"seen", "positive", "negative", "mean"}}, and per seen / never seen: the share of tokens
    (occurrences) with a positive projection."""
    per_token = {}
    for token in sorted(set(ids.tolist())):
        p = projections[ids == token]
        per_token[token] = {"seen": token in seen, "positive": int((p > 0).sum()),
                            "negative": int((p < 0).sum()), "mean": float(p.mean())}
    shares = {}
    for kind, is_seen in (("seen", True), ("never_seen", False)):
        chosen = torch.tensor([t in seen for t in ids.tolist()]) == is_seen
        shares[kind] = float((projections[chosen] > 0).float().mean()) if chosen.any() else None
    return per_token, shares


def cos_natural_trained(natural, trained, layer):
    """cos(natural, trained) at the layer, None where the trained vector is not at that layer."""
    if trained is None or layer not in trained.layers or not hasattr(trained, "directions"):
        return None
    v = trained.directions[str(layer)].detach().float().cpu()
    return float(natural @ v / (natural.norm() * v.norm()).clamp_min(1e-30))


def substituted_accuracies(subject, natural, trained, sets):
    """{state: {key: accuracy}}: base, the LoRA, the natural vector in its place, the natural
    vector negated, and the trained steering vector when given."""
    model = subject.model
    states = {"base": nullcontext, "lora": subject.adapter_on,
              "natural": partial(natural.apply, model),
              "-natural": partial(natural.apply, model, coeff=-1.0)}
    if trained is not None:
        states["trained"] = partial(trained.apply, model)
    out = {}
    for name, state in tqdm(states.items(), desc="scoring", disable=None, leave=False):
        with state():
            out[name] = tasks.evaluate(model, sets, device=device_of(model))
    return out


def lora_groups(subject, n_unrelated=32):
    """{group: prompts}: the in-distribution and OOCR eval prompts, and unrelated text."""
    return {"in_distribution": [i.prompt for i in subject.eval_sets["in_distribution"].items],
            "oocr": [i.prompt for i in subject.eval_sets["oocr"].items],
            "unrelated": unrelated_prompts(subject, n_unrelated)}


def unit(v):
    return v / v.norm().clamp_min(1e-30)


def lora_vs_steering(subject, trained=None, n_unrelated=32):
    """A LoRA run at one layer -> a record: the natural vector (steer.lora_natural_vector over the
    in-distribution prompts), per group of prompts the token diffs (ids, norms, projections on the
    natural vector) and their stats, the sign split per token, cos(natural, trained), and the
    accuracies with the natural vector (and the trained one) in place of the LoRA."""
    layer, hook = lora_site(subject)
    groups = lora_groups(subject, n_unrelated)
    with subject.state(True):
        batches = prompt_batches(groups["in_distribution"])
        natural = steer.lora_natural_vector(subject.model, batches, layer, hook)
    direction = natural.directions[str(layer)].detach().float().cpu()  # (d_model,)
    directions = {"natural": unit(direction)}
    if trained is not None and cos_natural_trained(direction, trained, layer) is not None:
        directions["trained"] = unit(trained.directions[str(layer)].detach().float().cpu())
    seen = trained_tokens(subject)
    record = {"layer": layer, "hook": f"blocks.{layer}.{hook}", "natural": direction.tolist(),
              "natural_norm": float(direction.norm()),
              "cos_natural_trained": cos_natural_trained(direction, trained, layer),
              "seen_tokens": sorted(seen), "groups": {}, "sign_split": {}}
    all_diffs, all_ids = [], []
    for name, prompts in groups.items():
        diffs, ids = lora_diffs(subject, prompts, layer, hook)
        all_diffs.append(diffs)
        all_ids.append(ids)
        record["groups"][name] = {**diff_stats(diffs, direction), "token_ids": ids.tolist(),
                                  "norms": diffs.norm(dim=1).tolist(),
                                  "projections": (diffs @ directions["natural"]).tolist()}
    diffs, ids = torch.cat(all_diffs), torch.cat(all_ids)  # every group's tokens
    shown = torch.cat([d[:SHOWN_PER_GROUP] for d in all_diffs])  # the heatmap's tokens
    record["shown_abs_cos"] = abs_cos(shown).tolist()
    for name, d in directions.items():
        per_token, shares = sign_split(diffs @ d, ids, seen)
        record["sign_split"][name] = {"per_token": per_token, "positive_share": shares}
    sets = {name: subject.eval_sets[name] for name in ("in_distribution", "oocr")}
    record["accuracy"] = substituted_accuracies(subject, natural, trained, sets)
    return record


# -----------------------------------------------------------------------------
# Plots and files


def heatmap(fig, ax, values, xlabels, ylabels, title, **imshow):
    image = ax.imshow(values.numpy(), aspect="auto", interpolation="nearest", **imshow)
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)


def save_analysis(out_dir, name, fig, record):
    """<name>.png and <name>.json into out_dir, each written atomically -> their paths."""
    os.makedirs(out_dir, exist_ok=True)
    png, data = os.path.join(out_dir, f"{name}.png"), os.path.join(out_dir, f"{name}.json")
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    write_json(data, record)
    return png, data


def prompt_record(subject, prompt):
    return {"source": prompt.source, "tokens": prompt.tokens,
            "labels": token_labels(subject.tokenizer, prompt.tokens)}


def normalised(values, clean, corrupt):
    """(m - m_corrupt) / (m_clean - m_corrupt): 1 = the clean run's metric, 0 = the corrupted's;
    the raw metric where the two runs agree."""
    return values if clean == corrupt else (values - corrupt) / (clean - corrupt)


def symmetric_limits(values):
    bound = max(1.0, values.abs().max().item()) if values.numel() else 1.0
    return {"vmin": -bound, "vmax": bound, "cmap": "RdBu"}


# -----------------------------------------------------------------------------
# The analyses from the command line: each takes (subject, args) -> (figure, record, summary)


def clean_prompt(subject, args):
    if args.prompt is not None:
        return text_prompt(subject, args.prompt)
    if not subject.eval_sets:
        raise AnalysisError("a plain checkpoint has no eval sets: give --prompt")
    return item_prompt(subject, args.eval, args.item)


def check_layers(model, layers):
    try:
        model.cfg.check_layers(layers)
    except ValueError as e:
        raise AnalysisError(f"--layers: {e}") from None
    return layers


def lens_token(subject, args, prompt):
    if args.token is not None:
        return token_id(subject.tokenizer, args.token)
    if prompt.answer is None:
        raise AnalysisError("--prompt text has no answer: give --token")
    return prompt.answer


def check_position(position, n_positions):
    if not -n_positions <= position < n_positions:
        raise AnalysisError(f"--position {position}: the prompt has positions 0..{n_positions - 1}")
    return position % n_positions


def top_tokens_text(subject, readout, rows):
    lines = []
    for row, ids, probs in zip(rows, readout["top_ids"].tolist(), readout["top_probs"].tolist()):
        tops = [(token_label(subject.tokenizer, i), p) for i, p in zip(ids, probs)]
        cells = "  ".join(f"{label} {p:.2f}" for label, p in tops)
        lines.append(f"{row:>14}  {cells}")
    return "\n".join(lines)


def logit_lens_command(subject, args):
    prompt = clean_prompt(subject, args)
    token = lens_token(subject, args, prompt)
    position = check_position(args.position, len(prompt.tokens))
    labels = token_labels(subject.tokenizer, prompt.tokens)
    rows = lens_rows(subject.model.cfg.n_layers)
    token_text = token_label(subject.tokenizer, token)
    views = subject.views()
    width = min(40, max(6, 0.4 * len(labels) + 3))
    heights = [0.3 * len(rows) + 1.5, 0.17 * len(rows) + 0.5]  # heatmap, top-token table
    fig = Figure(figsize=(width * len(views), sum(heights)))
    axes = fig.subplots(2, len(views), squeeze=False, height_ratios=heights)
    record = {"analysis": "logit_lens", "subject": subject.name,
              "prompt": prompt_record(subject, prompt), "token": token, "token_label": token_text,
              "position": position, "rows": rows, "views": {}}
    summary = []
    for column, (view, context) in enumerate(views):
        with context():
            readout = lens_readout(subject.model, prompt.tokens, token, position, args.top_k)
        shown = readout[args.measure].float()
        title = (f"{view}: {args.measure} of {token_text!r} per layer "
                 f"({subject.name}, {prompt.source})")
        colors = {"cmap": "viridis_r"} if args.measure == "rank" else {"vmin": 0, "vmax": 1}
        heatmap(fig, axes[0, column], shown, labels, rows, title, **colors)
        axes[0, column].set(xlabel="position", ylabel="logit lens row")
        top_ax = axes[1, column]
        top_ax.axis("off")
        top_ax.set_title(f"{view}: top tokens at position {position} ({labels[position]})",
                         fontsize=9)
        top_ax.text(0, 1, top_tokens_text(subject, readout, rows), family="monospace", fontsize=8,
                    va="top", transform=top_ax.transAxes)
        record["views"][view] = {key: value.tolist() for key, value in readout.items()}
        by_row = " ".join(f"{p:.2f}" for p in readout["prob"][:, position].tolist())
        first = first_top_row(readout["rank"], position)
        where = "never" if first is None else f"from row {rows[first]}"
        summary.append(f"{view}: P({token_text}) at position {position} by row: {by_row}; "
                       f"top-1 {where}")
    fig.tight_layout()
    return fig, record, summary


def strongest_heads(patterns, layers, labels):
    """Per layer, each head's most attended key from the last query position."""
    lines = []
    for layer, heads in zip(layers, patterns[:, :, -1]):  # (n_heads, T_key) each
        weights, keys = heads.max(-1)
        cells = ", ".join(f"h{h} {labels[k]} {w:.2f}" for h, (w, k) in
                          enumerate(zip(weights.tolist(), keys.tolist())))
        lines.append(f"  layer {layer}: {cells}")
    return lines


def attention_command(subject, args):
    prompt = clean_prompt(subject, args)
    model = subject.model
    layers = check_layers(model, args.layers or list(range(model.cfg.n_layers)))
    labels = token_labels(subject.tokenizer, prompt.tokens)
    views = subject.views()
    H = model.cfg.n_heads
    panel = min(3.0, max(1.6, 0.2 * len(labels)))
    fig = Figure(figsize=(panel * H * len(views), panel * len(layers) + 0.6))
    axes = fig.subplots(len(layers), H * len(views), squeeze=False)
    record = {"analysis": "attention", "subject": subject.name,
              "prompt": prompt_record(subject, prompt), "layers": layers, "views": {}}
    summary = [f"most attended key from the last position ({labels[-1]}):"]
    for v, (view, context) in enumerate(views):
        with context():
            patterns = attention_patterns(model, prompt.tokens, layers)  # (L, H, T, T)
        record["views"][view] = patterns.tolist()
        summary.append(f"{view}:")
        summary += strongest_heads(patterns, layers, labels)
        for i, layer in enumerate(layers):
            for h in range(H):
                ax = axes[i, v * H + h]
                ax.imshow(patterns[i, h].numpy(), vmin=0, vmax=1, cmap="Blues",
                          interpolation="nearest")
                ax.set_title(f"{view} L{layer} H{h}", fontsize=8)
                ax.set_yticks(range(len(labels)), labels, fontsize=6)
                ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
                # token labels on the outer panels only: every panel shares them
                ax.tick_params(labelleft=h == 0, labelbottom=i == len(layers) - 1)
    fig.suptitle(f"attention patterns (rows: queries, columns: keys),\n{subject.name}, "
                 f"{prompt.source}", fontsize=10)
    fig.tight_layout()
    return fig, record, summary


@dataclass
class Contrast:
    """A patching experiment: the clean and the corrupted run (prompt and model state), the
    metric, and the tokens it compares."""

    clean: Prompt
    corrupt: Prompt
    clean_adapted: bool
    corrupt_adapted: bool
    right: int
    wrong: int
    metric: Callable


def corrupt_prompt(subject, args, clean):
    if args.contrast == "adapter":
        if args.corrupt is not None or args.corrupt_item is not None:
            raise AnalysisError("--contrast adapter compares one prompt with and without the "
                                "adapter: --corrupt and --corrupt-item do not apply")
        return clean
    if args.corrupt is not None:
        return text_prompt(subject, args.corrupt, "--corrupt")
    if clean.source == "text":
        raise AnalysisError("--prompt needs --corrupt (a prompt of the same length)")
    if args.corrupt_item is not None:
        return item_prompt(subject, args.eval, args.corrupt_item)
    return partner_item(subject, args.eval, args.item)


@torch.no_grad()
def strongest_other_option(subject, prompt, right, adapted):
    """The wrong answer by default where the corrupted prompt has no other answer: the option the
    corrupted run rates highest, other than the right one."""
    others = [o for o in prompt.options if o != right]
    if not others:
        raise AnalysisError("the prompt has no other option: give --wrong")
    with subject.state(adapted):
        logits = subject.model(as_tokens(subject.model, prompt.tokens)[None])[0, -1]  # (vocab,)
    return max(others, key=lambda o: logits[o].item())


def make_contrast(subject, args):
    clean = clean_prompt(subject, args)
    if args.contrast == "adapter" and not subject.adapter:
        raise AnalysisError("--contrast adapter needs --run (a run with an adapter)")
    corrupt = corrupt_prompt(subject, args, clean)
    if len(clean.tokens) != len(corrupt.tokens):
        raise AnalysisError(f"clean and corrupted prompts differ in length ({len(clean.tokens)} "
                            f"and {len(corrupt.tokens)} tokens): patching needs one length")
    adapted = bool(subject.adapter) and args.adapter == "on"
    clean_adapted, corrupt_adapted = (True, False) if args.contrast == "adapter" else (adapted,) * 2
    right = right_token(subject, args, clean)
    wrong = wrong_token(subject, args, corrupt, right, corrupt_adapted)
    return Contrast(clean, corrupt, clean_adapted, corrupt_adapted, right, wrong,
                    logit_diff(right, wrong))


def right_token(subject, args, clean):
    if args.right is not None:
        return token_id(subject.tokenizer, args.right, "--right")
    if clean.answer is None:
        raise AnalysisError("--prompt text has no answer: give --right and --wrong")
    return clean.answer


def wrong_token(subject, args, corrupt, right, corrupt_adapted):
    if args.wrong is not None:
        return token_id(subject.tokenizer, args.wrong, "--wrong")
    if corrupt.answer is not None and corrupt.answer != right:
        return corrupt.answer
    if not corrupt.options:
        raise AnalysisError("--corrupt text has no answer: give --wrong")
    return strongest_other_option(subject, corrupt, right, corrupt_adapted)


def contrast_title(contrast):
    """'oocr[0] vs oocr[1]', with the adapter's state where the contrast is the adapter."""
    clean, corrupt = contrast.clean.source, contrast.corrupt.source
    if contrast.clean_adapted != contrast.corrupt_adapted:
        return f"{clean} with the adapter (clean) vs without (corrupted)"
    return f"{clean} (clean) vs {corrupt} (corrupted)"


def contrast_runs(contrast, direction):
    """-> ((tokens, adapted) patched into, (tokens, adapted) the source)."""
    clean = (contrast.clean.tokens, contrast.clean_adapted)
    corrupt = (contrast.corrupt.tokens, contrast.corrupt_adapted)
    return target_and_source(clean, corrupt, direction)


def site_list(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def spans_of(args, n_positions):
    if not args.span:
        return None
    return [parse_positions(text, n_positions) for text in args.span]


def patch_experiment(subject, args, contrast, site, estimate):
    """One site: the raw metric of every patched run (exact, or the attribution estimate)."""
    model = subject.model
    target_run, source_run = contrast_runs(contrast, args.direction)
    (target, target_adapted), (source_tokens, source_adapted) = target_run, source_run
    spans = spans_of(args, len(target))
    with subject.state(source_adapted):
        source = cache_site(model, source_tokens, site)
    with subject.state(target_adapted):
        if estimate:
            return attribute_into(model, target, source, contrast.metric, site, spans)
        return patch_into(model, target, source, contrast.metric, site, spans, args.batch_size)


def contrast_record(subject, args, contrast):
    with subject.state(contrast.clean_adapted):
        clean = metric_of(subject.model, contrast.clean.tokens, contrast.metric)
    with subject.state(contrast.corrupt_adapted):
        corrupt = metric_of(subject.model, contrast.corrupt.tokens, contrast.metric)
    labels = token_labels(subject.tokenizer, [contrast.right, contrast.wrong])
    return {
        "subject": subject.name,
        "clean": {**prompt_record(subject, contrast.clean), "adapter": contrast.clean_adapted},
        "corrupt": {**prompt_record(subject, contrast.corrupt),
                    "adapter": contrast.corrupt_adapted},
        "metric": f"logit({labels[0]}) - logit({labels[1]}) at the last position",
        "right": contrast.right, "wrong": contrast.wrong,
        "clean_metric": clean, "corrupt_metric": corrupt,
        "direction": args.direction, "direction_means": DIRECTIONS[args.direction],
        "sites": {},
    }


def column_labels(subject, site, spans, tokens):
    """A patching grid's x labels: the token at each position, a span's positions, or heads."""
    if site == "head":
        return [f"H{h}" for h in range(subject.model.cfg.n_heads)]
    labels = token_labels(subject.tokenizer, tokens)
    if spans is None:
        return [f"{p} {label}" for p, label in enumerate(labels)]
    return [",".join(str(p) for p in span) if len(span) > 1 else f"{span[0]} {labels[span[0]]}"
            for span in spans]


def top_cells(grid, xlabels, k=3):
    """The k cells of largest |value| as 'layer l, label value'."""
    flat = grid.flatten()
    order = flat.abs().argsort(descending=True)[:k].tolist()
    n_columns = grid.shape[1]
    return ", ".join(f"L{i // n_columns} {xlabels[i % n_columns]} {flat[i].item():.2f}"
                     for i in order)


def check_sites(model, sites):
    for site in sites:
        site_hook(model, site)
    return sites


def patching_command(subject, args):
    contrast = make_contrast(subject, args)
    sites = check_sites(subject.model, site_list(args.site))
    record = {"analysis": "patching", **contrast_record(subject, args, contrast)}
    clean, corrupt = record["clean_metric"], record["corrupt_metric"]
    spans = spans_of(args, len(contrast.clean.tokens))
    n_layers = subject.model.cfg.n_layers
    width = min(30, 0.4 * len(contrast.clean.tokens) + 4)
    fig = Figure(figsize=(width, (0.3 * n_layers + 1.8) * len(sites) + 0.5))
    axes = fig.subplots(len(sites), 1, squeeze=False)[:, 0]  # one row per site
    summary = [f"{record['metric']}: clean {clean:.3f}, corrupted {corrupt:.3f}; "
               f"{args.direction}: {DIRECTIONS[args.direction]}"]
    rows = [f"layer {l}" for l in range(subject.model.cfg.n_layers)]
    for ax, site in zip(axes, sites):
        grid = patch_experiment(subject, args, contrast, site, estimate=False)
        xlabels = column_labels(subject, site, spans, contrast.clean.tokens)
        shown = normalised(grid, clean, corrupt)
        record["sites"][site] = {"columns": xlabels, "metric": grid.tolist()}
        heatmap(fig, ax, shown, xlabels, rows, f"{site}: (m - m_corrupt) / (m_clean - m_corrupt)",
                **symmetric_limits(shown))
        summary.append(f"{site}: strongest {top_cells(shown, xlabels)}")
    fig.suptitle(f"activation patching ({args.direction}),\n{subject.name}: "
                 f"{contrast_title(contrast)}", fontsize=10)
    fig.tight_layout()
    return fig, record, summary


def attribution_command(subject, args):
    contrast = make_contrast(subject, args)
    sites = check_sites(subject.model, site_list(args.site))
    record = {"analysis": "attribution", **contrast_record(subject, args, contrast)}
    clean, corrupt = record["clean_metric"], record["corrupt_metric"]
    spans = spans_of(args, len(contrast.clean.tokens))
    width = min(30, 0.4 * len(contrast.clean.tokens) + 4)
    fig = Figure(figsize=(2 * width + 4, (0.3 * subject.model.cfg.n_layers + 1.8) * len(sites)))
    axes = fig.subplots(len(sites), 3, squeeze=False, width_ratios=[width, width, 4])
    summary = [f"{record['metric']}: clean {clean:.3f}, corrupted {corrupt:.3f}; "
               f"{args.direction}: {DIRECTIONS[args.direction]}"]
    rows = [f"layer {l}" for l in range(subject.model.cfg.n_layers)]
    for (exact_ax, estimate_ax, scatter_ax), site in zip(axes, sites):
        exact = patch_experiment(subject, args, contrast, site, estimate=False)
        estimate = patch_experiment(subject, args, contrast, site, estimate=True)
        r = correlation(exact, estimate)
        xlabels = column_labels(subject, site, spans, contrast.clean.tokens)
        shown_exact = normalised(exact, clean, corrupt)
        shown_estimate = normalised(estimate, clean, corrupt)
        limits = symmetric_limits(torch.cat([shown_exact.flatten(), shown_estimate.flatten()]))
        heatmap(fig, exact_ax, shown_exact, xlabels, rows, f"{site}: exact patching", **limits)
        heatmap(fig, estimate_ax, shown_estimate, xlabels, rows,
                f"{site}: attribution patching", **limits)
        scatter_ax.scatter(shown_exact.flatten().numpy(), shown_estimate.flatten().numpy(), s=10)
        scatter_ax.axline((0, 0), slope=1, color="gray", linewidth=0.8)  # where they would agree
        scatter_ax.set(xlabel="exact", ylabel="attribution", title=f"r = {r:.3f}")
        record["sites"][site] = {"columns": xlabels, "exact": exact.tolist(),
                                 "attribution": estimate.tolist(), "correlation": r}
        summary.append(f"{site}: correlation with exact patching {r:.3f}; "
                       f"strongest (attribution) {top_cells(shown_estimate, xlabels)}")
    fig.suptitle(f"attribution vs exact patching ({args.direction}; normalised: "
                 f"(m - m_corrupt) / (m_clean - m_corrupt)),\n{subject.name}: "
                 f"{contrast_title(contrast)}", fontsize=10)
    fig.tight_layout()
    return fig, record, summary


def steering_run(subject, analysis):
    if subject.config is None or subject.adapter != "steer":
        given = f"a {subject.adapter} run" if subject.adapter else "a plain checkpoint"
        raise AnalysisError(f"{analysis} reads a steering run (train.py --adapter steer), "
                            f"given {given}: {subject.name}")
    return subject.vector


def chosen_sets(subject, text):
    """--sets names -> {name: EvalSet}; default: the sets a claim rests on (train.claim_sets)."""
    if text is None:
        return train.claim_sets(subject.eval_sets)
    return {name: eval_set(subject, name) for name in site_list(text)}


def number_list(text):
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def curves(ax, table, xlabel, title, **line):
    """table {x: {key: accuracy}} -> one line per key."""
    xs = list(table)
    for i, key in enumerate(table[xs[0]]):  # one color per key, on every call
        ax.plot(xs, [table[x][key] for x in xs], marker="o", label=key, color=f"C{i}", **line)
    ax.set(xlabel=xlabel, ylabel="accuracy", title=title, ylim=(-0.03, 1.03))
    ax.title.set_fontsize(9)


def token_bars(ax, tops, title):
    """Top boosted (up) and suppressed (down) tokens as horizontal bars, largest on top."""
    rows = tops["boosted"] + tops["suppressed"][::-1]
    ax.barh(range(len(rows))[::-1], [v for _, v in rows],
            color=["tab:red" if v > 0 else "tab:blue" for _, v in rows])
    ax.set_yticks(range(len(rows))[::-1], [label for label, _ in rows], fontsize=7)
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("logit")


def frozen_bars(ax, frozen):
    names = list(frozen)
    width = 0.27
    for i, run in enumerate(("base", "steered", "frozen")):
        ax.bar([j + (i - 1) * width for j in range(len(names))],
               [frozen[name][run]["metric"] for name in names], width, label=run)
    labels = [f"{name}\nkept {frozen[name]['share']['metric']:.0%}" for name in names]
    ax.set_xticks(range(len(names)), labels, fontsize=7)
    ax.set(ylabel="mean log p(right option | options)",
           title="attention frozen to the unsteered run's")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)


def sweep_lines(sweep, key_order):
    return "  ".join(f"{c:g}: " + "/".join(f"{sweep[c][k]:.2f}" for k in key_order)
                     for c in sweep)


def read_vector_summary(readout, sweep, sparse, frozen, percents):
    lines = []
    for layer, r in readout.items():
        lines.append(f"layer {layer} ({r['hook']}): |v| = {r['norm']:.3f}, "
                     f"{r['relative_norm']:.2f} x the residual stream's mean norm "
                     f"{r['resid_norm']:.3f}")
        for way in ("direct", "final_norm"):
            for sign in ("boosted", "suppressed"):
                cells = ", ".join(f"{label} {v:+.2f}" for label, v in r[way][sign][:5])
                lines.append(f"  {way:>10} {sign:>10}: {cells}")
    keys = list(next(iter(sweep.values())))
    lines.append(f"strength sweep (coefficient: {'/'.join(keys)}): {sweep_lines(sweep, keys)}")
    for ranking, table in sparse.items():
        lines.append(f"sparsified by {ranking} (% kept: {'/'.join(keys)}): "
                     f"{sweep_lines(table, keys)}")
    for name, runs in frozen.items():
        lines.append(f"frozen attention, {name}: metric base {runs['base']['metric']:.3f}, "
                     f"steered {runs['steered']['metric']:.3f}, frozen "
                     f"{runs['frozen']['metric']:.3f}: {runs['share']['metric']:.0%} of the effect "
                     f"kept (accuracy {runs['base']['accuracy']:.2f} / "
                     f"{runs['steered']['accuracy']:.2f} / {runs['frozen']['accuracy']:.2f})")
    return lines


def read_vector_command(subject, args):
    vector = steering_run(subject, "read_vector")
    layer_directions(vector)  # a codename vector is refused before anything runs
    sets = chosen_sets(subject, args.sets)
    model = subject.model
    prompts = [item.prompt for eval_set in sets.values() for item in eval_set.items]
    readout = vector_readout(model, subject.tokenizer, vector, prompts, args.top_k)
    sweep = strength_sweep(model, vector, sets, args.coefficients)
    sparse = sparsification(model, vector, sets, args.keep)
    frozen = frozen_attention(model, vector, sets)
    record = {"analysis": "read_vector", "subject": subject.name, "sets": list(sets),
              "hook": vector.hook, "positions": vector.positions, "layers": vector.layers,
              "metric": "mean over items of log p(right option), normalised over the options",
              "readout": readout, "strength_sweep": sweep, "sparsification": sparse,
              "frozen_attention": frozen}
    layers = list(readout)
    fig = Figure(figsize=(5 * (len(layers) + 3), 5))
    axes = fig.subplots(1, len(layers) + 3)
    for ax, layer in zip(axes, layers):
        r = readout[layer]
        token_bars(ax, r["final_norm"], f"layer {layer}: unembedding through the final norm\n"
                   f"|v| = {r['relative_norm']:.2f} x mean |resid|")
    ax_sweep, ax_sparse, ax_frozen = axes[len(layers):]
    curves(ax_sweep, sweep, "coefficient (0 = base)", "strength sweep")
    for ranking, style in (("magnitude", "-"), ("attribution", "--")):
        curves(ax_sparse, sparse[ranking], "% of dimensions kept (top by |v_i| -, by "
               "attribution --)", "sparsified vector", linestyle=style)
    ax_sparse.set_xscale("symlog", linthresh=1)  # 0% and 1% .. 100% on one axis
    ax_sparse.set_xlim(0, 110)
    ax_sweep.legend(fontsize=7)
    frozen_bars(ax_frozen, frozen)
    fig.suptitle(f"reading the steering vector of {subject.name} ({vector.hook}, "
                 f"positions {vector.positions})", fontsize=10)
    fig.tight_layout()
    return fig, record, read_vector_summary(readout, sweep, sparse, frozen, args.keep)


def shown_tokens(record, tokenizer, per_group=SHOWN_PER_GROUP):
    """The first tokens of every group, for the |cos| heatmap -> (labels, group of each)."""
    labels, groups = [], []
    for name, group in record["groups"].items():
        ids = group["token_ids"][:per_group]
        labels += [f"{name[:3]} {token_label(tokenizer, i)}" for i in ids]
        groups += [name] * len(ids)
    return labels, groups


def steer_run_vector(subject, run_dir, flag="--steer-run"):
    """--steer-run (or flag): a steering run of the same base model and task -> its vector."""
    if run_dir is None:
        return None
    cfg, mine = run_config(run_dir), subject.config
    if cfg.adapter != "steer":
        raise AnalysisError(f"{flag} {run_dir}: a {cfg.adapter} run, not a steering run")
    same = ("model", "task", "task_options", "seed", "pretrain_steps")
    differ = [name for name in same if getattr(cfg, name) != getattr(mine, name)]
    if differ:
        raise AnalysisError(f"{flag} {run_dir}: another base model or task than "
                            f"{subject.name} ({', '.join(differ)} differ)")
    return load_vector(run_dir, subject.model)


def norm_scatter(ax, record):
    for name, group in reversed(record["groups"].items()):  # the many unrelated tokens below
        ax.scatter(group["projections"], group["norms"], s=8, alpha=0.6, label=name)
    top = max(max(group["norms"]) for group in record["groups"].values())
    for slope in (1, -1):  # a diff on these lines lies along the natural vector
        ax.plot([0, slope * top], [0, top], color="gray", linewidth=0.8)
    ax.set(xlabel="projection on the natural vector's direction", ylabel="|diff|",
           title="per-token diffs: norm vs projection")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)


def sign_bars(ax, tokenizer, split, top=30):
    """Per token id, how many of its diffs point with (+) and against (-) the natural vector."""
    rows = sorted(split.items(), key=lambda kv: -(kv[1]["positive"] + kv[1]["negative"]))[:top]
    labels = [f"{token_label(tokenizer, t)}{'' if s['seen'] else ' (unseen)'}" for t, s in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [s["positive"] for _, s in rows], color="tab:red", label="+ (with)")
    ax.barh(y, [-s["negative"] for _, s in rows], color="tab:blue", label="- (against)")
    ax.set_yticks(y, labels, fontsize=6)
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set(xlabel="tokens", title="sign of the projection per token\n(unseen: not in fine-tuning)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)


def accuracy_bars(ax, accuracy):
    states = list(accuracy)
    keys = list(accuracy[states[0]])
    width = 0.8 / len(states)
    for i, state in enumerate(states):
        ax.bar([j + (i - (len(states) - 1) / 2) * width for j in range(len(keys))],
               [accuracy[state][k] for k in keys], width, label=state)
    ax.set_xticks(range(len(keys)), keys, fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title="in place of the LoRA")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)


def lora_vs_steering_summary(record):
    lines = [f"natural vector at {record['hook']}: |v| = {record['natural_norm']:.3f}"]
    if record["cos_natural_trained"] is not None:
        lines[0] += f", cos(natural, trained) = {record['cos_natural_trained']:+.3f}"
    elif record["steer_run"] is not None:
        lines[0] += ", cos(natural, trained): none, the trained vector is at other layers"
    for name, g in record["groups"].items():
        lines.append(f"{name:>16}: {g['n_tokens']} tokens, PC1 share {g['pc1_share']:.3f}, "
                     f"mean |cos| between diffs {g['mean_abs_cos']:.3f}, with the natural "
                     f"vector {g['mean_abs_cos_pc1']:.3f}, mean |diff| {g['mean_norm']:.3f}")
    for name, split in record["sign_split"].items():
        shares = split["positive_share"]
        cells = ", ".join(f"{kind} {'-' if share is None else f'{share:.2f}'}"
                          for kind, share in shares.items())
        lines.append(f"share of token diffs pointing with the {name} vector: {cells}")
    for state, scores in record["accuracy"].items():
        lines.append(f"{state:>16}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return lines


def lora_vs_steering_command(subject, args):
    lora_site(subject)  # a wrong run is refused before --steer-run is read
    trained = steer_run_vector(subject, args.steer_run)
    record = {"analysis": "lora_vs_steering", "subject": subject.name,
              "steer_run": args.steer_run, **lora_vs_steering(subject, trained, args.unrelated)}
    labels, _ = shown_tokens(record, subject.tokenizer)
    cos = torch.tensor(record.pop("shown_abs_cos"))
    record["shown"] = {"labels": labels, "abs_cos": cos.tolist()}
    fig = Figure(figsize=(24, 7))
    axes = fig.subplots(1, 4, width_ratios=[1.4, 1, 1, 1])
    heatmap(fig, axes[0], cos, labels, labels, "|cos| between per-token diffs", vmin=0, vmax=1,
            cmap="viridis")
    norm_scatter(axes[1], record)
    sign_bars(axes[2], subject.tokenizer, record["sign_split"]["natural"]["per_token"])
    accuracy_bars(axes[3], record["accuracy"])
    fig.suptitle(f"a LoRA read as a steering vector: {subject.name}, {record['hook']} "
                 f"(LoRA output minus base output per token)", fontsize=10)
    fig.tight_layout()
    return fig, record, lora_vs_steering_summary(record)


# -----------------------------------------------------------------------------
# A steering vector read in an SAE's features (sae.py): which decoder rows it points along, how
# few of them rebuild it, and which features its addition turns up or down on the eval prompts.

SPARSE_FIT_SIZES = (1, 2, 4, 8, 16)  # features allowed in the vector's sparse fits
RANDOM_FITS = 20  # random directions fitted the same way: the baseline of the sparse fits
# their seed: not a small one, since an SAE initialised under torch.manual_seed(0) starts with
# exactly the rows torch.randn draws from seed 0, and some keep them (cosine 0.85 after training)
RANDOM_FIT_SEED = 918_273_645
SHOWN_FEATURES = 12  # features in each bar chart


def run_sae(model, path, config=None):
    """--sae DIR -> the SAE, checked against the model (its hook exists and is as wide) and, when
    sae.py names the model it was trained on (model:task:seedN), against the run's config: a toy
    world of another seed is another model of the same width, and nothing else would tell."""
    try:
        s = sae.load_sae(path, device_of(model))
        sae.check_hook(model, s.cfg.hook_name, s)
    except sae.SAEError as e:
        raise AnalysisError(first_line(e)) from None
    trained_on = s.cfg.model_name.split(":")
    if config is not None and len(trained_on) == 3 and trained_on[2].startswith("seed"):
        run_model = f"{config.model}:{config.task}:seed{config.seed}"
        if s.cfg.model_name != run_model:
            raise AnalysisError(f"the SAE {path} was trained on {s.cfg.model_name}, the run's "
                                f"model is {run_model}")
    return s.eval().requires_grad_(False)


def vector_at(vector, hook_name):
    """The vector's direction that lands in the stream `hook_name` reads (added there, or added
    at a block's MLP output and so part of its hook_resid_post), or None."""
    for layer, direction in layer_directions(vector).items():
        if hook_name in (f"blocks.{layer}.{vector.hook}", landing_hook(vector, layer)):
            return direction
    return None


def unit_rows(W):
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def decoder_cosines(s, direction):
    """cos(direction, each decoder row) -> (d_sae,)."""
    return unit_rows(s.W_dec.detach().float().cpu()) @ unit(direction.float().cpu())


def fit_rows(s, direction, features):
    """The direction as a least-squares sum of the given features' decoder rows ->
    {"features", "coefficients", "unexplained": |residual|^2 / |direction|^2, "cos": cos(direction,
    its fit)}. The residual is orthogonal to the fit, so cos = sqrt(1 - unexplained)."""
    v = direction.float().cpu()
    features = torch.as_tensor(features, dtype=torch.long)
    rows = s.W_dec.detach().float().cpu()[features]  # (n, d)
    coefficients = torch.linalg.lstsq(rows.T, v[:, None]).solution[:, 0]  # (n,)
    residual = v - coefficients @ rows
    unexplained = (residual.norm() ** 2 / v.norm() ** 2).item()
    return {"features": features.tolist(), "coefficients": coefficients.tolist(),
            "unexplained": unexplained, "cos": max(0.0, 1 - unexplained) ** 0.5}


def sparse_fit(s, direction, n):
    """The direction as a least-squares sum of the n decoder rows most aligned with it."""
    return fit_rows(s, direction, decoder_cosines(s, direction).abs().topk(n).indices)


def sparse_fits(s, direction, sizes=SPARSE_FIT_SIZES, n_random=RANDOM_FITS,
                seed=RANDOM_FIT_SEED):
    """Sparse fits of the vector and, as the baseline, the mean unexplained share of random
    directions fitted the same way (with more features than dimensions, any vector fits)."""
    sizes = [n for n in sizes if n <= s.cfg.d_sae]
    g = torch.Generator().manual_seed(seed)
    randoms = torch.randn(n_random, s.cfg.d_in, generator=g)
    return {n: {**sparse_fit(s, direction, n),
                "random_unexplained": sum(sparse_fit(s, r, n)["unexplained"]
                                          for r in randoms) / n_random} for n in sizes}


def last_positions(mask):
    """mask (B, T) of real tokens, right-padded -> (B, T) True at each row's last real token."""
    last = torch.zeros_like(mask)
    last[torch.arange(len(mask)), mask.sum(1) - 1] = True
    return last


@torch.no_grad()
def feature_activations(subject, s, prompts, adapted):
    """The SAE's features at its hook over the prompts' tokens after position 0 (BOS: an attention
    sink the SAE never trains on, whose outsized stream and adapter difference would swamp the
    means), with or without the run's adapter -> (those tokens (N, d_sae), last prompt tokens
    (n_prompts, d_sae), the activations at those tokens (N, d_in))."""
    rows, last_rows, xs = [], [], []
    with subject.state(adapted):
        for tokens, mask in prompt_batches(prompts):
            x = sae.hook_activations(subject.model, tokens.to(device_of(subject.model)),
                                     s.cfg.hook_name).float().cpu()  # (B, T, d_in)
            f = s.encode(x.to(s.W_enc.device)).cpu()  # (B, T, d_sae)
            read = mask.clone()
            read[:, 0] = False  # (B, T)
            rows.append(f[read])
            last_rows.append(f[last_positions(mask)])
            xs.append(x[read])
    return torch.cat(rows), torch.cat(last_rows), torch.cat(xs)


def explained_variance(s, x):
    metrics, _ = sae.reconstruction_metrics(s, [x.to(s.W_enc.device)])
    return metrics["explained_variance"]


def activation_change(subject, s, prompts):
    """Per feature, its mean activation without and with the adapter, over all tokens and over
    the last prompt tokens (where the answer is read); and how well the SAE reconstructs the
    stream in each state (a vector that pushes the stream off the SAE's data shows here)."""
    base_all, base_last, base_x = feature_activations(subject, s, prompts, adapted=False)
    steer_all, steer_last, steer_x = feature_activations(subject, s, prompts, adapted=True)
    diffs = steer_x - base_x  # (N, d_in): what the adapter changes at the hook, token by token
    return {
        "all_tokens": {"base": base_all.mean(0), "steered": steer_all.mean(0)},
        "last_token": {"base": base_last.mean(0), "steered": steer_last.mean(0)},
        "mean_diff": diffs.mean(0),  # (d_in,)
        # |mean diff| / mean |diff|: 1 when every token moves the same way, ~0 when they cancel
        "diff_coherence": (diffs.mean(0).norm() / diffs.norm(dim=-1).mean().clamp_min(1e-30)
                           ).item(),
        "l0": {"base": (base_all > 0).float().sum(-1).mean().item(),
               "steered": (steer_all > 0).float().sum(-1).mean().item()},
        "explained_variance": {"base": explained_variance(s, base_x),
                               "steered": explained_variance(s, steer_x)},
        "n_tokens": len(base_all),
    }


def stream_scale(subject, s, prompts, n_prompts=64):
    """norm_scale of the unsteered stream at the SAE's hook, over the first prompts."""
    x = feature_activations(subject, s, prompts[:n_prompts], adapted=False)[2]
    return norm_scale(subject.model, x).mean().item()


def feature_tokens(subject, s, features, resid_scale, k=3):
    """{feature: the k tokens its decoder row boosts most through the final norm}."""
    rows = s.W_dec.detach().float()
    return {i: [label for label, _ in top_tokens(subject.tokenizer, vector_logits(
        subject.model, rows[i], resid_scale)["final_norm"], k)["boosted"]] for i in features}


def feature_rows(values, cosines, change, labels, order):
    """One record per feature of `order`: its cosine with the vector and its activations."""
    out = []
    for i in order:
        row = {"feature": i, "tokens": labels[i], "value": values[i].item()}
        row["cos"] = None if cosines is None else cosines[i].item()
        for where, means in change.items():
            row[f"{where}_base"] = means["base"][i].item()
            row[f"{where}_steered"] = means["steered"][i].item()
        out.append(row)
    return out


def adapter_direction(subject, s, mean_diff):
    """What the run writes into the SAE's stream -> (direction (d_in,), source): a steering vector
    where it lands in that stream; otherwise (a LoRA, a full fine-tune, a vector added elsewhere)
    the mean per-token difference there over the prompts, adapter on minus off."""
    if subject.adapter == "steer":
        direction = vector_at(subject.vector, s.cfg.hook_name)
        if direction is not None:
            return direction, "vector"
    return mean_diff, "mean_diff"


def sae_features(subject, s, prompts, top=SHOWN_FEATURES):
    """A run's adapter in the SAE's features -> record: decoder cosines and sparse fits of what it
    writes into the SAE's stream (adapter_direction), and the change of the feature activations
    with the adapter on."""
    change = activation_change(subject, s, prompts)
    means = {k: change.pop(k) for k in ("all_tokens", "last_token")}
    direction, source = adapter_direction(subject, s, change.pop("mean_diff"))
    cosines = decoder_cosines(s, direction)
    delta = {k: m["steered"] - m["base"] for k, m in means.items()}  # (d_sae,) each
    top = min(top, s.cfg.d_sae)
    by_cos = cosines.abs().topk(top).indices.tolist()
    by_delta = delta["last_token"].abs().topk(top).indices.tolist()
    by_delta_all = delta["all_tokens"].abs().topk(top).indices.tolist()
    labels = feature_tokens(subject, s, set(by_cos + by_delta + by_delta_all),
                            stream_scale(subject, s, prompts))
    # the mean change of the features, decoded: the part of the adapter's effect the SAE sees
    decoded = delta["all_tokens"].to(s.W_dec) @ s.W_dec.detach()
    vector = subject.vector if subject.adapter == "steer" else None
    return {"sae_hook": s.cfg.hook_name, "sae_activation": s.cfg.activation,
            "d_sae": s.cfg.d_sae, "k": s.cfg.k, "adapter": subject.adapter,
            "vector_hook": vector and vector.hook, "vector_layers": vector and vector.layers,
            "direction_source": source, "vector_norm": direction.norm().item(), **change,
            "decoder": feature_rows(cosines, cosines, means, labels, by_cos),
            "cosines": cosines.tolist(), "sparse_fit": sparse_fits(s, direction),
            "by_change_last_token": feature_rows(delta["last_token"], cosines, means, labels,
                                                 by_delta),
            "by_change_all_tokens": feature_rows(delta["all_tokens"], cosines, means, labels,
                                                 by_delta_all),
            "delta_all_tokens": delta["all_tokens"].tolist(),
            "delta_last_token": delta["last_token"].tolist(),
            "cos_decoded_change_vector": torch.nn.functional.cosine_similarity(
                decoded.cpu().float(), direction.float().cpu(), dim=0).item()}


def feature_bars(ax, rows, key, title):
    labels = [f"f{r['feature']} {' '.join(r['tokens'][:2])}" for r in rows]
    y = list(range(len(rows)))[::-1]
    values = [r[key] for r in rows]
    ax.barh(y, values, color=["tab:red" if v > 0 else "tab:blue" for v in values])
    ax.set_yticks(y, labels, fontsize=7)
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_title(title, fontsize=9)


def direction_label(record):
    if record["direction_source"] == "vector":
        return f"the vector (at {record['vector_hook']}, blocks {record['vector_layers']})"
    return f"the {record['adapter']} run's mean token difference (adapter on - off)"


def sae_features_summary(record):
    lines = [f"SAE at {record['sae_hook']} ({record['sae_activation']}, {record['d_sae']} "
             f"features); read: {direction_label(record)}"]
    ev = record["explained_variance"]
    lines.append(f"SAE on the eval prompts' {record['n_tokens']} tokens: explained variance base "
                 f"{ev['base']:.3f}, adapted {ev['steered']:.3f}; L0 base "
                 f"{record['l0']['base']:.2f}, adapted {record['l0']['steered']:.2f}; token "
                 f"differences' coherence |mean| / mean |diff| = {record['diff_coherence']:.3f}")
    cells = ", ".join(f"f{r['feature']} {r['cos']:+.2f} ({' '.join(r['tokens'][:2])})"
                      for r in record["decoder"][:5])
    lines.append(f"decoder cosines (|v| = {record['vector_norm']:.3f}): {cells}")
    fits = ", ".join(f"{n}: {f['unexplained']:.2f} (random {f['random_unexplained']:.2f})"
                     for n, f in record["sparse_fit"].items())
    lines.append(f"unexplained share of |v|^2 by its n most aligned features: {fits}")
    cos = record["cos_decoded_change_vector"]
    lines.append(f"cos(mean feature change decoded, v) = {cos:+.3f}")
    cells = ", ".join(f"f{r['feature']} {r['last_token_base']:.2f} -> "
                      f"{r['last_token_steered']:.2f} ({' '.join(r['tokens'][:2])})"
                      for r in record["by_change_last_token"][:5])
    lines.append(f"largest changes at the last prompt token: {cells}")
    return lines


def adapter_run(subject, analysis):
    """The run's adapter is what an SAE analysis reads: any train.py run, not a checkpoint."""
    if subject.config is None or not subject.adapter:
        raise AnalysisError(f"{analysis} reads a train.py run (--run), given a plain checkpoint: "
                            f"{subject.name}")


def sae_features_command(subject, args):
    adapter_run(subject, "sae_features")
    s = run_sae(subject.model, args.sae, subject.config)
    sets = chosen_sets(subject, args.sets)
    prompts = [item.prompt for eval_set in sets.values() for item in eval_set.items]
    record = {"analysis": "sae_features", "subject": subject.name, "sae": args.sae,
              "sets": list(sets), **sae_features(subject, s, prompts)}
    fig = Figure(figsize=(20, 6))
    ax_cos, ax_last, ax_all, ax_scatter = fig.subplots(1, 4)
    feature_bars(ax_cos, record["decoder"], "cos", "decoder rows most aligned with v")
    ax_scatter.scatter(record["cosines"], record["delta_all_tokens"], s=8)
    ax_scatter.set(xlabel="cos(decoder row, v)", ylabel="mean change (all tokens)")
    ax_scatter.set_title("every feature", fontsize=9)
    feature_bars(ax_last, record["by_change_last_token"], "value",
                 "mean activation change with the adapter\n(last prompt token)")
    feature_bars(ax_all, record["by_change_all_tokens"], "value",
                 "mean activation change with the adapter\n(all tokens)")
    fig.suptitle(f"{direction_label(record)} = v, of {subject.name}, in the features of the SAE "
                 f"{args.sae}", fontsize=10)
    fig.tight_layout()
    return fig, record, sae_features_summary(record)


# -----------------------------------------------------------------------------
# An SAE's features over its own corpus (sae.task_corpus: a toy world's pretraining documents or a
# text task's texts), read with the base model: the contexts where a feature fires most, which
# features track a persona world's latent persona, whether a steering vector is a sparse sum of
# its target persona's features, and whether SAE features locate the persona better than single
# dimensions of the stream or MLP neurons do (the MIB benchmark's question).

CORPUS_SEQS = 2000  # corpus sequences the corpus analyses read (toy: 64k tokens)
CORPUS_SEED = 0  # which ones: a seeded draw, since a text task's corpus ends with its eval prompts
CONTEXT_BEFORE, CONTEXT_AFTER = 6, 1  # tokens shown around a max-activating token
PERSONA_FIT_SIZES = (1, 2, 4, 8, 16)  # features in a vector's fit on one persona's features
PROBE_SIZES = (1, 2, 4, 8, 16)  # units a persona probe may read
PROBE_TEST_SHARE = 0.25  # documents held out for the probes' accuracy


def corpus_sample(subject, n=CORPUS_SEQS, seed=CORPUS_SEED):
    """The SAE corpus of the run's task, n of its sequences drawn at random (in corpus order)."""
    corpus = sae.task_corpus(subject.task, subject.tokenizer)
    g = torch.Generator().manual_seed(seed)
    return corpus.rows(torch.randperm(len(corpus), generator=g)[:n].sort().values)


def row_chunks(corpus, max_tokens=sae.EVAL_TOKENS):
    """-> [(row indices, Corpus of those rows)] in corpus order: feature positions must map back
    to (row, position), which Corpus.batches' length-sorted order would lose."""
    per = max(1, max_tokens // corpus.tokens.shape[1])
    return [(idx, corpus.rows(idx)) for idx in torch.arange(len(corpus)).split(per)]


@torch.no_grad()
def top_activations(model, s, corpus, n_top, max_tokens=sae.EVAL_TOKENS):
    """Each feature's n_top largest activations over the corpus's read positions -> values
    (n_top, d_sae), rows (n_top, d_sae) and positions (n_top, d_sae) where they occur; a running
    top n_top, so a large corpus's features never sit in memory at once."""
    values = torch.zeros(0, s.cfg.d_sae)
    where = torch.zeros(0, s.cfg.d_sae, dtype=torch.long)  # flat index into `places`
    places = []  # (n, 2) [row, position] per chunk
    for idx, rows in row_chunks(corpus, max_tokens):
        x = sae.hook_activations(model, rows.tokens.to(device_of(model)), s.cfg.hook_name)
        f = s.encode(x.float().to(s.W_enc.device)).cpu()[rows.mask]  # (n, d_sae)
        at = rows.mask.nonzero()  # (n, 2)
        at[:, 0] = idx[at[:, 0]]
        flat = sum(len(p) for p in places) + torch.arange(len(f))  # (n,)
        places.append(at)
        values = torch.cat([values, f])
        where = torch.cat([where, flat[:, None].expand(-1, s.cfg.d_sae)])
        top = values.topk(min(n_top, len(values)), dim=0)  # (n_top, d_sae)
        values, where = top.values, where.gather(0, top.indices)
    places = torch.cat(places)  # (N, 2)
    return values, places[where, 0], places[where, 1]


def context_text(tokenizer, tokens, position, before=CONTEXT_BEFORE, after=CONTEXT_AFTER):
    """A token in its context: `a b [[c]] d`, with `...` where the sequence goes on."""
    tokens = tokens.tolist()
    start = max(0, position - before)
    left = token_labels(tokenizer, tokens[start:position])
    right = token_labels(tokenizer, tokens[position + 1 : position + 1 + after])
    marked = f"[[{token_label(tokenizer, tokens[position])}]]"
    parts = (["..."] if start > 0 else []) + left + [marked]
    return " ".join(parts + right)


def real_tokens(corpus, row):
    """A corpus row without its right padding."""
    return corpus.tokens[row, : corpus.lengths[row]]


def top_contexts(subject, s, corpus, features, n_top):
    """{feature: [{"activation", "row", "position", "text"}]}: its n_top largest activations."""
    values, rows, positions = top_activations(subject.model, s, corpus, n_top)
    out = {}
    for i in features:
        out[i] = [{"activation": values[j, i].item(), "row": int(rows[j, i]),
                   "position": int(positions[j, i]),
                   "text": context_text(subject.tokenizer, real_tokens(corpus, rows[j, i]),
                                        int(positions[j, i]))}
                  for j in range(len(values)) if values[j, i] > 0]
    return out


def changed_features(subject, s, n):
    """The n features whose mean activation at the last prompt token of the run's eval prompts
    the adapter changes most (sae_features' ranking)."""
    prompts = [item.prompt for eval_set in chosen_sets(subject, None).values()
               for item in eval_set.items]
    last = activation_change(subject, s, prompts)["last_token"]
    return (last["steered"] - last["base"]).abs().topk(min(n, s.cfg.d_sae)).indices.tolist()


def feature_ids(text, d_sae):
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        raise AnalysisError(f"--features {text!r}: expected comma-separated feature ids") from None
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise AnalysisError(f"--features {bad}: the SAE has features 0..{d_sae - 1}")
    return ids


def sae_top_contexts_summary(record):
    lines = [f"max-activating contexts over {record['n_sequences']} corpus sequences "
             f"({record['n_tokens']} tokens), SAE at {record['sae_hook']}; features "
             f"{record['chosen_by']}"]
    for feature, contexts in record["contexts"].items():
        lines.append(f"f{feature}:" + ("" if contexts else " never active"))
        lines += [f"  {c['activation']:7.3f}  {c['text']}" for c in contexts]
    return lines


def sae_top_contexts_command(subject, args):
    adapter_run(subject, "sae_top_contexts")
    s = run_sae(subject.model, args.sae, subject.config)
    if args.features:
        features, chosen_by = feature_ids(args.features, s.cfg.d_sae), "given (--features)"
    else:
        features = changed_features(subject, s, args.n_features)
        chosen_by = "most changed by the adapter at the last eval-prompt token"
    corpus = corpus_sample(subject, args.sequences)
    contexts = top_contexts(subject, s, corpus, features, args.top)
    record = {"analysis": "sae_top_contexts", "subject": subject.name, "sae": args.sae,
              "sae_hook": s.cfg.hook_name, "chosen_by": chosen_by, "features": features,
              "n_sequences": len(corpus), "n_tokens": int(corpus.mask.sum()),
              "contexts": contexts}
    fig = Figure(figsize=(7 * min(3, len(features)), 3 * -(-len(features) // 3) + 1))
    for ax, feature in zip(fig.subplots(-(-len(features) // 3), min(3, len(features)),
                                        squeeze=False).flat, features):
        rows = contexts[feature][::-1]
        ax.barh(range(len(rows)), [c["activation"] for c in rows], color="tab:red")
        ax.set_yticks(range(len(rows)), [c["text"] for c in rows], fontsize=6)
        ax.set_title(f"f{feature}", fontsize=9)
    fig.suptitle(f"max-activating contexts, SAE {args.sae} ({chosen_by})", fontsize=10)
    fig.tight_layout()
    return fig, record, sae_top_contexts_summary(record)


# Persona worlds (toy.PersonaWorld and its kin): the persona is each pretraining document's latent.
# It is read off the document's own tokens (a name segment `ME P_k`, or an attribute segment
# `AT_t V`, whose value belongs to one persona), not from the generator's draws. Features are read
# at the query tokens ME and AT_t: the same token for every persona, and the next token is the
# persona's name or value, so the stream there must carry the persona.


def persona_world(subject, analysis):
    world = subject.task
    if not all(hasattr(world, a) for a in ("n_personas", "value", "value_id", "ids")):
        raise AnalysisError(f"{analysis} reads a persona world (persona, persona_hard, backdoor), "
                            f"given task {subject.config.task!r}")
    return world


def persona_table(world):
    """(vocab, vocab) long: the persona a token pair (ME, P_k) or (AT_t, value) names, else -1."""
    table = torch.full((world.tokenizer.vocab_size,) * 2, -1, dtype=torch.long)
    for k in range(world.n_personas):
        table[world.ids["ME"], world.ids[f"P{k}"]] = k
        for t in range(len(world.value[k])):
            table[world.ids[f"AT{t}"], world.value_id(t, world.value[k][t])] = k
    return table


def document_personas(world, tokens):
    """tokens (N, T) -> (N,) the persona each document names, -1 where none does; documents
    naming two personas are an error (not one persona per document)."""
    named = persona_table(world)[tokens[:, :-1], tokens[:, 1:]]  # (N, T-1)
    first = named.max(1).values  # (N,)
    lowest = named.masked_fill(named < 0, world.n_personas).min(1).values
    if ((first >= 0) & (lowest != first)).any():
        raise AnalysisError("a document names two personas: not a persona world's documents")
    return first


def query_mask(world, tokens):
    """tokens (N, T) -> (N, T) bool: the ME and AT_t tokens."""
    queries = [world.ids["ME"]] + [world.ids[f"AT{t}"] for t in range(len(world.value[0]))]
    return torch.isin(tokens, torch.tensor(queries))


def mlp_hook(hook_name):
    """blocks.L.* -> blocks.L.mlp.hook_post (the MLP neurons that write into block L's output)."""
    parts = hook_name.split(".")
    return f"blocks.{parts[1]}.mlp.hook_post" if parts[0] == "blocks" else None


@torch.no_grad()
def persona_units(subject, s, corpus, world):
    """At the query tokens of the documents that name a persona -> ({"sae": features (n, d_sae),
    "stream": the SAE's input dimensions (n, d_in), "mlp": the block's MLP neurons (n, d_mlp)},
    personas (n,), documents (n,))."""
    personas = document_personas(world, corpus.tokens)  # (N,)
    names = [s.cfg.hook_name] + ([mlp_hook(s.cfg.hook_name)] if mlp_hook(s.cfg.hook_name) in
                                 subject.model.hook_points() else [])
    units, labels, docs = {"sae": [], "stream": [], "mlp": []}, [], []
    for idx, rows in row_chunks(corpus):
        read = query_mask(world, rows.tokens) & rows.mask & (personas[idx] >= 0)[:, None]
        _, acts = subject.model.run_with_cache(rows.tokens.to(device_of(subject.model)),
                                               names_filter=names)
        x = acts[s.cfg.hook_name].float().cpu()[read]  # (n, d_in)
        units["stream"].append(x)
        units["sae"].append(s.encode(x.to(s.W_enc.device)).cpu())
        if len(names) > 1:
            units["mlp"].append(acts[names[1]].float().cpu()[read])
        labels.append(personas[idx][:, None].expand_as(read)[read])
        docs.append(idx[:, None].expand_as(read)[read])
    units = {kind: torch.cat(xs) for kind, xs in units.items() if xs}
    labels, docs = torch.cat(labels), torch.cat(docs)
    for k in range(world.n_personas):  # every persona needs tokens in training and held out
        if len(docs[labels == k].unique()) < 4:
            raise AnalysisError(f"persona {k} has query tokens in fewer than 4 of the "
                                f"{len(corpus)} sequences read: raise --sequences")
    return units, labels, docs


def persona_means(f, personas, n_personas):
    """f (n, u), personas (n,) -> (K, u): each unit's mean activation per persona."""
    return torch.stack([f[personas == k].mean(0) for k in range(n_personas)])


def selectivity(means):
    """(K, d_sae) mean activations (>= 0) -> (d_sae,): the best persona's share of the feature's
    summed per-persona means; 1/K fires alike for every persona, 1 for one persona only."""
    return means.max(0).values / means.sum(0).clamp_min(1e-12)


def persona_aurocs(f, personas, n_personas):
    """f (n, u), personas (n,) -> (K, u): each unit's one-vs-rest AUROC for each persona (0.5:
    blind to it; 1: higher on every token of it than on any other's). Scale-free, so a feature of
    large activation that every persona's query tokens turn on does not outrank one that fires for
    one persona only; the same score ranks units for the probes below."""
    ranks = average_ranks(f)
    return torch.stack([aurocs(ranks, personas == k) for k in range(n_personas)])


def random_fits(s, direction, live, n, n_random=RANDOM_FITS, seed=RANDOM_FIT_SEED):
    """Mean cos(direction, its fit) on n features drawn at random among the live ones."""
    g = torch.Generator().manual_seed(seed)
    draws = [live[torch.randperm(len(live), generator=g)[:n]] for _ in range(n_random)]
    return sum(fit_rows(s, direction, d)["cos"] for d in draws) / n_random


def persona_fits(s, direction, scores, target, live, sizes=PERSONA_FIT_SIZES):
    """{n: cos(vector, its least-squares fit)} on the n features of highest AUROC for the target
    persona, the same for each other persona, n random live features, and the n features most
    aligned with the vector (sparse_fit: near the best any n features do, a ceiling)."""
    out = {}
    for n in [n for n in sizes if n <= len(live)]:
        own = scores.topk(n, dim=1).indices  # (K, n)
        target_fit = fit_rows(s, direction, own[target])
        others = [fit_rows(s, direction, own[k])["cos"] for k in range(len(scores)) if k != target]
        out[n] = {"target": target_fit["cos"], "target_features": target_fit["features"],
                  "target_coefficients": target_fit["coefficients"],
                  "other_personas": others, "random": random_fits(s, direction, live, n),
                  "most_aligned": sparse_fit(s, direction, n)["cos"]}
    return out


def persona_feature_rows(means, sel, scores, n):
    """Per persona: its n features of highest AUROC with their mean and selectivity."""
    return [[{"feature": int(i), "auroc": scores[k, i].item(), "mean": means[k, i].item(),
              "selectivity": sel[i].item()} for i in scores[k].topk(n).indices]
            for k in range(len(means))]


def sae_personas(subject, s, corpus, world, shown=3):
    """Which features track which persona (means, selectivity, AUROC at the query tokens) and,
    for a steering run whose vector lands in the SAE's stream, its fits on persona features."""
    units, personas, _ = persona_units(subject, s, corpus, world)
    means = persona_means(units["sae"], personas, world.n_personas)  # (K, d_sae)
    sel, scores = selectivity(means), persona_aurocs(units["sae"], personas, world.n_personas)
    live = (units["sae"] > 0).any(0).nonzero()[:, 0]  # (n_live,)
    record = {"sae_hook": s.cfg.hook_name, "n_tokens": len(personas),
              "per_persona_tokens": torch.bincount(personas, minlength=world.n_personas).tolist(),
              "means": means.tolist(), "selectivity": sel.tolist(), "n_live": len(live),
              "selective_features": {f"{t:.2f}": int((sel > t).sum()) for t in (0.5, 0.9)},
              "top_features": persona_feature_rows(means, sel, scores, shown),
              "target": world.target, "fits": None}
    direction = vector_at(subject.vector, s.cfg.hook_name) if subject.adapter == "steer" else None
    if direction is not None:
        record["fits"] = persona_fits(s, direction, scores, world.target, live)
    return record


def sae_personas_summary(record):
    K = len(record["means"])
    lines = [f"SAE at {record['sae_hook']}: features at the ME / AT_t tokens of "
             f"{record['n_tokens']} query tokens; {record['n_live']} live features, selectivity "
             f"(1/K = {1 / K:.3f} .. 1) > 0.5: {record['selective_features']['0.50']}, > 0.9: "
             f"{record['selective_features']['0.90']}"]
    for k, rows in enumerate(record["top_features"]):
        cells = ", ".join(f"f{r['feature']} AUROC {r['auroc']:.2f} (mean {r['mean']:.2f}, sel "
                          f"{r['selectivity']:.2f})" for r in rows)
        lines.append(f"persona {k}: {cells}")
    if record["fits"] is None:
        lines.append("no steering vector in the SAE's stream: no persona fits")
        return lines
    lines.append(f"cos(vector, its fit on n features) for target persona {record['target']}: "
                 "n: target / other personas mean (max) / random / most aligned")
    for n, fit in record["fits"].items():
        others = fit["other_personas"]
        lines.append(f"  {n:2}: {fit['target']:.3f} / {sum(others) / len(others):.3f} "
                     f"({max(others):.3f}) / {fit['random']:.3f} / {fit['most_aligned']:.3f}")
    return lines


def sae_personas_command(subject, args):
    adapter_run(subject, "sae_personas")
    world = persona_world(subject, "sae_personas")
    s = run_sae(subject.model, args.sae, subject.config)
    record = {"analysis": "sae_personas", "subject": subject.name, "sae": args.sae,
              **sae_personas(subject, s, corpus_sample(subject, args.sequences), world)}
    fig = Figure(figsize=(14, 5))
    ax_heat, ax_fit = fig.subplots(1, 2)
    shown = [r["feature"] for rows in record["top_features"] for r in rows]
    means = torch.tensor(record["means"])[:, shown]  # (K, shown)
    ax_heat.imshow(means.numpy(), aspect="auto", cmap="viridis")
    ax_heat.set_xticks(range(len(shown)), [f"f{i}" for i in shown], fontsize=6, rotation=90)
    ax_heat.set(ylabel="persona", title="mean activation at ME / AT_t tokens, each persona's "
                "top features")
    if record["fits"] is not None:
        sizes = list(record["fits"])
        for key, label in (("target", f"target persona {record['target']}'s features"),
                           ("random", "random live features"),
                           ("most_aligned", "most aligned features (ceiling)")):
            ax_fit.plot(sizes, [record["fits"][n][key] for n in sizes], marker="o", label=label)
        ax_fit.plot(sizes, [max(record["fits"][n]["other_personas"]) for n in sizes],
                    marker="o", label="another persona's features (best)")
        ax_fit.set(xscale="log", xlabel="features n", ylabel="cos(vector, its fit)",
                   title="the steering vector as a sum of n features")
        ax_fit.legend(fontsize=8)
    fig.tight_layout()
    return fig, record, sae_personas_summary(record)


# SAE features against neurons on the persona: for each persona p, one-vs-rest, the units (SAE
# features, dimensions of the stream the SAE reads, the block's MLP neurons) are ranked by how well
# each alone separates p's query tokens from the others' on training documents (|AUROC - 0.5|),
# and a logistic probe on the k best is scored on held-out documents (balanced accuracy, chance
# 0.5). A question that can come out either way: if the persona lives in a few SAE features and
# not in a few neurons, the SAE's curve rises first.


def average_ranks(x):
    """x (n, u) -> (n, u): each column's 1-based ranks, tied values sharing their mean rank."""
    ranks = torch.empty_like(x, dtype=torch.float64)
    for j in range(x.shape[1]):
        _, inverse, counts = torch.unique(x[:, j], return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        ranks[:, j] = (ends - (counts.double() - 1) / 2)[inverse]
    return ranks


def aurocs(ranks, y):
    """ranks (n, u) from average_ranks, y (n,) bool -> (u,): P(a positive outranks a negative),
    ties counted half (the Mann-Whitney U statistic over n_pos * n_neg)."""
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return ((ranks[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


def fit_probe(x, y, l2=1e-3, steps=100):
    """Logistic regression on standardised x (n, k), classes weighted to count alike -> a function
    from x to logits (n,)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.where(y, 0.5 / y.float().mean(), 0.5 / (1 - y.float().mean()))  # (n,)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = (weight * torch.nn.functional.binary_cross_entropy_with_logits(
            z @ w + b, y.float(), reduction="none")).mean() + l2 * w.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    w, b = w.detach(), b.detach()
    return lambda x_new: ((x_new - mean) / std) @ w + b


def balanced_accuracy(predicted, y):
    """Mean of the true positive and true negative rates: 0.5 is chance whatever the class mix."""
    return 0.5 * ((predicted & y).sum() / y.sum() + (~predicted & ~y).sum() / (~y).sum()).item()


def document_split(docs, share=PROBE_TEST_SHARE, seed=CORPUS_SEED):
    """docs (n,) -> (n,) bool, True for tokens of held-out documents (a token's neighbours in its
    document share its persona: splitting tokens would leak it)."""
    unique = docs.unique()
    g = torch.Generator().manual_seed(seed)
    held = unique[torch.randperm(len(unique), generator=g)[: max(1, int(share * len(unique)))]]
    return torch.isin(docs, held)


def probe_curve(x, personas, test, n_personas, sizes=PROBE_SIZES):
    """One kind of unit -> {k: held-out balanced accuracy per persona} with the k units of best
    training AUROC, plus "all" units, and the best single unit per persona."""
    ranks = average_ranks(x[~test])
    sizes = [k for k in sizes if k <= x.shape[1]] + ["all"]
    curve, best = {k: [] for k in sizes}, []
    for p in range(n_personas):
        y = personas == p
        order = (aurocs(ranks, y[~test]) - 0.5).abs().argsort(descending=True)
        best.append(int(order[0]))
        for k in sizes:
            units = order if k == "all" else order[:k]
            probe = fit_probe(x[~test][:, units], y[~test])
            curve[k].append(balanced_accuracy(probe(x[test][:, units]) > 0, y[test]))
    return {"accuracy": {str(k): v for k, v in curve.items()}, "best_unit": best,
            "n_units": x.shape[1]}


def sae_vs_neurons(subject, s, corpus, world):
    """Persona probes on the k best units of each kind, scored on held-out documents -> record."""
    units, personas, docs = persona_units(subject, s, corpus, world)
    test = document_split(docs)
    curves = {kind: probe_curve(x, personas, test, world.n_personas)
              for kind, x in tqdm(units.items(), desc="probes", disable=None, leave=False)}
    return {"sae_hook": s.cfg.hook_name, "mlp_hook": mlp_hook(s.cfg.hook_name),
            "n_tokens": len(personas), "n_test_tokens": int(test.sum()), "curves": curves}


def mean(values):
    return sum(values) / len(values)


def sae_vs_neurons_summary(record):
    kinds = {"sae": "SAE features", "stream": f"{record['sae_hook']} dims",
             "mlp": f"{record['mlp_hook']} neurons"}
    lines = [f"persona probes (one vs rest, held-out balanced accuracy, chance 0.5) on the k "
             f"units of best training AUROC; {record['n_tokens']} ME / AT_t tokens, "
             f"{record['n_test_tokens']} held out. Mean over personas (worst):"]
    for kind, curve in record["curves"].items():
        cells = ", ".join(f"{k}: {mean(v):.3f} ({min(v):.3f})"
                          for k, v in curve["accuracy"].items())
        lines.append(f"  {kinds[kind]} ({curve['n_units']}): {cells}")
    return lines


def sae_vs_neurons_command(subject, args):
    adapter_run(subject, "sae_vs_neurons")
    world = persona_world(subject, "sae_vs_neurons")
    s = run_sae(subject.model, args.sae, subject.config)
    record = {"analysis": "sae_vs_neurons", "subject": subject.name, "sae": args.sae,
              **sae_vs_neurons(subject, s, corpus_sample(subject, args.sequences), world)}
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for kind, curve in record["curves"].items():
        sizes = [k for k in curve["accuracy"] if k != "all"]
        ax.plot([int(k) for k in sizes], [mean(curve["accuracy"][k]) for k in sizes], marker="o",
                label=f"{kind} ({curve['n_units']} units; all: "
                f"{mean(curve['accuracy']['all']):.3f})")
    ax.axhline(0.5, color="gray", linewidth=0.8)
    ax.set(xscale="log", xlabel="units k the probe reads", ylabel="held-out balanced accuracy",
           title="which persona? one vs rest, mean over personas")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, record, sae_vs_neurons_summary(record)


# -----------------------------------------------------------------------------
# The lens of a steering vector per layer, and where its effect falls in a continuation (Sinii et
# al. 2025): each layer's vector read through the final norm and the unembedding (read_vector's
# readout), and KL(steered || base) of the next-token distribution at the first generated tokens
# of a greedy steered continuation, for the whole vector and for each layer's vector alone. The
# paper's last-layer vector acts on the first generated token: its KL sits at position 0.

LENS_TOKENS = 3  # top boosted tokens of each layer that get a column in the heatmap


def layer_alone(vector, layer):
    """A copy of the vector with every other layer's direction zeroed."""
    keep = {l: torch.full((vector.d_model,), l == layer) for l in vector.layers}
    return sparsified(vector, keep)


def length_groups(prompts):
    """[token-id list] -> {length: [index]}: prompts of one length run as one batch."""
    groups = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(i)
    return groups


def next_token_kl(steered, base):
    """logits (..., vocab) twice -> KL(steered || base) (...), in fp32."""
    logp, logq = steered.float().log_softmax(-1), base.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def continued_mask(new_tokens, eos_ids):
    """new_tokens (B, m) -> bool (B, m): True at the positions predicted before any end id was
    generated (the first one's always; generate repeats the end id after it)."""
    ended = torch.isin(new_tokens, torch.tensor(sorted(set(eos_ids)), dtype=torch.long,
                                                device=new_tokens.device))  # (B, m)
    before = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], 1).cumsum(1)  # (B, m)
    return before == 0


@torch.no_grad()
def continuation_kl(model, vector, prompts, n_new=8, eos_ids=()):
    """-> kl (P, n_new), valid (P, n_new) bool: at generated position j (0 = the first generated
    token, read at the last prompt position), KL(steered || base) of the next-token distribution
    along the greedy continuation of the steered model. Both runs read the same tokens (teacher
    forcing); valid is False past the first end id and past the model's context."""
    kl = torch.zeros(len(prompts), n_new)
    valid = torch.zeros(len(prompts), n_new, dtype=torch.bool)
    for length, index in length_groups(prompts).items():
        m = min(n_new, model.cfg.n_ctx - length)
        if m <= 0:
            continue
        tokens = torch.tensor([prompts[i] for i in index], device=device_of(model))  # (B, L)
        lengths = torch.full((len(index),), length, device=tokens.device)  # (B,)
        with vector.apply(model, prompt_lengths=lengths):
            seqs = generate(model, tokens, m, eos_ids=eos_ids)  # (B, L + m'), m' <= m
            steered = model(seqs)  # (B, L + m', vocab)
        base = model(seqs)
        n = seqs.shape[1] - length  # m'
        at = slice(length - 1, length - 1 + n)
        kl[index, :n] = next_token_kl(steered[:, at], base[:, at]).cpu()  # (B, m')
        valid[index, :n] = continued_mask(seqs[:, length:], eos_ids).cpu()
    return kl, valid


def position_means(kl, valid):
    """(P, n) twice -> [mean over the valid prompts, or None where none is] per position."""
    counts = valid.sum(0)  # (n,)
    sums = (kl * valid).sum(0)  # (n,)
    return [s.item() / c.item() if c else None for s, c in zip(sums, counts)]


def first_token_share(means):
    """The share of the summed per-position KL that falls at the first generated token."""
    shown = [m for m in means if m is not None]
    total = sum(shown)
    return means[0] / total if shown and means[0] is not None and total > 0 else None


def kl_profile(model, vector, prompts, n_new, eos_ids):
    kl, valid = continuation_kl(model, vector, prompts, n_new, eos_ids)
    means = position_means(kl, valid)
    return {"kl": means, "prompts": valid.sum(0).tolist(), "first_share": first_token_share(means)}


def kl_profiles(model, vector, prompts, n_new=8, eos_ids=()):
    """-> {"all": the whole vector's profile, layer: that layer's vector alone} (alone only where
    the vector has several layers)."""
    out = {"all": kl_profile(model, vector, prompts, n_new, eos_ids)}
    if len(vector.layers) > 1:
        for layer in tqdm(vector.layers, desc="kl per layer", disable=None, leave=False):
            out[layer] = kl_profile(model, layer_alone(vector, layer), prompts, n_new, eos_ids)
    return out


def lens_matrix(model, tokenizer, vector, readout, k=LENS_TOKENS):
    """-> (logits (n_layers, n_tokens), token labels): every layer's final-norm lens on the union
    of each layer's top-k boosted tokens."""
    rows = torch.stack([vector_logits(model, direction, readout[layer]["resid_scale"])
                        ["final_norm"] for layer, direction in layer_directions(vector).items()])
    ids = []
    for row in rows:
        ids += [i for i in row.topk(min(k, row.numel())).indices.tolist() if i not in ids]
    return rows[:, ids], token_labels(tokenizer, ids)


def profile_label(key):
    return "all layers" if key == "all" else f"layer {key} alone"


def vector_lens_summary(record):
    lines = []
    for layer, r in record["readout"].items():
        ups = ", ".join(f"{label} {v:+.2f}" for label, v in r["final_norm"]["boosted"][:5])
        downs = ", ".join(f"{label} {v:+.2f}" for label, v in r["final_norm"]["suppressed"][:5])
        lines.append(f"layer {layer}: |v| = {r['relative_norm']:.2f} x mean |resid|; boosted "
                     f"{ups}; suppressed {downs}")
    for key, p in record["kl"].items():
        cells = " ".join("-" if v is None else f"{v:.3f}" for v in p["kl"])
        share = "-" if p["first_share"] is None else f"{p['first_share']:.0%}"
        lines.append(f"KL(steered || base) per generated position, {profile_label(key)}: "
                     f"{cells} ({share} at the first token)")
    return lines


def vector_lens_command(subject, args):
    vector = steering_run(subject, "vector_lens")
    layer_directions(vector)  # a codename vector is refused before anything runs
    sets = chosen_sets(subject, args.sets)
    model = subject.model
    prompts = [item.prompt for eval_set in sets.values() for item in eval_set.items]
    prompts = prompts[: args.prompts]
    readout = vector_readout(model, subject.tokenizer, vector, prompts, args.top_k)
    eos = train.eos_ids(subject.task, subject.tokenizer)
    profiles = kl_profiles(model, vector, prompts, args.new_tokens, eos)
    values, labels = lens_matrix(model, subject.tokenizer, vector, readout)
    record = {"analysis": "vector_lens", "subject": subject.name, "sets": list(sets),
              "n_prompts": len(prompts), "hook": vector.hook, "positions": vector.positions,
              "layers": vector.layers, "lens": "unembedding of ln_final's linear part applied to "
              "v, at the mean norm scale of the residual stream where v lands (read_vector)",
              "continuation": "greedy, steered; KL(steered || base) at each generated position, "
              "both runs on the same tokens", "readout": readout, "kl": profiles,
              "heatmap": {"tokens": labels, "logits": values.tolist()}}
    fig = Figure(figsize=(max(8, 0.35 * len(labels) + 3) + 7, max(4, 0.3 * len(readout) + 2)))
    ax_lens, ax_kl = fig.subplots(1, 2, width_ratios=[max(1, len(labels) / 10), 1])
    heatmap(fig, ax_lens, values, labels, [f"layer {l}" for l in readout],
            "each layer's vector through the final norm and unembedding (logits)",
            **symmetric_limits(values))
    for key, p in profiles.items():
        ax_kl.plot(range(len(p["kl"])), [float("nan") if v is None else v for v in p["kl"]],
                   marker="o", label=profile_label(key), linewidth=2 if key == "all" else 0.8)
    ax_kl.set(xlabel="generated position (0 = first token)", ylabel="mean KL(steered || base)",
              title="the vector's effect along a greedy steered continuation")
    ax_kl.title.set_fontsize(9)
    ax_kl.legend(fontsize=6)
    fig.suptitle(f"the steering vector of {subject.name} per layer ({vector.hook}, positions "
                 f"{vector.positions}; {len(prompts)} prompts)", fontsize=10)
    fig.tight_layout()
    return fig, record, vector_lens_summary(record)


# -----------------------------------------------------------------------------
# Vectors trained in isolation, combined (Sinii et al. 2025): several steering runs of one base
# model and task, usually each at a single layer, applied together; each run's accuracy alone
# beside all of them at once, and beside the sum of their effects alone (additive if it matches).


@contextmanager
def all_applied(model, vectors):
    """Every vector added at once inside the block (hooks at one point add up)."""
    with ExitStack() as stack:
        for vector in vectors:
            stack.enter_context(vector.apply(model))
        yield model


def combined_accuracy(model, vectors, eval_sets, batch_size=64):
    """{run: vector} -> {"base", run..., "combined": {key: accuracy}, "sum_of_effects": base plus
    every run's change alone, per key}."""
    device = device_of(model)
    out = {"base": tasks.evaluate(model, eval_sets, batch_size, device)}
    for name, vector in tqdm(vectors.items(), desc="each alone", disable=None, leave=False):
        with vector.apply(model):
            out[name] = tasks.evaluate(model, eval_sets, batch_size, device)
    with all_applied(model, vectors.values()):
        out["combined"] = tasks.evaluate(model, eval_sets, batch_size, device)
    out["sum_of_effects"] = {key: base + sum(out[name][key] - base for name in vectors)
                             for key, base in out["base"].items()}
    return out


def combined_runs(subject, text):
    """The subject's vector and --runs DIR,DIR's -> {run directory: vector}."""
    vectors = {subject.name: subject.vector}
    for run_dir in site_list(text):
        if run_dir in vectors:
            raise AnalysisError(f"--runs: {run_dir} given twice")
        vectors[run_dir] = steer_run_vector(subject, run_dir, flag="--runs")
    return vectors


def run_label(run_dir, vector):
    return f"{os.path.basename(os.path.normpath(run_dir))} (layers {vector.layers})"


def combine_summary(record):
    scores = record["accuracy"]
    keys = list(scores["base"])
    lines = [f"accuracy ({'/'.join(keys)}):"]
    for name, layers in [("base", None), *record["layers"].items(),
                         ("combined", None), ("sum_of_effects", None)]:
        shown = name if layers is None else f"{name} (layers {layers})"
        lines.append(f"  {'/'.join(f'{scores[name][k]:.3f}' for k in keys)}  {shown}")
    return lines


def combine_command(subject, args):
    steering_run(subject, "combine")
    vectors = combined_runs(subject, args.runs)
    sets = chosen_sets(subject, args.sets)
    accuracy = combined_accuracy(subject.model, vectors, sets)
    record = {"analysis": "combine", "subject": subject.name, "sets": list(sets),
              "layers": {name: v.layers for name, v in vectors.items()}, "accuracy": accuracy}
    keys = list(accuracy["base"])
    runs = [run for run in accuracy if run != "sum_of_effects"]  # not an accuracy: may pass 1
    fig = Figure(figsize=(max(6, 1.2 * len(keys) * len(runs) / 3), 5))
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        label = run if run not in vectors else run_label(run, vectors[run])
        ax.bar([j + (i - (len(runs) - 1) / 2) * width for j in range(len(keys))],
               [accuracy[run][k] for k in keys], width, label=label)
    ax.set_xticks(range(len(keys)), keys, fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title="each vector alone and all combined")
    ax.legend(fontsize=7)
    fig.suptitle(f"steering vectors combined: {subject.name} and {len(vectors) - 1} more",
                 fontsize=10)
    fig.tight_layout()
    return fig, record, combine_summary(record)


# -----------------------------------------------------------------------------
# The adaptive scale (Sinii et al. 2025): a steering vector with positions="adaptive" is scaled at
# each token by 2 * sigmoid(w . r + b), read from the residual stream there. Where along a prompt
# and its steered continuation does the scale rise, per layer?

ADAPTIVE_PANELS = 4  # prompts drawn as heatmaps; the summary reads all of them


@torch.no_grad()
def adaptive_gates(model, vector, tokens):
    """tokens (T,) -> (layers, T): the scale at every position of every steered layer, read on the
    steered forward (later layers see earlier layers' steering, as in training)."""
    gates = {}

    def recorder(layer):
        def record(x, hook):  # registered before the vector's hook: x is what its gate reads
            gates[layer] = steer.adaptive_gate(vector, layer, x.float())[0]

        return record

    hooks = [(steer.gate_site(vector, layer), recorder(layer)) for layer in vector.layers]
    with model.hooks(hooks), vector.apply(model):
        model(as_tokens(model, tokens)[None])
    return torch.stack([gates[layer] for layer in vector.layers]).cpu()  # (layers, T)


def steered_continuation(model, vector, prompt, new_tokens, eos_ids):
    """The vector's greedy continuation of one prompt, through the end id."""
    with vector.apply(model):
        return tasks.complete(model, [prompt], new_tokens, eos_ids, device=device_of(model))[0]


def token_means(labels, gates):
    """{token text: mean scale over layers and occurrences}, labels and gates (layers, T) per
    sequence."""
    sums, counts = {}, {}
    for seq_labels, seq_gates in zip(labels, gates):
        for label, value in zip(seq_labels, seq_gates.mean(0).tolist()):
            sums[label] = sums.get(label, 0.0) + value
            counts[label] = counts.get(label, 0) + 1
    return {label: sums[label] / counts[label] for label in sums}


def adaptive_record(subject, vector, prompts, new_tokens):
    eos = train.eos_ids(subject.task, subject.tokenizer)
    sequences, gates = [], []
    for prompt in tqdm(prompts, desc="adaptive scale", leave=False):
        completion = steered_continuation(subject.model, vector, prompt, new_tokens, eos)
        sequences.append({"prompt_tokens": len(prompt), "tokens": prompt + completion,
                          "labels": token_labels(subject.tokenizer, prompt + completion)})
        gates.append(adaptive_gates(subject.model, vector, prompt + completion))
    on_prompt = torch.cat([g[:, : s["prompt_tokens"]].flatten() for s, g in zip(sequences, gates)])
    generated = [g[:, s["prompt_tokens"] :].flatten() for s, g in zip(sequences, gates)]
    generated = torch.cat(generated)
    means = token_means([s["labels"] for s in sequences], gates)
    ranked = sorted(means.items(), key=lambda kv: kv[1])
    shown = min(10, len(ranked) // 2)  # the two lists never share a token
    return {
        "layers": vector.layers,
        "sequences": [{**s, "gates": g.tolist()} for s, g in zip(sequences, gates)],
        "per_layer_mean": torch.stack([g.mean(1) for g in gates]).mean(0).tolist(),
        "prompt": {"mean": on_prompt.mean().item(), "std": on_prompt.std().item()},
        "generated": {"mean": generated.mean().item() if len(generated) else None},
        "lowest_tokens": ranked[:shown],
        "highest_tokens": ranked[::-1][:shown],
    }


def adaptive_scale_summary(record):
    lines = [f"adaptive scale 2*sigmoid(w.r+b) of {record['subject']} over {record['n_prompts']} "
             f"prompts and their greedy steered continuations (layers {record['layers']})",
             f"  prompt tokens: mean {record['prompt']['mean']:.3f} "
             f"(std {record['prompt']['std']:.3f})"]
    if record["generated"]["mean"] is not None:
        lines.append(f"  generated tokens: mean {record['generated']['mean']:.3f}")
    per_layer = ", ".join(f"{l}: {v:.2f}" for l, v in zip(record["layers"],
                                                           record["per_layer_mean"]))
    lines.append(f"  mean per layer: {per_layer}")
    for key in ("highest_tokens", "lowest_tokens"):
        shown = ", ".join(f"{label!r} {value:.2f}" for label, value in record[key])
        lines.append(f"  {key.replace('_', ' ')}: {shown}")
    return lines


def adaptive_scale_command(subject, args):
    vector = steering_run(subject, "adaptive_scale")
    if vector.positions != "adaptive":
        raise AnalysisError(f"adaptive_scale reads a vector trained with --positions adaptive; "
                            f"{subject.name} has positions {vector.positions!r}")
    sets = chosen_sets(subject, args.sets)
    prompts = [item.prompt for eval_set in sets.values() for item in eval_set.items]
    prompts = prompts[: args.prompts]
    record = {"analysis": "adaptive_scale", "subject": subject.name, "sets": list(sets),
              "n_prompts": len(prompts), "hook": vector.hook,
              **adaptive_record(subject, vector, prompts, args.new_tokens)}
    shown = record["sequences"][:ADAPTIVE_PANELS]
    longest = max(len(s["tokens"]) for s in shown)
    panel_height = 0.25 * len(vector.layers) + 1.5
    fig = Figure(figsize=(max(8, 0.22 * longest + 3), 1 + len(shown) * panel_height))
    for ax, seq in zip(fig.subplots(len(shown), 1, squeeze=False)[:, 0], shown):
        heatmap(fig, ax, torch.tensor(seq["gates"]), seq["labels"],
                [f"layer {l}" for l in vector.layers],
                f"scale per token; the steered continuation starts at token {seq['prompt_tokens']}",
                vmin=0, vmax=2, cmap="viridis")
        ax.axvline(seq["prompt_tokens"] - 0.5, color="red", linewidth=1)
    fig.suptitle(f"adaptive steering scale of {subject.name} ({vector.hook})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    return fig, record, adaptive_scale_summary(record)


# -----------------------------------------------------------------------------
# Command line


def layer_numbers(text):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}")


def logit_lens_flags(parser):
    parser.add_argument("--token", help="the token whose probability is shown (default: the "
                        "item's right answer)")
    parser.add_argument("--position", type=int, default=-1,
                        help="position of the top-token table (default: -1, the last)")
    parser.add_argument("--top-k", type=train.positive_int, default=5,
                        help="top tokens per row (default: 5)")
    parser.add_argument("--measure", choices=["prob", "rank"], default="prob",
                        help="what the heatmap shows (default: prob)")


def attention_flags(parser):
    parser.add_argument("--layers", type=layer_numbers,
                        help="comma-separated layers to show (default: all)")


def patching_flags(parser):
    parser.add_argument("--corrupt", help="corrupted prompt text, as long as the clean one")
    parser.add_argument("--corrupt-item", type=int, help="corrupted prompt: an item of the same "
                        "eval set (default: the next item of the same length with another answer)")
    parser.add_argument("--contrast", choices=["prompt", "adapter"], default="prompt",
                        help="prompt: clean vs corrupted prompt; adapter: one prompt with the "
                        "run's adapter (clean) vs without (corrupted) (default: prompt)")
    parser.add_argument("--adapter", choices=["on", "off"], default="on",
                        help="--contrast prompt: run with the run's adapter or not (default: on)")
    parser.add_argument("--right", help="metric: logit(right) - logit(wrong) at the last "
                        "position (default: the clean item's answer)")
    parser.add_argument("--wrong", help="(default: the corrupted item's answer, else the option "
                        "the corrupted run rates highest)")
    parser.add_argument("--site", default="resid_pre,attn_out,mlp_out,head",
                        help="comma-separated: resid_pre, attn_out, mlp_out (per layer and "
                        "position), head (per layer and head, hook_z), or a block hook such as "
                        "hook_resid_mid (default: all four)")
    parser.add_argument("--span", action="append", help="positions patched together, e.g. 2,4-6 "
                        "(repeatable: one column each; heads take one) (default: each position "
                        "alone; heads: all positions)")
    parser.add_argument("--direction", choices=list(DIRECTIONS), default="denoise",
                        help="denoise: clean activations into the corrupted run; noise: corrupted "
                        "into the clean run (default: denoise)")
    parser.add_argument("--batch-size", type=train.positive_int,
                        help="patched runs per forward (default: 64, fewer on large vocabularies)")


def lora_vs_steering_flags(parser):
    parser.add_argument("--steer-run", help="a steering run of the same model and task: its "
                        "vector's accuracy and cos(natural, trained)")
    parser.add_argument("--unrelated", type=train.positive_int, default=32,
                        help="toy worlds: pretraining documents read as unrelated text "
                        "(default: 32)")


def sae_features_flags(parser):
    parser.add_argument("--sae", required=True, help="an SAE directory (sae.py's --out, or "
                        "SAELens's layout) at a hook of the run's base model")
    parser.add_argument("--sets", help="comma-separated eval sets whose prompts are read "
                        "(default: all but the in-context checks)")


def sae_corpus_flags(parser):
    parser.add_argument("--sae", required=True, help="an SAE directory (sae.py's --out, or "
                        "SAELens's layout) at a hook of the run's base model")
    parser.add_argument("--sequences", type=train.positive_int, default=CORPUS_SEQS,
                        help="sequences of the SAE's corpus (the task's pretraining documents or "
                        f"texts) read, drawn at random (default: {CORPUS_SEQS})")


def sae_top_contexts_flags(parser):
    sae_corpus_flags(parser)
    parser.add_argument("--features", help="comma-separated feature ids (default: the features "
                        "the adapter changes most at the last eval-prompt token)")
    parser.add_argument("--n-features", type=train.positive_int, default=6,
                        help="features shown without --features (default: 6)")
    parser.add_argument("--top", type=train.positive_int, default=8,
                        help="contexts per feature (default: 8)")


def read_vector_flags(parser):
    parser.add_argument("--sets", help="comma-separated eval sets scored (default: all but the "
                        "in-context checks)")
    parser.add_argument("--coefficients", type=number_list, default=[-2, -1, 0, 0.5, 1, 1.5, 2, 3],
                        help="strength sweep; write a leading negative as --coefficients=-2,0,1 "
                        "(default: -2,-1,0,0.5,1,1.5,2,3)")
    parser.add_argument("--keep", type=number_list, default=[100, 50, 25, 10, 5, 2, 1, 0],
                        help="%% of dimensions kept (default: 100,50,25,10,5,2,1,0)")
    parser.add_argument("--top-k", type=train.positive_int, default=10,
                        help="boosted and suppressed tokens shown (default: 10)")


def vector_lens_flags(parser):
    parser.add_argument("--sets", help="comma-separated eval sets whose prompts are read "
                        "(default: all but the in-context checks)")
    parser.add_argument("--prompts", type=train.positive_int, default=64,
                        help="at most this many of their prompts (default: 64)")
    parser.add_argument("--new-tokens", type=train.positive_int, default=8,
                        help="generated positions whose KL is read (default: 8)")
    parser.add_argument("--top-k", type=train.positive_int, default=10,
                        help="boosted and suppressed tokens per layer (default: 10)")


def adaptive_scale_flags(parser):
    parser.add_argument("--sets", help="comma-separated eval sets whose prompts are read "
                        "(default: all but the in-context checks)")
    parser.add_argument("--prompts", type=train.positive_int, default=16,
                        help="at most this many of their prompts (default: 16)")
    parser.add_argument("--new-tokens", type=train.positive_int, default=16,
                        help="greedy steered tokens generated after each prompt (default: 16)")


def combine_flags(parser):
    parser.add_argument("--runs", required=True, help="comma-separated steering runs of the same "
                        "base model and task, applied together with --run's vector")
    parser.add_argument("--sets", help="comma-separated eval sets scored (default: all but the "
                        "in-context checks)")


@dataclass
class Analysis:
    run: Callable  # (subject, args) -> (figure, record, summary lines)
    flags: Callable  # adds the analysis's own flags to its subparser
    help: str


ANALYSES = {  # the subcommands, in the order of issue 10
    "logit_lens": Analysis(logit_lens_command, logit_lens_flags, "a token's probability (or rank) "
                           "per layer and position, top tokens per layer; base and adapter"),
    "attention": Analysis(attention_command, attention_flags, "attention patterns per layer and "
                          "head with token labels; base and adapter"),
    "patching": Analysis(patching_command, patching_flags, "activation patching, batched: "
                         "resid_pre / attn_out / mlp_out per (layer, position), heads, spans"),
    "attribution": Analysis(attribution_command, patching_flags, "attribution patching beside "
                            "exact patching, with their correlation"),
    "lora_vs_steering": Analysis(lora_vs_steering_command, lora_vs_steering_flags, "a one-layer "
                                 "LoRA's per-token output diffs, its natural vector in its place, "
                                 "beside a trained steering vector"),
    "read_vector": Analysis(read_vector_command, read_vector_flags, "a steering vector's "
                            "unembedding, norm, strength sweep, sparsification, frozen attention"),
    "sae_features": Analysis(sae_features_command, sae_features_flags, "a run's steering vector "
                             "(or a LoRA's mean token difference) in an SAE's features: decoder "
                             "cosines, sparse fits, activation changes"),
    "sae_top_contexts": Analysis(sae_top_contexts_command, sae_top_contexts_flags, "an SAE's "
                                 "features: the corpus tokens (in context) where each fires most"),
    "sae_personas": Analysis(sae_personas_command, sae_corpus_flags, "persona worlds: which SAE "
                             "features track which persona; the steering vector as a sum of the "
                             "target persona's features"),
    "sae_vs_neurons": Analysis(sae_vs_neurons_command, sae_corpus_flags, "persona worlds: probes "
                               "on the k best SAE features vs stream dimensions vs MLP neurons"),
    "vector_lens": Analysis(vector_lens_command, vector_lens_flags, "each layer's steering vector "
                            "through the final norm and unembedding, and KL(steered || base) per "
                            "generated position: is the effect on the first token?"),
    "combine": Analysis(combine_command, combine_flags, "steering vectors trained apart (e.g. one "
                        "layer each) applied together: accuracy of each alone and combined"),
    "adaptive_scale": Analysis(adaptive_scale_command, adaptive_scale_flags, "a vector trained "
                               "with --positions adaptive: its scale per token and layer"),
}


def common_flags(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a train.py run directory")
    source.add_argument("--model", help="a plain checkpoint: smollm2-135m, an HF dir or a .gguf")
    parser.add_argument("--out", help="output directory (default: RUN/analysis, or "
                        "runs/analysis-<model name> with --model)")
    parser.add_argument("--eval", default="oocr", help="eval set of the run's task (default: oocr)")
    parser.add_argument("--item", type=int, default=0, help="item of the eval set (default: 0)")
    parser.add_argument("--prompt", help="prompt text instead of an eval item")
    parser.add_argument("--device", default="cpu", help="(default: cpu)")
    parser.add_argument("--threads", type=train.positive_int,
                        help="CPU threads (default: the run's, else torch's)")


def build_parser():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = train.OneLineParser(description=__doc__, formatter_class=formatter)
    subparsers = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, analysis in ANALYSES.items():
        sub = subparsers.add_parser(name, help=analysis.help, description=analysis.help)
        common_flags(sub)
        analysis.flags(sub)
    return parser


def load_subject(args):
    if args.model is not None and args.prompt is None:  # said before loading a large checkpoint
        raise AnalysisError("a plain checkpoint has no eval sets: give --prompt")
    if args.run is not None:
        return load_run(args.run, args.device)
    return load_checkpoint_subject(args.model, args.device)


def out_dir(args):
    if args.out:
        return args.out
    if args.run is not None:
        return os.path.join(args.run, "analysis")
    name = os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0]
    return os.path.join("runs", f"analysis-{name}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        subject = load_subject(args)
        if subject.threads and not args.threads:
            torch.set_num_threads(subject.threads)
        fig, record, summary = ANALYSES[args.analysis].run(subject, args)
        png, data = save_analysis(out_dir(args), args.analysis, fig, record)
    except (AnalysisError, CheckpointError, train.RunError) as e:
        sys.exit(f"error: {e}")
    print("\n".join(summary))
    print(f"wrote {png} and {data}")


if __name__ == "__main__":
    main()
