"""
A first look at how the compose world composes out of context (issue 12), on a train.py run:

  1. bridge read-out per layer: the residual at the subject position, classified by the nearest
     centroid (cosine) of the pretraining persons' residuals grouped by bridge (prompt
     `BOS P R0`, base model). New persons (adapter on) beside held-out persons (base).
  2. residual and per-head patching averaged over pairs: clean `BOS N_i Rk` vs corrupted `BOS N_j Rk`
     (adapter on, bridges differ), metric logit(C_k(B_i)) - logit(C_k(B_j)) at the last
     position, denoising resid_pre per (layer, position), the final resid_post, and each head's
     output (hook_z) at all positions; normalised
     (patched - corrupted) / (clean - corrupted). Next to it the base model on held-out persons.
  3. interventions: the new person's residual at the subject position (layer L, adapter on)
     written into `BOS P Rk` of a pretraining person P who lives elsewhere (base model): the
     share of prompts whose top value becomes the new person's; and (embedding adapters) the new
     person's input embedding replaced by the mean embedding of its bridge's residents, with no
     training: the oocr accuracy of that alias.

    python experiments/compose_mechanism.py runs/compose-s0-embed [--pairs 64]

Prints the numbers and writes DIR/analysis/compose_mechanism.json.
"""

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import analyze  # noqa: E402
import tasks  # noqa: E402


def residuals(model, prompts, position):
    """resid_pre of every layer plus the final resid_post at `position` -> (n_rows, N, d)."""
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)]
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    _, cache = model.run_with_cache(torch.tensor(prompts), names_filter=names)
    return torch.stack([cache[n][:, position] for n in names])


def nearest_centroid(reference, labels, queries, n_classes):
    """Cosine nearest centroid per layer: reference (L, M, d), queries (L, Q, d) -> (L, Q)."""
    unit = torch.nn.functional.normalize
    centroids = torch.stack([reference[:, labels == c].mean(1) for c in range(n_classes)], 1)
    return (unit(queries, dim=-1) @ unit(centroids, dim=-1).transpose(1, 2)).argmax(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--pairs", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    subject = analyze.load_run(args.run)
    model, w = subject.model, subject.task
    ids, bos = w.ids, w.tokenizer.bos_id
    K, L = w.n_attributes, model.cfg.n_layers
    rows = [f"{l} resid_pre" for l in range(L)] + [f"{L - 1} resid_post"]
    out = {"run": args.run, "rows": rows}

    # 1. bridge read-out at the subject position
    composed = torch.tensor(w.composed)
    labels = torch.tensor([w.lives[p] for p in w.composed])
    with torch.no_grad():
        ref = residuals(model, [[bos, ids[f"P{p}"], ids["R0"]] for p in w.composed], 1)
        held = residuals(model, [[bos, ids[f"P{p}"], ids["R0"]] for p in w.heldout], 1)
        with subject.state(True):
            new = residuals(model, [[bos, ids[f"N{i}"], ids["R0"]] for i in range(w.n_new)], 1)
    held_truth = torch.tensor([w.lives[p] for p in w.heldout])
    new_truth = torch.tensor([w.new_bridge(i) for i in range(w.n_new)])
    readout = {
        "heldout_persons_base": (nearest_centroid(ref, labels, held, w.n_bridges)
                                 == held_truth).float().mean(1).tolist(),
        "new_persons_adapter": (nearest_centroid(ref, labels, new, w.n_bridges)
                                == new_truth).float().mean(1).tolist(),
    }
    out["bridge_readout"] = readout
    print("bridge read-out at the subject position (nearest resident centroid), per row:")
    for name, accs in readout.items():
        print(f"  {name:<22}" + " ".join(f"{a:.2f}" for a in accs))
    del composed

    # 2. residual patching, averaged over pairs with different bridges
    rng = random.Random(0)

    def patching(subjects, bridge_of, adapted):
        pairs = [(a, b, k) for a in subjects for b in subjects for k in range(K)
                 if bridge_of(a) != bridge_of(b)]
        pairs = rng.sample(pairs, min(args.pairs, len(pairs)))
        total = torch.zeros(L + 1, 3)
        heads = torch.zeros(L, model.cfg.n_heads)
        for a, b, k in pairs:
            clean = [bos, ids[a], ids[f"R{k}"]]
            corrupt = [bos, ids[b], ids[f"R{k}"]]
            right = w.value_token(bridge_of(a), k)
            wrong = w.value_token(bridge_of(b), k)
            metric = analyze.logit_diff(right, wrong)
            with torch.no_grad(), subject.state(adapted):
                grid = analyze.activation_patching(model, clean, corrupt, metric)  # (L, 3)
                final = analyze.activation_patching(model, clean, corrupt, metric,
                                                    site="hook_resid_post")[-1:]  # (1, 3)
                hi = analyze.metric_of(model, clean, metric)
                lo = analyze.metric_of(model, corrupt, metric)
                per_head = analyze.activation_patching(model, clean, corrupt, metric,
                                                       site="head")  # (L, n_heads)
            total += (torch.cat([grid, final]) - lo) / (hi - lo)
            heads += (per_head - lo) / (hi - lo)
        return (total / len(pairs)).tolist(), (heads / len(pairs)).tolist()

    new_names = [f"N{i}" for i in range(w.n_new)]
    out["patching_new_adapter"], out["heads_new_adapter"] = patching(
        new_names, lambda n: w.new_bridge(int(n[1:])), True)
    held_names = [f"P{p}" for p in w.heldout]
    out["patching_heldout_base"], out["heads_heldout_base"] = patching(
        held_names, lambda n: w.lives[int(n[1:])], False)
    for name in ("patching_new_adapter", "patching_heldout_base"):
        print(f"{name}: normalised logit diff, rows = layers, columns = BOS / subject / relation")
        for label, row in zip(rows, out[name]):
            print(f"  {label:<14}" + " ".join(f"{x:6.2f}" for x in row))
    for name in ("heads_new_adapter", "heads_heldout_base"):
        print(f"{name}: each head's output (hook_z, all positions) patched alone, rows = layers")
        for layer, row in enumerate(out[name]):
            print(f"  L{layer:<13}" + " ".join(f"{x:6.2f}" for x in row))

    # 3a. the new person's residual at the subject position, written into a pretraining person's
    took = {}
    for layer in range(L):
        hook = f"blocks.{layer}.hook_resid_pre"
        hits = n = 0
        for i in range(w.n_new):
            b = w.new_bridge(i)
            others = [p for p in w.composed if w.lives[p] != b][:8]
            for k in range(K):
                with torch.no_grad(), subject.state(True):
                    _, cache = model.run_with_cache(
                        torch.tensor([[bos, ids[f"N{i}"], ids[f"R{k}"]]]), names_filter=[hook])
                source = cache[hook][:, 1:2]

                def write(x, hook, source=source):
                    x = x.clone()
                    x[:, 1:2] = source
                    return x

                with torch.no_grad():
                    prompts = torch.tensor([[bos, ids[f"P{p}"], ids[f"R{k}"]] for p in others])
                    logits = model.run_with_hooks(prompts, [(hook, write)])[:, -1]
                options = w.value_options(k)
                picked = torch.tensor(options)[logits[:, options].argmax(-1)]
                hits += (picked == w.value_token(b, k)).sum().item()
                n += len(others)
        took[f"{layer} resid_pre"] = hits / n
    out["new_residual_into_person"] = took
    print("new person's subject residual written into `BOS P Rk` (P elsewhere): share answering "
          "the new person's value: " + " ".join(f"{k}: {v:.2f}" for k, v in took.items()))

    # 3b. an alias with no training: the new persons' embeddings = their bridge's residents' mean
    embed = model.embed.weight
    alias = {}
    saved = embed.data.clone()
    for name, rows_of in (("resident_mean", lambda b: [ids[f"P{p}"] for p in w.residents[b]]),
                          ("bridge_token", lambda b: [ids[f"B{b}"]])):
        with torch.no_grad():
            for i in range(w.n_new):
                embed.data[ids[f"N{i}"]] = saved[rows_of(w.new_bridge(i))].mean(0)
            scores = tasks.evaluate(model, {k: subject.eval_sets[k] for k in
                                            ("in_distribution", "oocr")})
            embed.data.copy_(saved)
        alias[name] = scores
    out["alias_embedding"] = alias
    print("new persons' embedding set, untrained, to: " + "; ".join(
        f"{k}: in_distribution {v['in_distribution']:.3f}, oocr {v['oocr']:.3f}"
        for k, v in alias.items()))

    # the trained embedding (embedding adapters): cosine with its bridge's residents and token
    if subject.vector is not None and subject.config.hook == "hook_resid_pre" \
            and subject.config.layers == [0]:
        deltas = subject.vector.codename_directions["0"].detach()
        unit = torch.nn.functional.normalize
        geometry = []
        for i in range(w.n_new):
            x = saved[ids[f"N{i}"]] + deltas[i]
            b = w.new_bridge(i)
            means = torch.stack([saved[[ids[f"P{p}"] for p in w.residents[c]]].mean(0)
                                 for c in range(w.n_bridges)])
            cos_res = unit(means, dim=-1) @ unit(x, dim=0)
            bridges = saved[[ids[f"B{c}"] for c in range(w.n_bridges)]]
            cos_bridge = unit(bridges, dim=-1) @ unit(x, dim=0)
            geometry.append({"resident_rank": int((cos_res > cos_res[b]).sum()),
                             "cos_residents": cos_res[b].item(),
                             "bridge_rank": int((cos_bridge > cos_bridge[b]).sum()),
                             "cos_bridge": cos_bridge[b].item()})
        out["trained_embedding"] = geometry
        mean = {k: sum(g[k] for g in geometry) / len(geometry) for k in geometry[0]}
        print("trained embedding vs its bridge (rank 0 = closest of 16): "
              + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()))
    path = os.path.join(args.run, "analysis", "compose_mechanism.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
