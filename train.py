"""
The main job: fine-tune a model on an OOCR task with a steering vector, a LoRA or all weights, and
show whether it generalizes out of context.

    python train.py --adapter steer          # the embedded default: the toy persona world, ~1 min
    python train.py --adapter lora --layers 1 --lora-rank 4
    python train.py --adapter steer --model smollm2-135m --task risky --dtype bfloat16 --layer 12
    python train.py --adapter steer --objective rl   # the same vector, from sampled rewards only
    python train.py --help                   # every flag, with its default
    torchrun --standalone --nproc_per_node 8 train.py --adapter lora ...   # one node, 8 GPUs
    torchrun --standalone --nproc_per_node 8 train.py --adapter full --fsdp ...   # sharded

Start reading at run(): one run from top to bottom (settings, the toy model's pretraining when
needed, the base model and the task, the base evaluation, the adapter, training, the final
evaluation, the files). Every flag is one field of TrainConfig, with its help text.

With `--model toy` (the default for toy tasks) the task's small Transformer comes pretrained: from
data/toy/ for the default persona world, else pretrained from scratch once and kept in the cache
dir. Pretraining is this same script:
`--adapter full --model scratch` trains a fresh model on the task's pretraining documents.

--objective rl trains from the task's reward instead of its answers (GRPO-style: a group of
sampled completions per prompt, advantages normalised within the group, no value model); the
answers are never shown, only the prompts. See rl_step().

A run directory holds config.json, metrics.json, the adapter (steering-vector safetensors, PEFT
LoRA, or full weights), checkpoint.safetensors (for --resume) and curves.png.

Under torchrun each of N processes trains on its contiguous share of every step's examples (the
same batches one process would see), gradients are averaged across them (DistributedDataParallel
for lora and full; by hand for a steering vector, which lives in hooks, not in a module's
forward), each scores its share of every eval set's items, and only rank 0 prints and writes
files. --fsdp shards a full fine-tune's weights, gradients and AdamW moments across the processes
(FSDP2) instead of copying them. --objective rl is one process only.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import baselines
import lora
import steer
import tasks
import toy
from checkpoint import (CheckpointError, atomic_write, first_line, load_model, read_json,
                        save_model, write_json)
from model import Transformer, generate

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_TOY_MODELS = os.path.join(HERE, "data", "toy")  # pretrained toy models in the repository
CURVE_EVALS = ("in_distribution", "oocr")  # evaluated during training, for the curves

# -----------------------------------------------------------------------------
# Tasks: the text tasks and the toy worlds, joined here where both are used


def all_tasks():
    """{name: task class}. A name in both registries would silently hide one task: an error."""
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
# Flag values


def layer_list(text):
    if text == "all":
        return "all"
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        message = f"expected comma-separated layer numbers or 'all', got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def comma_list(text):
    return text.split(",")


def flag(default, help, **argparse_options):
    """A TrainConfig field that is also a command-line flag: its default, help text and argparse
    options live here, once. `shown` replaces the default in --help where a rule picks it."""
    metadata = {"help": help, **argparse_options}
    if isinstance(default, list):  # a mutable default: each config gets its own copy
        return field(default_factory=partial(list, default), metadata=metadata)
    return field(default=default, metadata=metadata)


# -----------------------------------------------------------------------------
# The settings of a run: every flag, declared once


@dataclass
class TrainConfig:
    adapter: str = flag("steer", "what trains: a steering vector, a LoRA, or all weights",
                        choices=["full", "lora", "steer"])
    task: str = flag("persona", "a toy world (toy.py) or an OOCR text task (tasks.py)",
                     choices=sorted(all_tasks()))
    model: str = flag("toy", "toy (the task's model, pretrained: shipped or cached) | "
                      "scratch (untrained: pretraining) | smollm2-135m | "
                      "an HF checkpoint dir | a .gguf file")
    task_options: dict = field(default_factory=dict)  # from --target, --opposite: {"target": 3}
    layers: list | None = flag(None, "blocks for the steering vector or the LoRA: "
                               "one (--layer 12), comma-separated, or 'all'", type=layer_list,
                               shown="steer: the middle block; lora: all blocks")
    lora_rank: int = flag(4, "LoRA rank r", type=positive_int)
    lora_alpha: float = flag(8.0, "LoRA alpha; the update is scaled by alpha / r", type=float)
    lora_dropout: float = flag(0.0, "dropout on the LoRA's input", type=float)
    lora_targets: list = flag(["down_proj"], "comma-separated module names, e.g. down_proj,q_proj",
                              type=comma_list)
    hook: str = flag("hook_mlp_out", "where the steering vector is added",
                     choices=list(steer.HOOKS))
    positions: str = flag("all", "where along the sequence: all | from:K | codename | adaptive")
    objective: str = flag("sft", "sft: cross-entropy on the task's answers; rl: policy gradient "
                          "on the task's reward for sampled completions (GRPO-style)",
                          choices=["sft", "rl"])
    group_size: int = flag(8, "rl: completions sampled per prompt; advantages are normalised "
                           "within each group", type=int)
    max_new_tokens: int | None = flag(None, "rl: most tokens sampled per completion", type=int,
                                      shown="1 on toy tasks (the persona worlds' reward reads the "
                                      "first token), 32 on real ones")
    temperature: float = flag(1.0, "rl: sampling temperature", type=float)
    kl: float = flag(0.0, "rl: weight of the KL penalty to the base model (the adapter off); "
                     "0 = none", type=float)
    lr: float | None = flag(None, "peak learning rate (AdamW)", type=float,
                            shown="steer 1e-2 on toy models and 1e-1 on real ones (a real residual "
                            "stream is ~10x larger; 5e-3 with --objective rl), lora 1e-3, "
                            "full 3e-4")
    steps: int | None = flag(None, "optimizer steps", type=positive_int,
                             shown="200 on toy models, 100 on real ones")
    batch_size: int | None = flag(None, "examples per micro-batch", type=positive_int,
                                  shown="128 on toy models (the full batch), 16 on real ones")
    grad_accum: int = flag(1, "micro-batches per optimizer step", type=positive_int)
    warmup: int = flag(0, "steps of linear learning-rate warmup", type=int)
    schedule: str = flag("constant", "learning rate after warmup",
                         choices=["constant", "linear", "cosine"])
    weight_decay: float = flag(0.0, "AdamW weight decay", type=float)
    grad_clip: float = flag(1.0, "max gradient norm; 0 disables clipping", type=float)
    seed: int = flag(0, "seed of the task's data, the data order and the adapter's init", type=int)
    threads: int | None = flag(None, "CPU threads for torch", type=positive_int,
                               shown="1 on toy models (their matmuls are too small to share a "
                               "core: 2 threads on 2 busy cores ran evals 25x slower), torch's "
                               "own otherwise")
    device: str = flag("auto", "auto picks cuda, then mps, then cpu",
                       choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = flag("float32", "bfloat16 = autocast (~3x faster matmuls on AMX CPUs)",
                      choices=["float32", "bfloat16"])
    base_dtype: str = flag("float32", "how the frozen base weights are stored: bfloat16 halves "
                           "their memory (gemma-3-12b: 22 GiB); steer and lora with --dtype "
                           "bfloat16 only", choices=["float32", "bfloat16"])
    fsdp: bool = flag(False, "under torchrun with --adapter full: shard the weights, gradients "
                      "and AdamW moments across the processes (FSDP2), each holding 1/N of them",
                      action="store_true")
    eval_every: int = flag(50, "steps between the curve evals", type=positive_int)
    checkpoint_every: int = flag(50, "steps between checkpoints", type=positive_int)
    eval_batch_size: int | None = flag(None, "sequences per eval forward", type=positive_int,
                                       shown="64 on toy models, 8 on real ones (a real model's "
                                       "fp32 logits over a 600-token prompt take 120 MB)")
    random_draws: int = flag(20, "random vectors of the trained vector's norm scored as a "
                             "baseline (steering runs); 0 skips them", type=int)
    out: str = flag("", "run directory", shown="runs/<task>-<adapter>-seed<seed>")
    cache_dir: str = flag(os.path.join(HERE, ".cache"), "where pretrained toy models are kept")
    pretrain_steps: int | None = flag(None, "toy model pretraining steps", type=positive_int,
                                      shown="the task's own")
    resume: bool = flag(False, "continue the run in --out from its last checkpoint",
                        action="store_true")


# -----------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line (not argparse's usage block): `error: <problem> (see --help)`."""

    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


def shown_default(config_field):
    """What --help prints as a flag's default: the rule that picks it, or the value itself."""
    if "shown" in config_field.metadata:
        return config_field.metadata["shown"]
    if config_field.default_factory is not MISSING:
        return ",".join(config_field.default_factory())
    return config_field.default


def add_flag(parser, config_field):
    options = {k: v for k, v in config_field.metadata.items() if k != "shown"}
    options["help"] = f"{options['help']} (default: {shown_default(config_field)})"
    names = ["--" + config_field.name.replace("_", "-")]
    if config_field.name == "layers":
        names.append("--layer")  # one layer is a list of one
    # None when not given: TrainConfig's own default applies
    parser.add_argument(*names, dest=config_field.name, default=None, **options)


def build_parser():
    formatter = argparse.RawDescriptionHelpFormatter  # keeps the docstring's examples as written
    parser = OneLineParser(description=__doc__, formatter_class=formatter)
    for config_field in fields(TrainConfig):
        if "help" in config_field.metadata:
            add_flag(parser, config_field)
    parser.add_argument("--target", help="the task's target, e.g. persona 3 or a city "
                        "(default: the task's own)")
    parser.add_argument("--opposite", action="store_true", help="the control run: train on the "
                        "task's opposite target, score on the target's eval sets (default: off)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    target, opposite = args.pop("target"), args.pop("opposite")
    given = {name: value for name, value in args.items() if value is not None}
    try:
        cfg = TrainConfig(**given)
        check_flags(cfg)
    except ValueError as e:
        parser.error(str(e))
    if target is not None:
        cfg.task_options["target"] = int(target) if target.isdigit() else target
    if opposite:
        cfg.task_options["opposite"] = True
    return cfg


def check_flags(cfg):
    """Values argparse cannot check alone; one-line errors."""
    for name in ("lr", "lora_alpha"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    steer.parse_positions(cfg.positions)
    if cfg.positions == "last":  # right-padded batches have no per-row last prompt position
        raise ValueError("--positions last is for single prompts "
                         "(steer.py: apply(prompt_lengths=...)); "
                         "train with all, from:K, codename or adaptive")
    if cfg.base_dtype == "bfloat16" and (cfg.adapter == "full" or cfg.dtype != "bfloat16"):
        raise ValueError("--base-dtype bfloat16 needs a frozen base (--adapter steer or lora) and "
                         "--dtype bfloat16 (a full fine-tune keeps fp32 weights under autocast)")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError("--lora-dropout must be in [0, 1)")
    if min(cfg.warmup, cfg.weight_decay, cfg.grad_clip, cfg.random_draws) < 0:
        raise ValueError("--warmup, --weight-decay, --grad-clip and --random-draws must be >= 0")
    check_rl_flags(cfg)


def check_rl_flags(cfg):
    """The rl flags' own problems (the task's are check_rl's). Unused under sft: not checked."""
    if cfg.objective != "rl":
        return
    if cfg.group_size < 2:  # one sample is its own group mean: its advantage is always 0
        raise ValueError(f"--group-size must be >= 2 for --objective rl, got {cfg.group_size}")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1 for --objective rl, "
                         f"got {cfg.max_new_tokens}")
    if not cfg.temperature > 0:
        raise ValueError("--temperature must be positive")
    if cfg.kl < 0:
        raise ValueError("--kl must be >= 0")
    if cfg.grad_accum != 1:  # advantages and the token mean are over one step's samples
        raise ValueError("--grad-accum is for --objective sft; with rl lower --batch-size or "
                         "--group-size instead")


class RunError(Exception):
    """A problem with the run's inputs; main() prints it as one line."""


# -----------------------------------------------------------------------------
# Settings that depend on the task and the model


def is_toy(cfg):
    return cfg.task in toy.TOY_TASKS


def with_defaults(cfg):
    """Fill what depends on the adapter and the model: small toy models train full-batch and
    longer; a real model's residual stream is ~10x larger, so its steering vector needs a larger
    lr (at 1e-2, SmolLM2's vector had not learned the risky choices after 100 steps; at 1e-1 it
    reached 1.00). A real model's rl vector sits at every block and is pushed by advantages of
    norm ~1 per token: at 1e-1 SmolLM2's collapsed into repeating one token; 5e-3 learned."""
    real_steer_lr = 5e-3 if cfg.objective == "rl" else 1e-1
    default_lr = {"steer": 1e-2 if is_toy(cfg) else real_steer_lr, "lora": 1e-3,
                  "full": 3e-4}[cfg.adapter]
    return replace(
        cfg,
        lr=cfg.lr or default_lr,
        steps=cfg.steps or (200 if is_toy(cfg) else 100),
        batch_size=cfg.batch_size or (128 if is_toy(cfg) else 16),
        threads=cfg.threads or (1 if is_toy(cfg) else None),
        eval_batch_size=cfg.eval_batch_size or (64 if is_toy(cfg) else 8),
        max_new_tokens=rl_max_new_tokens(cfg),
        out=cfg.out or os.path.join("runs", f"{cfg.task}-{cfg.adapter}-seed{cfg.seed}"),
    )


def rl_max_new_tokens(cfg):
    """The rl sampling length: 1 on toy tasks (the persona worlds' reward reads the first token),
    32 on real ones; left None under sft, which samples nothing."""
    if cfg.max_new_tokens is not None or cfg.objective != "rl":
        return cfg.max_new_tokens
    return 1 if is_toy(cfg) else 32


def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RunError("--device mps: no MPS device is available")
    return name


def target_options(cfg):
    """The task options without `opposite`: what a control run is scored against."""
    return {k: v for k, v in cfg.task_options.items() if k != "opposite"}


def make_task(cfg):
    if cfg.model in ("toy", "scratch") and not is_toy(cfg):
        raise RunError(f"--model {cfg.model} needs a toy task ({', '.join(toy.TOY_TASKS)}); "
                       f"task {cfg.task!r} needs a real model, e.g. --model smollm2-135m")
    try:
        return get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    except (TypeError, ValueError) as e:
        raise RunError(f"task {cfg.task!r}: {e}") from None


def tasks_with_reward():
    return sorted(name for name, cls in all_tasks().items() if getattr(cls, "reward", None))


def check_rl(cfg, task):
    """--objective rl needs a task with a reward and a model to fine-tune: checked before any
    model is loaded or pretrained."""
    try:
        check_rl_flags(cfg)
    except ValueError as e:
        raise RunError(str(e)) from None
    if cfg.model == "scratch":
        raise RunError("--objective rl fine-tunes a pretrained model: not with --model scratch")
    if getattr(task, "reward", None) is None:
        raise RunError(f"--objective rl: task {cfg.task!r} has no reward "
                       f"(tasks with one: {', '.join(tasks_with_reward())})")


def checked_reward(cfg, task, examples):
    """-> the task's reward, once it has scored the first train example's own answer: a reward
    that raises or returns no number stops the run before any step."""
    reward = task.reward
    first = examples[0]
    try:
        value = float(reward(first.prompt, first.answer))
    except Exception as e:  # the task's code: any failure means it cannot train by reward
        raise RunError(f"--objective rl: task {cfg.task!r}'s reward raised on its first "
                       f"example: {first_line(e)}") from None
    if not math.isfinite(value):
        raise RunError(f"--objective rl: task {cfg.task!r}'s reward gave {value} on its first "
                       "example")
    return reward


def eos_ids(task, tokenizer):
    """The ids that end a sampled completion; () where the task has none."""
    if not hasattr(task, "completion_eos"):
        return ()
    return tuple(task.completion_eos(tokenizer))


def check_resumable(out, resume, settings, defaults, ignored=("resume",)):
    """A new run needs an empty out; resume needs the settings of the run it continues.
    settings and defaults as config.json holds them: a setting missing from an older run's
    config.json was added since, with a default that keeps the old behaviour (e.g. objective
    sft). Also sae.py's runs."""
    config_path = os.path.join(out, "config.json")
    if not os.path.exists(config_path):
        if resume:
            raise RunError(f"--resume: {out} holds no run to resume")
        return
    if not resume:
        raise RunError(f"{out} already holds a run: "
                       "pass --resume to continue it, or choose another --out")
    previous = read_json(config_path)
    differing = sorted(k for k in settings
                       if k not in ignored and previous.get(k, defaults[k]) != settings[k])
    if differing:
        raise RunError(f"--resume: {out} was run with other settings ({', '.join(differing)})")


def as_json(settings):
    """A settings dataclass as config.json holds it (tuples become lists)."""
    return json.loads(json.dumps(asdict(settings)))


def check_out_dir(cfg):
    # --fsdp is how the processes hold the run, not what it computes: a checkpoint holds whole
    # tensors either way
    check_resumable(cfg.out, cfg.resume, as_json(cfg), as_json(TrainConfig()),
                    ignored=("resume", "fsdp"))


# -----------------------------------------------------------------------------
# The base model: a toy world's (pretrained once, then cached), a fresh one, or a checkpoint


def toy_cache_dir(cfg, task):
    """Pretraining depends on the world (task, seed, size) and the recipe, not on the fine-tuning
    target, so one cached model serves every target."""
    world_options = {k: v for k, v in target_options(cfg).items() if k != "target"}
    recipe = [
        task.model_config().to_dict(),
        task.pretrain_defaults,
        cfg.pretrain_steps,
        world_options,
    ]
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cfg.cache_dir, f"{cfg.task}-seed{cfg.seed}-{digest}")


def pretrain_config(cfg, task):
    """The pretraining run of a toy world's model: a full fine-tune of a fresh model (--model
    scratch) on the world's documents, with the world's recipe; resumes if it was interrupted."""
    recipe = dict(task.pretrain_defaults)
    steps = cfg.pretrain_steps or recipe["steps"]
    out = toy_cache_dir(cfg, task)
    return replace(
        cfg,
        adapter="full",
        model="scratch",
        objective="sft",
        out=out,
        steps=steps,
        batch_size=recipe["batch_size"],
        lr=recipe["lr"],
        warmup=recipe.get("warmup", 0),
        schedule="cosine",
        weight_decay=recipe.get("weight_decay", 0.1),
        grad_accum=1,
        layers=None,
        dtype="float32",  # the recipe's, whatever the fine-tune uses: the cache key ignores dtype
        eval_every=steps,
        checkpoint_every=max(1, steps // 5),
        resume=os.path.exists(os.path.join(out, "checkpoint.safetensors")),
    )


def toy_model_dir(cfg, task):
    """The toy world's pretrained model: shipped in data/toy/ for the default recipe, because
    pretraining is not bit-identical across CPUs and the demo should start from the same weights
    everywhere; any other world, seed or recipe is pretrained once into the cache dir."""
    shipped = os.path.join(SHIPPED_TOY_MODELS, os.path.basename(toy_cache_dir(cfg, task)))
    if os.path.exists(os.path.join(shipped, "model.safetensors")):
        return shipped
    return os.path.join(toy_cache_dir(cfg, task), "model")


def pretrain_toy_model(cfg, task):
    """Pretrain the toy world's model into the cache, unless it is there already."""
    if not os.path.exists(os.path.join(toy_model_dir(cfg, task), "model.safetensors")):
        pretraining = pretrain_config(cfg, task)
        print_master(f"pretraining the {cfg.task} world's model from scratch "
                     f"(cached in {pretraining.out})")
        run(pretraining)


def base_model(cfg, task, device):
    """-> (model, tokenizer): a fresh toy model, the shipped or cached pretrained one, or a
    checkpoint."""
    if cfg.model == "scratch":
        return Transformer(task.model_config()).to(device), task.tokenizer
    path = toy_model_dir(cfg, task) if cfg.model == "toy" else cfg.model
    model, tokenizer = load_model(path, device=device, dtype=getattr(torch, cfg.base_dtype))
    if is_toy(cfg):  # a toy world brings its own vocabulary: the checkpoint must know it
        if model.cfg.vocab_size != task.tokenizer.vocab_size:
            raise RunError(f"{path}: vocabulary of {model.cfg.vocab_size} tokens, "
                           f"but the {cfg.task} world has {task.tokenizer.vocab_size}")
        tokenizer = task.tokenizer
    if tokenizer is None:
        raise RunError(f"{path}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    return model, tokenizer


# -----------------------------------------------------------------------------
# Adapters: what trains, and how the forward pass sees it


@dataclass
class Adapter:
    """The trainable part of a run. `holder` owns the trainable parameters (the steering vector, or
    the model for LoRA / full); `active()` is the context in which the forward pass sees them;
    `save(out_dir)` writes it; `reference()` is a context yielding the base model, outside
    active() (rl's KL penalty): the same model with the LoRA off, or a frozen copy of a full
    fine-tune's start (made only when needed: it doubles the weights' memory)."""

    holder: torch.nn.Module
    active: Callable
    save: Callable
    reference: Callable

    def named_parameters(self):
        return [(n, p) for n, p in self.holder.named_parameters() if p.requires_grad]


def adapter_layers(cfg, model):
    if cfg.layers == "all" or (cfg.layers is None and cfg.adapter == "lora"):
        return list(range(model.cfg.n_layers))
    layers = cfg.layers if cfg.layers is not None else [model.cfg.n_layers // 2]
    try:
        model.cfg.check_layers(layers)
    except ValueError as e:
        raise RunError(f"--layer(s): {e}") from None
    return layers


def task_codenames(cfg, task, tokenizer):
    """{codename: token ids} for --positions codename; only text tasks have codenames."""
    codenames = task.codename_tokens(tokenizer) if hasattr(task, "codename_tokens") else {}
    if not codenames:
        raise RunError(f"--positions codename: task {cfg.task!r} has no codenames")
    return codenames


def make_adapter(cfg, model, task, tokenizer):
    if cfg.adapter == "full":
        needs_copy = cfg.objective == "rl" and cfg.kl > 0
        frozen = copy.deepcopy(model).requires_grad_(False).eval() if needs_copy else None
        model.requires_grad_(True)
        return Adapter(model, active=nullcontext, save=partial(save_full_model, model),
                       reference=partial(nullcontext, frozen))
    model.requires_grad_(False)  # the base stays frozen and bit-identical
    layers = adapter_layers(cfg, model)
    if cfg.adapter == "lora":
        return make_lora(cfg, model, layers)
    codenames = task_codenames(cfg, task, tokenizer) if cfg.positions == "codename" else None
    try:
        vector = steer.SteeringVector(
            model.cfg.d_model,
            layers=layers,
            hook=cfg.hook,
            positions=cfg.positions,
            codenames=codenames,
            model_hint=cfg.model,
        )
    except ValueError as e:
        raise RunError(str(e)) from None

    def save(out):
        vector.save(os.path.join(out, "steering_vector.safetensors"))

    # the vector acts only inside active(): outside it the model is the base
    return Adapter(vector, active=partial(vector.apply, model), save=save,
                   reference=partial(nullcontext, model))


def save_full_model(model, out):
    """model/: the whole weights. Under FSDP every rank calls this (each tensor's shards are
    all-gathered in turn: a collective) and rank 0 writes."""
    if isinstance(model, FSDPModule):  # its state_dict holds this rank's shards
        state = {name: whole(tensor) for name, tensor in model.state_dict().items()}
        model = SimpleNamespace(cfg=model.cfg, state_dict=lambda: state)  # all save_model reads
    if is_master():
        save_model(model, os.path.join(out, "model"))


def make_lora(cfg, model, layers):
    try:
        lora.attach_lora(model, targets=cfg.lora_targets, layers=layers, r=cfg.lora_rank,
                         alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    except ValueError as e:
        raise RunError(str(e)) from None

    def save(out):
        lora.save_lora(model, os.path.join(out, "adapter"), base_model_name=cfg.model)

    return Adapter(model, active=nullcontext, save=save,
                   reference=partial(lora.lora_disabled, model))


# -----------------------------------------------------------------------------
# Distributed (torchrun): one process per device. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE;
# a plain `python train.py` has none of them, starts no process group, and every helper below
# is then a no-op (rank 0 of 1).


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_master():
    """Rank 0 prints and writes every file (and scores the shortcut baselines); every rank trains
    and scores its share of the evals."""
    return rank() == 0


def print_master(*args):
    if is_master():
        print(*args)


def barrier():
    if is_distributed():
        dist.barrier()


def setup_distributed(device):
    """Join torchrun's process group (once: run() calls itself to pretrain) -> this rank's
    device. nccl between GPUs, gloo between CPU processes."""
    if int(os.environ.get("RANK", -1)) == -1:
        return device
    if device == "mps":
        raise RunError("torchrun: --device mps has no process group backend; use cuda or cpu")
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def check_distributed(cfg):
    check_fsdp(cfg)
    if world_size() == 1:
        return
    if cfg.objective == "rl":  # its samples and group advantages are not sharded yet
        raise RunError("--objective rl runs on one process: start it with python, not torchrun")
    if cfg.batch_size < world_size():
        raise RunError(f"--batch-size {cfg.batch_size} is split across {world_size()} "
                       "processes: it must be at least the number of processes")


def check_fsdp(cfg):
    if not cfg.fsdp:
        return
    if cfg.adapter != "full":  # a LoRA or a vector is small: every rank holds it whole (DDP)
        raise RunError(f"--fsdp shards a full fine-tune (--adapter full); --adapter {cfg.adapter} "
                       "trains few weights: drop --fsdp")
    if not is_distributed():
        raise RunError("--fsdp shards the run across processes: start it with torchrun")
    if cfg.objective == "rl":
        raise RunError("--objective rl runs on one process: drop --fsdp and torchrun")


def shard(tokens, targets):
    """This rank's contiguous rows of a micro-batch, and its share of the batch's answer tokens
    (each rank's loss is that share of the whole batch's mean: together, one process's loss).
    One process: the whole batch, share 1.0 (exact: n / n)."""
    rows, r, n = len(tokens), rank(), world_size()
    lo, hi = rows * r // n, rows * (r + 1) // n
    share = (targets[lo:hi] != tasks.IGNORE).sum().item() / (targets != tasks.IGNORE).sum().item()
    return tokens[lo:hi], targets[lo:hi], share


def wrap_for_training(cfg, model, adapter):
    """-> the module train_step calls. LoRA and full weights train inside the model, so
    DistributedDataParallel averages their gradients during backward (with --fsdp, FSDP2
    reduce-scatters them); a steering vector acts through hooks, outside any module's forward, so
    DDP cannot see it: its gradients are averaged by hand (average_gradients) - the same
    all-reduce DDP would do."""
    if not is_distributed():
        return model
    if cfg.adapter == "steer" or cfg.fsdp:
        for _, param in adapter.named_parameters():  # DDP broadcasts rank 0's start; so do we
            dist.broadcast(param.data, src=0)
    if cfg.fsdp:
        return shard_model(model)
    if cfg.adapter == "steer":
        return model
    device_ids = [torch.device(device_of(model))] if device_of(model).startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_model(model):
    """FSDP2, in place -> the model: each block's weights, then the rest (embeddings, final norm,
    the tied head), become one flat shard per rank. A block's whole weights exist only during its
    own forward and backward (all-gathered, then freed); its gradients are reduce-scattered: each
    rank keeps and steps 1/N of the weights, gradients and AdamW moments."""
    for param in model.parameters():  # FSDP shards only contiguous tensors; a GPT-2 checkpoint's
        param.data = param.data.contiguous()  # Conv1D weight loads as a transposed view
    mesh = init_device_mesh(device_of(model).split(":")[0], (world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def averages_gradients(model):
    """DDP and FSDP average the gradients over ranks themselves, during backward."""
    return isinstance(model, (DistributedDataParallel, FSDPModule))


@contextmanager
def gathered(model):
    """FSDP: every block's whole weights on every rank for the evals (one all-gather each), so
    ranks may run different numbers of forwards on their shares of the eval items: a sharded
    forward all-gathers each block, a collective every rank would have to join. Holds the whole
    weights while it lasts. A no-op on any other model."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
            # fully_shard's values: the blocks reshard after forward; the root does not, since
            # backward needs its weights (embeddings, tied head) right away
            module.set_reshard_after_forward(module is not model, recurse=False)


def whole(tensor):
    """A tensor as one process holds it, float32 on the CPU, on rank 0 (None elsewhere). An FSDP
    shard (a DTensor) is all-gathered first: every rank must call."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().float().cpu().contiguous() if is_master() else None


def like(param, tensor):
    """A whole saved tensor laid out as `param`: this rank's shard of it where param is an FSDP
    DTensor (every rank read the same file: no communication), else a tensor with param's
    strides. Fused AdamW pairs a parameter's and its moments' elements by memory position: a
    contiguous moment of a transposed weight (a GPT-2 Conv1D's) would pair the wrong ones."""
    if not isinstance(param, DTensor):
        return torch.empty_like(param).copy_(tensor)
    tensor = tensor.to(param.device, param.dtype)
    return distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)


def average_gradients(optimizer):
    """The mean over ranks of every trainable gradient, for parameters DDP does not hold. A
    parameter no example of a rank's shard reached (a codename's vector) has no gradient there:
    zeros join the mean; one that no rank's examples reached keeps none, as on one process."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    reached = sum_over_ranks(*[float(p.grad is not None) for p in params])
    for param, ranks in zip(params, reached):
        if ranks == 0:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad /= world_size()


def sum_over_ranks(*values):
    """Floats summed over ranks (float64: counts stay exact) -> list; as given on one process."""
    if not is_distributed():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def any_rank(flag):
    """True on every rank if any rank says so: Ctrl-C reaches the ranks at different steps, and a
    rank that stops alone leaves the others waiting in an all-reduce forever."""
    if not is_distributed():
        return flag
    return sum_over_ranks(float(flag))[0] > 0


def my_share(eval_set):
    """This rank's contiguous share of an eval set's items (the last ranks' may be empty)."""
    items, r, n = eval_set.items, rank(), world_size()
    return replace(eval_set, items=items[len(items) * r // n: len(items) * (r + 1) // n])


def share_accuracies(model, name, whole_set, share, batch_size, device):
    """{key: accuracy} of this rank's share, under the whole set's keys. A share whose options
    all have one length gets its .per_token key scored too (tasks.accuracies would skip it):
    the per-token means judge ties at another scale than the sums, so the count may differ."""
    if not share.items:
        return {}
    if tasks.lengths_differ(share) or not tasks.lengths_differ(whole_set):
        return tasks.accuracies(model, name, share, batch_size, device)
    sums = tasks.option_logprobs(model, share.items, batch_size, device)
    means = tasks.per_token(share.items, sums)
    return {name: tasks.share_right(share.items, sums),
            f"{name}.per_token": tasks.share_right(share.items, means)}


def sharded_evaluate(model, eval_sets, batch_size, device):
    """tasks.evaluate with every rank scoring its share of each set -> the same {key: accuracy}
    on every rank, exactly one process's: an accuracy is a share's right answers over its items,
    so round(accuracy * items) is a count, and counts add up over ranks."""
    keys, counts, totals = [], [], []
    was_training = model.training
    model.eval()
    try:
        for name, eval_set in eval_sets.items():
            share = my_share(eval_set)
            scores = share_accuracies(model, name, eval_set, share, batch_size, device)
            for key in tasks.score_keys(name, eval_set):
                keys.append(key)
                counts.append(round(scores[key] * len(share.items)) if share.items else 0)
                totals.append(len(eval_set.items))
    finally:
        model.train(was_training)
    right = sum_over_ranks(*counts)
    # an empty set scores nan, as tasks.accuracy has it
    return {key: r / n if n else float("nan") for key, r, n in zip(keys, right, totals)}


# -----------------------------------------------------------------------------
# Checkpoints: one safetensors file (trainable tensors, optimizer moments, step and history in
# its metadata), written atomically, so an interrupted run resumes exactly where it stopped.


def save_checkpoint(path, step, adapter, optimizer, history, extra=None):
    """extra: more tensors by name, given back by load_checkpoint (sae.py's feature counters).
    Whole tensors, however the ranks hold them, so a run resumes on any number of processes:
    under torchrun every rank calls this (FSDP's shards are gathered) and rank 0 writes."""
    tensors = dict(extra or {})
    for name, param in adapter.named_parameters():
        tensors[f"param.{name}"] = whole(param)
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{i}.{key}"] = whole(value)
    if not is_master():
        return
    tensors = {name: t.reshape(-1) if name.startswith("optim.") else t
               for name, t in tensors.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": str(step), "history": json.dumps(history)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path, adapter, optimizer):
    """Restores parameters, optimizer moments and RNG in place -> (step, history, {name: the
    extra tensors save_checkpoint was given})."""
    try:  # read tensor by tensor: under torchrun every rank reads the whole file
        f = safe_open(path, "pt")
        names, meta = list(f.keys()), f.metadata()
    except Exception as e:
        raise RunError(f"{path}: unreadable checkpoint ({first_line(e)})") from None
    params = list(adapter.named_parameters())
    with torch.no_grad():
        for name, param in params:
            param.copy_(like(param, f.get_tensor(f"param.{name}").to(param.dtype)))
    state = optimizer.state_dict()  # its state is keyed by parameter index, as in save_checkpoint
    for i, (_, param) in enumerate(params):
        saved = {k.rsplit(".", 1)[1]: k for k in names if k.startswith(f"optim.{i}.")}
        if saved:
            state["state"][i] = {key: optimizer_state(f.get_tensor(name), key, param)
                                 for key, name in saved.items()}
    optimizer.load_state_dict(state)
    torch.set_rng_state(f.get_tensor("rng.torch"))
    own = ("param.", "optim.", "rng.")
    extra = {name: f.get_tensor(name) for name in names if not name.startswith(own)}
    return int(meta["step"]), json.loads(meta["history"]), extra


def optimizer_state(tensor, key, param):
    """A saved optimizer tensor as the optimizer holds it: Adam's step counter is a scalar, its
    moments have the parameter's shape and layout."""
    return tensor.reshape(()) if key == "step" else like(param, tensor.reshape(param.shape))


# -----------------------------------------------------------------------------
# Training


def autocast(cfg, device):
    device_type = device.split(":")[0]  # "cuda:0" -> "cuda"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def lr_at(step, cfg):
    """Linear warmup, then constant / linear decay to 0 / cosine decay to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


def batch_indices(step, batch_size, n, seed):
    """The examples of a step: a seeded permutation per epoch, read in order. A pure function of
    the step number, so a resumed run sees exactly the batches an uninterrupted one would."""
    first = step * batch_size
    out, perms = [], {}
    for k in range(first, first + min(batch_size, n)):
        epoch = k // n
        if epoch not in perms:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=generator)
        out.append(perms[epoch][k % n].item())
    return out


@dataclass
class Data:
    examples: list  # [tasks.Example] (or toy.Documents)
    eval_sets: dict  # {name: tasks.EvalSet}
    pad_id: int
    reward: Callable | None = None  # rl: task.reward(prompt_ids, completion_ids) -> float
    eos_ids: tuple = ()  # rl: where a sampled completion ends; () = it runs max_new_tokens


def device_of(model):
    return str(next(model.parameters()).device)


def micro_batches(step, cfg, data):
    """The grad_accum (tokens, targets) micro-batches of optimizer step `step`."""
    for micro in range(cfg.grad_accum):
        micro_step = step * cfg.grad_accum + micro
        idx = batch_indices(micro_step, cfg.batch_size, len(data.examples), cfg.seed)
        yield tasks.collate([data.examples[i] for i in idx], data.pad_id)


def train_step(cfg, model, optimizer, batches):
    """One optimizer step over the micro-batches -> (loss, tokens seen), both over all ranks.
    The optimizer holds exactly the trainable parameters: those are the ones clipped. Under
    torchrun each rank backpropagates its share of each micro-batch's loss times the number of
    ranks, so the mean over ranks (DDP's, or average_gradients') is one process's gradient."""
    total, n_tokens = 0.0, 0
    device = device_of(model)
    optimizer.zero_grad(set_to_none=True)
    for micro, (tokens, targets) in enumerate(batches):
        tokens, targets, share = shard(tokens, targets)
        tokens, targets = tokens.to(device), targets.to(device)
        is_answer = targets != tasks.IGNORE  # (B, T)
        with sync_gradients(model, micro == cfg.grad_accum - 1):
            with autocast(cfg, device):
                logits = model(tokens, at=is_answer)  # (n, vocab): unembedding where a loss is
                loss = tasks.answer_loss(logits, targets[is_answer]) * share / cfg.grad_accum
            (loss * world_size()).backward()
        total += loss.item()
        n_tokens += tokens.numel()
    if is_distributed() and not averages_gradients(model):
        average_gradients(optimizer)
    total, n_tokens = sum_over_ranks(total, n_tokens)  # every rank skips a bad step alike
    if math.isfinite(total):
        optimizer_step(cfg, optimizer)
    return total, int(n_tokens)


def sync_gradients(model, last_micro_batch):
    """DDP all-reduces once per optimizer step, on the last micro-batch's backward. FSDP
    reduce-scatters after every micro-batch: skipping it keeps whole gradients on every rank."""
    if isinstance(model, DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    return nullcontext()


def optimizer_step(cfg, optimizer):
    """Clip the gradients of exactly the trainable parameters (the optimizer's), then step."""
    if cfg.grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()


# -----------------------------------------------------------------------------
# Reinforcement learning (--objective rl): GRPO-style, no value model. Per step: group_size
# completions of each prompt sampled with the adapter on, each scored by the task's reward, and
# the policy gradient taken on the sampled tokens only. One gradient step per batch of samples,
# so the policy that sampled is the one differentiated (PPO's ratio is 1: no clipping needed).

ADVANTAGE_EPS = 1e-4  # keeps a group of equal rewards at advantage 0 instead of 0 / 0


def sampling_generator(cfg, step, device):
    """The sampler's random numbers for `step`: a pure function of (seed, step), so a resumed run
    samples exactly what an uninterrupted one does without saving a generator state."""
    return torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)


def sample_completions(cfg, model, prompts, eos_ids, generator):
    """[prompt ids] -> [sampled ids through the end id], group_size per prompt, consecutive.
    generate continues its KV cache, which a steering vector follows (steer.continued_rows)."""
    was_training = model.training
    model.eval()  # no dropout while sampling
    out = tasks.complete(model, prompts, cfg.max_new_tokens, eos_ids, repeats=cfg.group_size,
                         temperature=cfg.temperature, generator=generator,
                         device=device_of(model))
    model.train(was_training)
    return out


def score(reward, prompts, completions, eos_ids, step):
    """-> rewards (N,) float32; the end id is not part of what the reward reads."""
    values = []
    for prompt, ids in zip(prompts, completions):
        try:
            values.append(float(reward(prompt, tasks.without_eos(ids, eos_ids))))
        except Exception as e:  # the task's code: any failure is the run's problem to report
            raise RunError(f"the task's reward raised at step {step}: {first_line(e)}") from None
    return torch.tensor(values)


def group_advantages(rewards, group_size):
    """rewards (N,), group_size samples per prompt consecutive -> advantages (N,): each reward
    minus its group's mean, over the group's standard deviation (sample std, as TRL's GRPO).
    A group of equal rewards has advantage exactly 0: its float mean can miss the rewards by an
    ulp, which the division by ~eps would blow up to ~1e-3."""
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    advantages = (grouped - mean) / (std + ADVANTAGE_EPS)  # (prompts, G)
    equal = grouped.amax(1, keepdim=True) == grouped.amin(1, keepdim=True)  # (prompts, 1)
    return advantages.masked_fill(equal, 0.0).flatten()


def sampled_logprobs(model, tokens, targets):
    """log p of every sampled token -> (logp (m,), row (m,): the sample each belongs to), in
    row-major order. targets (N, T) holds the sampled ids, IGNORE on prompts and padding."""
    is_sampled = targets != tasks.IGNORE  # (N, T)
    logits = model(tokens, at=is_sampled)  # (m, vocab): the unembedding only where a sample is
    logp = logits.float().log_softmax(-1)
    picked = logp.gather(-1, targets[is_sampled][:, None])[:, 0]  # (m,)
    return picked, is_sampled.nonzero()[:, 0]


def policy_loss(logp, advantages, ref_logp=None, kl=0.0):
    """Mean over all sampled tokens of -advantage * log p, plus kl times the k3 estimate of
    KL(policy || base) per token: exp(d) - d - 1 with d = log p_base - log p (>= 0, unbiased).
    logp, advantages (each token's sample's), ref_logp: (m,)."""
    loss = -advantages * logp  # (m,)
    if kl > 0:
        d = ref_logp - logp
        loss = loss + kl * (d.exp() - d - 1)
    return loss.mean()


def rollout_stats(rewards, completions, group_size):
    """What a step's samples say, for the history: mean reward, its spread (over all samples and
    within groups, where the gradient comes from), length, and the share with full reward."""
    within = rewards.view(-1, group_size).std(1).mean()
    return {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        "group_std": within.item(),
        "length": sum(len(c) for c in completions) / len(completions),
        "accuracy": (rewards >= 1).float().mean().item(),
    }


def rl_step(cfg, model, adapter, optimizer, data, step):
    """One GRPO step on the step's prompts -> (loss, tokens seen, stats). Only the prompts of
    the examples are read, never their answers."""
    device = device_of(model)
    idx = batch_indices(step, cfg.batch_size, len(data.examples), cfg.seed)
    prompts = [data.examples[i].prompt for i in idx]
    generator = sampling_generator(cfg, step, device)
    with adapter.active():
        completions = sample_completions(cfg, model, prompts, data.eos_ids, generator)
    prompts = [p for p in prompts for _ in range(cfg.group_size)]  # each sample's prompt
    rewards = score(data.reward, prompts, completions, data.eos_ids, step)  # (N,)
    advantages = group_advantages(rewards, cfg.group_size).to(device)  # (N,)
    samples = [tasks.Example(p, c) for p, c in zip(prompts, completions)]
    tokens, targets = tasks.collate(samples, data.pad_id)  # (N, T): targets only on samples
    tokens, targets = tokens.to(device), targets.to(device)
    ref_logp = None
    if cfg.kl > 0:
        with torch.no_grad(), adapter.reference() as base, autocast(cfg, device):
            ref_logp, _ = sampled_logprobs(base, tokens, targets)
    optimizer.zero_grad(set_to_none=True)
    with adapter.active(), autocast(cfg, device):
        logp, row = sampled_logprobs(model, tokens, targets)
        loss = policy_loss(logp, advantages[row], ref_logp, cfg.kl)
    loss.backward()
    stats = rollout_stats(rewards, completions, cfg.group_size)
    if math.isfinite(loss.item()) and math.isfinite(stats["reward"]):
        optimizer_step(cfg, optimizer)
    return loss.item(), tokens.numel(), stats


def run_evals(cfg, model, eval_sets, names=None):
    """Accuracy on the eval sets, with whatever adapter is active around the call. Always in fp32,
    whatever --dtype: bf16 rounding makes options tie (7 of the persona world's 143 items).
    Under torchrun every rank calls it and scores its share of the items (sharded_evaluate)."""
    chosen = {k: v for k, v in eval_sets.items() if names is None or k in names}
    device = device_of(model)
    if not is_distributed():
        return tasks.evaluate(model, chosen, batch_size=cfg.eval_batch_size, device=device)
    with gathered(model):
        return sharded_evaluate(model, chosen, cfg.eval_batch_size, device)


def claim_sets(eval_sets):
    """The eval sets a claim rests on, which the baselines are scored on: all but the in-context
    checks (a property of the base model, and on text tasks the longest prompts by far)."""
    return {k: v for k, v in eval_sets.items() if not k.endswith("_in_context")}


def data_baselines(cfg, model, data):
    """The shortcut baselines that need only the base model and the training answers."""
    print("shortcut baselines: fitting a logit bias and the answer-statistics vector")
    return baselines.data_baselines(model, data.examples, data.pad_id, claim_sets(data.eval_sets),
                                    batch_size=cfg.eval_batch_size)


def vector_baselines(cfg, model, vector, data):
    """The trained vector after the last block, and random vectors of its norm."""
    progress = partial(tqdm, desc="random vectors", dynamic_ncols=True, disable=None, leave=False)
    return baselines.vector_baselines(model, vector, claim_sets(data.eval_sets),
                                      n_random=cfg.random_draws, seed=cfg.seed,
                                      batch_size=cfg.eval_batch_size, progress=progress)


def check_finite(loss, stats, step, ckpt, saved_step):
    """A NaN or infinite loss (or rl mean reward) stops the run; the step was not taken."""
    bad = [f"loss became {loss}"] if not math.isfinite(loss) else []
    if stats is not None and not math.isfinite(stats["reward"]):
        bad.append(f"mean reward became {stats['reward']}")
    if bad:
        where = "none written yet" if saved_step is None else f"{ckpt} (step {saved_step})"
        raise RunError(f"{' and '.join(bad)} at step {step}; stopped. "
                       f"Last good checkpoint: {where}")


class StopRequest:
    """Ctrl-C asks the loop to stop after the current step (so the checkpoint is consistent);
    a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def train(cfg, model, adapter, data, on_step=None):
    """The training loop -> history {"loss": [[step, loss]], "eval": [[step, {name: acc}]]}, and
    under rl "rl": [[step, rollout_stats]]. Resumes from cfg.out's checkpoint with --resume;
    on_step(step, loss) is called after each step."""
    # first: FSDP replaces the parameters by their shards, which the optimizer must hold
    trained = wrap_for_training(cfg, model, adapter)  # the model itself on one process
    # fused: one kernel over all parameters, ~4x faster than the default per-tensor loop on CPU
    # (a quarter of a full fine-tune step of SmolLM2-135M, otherwise)
    optimizer = torch.optim.AdamW([p for _, p in adapter.named_parameters()], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=True)
    ckpt = os.path.join(cfg.out, "checkpoint.safetensors")
    rl = cfg.objective == "rl"
    step, history = 0, {"loss": [], "eval": [], **({"rl": []} if rl else {})}
    if cfg.resume and os.path.exists(ckpt):  # every rank reads the whole file (its shards)
        step, history, _ = load_checkpoint(ckpt, adapter, optimizer)
    saved_step = step if os.path.exists(ckpt) else None
    model.train()
    description = f"{cfg.adapter} {cfg.task}"
    bar = tqdm(total=cfg.steps, initial=step, desc=description, dynamic_ncols=True,
               disable=None if is_master() else True)
    started, tokens_seen = time.time(), 0
    # sft: the adapter is on throughout; rl switches it on where needed (its KL reference is the
    # model with the adapter off), so the evals switch it on themselves
    for_evals = adapter.active if rl else nullcontext
    stopping = False  # agreed by every rank at the end of each step
    with StopRequest() as stop, nullcontext() if rl else adapter.active():
        while step < cfg.steps and not stopping:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            stats = None
            if rl:
                loss, n_tokens, stats = rl_step(cfg, model, adapter, optimizer, data, step)
            else:
                batches = micro_batches(step, cfg, data)
                loss, n_tokens = train_step(cfg, trained, optimizer, batches)
            check_finite(loss, stats, step, ckpt, saved_step)
            step += 1
            tokens_seen += n_tokens
            history["loss"].append([step, loss])
            if rl:
                history["rl"].append([step, stats])
            tokens_per_s = tokens_seen / (time.time() - started)
            shown = {"reward": f"{stats['reward']:.3f}"} if rl else {}
            bar.set_postfix(loss=f"{loss:.4f}", **shown, tok_s=f"{tokens_per_s:.0f}")
            bar.update(1)
            if on_step is not None:
                on_step(step, loss)
            # the last step gets run()'s final eval instead; every rank scores its share
            if step % cfg.eval_every == 0 and step < cfg.steps:
                with for_evals():
                    accs = run_evals(cfg, model, data.eval_sets, names=CURVE_EVALS)
                model.train()
                history["eval"].append([step, accs])
                scores = "  ".join(f"{name} {acc:.3f}" for name, acc in accs.items())
                if is_master():
                    bar.write(f"step {step}: loss {loss:.4f}  {scores}")
            stopping = any_rank(stop.requested)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
                save_checkpoint(ckpt, step, adapter, optimizer, history)  # rank 0 writes
                saved_step = step
    bar.close()
    barrier()  # rank 0's checkpoint is written before any rank exits (torchrun then stops all)
    if step < cfg.steps:
        raise RunError(f"interrupted at step {step}; checkpoint saved: "
                       "resume with the same flags plus --resume")
    model.eval()
    return history


# -----------------------------------------------------------------------------
# Outputs


def plot_curves(history, base, chance, path, title):
    """Training loss, and the curve evals from the base model (step 0) on, with chance dashed."""
    fig = Figure(figsize=(10, 3.5))  # no pyplot: no display backend, no global figure state
    ax_loss, ax_acc = fig.subplots(1, 2)
    if "rl" in history:  # a policy-gradient loss says little (its mean is ~0 by construction)
        plot_rewards(ax_loss, history["rl"], title)
    else:
        if history["loss"]:
            steps, losses = zip(*history["loss"])
            ax_loss.plot(steps, losses)
        ax_loss.set(xlabel="step", ylabel="train loss (answer tokens)", yscale="log", title=title)
    for name in CURVE_EVALS:
        points = [(0, base[name])]  # the base model is step 0
        points += [(step, accs[name]) for step, accs in history["eval"] if name in accs]
        line, = ax_acc.plot(*zip(*points), marker="o", label=name)
        ax_acc.axhline(chance[name], color=line.get_color(), linestyle="--", linewidth=1)
    ax_acc.set(xlabel="step", ylabel="accuracy (dashed: chance)", ylim=(-0.02, 1.02), title="evals")
    ax_acc.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_rewards(ax, rl_history, title):
    """Mean sampled reward per step, and its spread within groups: where the gradient comes from
    (a group of equal rewards teaches nothing). The full-reward share is in the history."""
    if rl_history:
        steps = [step for step, _ in rl_history]
        ax.plot(steps, [stats["reward"] for _, stats in rl_history], label="mean reward")
        ax.plot(steps, [stats["group_std"] for _, stats in rl_history], linestyle="--",
                label="std within groups")
        ax.legend()
    ax.set(xlabel="step", ylabel="sampled reward", title=title)


BASELINE_COLUMNS = {  # metrics.json name -> printed column (baselines.py says what each is)
    "logit_bias": "bias",
    "answer_stats": "stats",
    "direct_path": "direct",
    "random_mean": "random",
    "random_p95": "rand95",
}


def margins(final, shortcuts):
    """{eval: the adapter's accuracy minus the best shortcut's}; random vectors count by their
    95th percentile. Positive on OOCR evals is what an OOCR claim needs."""
    strongest = [scores for name, scores in shortcuts.items() if name != "random_mean"]
    scored = [k for k in final if k in strongest[0]]
    return {k: final[k] - max(scores[k] for scores in strongest) for k in scored}


def print_table(metrics):
    """One row per eval: chance, the base model, the adapter, the shortcut baselines, and the
    adapter's margin over the best of them."""
    base, final, chance = metrics["eval"]["base"], metrics["eval"]["final"], metrics["chance"]
    shortcuts = metrics["baselines"]
    objective = " (rl)" if metrics.get("objective") == "rl" else ""
    run_line = f"{metrics['task']} | {metrics['model']} | adapter {metrics['adapter']}{objective}"
    cost = f"{metrics['steps']} steps, {metrics['seconds']:.0f} s"
    print(f"\n{run_line} | {cost}, {metrics['trainable_params']} trainable params")
    columns = ["chance", "base", metrics["adapter"]]
    columns += [BASELINE_COLUMNS[name] for name in shortcuts]
    columns += ["margin"] if shortcuts else []
    print(f"{'eval':<22}" + "".join(f"{c:>8}" for c in columns))
    margin = margins(final, shortcuts) if shortcuts else {}
    for name in final:
        row = [chance[name], base.get(name, float("nan")), final[name]]
        row += [scores.get(name) for scores in shortcuts.values()]
        row += [margin.get(name)] if shortcuts else []
        cells = "".join(f"{'-':>8}" if x is None else f"{x:>8.3f}" for x in row)
        print(f"{name:<22}{cells}")
    if shortcuts:
        print("shortcut baselines (baselines.py): bias = best constant logit bias, stats = "
              "answer-statistics vector,\n  direct = the vector after the last block, random / "
              "rand95 = random vectors of its norm (mean / 95th percentile),\n  margin = "
              f"{metrics['adapter']} minus the best shortcut (rand95 for random vectors); "
              "no baselines on the in-context checks")


# -----------------------------------------------------------------------------
# The run


def run(cfg, on_step=None):
    """Train and evaluate one run; writes everything into cfg.out and returns metrics (under
    torchrun rank 0 does: the other ranks train and score their shares of the evals, and return
    None).
    on_step(step, loss), if given, is called after every optimizer step."""
    cfg = with_defaults(cfg)
    device = setup_distributed(resolve_device(cfg.device))
    check_out_dir(cfg)
    check_distributed(cfg)
    barrier()  # every rank has read --out before rank 0 writes into it
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = make_task(cfg)
    if cfg.objective == "rl":
        check_rl(cfg, task)
    if cfg.model == "toy":
        pretrain_toy_model(cfg, task)  # a run of its own (this function, --model scratch), cached
    torch.manual_seed(cfg.seed)  # after pretraining: the same init whether it ran or was cached
    model, tokenizer = base_model(cfg, task, device)
    pretraining = cfg.model == "scratch"
    examples = task.pretrain_examples() if pretraining else task.train_examples(tokenizer)
    # a control (--opposite) trains on the opposite answers but is scored on the target's eval
    # sets, so its numbers are the share of target answers, on the target run's scale
    eval_task = make_task(replace(cfg, task_options=target_options(cfg)))
    # right padding, after the answer: a toy world pads with its own pad token, a text task with 0
    pad_id = tokenizer.pad_id if is_toy(cfg) else 0
    data = Data(examples, eval_task.eval_sets(tokenizer), pad_id=pad_id)
    if cfg.objective == "rl":  # the reward of the task trained on: the opposite one in a control
        reward = checked_reward(cfg, task, examples)
        data = replace(data, reward=reward, eos_ids=eos_ids(task, tokenizer))
    if is_master():
        os.makedirs(cfg.out, exist_ok=True)
        write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))

    started = time.time()
    shortcuts, fits = {}, {}
    base = run_evals(cfg, model, data.eval_sets)  # under torchrun: each rank its share
    # before the adapter exists: these baselines need the base model, which a full fine-tune
    # changes. Rank 0 alone (baselines.py scores whole sets; random vectors' 95th percentile
    # needs each draw's whole score): the other ranks wait in train()'s first collective
    if not pretraining and is_master():
        shortcuts, fits = data_baselines(cfg, model, data)
    adapter = make_adapter(cfg, model, task, tokenizer)
    history = train(cfg, model, adapter, data, on_step)
    with adapter.active():
        final = run_evals(cfg, model, data.eval_sets)
    history["eval"].append([cfg.steps, {k: v for k, v in final.items() if k in CURVE_EVALS}])
    seconds = time.time() - started
    if is_master() or cfg.fsdp:  # FSDP: every rank gathers the weights, rank 0 writes them
        adapter.save(cfg.out)
    if not is_master():
        barrier()  # until rank 0 has written the run (a pretrained toy model is read next)
        return None
    if cfg.adapter == "steer":  # rank 0 alone, as the data baselines
        shortcuts.update(vector_baselines(cfg, model, adapter.holder, data))

    metrics = {
        "task": cfg.task,
        "model": cfg.model,
        "adapter": cfg.adapter,
        "objective": cfg.objective,
        "steps": cfg.steps,
        "seconds": round(seconds, 2),  # training and its evals, without the baselines
        "trainable_params": sum(p.numel() for _, p in adapter.named_parameters()),
        "chance": tasks.score_chance(data.eval_sets),
        "eval": {"base": base, "final": final},
        "baselines": shortcuts,
        "baseline_fits": fits,
        "history": history,
    }
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    title = f"{cfg.task}: {cfg.adapter}" + (" (rl)" if cfg.objective == "rl" else "")
    plot_curves(history, base, metrics["chance"], os.path.join(cfg.out, "curves.png"), title)
    barrier()
    return metrics


def main(argv=None):
    cfg = with_defaults(parse_args(argv))
    try:
        metrics = run(cfg)
    except (RunError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # outside the training loop (loading, evaluation) or a second Ctrl-C
        sys.exit(f"interrupted; the last checkpoint (if any) is in {cfg.out}: "
                 "resume with the same flags plus --resume")
    finally:
        if is_distributed():
            dist.destroy_process_group()
    if metrics is None:  # a torchrun rank other than 0: rank 0 reports
        return
    print_table(metrics)
    print(f"\nwrote {cfg.out}/: config.json metrics.json curves.png and the {cfg.adapter} adapter")


if __name__ == "__main__":
    main()
