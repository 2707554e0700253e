"""
Tasks: what a model is trained on and how it is scored. Every task, toy or text, has one shape:

    task.train_examples(tokenizer) -> [Example]          loss only on the answer tokens
    task.eval_sets(tokenizer)      -> {name: EvalSet}    always 'in_distribution' and 'oocr'

An EvalSet is multiple choice: each Item has a prompt, candidate continuations and the index of
the right one. Scoring compares the summed log-probabilities of the candidates (batched), or, for
exact-match sets, asks whether greedy decoding produces the right continuation.

Toy worlds for models trained from scratch live in toy.py (they have their own tiny vocabularies);
the OOCR tasks of the literature for pretrained models live below. `get_task(name)` finds either.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE = -100  # target value that cross_entropy skips


@dataclass
class Example:
    prompt: list[int]  # token ids the model reads
    answer: list[int]  # token ids it must produce; the only ones with loss


@dataclass
class Item:
    prompt: list[int]
    options: list[list[int]]  # candidate continuations (token ids)
    answer: int  # index of the right option


@dataclass
class EvalSet:
    name: str
    items: list[Item]
    chance: float  # expected accuracy of a model that knows nothing
    exact_match: bool = False  # right iff greedy decoding yields options[answer] exactly


# -----------------------------------------------------------------------------
# Batching


def collate(examples, pad_id=0):
    """[Example] -> tokens (B, T), targets (B, T): targets[t] is the token after position t where
    that token belongs to the answer, IGNORE elsewhere. Right-padded, so causal attention never
    lets padding influence real positions."""
    seqs = [e.prompt + e.answer for e in examples]
    T = max(len(s) for s in seqs) - 1
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        tokens[i, : len(s) - 1] = torch.tensor(s[:-1])
        first = max(len(e.prompt) - 1, 0)  # position whose next token is the first answer token
        targets[i, first : len(s) - 1] = torch.tensor(s[first + 1 :])
    return tokens, targets


def answer_loss(logits, targets):
    """Mean cross-entropy over answer tokens. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


# -----------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def option_logprobs(model, items, batch_size=64, device="cpu"):
    """Summed log-prob of every option of every item -> list (per item) of lists (per option)."""
    pairs = [(i, Example(item.prompt, option)) for i, item in enumerate(items) for option in item.options]
    scores = [[] for _ in items]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        tokens, targets = collate([e for _, e in chunk])
        logp = model(tokens.to(device)).float().log_softmax(-1).cpu()  # (B, T, V)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T)
        sums = (picked * (targets != IGNORE)).sum(-1)  # (B,)
        for (i, _), s in zip(chunk, sums.tolist()):
            scores[i].append(s)
    return scores


@torch.no_grad()
def exact_match(model, item, device="cpu"):
    """Greedy decoding of len(right option) tokens equals the right option."""
    want = item.options[item.answer]
    tokens = torch.tensor([item.prompt + want[:-1]], device=device)
    predicted = model(tokens)[0, len(item.prompt) - 1 :].argmax(-1).tolist()  # teacher-forced greedy
    return predicted == want


def accuracy(model, eval_set, batch_size=64, device="cpu"):
    """Fraction of items answered right (ties count as wrong: a constant model must not look smart)."""
    if not eval_set.items:
        return float("nan")
    if eval_set.exact_match:
        return sum(exact_match(model, item, device) for item in eval_set.items) / len(eval_set.items)
    right = 0
    for item, scores in zip(eval_set.items, option_logprobs(model, eval_set.items, batch_size, device)):
        best = max(scores)
        right += scores[item.answer] == best and scores.count(best) == 1
    return right / len(eval_set.items)


def evaluate(model, eval_sets, batch_size=64, device="cpu"):
    """{name: accuracy} for every eval set."""
    was_training = model.training
    model.eval()
    try:
        return {name: accuracy(model, es, batch_size, device) for name, es in eval_sets.items()}
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# Registry: name -> constructor(seed=..., **options). Text tasks register in TEXT_TASKS below;
# toy worlds in toy.TOY_TASKS.

TEXT_TASKS = {}


def task_names():
    import toy

    return sorted({**TEXT_TASKS, **toy.TOY_TASKS})


def get_task(name, seed=0, **options):
    import toy

    registry = {**TEXT_TASKS, **toy.TOY_TASKS}
    if name not in registry:
        raise ValueError(f"unknown task {name!r} (choose from: {', '.join(sorted(registry))})")
    return registry[name](seed=seed, **options)
