"""
Route 1's table and curves from runs/grok-summary.jsonl (experiments/twohop_grokking.py): one row
per setting (the last line written for it), and a plot of in-distribution / out-of-distribution
two-hop accuracy over steps.

    python experiments/twohop_table.py --plot docs/composition_route1.png
"""

import argparse
import json

from matplotlib.figure import Figure


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--summary", default="runs/grok-summary.jsonl")
    parser.add_argument("--plot", default="")
    args = parser.parse_args()
    runs = {}
    with open(args.summary) as f:
        for line in f:
            d = json.loads(line)
            runs[d["setting"]] = d
    print("| setting | world | weight decay | steps / wall time | ID two-hop at 3k / 6k / 9k / "
          "12k steps (max, at) | OOD two-hop (max) | atomic | reversal |")
    print("|---|---|---|---|---|---|---|---|")
    for name, d in runs.items():
        curve = {step: (ind, ood) for step, ind, ood in d["curve_step_id_ood"]}
        final = d["final"]
        curve[d["steps"]] = (final["in_distribution"], final["oocr"])
        at = [f"{curve[s][0]:.3f}" if s in curve else "-" for s in (3000, 6000, 9000, 12000)]
        best = max(curve, key=lambda s: curve[s][0])
        ood = max(v[1] for v in curve.values())
        world = ", ".join(f"{k}={v}" for k, v in d["world"].items()) or "defaults"
        print(f"| {name} | {world} | {d['wd']} | {d['steps']} / {d['seconds']} s | "
              f"{' / '.join(at)} ({curve[best][0]:.3f}, {best}) | {final['oocr']:.3f} ({ood:.3f}) "
              f"| {final['atomic']:.3f} | {final['reversal']:.3f} |")
    if args.plot:
        fig = Figure(figsize=(7, 3.5))
        ax = fig.subplots()
        for name, d in runs.items():
            steps = [s for s, _, _ in d["curve_step_id_ood"]]
            line, = ax.plot(steps, [i for _, i, _ in d["curve_step_id_ood"]], marker="o",
                            markersize=3, label=f"{name} ID")
            ax.plot(steps, [o for _, _, o in d["curve_step_id_ood"]], linestyle=":",
                    color=line.get_color())
        ax.set(xlabel="pretraining step", ylabel="two-hop accuracy (exact match)",
               title="twohop: ID (solid) and OOD (dotted) composition", ylim=(-0.01, 0.3))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=90)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
