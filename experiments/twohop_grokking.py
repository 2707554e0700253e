"""
Route 1 of issue 12: does the two-hop world (toy.TwoHopWorld) learn to compose in pretraining
within a CPU budget? Pretrains from scratch with train.run (--model scratch, full weights,
constant lr after warmup: a decaying lr would stop grokking) and records in-distribution and
out-of-distribution two-hop accuracy every --eval-every steps; one run per named setting.

    python experiments/twohop_grokking.py --settings base,ratio7,wd1,small,deep --steps 12000

Each run is an ordinary train.py run directory runs/grok-<setting>/ (metrics.json holds the
curve under history.eval); a summary line per setting is printed and appended to
runs/grok-summary.jsonl. One thread, one run at a time.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

# world options and recipe per setting; the base is TwoHopWorld's defaults and its recipe's lr
SETTINGS = {
    "base": dict(world={}, weight_decay=0.1),
    "ratio2": dict(world={"inferred_ratio": 2.0}, weight_decay=0.1),
    "ratio7": dict(world={"inferred_ratio": 7.0}, weight_decay=0.1),
    "wd1": dict(world={}, weight_decay=1.0),
    "small": dict(world={"n_entities": 100, "inferred_ratio": 5.0}, weight_decay=0.1),
    "small_wd1": dict(world={"n_entities": 100, "inferred_ratio": 5.0}, weight_decay=1.0),
    "deep": dict(world={"n_layers": 8}, weight_decay=0.1),
    "shallow": dict(world={"n_layers": 2}, weight_decay=0.1),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="base")
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        out = os.path.join("runs", f"grok-{name}-seed{args.seed}")
        cfg = train.TrainConfig(
            adapter="full", model="scratch", task="twohop", task_options=dict(setting["world"]),
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=100,
            schedule="constant", weight_decay=setting["weight_decay"], threads=1,
            eval_every=args.eval_every, checkpoint_every=args.steps, seed=args.seed, out=out,
            resume=os.path.exists(os.path.join(out, "checkpoint.safetensors")),
        )
        started = time.time()
        metrics = train.run(cfg)
        curve = [[step, accs["in_distribution"], accs["oocr"]]
                 for step, accs in metrics["history"]["eval"]]
        line = {"setting": name, "world": setting["world"], "wd": setting["weight_decay"],
                "steps": args.steps, "lr": args.lr, "seed": args.seed,
                "seconds": round(time.time() - started), "final": metrics["eval"]["final"],
                "curve_step_id_ood": curve}
        print(json.dumps(line), flush=True)
        with open(os.path.join("runs", "grok-summary.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
