"""
The route-2 table of issue 12: one markdown row per train.py run directory of the compose world,
with every eval set (base -> tuned) and the shortcut baselines of its oocr set.

    python experiments/compose_table.py runs/compose-*         # rows in the order given
    python experiments/compose_table.py --mean 0,1,2 embed full   # mean ± sd over seeds of
                                                  # runs/compose-s<seed>-<name>
"""

import json
import os
import statistics
import sys

EVALS = ("in_distribution", "oocr", "oocr_in_context", "reversal", "second_hop",
         "heldout_two_hop")
BASELINES = (("logit_bias", "bias"), ("answer_stats", "stats"), ("direct_path", "direct"),
             ("random_p95", "rand95"))


def describe(config):
    """The run's adapter and placement in words."""
    kind = config["adapter"]
    if kind == "lora":
        kind += f" blocks {config['layers'] or 'all'}"
    if kind == "steer":
        kind += f" {config['positions']} {config['hook']} block {config['layers'] or 'mid'}"
    if config["task_options"].get("opposite"):
        kind += " (opposite)"
    return kind


def row(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    base, final = metrics["eval"]["base"], metrics["eval"]["final"]
    cells = [describe(config), str(metrics["trainable_params"]),
             f"{metrics['steps']} / {metrics['seconds']:.0f} s"]
    cells += [f"{base[k]:.3f} → {final[k]:.3f}" for k in EVALS if k in final]
    shortcuts = metrics["baselines"]
    cells.append(" / ".join(f"{shortcuts[k]['oocr']:.3f}" if k in shortcuts else "-"
                            for k, _ in BASELINES))
    return "| " + " | ".join(cells) + " |"


def load(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def mean_row(seeds, name):
    """One row: mean ± standard deviation over seeds of every eval set and baseline."""
    runs = [load(f"runs/compose-s{seed}-{name}") for seed in seeds]

    def cell(values):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    cells = [name, str(runs[0]["trainable_params"]), f"{runs[0]['steps']} / "
             f"{statistics.mean(r['seconds'] for r in runs):.0f} s"]
    for k in EVALS:
        base = statistics.mean(r["eval"]["base"][k] for r in runs)
        cells.append(f"{base:.3f} → {cell([r['eval']['final'][k] for r in runs])}")
    cells.append(" / ".join(
        f"{statistics.mean(r['baselines'][k]['oocr'] for r in runs):.3f}"
        if k in runs[0]["baselines"] else "-" for k, _ in BASELINES))
    return "| " + " | ".join(cells) + " |"


def main():
    if sys.argv[1] == "--mean":
        seeds = [int(s) for s in sys.argv[2].split(",")]
        names, rows = sys.argv[3:], mean_row
    else:
        names, rows = sys.argv[1:], None
    header = ["run", "trainable", "steps / time"] + list(EVALS)
    header.append("oocr: " + " / ".join(name for _, name in BASELINES))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in names:
        if rows is not None:
            print(rows(seeds, name))
        elif os.path.exists(os.path.join(name, "metrics.json")):
            print(row(name))


if __name__ == "__main__":
    main()
