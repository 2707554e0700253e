"""
The reproduction study (issue 17): one command runs every part, then writes RESULTS.md and the
figures it shows (docs/results/*.png) from the run directories it made or found under --out.

    python reproduce.py                         # the whole study: a few CPU hours
    python reproduce.py --quick                 # a reduced version: under 15 min on 2 CPU cores
    python reproduce.py --parts composition --force    # rerun one part, then rewrite RESULTS.md

Parts (in RESULTS.md's order): lora_vs_steering, composition, real_checkpoints, rl,
reading_vectors, paper_numbers. A part is a function that runs what it needs (train.py runs
through sweep.py or train.run, analyze.py subcommands through analyze.main) and returns its
markdown section, its figures and the numbers later parts read. Each finished part leaves
OUT/<part>/part.json; a part whose record exists (made at the same scale) is skipped unless
--force, and inside a part every train.py run whose metrics.json exists is reused, so a stopped
study resumes where it stopped. Every number in RESULTS.md comes from those runs.
"""

import argparse
import functools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm

import analyze
import sae
import sweep
import tasks
import train
from checkpoint import CheckpointError, atomic_write, read_json, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURE_DIR = "docs/results"  # relative to RESULTS.md, so the repository page shows the figures
RECORD = "part.json"
DISCUSSION = os.path.join(HERE, "docs", "discussion.md")  # by hand, after the full study: last
SHORTCUTS = (("logit_bias", "bias"), ("answer_stats", "stats"), ("direct_path", "direct"),
             ("random_p95", "rand95"))


# -----------------------------------------------------------------------------
# Scale: what --quick reduces. Steps stay at train.py's defaults, so a quick run's directories
# are a subset of the full study's and a later full run reuses them.


@dataclass(frozen=True)
class Scale:
    seeds: tuple = (0, 1, 2)  # world seeds (1 and 2 are pretrained on first use, ~2-4 min each)
    targets: tuple | None = None  # persona worlds' targets; None = all 8
    persona_kinds: tuple = ("steer", "steer:0", "steer:1", "steer:3", "control", "lora",
                            "control:lora", "lora:0", "lora:1", "lora:2", "lora:3", "full",
                            "control:full")
    compose_runs: tuple | None = None  # names in COMPOSE_RUNS; None = all
    rl_real: bool = True  # part 4's SmolLM2 table (~2 CPU hours)
    real_models: tuple = ("smollm2-135m", "gemma3-270m")  # part 3's checkpoints
    real_task_limit: int | None = None  # part 3 trains the N cheapest passing tasks; None = all


FULL = Scale()
QUICK = Scale(seeds=(0,),
              persona_kinds=("steer", "control", "lora", "lora:2", "full"),
              rl_real=False,
              real_models=(), real_task_limit=1,  # part 3: ~40 min even reduced
              compose_runs=("embed", "embed-opp", "full", "full-opp", "lora", "lora-opp",
                            "steerL0", "steerL1", "steerL2", "steerL3"))
STEER_LAYER = 2  # train.py's default steering block on the 4-layer toy models (the middle one)


def reductions(full, quick):
    """The settings --quick changes, in words: 'seeds: 0,1,2 -> 0'."""
    def shown(value):
        if value is None:
            return "all"
        if isinstance(value, (tuple, list)):
            return ",".join(map(str, value)) or "none"
        return str(value)

    full_d, quick_d = asdict(full), asdict(quick)
    return [f"{name}: {shown(full_d[name])} → {shown(quick_d[name])}"
            for name in full_d if full_d[name] != quick_d[name]]


# -----------------------------------------------------------------------------
# The machine a part ran on, recorded beside its wall time


def cpu_model():
    """/proc/cpuinfo's model name where there is one (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    record = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "python": platform.python_version(),
              "platform": platform.platform()}
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name(0)
    return record


def machine_line(m):
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s), torch {m['torch']}, "
            f"Python {m['python']}{gpu}")


# -----------------------------------------------------------------------------
# Numbers: mean ± spread over runs, shortcut baselines, and the verdict against them


mean_sd = sweep.mean_and_spread  # [numbers] -> (mean, sample standard deviation; 0 for one)


def cell(values):
    """[numbers] -> '0.500 ± 0.141' (sample standard deviation; ± 0.000 for one run)."""
    mean, sd = mean_sd(values)
    return f"{mean:.3f} ± {sd:.3f}"


def run_margin(metrics, key):
    """The run's accuracy on `key` minus its best shortcut there (random vectors by their 95th
    percentile: train.margins' rule); None where the run has no shortcut for `key`."""
    shortcuts = metrics.get("baselines") or {}
    if not shortcuts or key not in next(iter(shortcuts.values())):
        return None
    return train.margins(metrics["eval"]["final"], shortcuts).get(key)


def verdict(margins):
    """Does the adapter beat every shortcut? 'yes' when the mean margin over runs is positive by
    more than its standard deviation, 'no' when it is not positive, else 'unclear'. One run: the
    sign of its margin."""
    margins = [m for m in margins if m is not None]
    if not margins:
        return "-"
    mean, sd = mean_sd(margins)
    if mean <= 0:
        return "no"
    return "yes" if mean > sd else "unclear"


def shortcut_cells(runs, key):
    """'bias / stats / direct / rand95' on `key`, each a mean over runs; '-' where absent."""
    def one(name):
        values = [m["baselines"].get(name, {}).get(key) for m in runs]
        return "-" if None in values else f"{statistics.fmean(values):.3f}"
    return " / ".join(one(name) for name, _ in SHORTCUTS)


def group_row(label, runs, evals, key):
    """One markdown row: per eval 'base → tuned' (base as a mean, tuned as mean ± sd), the
    shortcuts on `key`, the margin over the best of them and the verdict."""
    cells = [label, str(runs[0]["trainable_params"])]
    for name in evals:
        base = statistics.fmean(m["eval"]["base"][name] for m in runs)
        cells.append(f"{base:.3f} → {cell([m['eval']['final'][name] for m in runs])}")
    margins = [run_margin(m, key) for m in runs]
    known = [m for m in margins if m is not None]
    cells += [shortcut_cells(runs, key), cell(known) if known else "-", verdict(margins)]
    return "| " + " | ".join(cells) + " |"


def group_table(groups, evals, key):
    """{label: [metrics of its runs]} -> a markdown table, one row per label."""
    names = [f"{name} base → tuned" for name in evals]
    header = ["run", "trainable", *names, f"{key}: " + " / ".join(s for _, s in SHORTCUTS),
              f"{key} margin over the best shortcut", "beats every shortcut"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [group_row(label, runs, evals, key) for label, runs in groups.items()]
    return "\n".join(lines)


TABLE_NOTE = ("Each cell: base → tuned, mean ± standard deviation over the runs (targets × "
              "seeds). Shortcut baselines (baselines.py, fitted per run, means over runs): "
              "`bias` the best constant logit bias, `stats` the answer-statistics vector, "
              "`direct` the trained vector after the last block, `rand95` the 95th percentile of "
              "20 random vectors of its norm (the last two for steering vectors only). Margin = "
              "tuned minus the run's best shortcut; beats every shortcut = \"yes\" when the mean "
              "margin is positive by more than its standard deviation, \"no\" when it is not "
              "positive, \"unclear\" between.")


# -----------------------------------------------------------------------------
# Run labels: the train.py flags that differ from the defaults


LABEL_FIELDS = ("adapter", "layers", "hook", "positions", "lr", "steps")


def train_flags(cfg):
    """A TrainConfig -> the train.py flags that set it apart (task, seed, target and out left
    out: the table's caption gives them)."""
    default = train.TrainConfig()
    flags = [f"--adapter {cfg.adapter}"]
    for name in LABEL_FIELDS[1:]:
        value = getattr(cfg, name)
        if value != getattr(default, name):
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            flags.append(f"--{name.replace('_', '-')} {shown}")
    if cfg.task_options.get("opposite"):
        flags.append("--opposite")
    return " ".join(flags)


def where(cfg):
    """Where an adapter sits when no --layer is given (train.adapter_layers' defaults)."""
    if cfg.layers is not None or cfg.adapter == "full":
        return ""
    return " (all blocks)" if cfg.adapter == "lora" else f" (block {STEER_LAYER})"


def kind_label(kind, task):
    cfg = sweep.run_settings(kind, task, 0, 0, "")
    return f"`{kind}`: `{train_flags(cfg)}`{where(cfg)}"


# -----------------------------------------------------------------------------
# Parts: the framework


@dataclass
class Context:
    quick: bool
    out: str
    model: str | None = None
    records: dict = field(default_factory=dict)  # finished parts' records, read by later parts
    runs: dict = field(default_factory=lambda: {"trained": 0, "reused": 0})  # the current part's
    run_dirs: list = field(default_factory=list)  # the current part's train.py runs
    check_seconds: float = 0.0  # the current part's in-context checks' recorded seconds

    def tally(self, run_dirs):
        """Count the train.py runs about to be made or reused: a part's wall time means little
        without knowing how many of its runs it trained."""
        done = sum(os.path.exists(os.path.join(d, "metrics.json")) for d in run_dirs)
        self.runs["reused"] += done
        self.runs["trained"] += len(run_dirs) - done
        self.run_dirs += run_dirs

    def run_seconds(self):
        """The seconds the part's train.py runs recorded, summed: what they cost, whichever
        command (or session, for a resumed study) trained them."""
        paths = [os.path.join(d, "metrics.json") for d in self.run_dirs]
        runs = sum(read_json(p).get("seconds", 0) for p in paths if os.path.exists(p))
        return runs + self.check_seconds

    @property
    def scale(self):
        return QUICK if self.quick else FULL

    def part_dir(self, name):
        path = os.path.join(self.out, name)
        os.makedirs(path, exist_ok=True)
        return path


@dataclass
class Section:
    markdown: str
    figures: list = field(default_factory=list)  # PNG paths inside the part's directory
    data: dict = field(default_factory=dict)  # the numbers later parts (paper_numbers) read


@dataclass(frozen=True)
class Part:
    title: str
    function: object  # Context -> Section
    cheap: bool = False  # runs nothing: rebuilt every time from the other parts' records


def plan(ctx):
    """What decides a part's outputs: a record made at another scale is not reused. As JSON
    holds it (tuples become lists), so a stored plan compares equal."""
    return json.loads(json.dumps({"scale": asdict(ctx.scale), "model": ctx.model}))


def record_path(ctx, name):
    return os.path.join(ctx.out, name, RECORD)


def run_part(ctx, name, force=False):
    """Run one part (or reuse its record) -> its record."""
    part = PARTS[name]
    record = None if force else stored_record(ctx, name)
    if record is not None:
        print(f"[{name}] reused {record_path(ctx, name)} (--force reruns it)")
        return record
    print(f"[{name}] running")
    started = time.time()
    ctx.runs, ctx.run_dirs, ctx.check_seconds = {"trained": 0, "reused": 0}, [], 0.0
    section = part.function(ctx)
    runs = {**ctx.runs, "seconds": round(ctx.run_seconds())}
    record = {"name": name, "title": part.title, "plan": plan(ctx),
              "markdown": section.markdown, "data": section.data, "runs": runs,
              "figures": [os.path.abspath(f) for f in section.figures],
              "seconds": round(time.time() - started, 1), "machine": machine(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if not part.cheap:
        write_json(os.path.join(ctx.part_dir(name), RECORD), record)
    return record


def stored_record(ctx, name):
    """The part's record from an earlier run at this scale, or None (cheap parts keep none)."""
    path = record_path(ctx, name)
    if PARTS[name].cheap or not os.path.exists(path):
        return None
    record = read_json(path)
    return record if record.get("plan") == plan(ctx) else None


# -----------------------------------------------------------------------------
# Part 1: LoRA ≈ a steering vector? The persona worlds


PERSONA_WORLDS = {"persona": ("in_distribution", "oocr", "oocr_in_context"),
                  "persona_hard": ("in_distribution", "oocr", "oocr_name", "oocr_in_context")}


def sweep_argv(task, scale, out):
    argv = ["--task", task, "--seeds", ",".join(map(str, scale.seeds)),
            "--runs", ",".join(scale.persona_kinds), "--out", out]
    if scale.targets is not None:
        argv += ["--targets", ",".join(map(str, scale.targets))]
    return argv


def sweep_dirs(task, scale, out, kinds=None):
    """The run directories of the sweep (of the given kinds only)."""
    targets = scale.targets or sweep.world_targets(task, scale.seeds[0])
    return [sweep.run_dir(out, kind, s, t)
            for kind in kinds or scale.persona_kinds for s in scale.seeds for t in targets]


def world_runs(task, scale, out):
    """{kind: [metrics of every (seed, target)]}, read back from the sweep's run directories."""
    return {kind: [read_json(os.path.join(d, "metrics.json"))
                   for d in sweep_dirs(task, scale, out, [kind])]
            for kind in scale.persona_kinds}


def steer_kind(layer):
    """The sweep's kind for the steering vector at `layer` (the default block is plain steer)."""
    return "steer" if layer == STEER_LAYER else f"steer:{layer}"


def analysed_layers(kinds):
    """The blocks with both a one-layer LoRA and a steering vector in the sweep."""
    layers = [int(k.partition(":")[2]) for k in kinds if k.startswith("lora:")]
    return [layer for layer in layers if steer_kind(layer) in kinds]


def run_analysis(name, run_dir, out, *flags):
    """An analyze.py subcommand on a run -> (its record, the command)."""
    argv = [name, "--run", run_dir, "--out", out, *flags]
    analyze.main(argv)
    return read_json(os.path.join(out, f"{name}.json")), "python analyze.py " + " ".join(argv)


def lora_analysis(out, layer):
    """analyze.py lora_vs_steering on the seed-0, target-0 LoRA at `layer`, beside the steering
    vector trained at the same block (seconds: rerun every time) -> (record, PNG, command)."""
    analysis_dir = os.path.join(out, "analysis", f"block{layer}")
    record, command = run_analysis("lora_vs_steering", sweep.run_dir(out, f"lora:{layer}", 0, 0),
                                   analysis_dir, "--steer-run",
                                   sweep.run_dir(out, steer_kind(layer), 0, 0))
    return record, os.path.join(analysis_dir, "lora_vs_steering.png"), command


def lora_numbers(record):
    """The numbers of a lora_vs_steering record that the tables and paper_numbers use."""
    groups = {name: {k: g[k] for k in ("n_tokens", "pc1_share", "mean_abs_cos",
                                       "mean_abs_cos_pc1", "mean_norm")}
              for name, g in record["groups"].items()}
    return {"hook": record["hook"], "cos_natural_trained": record["cos_natural_trained"],
            "groups": groups, "accuracy": record["accuracy"],
            "positive_share": record["sign_split"]["natural"]["positive_share"]}


def slashed(values, digits=3):
    return " / ".join(fmt(v, digits) for v in values)


def lora_row(layer, n):
    """One block's row: the diffs' geometry, the sign split and the substituted accuracies."""
    groups, acc, shares = n["groups"].values(), n["accuracy"], n["positive_share"]
    states = [s for s in ("base", "lora", "natural", "-natural", "trained") if s in acc]
    return (f"| {layer} | {slashed(g['pc1_share'] for g in groups)} | "
            f"{slashed(g['mean_abs_cos'] for g in groups)} | {fmt(n['cos_natural_trained'])} | "
            f"{slashed([shares['seen'], shares['never_seen']], 2)} | "
            f"{slashed(acc[s]['oocr'] for s in states)} | {n['shortcuts']} | "
            f"{slashed(acc[s]['in_distribution'] for s in states)} |")


def lora_markdown(per_layer, command):
    """{block: numbers} -> a table, one row per block."""
    first = next(iter(per_layer.values()))
    groups = " / ".join(first["groups"])
    states = " / ".join(s for s in ("base", "lora", "natural", "-natural", "trained")
                        if s in first["accuracy"])
    header = ["block", f"PC1 share ({groups})", f"mean abs cos between token diffs ({groups})",
              "cos(natural, trained)", "diffs along the natural vector: seen / never seen in "
              "fine-tuning", f"oocr: {states}", "oocr shortcuts of the block's steering run: "
              + " / ".join(name for _, name in SHORTCUTS), f"in_distribution: {states}"]
    lines = [f"Per block, one run (seed 0, target 0): the one-layer LoRA's per-token output "
             f"differences read by `analyze.py lora_vs_steering` beside the steering vector "
             f"trained at the same block (e.g. `{command}`); the "
             f"natural vector (PC1 × mean norm) and the trained vector put in the LoRA's place.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [lora_row(layer, n) for layer, n in per_layer.items()]
    return "\n".join(lines)


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def cross_target_line(summary):
    cross = summary.get("cross_target")
    if not cross:
        return "", {}
    text = (f"Cross-target matrix of the steering vectors (vector trained on target j scored "
            f"on target i's probe, mean over seeds): oocr {cross['diagonal']:.3f} on its own "
            f"target, {cross['off_diagonal']:.3f} on the others.")
    return text, {"diagonal": cross["diagonal"], "off_diagonal": cross["off_diagonal"]}


def persona_world_section(ctx, task, part_dir):
    """One world: the sweep, its table, the cross-target matrix and the LoRA analysis."""
    out = os.path.join(part_dir, task)
    argv = sweep_argv(task, ctx.scale, out)
    ctx.tally(sweep_dirs(task, ctx.scale, out))
    sweep.main(argv)  # reuses every run whose metrics.json exists
    runs = world_runs(task, ctx.scale, out)
    evals = PERSONA_WORLDS[task]
    groups = {kind_label(kind, task): metrics for kind, metrics in runs.items()}
    summary = read_json(os.path.join(out, "summary.json"))
    cross_text, cross = cross_target_line(summary)
    figures = [copy_as(os.path.join(out, "cross_target.png"),
                       os.path.join(part_dir, f"{task}_cross_target.png"))]
    per_layer, links = {}, []
    for layer in analysed_layers(ctx.scale.persona_kinds):
        record, png, command = lora_analysis(out, layer)
        steer_run = read_json(os.path.join(sweep.run_dir(out, steer_kind(layer), 0, 0),
                                           "metrics.json"))
        per_layer[str(layer)] = {**lora_numbers(record),
                                 "shortcuts": shortcut_cells([steer_run], "oocr"),
                                 "chance": steer_run["chance"]["oocr"]}
        figures.append(copy_as(png, os.path.join(part_dir, f"{task}_lora_block{layer}.png")))
        links.append(figure_link(figures[-1], f"{task}: LoRA vs steering at block {layer}"))
    text = "\n".join([
        f"### `{task}`", "", f"`python sweep.py {' '.join(argv)}` ({run_count(runs)})", "",
        group_table(groups, evals, "oocr"), "", cross_text, "",
        figure_link(figures[0], f"{task}: cross-target matrix"), "",
        lora_markdown(per_layer, command) if per_layer else "No one-layer LoRA analysed.", "",
        *links])
    data = {"runs": {kind: summarise_kind(metrics) for kind, metrics in runs.items()},
            "cross_target": cross, "lora_analysis": per_layer}
    return text, figures, data


def run_count(runs):
    """{kind: [metrics]} -> '40 runs of 200 steps' (the steps as the runs recorded them)."""
    every = [m for metrics in runs.values() for m in metrics]
    steps = "/".join(str(n) for n in sorted({m["steps"] for m in every}))
    return f"{len(every)} runs of {steps} steps"


def summarise_kind(runs):
    """The numbers paper_numbers reads of one kind of run: base and tuned means per eval, the
    margins on oocr and the verdict."""
    evals = runs[0]["eval"]["final"]
    margins = [run_margin(m, "oocr") for m in runs]
    known = [m for m in margins if m is not None]
    return {"n": len(runs),
            "base": {k: statistics.fmean(m["eval"]["base"][k] for m in runs) for k in evals},
            "final": {k: mean_sd([m["eval"]["final"][k] for m in runs]) for k in evals},
            "margin": mean_sd(known) if known else None, "verdict": verdict(margins)}


def copy_as(src, dst):
    shutil.copyfile(src, dst)
    return dst


def figure_link(path, alt):
    return f"![{alt}]({FIGURE_DIR}/{os.path.basename(path)})"


def lora_vs_steering_part(ctx):
    part_dir = ctx.part_dir("lora_vs_steering")
    texts, figures, data = [], [], {}
    for task in PERSONA_WORLDS:
        text, figs, data[task] = persona_world_section(ctx, task, part_dir)
        texts.append(text)
        figures += figs
    intro = ("Base vs full fine-tune vs all-layer LoRA vs one-layer LoRA vs trained steering "
             "vector and the opposite-answer controls (Wang, Engels et al. 2025), on the easy "
             "`persona` world (whose probe an output bias can answer) and on `persona_hard` "
             "(Latin-square attributes: no constant output bias answers `oocr`; the name probe, "
             "which one can, is `oocr_name`). " + TABLE_NOTE)
    return Section("\n\n".join([intro, *texts]), figures, data)


# -----------------------------------------------------------------------------
# Part 2: A -> B, B -> C => A -> C (the compose world)


# the runs of experiments/compose_runs.sh, with its names, so its tables and figure read ours
COMPOSE_RUNS = {
    "embed": "--adapter steer --positions codename --hook hook_resid_pre --layer 0 --lr 1e-1",
    "embed-opp": "--adapter steer --positions codename --hook hook_resid_pre --layer 0 --lr 1e-1 "
                 "--opposite",
    "full": "--adapter full",
    "full-opp": "--adapter full --opposite",
    "lora": "--adapter lora",
    "lora-opp": "--adapter lora --opposite",
    "steerL0": "--adapter steer --positions codename --layer 0 --lr 1e-1",
    "steerL1": "--adapter steer --positions codename --layer 1 --lr 1e-1",
    "steerL2": "--adapter steer --positions codename --layer 2 --lr 1e-1",
    "steerL2-opp": "--adapter steer --positions codename --layer 2 --lr 1e-1 --opposite",
    "steerL3": "--adapter steer --positions codename --layer 3 --lr 1e-1",
    "steerall": "--adapter steer --positions all --layer 2 --lr 1e-1",
    "lora0": "--adapter lora --layer 0",
    "lora1": "--adapter lora --layer 1",
    "lora2": "--adapter lora --layer 2",
    "lora3": "--adapter lora --layer 3",
    "lora-lr1e-2": "--adapter lora --lr 1e-2",
    "lora-lr1e-2-opp": "--adapter lora --lr 1e-2 --opposite",
    "steerL1-1000": "--adapter steer --positions codename --layer 1 --lr 1e-1 --steps 1000",
    "steerL2-1000": "--adapter steer --positions codename --layer 2 --lr 1e-1 --steps 1000",
}
COMPOSE_EVALS = ("in_distribution", "oocr", "oocr_in_context", "reversal", "heldout_two_hop")
EXPERIMENTS = os.path.join(HERE, "experiments")


def flag_run(out, argv):
    """One train.py run from its command-line flags -> its metrics; read back if it finished,
    resumed if it stopped."""
    metrics_path = os.path.join(out, "metrics.json")
    if os.path.exists(metrics_path):
        return read_json(metrics_path)
    cfg = train.parse_args([*argv, "--out", out])
    checkpoint = os.path.join(cfg.out, "checkpoint.safetensors")
    return train.run(replace(cfg, resume=os.path.exists(checkpoint)))


def compose_dir(root, seed, name):
    return os.path.join(root, f"compose-s{seed}-{name}")


def compose_run(root, seed, name):
    """One compose run's metrics; read back if it finished before."""
    argv = ["--task", "compose", "--seed", str(seed), "--threads", "1",
            *COMPOSE_RUNS[name].split()]
    return flag_run(compose_dir(root, seed, name), argv)


def run_script(script, *args):
    """An experiments/ script in its own process, one thread (they parse sys.argv)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, os.path.join(EXPERIMENTS, script), *map(str, args)]
    subprocess.run(command, check=True, env=env, cwd=HERE)
    return f"python experiments/{script} " + " ".join(map(str, args))


def compose_mechanism(root, seeds):
    """experiments/compose_mechanism.py on each seed's embedding run (seconds: rerun every
    time) -> (records, the last command)."""
    records, command = [], ""
    for seed in seeds:
        run = compose_dir(root, seed, "embed")
        command = run_script("compose_mechanism.py", run)
        records.append(read_json(os.path.join(run, "analysis", "compose_mechanism.json")))
    return records, command


def mechanism_markdown(records, command):
    """The interventions that test the route, per seed: the untrained alias and the residual
    transplant per layer."""
    rows = records[0]["rows"]
    transplant = {row: [r["new_residual_into_person"].get(row) for r in records] for row in rows}
    alias = [r["alias_embedding"]["resident_mean"]["oocr"] for r in records]
    lines = [f"Mechanism (`{command}`, per seed): the new persons' embeddings set, with no "
             f"training, to the mean of their place's residents give oocr {cell(alias)}. The "
             "new person's residual at the subject position written into a pretraining "
             "person's prompt (`BOS P Rk`) makes it answer the new person's value:", "",
             "| layer | share answering the new person's value |", "|---|---|"]
    lines += [f"| {row} | {cell(v)} |" for row, v in transplant.items()
              if None not in v]
    return "\n".join(lines)


def composition_part(ctx):
    part_dir = ctx.part_dir("composition")
    scale = ctx.scale
    names = list(scale.compose_runs or COMPOSE_RUNS)
    plan_runs = [(s, n) for n in names for s in scale.seeds]
    runs = {n: [] for n in names}
    ctx.tally([compose_dir(part_dir, s, n) for s, n in plan_runs])
    for seed, name in tqdm(plan_runs, desc="composition", dynamic_ncols=True):
        runs[name].append(compose_run(part_dir, seed, name))
    groups = {f"`{n}`: `{COMPOSE_RUNS[n]}`": runs[n] for n in names}
    records, command = compose_mechanism(part_dir, scale.seeds)
    figure = os.path.join(part_dir, "composition.png")
    figure_command = run_script("compose_figure.py", "--seeds", ",".join(map(str, scale.seeds)),
                                "--root", part_dir, "--out", figure)
    curves = copy_as(os.path.join(compose_dir(part_dir, scale.seeds[0], "embed"), "curves.png"),
                     os.path.join(part_dir, "composition_embed_curves.png"))
    example = "--task compose --seed SEED --threads 1 --out DIR"
    text = "\n".join([
        "The compose world (docs/composition.md): fine-tuning on 16 new persons' `N LIVES B` "
        "facts only; the probe `N Rk → C` is in no training data (chance 1/16); the opposite "
        "control moves each new person to another's place. " + TABLE_NOTE, "",
        f"Each run: `python train.py {example}` plus the row's flags, seeds "
        f"{','.join(map(str, scale.seeds))} (the runs of `sh experiments/compose_runs.sh SEED`, "
        "with its names).", "",
        group_table(groups, COMPOSE_EVALS, "oocr"), "",
        mechanism_markdown(records, command), "",
        f"`{figure_command}`:", "", figure_link(figure, "composition: patching and per-block "
                                                "vectors"), "",
        f"Training curve of the embedding adapter (seed {scale.seeds[0]}):", "",
        figure_link(curves, "composition: training curve")])
    data = {"runs": {n: summarise_kind(runs[n]) for n in names},
            "alias_oocr": mean_sd([r["alias_embedding"]["resident_mean"]["oocr"]
                                   for r in records])}
    return Section(text, [figure, curves], data)


# -----------------------------------------------------------------------------
# Part 3: real checkpoints. Each text task's in-context capability check first (a base model
# that cannot infer the latent from observations in its prompt cannot show OOCR either), then
# on every probe that passes it a trained steering vector beside its opposite control and
# random vectors of its norm; a task that fails is reported with its numbers


# the block the README's risky runs steered (SmolLM2: 12 of 30; Gemma-3-270M: 9 of 18); a
# checkpoint given with --model gets train.py's default, the middle block
REAL_LAYERS = {"smollm2-135m": 12, "gemma3-270m": 9}
REAL_DTYPE = "bfloat16"  # autocast in training; train.py scores every eval in fp32 regardless
PASS_SES = 2  # a check passes above chance by more than 2 binomial standard errors
REAL_KINDS = ("steer", "control")  # the trained vector, and the one trained on --opposite


def real_models(ctx):
    """The checkpoints this part runs: --model alone where given, else the scale's."""
    return (ctx.model,) if ctx.model else ctx.scale.real_models


def model_slug(model):
    """A directory name for a checkpoint name or path ('path/to/gemma-3-12b-it/' -> its name)."""
    return os.path.basename(os.path.normpath(model)) or "model"


def checked_tasks():
    """The text tasks with in-context checks: TextTask gives every probe one (arithmetic's
    exact-match sets have none)."""
    return [name for name, cls in tasks.TEXT_TASKS.items() if issubclass(cls, tasks.TextTask)]


def supports_opposite(task):
    """Whether the task has an opposite control (every TextTask does; arithmetic refuses)."""
    try:
        train.get_task(task, opposite=True)
    except (TypeError, ValueError):
        return False
    return True


def real_flags(model, task, kind, seed):
    """train.py's flags for one run: the README's settings (100 steps, lr 1e-1, bf16)."""
    flags = ["--adapter", "steer", "--model", model, "--task", task, "--dtype", REAL_DTYPE,
             "--seed", str(seed)]
    if model in REAL_LAYERS:
        flags += ["--layers", str(REAL_LAYERS[model])]
    else:  # a large checkpoint (e.g. gemma-3-12b-it on a GPU): its frozen weights in bf16 fit
        flags += ["--base-dtype", REAL_DTYPE]
    return flags + (["--opposite"] if kind == "control" else [])


def shown_flags(model, task, kind):
    return " ".join(real_flags(model, task, kind, "SEED"))


def in_context_sets(eval_sets):
    return {k: v for k, v in eval_sets.items() if k.endswith("_in_context")}


def run_tokens(eval_sets, examples):
    """Tokens one run reads, to pick the cheapest task for --quick: its training examples (mean
    length) and the sets its shortcuts score again and again (all but the in-context ones)."""
    claims = train.claim_sets(eval_sets)
    scored = sum(len(item.prompt) + sum(map(len, item.options))
                 for s in claims.values() for item in s.items)
    per_example = statistics.fmean(len(e.prompt) + len(e.answer) for e in examples)
    return {"train_example": per_example, "claim_sets": scored}


def run_cost(check):
    """A run's tokens, roughly: 100 steps × 16 examples × 3 (the backward pass) and its claim
    sets scored 25 times (base, final, two data shortcuts, the direct path, 20 random draws)."""
    tokens = check["tokens"]
    return 100 * 16 * 3 * tokens["train_example"] + 25 * tokens["claim_sets"]


def check_config(model, task, seed, kind="steer"):
    """train.py's settings of a run on `task`: the check loads and scores as that run would."""
    return train.with_defaults(train.parse_args(real_flags(model, task, kind, seed)))


@functools.lru_cache(maxsize=1)  # one checkpoint for all its tasks' checks; cleared after them
def base_checkpoint(model):
    """(base model, tokenizer), loaded once for every task's check."""
    cfg = check_config(model, checked_tasks()[0], 0)  # the load depends on the model alone
    return train.base_model(cfg, train.make_task(cfg), train.resolve_device(cfg.device))


def capability_check(model, task, seed, kind, path):
    """The base model's accuracy on each of the task's in-context checks (the task's data of
    `seed`, its default items; kind "control": the opposite latent's data and right answers),
    written to `path`; read back if it exists."""
    if os.path.exists(path):
        return read_json(path)
    started = time.time()
    base, tokenizer = base_checkpoint(model)
    cfg = check_config(model, task, seed, kind)
    task_ = train.make_task(cfg)
    eval_sets = task_.eval_sets(tokenizer)
    checks = in_context_sets(eval_sets)
    record = {"model": model, "task": task, "seed": seed, "kind": kind,
              "accuracy": train.run_evals(cfg, base, checks),
              "chance": tasks.score_chance(checks),
              "items": {name: len(s.items) for name, s in checks.items()},
              "tokens": run_tokens(eval_sets, task_.train_examples(tokenizer)),
              "seconds": round(time.time() - started, 1)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, record)
    return record


def pooled_check(records):
    """One task's checks on several task seeds as one: accuracies (and chances) weighted by
    items, items summed (the seeds' data differ, so their items are new questions)."""
    first = records[0]
    items = {name: sum(r["items"][name] for r in records) for name in first["items"]}

    def pooled(field, key):
        """A seed without "x.per_token" had options of one length: its per-token score is the
        summed one, scored on the items of "x"."""
        name = key.split(".")[0]
        return sum(r[field].get(key, r[field][name]) * r["items"][name]
                   for r in records) / items[name]

    def keys(field):
        return sorted({key for r in records for key in r[field]})

    return {"tokens": first["tokens"], "items": items,  # one seed's tokens: a cost estimate
            "accuracy": {key: pooled("accuracy", key) for key in keys("accuracy")},
            "chance": {key: pooled("chance", key) for key in keys("chance")},
            "seconds": round(sum(r["seconds"] for r in records), 1)}


def task_kinds(task):
    """The vector, and its control where the task has one (every TextTask does)."""
    return [k for k in REAL_KINDS if k == "steer" or supports_opposite(task)]


def check_path(check_dir, task, seed, kind):
    side = "-opposite" if kind == "control" else ""
    return os.path.join(check_dir, f"{task}{side}-s{seed}.json")


def task_check(check_dir, model, task, seeds):
    """The check on both latents (the target's data and the opposite's, each with its own right
    answers), on every seed the runs train on, pooled. Both latents, because a model answering
    from a prior ("Yes" to "do you have a backdoor?") is right on one and wrong on the other:
    only reading the context passes. 3 seeds x 2 latents x 40 items: pass line 0.565 at 0.5."""
    sides = {kind: pooled_check([capability_check(model, task, seed, kind,
                                                  check_path(check_dir, task, seed, kind))
                                 for seed in seeds])
             for kind in task_kinds(task)}
    check = pooled_check(list(sides.values()))
    return {**check, "sides": {kind: side["accuracy"] for kind, side in sides.items()}}


def pass_line(chance, n):
    """The accuracy a check must beat: chance plus PASS_SES binomial standard errors at chance
    (with 240 items: 0.565 at chance 0.5, 0.252 at 0.2)."""
    return chance + PASS_SES * math.sqrt(chance * (1 - chance) / n)


def probe_checks(check):
    """{probe: {accuracy, chance, items, above, passes}} of one task's check (the summed
    log-prob score; the per-token one is shown, not judged)."""
    probes = {}
    for name, n in check["items"].items():
        chance, accuracy = check["chance"][name], check["accuracy"][name]
        above = pass_line(chance, n)
        probes[name.removesuffix("_in_context")] = {
            "accuracy": accuracy, "chance": chance, "items": n, "above": above,
            "passes": accuracy > above,
            "per_token": check["accuracy"].get(f"{name}.per_token"),
            "sides": {kind: side[name] for kind, side in check.get("sides", {}).items()}}
    return probes


def passed_probes(check):
    return [probe for probe, c in probe_checks(check).items() if c["passes"]]


def trained_tasks(checks, limit):
    """The tasks with a passing probe, cheapest first, at most `limit` (None: all)."""
    passing = sorted((t for t, c in checks.items() if passed_probes(c)),
                     key=lambda t: run_cost(checks[t]))
    return passing if limit is None else passing[:limit]


def check_table(checks):
    """One row per probe: the base model's in-context accuracy against chance and the pass
    line; tasks without a check listed as such."""
    lines = ["| task | probe | items | chance | base, in context (per token) | target's / "
             "opposite's data | passes above | passes |", "|---|---|---|---|---|---|---|---|"]
    for task, check in checks.items():
        for probe, c in probe_checks(check).items():
            per_token = "" if c["per_token"] is None else f" ({c['per_token']:.3f})"
            sides = " / ".join(f"{x:.3f}" for x in c["sides"].values()) or "-"
            lines.append(f"| {task} | {probe} | {c['items']} | {c['chance']:.3f} | "
                         f"{c['accuracy']:.3f}{per_token} | {sides} | {c['above']:.3f} | "
                         f"{'yes' if c['passes'] else '**no**'} |")
    for task in tasks.TEXT_TASKS:
        if task not in checks:
            lines.append(f"| {task} | - | - | - | - | - | - | no in-context check (no latent "
                         "to infer) |")
    return "\n".join(lines)


def real_run_dir(model_dir, task, kind, seed):
    return os.path.join(model_dir, f"{task}-{kind}-s{seed}")


def real_run(model_dir, model, task, kind, seed):
    """One steering run's metrics (trained, resumed or read back)."""
    return flag_run(real_run_dir(model_dir, task, kind, seed),
                    real_flags(model, task, kind, seed))


def task_runs(ctx, model_dir, model, task):
    """{kind: [metrics per seed]}: the vector, and its control where the task has one."""
    kinds = task_kinds(task)
    plan_runs = [(k, s) for k in kinds for s in ctx.scale.seeds]
    ctx.tally([real_run_dir(model_dir, task, k, s) for k, s in plan_runs])
    runs = {k: [] for k in kinds}
    for kind, seed in tqdm(plan_runs, desc=f"{model_slug(model)} {task}", dynamic_ncols=True):
        runs[kind].append(real_run(model_dir, model, task, kind, seed))
    return runs


def control_margins(runs, key):
    """Per seed, the vector's accuracy on `key` minus its control's (same seed, same eval
    sets: the control is scored on the target's)."""
    return [s["eval"]["final"][key] - c["eval"]["final"][key]
            for s, c in zip(runs["steer"], runs.get("control", []))]


def probe_summary(runs, key):
    """The numbers later parts read of one kind of run on one probe."""
    margins = [run_margin(m, key) for m in runs]
    known = [m for m in margins if m is not None]
    return {"n": len(runs), "base": statistics.fmean(m["eval"]["base"][key] for m in runs),
            "final": mean_sd([m["eval"]["final"][key] for m in runs]),
            "margin": mean_sd(known) if known else None, "verdict": verdict(margins)}


def control_line(runs, probe):
    margins = control_margins(runs, probe)
    if not margins:
        return "No opposite control: the task has none.", None
    text = (f"Against its control on `{probe}` (vector minus control, per seed): {cell(margins)}; "
            f"the vector beats its control: {verdict(margins)} (same rule as the shortcuts).")
    return text, {"margin": mean_sd(margins), "verdict": verdict(margins)}


def probe_section(model, task, probe, runs, seeds):
    """One passing probe: the command, the table against the shortcuts, the control line."""
    labels = {"steer": "steer", "control": "control (`--opposite`)"}
    groups = {labels[kind]: metrics for kind, metrics in runs.items()}
    control_text, control = control_line(runs, probe)
    text = "\n".join([
        f"#### `{task}`: `{probe}` (passes its in-context check)", "",
        f"`python train.py {shown_flags(model, task, 'steer')}` (and with `--opposite`), seeds "
        f"{','.join(map(str, seeds))} ({run_count(runs)})", "",
        group_table(groups, ("in_distribution", probe), probe), "", control_text])
    data = {kind: probe_summary(metrics, probe) for kind, metrics in runs.items()}
    return text, {**data, "against_control": control}


def untrained_line(checks, trained, limit):
    """The tasks not trained, and why: a failed check (their numbers are in part 3a) or the
    scale's limit on tasks."""
    failed = [t for t, c in checks.items() if not passed_probes(c)]
    skipped = [t for t, c in checks.items() if passed_probes(c) and t not in trained]
    lines = []
    if failed:
        lines.append(f"Not trained, failing every in-context check (part 3a): "
                     f"{', '.join(failed)} (on these, OOCR cannot be measured with this model: a "
                     "null result).")
    if skipped:
        lines.append(f"Passing but not trained at this scale (the {limit} cheapest only): "
                     f"{', '.join(skipped)}.")
    return " ".join(lines)


def training_seconds(all_runs):
    return sum(m["seconds"] for runs in all_runs.values()
               for metrics in runs.values() for m in metrics)


def probe_sections(model, checks, all_runs, seeds):
    """Every passing probe of every trained task -> ([markdown], {task: {probe: numbers}})."""
    texts, data = [], {}
    for task, runs in all_runs.items():
        data[task] = {}
        for probe in passed_probes(checks[task]):
            text, data[task][probe] = probe_section(model, task, probe, runs, seeds)
            texts.append(text)
    return texts, data


NOT_AT_THIS_SCALE = ("Not run at this scale: every real checkpoint's part takes CPU hours (the "
                     "full study, or `--model PATH`, runs it).")


def model_checks(ctx, model):
    """{task: its check pooled over the scale's seeds and both latents}, run or read back."""
    check_dir = os.path.join(ctx.part_dir("real_checks"), model_slug(model), "check")
    checks = {t: task_check(check_dir, model, t, ctx.scale.seeds)
              for t in tqdm(checked_tasks(), desc=f"{model_slug(model)} check")}
    base_checkpoint.cache_clear()  # the runs load their own: a 12B base held twice would not fit
    return checks


def models_line(models):
    left_out = [m for m in REAL_LAYERS if m not in models]
    shown = ", ".join(f"`{m}`" for m in models)
    not_run = "".join(f" Not run: `{m}` (the full study without --model runs it)."
                      for m in left_out)
    return f"Models: {shown}.{not_run}"


def real_checks_part(ctx):
    """Part 3a: every text task's in-context capability check on every real checkpoint."""
    models = real_models(ctx)
    if not models:
        return Section(NOT_AT_THIS_SCALE)
    seeds = ",".join(map(str, ctx.scale.seeds))
    texts, data = [], {}
    for model in models:
        checks = model_checks(ctx, model)
        data[model] = {t: probe_checks(c) for t, c in checks.items()}
        seconds = sum(c["seconds"] for c in checks.values())
        ctx.check_seconds += seconds
        texts.append(f"### `{model}` (the checks recorded {seconds:.0f} s)\n\n"
                     + check_table(checks))
    intro = (f"{models_line(models)} `reproduce.capability_check`: the base model's accuracy "
             "on each probe's `_in_context` set (the probe after observations of the latent, as "
             f"training shows them), task seeds {seeds} (the runs' seeds), each on the "
             "target latent's data and on the opposite latent's, with their own right answers, "
             "pooled; a model that answers the probe from a prior is right on one and wrong on "
             f"the other. A probe passes above chance by more than {PASS_SES} binomial standard "
             "errors; part 3b trains only on probes that pass.")
    return Section("\n\n".join([intro, *texts]), [], data)


def model_head(model, all_runs, seconds):
    """The model's settings and its wall time."""
    layer = REAL_LAYERS.get(model)
    block = f"block {layer}" if layer is not None else "the middle block (train.py's default)"
    return "\n".join([
        f"### `{model}`", "",
        f"Steering vector at {block}, `hook_mlp_out`, `--dtype {REAL_DTYPE}`, train.py's "
        f"defaults otherwise (100 steps of 16 examples, lr 1e-1, 20 random draws). Wall time "
        f"of this model's runs in this command: {seconds:.0f} s (reused runs cost nothing "
        f"here: their training and evals recorded {training_seconds(all_runs):.0f} s without "
        "their shortcut baselines)."])


def real_model_section(ctx, model, checks):
    """One checkpoint's passing probes trained: the tables."""
    model_dir = os.path.join(ctx.part_dir("real_checkpoints"), model_slug(model))
    started = time.time()
    limit = ctx.scale.real_task_limit
    trained = trained_tasks(checks, limit)
    all_runs = {t: task_runs(ctx, model_dir, model, t) for t in trained}
    texts, per_probe = probe_sections(model, checks, all_runs, ctx.scale.seeds)
    seconds = round(time.time() - started, 1)
    data = {"trained": per_probe, "seconds": seconds}
    head = model_head(model, all_runs, seconds)
    parts = [head, untrained_line(checks, trained, limit), *texts]
    return "\n\n".join(p for p in parts if p), data


def real_checkpoints_part(ctx):
    """Part 3b: a steering vector and its control on every probe that passes part 3a's check."""
    models = real_models(ctx)
    if not models:
        return Section(NOT_AT_THIS_SCALE)
    checks = {model: model_checks(ctx, model) for model in models}  # part 3a's, read back
    texts, data = [], {}
    for model in models:
        text, data[model] = real_model_section(ctx, model, checks[model])
        texts.append(text)
    intro = (f"{models_line(models)} Not run: LoRA and full fine-tunes on the real "
             "checkpoints. On each probe that passes its in-context check (part 3a), a trained "
             "steering vector beside its opposite control (trained on the opposite latent, "
             "scored on the target's eval sets) and random vectors of its norm. " + TABLE_NOTE
             + " Here the runs are the task's seeds (its data and the vector's init).")
    return Section("\n\n".join([intro, *texts]), [], data)


# -----------------------------------------------------------------------------
# Part 4: RL-trained vectors (Sinii et al. 2025): a vector trained by reward alone on the toy
# persona world (does it reach the out-of-context probe, as the sft vector does?), the paper's
# readouts, and the real-checkpoint table on SmolLM2's arithmetic task (full scale only).

RL_TOY = "--task persona --threads 1"
RL_HARD = "--task persona_hard --threads 1"  # no output bias answers its oocr probe
RL_TOY_RUNS = {  # name -> train.py flags; block 1 as in the README's RL table
    "sft": "--adapter steer --layers 1",
    "rl": "--adapter steer --layers 1 --objective rl",
    "rl-opposite": "--adapter steer --layers 1 --objective rl --opposite",
}
RL_TOY_ALONE = {  # seed 0 only: every block at once, and each block alone (to combine)
    "rl-all": "--adapter steer --layers all --objective rl --steps 100",
    **{f"rl-L{b}": f"--adapter steer --layers {b} --objective rl" for b in range(4)},
}
RL_REAL = ("--model smollm2-135m --task arithmetic --dtype bfloat16 --steps 30 --batch-size 4 "
           "--random-draws 2 --threads 1")
RL_REAL_RUNS = {  # name -> (flags, seeds: 3 where a run takes under ~10 min on 2 CPU cores)
    "rl-steer": ("--adapter steer --objective rl --layers all", (0, 1, 2)),
    "sft-steer": ("--adapter steer --layers all --steps 100 --lr 1e-1", (0, 1, 2)),
    "rl-lora": ("--adapter lora --objective rl", (0,)),
    "rl-full": ("--adapter full --objective rl --lr 1e-5", (0,)),
    "rl-adaptive": ("--adapter steer --objective rl --layers all --positions adaptive", (0,)),
}
RL_EVALS = ("in_distribution", "oocr")


def rl_runs(ctx, root, plan_runs, common):
    """[(name, flags, seed)] -> {name: [metrics per seed]}, run or reused, with a bar."""
    dirs = [os.path.join(root, f"{name}-s{seed}") for name, _, seed in plan_runs]
    ctx.tally(dirs)
    runs = {}
    for (name, flags, seed), out in zip(tqdm(plan_runs, desc="rl", dynamic_ncols=True), dirs):
        argv = [*common.split(), *flags.split(), "--seed", str(seed)]
        runs.setdefault(name, []).append(flag_run(out, argv))
    return runs


def reward_cell(runs):
    """Mean sampled reward over the first and the last 5 rl steps, mean over seeds."""
    histories = [m["history"].get("rl") for m in runs]
    if not all(histories):
        return "-"
    first = statistics.fmean(statistics.fmean(s["reward"] for _, s in h[:5]) for h in histories)
    last = statistics.fmean(statistics.fmean(s["reward"] for _, s in h[-5:]) for h in histories)
    return f"{first:.2f} → {last:.2f}"


def rl_table(runs, flags, common):
    """group_table, plus the sampled reward and the seconds per run."""
    groups = {f"`{name}`: `{flags[name]}`": runs[name] for name in runs}
    rows = group_table(groups, RL_EVALS, "oocr").split("\n")
    header = rows[0] + " rl reward, first → last 5 steps | seconds per run |"
    lines = [header, rows[1] + "---|---|"]
    for row, name in zip(rows[2:], runs):
        seconds = statistics.fmean(m["seconds"] for m in runs[name])
        lines.append(f"{row} {reward_cell(runs[name])} | {seconds:.0f} |")
    return f"Each run: `python train.py {common}` plus the row's flags.\n\n" + "\n".join(lines)


def first_token_share(profile):
    """The share of a continuation's summed KL that falls on its first generated token."""
    kl = [v for v in profile["kl"] if v is not None]
    return kl[0] / sum(kl) if sum(kl) > 0 else float("nan")


def lens_markdown(record, command):
    """vector_lens in words: where the effect falls and what the last two layers' vectors
    boost and suppress through the final norm and the unembedding."""
    whole = record["kl"]["all"]
    lines = [f"`{command}`: KL(steered ‖ base) along a greedy steered continuation of "
             f"{record['n_prompts']} prompts: {first_token_share(whole):.0%} at the first "
             "generated token (all layers together)."]
    for layer in record["layers"][-2:]:
        lens = record["readout"][str(layer)]["final_norm"]
        alone = first_token_share(record["kl"][str(layer)])
        boosted = ", ".join(f"`{t}`" for t, _ in lens["boosted"][:6])
        suppressed = ", ".join(f"`{t}`" for t, _ in lens["suppressed"][:6])
        relative = record["readout"][str(layer)]["relative_norm"]
        lines.append(f"- block {layer} (|v| = {relative:.4f} × the residual's norm): boosts "
                     f"{boosted}; suppresses {suppressed}; alone, "
                     f"{sum(record['kl'][str(layer)]['kl'][:1]):.4f} nats at the first token "
                     f"({alone:.0%} of its continuation's KL)")
    return "\n".join(lines)


def combine_markdown(record, command):
    accuracy = record["accuracy"]
    alone = [name for name in accuracy if name not in ("base", "combined", "sum_of_effects")]
    cells = "; ".join(f"{os.path.basename(name)} {accuracy[name]['in_distribution']:.3f} / "
                      f"{accuracy[name]['oocr']:.3f}" for name in alone)
    return (f"`{command}`: in_distribution / oocr of each single-block rl vector alone: {cells}; "
            f"all four together {accuracy['combined']['in_distribution']:.3f} / "
            f"{accuracy['combined']['oocr']:.3f} (base {accuracy['base']['in_distribution']:.3f}"
            f" / {accuracy['base']['oocr']:.3f}).")


def adaptive_markdown(record, command):
    high = ", ".join(f"`{t}` {v:.2f}" for t, v in record["highest_tokens"][:6])
    low = ", ".join(f"`{t}` {v:.2f}" for t, v in record["lowest_tokens"][:6])
    generated = record["generated"]["mean"]
    on_generated = f"; on generated tokens {generated:.2f}" if generated is not None else ""
    return (f"`{command}`: the learned scale 2σ(w·r + b) over {record['n_prompts']} prompts and "
            f"their steered continuations: mean {record['prompt']['mean']:.2f} (sd "
            f"{record['prompt']['std']:.2f}) on prompt tokens{on_generated}; highest on {high}; "
            f"lowest on {low}.")


def rl_hard_section(ctx, part_dir):
    """sft vs rl vs rl-opposite on persona_hard, whose probe no shortcut answers."""
    plan_runs = [(n, f, s) for n, f in RL_TOY_RUNS.items() for s in ctx.scale.seeds]
    runs = rl_runs(ctx, os.path.join(part_dir, "toy_persona_hard"), plan_runs, RL_HARD)
    text = "\n\n".join([
        "### The persona_hard world: reward alone", "As above on `persona_hard` (part 1), "
        "whose probe `oocr` no constant output bias answers. Here the runs are world seeds, "
        "target 0.", rl_table(runs, RL_TOY_RUNS, RL_HARD)])
    return text, {name: summarise_kind(runs[name]) for name in RL_TOY_RUNS}


def rl_toy_section(ctx, part_dir):
    root = os.path.join(part_dir, "toy")
    plan_runs = [(n, f, s) for n, f in RL_TOY_RUNS.items() for s in ctx.scale.seeds]
    plan_runs += [(n, f, 0) for n, f in RL_TOY_ALONE.items()]
    runs = rl_runs(ctx, root, plan_runs, RL_TOY)
    flags = {**RL_TOY_RUNS, **RL_TOY_ALONE}
    table = rl_table({n: runs[n] for n in RL_TOY_RUNS}, flags, RL_TOY)
    analysis = os.path.join(part_dir, "toy_analysis")
    lens, lens_command = run_analysis("vector_lens", os.path.join(root, "rl-all-s0"), analysis)
    singles = [os.path.join(root, f"rl-L{b}-s0") for b in range(4)]
    combined, combine_command = run_analysis("combine", singles[0], analysis, "--runs",
                                             ",".join(singles[1:]))
    figure = copy_as(os.path.join(analysis, "vector_lens.png"),
                     os.path.join(part_dir, "rl_toy_vector_lens.png"))
    text = "\n\n".join([
        "### The persona world: reward alone", "The reward is 1 when the first sampled token "
        "is the target persona's option (`--opposite`: the other one); the answers are never "
        "shown. " + TABLE_NOTE + " Here the runs are world seeds, target 0.", table,
        f"Every block at once (seed 0, 100 steps): {lens_markdown(lens, lens_command)}",
        figure_link(figure, "toy rl vector through the unembedding, and its KL per position"),
        combine_markdown(combined, combine_command)])
    data = {name: summarise_kind(runs[name]) for name in RL_TOY_RUNS}
    return text, [figure], data


def rl_real_section(ctx, part_dir):
    root = os.path.join(part_dir, "smollm2")
    plan_runs = [(n, f, s) for n, (f, seeds) in RL_REAL_RUNS.items() for s in seeds]
    runs = rl_runs(ctx, root, plan_runs, RL_REAL)
    flags = {name: f for name, (f, _) in RL_REAL_RUNS.items()}
    table = rl_table(runs, flags, RL_REAL)
    analysis = os.path.join(part_dir, "smollm2_analysis")
    lens, lens_command = run_analysis("vector_lens", os.path.join(root, "rl-steer-s0"), analysis,
                                      "--prompts", "16")
    adaptive, adaptive_command = run_analysis("adaptive_scale",
                                              os.path.join(root, "rl-adaptive-s0"), analysis,
                                              "--prompts", "8")
    figures = [copy_as(os.path.join(analysis, f"{name}.png"),
                       os.path.join(part_dir, f"rl_smollm2_{name}.png"))
               for name in ("vector_lens", "adaptive_scale")]
    text = "\n\n".join([
        "### SmolLM2-135M-Instruct: one-digit sums", "Reward 1 when the completion's last "
        "integer is the sum; `in_distribution` = 20 held-out sums asked as in training, `oocr` "
        "= 20 more asked in other words (a transfer check: no latent to infer), both scored by "
        "the same reward on the greedy completion. " + TABLE_NOTE + " Here `rand95` is over 2 "
        "random vectors (each costs two generation-based evals).", table,
        lens_markdown(lens, lens_command),
        figure_link(figures[0], "SmolLM2 rl vector per layer through the unembedding"),
        adaptive_markdown(adaptive, adaptive_command),
        figure_link(figures[1], "SmolLM2 adaptive rl vector: its scale per token and layer")])
    return text, figures, {name: summarise_kind(runs[name]) for name in runs}


def rl_part(ctx):
    part_dir = ctx.part_dir("rl")
    text, figures, data = rl_toy_section(ctx, part_dir)
    hard_text, data["persona_hard"] = rl_hard_section(ctx, part_dir)
    texts = [text, hard_text]
    if ctx.scale.rl_real:
        real_text, real_figures, data["smollm2"] = rl_real_section(ctx, part_dir)
        texts.append(real_text)
        figures += real_figures
    else:
        texts.append("Not run at this scale: the SmolLM2 table (~2 CPU hours; the full study "
                     "runs it).")
    return Section("\n\n".join(texts), figures, data)


# -----------------------------------------------------------------------------
# Part 5: reading the vectors (the refusal-steering study's methods), on the toy runs


def effect_kept(table, keep, key):
    """Share of the full vector's accuracy gain (over 0% kept = the base) that `keep`% of its
    dimensions keep; None where the full vector gains nothing."""
    full, none = table["100"][key], table["0"][key]
    if abs(full - none) < 1e-9:
        return None
    return (table[keep][key] - none) / (full - none)


READ_KEYS = ("in_distribution", "oocr")  # the trained behaviour and the probe
SPARSE_KEEPS = ("10", "1")  # % of dimensions kept: 90% and 99% sparsity


def reading_numbers(record):
    """The numbers of a read_vector record that the section and paper_numbers use."""
    layer = next(iter(record["readout"]))
    readout = record["readout"][layer]
    frozen = record["frozen_attention"]
    return {
        "hook": readout["hook"], "relative_norm": readout["relative_norm"],
        "boosted": [label for label, _ in readout["final_norm"]["boosted"][:5]],
        "suppressed": [label for label, _ in readout["final_norm"]["suppressed"][:5]],
        "sweep": {c: {k: scores[k] for k in READ_KEYS}
                  for c, scores in record["strength_sweep"].items()},
        "kept": {ranking: {key: {keep: effect_kept(table, keep, key) for keep in SPARSE_KEEPS}
                           for key in READ_KEYS}
                 for ranking, table in record["sparsification"].items()},
        "frozen_share": {name: runs["share"]["metric"] for name, runs in frozen.items()},
    }


def kept_text(kept):
    """{key: {keep: share}} -> 'in_distribution 0.90 / 0.40, oocr - / -' (10% / 1% kept)."""
    return ", ".join(f"{key} " + " / ".join(fmt(share, 2) for share in by_keep.values())
                     for key, by_keep in kept.items())


def reading_markdown(task, n, metrics, command):
    base, final = metrics["eval"]["base"], metrics["eval"]["final"]
    sweep_cells = ", ".join(f"{c}: " + "/".join(f"{v[k]:.2f}" for k in READ_KEYS)
                            for c, v in n["sweep"].items())
    kept = "; ".join(f"by {ranking}: {kept_text(k)}" for ranking, k in n["kept"].items())
    frozen = ", ".join(f"{name} {share:.0%}" for name, share in n["frozen_share"].items())
    changes = ", ".join(f"{k} {base[k]:.3f} → {final[k]:.3f}" for k in READ_KEYS)
    return "\n".join([
        f"### `{task}` (seed 0, target 0; `{command}`)", "",
        f"- vector at `{n['hook']}`: norm {n['relative_norm']:.2f} × the residual stream's; "
        f"base → steered: {changes}; shortcuts on oocr (bias / stats / direct / rand95): "
        f"{shortcut_cells([metrics], 'oocr')}",
        f"- through the final norm and the unembedding it boosts {', '.join(n['boosted'])} and "
        f"suppresses {', '.join(n['suppressed'])}",
        f"- strength sweep (coefficient: {'/'.join(READ_KEYS)} accuracy; 0 = base): "
        f"{sweep_cells}",
        f"- sparsified, share of the accuracy gain kept with 10% / 1% of the dimensions "
        f"(- = no gain to keep): {kept}",
        f"- attention frozen to the unsteered run's: share of the effect (mean log p of the "
        f"right option) kept: {frozen}"])


def steered_patching(run, analysis_dir):
    """analyze.py patching of the oocr probe's first item, the steered run's resid_pre patched
    into the unsteered run at each position alone and at all positions at once -> (record,
    command)."""
    n = len(analyze.load_run(run).eval_sets["oocr"].items[0].prompt)
    spans = [str(i) for i in range(n)] + [f"0-{n - 1}"]
    flags = ["--eval", "oocr", "--item", "0", "--contrast", "adapter", "--site", "resid_pre"]
    return run_analysis("patching", run, analysis_dir, *flags,
                        *[x for span in spans for x in ("--span", span)])


def patching_markdown(record, command):
    """Per layer: the share of the vector's effect on the metric that patching recovers, at all
    positions at once, at the last position and at the best single one."""
    clean, corrupt = record["clean_metric"], record["corrupt_metric"]
    grid = record["sites"]["resid_pre"]["metric"]  # (layers, positions + 1): the last is all

    def share(value):
        return (value - corrupt) / (clean - corrupt) if abs(clean - corrupt) > 1e-9 else None

    cells = "; ".join(f"layer {l}: {fmt(share(row[-1]), 2)} / {fmt(share(row[-2]), 2)} / "
                      f"{fmt(max(share(v) for v in row[:-1]), 2)}" if share(row[-1]) is not None
                      else f"layer {l}: -" for l, row in enumerate(grid))
    return (f"- multi-token patching (`{command}`; {record['metric']}: steered {clean:.3f}, "
            f"unsteered {corrupt:.3f}): share of the effect recovered by the steered resid_pre at "
            f"all positions / the last / the best single position: {cells}")


def trained_sae(out, task):
    """python sae.py on the world's seed-0 model (block 2's resid_post, TopK k 8, 256 features,
    2000 steps: ~80 s) -> its metrics; reused when done."""
    if not os.path.exists(os.path.join(out, "metrics.json")):
        sae.run(sae.RunConfig(task=task, threads=1, out=out))
    return read_json(os.path.join(out, "metrics.json"))


def sae_markdown(metrics, record, command):
    top = ", ".join(f"f{r['feature']} {r['cos']:+.2f} ({' '.join(r['tokens'][:3])})"
                    for r in record["decoder"][:3])
    fits = ", ".join(f"{n}: {f['unexplained']:.2f} (random {f['random_unexplained']:.2f})"
                     for n, f in record["sparse_fit"].items())
    return (f"- in SAE features (SAE at `{metrics['hook']}`, {metrics['activation']} k "
            f"{metrics['k']}, {metrics['width']} features: explained variance "
            f"{metrics['explained_variance']:.3f}, loss recovered {metrics['loss_recovered']:.3f};"
            f" `{command}`): most aligned decoder rows {top}; share of |v|² left unexplained by "
            f"its n most aligned features: {fits}")


def reading_vectors_part(ctx):
    part_dir = ctx.part_dir("reading_vectors")
    texts, figures, data = [], [], {}
    # the steering runs of part 1 (the same directories: made there, or here if part 1 is not run)
    source = os.path.join(ctx.out, "lora_vs_steering")
    for task in tqdm(PERSONA_WORLDS, desc="reading_vectors", dynamic_ncols=True):
        out = os.path.join(source, task)
        ctx.tally([sweep.run_dir(out, "steer", 0, 0)])
        metrics = sweep.run_once("steer", task, 0, 0, out)
        analysis_dir = os.path.join(part_dir, task)
        run = sweep.run_dir(out, "steer", 0, 0)
        record, command = run_analysis("read_vector", run, analysis_dir)
        data[task] = reading_numbers(record)
        texts.append(reading_markdown(task, data[task], metrics, command))
        texts.append(patching_markdown(*steered_patching(run, analysis_dir)))
        sae_dir = os.path.join(part_dir, f"sae-{task}")
        ctx.tally([sae_dir])
        texts.append(sae_markdown(trained_sae(sae_dir, task),
                                  *run_analysis("sae_features", run, analysis_dir, "--sae",
                                                sae_dir)))
        figures.append(copy_as(os.path.join(analysis_dir, "read_vector.png"),
                               os.path.join(part_dir, f"{task}_read_vector.png")))
        texts.append(figure_link(figures[-1], f"{task}: reading the vector"))
    intro = ("The trained steering vector of each persona world read with the refusal-steering "
             "study's methods (`analyze.py read_vector`), patched position by position and at "
             "every position at once from the steered run into the unsteered one (`analyze.py "
             "patching --contrast adapter`), and read in the features of an SAE trained on its "
             "world's model (`python sae.py`, then `analyze.py sae_features`).")
    return Section("\n\n".join([intro, *texts]), figures, data)


# -----------------------------------------------------------------------------
# Part 6: the seed papers' numbers beside ours, each with a verdict computed from ours


PAPER = "Wang, Engels et al. 2025 (Gemma-3-12B)"
REFUSAL = "the refusal-steering study"


@dataclass
class Claim:
    source: str
    claim: str
    paper: str
    ours: str
    verdict: str  # generated from our numbers: what agrees and what does not


def not_measured(part):
    return f"not measured here (part {part} is not run)"


PAPER_TASKS = (("Risky self-report", "risky", "0.40 → LoRA 0.70 / SV 0.80"),
               ("Functions", "functions", "0.20 → LoRA 0.92 / SV 0.90"),
               ("Locations", "locations", "0.20 → LoRA 0.68 / SV 0.28"),
               ("Backdoor self-report", "risky_backdoor", "not reproduced by a vector"))


def real_task_result(model, checks, trained, task):
    """One model's result on a paper task's probe (oocr): its check (part 3a), else its vector's
    numbers and verdicts (part 3b; trained None: not run) -> (ours, verdict)."""
    check = checks.get(task, {}).get("oocr")
    if check is None:
        return f"`{model}`: not checked", "-"
    if not check["passes"]:
        return (f"`{model}`: fails the in-context check ({check['accuracy']:.3f}, chance "
                f"{check['chance']:.3f}): not trained", "not measurable (a null)")
    if trained is None:
        return f"`{model}`: passes its check ({check['accuracy']:.3f}); part 3b not run", "-"
    steer = trained.get(task, {}).get("oocr", {}).get("steer")
    if steer is None:
        return f"`{model}`: passes its check, not trained at this scale", "-"
    against = trained[task]["oocr"].get("against_control")
    control = f", beats its control: {against['verdict']}" if against else ""
    mean, sd = steer["final"]
    return (f"`{model}`: SV {steer['base']:.3f} → {mean:.3f} ± {sd:.3f}",
            f"beats every shortcut: {steer['verdict']}{control}")


def real_task_claims(records):
    """The paper's task numbers (and its backdoor null) beside part 3's, per model checked."""
    checked = (records.get("real_checks") or {}).get("data") or {}
    runs = (records.get("real_checkpoints") or {}).get("data") or {}
    claims = []
    for label, task, paper in PAPER_TASKS:
        results = [real_task_result(model, checks, runs.get(model, {}).get("trained"), task)
                   for model, checks in checked.items()]
        ours = "; ".join(r[0] for r in results) or not_measured(3)
        judged = "; ".join(r[1] for r in results) or "-"
        claims.append(Claim(PAPER, f"{label} accuracy (`{task}`, probe `oocr`)", paper, ours,
                            judged))
    return claims


def toy_oocr_claim(world, runs):
    """The toy analogue of 'a LoRA and a steering vector both induce OOCR'."""
    def shown(kind):
        r = runs.get(kind)
        return "-" if r is None else f"{r['final']['oocr'][0]:.3f} ({r['verdict']})"

    some = next(iter(runs.values()))
    ours = (f"`{world}` oocr: base {some['base']['oocr']:.3f} → all-layer LoRA {shown('lora')}"
            f" / SV {shown('steer')} / full {shown('full')} (beats every shortcut?)")
    lora, steer = (runs.get(k, {}).get("verdict", "-") for k in ("lora", "steer"))
    verdict = (f"all-layer LoRA beats every shortcut: {lora}; steering vector: {steer}.")
    return Claim(PAPER, "a LoRA and a trained steering vector both induce OOCR",
                 "both raise the probe (numbers above)", ours, verdict)


def per_block(per_layer, show):
    """'block 0: ...; block 1: ...' with show(numbers) for each analysed block."""
    return "; ".join(f"block {layer}: {show(n)}" for layer, n in per_layer.items())


def group_values(n, stat):
    return ", ".join(f"{g} {v[stat]:.3f}" for g, v in n["groups"].items())


def lora_geometry_claims(world, per_layer):
    def every(stat, floor):
        return all(g[stat] >= floor for n in per_layer.values() for g in n["groups"].values())

    hook = next(iter(per_layer.values()))["hook"].split(".", 2)[-1]
    return [
        Claim(PAPER, "abs cos between a one-layer LoRA's token diffs ≈ 1", "≈ 1",
              f"`{world}`, {hook}: " + per_block(per_layer,
                                                 lambda n: group_values(n, "mean_abs_cos")),
              f"every block and group ≥ 0.9: {'yes' if every('mean_abs_cos', 0.9) else 'no'}."),
        Claim(PAPER, "PC1 share of the token diffs", "0.76-0.99",
              f"`{world}`: " + per_block(per_layer, lambda n: group_values(n, "pc1_share")),
              f"every block and group ≥ 0.76: {'yes' if every('pc1_share', 0.76) else 'no'}."),
    ]


def natural_share(acc, state="natural", chance=0.0):
    """Share of the LoRA's oocr gain that the natural vector (or its negation, state "-natural")
    keeps in the LoRA's place; None where the LoRA gains nothing. The gain is counted above the
    base or chance, whichever is higher: a base below chance that a LoRA lifts to chance has
    learned nothing."""
    floor = max(acc["base"]["oocr"], chance)
    lora, natural = acc["lora"]["oocr"], acc[state]["oocr"]
    return None if lora - floor <= 1e-9 else (natural - floor) / (lora - floor)


def natural_vector_claim(world, per_layer):
    """'The natural vector reproduces much of the OOCR': does it keep half the LoRA's gain?"""
    def shown(n):
        acc = n["accuracy"]
        share = natural_share(acc, chance=n.get("chance", 0.0))
        kept = "LoRA gains nothing above base and chance" if share is None else f"keeps {share:.0%}"
        return (f"base {acc['base']['oocr']:.3f}, LoRA {acc['lora']['oocr']:.3f}, natural "
                f"{acc['natural']['oocr']:.3f}, −natural {acc['-natural']['oocr']:.3f} ({kept})")

    shares = [natural_share(n["accuracy"], chance=n.get("chance", 0.0))
              for n in per_layer.values()]
    gained = [x for x in shares if x is not None]
    negated = [natural_share(n["accuracy"], "-natural", n.get("chance", 0.0))
               for n in per_layer.values()]
    negated = [x for x in negated if x is not None]
    verdict = (f"the LoRA raises oocr above base and chance at {len(gained)} of {len(shares)} "
               f"blocks; there the natural "
               f"vector keeps at least half of its gain at {sum(x >= 0.5 for x in gained)}, "
               f"its negation at {sum(x >= 0.5 for x in negated)}.")
    return Claim(PAPER, "the LoRA's natural vector in its place reproduces much of the OOCR",
                 "much of it", f"`{world}` oocr: " + per_block(per_layer, shown), verdict)


def refusal_claims(world, numbers):
    frozen = numbers["frozen_share"]
    costs = ", ".join(f"{name} {1 - share:.1%}" for name, share in frozen.items())
    kept = numbers["kept"]["magnitude"]
    shares = [x for by_keep in kept.values() for x in by_keep.values() if x is not None]
    keeps = "no gain to keep" if not shares else \
        f"keeps more than half at 90% and 99% sparsity: {'yes' if min(shares) > 0.5 else 'no'}"
    cheap = all(share > 0.8 for share in frozen.values())
    return [
        Claim(REFUSAL, "freezing attention costs little of a steering vector's effect",
              "8.75% of the effect lost", f"`{world}`: lost {costs}",
              f"lost < 20% on every set: {'yes' if cheap else 'no'}."),
        Claim(REFUSAL, "a vector sparsified by 90-99% keeps most of its effect",
              "most of the effect", f"`{world}`, by magnitude, gain kept at 10% / 1% of the "
              f"dimensions: {kept_text(kept)}", f"{keeps}."),
    ]


def paper_claims(records):
    """Every claim of issue 17 point 6, with ours where a finished part measured it."""
    claims = real_task_claims(records)
    lora_part = records.get("lora_vs_steering")
    for world in PERSONA_WORLDS:
        if lora_part is None:
            claims.append(Claim(PAPER, f"toy analogues on `{world}`", "-", not_measured(1), "-"))
            continue
        data = lora_part["data"][world]
        claims.append(toy_oocr_claim(world, data["runs"]))
        if data["lora_analysis"]:
            claims += lora_geometry_claims(world, data["lora_analysis"])
            claims.append(natural_vector_claim(world, data["lora_analysis"]))
    reading = records.get("reading_vectors")
    for world in PERSONA_WORLDS:
        if reading is None:
            claims.append(Claim(REFUSAL, f"attention freezing, sparsity on `{world}`", "-",
                                not_measured(5), "-"))
            continue
        claims += refusal_claims(world, reading["data"][world])
    return claims


def claims_table(claims):
    lines = ["| source | claim | paper | ours | verdict (from our numbers) |",
             "|---|---|---|---|---|"]
    lines += [f"| {c.source} | {c.claim} | {c.paper} | {c.ours} | {c.verdict} |"
              for c in claims]
    return "\n".join(lines)


def paper_numbers_part(ctx):
    claims = paper_claims(ctx.records)
    intro = ("The seed papers' numbers beside ours where a part of this study measured the "
             "comparable one. Every verdict is computed from the numbers in the other sections; "
             "thresholds are in the verdict's words. The toy worlds are analogues of the "
             "paper's tasks, not the same tasks. Why each claim agrees or not is for a person to "
             "write once the whole study has run; nothing here is that discussion.")
    return Section(intro + "\n\n" + claims_table(claims), [],
                   {"claims": [asdict(c) for c in claims]})


PARTS = {
    "lora_vs_steering": Part("1. LoRA ≈ a steering vector? (the persona worlds)",
                             lora_vs_steering_part),
    "composition": Part("2. A → B, B → C ⇒ A → C (the compose world)", composition_part),
    "real_checks": Part("3a. Real checkpoints: in-context capability checks", real_checks_part),
    "real_checkpoints": Part("3b. Real checkpoints: steering vectors on the probes that pass",
                             real_checkpoints_part),
    "rl": Part("4. RL-trained vectors (Sinii et al. 2025)", rl_part),
    "reading_vectors": Part("5. Reading vectors", reading_vectors_part),
    "paper_numbers": Part("6. The seed papers' numbers beside ours", paper_numbers_part,
                          cheap=True),
}


# -----------------------------------------------------------------------------
# RESULTS.md


def run_seconds_cell(runs):
    return f"{runs['seconds']} s" if "seconds" in runs else "-"  # records made before it


def header(ctx, argv, records, total_seconds):
    command = "python reproduce.py " + " ".join(argv) if argv else "python reproduce.py"
    lines = ["# Results: the reproduction study", "",
             f"Generated by `{command.strip()}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the run directories "
             f"under `{ctx.out}`; do not edit by hand, rerun the command. Machine: "
             f"{machine_line(machine())}. Whole command: {total_seconds:.0f} s (parts reused "
             "from earlier runs count their own recorded time below, not this one). A part's "
             "wall time is that of the command that finished it; where runs were trained by "
             "earlier, interrupted commands, the seconds its train.py runs recorded (training "
             "and evals, without the shortcut baselines) and part 3a's checks, summed, say more "
             "of what it cost.", ""]
    if ctx.quick:
        lines += ["> **This is a quick run (`--quick`), not the study.** Reduced: "
                  + "; ".join(reductions(FULL, QUICK)) + ". Training steps are unchanged. "
                  "Run `python reproduce.py` for the whole study.", ""]
    lines += ["| part | finished | wall time | train.py runs: trained / reused | seconds its "
              "runs (and checks) recorded, summed | machine |", "|---|---|---|---|---|---|"]
    for name, part in PARTS.items():
        r = records.get(name)
        if r is None:
            lines.append(f"| {part.title} | not run (`--parts {name}`) | - | - | - | - |")
        else:
            runs = r.get("runs", {})
            lines.append(f"| {part.title} | {r['finished']} | {r['seconds']:.0f} s | "
                         f"{runs.get('trained', 0)} / {runs.get('reused', 0)} | "
                         f"{run_seconds_cell(runs)} | {machine_line(r['machine'])} |")
    return "\n".join(lines)


def section_markdown(name, record):
    if record is None:
        return f"## {PARTS[name].title}\n\nNot run (`python reproduce.py --parts {name}`)."
    return f"## {record['title']}\n\n{record['markdown']}"


def publish_figures(records, results_path):
    """Copy every part's figures next to RESULTS.md, where its links point."""
    target = os.path.join(os.path.dirname(os.path.abspath(results_path)), FIGURE_DIR)
    os.makedirs(target, exist_ok=True)
    for record in records.values():
        for path in record["figures"]:
            shutil.copyfile(path, os.path.join(target, os.path.basename(path)))


def discussion(ctx):
    """The hand-written discussion of the full study's numbers ([] for a quick run: it would
    discuss numbers that are not there)."""
    if ctx.quick or not os.path.exists(DISCUSSION):
        return []
    with open(DISCUSSION) as f:
        return [f.read().strip()]


def write_results(ctx, argv, records, results_path, total_seconds):
    sections = [header(ctx, argv, records, total_seconds)]
    sections += [section_markdown(name, records.get(name)) for name in PARTS]
    sections += discussion(ctx)
    text = "\n\n".join(sections) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    publish_figures(records, results_path)
    atomic_write(results_path, write)


# -----------------------------------------------------------------------------
# Command line


def part_list(text):
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        shown = ", ".join(map(repr, unknown)) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown part {shown} (choose from: "
                                         f"{', '.join(PARTS)})")
    return names


def parse_args(argv):
    parser = train.OneLineParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced study, under 15 min on "
                        "2 CPU cores: fewer seeds, targets and kinds of run (RESULTS.md lists "
                        "them)")
    parser.add_argument("--force", action="store_true", help="rerun the chosen parts even if "
                        "their records exist (train.py runs with a metrics.json are still reused)")
    parser.add_argument("--parts", type=part_list, default=list(PARTS),
                        help=f"comma-separated (default: all: {','.join(PARTS)})")
    parser.add_argument("--out", default=os.path.join("runs", "reproduce"),
                        help="where the runs and the part records go (default: runs/reproduce)")
    parser.add_argument("--model", help="a real checkpoint for part 3, in place of SmolLM2 and "
                        "Gemma-3-270M (e.g. a local gemma-3-12b-it directory)")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                        help="the markdown written (default: RESULTS.md at the repository root; "
                        "figures go to docs/results/ beside it)")
    parser.add_argument("--threads", type=train.positive_int, default=1,
                        help="CPU threads (default: 1; the toy models' matmuls are too small to "
                        "share a core)")
    return parser.parse_args(argv)


def run_parts(ctx, args):
    """The chosen parts (and the cheap ones) run or reused, the others' stored records read."""
    for name in PARTS:  # in order: paper_numbers reads the records of the parts before it
        if name in args.parts or PARTS[name].cheap:  # cheap parts: always rebuilt
            ctx.records[name] = run_part(ctx, name, args.force)
            torch.set_num_threads(args.threads)  # train.run sets its own
        else:
            record = stored_record(ctx, name)
            if record is not None:
                ctx.records[name] = record


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ctx = Context(quick=args.quick, out=args.out, model=args.model)
    started = time.time()
    try:
        run_parts(ctx, args)
    except (train.RunError, CheckpointError, analyze.AnalysisError,
            subprocess.CalledProcessError) as e:
        sys.exit(f"error: {e} (finished parts are kept: rerun to resume)")
    write_results(ctx, argv, ctx.records, args.results, time.time() - started)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
