"""Shortcut baselines: each checked against a hand computation or an independent path through the
model (a full forward with hooks vs the cached last residual stream), and on planted data where
the right answer is known in closed form."""

import pytest
import torch
import torch.nn.functional as F

import baselines
import tasks
from model import ModelConfig, Transformer
from steer import SteeringVector

torch.set_num_threads(1)

D, LAYERS, VOCAB = 16, 3, 32


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=2,
                      n_kv_heads=1, d_head=8, d_mlp=32, n_ctx=16, hf_model_type="llama",
                      name="tiny-llama")
    model = Transformer(cfg)
    with torch.no_grad():  # larger than the default init so that every activation matters
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def random_examples(n=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(1, VOCAB, (3 + i % 4,), generator=g).tolist()
        answer = torch.randint(1, VOCAB, (1 + i % 2,), generator=g).tolist()
        out.append(tasks.Example(prompt, answer))
    return out


def trained_like_vector(layers, positions="all", hook="hook_mlp_out", seed=4):
    vector = SteeringVector(D, layers, hook=hook, positions=positions)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in vector.parameters():
            p.normal_()
    return vector


def test_answer_residuals_are_the_positions_before_each_answer_token():
    model = tiny_model()
    examples = random_examples()
    residuals, targets = baselines.answer_residuals(model, examples, pad_id=0, batch_size=5)
    name = f"blocks.{LAYERS - 1}.hook_resid_post"
    want_residuals, want_targets = [], []
    for e in examples:  # one at a time, no padding: an independent reading
        sequence = e.prompt + e.answer
        _, cache = model.run_with_cache(torch.tensor([sequence]), names_filter=[name])
        for j, token in enumerate(e.answer):
            want_residuals.append(cache[name][0, len(e.prompt) - 1 + j])
            want_targets.append(token)
    assert targets.tolist() == want_targets
    torch.testing.assert_close(residuals, torch.stack(want_residuals), atol=1e-5, rtol=1e-5)
    # and through the final norm and the unembedding they are the model's logits there
    logits = model(torch.tensor([examples[0].prompt + examples[0].answer]))
    first = logits[0, len(examples[0].prompt) - 1]
    torch.testing.assert_close(baselines.unembed(model, residuals[:1])[0], first)


def test_logit_bias_fit_reaches_the_answer_frequencies():
    """With the same base logits everywhere, the best bias makes softmax(logits + b) the empirical
    answer distribution (closed form, when every token occurs)."""
    base = torch.randn(5)
    targets = torch.tensor([0] * 4 + [1] * 3 + [2] * 2 + [3, 4])
    logits = base.expand(len(targets), 5)
    bias = baselines.fit_logit_bias(logits, targets, steps=2000, lr=0.05)
    frequencies = torch.bincount(targets, minlength=5).float() / len(targets)
    torch.testing.assert_close((base + bias).softmax(-1), frequencies, atol=2e-3, rtol=0)


def test_logit_bias_adds_to_every_logit_and_is_removed():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 7))
    bias = torch.randn(VOCAB)
    plain = model(tokens)
    with baselines.logit_bias(model, bias):
        biased = model(tokens)
    torch.testing.assert_close(biased, plain + bias)
    torch.testing.assert_close(model(tokens), plain)


def test_answer_weights_are_wins_minus_losses_on_undecided_choices():
    """Two-way choices where the base puts 1/2 on each option: weight = (wins - losses) / (2 n)."""
    choices = [(0, 1, 0), (0, 1, 0), (2, 0, 2), (1, 2, 1)]  # (a, b, chosen)
    logits = torch.full((len(choices), 4), -1e9)
    for i, (a, b, _) in enumerate(choices):
        logits[i, [a, b]] = 0.0
    targets = torch.tensor([chosen for _, _, chosen in choices])
    wins = torch.zeros(4)
    losses = torch.zeros(4)
    for a, b, chosen in choices:
        wins[chosen] += 1
        losses[a + b - chosen] += 1
    want = (wins - losses) / (2 * len(choices))
    torch.testing.assert_close(baselines.answer_weights(logits, targets), want)


def test_answer_stats_direction_is_the_weighted_unembedding():
    model = tiny_model()
    logits = torch.randn(6, VOCAB)
    targets = torch.tensor([1, 1, 2, 5, 5, 5])
    weights = baselines.answer_weights(logits, targets)
    want = sum(w * row for w, row in zip(weights, model.unembed.weight))  # a plain loop
    got = baselines.answer_stats_direction(model, logits, targets)
    torch.testing.assert_close(got, want / want.norm(), atol=1e-5, rtol=1e-5)


def test_best_scale_is_the_grid_point_with_the_lowest_loss_through_the_full_model():
    """The line search on cached residuals agrees with full forwards with the vector applied."""
    model = tiny_model()
    examples = random_examples()
    residuals, targets = baselines.answer_residuals(model, examples, pad_id=0)
    direction = torch.randn(D)
    direction /= direction.norm()
    scale = baselines.best_scale(model, residuals, targets, direction)
    tokens, answer_targets = tasks.collate(examples, pad_id=0)
    unit = residuals.norm(dim=-1).median()
    losses = []
    for s in baselines.SCALE_GRID * unit:
        with baselines.vector_at_last_block(model, s * direction).apply(model):
            losses.append(tasks.answer_loss(model(tokens), answer_targets).item())
    best = baselines.SCALE_GRID[losses.index(min(losses))] * unit
    assert scale == pytest.approx(best.item(), rel=1e-5)


@pytest.mark.parametrize("positions", ["all", "from:2"])
def test_direct_path_adds_the_summed_vector_after_the_last_block(positions):
    """Hand computation: the final residual stream plus the sum of the layers' vectors (at the
    positions the rule picks), through the final norm and the unembedding."""
    model = tiny_model()
    vector = trained_like_vector([0, 1], positions=positions)
    tokens = torch.randint(0, VOCAB, (2, 6))
    name = f"blocks.{LAYERS - 1}.hook_resid_post"
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    total = vector.directions["0"] + vector.directions["1"]  # (d_model,)
    mask = torch.ones(6) if positions == "all" else (torch.arange(6) >= 2).float()
    want = model.unembed(model.ln_final(cache[name] + mask[:, None] * total))
    with baselines.direct_path(model, vector).apply(model):
        got = model(tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_random_like_keeps_each_norm_and_changes_each_direction():
    vector = trained_like_vector([0, 2])
    before = {k: v.clone() for k, v in vector.directions.items()}
    noisy = baselines.random_like(vector, torch.Generator().manual_seed(0))
    for layer, original in before.items():
        drawn = noisy.directions[layer]
        assert drawn.norm().item() == pytest.approx(original.norm().item(), rel=1e-5)
        assert F.cosine_similarity(drawn, original, dim=0).abs() < 0.9
        torch.testing.assert_close(vector.directions[layer], original)  # the original is kept
    again = baselines.random_like(vector, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.directions["0"], noisy.directions["0"])  # seeded


def test_a_vector_that_only_biases_the_output_is_matched_by_its_direct_path():
    """A vector at the last block's own residual output *is* its direct path: the baseline must
    score exactly what the vector scores (the case the baseline exists to expose)."""
    model = tiny_model()
    items = [tasks.Item(e.prompt, [[3], [7], [9]], answer=i % 3)
             for i, e in enumerate(random_examples())]
    eval_sets = {"probe": tasks.EvalSet("probe", items, chance=1 / 3)}
    vector = trained_like_vector([LAYERS - 1], hook="hook_resid_post")
    with vector.apply(model):
        trained = tasks.evaluate(model, eval_sets)
    scores = baselines.vector_baselines(model, vector, eval_sets, n_random=3)
    assert scores["direct_path"] == trained
    assert set(scores) == {"direct_path", "random_mean", "random_p95"}
    assert 0 <= scores["random_mean"]["probe"] <= scores["random_p95"]["probe"] <= 1


def test_logit_bias_fit_on_a_large_vocabulary_matches_the_full_fit():
    """Tokens outside every row's top `keep` share one bias: the fit equals Adam over every
    column (baselines.fit_bias, the full problem) to within a fraction of a percent."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5000, generator=g) * 3
    targets = torch.randint(0, 30, (200,), generator=g)
    full = baselines.fit_bias(logits, targets, steps=200, lr=0.1)
    shared = baselines.fit_logit_bias(logits, targets, keep=16)
    assert (logits.topk(16, dim=-1).indices.unique().numel() + 30) < 5000  # some columns shared
    p_full, p_shared = (logits + full).softmax(-1), (logits + shared).softmax(-1)
    assert (p_full - p_shared).abs().max() < 5e-3
    assert (p_full - logits.softmax(-1)).abs().max() > 0.1  # the fit did move the answers
