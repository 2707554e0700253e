"""
Benchmarks: this codebase against what a user would otherwise run (HF transformers, PEFT, a
one-forward-per-patch loop), row by row, on one machine, in one process.

    python bench.py                         # every row on SmolLM2-135M; writes bench.json
    python bench.py --quick                 # fewer tokens and repeats: under 3 min on 2 CPU cores
    python bench.py --rows forward,train_lora --repeats 7 --threads 1
    python bench.py --device cuda           # the same rows on a GPU

Method, the point of the file:
- Both implementations are loaded once, from the same weights: ours is written in HF's layout
  (checkpoint.save_model) and transformers reads that directory; their fp32 logits are checked
  equal on one input before anything is timed. Inputs, dtypes and thread count are the same.
- A and B run interleaved, A B B A A B ..., after untimed warm-up runs of each (interleaved):
  neither always runs first, so a drift in the machine's speed (turbo, a neighbour's load, caches
  warmed by the other side) falls on both alike.
- Every row reports min and median seconds per run over --repeats, and ours / theirs by median
  and by min (below 1: ours is faster).
- Forward and training rows report utilisation: useful FLOPs per second (FLOP_FORMULA below)
  over the peak matmul FLOP/s measured in the same run for that dtype (the best of a large square
  matmul, before and after the rows).
- Peak memory of each row and implementation is measured in a fresh process
  (`--memory-row NAME --impl ours|theirs`, spawned here), since a process's high-water mark never
  goes down: the peak, and the increase over the resident size right after loading the model
  (see the Memory section for why that is VmHWM, not ru_maxrss).
- Run it on a quiet machine: torch threads on cores that other jobs use spin in OpenMP
  barriers, and a step can take 10-100x longer (--threads 1 is the fallback).

Rows (--rows takes names or prefixes: forward, train, train_lora, generate, ...):
  forward_{fp32,bf16}          logits of a batch, no grad; bf16 = torch.autocast for both
  train_{lora,steer1,steerall,full}_{fp32,bf16}
                               one AdamW step, ours = train.train_step; theirs = zero_grad,
                               forward, tasks.answer_loss, backward, clip, step (PEFT LoRA for
                               the LoRA and both steering rows: what a user would otherwise pick)
  generate_{cache,nocache}     greedy generation, model.generate vs HF generate
  eval                         a multiple-choice set, tasks.evaluate vs the obvious HF loop
  patching_toy_{short,long,first}
                               analyze's activation patching (batched, each patched run from its
                               layer and position) vs one forward per patch, every (layer,
                               position) site: the persona world's prompt lengths (4 and 26
                               tokens), one token corrupted mid-prompt; first: at position 0
  attribution_vs_exact[_early] attribution patching vs exact (batched) activation patching, on
                               a pair differing near the end (exact patching skips the positions
                               before it) or near the start (every later position differs)

Read top to bottom: settings -> FLOP counting -> timing -> memory -> models and inputs -> the
rows -> running a row -> tables -> the command line.
"""

import argparse
import gc
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import partial

import peft
import torch
import transformers
from tqdm import tqdm

import analyze
import lora
import steer
import tasks
import train
from checkpoint import config_from_hf, load_model, read_json, save_model, write_json
from model import ModelConfig, Transformer, generate

HERE = os.path.dirname(os.path.abspath(__file__))
TOY_MODEL = os.path.join(HERE, "data", "toy", "persona-seed0-7ad67f7c1e")  # 4 layers, d 64
INPUTS_NAME = "bench_inputs.json"  # next to the HF weights: inputs that need the tokenizer
SEED = 0
LOGITS_ATOL = 1e-3  # ours vs transformers, fp32: the test suite sees <= 6e-6

# a tiny random Llama for `--model tiny` (the tests): every row runs in seconds
TINY = ModelConfig(arch="llama", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   d_head=16, d_mlp=128, qkv_bias=False, o_bias=False, mlp_bias=False,
                   hf_model_type="llama")

# -----------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    batch: int = 8  # sequences per forward / training step
    seq: int = 128  # forward rows: tokens per sequence
    prompt: int = 120  # training rows: random prompt tokens, then
    answer: int = 8  # answer tokens, the only ones with loss (as train.py's batches)
    repeats: int = 5  # timed runs of each implementation
    warmup: int = 1  # untimed runs of each first
    gen_prompt: int = 16  # generation: batch 1, prompt tokens,
    gen_new: int = 32  # greedy new tokens
    eval_items: int = 40  # multiple-choice items of random tokens,
    eval_options: int = 5  # options each (1 to 4 tokens),
    eval_lengths: tuple = (100, 600)  # prompt lengths spread evenly over this range
    eval_batch: int = 8  # tasks.evaluate's batch_size (train.py's on real models)
    eval_repeats: int = 2  # the eval row's default repeats: theirs takes minutes per run
    long_pair: bool = True  # attribution: the ~15-token IOI pair, else a 5-token one
    matmul: int = 2048  # side of the square matmul that measures peak FLOP/s
    matmul_repeats: int = 10  # the best of these, at the start and again at the end
    memory_rows: str = "all"  # rows measured for memory (spawned processes)


QUICK = Settings(batch=2, seq=64, prompt=56, answer=8, repeats=3, gen_new=12, eval_items=3,
                 eval_lengths=(100, 100), long_pair=False, matmul_repeats=5,
                 memory_rows="forward_fp32,train_lora_fp32")

# patching on the toy model: {row: (tokens, the corrupted position)}: the persona world's
# in-distribution and in-context prompt lengths, one token corrupted mid-prompt (as a name in
# IOI); "first" corrupts the first token, analyze's worst case: every patch changes its run, and
# every patched run starts at position 0
TOY_PAIRS = {"short": (4, 2), "long": (26, 13), "first": (26, 0)}
# LoRA of the training rows: rank 8 on q_proj, v_proj, down_proj of every layer
LORA_TARGETS = ("q_proj", "v_proj", "down_proj")
LORA_RANK = 8
LR = {"lora": 1e-3, "steer": 1e-1, "full": 3e-4}  # train.py's defaults on real models

# -----------------------------------------------------------------------------
# FLOP counting: useful matmul FLOPs, the same count for both implementations, so that work one of
# them wastes (e.g. logits at positions no loss reads) shows up as lower utilisation. The formula
# is saved in bench.json beside the numbers it produced.

FLOP_FORMULA = """Useful FLOPs (2 FLOPs per multiply-add; elementwise work such as norms,
    activations, RoPE, the steering vector's add and the optimizer is left out):

    forward = 2 * W * tokens                      W: matmul weights a token passes through
                                                  (q, k, v, o, gate, up, down in every block)
            + 4 * n_layers * n_heads * d_head * B * T(T+1)/2
                                                  attention, QK^T and pattern @ V over the
                                                  (query, key) pairs a causal mask keeps
            + 2 * d_model * vocab * n_logits      the unembedding where logits are needed
                                                  (training: the answer positions only)
    backward, op by op in the order a token passes them (block l: q/k/v, attention, o_proj,
    gate/up, down_proj): an op computes its input gradient only if something trained lies below
    it (1x its forward for a matmul, 2x for attention: dQ, dK from dS and dV, dP from dO); a
    trained weight adds its weight gradient (1x). Hence full fine-tuning = 3x forward (6 N per
    token), a steering vector at layer l = forward + the input gradients above layer l, and
    LoRA = forward + the input gradients above its lowest adapter + the adapters' own:
    2r(in + out) per token forward, 2r(2 out + in) backward, + 2r in for the input gradient
    through A where the op needs one. The unembedding's input gradient is always needed."""


@dataclass(frozen=True)
class Trains:
    """What a training step trains, as far as its FLOPs are concerned."""

    kind: str  # "full", "lora" or "steer"
    layers: tuple = ()  # steer: the steered blocks; lora: () = every block
    targets: tuple = ()  # lora: module names, e.g. ("q_proj", "v_proj")
    rank: int = 0
    hook: str = "hook_mlp_out"  # steer


OPS = ("qkv", "attention", "o_proj", "mlp_in", "down_proj")  # one block's matmuls, in order


def block_linears(cfg):
    """{module name: (op, in_features, out_features)} of one block's Linear layers (GPT-2's fused
    c_attn counts as its q, k, v parts: the same arithmetic)."""
    H, KV, dh, d, m = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    linears = {"q_proj": ("qkv", d, H * dh), "k_proj": ("qkv", d, KV * dh),
               "v_proj": ("qkv", d, KV * dh), "o_proj": ("o_proj", H * dh, d),
               "up_proj": ("mlp_in", d, m), "down_proj": ("down_proj", m, d)}
    if cfg.arch != "gpt2":  # SwiGLU / GeGLU: a second input matrix
        linears["gate_proj"] = ("mlp_in", d, m)
    return linears


def block_weights(cfg):
    """Matmul weights one token passes through in one block."""
    return sum(n_in * n_out for _, n_in, n_out in block_linears(cfg).values())


def attention_flops(cfg, seq):
    """One sequence's attention matmuls in one layer: QK^T and pattern @ V, 2 * n_heads * d_head
    each per (query, key) pair, over the T(T+1)/2 pairs of a causal mask."""
    return 4 * cfg.n_heads * cfg.d_head * seq * (seq + 1) // 2


def unembed_flops(cfg, n_positions):
    return 2 * cfg.d_model * cfg.vocab_size * n_positions


def forward_flops(cfg, batch, seq, n_logits):
    """One forward of (batch, seq) tokens with logits at n_logits positions in all."""
    blocks = 2 * cfg.n_layers * block_weights(cfg) * batch * seq
    attention = batch * cfg.n_layers * attention_flops(cfg, seq)
    return blocks + attention + unembed_flops(cfg, n_logits)


def op_forward_flops(cfg, seq):
    """[forward FLOPs of one sequence] per op, op by op (OPS order, block after block)."""
    per_op = {op: 0 for op in OPS}
    for op, n_in, n_out in block_linears(cfg).values():
        per_op[op] += 2 * n_in * n_out * seq
    per_op["attention"] = attention_flops(cfg, seq)
    return [per_op[op] for _ in range(cfg.n_layers) for op in OPS]


def op_index(layer, op):
    return layer * len(OPS) + OPS.index(op)


def adapted_linears(cfg, trains):
    """[(op index, in, out)] of every Linear a LoRA wraps."""
    layers = trains.layers or range(cfg.n_layers)
    linears = block_linears(cfg)
    return [(op_index(layer, linears[t][0]), linears[t][1], linears[t][2])
            for layer in layers for t in trains.targets]


def lowest_trained(cfg, trains):
    """The op index at whose output the lowest trained parameter acts (-1: the embedding). Ops
    above it compute input gradients; it and the ops below do not."""
    if trains.kind == "full":
        return -1
    if trains.kind == "lora":
        return min(index for index, _, _ in adapted_linears(cfg, trains))
    layer = min(trains.layers)
    if trains.hook == "hook_resid_pre":  # the input of block l = the output of block l - 1
        return op_index(layer, "qkv") - 1
    return op_index(layer, "down_proj")  # hook_mlp_out, hook_resid_post: after block l's MLP


def backward_flops(cfg, seq, trains):
    """One sequence's backward through the blocks (the unembedding apart)."""
    lowest = lowest_trained(cfg, trains)
    total = 0
    for index, flops in enumerate(op_forward_flops(cfg, seq)):
        is_attention = OPS[index % len(OPS)] == "attention"
        if index > lowest:  # input gradient
            total += 2 * flops if is_attention else flops
        if trains.kind == "full" and not is_attention:  # weight gradient
            total += flops
    return total


def lora_flops(cfg, seq, trains):
    """One sequence's forward + backward of the LoRA adapters themselves."""
    if trains.kind != "lora":
        return 0
    lowest = lowest_trained(cfg, trains)
    r, total = trains.rank, 0
    for index, n_in, n_out in adapted_linears(cfg, trains):
        total += 2 * r * (n_in + n_out)  # forward: A, then B
        total += 2 * r * (2 * n_out + n_in)  # grad of B's weight and input, grad of A's weight
        if index > lowest:  # the gradient of x through A
            total += 2 * r * n_in
    return total * seq


def train_flops(cfg, batch, seq, n_answer, trains):
    """One training step: forward with logits at the n_answer answer positions, backward,
    the adapters' own work. n_answer counts the whole batch."""
    forward = forward_flops(cfg, batch, seq, n_answer)
    unembed_backward = unembed_flops(cfg, n_answer) * (2 if trains.kind == "full" else 1)
    per_sequence = backward_flops(cfg, seq, trains) + lora_flops(cfg, seq, trains)
    return forward + batch * per_sequence + unembed_backward


# -----------------------------------------------------------------------------
# Timing: A and B interleaved after untimed warm-ups


def schedule(repeats, warmup):
    """[(side "a" or "b", is_warmup)] in run order: pairs A B, B A, A B, ... (the warm-ups first,
    in the same pattern), so that neither side always runs first."""
    order = []
    for i in range(warmup + repeats):
        pair = ("a", "b") if i % 2 == 0 else ("b", "a")
        order += [(side, i < warmup) for side in pair]
    return order


@dataclass
class Timing:
    times: list = field(default_factory=list)  # seconds of each timed run
    first: object = None  # what the first call (a warm-up, if any) returned
    last: object = None  # what the last timed run returned
    calls: int = 0

    def summary(self):
        return {"min": min(self.times), "median": statistics.median(self.times),
                "times": self.times}


def interleaved(run_a, run_b, repeats, warmup=1, warm_a=None, warm_b=None,
                clock=time.perf_counter, sync=None, progress=None):
    """Time two implementations against each other -> (Timing of A, Timing of B). warm_a /
    warm_b: cheaper stand-ins for the untimed warm-up runs (default: the runs themselves); sync:
    waits for the device (CUDA runs are asynchronous) before the clock is read."""
    runs = {"a": (run_a, warm_a or run_a), "b": (run_b, warm_b or run_b)}
    timings = {"a": Timing(), "b": Timing()}
    for side, is_warmup in schedule(repeats, warmup):
        fn = runs[side][1] if is_warmup else runs[side][0]
        t = timings[side]
        start = clock()
        out = fn()
        if sync is not None:
            sync()
        elapsed = clock() - start
        if t.calls == 0:
            t.first = out
        t.calls += 1
        if not is_warmup:
            t.times.append(elapsed)
            t.last = out
        if progress is not None:
            progress()
    return timings["a"], timings["b"]


def matmul_peak(dtype, device, n, repeats=5):
    """FLOP/s of the best of `repeats` (n x n) @ (n x n) matmuls in `dtype`: the ceiling that
    utilisation is measured against."""
    g = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = device_sync(device)
    best = math.inf
    for i in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        a @ b
        sync()
        if i > 0:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_sync(device):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


# -----------------------------------------------------------------------------
# Memory, in a process that runs one row. Not resource.getrusage's ru_maxrss: a process
# inherits its parent's high-water mark through exec (a child of a 1.5 GB parent reports 1.5 GB
# on Linux), so a row would show the parent's models. /proc/self/status's VmHWM is the process's
# own and can be reset (clear_refs) after loading, separating the row from loading transients.


def status_kb(key):
    """VmRSS / VmHWM of this process in kB from /proc/self/status; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss():
    """VmHWM := VmRSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_mb():
    """ru_maxrss in MB (kB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 2**20 if sys.platform == "darwin" else value / 1024


def rss_mb():
    kb = status_kb("VmRSS")
    return kb / 1024 if kb is not None else maxrss_mb()


def peak_mb():
    kb = status_kb("VmHWM")
    return kb / 1024 if kb is not None else maxrss_mb()


# -----------------------------------------------------------------------------
# Models and inputs


def load_ours(name, device):
    """--model: 'smollm2-135m', a checkpoint path, or 'tiny' -> (model, tokenizer or None)."""
    if name == "tiny":
        torch.manual_seed(SEED)
        return Transformer(replace(TINY)).to(device).eval(), None
    return load_model(name, device=device)


def load_theirs(hf_dir, device):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ours does
    hf.generation_config.pad_token_id = 0
    return hf.to(device).eval()


@torch.no_grad()
def check_logits(ours, hf, device):
    """Both implementations' fp32 logits on one input; a one-line error if they differ."""
    tokens = random_tokens(ours.cfg.vocab_size, (2, 32), device)
    diff = (ours(tokens) - hf(input_ids=tokens).logits).abs().max().item()
    if not diff <= LOGITS_ATOL:
        sys.exit(f"error: transformers' logits differ from ours by {diff:.3g} "
                 f"(> {LOGITS_ATOL}); nothing timed")
    return diff


def random_tokens(vocab, shape, device="cpu", seed=SEED):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g).to(device)


def train_batch(ctx, cfg):
    """(tokens (B, T), targets (B, T)) as train.py builds a batch: random prompts of s.prompt
    tokens + s.answer answer tokens, tasks.collate, the loss on the answer tokens only."""
    s = ctx.settings
    ids = random_tokens(cfg.vocab_size, (s.batch, s.prompt + s.answer)).tolist()
    examples = [tasks.Example(row[: s.prompt], row[s.prompt :]) for row in ids]
    tokens, targets = tasks.collate(examples)
    return tokens.to(ctx.device), targets.to(ctx.device)


def eval_items(s, vocab):
    """Multiple-choice items of random token ids: prompts spread evenly over s.eval_lengths (like
    the in-context sets: 100-600 tokens), options of 1 to 4 tokens, the answer cycling."""
    g = torch.Generator().manual_seed(SEED)
    lo, hi = s.eval_lengths
    items = []
    for i in range(s.eval_items):
        length = lo + (hi - lo) * i // max(1, s.eval_items - 1)
        prompt = torch.randint(0, vocab, (length,), generator=g).tolist()
        options = [torch.randint(0, vocab, (1 + k % 4,), generator=g).tolist()
                   for k in range(s.eval_options)]
        items.append(tasks.Item(prompt, options, i % s.eval_options))
    return items


# attribution patching: (clean, corrupt, right answer, wrong answer), one length; keyed by (where
# the pair differs, long). "late": the indirect object swapped near the end, so exact patching
# skips the positions before it; "early": a name near the start, so every later position differs
PAIRS = {
    ("late", True): ("When Mary and John went to the store, John gave a drink to",
                     "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    ("late", False): ("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
    ("early", True): ("When Mary and John went to the store, John gave a drink to",
                      "When Tom and John went to the store, John gave a drink to", " Mary", " Tom"),
    ("early", False): ("Paris is the capital of", "Rome is the capital of", " France", " Italy"),
}


def prompt_pair(tokenizer, vocab, long, where="late"):
    """{clean, corrupt, right, wrong} token ids for attribution vs exact patching: a text pair
    where the tokenizer is known, else random ids of the same length with one token changed."""
    if tokenizer is not None:
        clean, corrupt, right, wrong = PAIRS[where, long]
        pair = {"clean": tokenizer.encode(clean), "corrupt": tokenizer.encode(corrupt),
                "right": tokenizer.encode(right)[0], "wrong": tokenizer.encode(wrong)[0]}
        if len(pair["clean"]) == len(pair["corrupt"]):
            return pair
    n = 15 if long else 5
    clean = random_tokens(vocab, (n,), seed=SEED + 1).tolist()
    at = n - 3 if where == "late" else 1
    corrupt = clean[:at] + [(clean[at] + 1) % vocab] + clean[at + 1 :]
    return {"clean": clean, "corrupt": corrupt, "right": 1, "wrong": 2}


class Context:
    """What the rows share: settings, device, the models (each loaded once, on first use), and
    the directory with the HF copy of the weights and the inputs that needed the tokenizer."""

    def __init__(self, settings, device, hf_dir, restore=True):
        self.settings = settings
        self.device = device
        self.hf_dir = hf_dir
        self.restore = restore  # put trained weights back after a row (not in a memory process)
        self.models = {}
        self.sync = device_sync(device)

    def model(self, name):
        if name not in self.models:
            self.models[name] = LOADERS[name](self)
        return self.models[name]

    def config(self):
        """Our ModelConfig of the shared weights (FLOPs, input shapes), read from the HF
        directory: a memory process measuring theirs never loads our model."""
        path = os.path.join(self.hf_dir, "config.json")
        return config_from_hf(read_json(path), path)

    def inputs(self):
        with open(os.path.join(self.hf_dir, INPUTS_NAME)) as f:
            return json.load(f)


LOADERS = {
    "ours": lambda ctx: load_model(ctx.hf_dir, device=ctx.device)[0],
    "theirs": lambda ctx: load_theirs(ctx.hf_dir, ctx.device),
    "toy": lambda ctx: load_model(TOY_MODEL, device=ctx.device)[0],
}


def autocast(device, dtype):
    """bf16 rows run under torch.autocast (as train.py's --dtype bfloat16); fp32 rows do not."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")


# -----------------------------------------------------------------------------
# The rows: each implementation of a row is a Side, set up on the model and ready to run


@dataclass
class Side:
    run: Callable  # one timed run
    warmup: Callable | None = None  # a cheaper stand-in for the warm-up runs
    flops: float | None = None  # useful FLOPs of one run
    close: Callable = lambda: None  # back to the clean base model


# --- forward


def forward_tokens(ctx):
    s = ctx.settings
    return random_tokens(ctx.config().vocab_size, (s.batch, s.seq), ctx.device)  # (B, T)


def ours_forward(ctx, dtype):
    model, tokens = ctx.model("ours"), forward_tokens(ctx)

    @torch.no_grad()
    def run():
        with autocast(ctx.device, dtype):
            model(tokens)  # (B, T, vocab)

    return Side(run, flops=forward_flops(model.cfg, *tokens.shape, tokens.numel()))


def theirs_forward(ctx, dtype):
    hf, cfg, tokens = ctx.model("theirs"), ctx.config(), forward_tokens(ctx)

    @torch.no_grad()
    def run():
        with autocast(ctx.device, dtype):
            hf(input_ids=tokens).logits  # (B, T, vocab)

    return Side(run, flops=forward_flops(cfg, *tokens.shape, tokens.numel()))


# --- training steps


def lora_spec(cfg):
    return Trains("lora", targets=LORA_TARGETS, rank=LORA_RANK)


def steer_spec(cfg, every_layer):
    layers = tuple(range(cfg.n_layers)) if every_layer else (cfg.n_layers // 2,)
    return Trains("steer", layers=layers)


def keep_flags(stack, model):
    """Restore every parameter's requires_grad when the stack closes (attaching freezes)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    stack.callback(lambda: [p.requires_grad_(flag) for p, flag in flags])


def keep_weights(ctx, stack, model):
    """Full fine-tuning changes the weights: put them back when the stack closes."""
    if ctx.restore:
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stack.callback(lambda: model.load_state_dict(saved))


def attach_ours(ctx, model, trains, stack):
    """Attach what trains (LoRA, a steering vector, or nothing: full) -> its parameters."""
    if trains.kind == "lora":
        lora.attach_lora(model, targets=list(trains.targets), r=trains.rank, alpha=2 * trains.rank)
        stack.callback(lora.detach_lora, model)
        return [p for p in model.parameters() if p.requires_grad]
    if trains.kind == "steer":
        model.requires_grad_(False)
        vector = steer.SteeringVector(model.cfg.d_model, layers=list(trains.layers),
                                      hook=trains.hook).to(ctx.device)
        stack.enter_context(vector.apply(model))
        return list(vector.parameters())
    keep_weights(ctx, stack, model)
    model.requires_grad_(True)
    return list(model.parameters())


def ours_train(ctx, dtype, spec):
    """One call of train.train_step per run, with a train.TrainConfig (grad clip 1.0)."""
    model = ctx.model("ours")
    trains = spec(model.cfg)
    tokens, targets = train_batch(ctx, model.cfg)
    stack = ExitStack()
    stack.callback(model.eval)
    keep_flags(stack, model)
    params = attach_ours(ctx, model, trains, stack)
    optimizer = torch.optim.AdamW(params, lr=LR[trains.kind])
    cfg = train.TrainConfig(adapter=trains.kind, dtype=dtype)
    model.train()

    def run():
        return train.train_step(cfg, model, optimizer, [(tokens, targets)])[0]  # the loss

    n_answer = int((targets != tasks.IGNORE).sum())
    flops = train_flops(model.cfg, *tokens.shape, n_answer, trains)
    return Side(run, flops=flops, close=stack.close)


def attach_theirs(ctx, hf, trains, stack):
    """PEFT's LoRA (unloaded when the stack closes), or every weight -> (model, parameters)."""
    if trains.kind == "lora":
        config = peft.LoraConfig(r=trains.rank, lora_alpha=2 * trains.rank, lora_dropout=0.0,
                                 target_modules=list(trains.targets))
        peft_model = peft.get_peft_model(hf, config)
        stack.callback(peft_model.unload)
        return peft_model, [p for p in peft_model.parameters() if p.requires_grad]
    keep_weights(ctx, stack, hf)
    hf.requires_grad_(True)
    return hf, list(hf.parameters())


def hf_train_step(model, optimizer, params, tokens, targets, dtype, device):
    """The obvious transformers loop, with train_step's gradient clipping (the same work)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, dtype):
        logits = model(input_ids=tokens).logits  # (B, T, vocab): every position
        loss = tasks.answer_loss(logits, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.item()


def theirs_train(ctx, dtype, spec):
    hf, cfg = ctx.model("theirs"), ctx.config()
    trains = spec(cfg)
    tokens, targets = train_batch(ctx, cfg)
    stack = ExitStack()
    stack.callback(hf.eval)
    keep_flags(stack, hf)
    model, params = attach_theirs(ctx, hf, trains, stack)
    optimizer = torch.optim.AdamW(params, lr=LR[trains.kind])
    model.train()
    run = partial(hf_train_step, model, optimizer, params, tokens, targets, dtype, ctx.device)
    n_answer = int((targets != tasks.IGNORE).sum())
    flops = train_flops(cfg, *tokens.shape, n_answer, trains)
    return Side(run, flops=flops, close=stack.close)


def check_first_loss(ctx, ours, theirs):
    """Every adapter starts as a no-op (LoRA's B = 0, the vector = 0), so the first step's loss
    is the base model's in both implementations."""
    diff = abs(ours.first - theirs.first)
    note = f"first loss {ours.first:.4f} / {theirs.first:.4f}"
    return note, {"first_loss": {"ours": ours.first, "theirs": theirs.first, "diff": diff}}


# --- generation


def generation_prompt(ctx, vocab):
    return random_tokens(vocab, (1, ctx.settings.gen_prompt), ctx.device)  # (1, T)


def ours_generate(ctx, use_cache):
    model = ctx.model("ours")
    prompt = generation_prompt(ctx, model.cfg.vocab_size)
    n = ctx.settings.gen_new
    return Side(lambda: generate(model, prompt, n, use_cache=use_cache).cpu())


def theirs_generate(ctx, use_cache):
    hf = ctx.model("theirs")
    prompt = generation_prompt(ctx, hf.config.vocab_size)
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=ctx.settings.gen_new,
                   do_sample=False, use_cache=use_cache)
    return Side(lambda: hf.generate(input_ids=prompt, **options).cpu())


def check_generation(ctx, ours, theirs):
    n = ctx.settings.gen_new
    same = ours.last.shape == theirs.last.shape and bool((ours.last == theirs.last).all())
    rates = {k: n / statistics.median(t.times) for k, t in (("ours", ours), ("theirs", theirs))}
    note = f"{rates['ours']:.1f} / {rates['theirs']:.1f} tok/s, same tokens: {same}"
    return note, {"tokens_per_s": rates, "same_tokens": same, "new_tokens": n}


# --- evaluation


def eval_set(ctx, vocab, n_items=None):
    items = eval_items(ctx.settings, vocab)[:n_items]
    return tasks.EvalSet("bench", items, chance=1 / ctx.settings.eval_options)


def ours_eval(ctx):
    """tasks.evaluate in fp32, batch_size as train.py uses on real models."""
    model = ctx.model("ours")
    run_on = partial(tasks.evaluate, model, batch_size=ctx.settings.eval_batch, device=ctx.device)
    full, small = eval_set(ctx, model.cfg.vocab_size), eval_set(ctx, model.cfg.vocab_size, 1)
    return Side(lambda: run_on({"bench": full}), warmup=lambda: run_on({"bench": small}))


@torch.no_grad()
def hf_option_scores(hf, items, device):
    """The obvious transformers loop: every prompt + option through the model alone, log-softmax,
    the option tokens' log-probs summed -> [[score per option] per item]."""
    scores = []
    for item in items:
        row = []
        for option in item.options:
            tokens = torch.tensor([item.prompt + option], device=device)  # (1, P + L)
            logits = hf(input_ids=tokens).logits[0, len(item.prompt) - 1 : -1]  # (L, vocab)
            logp = logits.float().log_softmax(-1)
            picked = logp.gather(-1, torch.tensor(option, device=device)[:, None])
            row.append(picked.sum().item())
        scores.append(row)
    return scores


def theirs_eval(ctx):
    hf = ctx.model("theirs")
    vocab = hf.config.vocab_size
    full, small = eval_set(ctx, vocab).items, eval_set(ctx, vocab, 1).items
    return Side(lambda: hf_option_scores(hf, full, ctx.device),
                warmup=lambda: hf_option_scores(hf, small, ctx.device))


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def check_eval(ctx, ours, theirs):
    """Both pick the same options: ours' picks from tasks.option_logprobs (untimed, once)."""
    model = ctx.model("ours")
    items = eval_set(ctx, model.cfg.vocab_size).items
    our_scores = tasks.option_logprobs(model, items, ctx.settings.eval_batch, ctx.device)
    same = sum(argmax(a) == argmax(b) for a, b in zip(our_scores, theirs.last))
    diff = max(abs(x - y) for a, b in zip(our_scores, theirs.last) for x, y in zip(a, b))
    accuracy = {"ours": ours.last["bench"], "theirs": tasks.share_right(items, theirs.last)}
    s = ctx.settings
    note = (f"{len(items)} items x {s.eval_options} options, prompts {s.eval_lengths[0]}-"
            f"{s.eval_lengths[1]} tokens; same picks {same}/{len(items)}")
    extra = {"items": len(items), "same_picks": same, "max_score_diff": diff,
             "accuracy": accuracy}
    return note, extra


# --- activation patching


def toy_pair(model, n_tokens, corrupted):
    """A clean / corrupted prompt pair of random toy tokens, one token apart (at `corrupted`), and
    the metric logit(1) - logit(2)."""
    clean = random_tokens(model.cfg.vocab_size, (n_tokens,), seed=SEED + 2)
    corrupt = clean.clone()
    corrupt[corrupted] = (corrupt[corrupted] + 1) % model.cfg.vocab_size
    device = next(model.parameters()).device
    return clean.to(device), corrupt.to(device), analyze.logit_diff(1, 2)


def position_writer(value, position):
    """A hook that writes value (1, T, d)'s `position` into the run, the rest untouched."""

    def write(x, hook):
        x = x.clone()
        x[:, position] = value[:, position].to(x.dtype)
        return x

    return write


@torch.no_grad()
def patch_one_at_a_time(model, clean, corrupt, metric):
    """The reference loop: one forward per (layer, position), the clean resid_pre written into
    the corrupted run -> (n_layers, T) metrics."""
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    _, source = model.run_with_cache(clean[None], names_filter=names)
    out = torch.zeros(len(names), len(clean))
    for layer, name in enumerate(names):
        for position in range(len(clean)):
            hook = position_writer(source[name], position)
            logits = model.run_with_hooks(corrupt[None], [(name, hook)])  # (1, T, vocab)
            out[layer, position] = metric(logits)[0].item()
    return out


def ours_toy_patching(ctx, n_tokens, corrupted):
    model = ctx.model("toy")
    clean, corrupt, metric = toy_pair(model, n_tokens, corrupted)
    return Side(lambda: analyze.activation_patching(model, clean, corrupt, metric).cpu())


def loop_toy_patching(ctx, n_tokens, corrupted):
    model = ctx.model("toy")
    return Side(partial(patch_one_at_a_time, model, *toy_pair(model, n_tokens, corrupted)))


def patches_per_s(grid, timing):
    return grid.numel() / statistics.median(timing.times)


def check_toy_patching(ctx, ours, theirs, corrupted):
    n_tokens = ours.last.shape[1]  # (n_layers, T)
    diff = (ours.last - theirs.last).abs().max().item()
    rates = {"ours": patches_per_s(ours.last, ours), "theirs": patches_per_s(theirs.last, theirs)}
    note = (f"{ours.last.numel()} patches, {n_tokens} tokens, corrupted at {corrupted}; "
            f"{rates['ours']:.0f} / {rates['theirs']:.0f} patches/s; max diff {diff:.1g}")
    return note, {"patches_per_s": rates, "max_diff": diff, "patches": ours.last.numel()}


def real_pair(ctx, where="late"):
    pair = ctx.inputs()[f"pair_{where}"]
    clean = torch.tensor(pair["clean"], device=ctx.device)
    corrupt = torch.tensor(pair["corrupt"], device=ctx.device)
    return clean, corrupt, analyze.logit_diff(pair["right"], pair["wrong"])


def ours_attribution(ctx, where):
    model = ctx.model("ours")
    return Side(partial(analyze.attribution_patching, model, *real_pair(ctx, where)))


def exact_patching(ctx, where):
    model = ctx.model("ours")
    clean, corrupt, metric = real_pair(ctx, where)
    last = [[len(clean) - 1]]  # the warm-up patches one position only: exact is the slow side
    return Side(partial(analyze.activation_patching, model, clean, corrupt, metric),
                warmup=partial(analyze.activation_patching, model, clean, corrupt, metric,
                               spans=last))


def check_attribution(ctx, ours, theirs):
    corr = analyze.correlation(ours.last, theirs.last)
    note = f"{theirs.last.numel()} sites, {theirs.last.shape[1]} tokens; correlation {corr:.3f}"
    return note, {"correlation": corr, "sites": theirs.last.numel()}


# --- the table of rows


@dataclass
class Row:
    name: str
    ours: Callable  # (Context) -> Side
    theirs: Callable
    ours_impl: str  # what each side runs, for the notes
    theirs_impl: str
    dtype: str = "float32"  # which peak FLOP/s the utilisation divides by
    uses: tuple = ("ours", "theirs")  # the model each side needs (loaded before a memory run)
    check: Callable | None = None  # (ctx, Timing ours, Timing theirs) -> (note, extra)
    eval_repeats: bool = False  # default repeats: Settings.eval_repeats


def training_rows():
    rows = []
    kinds = {"lora": (lora_spec, "lora.attach_lora r8 q,v,down"),
             "steer1": (partial(steer_spec, every_layer=False), "steering vector, middle layer"),
             "steerall": (partial(steer_spec, every_layer=True), "steering vector, every layer"),
             "full": (lambda cfg: Trains("full"), "full fine-tune")}
    for kind, (spec, ours_impl) in kinds.items():
        theirs_spec = spec if kind == "full" else lora_spec  # PEFT's LoRA for LoRA and steering
        theirs_impl = "HF full fine-tune" if kind == "full" else "PEFT LoRA r8 q,v,down"
        for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
            rows.append(Row(f"train_{kind}_{short}", partial(ours_train, dtype=dtype, spec=spec),
                            partial(theirs_train, dtype=dtype, spec=theirs_spec),
                            f"train.train_step, {ours_impl}", theirs_impl, dtype,
                            check=check_first_loss))
    return rows


ROWS = [
    Row("forward_fp32", partial(ours_forward, dtype="float32"),
        partial(theirs_forward, dtype="float32"), "model(tokens)", "transformers"),
    Row("forward_bf16", partial(ours_forward, dtype="bfloat16"),
        partial(theirs_forward, dtype="bfloat16"), "model(tokens), autocast",
        "transformers, autocast", "bfloat16"),
    *training_rows(),
    Row("generate_cache", partial(ours_generate, use_cache=True),
        partial(theirs_generate, use_cache=True), "model.generate, KV cache",
        "HF generate, KV cache", check=check_generation),
    Row("generate_nocache", partial(ours_generate, use_cache=False),
        partial(theirs_generate, use_cache=False), "model.generate, no cache",
        "HF generate, no cache", check=check_generation),
    Row("eval", ours_eval, theirs_eval, "tasks.evaluate", "HF loop, one sequence per forward",
        check=check_eval, eval_repeats=True),
    *[Row(f"patching_toy_{name}", partial(ours_toy_patching, n_tokens=n, corrupted=c),
          partial(loop_toy_patching, n_tokens=n, corrupted=c),
          "analyze.activation_patching (batched)", "one forward per patch", uses=("toy", "toy"),
          check=partial(check_toy_patching, corrupted=c))
      for name, (n, c) in TOY_PAIRS.items()],
    *[Row(f"attribution_vs_exact{suffix}", partial(ours_attribution, where=where),
          partial(exact_patching, where=where), "analyze.attribution_patching",
          "analyze.activation_patching (exact)", uses=("ours", "ours"), check=check_attribution)
      for where, suffix in (("late", ""), ("early", "_early"))],
]
ROW_NAMES = [row.name for row in ROWS]


def select_rows(text):
    """'a,b' -> the rows named, or named by a prefix ('train' = every train_* row), in ROWS
    order; ValueError on a selector that matches nothing."""
    chosen = set()
    for selector in [s.strip() for s in text.split(",") if s.strip()]:
        matched = {n for n in ROW_NAMES if n == selector or n.startswith(selector + "_")}
        if not matched:
            raise ValueError(f"unknown row {selector!r} (rows: {', '.join(ROW_NAMES)}; "
                             "or a prefix such as forward, train, train_lora)")
        chosen |= matched
    return [row for row in ROWS if row.name in chosen]


# -----------------------------------------------------------------------------
# Running a row


def row_repeats(row, args, settings):
    if args.repeats is not None:
        return args.repeats
    return settings.eval_repeats if row.eval_repeats else settings.repeats


def utilisation(flops, median, peak):
    return flops / median / peak


def run_row(ctx, row, repeats):
    """Set up both sides, time them interleaved, check them, put the model back -> record
    (utilisation: add_utilisation, once the peak FLOP/s are known)."""
    started = time.perf_counter()
    sides = []
    try:
        sides.append(row.ours(ctx))
        sides.append(row.theirs(ctx))
        ours, theirs = sides
        n_calls = 2 * (ctx.settings.warmup + repeats)
        with tqdm(total=n_calls, desc=row.name, leave=False, disable=None) as bar:
            t_ours, t_theirs = interleaved(ours.run, theirs.run, repeats, ctx.settings.warmup,
                                           ours.warmup, theirs.warmup, sync=ctx.sync,
                                           progress=bar.update)
        note, extra = row.check(ctx, t_ours, t_theirs) if row.check else ("", {})
    finally:
        for side in reversed(sides):
            side.close()
        gc.collect()
    record = row_record(row, t_ours, t_theirs, ours, theirs, note, extra)
    record["wall_s"] = time.perf_counter() - started  # setup, warm-ups, runs and checks
    return record


def row_record(row, t_ours, t_theirs, ours, theirs, note, extra):
    a, b = t_ours.summary(), t_theirs.summary()
    record = {"name": row.name, "ours_impl": row.ours_impl, "theirs_impl": row.theirs_impl,
              "dtype": row.dtype, "repeats": len(a["times"]), "ours": a, "theirs": b,
              "ratio_median": a["median"] / b["median"], "ratio_min": a["min"] / b["min"],
              "flops": None, "utilisation": None, "notes": note, "extra": extra,
              "memory": None}
    if ours.flops is not None and theirs.flops is not None:
        record["flops"] = {"ours": ours.flops, "theirs": theirs.flops}
    return record


# -----------------------------------------------------------------------------
# Memory: one row, one implementation, in a fresh process


def memory_run(args, settings):
    """The body of `--memory-row NAME --impl ours|theirs`: load that side's model, note the
    resident size, set the row up and run it as when timed, a warm-up and a run (a training
    step's peak comes in the second, with the optimizer's moments); print one JSON line."""
    row = next(row for row in ROWS if row.name == args.memory_row)
    ctx = Context(settings, args.device, args.hf_dir, restore=False)
    uses = row.uses[0 if args.impl == "ours" else 1]
    page_in(ctx.model(uses))
    gc.collect()
    loaded_mb, load_peak = rss_mb(), peak_mb()
    reset = reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        cuda_loaded = torch.cuda.memory_allocated()
    side = (row.ours if args.impl == "ours" else row.theirs)(ctx)
    (side.warmup or side.run)()
    side.run()
    ctx.sync()
    peak = peak_mb()
    out = {"peak_mb": max(peak, load_peak), "increase_mb": peak - loaded_mb,
           "rss_after_load_mb": loaded_mb, "load_peak_mb": load_peak, "hwm_reset": reset,
           "ru_maxrss_mb": maxrss_mb()}
    if args.device.startswith("cuda"):
        cuda_peak = torch.cuda.max_memory_allocated()
        out["cuda_peak_mb"] = cuda_peak / 2**20
        out["cuda_increase_mb"] = (cuda_peak - cuda_loaded) / 2**20
    print(json.dumps(out))


@torch.no_grad()
def page_in(model):
    """Read every weight once. Both loaders map the safetensors file lazily: a weight becomes
    resident when first used, and would count as the row's memory (~4 bytes a parameter)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        tensor.sum()


def memory_command(args, row_name, impl, hf_dir):
    command = [sys.executable, os.path.abspath(__file__), "--memory-row", row_name,
               "--impl", impl, "--hf-dir", hf_dir, "--threads", str(args.threads),
               "--device", args.device]
    return command + (["--quick"] if args.quick else [])


def measure_memory(args, row_name, hf_dir):
    """{impl: the memory process's numbers, or {"error": its last line}}."""
    out = {}
    for impl in ("ours", "theirs"):
        done = subprocess.run(memory_command(args, row_name, impl, hf_dir), capture_output=True,
                              text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            out[impl] = json.loads(lines[-1])
        else:
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            out[impl] = {"error": f"exit {done.returncode}: {error}"}
    return out


# -----------------------------------------------------------------------------
# Tables


def seconds(x):
    return f"{x:.3g}"


def percent(value):
    return "-" if value is None else f"{100 * value:.0f}%"


def util_cell(record):
    u = record["utilisation"]
    return "-" if u is None else f"{percent(u['ours'])}/{percent(u['theirs'])}"


def memory_cell(memory, impl, key):
    side = (memory or {}).get(impl) or {}
    return "-" if key not in side else f"{side[key]:.0f}"


TABLE_HEADER = (f"{'row':<22}{'ours min':>10}{'ours med':>10}{'theirs min':>12}{'theirs med':>12}"
                f"{'ratio med':>10}{'min':>6}{'util o/t':>10}")


def table_lines(results):
    """The timing table (<= 100 characters a line), the notes, the memory table."""
    lines = [TABLE_HEADER]
    for r in results["rows"]:
        a, b = r["ours"], r["theirs"]
        lines.append(f"{r['name']:<22}{seconds(a['min']):>10}{seconds(a['median']):>10}"
                     f"{seconds(b['min']):>12}{seconds(b['median']):>12}"
                     f"{r['ratio_median']:>10.2f}{r['ratio_min']:>6.2f}{util_cell(r):>10}")
    lines.append("seconds per run; ratio = ours / theirs; util = useful FLOP/s / peak matmul")
    lines += ["", "notes (ours vs theirs):"]
    for r in results["rows"]:
        lines.append(f"  {r['name']}: {r['ours_impl']} vs {r['theirs_impl']}")
        if r["notes"]:
            lines.append(f"    {r['notes']}")
    measured = [r for r in results["rows"] if r["memory"]]
    if measured:
        lines += ["", f"{'peak memory, MB':<22}{'ours peak':>10}{'increase':>10}"
                      f"{'theirs peak':>12}{'increase':>10}"]
        for r in measured:
            m = r["memory"]
            lines.append(f"{r['name']:<22}{memory_cell(m, 'ours', 'peak_mb'):>10}"
                         f"{memory_cell(m, 'ours', 'increase_mb'):>10}"
                         f"{memory_cell(m, 'theirs', 'peak_mb'):>12}"
                         f"{memory_cell(m, 'theirs', 'increase_mb'):>10}")
        lines.append("increase = peak over the resident size right after loading the model")
    return lines


def markdown_table(results):
    """The rows of a bench.json (or of main's results) as a Markdown table, for the README."""
    lines = ["| row | ours | theirs | ours min / median (s) | theirs min / median (s) "
             "| ours / theirs (median, min) | utilisation ours / theirs "
             "| peak MB ours / theirs (increase) | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        a, b, m = r["ours"], r["theirs"], r.get("memory")
        memory = "-"
        if m:
            memory = (f"{memory_cell(m, 'ours', 'peak_mb')} / "
                      f"{memory_cell(m, 'theirs', 'peak_mb')} "
                      f"(+{memory_cell(m, 'ours', 'increase_mb')} / "
                      f"+{memory_cell(m, 'theirs', 'increase_mb')})")
        lines.append(f"| `{r['name']}` | {r['ours_impl']} | {r['theirs_impl']} "
                     f"| {seconds(a['min'])} / {seconds(a['median'])} "
                     f"| {seconds(b['min'])} / {seconds(b['median'])} "
                     f"| {r['ratio_median']:.2f}, {r['ratio_min']:.2f} | {util_cell(r)} "
                     f"| {memory} | {r['notes']} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The machine


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def warn_if_busy(threads):
    """Other jobs on these cores make every number noisy, and oversubscribed threads far
    slower: say so before the run (the load is also saved with the results)."""
    load = load_average()
    if load is not None and load > 0.5:
        print(f"warning: load average {load:.1f} before the run: other jobs share these cores, "
              f"so timings are noisy{' (try --threads 1)' if threads > 1 else ''}", flush=True)
    return load


def machine(device, load_start):
    info = {"cpu": cpu_model(), "cores": available_cores(), "cpu_count": os.cpu_count(),
            "load_average": {"start": load_start, "end": load_average()},
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -----------------------------------------------------------------------------
# The command line


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line on stderr, exit code 2 (argparse's code), no usage block."""

    def error(self, message):
        sys.stderr.write(f"bench.py: error: {message} (see --help)\n")
        sys.exit(2)


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser():
    parser = OneLineParser(description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer tokens, items and repeats: under 3 minutes on 2 CPU cores")
    parser.add_argument("--threads", type=positive_int, default=available_cores(),
                        help="torch.set_num_threads (default: all cores, %(default)s here; on "
                        "cores other jobs use, fewer)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where both implementations run (default: cpu)")
    parser.add_argument("--rows", default=",".join(ROW_NAMES),
                        help="comma-separated row names or prefixes (default: every row)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs of each implementation per row (default: 5, eval 3; "
                        "--quick: 3)")
    parser.add_argument("--memory-rows", default=None,
                        help="rows whose peak memory is measured, each in a fresh process, or "
                        "'none' (default: every selected row; --quick: forward_fp32, "
                        "train_lora_fp32)")
    parser.add_argument("--out", default="bench.json", help="results file (default: bench.json)")
    # hidden: the model (tests use a tiny one), and the memory processes' own flags
    parser.add_argument("--model", default="smollm2-135m", help=argparse.SUPPRESS)
    parser.add_argument("--memory-row", choices=ROW_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.memory_row and not (args.impl and args.hf_dir):
        parser.error("--memory-row needs --impl and --hf-dir")
    try:
        args.selected = select_rows(args.rows)
        settings = QUICK if args.quick else Settings()
        memory = args.memory_rows or settings.memory_rows
        measured = [] if memory == "none" else select_rows(
            args.rows if memory == "all" else memory)
    except ValueError as e:
        parser.error(str(e))
    args.memory = [row for row in measured if row in args.selected]  # of the rows that run
    if not args.selected:
        parser.error("--rows selects no row")
    return args, settings


def prepare(args, settings, hf_dir):
    """Load ours, write it in HF's layout with the shared inputs, load theirs, check logits."""
    ours, tokenizer = load_ours(args.model, args.device)
    save_model(ours, hf_dir)
    pairs = {f"pair_{where}": prompt_pair(tokenizer, ours.cfg.vocab_size, settings.long_pair, where)
             for where in ("late", "early")}
    write_json(os.path.join(hf_dir, INPUTS_NAME), pairs)
    ctx = Context(settings, args.device, hf_dir)
    ctx.models["ours"] = ours
    ctx.models["theirs"] = load_theirs(hf_dir, args.device)
    diff = check_logits(ours, ctx.models["theirs"], args.device)
    return ctx, diff


def measure_peaks(rows, device, settings):
    """Peak matmul FLOP/s for each dtype a selected row divides by."""
    dtypes = sorted({row.dtype for row in rows})
    n = settings.matmul if device == "cpu" else 8192  # a GPU needs a larger matmul to fill it
    repeats = settings.matmul_repeats
    return {d: matmul_peak(getattr(torch, d), device, n, repeats) for d in dtypes}


def best_peaks(start, end):
    """A peak is a best case: the higher of the measurements before and after the rows (a busy
    machine at one of them would otherwise inflate every utilisation)."""
    return {d: max(start[d], end[d]) for d in start}


def add_utilisation(records, peaks):
    for r in records:
        if r["flops"] is not None:
            peak = peaks[r["dtype"]]
            r["utilisation"] = {side: utilisation(r["flops"][side], r[side]["median"], peak)
                                for side in ("ours", "theirs")}


def print_results(results):
    m = results["machine"]
    load = m["load_average"]["start"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
          f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
          f"{m['device']}" + ("" if load is None else f", load average {load:.1f}"))
    peaks = ", ".join(f"{d} {v / 1e9:.0f} GFLOP/s" for d, v in results["peak_flops"].items())
    print(f"model {results['settings']['model']}; peak matmul: {peaks}\n")
    print("\n".join(table_lines(results)))


def main(argv=None):
    args, settings = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # PEFT calls an HF attribute that transformers 5 deprecates: noise, not ours to fix
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
    if args.memory_row:
        return memory_run(args, settings)
    started = time.time()
    print(f"bench: {len(args.selected)} rows, {len(args.memory)} with memory; "
          f"{args.threads} threads, {args.device}", flush=True)
    load_start = warn_if_busy(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as hf_dir:
        ctx, logits_diff = prepare(args, settings, hf_dir)
        peaks_start = measure_peaks(args.selected, args.device, settings)
        records = [run_row(ctx, row, row_repeats(row, args, settings)) for row in args.selected]
        peaks_end = measure_peaks(args.selected, args.device, settings)
        peaks = best_peaks(peaks_start, peaks_end)
        add_utilisation(records, peaks)
        for record in records:
            if record["name"] in [row.name for row in args.memory]:
                record["memory"] = measure_memory(args, record["name"], hf_dir)
    results = {"machine": machine(args.device, load_start),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "settings": {"model": args.model, "quick": args.quick, "threads": args.threads,
                            **asdict(settings)},
               "logits_max_diff": logits_diff, "peak_flops": peaks,
               "transformers_attention": ctx.model("theirs").config._attn_implementation,
               "peak_flops_measured": {"start": peaks_start, "end": peaks_end},
               "flop_formula": FLOP_FORMULA, "seconds": time.time() - started,
               "rows": records}
    write_json(args.out, results)
    print_results(results)
    print(f"\nwrote {args.out} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
