"""
The main job: fine-tune a model on an OOCR task with a steering vector, a LoRA or all weights, and
show whether it generalizes out of context.

    python train.py --adapter steer          # the embedded default: toy persona world, a few minutes on a CPU
    python train.py --adapter lora --layers 1 --lora-rank 4
    python train.py --adapter steer --model smollm2-135m --task risky --dtype bfloat16 --layer 12

With `--model toy` (the default for toy tasks) the task's small Transformer is pretrained from
scratch first, or reused from the cache dir. Pretraining is this same script:
`--adapter full --model scratch` trains a fresh model on the task's pretraining documents.

A run directory holds config.json, metrics.json, the adapter (steering-vector safetensors, PEFT
LoRA, or full weights), checkpoint.safetensors (for --resume) and curves.png.
"""

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import lora
import steer
import tasks
import toy
from checkpoint import CheckpointError, atomic_write, first_line, load_model, save_model, write_json
from model import Transformer

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    adapter: str = "steer"  # full | lora | steer
    task: str = "persona"
    model: str = "toy"  # toy | scratch | smollm2-135m | HF checkpoint dir | .gguf file
    task_options: dict = field(default_factory=dict)  # e.g. {"target": 3} for the persona world
    layers: list | None = None  # steer: where the vectors go; lora: which blocks (None: steer middle / lora all)
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["down_proj"])
    hook: str = "hook_mlp_out"
    positions: str = "all"
    lr: float | None = None  # None: steer 1e-2 (toy) / 1e-1 (real), lora 1e-3, full 3e-4; pretraining: the task's
    steps: int | None = None  # None: 200 on toy models, 100 on real ones
    batch_size: int | None = None  # None: 128 on toy models (full batch), 16 on real ones
    grad_accum: int = 1
    warmup: int = 0
    schedule: str = "constant"  # constant | linear | cosine (after warmup)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"  # bfloat16 = autocast, ~3x faster matmuls on AMX CPUs
    eval_every: int = 50
    checkpoint_every: int = 50
    eval_batch_size: int = 64
    out: str = ""
    cache_dir: str = os.path.join(HERE, ".cache")
    pretrain_steps: int | None = None  # toy model pretraining steps (None: the task's default)
    resume: bool = False


# -----------------------------------------------------------------------------
# Tasks: the text tasks and the toy worlds, joined here where both are used


def all_tasks():
    """{name: task class}. A name in both registries would silently hide one task, so it is an error."""
    clash = set(tasks.TEXT_TASKS) & set(toy.TOY_TASKS)
    if clash:
        raise ValueError(f"task names registered twice (text and toy): {', '.join(sorted(clash))}")
    return {**tasks.TEXT_TASKS, **toy.TOY_TASKS}


def get_task(name, seed=0, **options):
    registry = all_tasks()
    if name not in registry:
        raise ValueError(f"unknown task {name!r} (choose from: {', '.join(sorted(registry))})")
    return registry[name](seed=seed, **options)


# -----------------------------------------------------------------------------
# Command line


def layer_list(text):
    if text == "all":
        return "all"
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers or 'all', got {text!r}") from None


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line (not argparse's usage block): `error: <problem> (see --help)`."""

    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


def parse_args(argv=None):
    d = TrainConfig()
    p = OneLineParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", choices=["full", "lora", "steer"], default=d.adapter)
    p.add_argument("--task", choices=sorted(all_tasks()), default=d.task)
    p.add_argument("--model", default=d.model, help="toy | scratch | smollm2-135m | HF checkpoint dir | .gguf file")
    p.add_argument("--target", help="the task's target (e.g. persona index 3, a city); default: the task's own")
    p.add_argument("--opposite", action="store_true", help="train on the task's opposite target: the control run")
    p.add_argument("--layer", type=int, help="one layer (steering vector / LoRA block)")
    p.add_argument("--layers", type=layer_list, help="comma-separated layers, or 'all'")
    p.add_argument("--lora-rank", type=positive_int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--lora-targets", default=",".join(d.lora_targets), help="comma-separated module names, e.g. down_proj,q_proj")
    p.add_argument("--hook", choices=["hook_resid_pre", "hook_resid_post", "hook_mlp_out"], default=d.hook)
    p.add_argument("--positions", default=d.positions, help="all | from:K | last | codename | adaptive")
    p.add_argument("--lr", type=float)
    p.add_argument("--steps", type=positive_int, help="default: 200 on toy models, 100 on real ones")
    p.add_argument("--batch-size", type=positive_int, help="default: 128 on toy models, 16 on real ones")
    p.add_argument("--grad-accum", type=positive_int, default=d.grad_accum)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"], default=d.schedule)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max grad norm; 0 disables")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=d.device)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype)
    p.add_argument("--eval-every", type=positive_int, default=d.eval_every)
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every)
    p.add_argument("--out", default="", help="run directory (default: runs/<task>-<adapter>-seed<seed>)")
    p.add_argument("--cache-dir", default=d.cache_dir, help="where pretrained toy models are kept")
    p.add_argument("--pretrain-steps", type=positive_int, help="toy model pretraining steps (default: the task's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a = p.parse_args(argv)
    if a.layer is not None and a.layers is not None:
        p.error("give --layer or --layers, not both")
    for name in ("lr", "lora_alpha"):
        if getattr(a, name) is not None and not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    try:
        steer.parse_positions(a.positions)
    except ValueError as e:
        p.error(str(e))
    if a.positions == "last":  # batches are right-padded: their last position is not each prompt's last token
        p.error("--positions last is for single prompts (steer.py: apply(prompt_lengths=...)); train with all, from:K, codename or adaptive")
    if not 0 <= a.lora_dropout < 1:
        p.error("--lora-dropout must be in [0, 1)")
    if a.warmup < 0 or a.weight_decay < 0 or a.grad_clip < 0:
        p.error("--warmup, --weight-decay and --grad-clip must be >= 0")
    layers = [a.layer] if a.layer is not None else a.layers
    options = {} if a.target is None else {"target": int(a.target) if a.target.isdigit() else a.target}
    if a.opposite:
        options["opposite"] = True
    return TrainConfig(adapter=a.adapter, task=a.task, model=a.model, task_options=options, layers=layers,
                       lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                       lora_targets=a.lora_targets.split(","), hook=a.hook, positions=a.positions, lr=a.lr,
                       steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, warmup=a.warmup,
                       schedule=a.schedule, weight_decay=a.weight_decay, grad_clip=a.grad_clip, seed=a.seed,
                       device=a.device, dtype=a.dtype, eval_every=a.eval_every, checkpoint_every=a.checkpoint_every,
                       out=a.out or os.path.join("runs", f"{a.task}-{a.adapter}-seed{a.seed}"),
                       cache_dir=a.cache_dir, pretrain_steps=a.pretrain_steps, resume=a.resume)


class RunError(Exception):
    """A problem with the run's inputs; main() prints it as one line."""


# -----------------------------------------------------------------------------
# Devices, learning rate, data order


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RunError("--device mps: no MPS device is available")
    return name


def autocast(cfg, device):
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def lr_at(step, cfg, base_lr):
    """Linear warmup, then constant / linear decay to 0 / cosine decay to 0."""
    if step < cfg.warmup:
        return base_lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.schedule == "linear":
        return base_lr * (1 - progress)
    if cfg.schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr


def batch_indices(step, batch_size, n, seed):
    """The examples of a step: a seeded permutation per epoch, read in order. A pure function of
    the step number, so a resumed run sees exactly the batches an uninterrupted one would."""
    first = step * batch_size
    out, perms = [], {}
    for k in range(first, first + min(batch_size, n)):
        epoch = k // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(perms[epoch][k % n].item())
    return out


# -----------------------------------------------------------------------------
# Adapters: what trains, and how the forward pass sees it


class Adapter:
    """The trainable part of a run. `holder` owns the trainable parameters (the steering vector, or
    the model for LoRA / full); `active()` is the context in which the forward pass sees them."""

    def __init__(self, holder, active, save):
        self.holder, self.active, self.save = holder, active, save

    def named_parameters(self):
        return [(n, p) for n, p in self.holder.named_parameters() if p.requires_grad]


def default_layers(cfg, model):
    if cfg.layers == "all" or (cfg.layers is None and cfg.adapter == "lora"):
        return list(range(model.cfg.n_layers))
    layers = cfg.layers if cfg.layers is not None else [model.cfg.n_layers // 2]
    bad = [l for l in layers if not 0 <= l < model.cfg.n_layers]
    if bad:
        raise RunError(f"--layer(s) {bad} out of range: the model has layers 0..{model.cfg.n_layers - 1}")
    return layers


def make_adapter(cfg, model, task, tokenizer):
    if cfg.adapter == "full":
        model.requires_grad_(True)
        return Adapter(model, nullcontext, lambda out: save_model(model, os.path.join(out, "model")))
    model.requires_grad_(False)  # the base stays frozen and bit-identical
    layers = default_layers(cfg, model)
    if cfg.adapter == "lora":
        try:
            lora.attach_lora(model, targets=cfg.lora_targets, layers=layers, r=cfg.lora_rank, alpha=cfg.lora_alpha,
                             dropout=cfg.lora_dropout)
        except ValueError as e:
            raise RunError(str(e)) from None
        return Adapter(model, nullcontext,
                       lambda out: lora.save_lora(model, os.path.join(out, "adapter"), base_model_name=cfg.model))
    codenames = None
    if cfg.positions == "codename":
        codenames = getattr(task, "codename_tokens", lambda tok: {})(tokenizer)
        if not codenames:
            raise RunError(f"--positions codename: task {cfg.task!r} has no codenames")
    try:
        vector = steer.SteeringVector(model.cfg.d_model, layers=layers, hook=cfg.hook, positions=cfg.positions,
                                      codenames=codenames, model_hint=cfg.model)
    except ValueError as e:
        raise RunError(str(e)) from None
    return Adapter(vector, lambda: vector.apply(model),
                   lambda out: vector.save(os.path.join(out, "steering_vector.safetensors")))


# -----------------------------------------------------------------------------
# Checkpoints: one safetensors file (trainable tensors, optimizer moments, step and history in
# its metadata), written atomically, so an interrupted run resumes exactly where it stopped.


def save_checkpoint(path, step, adapter, optimizer, history):
    tensors = {f"param.{n}": p.detach().float().cpu().contiguous() for n, p in adapter.named_parameters()}
    for i, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{i}.{k}": v.float().cpu().contiguous().reshape(-1) for k, v in state.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": str(step), "history": json.dumps(history)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path, adapter, optimizer):
    """Restores parameters, optimizer moments and RNG in place -> (step, history)."""
    try:
        with safe_open(path, "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    except Exception as e:
        raise RunError(f"{path}: unreadable checkpoint ({first_line(e)})") from None
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            p.copy_(tensors[f"param.{n}"].to(p.dtype))
    state = optimizer.state_dict()  # its state is keyed by parameter index, as in save_checkpoint
    for i, (_, param) in enumerate(adapter.named_parameters()):
        keys = [k for k in tensors if k.startswith(f"optim.{i}.")]
        if keys:
            state["state"][i] = {k.rsplit(".", 1)[1]: tensors[k].reshape(() if k.endswith(".step") else param.shape) for k in keys}
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), json.loads(meta["history"])


# -----------------------------------------------------------------------------
# Training


class StopRequest:
    """Ctrl-C asks the loop to stop after the current step (so the checkpoint is consistent);
    a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        self.previous = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def train_step(step, cfg, model, adapter, optimizer, examples, pad_id, device):
    """One optimizer step over grad_accum micro-batches -> (loss, tokens seen)."""
    total, n_tokens = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for micro in range(cfg.grad_accum):
        idx = batch_indices(step * cfg.grad_accum + micro, cfg.batch_size, len(examples), cfg.seed)
        tokens, targets = tasks.collate([examples[i] for i in idx], pad_id)
        with autocast(cfg, device):
            loss = tasks.answer_loss(model(tokens.to(device)), targets.to(device)) / cfg.grad_accum
        loss.backward()
        total += loss.item()
        n_tokens += tokens.numel()
    if not math.isfinite(total):
        return total, n_tokens
    params = [p for _, p in adapter.named_parameters()]
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    return total, n_tokens


CURVE_EVALS = ("in_distribution", "oocr")  # evaluated during training, for the curves


def run_evals(cfg, model, eval_sets, device, names=None):
    """Accuracy on the eval sets, with whatever adapter is active around the call."""
    chosen = {k: v for k, v in eval_sets.items() if names is None or k in names}
    with autocast(cfg, device):
        return tasks.evaluate(model, chosen, batch_size=cfg.eval_batch_size, device=device)


def train(cfg, model, adapter, examples, eval_sets, pad_id, device, out):
    base_lr = cfg.lr
    params = [p for _, p in adapter.named_parameters()]
    optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=cfg.weight_decay)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    step, history = 0, {"loss": [], "eval": []}
    if cfg.resume and os.path.exists(ckpt):
        step, history = load_checkpoint(ckpt, adapter, optimizer)
    saved_step = step if os.path.exists(ckpt) else None
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.adapter} {cfg.task}", dynamic_ncols=True, disable=None)
    start, tokens_seen = time.time(), 0
    with StopRequest() as stop, adapter.active():
        while step < cfg.steps and not stop.requested:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, base_lr)
            loss, n_tokens = train_step(step, cfg, model, adapter, optimizer, examples, pad_id, device)
            if not math.isfinite(loss):
                where = f"{ckpt} (step {saved_step})" if saved_step is not None else "none written yet"
                raise RunError(f"loss became {loss} at step {step}; stopped. Last good checkpoint: {where}")
            step, tokens_seen = step + 1, tokens_seen + n_tokens
            history["loss"].append([step, loss])
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / (time.time() - start):.0f}")
            bar.update(1)
            if step % cfg.eval_every == 0 and step < cfg.steps:  # the last step gets run()'s full final eval
                accs = run_evals(cfg, model, eval_sets, device, names=CURVE_EVALS)
                model.train()
                history["eval"].append([step, accs])
                bar.write(f"step {step}: loss {loss:.4f}  " + "  ".join(f"{k} {v:.3f}" for k, v in accs.items()))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.requested:
                save_checkpoint(ckpt, step, adapter, optimizer, history)
                saved_step = step
    bar.close()
    if step < cfg.steps:
        raise RunError(f"interrupted at step {step}; checkpoint saved: resume with the same flags plus --resume")
    model.eval()
    return history


# -----------------------------------------------------------------------------
# Outputs


def plot_curves(history, base, chance, path, title):
    """Training loss, and the curve evals from the base model (step 0) on, with chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    if history["loss"]:
        steps, losses = zip(*history["loss"])
        ax_loss.plot(steps, losses)
    ax_loss.set(xlabel="step", ylabel="train loss (answer tokens)", yscale="log", title=title)
    for name in CURVE_EVALS:
        points = [(0, base[name])] + [(s, accs[name]) for s, accs in history["eval"] if name in accs]
        line, = ax_acc.plot(*zip(*points), marker="o", label=name)
        ax_acc.axhline(chance[name], color=line.get_color(), linestyle="--", linewidth=1)
    ax_acc.set(xlabel="step", ylabel="accuracy (dashed: chance)", ylim=(-0.02, 1.02), title="evals")
    ax_acc.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def print_table(metrics):
    base, final, chance = metrics["eval"]["base"], metrics["eval"]["final"], metrics["chance"]
    print(f"\n{metrics['task']} | {metrics['model']} | adapter {metrics['adapter']} | {metrics['steps']} steps, "
          f"{metrics['seconds']:.0f} s, {metrics['trainable_params']} trainable params")
    print(f"{'eval':<22}{'chance':>8}{'base':>8}{metrics['adapter']:>8}")
    for name in final:
        print(f"{name:<22}{chance[name]:>8.3f}{base.get(name, float('nan')):>8.3f}{final[name]:>8.3f}")


# -----------------------------------------------------------------------------
# The run


def toy_cache_path(cfg, task):
    """Pretraining depends on the world (task, seed, size) and the recipe, not on the fine-tuning target."""
    recipe = json.dumps([task.model_config().to_dict(), task.pretrain_defaults, cfg.pretrain_steps,
                         {k: v for k, v in cfg.task_options.items() if k not in ("target", "opposite")}], sort_keys=True)
    return os.path.join(cfg.cache_dir, f"{cfg.task}-seed{cfg.seed}-{hashlib.sha1(recipe.encode()).hexdigest()[:10]}")


def pretrain_config(cfg, task, out):
    d = {**task.pretrain_defaults, **({"steps": cfg.pretrain_steps} if cfg.pretrain_steps else {})}
    return replace(cfg, adapter="full", model="scratch", out=out, steps=d["steps"], batch_size=d["batch_size"],
                   lr=d["lr"], warmup=d.get("warmup", 0), schedule="cosine", weight_decay=d.get("weight_decay", 0.1),
                   grad_accum=1, layers=None, eval_every=d["steps"], checkpoint_every=max(1, d["steps"] // 5),
                   resume=os.path.exists(os.path.join(out, "checkpoint.safetensors")))


def base_model(cfg, task, device):
    """-> (model, tokenizer) for the run: a fresh toy model, the cached pretrained one, or a checkpoint."""
    is_toy = cfg.task in toy.TOY_TASKS
    if cfg.model in ("toy", "scratch") and not is_toy:
        raise RunError(f"--model {cfg.model} needs a toy task ({', '.join(toy.TOY_TASKS)}); task {cfg.task!r} needs a real model, e.g. --model smollm2-135m")
    if cfg.model == "scratch":
        torch.manual_seed(cfg.seed)
        return Transformer(task.model_config()).to(device), task.tokenizer
    path = cfg.model
    if cfg.model == "toy":
        cached = toy_cache_path(cfg, task)
        path = os.path.join(cached, "model")
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            print(f"pretraining the {cfg.task} world's model from scratch (cached in {cached})")
            run(pretrain_config(cfg, task, cached))
    model, tokenizer = load_model(path, device=device)
    if is_toy:  # a toy world brings its own vocabulary; the checkpoint must have been trained on it
        if model.cfg.vocab_size != task.tokenizer.vocab_size:
            raise RunError(f"{path}: vocabulary of {model.cfg.vocab_size} tokens, but the {cfg.task} world has {task.tokenizer.vocab_size}")
        tokenizer = task.tokenizer
    if tokenizer is None:
        raise RunError(f"{path}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    return model, tokenizer


def check_out_dir(cfg):
    config_path = os.path.join(cfg.out, "config.json")
    if not os.path.exists(config_path):
        if cfg.resume:
            raise RunError(f"--resume: {cfg.out} holds no run to resume")
        return
    if not cfg.resume:
        raise RunError(f"{cfg.out} already holds a run: pass --resume to continue it, or choose another --out")
    with open(config_path) as f:
        previous = json.load(f)
    mine = json.loads(json.dumps(asdict(cfg)))  # as config.json holds it (tuples become lists)
    differing = sorted(k for k in mine if k != "resume" and previous.get(k) != mine[k])
    if differing:
        raise RunError(f"--resume: {cfg.out} was run with other settings ({', '.join(differing)})")


def with_defaults(cfg):
    """Fill what depends on the adapter and the model: small toy models train full-batch and longer;
    a real model's residual stream is ~10x larger, so its steering vector needs a larger lr (at 1e-2,
    SmolLM2's vector had not learned the risky choices after 100 steps; at 1e-1 it reached 1.00)."""
    toy_model = cfg.task in toy.TOY_TASKS
    steer_lr = 1e-2 if toy_model else 1e-1
    return replace(cfg, lr=cfg.lr or {"steer": steer_lr, "lora": 1e-3, "full": 3e-4}[cfg.adapter],
                   steps=cfg.steps or (200 if toy_model else 100), batch_size=cfg.batch_size or (128 if toy_model else 16))


def run(cfg):
    """Train and evaluate one run; writes everything into cfg.out and returns metrics."""
    device = resolve_device(cfg.device)
    cfg = with_defaults(cfg)
    check_out_dir(cfg)
    torch.manual_seed(cfg.seed)
    try:
        task = get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    except (TypeError, ValueError) as e:
        raise RunError(f"task {cfg.task!r}: {e}") from None
    model, tokenizer = base_model(cfg, task, device)
    pretraining = cfg.model == "scratch"
    examples = task.pretrain_examples() if pretraining else task.train_examples(tokenizer)
    eval_sets = task.eval_sets(tokenizer)
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
    started = time.time()
    base = run_evals(cfg, model, eval_sets, device)
    adapter = make_adapter(cfg, model, task, tokenizer)
    pad_id = getattr(tokenizer, "pad_id", 0)
    history = train(cfg, model, adapter, examples, eval_sets, pad_id, device, cfg.out)
    with adapter.active():
        final = run_evals(cfg, model, eval_sets, device)
    history["eval"].append([cfg.steps, {k: v for k, v in final.items() if k in CURVE_EVALS}])
    adapter.save(cfg.out)
    metrics = {"task": cfg.task, "model": cfg.model, "adapter": cfg.adapter, "steps": cfg.steps,
               "seconds": round(time.time() - started, 2),
               "trainable_params": sum(p.numel() for _, p in adapter.named_parameters()),
               "chance": {k: v.chance for k, v in eval_sets.items()}, "eval": {"base": base, "final": final},
               "history": history}
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    plot_curves(history, base, metrics["chance"], os.path.join(cfg.out, "curves.png"), f"{cfg.task}: {cfg.adapter}")
    return metrics


def main(argv=None):
    cfg = parse_args(argv)
    try:
        metrics = run(cfg)
    except (RunError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # outside the training loop (loading, evaluation) or a second Ctrl-C
        sys.exit(f"interrupted; the last checkpoint (if any) is in {cfg.out}: resume with the same flags plus --resume")
    print_table(metrics)
    print(f"\nwrote {cfg.out}/: config.json metrics.json curves.png and the {cfg.adapter} adapter")


if __name__ == "__main__":
    main()
