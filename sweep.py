"""
A sweep of train.py runs over a toy world's targets and seeds, summarised as mean ± spread with
the shortcut baselines beside every number, plus the cross-target matrix of the steering vectors
(the vector trained on target j scored on target i's probe). The measurement behind the README's
persona tables.

    python sweep.py --task persona_hard                    # 8 targets x 3 seeds, 5 kinds of run
    python sweep.py --task persona --seeds 0 --runs steer,control

Kinds of run (--runs): steer (a steering vector at the middle block's MLP output), control (the
same on the opposite answers, scored on the target's evals), lora (all blocks), lora:L (block L
only), steer:L (the vector at block L), full (all weights), control:lora and control:full (their
opposite-answer controls).
Each run is an ordinary train.py run directory under --out; a sweep
that stops resumes by skipping the runs whose metrics.json exists. Writes summary.json,
summary.md and cross_target.png into --out.
"""

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

import steer
import tasks
import toy
import train
from checkpoint import atomic_write, read_json, write_json

RUN_KINDS = ("steer", "control", "lora", "full")  # and lora:L
BASELINE_ORDER = ("logit_bias", "answer_stats", "direct_path", "random_mean", "random_p95")


def run_settings(kind, task, seed, target, out):
    """The TrainConfig of one run of the sweep."""
    cfg = train.TrainConfig(task=task, seed=seed, out=out, task_options={"target": target})
    if kind.startswith("control"):
        adapter = kind.partition(":")[2] or "steer"
        return replace(cfg, adapter=adapter, task_options={"target": target, "opposite": True})
    if kind == "lora":
        return replace(cfg, adapter="lora")
    if kind.startswith("lora:"):
        return replace(cfg, adapter="lora", layers=[int(kind.split(":")[1])])
    if kind.startswith("steer:"):
        return replace(cfg, layers=[int(kind.split(":")[1])])
    if kind == "full":
        return replace(cfg, adapter="full")
    return cfg


def check_kind(kind):
    base, _, detail = kind.partition(":")
    layer_ok = base in ("lora", "steer") and detail.isdigit()
    control_ok = base == "control" and detail in ("lora", "full")
    if base not in RUN_KINDS or (detail and not (layer_ok or control_ok)):
        choices = ", ".join(RUN_KINDS)
        raise ValueError(f"unknown run kind {kind!r} (choose from: {choices}, lora:L, "
                         "steer:L, control:lora, control:full)")
    return kind


def run_dir(out, kind, seed, target):
    return os.path.join(out, "runs", f"{kind.replace(':', '')}-seed{seed}-target{target}")


def run_once(kind, task, seed, target, out):
    """One run's metrics; read back if it finished before (the sweep resumes)."""
    directory = run_dir(out, kind, seed, target)
    metrics_path = os.path.join(directory, "metrics.json")
    if os.path.exists(metrics_path):
        return read_json(metrics_path)
    cfg = run_settings(kind, task, seed, target, directory)
    checkpoint = os.path.join(directory, "checkpoint.safetensors")
    return train.run(replace(cfg, resume=os.path.exists(checkpoint)))


# -----------------------------------------------------------------------------
# Summary: mean and spread over targets and seeds


def mean_and_spread(values):
    """(mean, sample standard deviation; 0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread


def summarise(all_metrics):
    """[metrics of one kind's runs] -> {eval key: {column: (mean, spread)}}."""
    first = all_metrics[0]
    columns = ["chance", "base", "adapter", *[b for b in BASELINE_ORDER if b in first["baselines"]]]
    out = {}
    for key in first["eval"]["final"]:
        row = {}
        for column in columns:
            values = [column_value(m, column, key) for m in all_metrics]
            row[column] = None if None in values else mean_and_spread(values)
        out[key] = row
    return out


def column_value(metrics, column, key):
    """One number of a run's report; None where a baseline skips the eval (in-context checks)."""
    if column == "chance":
        return metrics["chance"][key]
    if column == "base":
        return metrics["eval"]["base"][key]
    if column == "adapter":
        return metrics["eval"]["final"][key]
    return metrics["baselines"][column].get(key)


def format_cell(cell):
    """(mean, spread) -> "0.125 ± 0.000"; None (a baseline that skips the eval) -> "-"."""
    return "-" if cell is None else f"{cell[0]:.3f} ± {cell[1]:.3f}"


def markdown_table(kind, summary, n_runs):
    columns = list(next(iter(summary.values())))
    lines = [f"**{kind}** ({n_runs} runs; mean ± standard deviation over targets and seeds)", ""]
    lines.append("| eval | " + " | ".join(columns) + " |")
    lines.append("|---" * (len(columns) + 1) + "|")
    for key, row in summary.items():
        cells = [format_cell(cell) for cell in row.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The cross-target matrix: is a vector specific to the persona it was trained on?


@torch.no_grad()
def cross_target_matrix(task, seed, targets, out):
    """M[j][i] = 'oocr' accuracy on target i's probe of the steering vector trained on target j."""
    cfg = train.with_defaults(train.TrainConfig(task=task, seed=seed))
    world = train.get_task(task, seed=seed, target=targets[0])
    model, tokenizer = train.base_model(cfg, world, "cpu")
    probes = {}
    for i in targets:
        eval_sets = train.get_task(task, seed=seed, target=i).eval_sets(tokenizer)
        probes[i] = {"oocr": eval_sets["oocr"]}
    matrix = []
    for j in targets:
        path = os.path.join(run_dir(out, "steer", seed, j), "steering_vector.safetensors")
        vector = steer.SteeringVector.load(path, model)
        with vector.apply(model):
            matrix.append([tasks.evaluate(model, probes[i])["oocr"] for i in targets])
    return matrix


def plot_matrix(matrix, targets, path, title):
    fig = Figure(figsize=(5, 4.2))
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set(xticks=range(len(targets)), yticks=range(len(targets)), xticklabels=targets,
           yticklabels=targets, xlabel="probe of target i", ylabel="vector trained on target j",
           title=title)
    for j, row in enumerate(matrix):
        for i, value in enumerate(row):
            ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, label="oocr accuracy")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def diagonal_contrast(matrix):
    """(mean of the diagonal, mean off the diagonal): a specific vector has the first >> second."""
    n = len(matrix)
    diagonal = [matrix[i][i] for i in range(n)]
    off = [matrix[j][i] for j in range(n) for i in range(n) if i != j]
    return statistics.fmean(diagonal), statistics.fmean(off)


# -----------------------------------------------------------------------------
# The sweep


def parse_args(argv):
    parser = train.OneLineParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="persona_hard", choices=sorted(toy.TOY_TASKS),
                        help="a toy world (default: persona_hard)")
    parser.add_argument("--seeds", type=train.layer_list, default=[0, 1, 2],
                        help="world seeds, comma-separated (default: 0,1,2)")
    parser.add_argument("--targets", type=train.layer_list, default=None,
                        help="targets, comma-separated (default: all of the world's)")
    parser.add_argument("--runs", type=train.comma_list,
                        default=["steer", "control", "lora", "full"],
                        help="kinds of run: steer, steer:L, control, lora, lora:L, full, "
                        "control:lora, control:full "
                        "(default: steer,control,lora,full)")
    parser.add_argument("--out", default=None, help="(default: runs/sweep-<task>)")
    args = parser.parse_args(argv)
    try:
        args.runs = [check_kind(kind) for kind in args.runs]
    except ValueError as e:
        parser.error(str(e))
    args.out = args.out or os.path.join("runs", f"sweep-{args.task}")
    return args


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text + "\n")


def world_targets(task, seed):
    return list(range(train.get_task(task, seed=seed).n_personas))


def main(argv=None):
    args = parse_args(argv)
    targets = args.targets or world_targets(args.task, args.seeds[0])
    plan = [(k, s, t) for k in args.runs for s in args.seeds for t in targets]
    results = {kind: [] for kind in args.runs}
    try:
        for kind, seed, target in tqdm(plan, desc="sweep", dynamic_ncols=True):
            results[kind].append(run_once(kind, args.task, seed, target, args.out))
    except (train.RunError, ValueError) as e:
        sys.exit(f"error: {e}")
    summary = {kind: summarise(metrics) for kind, metrics in results.items()}
    report = {"task": args.task, "seeds": args.seeds, "targets": targets, "summary": summary}
    sections = [markdown_table(kind, summary[kind], len(results[kind])) for kind in args.runs]
    if "steer" in args.runs:
        matrices = [cross_target_matrix(args.task, s, targets, args.out) for s in args.seeds]
        mean_matrix = [[statistics.fmean(m[j][i] for m in matrices) for i in targets]
                       for j in range(len(targets))]
        title = f"{args.task}: steering vectors, oocr ({len(args.seeds)} seeds)"
        plot_matrix(mean_matrix, targets, os.path.join(args.out, "cross_target.png"), title)
        diagonal, off = diagonal_contrast(mean_matrix)
        report["cross_target"] = {"per_seed": matrices, "mean": mean_matrix,
                                  "diagonal": diagonal, "off_diagonal": off}
        sections.append(f"cross-target matrix (cross_target.png): oocr of a vector on its own "
                        f"target {diagonal:.3f}, on the other targets {off:.3f}")
    text = "\n\n".join(sections)
    write_json(os.path.join(args.out, "summary.json"), report)
    atomic_write(os.path.join(args.out, "summary.md"), lambda tmp: write_text(tmp, text))
    print("\n" + text)


if __name__ == "__main__":
    main()
