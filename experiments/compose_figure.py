"""
The figure of docs/composition.md: (a, b) pair-averaged residual patching of the compose world
(new persons with the embedding adapter; held-out persons on the base model), (c) the
per-entity vector's accuracy by the block it is added at, over seeds.

    python experiments/compose_figure.py --seeds 0,1,2 --out docs/composition.png

Reads runs/compose-s<seed>-embed/analysis/compose_mechanism.json (experiments/compose_mechanism.py)
and the runs' metrics.json.
"""

import argparse
import json
import statistics

from matplotlib.figure import Figure

LAYER_RUNS = [("embed", "embed"), ("0", "steerL0"), ("1", "steerL1"), ("2", "steerL2"),
              ("3", "steerL3")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="docs/composition.png")
    parser.add_argument("--root", default="runs", help="where the compose-s<seed>-* runs are")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    mech = [json.load(open(f"{args.root}/compose-s{s}-embed/analysis/compose_mechanism.json"))
            for s in seeds]
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    rows = mech[0]["rows"]
    columns = ["BOS", "subject", "relation"]
    for ax, key, title in ((axes[0], "patching_new_adapter", "patching BOS N Rk: new persons, embed"),
                           (axes[1], "patching_heldout_base", "patching BOS P Rk: held-out, base")):
        grid = [[statistics.mean(m[key][r][c] for m in mech) for c in range(3)]
                for r in range(len(rows))]
        image = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set(xticks=range(3), xticklabels=columns, yticks=range(len(rows)), yticklabels=rows,
               title=title)
        ax.title.set_fontsize(10)
    fig.colorbar(image, ax=axes[1], fraction=0.046, label="restored share of logit diff")
    ax = axes[2]
    for eval_name, marker in (("in_distribution", "o"), ("oocr", "s")):
        means, sds = [], []
        for _, name in LAYER_RUNS:
            values = [json.load(open(f"{args.root}/compose-s{s}-{name}/metrics.json"))
                      ["eval"]["final"][eval_name] for s in seeds]
            means.append(statistics.mean(values))
            sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.errorbar(range(len(LAYER_RUNS)), means, yerr=sds, marker=marker, label=eval_name,
                    capsize=3)
    ax.axhline(1 / 16, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xticks=range(len(LAYER_RUNS)), xticklabels=[label for label, _ in LAYER_RUNS],
           ylim=(-0.02, 1.05), ylabel="accuracy (mean ± sd, seeds)",
           xlabel="block (mlp_out); embed = input embedding",
           title="a vector per new entity, at its token")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
