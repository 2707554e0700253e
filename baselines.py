"""
Shortcut baselines: what a run would score without the mechanism it claims.

A fine-tune that makes a model answer a probe it never saw may have taught the model a latent fact
(out-of-context reasoning), or it may only push the output toward the tokens it was trained to
produce; where a world's tokens cluster (a persona's name near its answers), that push alone also
answers the probe. So every run is scored beside baselines that can only do the second:

    logit_bias     the best constant bias on the logits, fitted to the fine-tuning answers
    answer_stats   an untrained vector: the unembedding rows weighted by how much more often each
                   token is a fine-tuning answer than the base model predicts it, added after the
                   last block (scale fitted to the fine-tuning answers, direction not)
    direct_path    the trained steering vector added after the last block instead of at its own
                   layer: only the final norm and the unembedding can read it there
    random         random vectors with the trained vector's norm, at its place: the mean and the
                   95th percentile over draws

The first two need only the base model and the training data, so they apply to every adapter
(computed before training: a full fine-tune changes the base); the last two need a steering vector.
A claim of OOCR is one where the adapter clearly beats every baseline.
"""

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import tasks
from steer import SteeringVector

DIRECTION_PARAMETERS = ("directions", "codename_directions")  # what a steering vector adds
# Adam on a convex loss; 200 steps saturate on toy answers. keep: see fit_logit_bias
BIAS_FIT = {"steps": 200, "lr": 0.1, "keep": 512}
SCALE_GRID = torch.logspace(-2, 1, 31)  # answer_stats norms, in units of the median residual norm


def last_block_hook(model):
    """After the last block: only the final norm and the unembedding read what is added here."""
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


# -----------------------------------------------------------------------------
# What the base model sees at the answers


@torch.no_grad()
def answer_residuals(model, examples, pad_id, batch_size=64):
    """The base model's last residual stream at every position that predicts an answer token
    -> (residuals (N, d_model) fp32, targets (N,)), on the model's device."""
    device = next(model.parameters()).device
    name = last_block_hook(model)
    residuals, answers = [], []
    for start in range(0, len(examples), batch_size):
        tokens, targets = tasks.collate(examples[start : start + batch_size], pad_id)  # (B, T)
        is_answer = (targets != tasks.IGNORE).to(device)  # (B, T)

        def keep(x, hook):
            residuals.append(x.float()[is_answer])  # (n, d_model)

        with model.hooks([(name, keep)]):
            model(tokens.to(device), at=is_answer)  # logits only there: 262k wide on Gemma
        answers.append(targets.to(device)[is_answer])  # (n,)
    return torch.cat(residuals), torch.cat(answers)


def unembed(model, residuals):
    """(N, d_model) -> logits (N, vocab), fp32."""
    return model.unembed(model.ln_final(residuals.to(model.unembed.weight.dtype))).float()


# -----------------------------------------------------------------------------
# logit_bias: the best constant output bias


def fit_logit_bias(logits, targets, steps=BIAS_FIT["steps"], lr=BIAS_FIT["lr"],
                   keep=BIAS_FIT["keep"]):
    """The bias b (vocab,) minimising cross-entropy(logits + b, targets): what a fine-tune could
    reach by changing nothing but the output's prior. Unbounded on separable answers, so a fixed
    budget decides how confident it gets.
    Every answer token and every row's `keep` likeliest tokens get a bias of their own; the others
    (none on a toy vocabulary: the fit is then exact) share one. They carry almost no probability,
    and Adam moves each coordinate by about lr per step however small its gradient, so the full
    fit moves them together anyway; sharing turns each step's softmax over 262k columns (Gemma:
    an hour) into one over a few thousand."""
    own = torch.cat([targets, logits.topk(min(keep, logits.shape[-1]), dim=-1).indices.flatten()])
    own = own.unique()  # (K,) sorted
    shared = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    shared[own] = False
    columns = logits[:, own]  # (N, K)
    if shared.any():  # one more column: the shared tokens' logsumexp, shifted by their one bias
        columns = torch.cat([columns, logits[:, shared].logsumexp(-1, keepdim=True)], dim=-1)
    fitted = fit_bias(columns, torch.searchsorted(own, targets), steps, lr)  # (K [+ 1],)
    bias = torch.full_like(logits[0], fitted[-1].item() if shared.any() else 0.0)
    bias[own] = fitted[: len(own)]
    return bias


def fit_bias(logits, targets, steps, lr):
    """Adam on cross-entropy(logits + b, targets) over b, from zero."""
    bias = torch.zeros(logits.shape[-1], device=logits.device, requires_grad=True)
    optimizer = torch.optim.Adam([bias], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(logits + bias, targets).backward()
        optimizer.step()
    return bias.detach()


@contextmanager
def logit_bias(model, bias):
    """Add bias (vocab,) to every logit the model outputs while inside the block."""

    def add(module, inputs, output):
        return output + bias.to(output)

    handle = model.unembed.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


# -----------------------------------------------------------------------------
# answer_stats: an untrained vector from the answers' statistics


def answer_weights(logits, targets):
    """(vocab,): how much more often each token is the fine-tuning answer than the base model
    predicts it. It is minus the gradient of the answer loss with respect to a logit bias at zero;
    on a two-way choice it is (wins - losses) / 2 per option when the base is undecided."""
    wanted = F.one_hot(targets, logits.shape[-1]).float().mean(0)  # (vocab,)
    predicted = logits.softmax(-1).mean(0)  # (vocab,)
    return wanted - predicted


def answer_stats_direction(model, logits, targets):
    """The unembedding rows weighted by answer_weights -> unit vector (d_model,)."""
    weights = answer_weights(logits, targets)  # (vocab,)
    direction = weights @ model.unembed.weight.float()  # (d_model,)
    return direction / direction.norm()


@torch.no_grad()
def best_scale(model, residuals, targets, direction):
    """The norm of `direction`, added after the last block, that best fits the answers: a grid in
    units of the median residual norm (a line search on one number, not training)."""
    unit = residuals.norm(dim=-1).median()
    losses = []
    for scale in SCALE_GRID * unit:
        logits = unembed(model, residuals + scale * direction)  # (N, vocab)
        losses.append(F.cross_entropy(logits, targets).item())
    return (SCALE_GRID[losses.index(min(losses))] * unit).item()


def vector_at_last_block(model, direction):
    """A steering vector that adds `direction` (d_model,) at every position after the last block."""
    vector = SteeringVector(model.cfg.d_model, [model.cfg.n_layers - 1], hook="hook_resid_post")
    last = str(model.cfg.n_layers - 1)
    with torch.no_grad():
        vector.directions[last].copy_(direction)
    return vector.to(direction.device)


# -----------------------------------------------------------------------------
# direct_path and random: the trained vector moved, or replaced by noise


def direct_path(model, vector):
    """The trained vector added after the last block, with its own position rule. Vectors of
    several layers are summed (each would reach the last block through the residual stream); an
    adaptive gate's parameters are averaged."""
    last = model.cfg.n_layers - 1
    moved = SteeringVector(
        vector.d_model,
        [last],
        hook="hook_resid_post",
        positions=vector.positions,
        codenames=vector.codenames or None,
    )
    with torch.no_grad():
        for name, params in moved.named_children():
            stacked = torch.stack(list(getattr(vector, name).values()))  # (n_layers, *shape)
            combined = stacked.sum(0) if name in DIRECTION_PARAMETERS else stacked.mean(0)
            params[str(last)].copy_(combined)
    return moved.to(next(vector.parameters()).device)


def random_like(vector, generator):
    """A copy of the vector whose every direction is replaced by a random one of the same norm."""
    noisy = copy.deepcopy(vector)
    with torch.no_grad():
        for name in DIRECTION_PARAMETERS:
            for param in getattr(noisy, name, {}).values():
                noise = torch.randn(param.shape, generator=generator).to(param)
                norms = param.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
                param.copy_(noise * norms)
    return noisy


# -----------------------------------------------------------------------------
# The report


def evaluate_with(model, eval_sets, context, batch_size):
    with context:
        return tasks.evaluate(model, eval_sets, batch_size=batch_size)


def data_baselines(model, examples, pad_id, eval_sets, batch_size=64):
    """The baselines that need only the base model and the fine-tuning answers
    -> ({baseline: {eval key: accuracy}}, {what was fitted})."""
    residuals, targets = answer_residuals(model, examples, pad_id, batch_size)
    with torch.no_grad():
        logits = unembed(model, residuals)  # (N, vocab): the base model's answers
    bias = fit_logit_bias(logits, targets)
    direction = answer_stats_direction(model, logits, targets)
    scale = best_scale(model, residuals, targets, direction)
    stats_vector = vector_at_last_block(model, scale * direction)
    scores = {
        "logit_bias": evaluate_with(model, eval_sets, logit_bias(model, bias), batch_size),
        "answer_stats": evaluate_with(model, eval_sets, stats_vector.apply(model), batch_size),
    }
    info = {"logit_bias_norm": bias.norm().item(), "answer_stats_norm": scale}
    return scores, info


def quantile(values, q):
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()


def vector_baselines(model, vector, eval_sets, n_random=20, seed=0, batch_size=64, progress=None):
    """The baselines built from a trained steering vector -> {baseline: {eval key: accuracy}}.
    progress(iterable) may wrap the random draws (a progress bar)."""
    moved = direct_path(model, vector)
    scores = {"direct_path": evaluate_with(model, eval_sets, moved.apply(model), batch_size)}
    if n_random == 0:
        return scores
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in (progress or iter)(range(n_random)):
        noisy = random_like(vector, generator)
        draws.append(evaluate_with(model, eval_sets, noisy.apply(model), batch_size))
    keys = draws[0]
    scores["random_mean"] = {k: sum(d[k] for d in draws) / n_random for k in keys}
    scores["random_p95"] = {k: quantile([d[k] for d in draws], 0.95) for k in keys}
    return scores
