"""
Tests of analyze.py against hand computations on tiny random models (the logit lens against the
logits, patching against its definition and a loop of single-patch forwards, attribution patching
against exact patching where the model is linear in the patched activation), and every subcommand
end to end on small train.py run directories made here (5 steps from the shipped toy model).
"""

import json
import os
import shutil

import pytest
import torch

import analyze
import lora
import sae
import steer
import tasks
import toy
import train
from model import ModelConfig, Transformer

VOCAB, T = 23, 7


def tiny_model(arch, seed=0):
    """Weights far from the init (std 0.02), so that a wrong site or position changes the metric."""
    cfg = ModelConfig(arch=arch, vocab_size=VOCAB, d_model=16, n_layers=3, n_heads=4,
                      n_kv_heads=2 if arch == "llama" else 4, d_head=4, d_mlp=32, n_ctx=16,
                      tie_embeddings=arch == "gpt2", hf_model_type=arch)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return model.requires_grad_(False)


def random_prompt(seed):
    return torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(seed))  # (T,)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on 2 shared cores: one thread is faster, and the run directories use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    return tiny_model(request.param)


CLEAN, CORRUPT = random_prompt(1), random_prompt(2)
METRIC = analyze.logit_diff(right=3, wrong=5)
SITES = ["resid_pre", "attn_out", "mlp_out", "head", "hook_resid_mid"]


# -----------------------------------------------------------------------------
# Logit lens


def test_logit_lens_last_row_is_logits(tiny):
    tokens = torch.stack([CLEAN, CORRUPT])  # (B, T)
    with torch.no_grad():
        lens = analyze.logit_lens(tiny, tokens)  # (n_layers + 1, B, T, vocab)
        assert lens.shape == (tiny.cfg.n_layers + 1, *tokens.shape, VOCAB)
        assert (lens[-1] - tiny(tokens)).abs().max() < 1e-5


def test_lens_readout_prob_and_rank_by_hand(tiny):
    readout = analyze.lens_readout(tiny, CLEAN, token=3, position=-1, top_k=4)
    with torch.no_grad():
        logits = tiny(CLEAN[None])[0]  # (T, vocab)
    probs = logits.softmax(-1)
    torch.testing.assert_close(readout["prob"][-1], probs[:, 3], rtol=0, atol=1e-6)
    expected_rank = torch.tensor([(row > row[3]).sum() for row in logits])
    assert torch.equal(readout["rank"][-1], expected_rank)
    assert torch.equal(readout["top_ids"][-1], probs[-1].topk(4).indices)
    assert readout["rank"].shape == readout["prob"].shape == (tiny.cfg.n_layers + 1, T)


# -----------------------------------------------------------------------------
# Activation patching


def metric_of(model, tokens):
    return analyze.metric_of(model, tokens, METRIC)


@pytest.mark.parametrize("site", SITES)
def test_patching_own_clean_activations_gives_the_clean_metric(tiny, site):
    source = analyze.cache_site(tiny, CLEAN, site)
    grid = analyze.patch_into(tiny, CLEAN, source, METRIC, site)
    # bit-identical on this machine; the tolerance allows a BLAS that blocks N rows unlike one
    assert torch.allclose(grid, torch.full_like(grid, metric_of(tiny, CLEAN)), rtol=0, atol=1e-5)


def test_corrupted_last_layer_resid_at_every_position_gives_the_corrupted_metric(tiny):
    every = [list(range(T))]
    grid = analyze.activation_patching(tiny, CLEAN, CORRUPT, METRIC, "resid_pre", spans=every,
                                       direction="noise")  # (n_layers, 1)
    assert grid.shape == (tiny.cfg.n_layers, 1)
    # every layer's input holds everything the corrupted run has; the last layer is the case
    torch.testing.assert_close(grid[-1, 0].item(), metric_of(tiny, CORRUPT), rtol=0, atol=1e-5)
    torch.testing.assert_close(grid[:, 0], torch.full((tiny.cfg.n_layers,),
                                                      metric_of(tiny, CORRUPT)), rtol=0, atol=1e-5)


def single_patch_forward(model, tokens, source, patch, metric=METRIC):
    """The definition: one forward, one hook, the source written by index assignment."""

    def write(x, hook):
        x = x.clone()
        index = (slice(None), list(patch.positions))
        index += () if patch.head is None else (patch.head,)
        x[index] = source[patch.hook][index]
        return x

    with torch.no_grad():
        return metric(model.run_with_hooks(tokens[None], [(patch.hook, write)])).item()


SPANS = {"each position": None, "one span": [[2, 4, 5]], "two spans": [[1, 2, 5], [0, 6]]}
CASES = [(site, spans) for site in SITES for spans in SPANS
         if not (site == "head" and spans == "two spans")]  # heads take one span


@pytest.mark.parametrize("site, spans", CASES)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_batched_patching_equals_a_loop_of_single_patches(tiny, site, spans, direction):
    spans = SPANS[spans]
    target, source_tokens = (CORRUPT, CLEAN) if direction == "denoise" else (CLEAN, CORRUPT)
    source = analyze.cache_site(tiny, source_tokens, site)
    batched = analyze.activation_patching(tiny, CLEAN, CORRUPT, METRIC, site, spans, direction,
                                          batch_size=5)  # several batches, one ragged
    checked = analyze.check_spans(spans, T, site)
    grid = analyze.patch_grid(tiny, site, checked)
    loop = torch.tensor([[single_patch_forward(tiny, target, source, p) for p in row]
                         for row in grid])
    n_columns = tiny.cfg.n_heads if site == "head" else len(checked)
    assert batched.shape == (tiny.cfg.n_layers, n_columns)
    torch.testing.assert_close(batched, loop, rtol=0, atol=1e-5)
    assert (batched - metric_of(tiny, target)).abs().max() > 1e-3  # the patches do something


# Patched runs start at the patch's layer and first changed position (start_at_layer, the target's
# KV cache) and patches that change nothing are not run: the same loop as the reference, on pairs
# one token apart (where most patches start late or change nothing), with adapters active


def one_token_apart(position):
    corrupt = CLEAN.clone()
    corrupt[position] = (corrupt[position] + 1) % VOCAB
    return corrupt


def loop_grid(model, target, source_tokens, site, spans, metric=METRIC):
    """The reference: one forward per patch, the source cached by an independent run."""
    source = analyze.cache_site(model, source_tokens, site)
    grid = analyze.patch_grid(model, site, analyze.check_spans(spans, T, site))
    return torch.tensor([[single_patch_forward(model, target, source, p, metric) for p in row]
                         for row in grid])


@pytest.fixture
def one_layer_each(monkeypatch):
    """No fixed cost per block call: every layer's patches get forwards of their own (on tiny
    models the planner would otherwise run them all from block 0)."""
    monkeypatch.setattr(analyze, "BLOCK_CALL_FLOPS", 0)


@pytest.fixture
def forwards(monkeypatch):
    """[(layer, start, n_rows)] of every patched forward analyze runs."""
    seen = []
    run_forward = analyze.run_forward

    def recorded(model, target, source, patches, layer, start, metric):
        seen.append((layer, start, len(patches)))
        return run_forward(model, target, source, patches, layer, start, metric)

    monkeypatch.setattr(analyze, "run_forward", recorded)
    return seen


LATE_SPANS = {"each position": None, "spans": [[0], [T - 1], [1, 5], [2, 3, 6]]}
HEAD_SPANS = {"each position": None, "spans": [[3, 6]]}


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "head"])
@pytest.mark.parametrize("spans", list(LATE_SPANS))
@pytest.mark.parametrize("corrupted", [0, 3, T - 1])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("split", [False, True])
def test_patched_runs_from_their_layer_and_position_equal_the_loop(tiny, site, spans, corrupted,
                                                                  direction, split, forwards,
                                                                  request):
    if split:
        request.getfixturevalue("one_layer_each")
    spans = (HEAD_SPANS if site == "head" else LATE_SPANS)[spans]
    corrupt = one_token_apart(corrupted)
    target, source_tokens = (corrupt, CLEAN) if direction == "denoise" else (CLEAN, corrupt)
    batched = analyze.activation_patching(tiny, CLEAN, corrupt, METRIC, site, spans, direction,
                                          batch_size=4)
    loop = loop_grid(tiny, target, source_tokens, site, spans)
    torch.testing.assert_close(batched, loop, rtol=0, atol=1e-5)
    assert (batched - metric_of(tiny, target)).abs().max() > 1e-3  # the patches do something
    # nothing before the corrupted token changes: no patched run starts before it
    assert forwards and all(start >= corrupted for _, start, _ in forwards)
    if site == "resid_pre" and spans is None:  # block 0's input differs at that token only
        assert sum(n for _, _, n in forwards) == 1 + (tiny.cfg.n_layers - 1) * (T - corrupted)
        torch.testing.assert_close(batched[:, :corrupted],
                                   torch.full((tiny.cfg.n_layers, corrupted),
                                              metric_of(tiny, target)), rtol=0, atol=1e-5)


def wide_model(n_layers=3):
    """A model whose blocks cost far more arithmetic than a block call's fixed cost, per token."""
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, d_model=128, n_layers=n_layers, n_heads=4,
                      n_kv_heads=2, d_head=32, d_mlp=512, hf_model_type="llama")
    return Transformer(cfg).eval()


@pytest.mark.parametrize("n_positions, n_forwards", [(2, 1), (16, 3)])
def test_layers_share_a_forward_only_where_fixed_costs_dominate(n_positions, n_forwards):
    model = wide_model()
    starts = [(layer, p, n_positions * layer + p) for layer in range(3)
              for p in range(n_positions)]
    forwards = analyze.plan_forwards(model, starts, n_positions, batch_size=64)
    assert len(forwards) == n_forwards
    assert sorted({layer for layer, _, _ in forwards}) == list(range(0, 3, 3 // n_forwards))


def test_a_short_prompt_shares_one_forward_among_layers(tiny, forwards):
    analyze.activation_patching(tiny, CLEAN[:3], CORRUPT[:3], METRIC)
    assert forwards == [(0, 0, tiny.cfg.n_layers * 3)]


def tiny_gemma(seed=14):
    """Gemma 3's attention: sliding-window layers (3 keys) around a global one, two RoPE bases."""
    cfg = ModelConfig(arch="gemma3", vocab_size=VOCAB, d_model=16, n_layers=3, n_heads=4,
                      n_kv_heads=2, d_head=4, d_mlp=32, qkv_bias=False, o_bias=False,
                      mlp_bias=False, sliding_window=3, final_logit_softcap=30.0,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                      hf_model_type="gemma3_text")
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.requires_grad_(False)


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "head"])
@pytest.mark.parametrize("corrupted", [0, 4])
def test_patching_a_sliding_window_model_equals_the_loop(site, corrupted, one_layer_each,
                                                         forwards):
    model, corrupt = tiny_gemma(), one_token_apart(corrupted)
    batched = analyze.activation_patching(model, CLEAN, corrupt, METRIC, site)
    torch.testing.assert_close(batched, loop_grid(model, corrupt, CLEAN, site, None),
                               rtol=0, atol=1e-5)
    assert (batched - metric_of(model, corrupt)).abs().max() > 1e-3
    assert all(start == corrupted for _, start, _ in forwards)


def test_a_metric_before_the_patches_reads_the_target_runs_logits(tiny, one_layer_each, forwards):
    metric = analyze.logit_diff(right=3, wrong=5, position=2)
    corrupt = one_token_apart(4)
    batched = analyze.activation_patching(tiny, CLEAN, corrupt, metric)
    torch.testing.assert_close(batched, loop_grid(tiny, corrupt, CLEAN, "resid_pre", None, metric),
                               rtol=0, atol=1e-5)
    assert all(start == 4 for _, start, _ in forwards)


def random_lora(model, seed=12):
    lora.attach_lora(model, targets=("down_proj", "o_proj"), layers=[0, 2], r=2, alpha=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora.lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g))
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_patching_with_a_lora_equals_the_loop(arch, one_layer_each, forwards):
    model = random_lora(tiny_model(arch, seed=10))
    corrupt = one_token_apart(2)
    for site in ("head", "mlp_out", "resid_pre"):
        batched = analyze.activation_patching(model, CLEAN, corrupt, METRIC, site)
        torch.testing.assert_close(batched, loop_grid(model, corrupt, CLEAN, site, None),
                                   rtol=0, atol=1e-5)
    assert any(start > 0 for _, start, _ in forwards)  # the LoRA needs no whole runs
    with lora.lora_disabled(model):
        base = analyze.activation_patching(model, CLEAN, corrupt, METRIC)
    assert (base - batched).abs().max() > 1e-3  # the LoRA acts in the patched runs


def codename_vector(model, layer, positions):
    """A steering vector at `layer` (hook_mlp_out) in a position mode; the codename: the last
    token (where the last layer's vector can still reach the metric)."""
    codenames = {"c": [CLEAN[-1].item()]} if positions == "codename" else None
    vector = steer.SteeringVector(model.cfg.d_model, [layer], positions=positions,
                                  codenames=codenames)
    g = torch.Generator().manual_seed(layer)
    with torch.no_grad():
        for param in vector.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 3.0)
    return vector


@pytest.mark.parametrize("positions", ["all", "from:3", "last", "codename"])
@pytest.mark.parametrize("layer", [0, 2])  # before and after most patches
def test_patching_with_a_steering_vector_equals_the_loop(tiny, positions, layer, one_layer_each):
    vector = codename_vector(tiny, layer, positions)
    corrupt = one_token_apart(4)
    with vector.apply(tiny):
        batched = analyze.activation_patching(tiny, CLEAN, corrupt, METRIC, "resid_pre",
                                              batch_size=8)
        loop = loop_grid(tiny, corrupt, CLEAN, "resid_pre", None)
        torch.testing.assert_close(batched, loop, rtol=0, atol=1e-5)
    unsteered = analyze.activation_patching(tiny, CLEAN, corrupt, METRIC, "resid_pre")
    assert (unsteered - batched).abs().max() > 1e-3  # the vector acts in the patched runs


@pytest.mark.parametrize("layer", [0, 2])
def test_patching_under_a_callers_hook_equals_the_loop(tiny, layer, one_layer_each, forwards):
    """A hook without a forward pre-hook (a steering vector added by hand): patched runs start at
    their layer, but over whole sequences (the hook may assume them)."""
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(13)) * 3.0
    steering = [(f"blocks.{layer}.hook_mlp_out", lambda x, hook: x + v)]
    corrupt = one_token_apart(4)
    with tiny.hooks(steering):
        batched = analyze.activation_patching(tiny, CLEAN, corrupt, METRIC, "attn_out")
        loop = loop_grid(tiny, corrupt, CLEAN, "attn_out", None)
    torch.testing.assert_close(batched, loop, rtol=0, atol=1e-5)
    assert forwards and all(start == 0 for _, start, _ in forwards)
    assert {layer for layer, _, _ in forwards} == set(range(tiny.cfg.n_layers))
    unsteered = analyze.activation_patching(tiny, CLEAN, corrupt, METRIC, "attn_out")
    assert (unsteered - batched).abs().max() > 1e-3


def test_first_change_by_hand():
    hook = "blocks.1.attn.hook_z"
    target = torch.zeros(1, T, 4, 2)  # (1, T, n_heads, d_head)
    source = target.clone()
    source[0, 4, 1, 0] = 1.0  # position 4, head 1
    run = analyze.Trace(None, None, {hook: target}, [])
    changed = analyze.changed_positions({hook: source}, run)
    assert analyze.first_change(analyze.Patch(hook, (1, 4, 6)), changed) == 4
    assert analyze.first_change(analyze.Patch(hook, (6, 1, 4)), changed) == 4
    assert analyze.first_change(analyze.Patch(hook, (1, 2, 5)), changed) is None
    assert analyze.first_change(analyze.Patch(hook, (1, 4), head=1), changed) == 4
    assert analyze.first_change(analyze.Patch(hook, (1, 4), head=0), changed) is None


def test_plan_forwards_runs_every_patch_once_in_batches_from_their_lowest_layer(tiny):
    starts = [(layer, p, 7 * layer + p) for layer in range(3) for p in range(7) if p >= layer]
    forwards = analyze.plan_forwards(tiny, starts, T, batch_size=4)
    indices = sorted(i for _, _, rows in forwards for i in rows)
    assert indices == sorted(i for _, _, i in starts)
    by_index = {i: (layer, p) for layer, p, i in starts}
    for layer, start, rows in forwards:
        assert len(rows) <= 4
        assert all(by_index[i][0] >= layer and by_index[i][1] >= start for i in rows)
        assert start in [by_index[i][1] for i in rows] and layer in [by_index[i][0] for i in rows]



# -----------------------------------------------------------------------------
# Attribution patching


LINEAR_FROM = {  # site -> the last block's output weights zeroed, so that from the site on the
    # model is linear (up to the final norm's scale, which the test freezes): those modules output
    # their bias alone
    "resid_pre": ["attn.o_proj", "mlp.down_proj"],
    "attn_out": ["mlp.down_proj"],
    "head": ["mlp.down_proj"],
    "hook_resid_mid": ["mlp.down_proj"],
    "mlp_out": [],
}


def linear_in_last_block(model, site):
    for path in LINEAR_FROM[site]:
        model.blocks[-1].get_submodule(path).weight.zero_()
    return model


def frozen_final_scale(model, tokens):
    """A hook that fixes the final norm's divisor to the target run's: the norm becomes affine."""
    _, acts = model.run_with_cache(tokens[None], names_filter="ln_final.hook_scale")
    scale = acts["ln_final.hook_scale"]  # (1, T, 1)
    return [("ln_final.hook_scale", lambda x, hook: scale.expand_as(x))]


@pytest.mark.parametrize("site", list(LINEAR_FROM))
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_equals_exact_patching_where_the_model_is_linear(site, direction):
    model = linear_in_last_block(tiny_model("gpt2", seed=3), site)
    target = CORRUPT if direction == "denoise" else CLEAN
    spans = [[1, 3, 6]] if site == "head" else [[p] for p in range(T)] + [[1, 3, 6]]
    with model.hooks(frozen_final_scale(model, target)):
        exact = analyze.activation_patching(model, CLEAN, CORRUPT, METRIC, site, spans, direction)
        estimate = analyze.attribution_patching(model, CLEAN, CORRUPT, METRIC, site, spans,
                                                direction)
    last = model.cfg.n_layers - 1  # linear from the site in the last block on
    torch.testing.assert_close(estimate[last], exact[last], rtol=1e-4, atol=1e-4)
    assert (exact[last] - metric_of(model, target)).abs().max() > 1e-2
    assert analyze.correlation(exact[last], estimate[last]) > 0.9999


def test_attribution_is_the_first_order_term_by_hand(tiny):
    # d metric / d resid_pre at the last layer by finite differences along (corrupt - clean)
    name = f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_pre"
    clean = analyze.cache_site(tiny, CLEAN, "resid_pre")[name]
    corrupt = analyze.cache_site(tiny, CORRUPT, "resid_pre")[name]
    step = 1e-3
    moved = clean.clone()
    moved[:, 4] += step * (corrupt - clean)[:, 4]
    with torch.no_grad():
        nudged = METRIC(tiny.run_with_hooks(CLEAN[None], [(name, lambda x, hook: moved)])).item()
    by_hand = (nudged - metric_of(tiny, CLEAN)) / step
    estimate = analyze.attribution_patching(tiny, CLEAN, CORRUPT, METRIC, "resid_pre",
                                            direction="noise")
    attribution = estimate[-1, 4].item() - metric_of(tiny, CLEAN)
    assert abs(attribution - by_hand) < 1e-2 * max(1, abs(by_hand))


# -----------------------------------------------------------------------------
# Reading a steering vector


def tiny_eval_sets(n_items=6, n_options=3):
    """One eval set of random prompts whose options are single tokens."""
    g = torch.Generator().manual_seed(11)
    items = []
    for i in range(n_items):
        prompt = torch.randint(0, VOCAB, (4 + i % 3,), generator=g).tolist()
        options = [[o] for o in torch.randperm(VOCAB, generator=g)[:n_options].tolist()]
        items.append(tasks.Item(prompt, options, answer=i % n_options))
    return {"set": tasks.EvalSet("set", items, chance=1 / n_options)}


def random_vector(model, layers=(1,), hook="hook_mlp_out", scale=3.0, seed=4):
    vector = steer.SteeringVector(model.cfg.d_model, layers, hook=hook)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vector.layers:
            vector.directions[str(layer)].copy_(torch.randn(model.cfg.d_model, generator=g) * scale)
    return vector


def logits_with(model, vector, tokens):
    with torch.no_grad(), vector.apply(model):
        return model(tokens[None])


def test_vector_logits_by_hand(tiny):
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(5))
    out = analyze.vector_logits(tiny, v, resid_scale=2.5)
    W, w = tiny.unembed.weight, tiny.ln_final.weight  # (vocab, d_model), (d_model,)
    torch.testing.assert_close(out["direct"], W @ v)
    centred = v - v.mean() if tiny.cfg.arch == "gpt2" else v  # LayerNorm centres, RMSNorm not
    torch.testing.assert_close(out["final_norm"], W @ (w * centred / 2.5))
    # norm_scale of the last residual stream is what the final norm divides it by, eps aside
    last = f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_post"
    _, acts = tiny.run_with_cache(CLEAN[None], names_filter=[last, "ln_final.hook_scale"])
    torch.testing.assert_close(analyze.norm_scale(tiny, acts[last]),
                               acts["ln_final.hook_scale"][..., 0], rtol=1e-4, atol=1e-4)


def test_sparsifying_at_100_percent_changes_nothing_and_at_0_removes_the_effect(tiny):
    vector = random_vector(tiny)
    base = tiny(CLEAN[None])
    scores = vector.directions["1"].detach().abs()
    full = analyze.sparsified(vector, {1: analyze.top_dimensions(scores, 100)})
    none = analyze.sparsified(vector, {1: analyze.top_dimensions(scores, 0)})
    assert torch.equal(logits_with(tiny, full, CLEAN), logits_with(tiny, vector, CLEAN))
    assert torch.equal(logits_with(tiny, none, CLEAN), base)
    assert (logits_with(tiny, vector, CLEAN) - base).abs().max() > 1e-2  # there is an effect
    sets = tiny_eval_sets()
    curve = analyze.sparsification(tiny, vector, sets, [100, 10, 0])
    with vector.apply(tiny):
        steered = tasks.evaluate(tiny, sets)
    for ranking in ("magnitude", "attribution"):
        assert curve[ranking][100] == steered and curve[ranking][0] == tasks.evaluate(tiny, sets)


def test_top_dimensions_keeps_the_largest_and_one_at_least():
    scores = torch.tensor([0.1, 5.0, -3.0, 2.0, 0.0, 4.0, 1.0, 0.5, 3.0, 0.2])
    assert analyze.top_dimensions(scores, 30).nonzero().flatten().tolist() == [1, 5, 8]
    assert analyze.top_dimensions(scores, 1).nonzero().flatten().tolist() == [1]
    assert analyze.top_dimensions(scores, 0).sum() == 0
    assert analyze.top_dimensions(scores, 100).all()


def test_attribution_of_a_dimension_is_its_first_order_effect(tiny):
    # the metric along v_i by finite differences: d metric / d v_i * v_i
    vector, sets = random_vector(tiny, scale=0.5), tiny_eval_sets()
    attribution = analyze.dimension_attributions(tiny, vector, sets)[1]  # (d_model,)

    def metric(v):
        moved = copy_with(vector, v)
        runs = lambda tokens: {"run": moved_logits(tiny, moved, tokens)}
        return analyze.scored_runs(tiny, sets["set"], runs)["run"]["metric"]

    v = vector.directions["1"].detach().clone()
    i = int(attribution.argmax())
    step = 1e-3
    nudged = v.clone()
    nudged[i] += step * v[i]
    by_hand = (metric(nudged) - metric(v)) / step
    assert abs(abs(by_hand) - attribution[i].item()) < 1e-2 * max(1, abs(by_hand))


def copy_with(vector, direction):
    moved = steer.SteeringVector(vector.d_model, vector.layers, hook=vector.hook)
    with torch.no_grad():
        moved.directions[str(vector.layers[0])].copy_(direction)
    return moved


def moved_logits(model, vector, tokens):
    with vector.apply(model):
        return model(tokens)


def test_freezing_attention_on_an_unsteered_run_changes_nothing(tiny):
    tokens = torch.stack([CLEAN, CORRUPT])  # (B, T)
    zero = steer.SteeringVector(tiny.cfg.d_model, [1])
    runs = analyze.frozen_attention_runs(tiny, zero, tokens)
    assert torch.equal(runs["frozen"], runs["base"])
    torch.testing.assert_close(runs["steered"], runs["base"], rtol=0, atol=1e-5)
    runs = analyze.frozen_attention_runs(tiny, random_vector(tiny, layers=(0,)), tokens)
    assert (runs["frozen"] - runs["steered"]).abs().max() > 1e-3  # later patterns did move
    assert (runs["frozen"] - runs["base"]).abs().max() > 1e-3  # and the residual path remains


def test_frozen_attention_where_the_vector_lands_after_the_last_attention_keeps_everything(tiny):
    # added to the last block's MLP output, the vector reaches no attention layer: freezing keeps
    # the whole effect
    last = tiny.cfg.n_layers - 1
    vector, sets = random_vector(tiny, layers=(last,), scale=20.0), tiny_eval_sets()
    result = analyze.frozen_attention(tiny, vector, sets)["set"]
    assert result["share"]["metric"] == pytest.approx(1.0, abs=1e-4)
    assert abs(result["steered"]["metric"] - result["base"]["metric"]) > 1e-2


def test_strength_sweep_at_coefficient_0_is_the_base_model(tiny):
    vector, sets = random_vector(tiny), tiny_eval_sets()
    sweep = analyze.strength_sweep(tiny, vector, sets, [-1.0, 0.0, 1.0])
    assert sweep[0.0] == tasks.evaluate(tiny, sets)
    with vector.apply(tiny, coeff=-1.0):
        assert sweep[-1.0] == tasks.evaluate(tiny, sets)
    with torch.no_grad(), vector.apply(tiny, coeff=0.0):
        assert torch.equal(tiny(CLEAN[None]), tiny.run_with_hooks(CLEAN[None]))


def test_scored_runs_agree_with_tasks_evaluate(tiny):
    sets = tiny_eval_sets()
    scored = analyze.scored_runs(tiny, sets["set"], lambda tokens: {"base": tiny(tokens)},
                                 batch_size=4)  # items never split across batches
    assert scored["base"]["accuracy"] == tasks.evaluate(tiny, sets)["set"]


# -----------------------------------------------------------------------------
# A vector's lens per layer and its effect along a continuation


class IdTokenizer:
    def decode(self, ids):
        return f"t{ids[0]}"


def test_vector_lens_rows_are_each_layers_final_norm_unembedding_by_hand(tiny):
    vector = random_vector(tiny, layers=(0, 2), hook="hook_resid_post")
    readout = {0: {"resid_scale": 2.0}, 2: {"resid_scale": 4.0}}
    values, labels = analyze.lens_matrix(tiny, IdTokenizer(), vector, readout, k=2)
    W, w = tiny.unembed.weight, tiny.ln_final.weight  # (vocab, d_model), (d_model,)
    rows = []
    for layer, scale in ((0, 2.0), (2, 4.0)):
        v = vector.directions[str(layer)]
        centred = v - v.mean() if tiny.cfg.arch == "gpt2" else v  # LayerNorm centres
        rows.append(W @ (w * centred / scale))  # (vocab,)
    ids = rows[0].topk(2).indices.tolist()
    ids += [i for i in rows[1].topk(2).indices.tolist() if i not in ids]
    assert labels == [f"t{i}" for i in ids]
    torch.testing.assert_close(values, torch.stack(rows)[:, ids])


def adaptive_vector(model, layers, hook, seed=5):
    """An adaptive vector with random directions and gates, so every scale differs."""
    vector = steer.SteeringVector(model.cfg.d_model, layers, hook=hook, positions="adaptive")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in (vector.directions, vector.gate_weight, vector.gate_bias):
            for p in params.values():
                p.copy_(torch.randn(p.shape, generator=g))
    return vector


@pytest.mark.parametrize("hook", ["hook_resid_pre", "hook_mlp_out"])
def test_adaptive_gates_are_the_scales_the_steered_forward_applies(tiny, hook):
    vector = adaptive_vector(tiny, (0, 1), hook)
    gates = analyze.adaptive_gates(tiny, vector, CLEAN.tolist())  # (2, T)
    # by hand: layer 0's gate reads the unsteered stream; layer 1's, the stream layer 0 steered
    reads = {"hook_resid_pre": ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"],
             "hook_mlp_out": ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]}[hook]
    with torch.no_grad():
        _, base = tiny.run_with_cache(CLEAN[None], names_filter=reads[0])
        with vector.apply(tiny):
            _, steered = tiny.run_with_cache(CLEAN[None], names_filter=reads[1])
    for row, (layer, r) in enumerate([(0, base[reads[0]]), (1, steered[reads[1]])]):
        w, b = vector.gate_weight[str(layer)], vector.gate_bias[str(layer)]
        want = 2 * torch.sigmoid(r[0] @ w + b)  # (T,)
        torch.testing.assert_close(gates[row], want.detach())
    assert gates.std() > 0.1  # the scales differ: a wrong site would show


def test_continued_mask_stops_after_the_first_end_id():
    new = torch.tensor([[5, 1, 1, 1], [1, 1, 1, 1], [5, 6, 7, 8]])  # end id 1
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(analyze.continued_mask(new, (1,)), expected)
    assert analyze.continued_mask(new, ()).all()


def hand_kl(model, vector, prompt, n_new):
    """The definition, one prompt, no KV cache: greedy steered tokens one at a time, and
    KL(steered || base) of each next-token distribution."""
    seq, kls = list(prompt), []
    for _ in range(n_new):
        tokens = torch.tensor([seq])
        with torch.no_grad():
            base = model(tokens)[0, -1].log_softmax(-1)
            with vector.apply(model):
                steered = model(tokens)[0, -1].log_softmax(-1)
        kls.append((steered.exp() * (steered - base)).sum().item())
        seq.append(steered.argmax().item())
    return kls


def test_kl_per_position_equals_the_definition_and_is_zero_without_a_vector(tiny):
    prompts = [p.prompt for p in tiny_eval_sets()["set"].items]  # lengths 4, 5 and 6
    vector = random_vector(tiny, layers=(0, 2), hook="hook_resid_post", scale=1.0)
    kl, valid = analyze.continuation_kl(tiny, vector, prompts, n_new=4)  # (P, 4)
    assert valid.all()
    expected = torch.tensor([hand_kl(tiny, vector, p, 4) for p in prompts])
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-5)
    assert (kl > 0).all()
    zero = analyze.sparsified(vector, {0: torch.zeros(16, dtype=torch.bool),
                                       2: torch.zeros(16, dtype=torch.bool)})
    zero_kl, _ = analyze.continuation_kl(tiny, zero, prompts, n_new=4)
    assert zero_kl.abs().max() < 1e-6


def test_a_layer_alone_is_that_layers_vector(tiny):
    vector = random_vector(tiny, layers=(0, 2), hook="hook_resid_post")
    alone = analyze.layer_alone(vector, 2)
    only = random_vector(tiny, layers=(2,), hook="hook_resid_post")
    with torch.no_grad():
        only.directions["2"].copy_(vector.directions["2"])
    torch.testing.assert_close(logits_with(tiny, alone, CLEAN), logits_with(tiny, only, CLEAN))
    profiles = analyze.kl_profiles(tiny, vector, [CLEAN.tolist()], n_new=3)
    assert list(profiles) == ["all", 0, 2]
    assert profiles["all"]["prompts"] == [1, 1, 1]


def test_position_means_skip_prompts_past_their_end():
    kl = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    valid = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    means = analyze.position_means(kl, valid)
    assert means == [2.0, 2.0, None]
    assert analyze.first_token_share(means) == 0.5



def test_vectors_applied_together_are_one_vector_with_both_layers(tiny):
    both = random_vector(tiny, layers=(0, 2), hook="hook_resid_post")
    apart = [analyze.layer_alone(both, 0), analyze.layer_alone(both, 2)]
    with torch.no_grad():
        with analyze.all_applied(tiny, apart):
            together = tiny(CLEAN[None])
    torch.testing.assert_close(together, logits_with(tiny, both, CLEAN))
    sets = tiny_eval_sets()
    scores = analyze.combined_accuracy(tiny, {"a": apart[0], "b": apart[1]}, sets)
    with both.apply(tiny):
        assert scores["combined"] == tasks.evaluate(tiny, sets)
    with apart[1].apply(tiny):
        assert scores["b"] == tasks.evaluate(tiny, sets)
    base = scores["base"]["set"]
    expected = base + (scores["a"]["set"] - base) + (scores["b"]["set"] - base)
    assert scores["sum_of_effects"]["set"] == pytest.approx(expected)


def test_combine_scores_each_run_as_it_scored_itself(runs, tmp_path):
    analyze.main(["combine", "--run", runs["steer"], "--runs", runs["steer1"], "--out",
                  str(tmp_path)])
    record = written(str(tmp_path), "combine")
    for name in ("steer", "steer1"):
        with open(os.path.join(runs[name], "metrics.json")) as f:
            final = json.load(f)["eval"]["final"]
        assert record["accuracy"][runs[name]] == train.claim_sets(final)
    assert record["layers"] == {runs["steer"]: [2], runs["steer1"]: [1]}


# -----------------------------------------------------------------------------
# LoRA vs steering


def constant_lora(model, layer, c):
    """A LoRA on block `layer`'s down_proj that reads one MLP neuron, which a hook holds at 1:
    the LoRA then adds exactly c at every token. -> the hook."""
    lora.attach_lora(model, targets=("down_proj",), layers=[layer], r=2, alpha=2)
    adapter, neuron = model.blocks[layer].mlp.down_proj, 5
    with torch.no_grad():
        adapter.lora_A.weight.zero_()
        adapter.lora_A.weight[0, neuron] = 1.0
        adapter.lora_B.weight.zero_()
        adapter.lora_B.weight[:, 0] = c / adapter.scaling

    def hold(post, hook):
        post = post.clone()
        post[..., neuron] = 1.0
        return post

    return [(f"blocks.{layer}.mlp.hook_post", hold)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_constant_lora_is_its_own_natural_vector(arch):
    model, layer = tiny_model(arch, seed=8), 1
    c = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(9))
    hold = constant_lora(model, layer, c)
    batches = analyze.prompt_batches([CLEAN.tolist(), CORRUPT[:4].tolist()])  # 11 tokens
    with model.hooks(hold):
        diffs = steer.lora_token_diffs(model, batches, layer)  # (11, d_model)
        natural = steer.lora_natural_vector(model, batches, layer).directions[str(layer)]
    torch.testing.assert_close(diffs, c.expand_as(diffs), rtol=1e-4, atol=1e-5)
    cos = analyze.abs_cos(diffs)
    torch.testing.assert_close(cos, torch.ones(11, 11), rtol=0, atol=1e-5)
    stats = analyze.diff_stats(diffs, natural.detach())
    assert stats["pc1_share"] == pytest.approx(1.0, abs=1e-6)
    assert stats["mean_abs_cos"] == pytest.approx(1.0, abs=1e-5)
    assert stats["mean_abs_cos_pc1"] == pytest.approx(1.0, abs=1e-5)
    assert stats["n_tokens"] == 11
    torch.testing.assert_close(natural.detach(), c, rtol=1e-4, atol=1e-5)


def test_diff_stats_of_two_orthogonal_directions_by_hand():
    # 3 tokens along e0 with norm 2, 1 along e1 with norm 1: PC1 = e0, share 12 / 13
    diffs = torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [-2.0, 0, 0], [0, 1.0, 0]])
    stats = analyze.diff_stats(diffs, torch.tensor([1.0, 0, 0]))
    assert stats["pc1_share"] == pytest.approx(12 / 13)
    assert stats["mean_abs_cos"] == pytest.approx(6 / 12)  # 6 of the 12 ordered pairs: |cos| 1
    assert stats["mean_abs_cos_pc1"] == pytest.approx(3 / 4)
    assert stats["mean_norm"] == pytest.approx(7 / 4)


def test_sign_split_per_token_by_hand():
    projections = torch.tensor([1.0, -2.0, 3.0, -1.0])
    ids = torch.tensor([5, 5, 7, 8])
    per_token, shares = analyze.sign_split(projections, ids, seen={5})
    assert per_token[5] == {"seen": True, "positive": 1, "negative": 1, "mean": -0.5}
    assert per_token[7] == {"seen": False, "positive": 1, "negative": 0, "mean": 3.0}
    assert shares == {"seen": 0.5, "never_seen": 0.5}


# -----------------------------------------------------------------------------
# A steering vector in an SAE's features


def sae_with_rows(rows, hook="blocks.1.hook_resid_post", activation="relu"):
    """An SAE whose decoder rows are `rows` (d_sae, d_in) and whose encoder is their transpose."""
    d_sae, d_in = rows.shape
    s = sae.SAE(sae.SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=2,
                              hook_name=hook))
    with torch.no_grad():
        s.W_dec.copy_(rows)
        s.W_enc.copy_(rows.T)
        s.b_enc.zero_()
        s.b_dec.zero_()
    return s


def test_sparse_fit_of_a_sum_of_two_decoder_rows_by_hand():
    rows = torch.cat([torch.eye(4), torch.tensor([[0.5 ** 0.5, 0, 0, 0.5 ** 0.5]])])  # (5, 4)
    s = sae_with_rows(rows)
    v = torch.tensor([0.0, 2.0, 3.0, 0.0])  # 2 e1 + 3 e2
    cos = analyze.decoder_cosines(s, v)
    torch.testing.assert_close(cos, torch.tensor([0, 2, 3, 0, 0]) / 13 ** 0.5)
    one, two = analyze.sparse_fit(s, v, 1), analyze.sparse_fit(s, v, 2)
    assert one["features"] == [2] and one["unexplained"] == pytest.approx(4 / 13)
    assert two["features"] == [2, 1] and two["unexplained"] == pytest.approx(0, abs=1e-6)
    assert two["coefficients"] == pytest.approx([3, 2], abs=1e-5)


def test_the_vector_is_read_where_it_lands():
    vector = steer.SteeringVector(8, layers=[1, 2], hook="hook_mlp_out")
    with torch.no_grad():
        vector.directions["1"].fill_(1.0)
        vector.directions["2"].fill_(2.0)
    assert analyze.vector_at(vector, "blocks.1.hook_resid_post")[0] == 1.0  # block 1's output
    assert analyze.vector_at(vector, "blocks.2.hook_mlp_out")[0] == 2.0  # where it is added
    assert analyze.vector_at(vector, "blocks.0.hook_resid_post") is None
    assert analyze.vector_at(vector, "blocks.2.hook_resid_pre") is None  # before block 2 adds it


def test_activation_change_by_hand(tiny):
    layer, hook = 1, "blocks.1.hook_resid_post"
    d = tiny.cfg.d_model
    g = torch.Generator().manual_seed(3)
    s = sae_with_rows(torch.nn.functional.normalize(torch.randn(24, d, generator=g), dim=-1),
                      hook=hook)
    vector = steer.SteeringVector(d, layers=[layer], hook="hook_resid_post")
    with torch.no_grad():
        vector.directions[str(layer)].copy_(torch.randn(d, generator=g))
    subject = analyze.Subject(tiny, None, "tiny", adapter="steer",
                              adapter_on=lambda: vector.apply(tiny), vector=vector)
    prompts = [CLEAN.tolist(), CORRUPT[:4].tolist()]
    change = analyze.activation_change(subject, s, prompts)
    by_hand, streams = {}, {}
    for adapted in (False, True):
        feats, lasts, xs = [], [], []
        for p in prompts:
            with subject.state(adapted):
                _, acts = tiny.run_with_cache(torch.tensor([p]), names_filter=hook)
            f = torch.relu(acts[hook][0] @ s.W_enc.detach())  # (T, d_sae): zero biases
            feats.append(f[1:])  # position 0 (BOS) is not read, as the SAE never trains on it
            lasts.append(f[-1])
            xs.append(acts[hook][0, 1:])
        by_hand[adapted] = (torch.cat(feats).mean(0), torch.stack(lasts).mean(0))
        streams[adapted] = torch.cat(xs)
    for where, i in (("all_tokens", 0), ("last_token", 1)):
        torch.testing.assert_close(change[where]["base"], by_hand[False][i], atol=1e-5, rtol=0)
        torch.testing.assert_close(change[where]["steered"], by_hand[True][i], atol=1e-5, rtol=0)
    assert (change["all_tokens"]["steered"] - change["all_tokens"]["base"]).abs().max() > 1e-2
    assert change["n_tokens"] == 9  # 7 + 4 tokens, less the two BOS positions
    # a vector added at the hook itself moves every token by exactly the vector
    diffs = streams[True] - streams[False]
    torch.testing.assert_close(change["mean_diff"], diffs.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(change["mean_diff"], vector.directions[str(layer)].detach(),
                               atol=1e-5, rtol=0)
    assert change["diff_coherence"] == pytest.approx(1.0, abs=1e-5)


def test_sae_features_finds_a_vector_planted_as_a_decoder_row(runs, tmp_path):
    """The run's own vector written into an SAE's decoder: its row is the top cosine (1.0) and
    one feature rebuilds the vector."""
    subject = analyze.load_run(runs["steer"])
    v = subject.vector.directions["2"].detach()
    trained = sae.load_sae(runs["sae"])
    with torch.no_grad():
        trained.W_dec[7] = v / v.norm()
    record = analyze.sae_features(subject, trained, [[1, 2]])
    assert record["decoder"][0]["feature"] == 7
    assert record["decoder"][0]["cos"] == pytest.approx(1.0, abs=1e-5)
    assert record["sparse_fit"][1]["unexplained"] == pytest.approx(0, abs=1e-5)
    assert record["sparse_fit"][1]["random_unexplained"] > 0.1


def test_sae_features_reads_a_lora_run_as_its_mean_token_difference(runs):
    """A one-layer LoRA at block 2: what it writes into the SAE's stream, adapter on minus off at
    each prompt token after BOS, averaged by hand; its decoder cosines and 1-feature fit."""
    subject = analyze.load_run(runs["lora1"])
    s = sae.load_sae(runs["sae"])
    prompts = [item.prompt for item in subject.eval_sets["oocr"].items]
    hook = s.cfg.hook_name
    diffs = []
    for p in prompts:
        x = {}
        for adapted in (False, True):
            with subject.state(adapted):
                _, acts = subject.model.run_with_cache(torch.tensor([p]), names_filter=hook)
            x[adapted] = acts[hook][0, 1:]  # (T - 1, d)
        diffs.append(x[True] - x[False])
    mean_diff = torch.cat(diffs).mean(0)  # (d,)
    record = analyze.sae_features(subject, s, prompts)
    assert record["direction_source"] == "mean_diff" and record["adapter"] == "lora"
    assert record["vector_norm"] == pytest.approx(mean_diff.norm().item(), rel=1e-4)
    rows = s.W_dec.detach()
    by_hand = rows @ mean_diff / (rows.norm(dim=1) * mean_diff.norm())  # (d_sae,)
    torch.testing.assert_close(torch.tensor(record["cosines"]), by_hand, atol=1e-5, rtol=0)
    best = by_hand.abs().max().item()  # one unit row: its fit leaves 1 - cos^2 unexplained
    assert record["sparse_fit"][1]["unexplained"] == pytest.approx(1 - best ** 2, abs=1e-4)
    assert 0 < record["diff_coherence"] <= 1


def test_top_activations_equal_a_sort_of_every_activation(tiny):
    """Each feature's largest activations over ragged sequences read in chunks of 2 rows, against
    all activations computed one sequence at a time and sorted; position 0 never counts."""
    g = torch.Generator().manual_seed(5)
    s = sae_with_rows(torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1),
                      hook="blocks.1.hook_resid_post")
    with torch.no_grad():
        s.b_enc.fill_(20.0)  # every activation positive: no ties at zero to order arbitrarily
    seqs = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 7, 5, 4)]
    corpus = sae.corpus_of_sequences(seqs)
    values, rows, positions = analyze.top_activations(tiny, s, corpus, 3, max_tokens=14)
    every = []  # (activation, row, position) per feature
    for r, seq in enumerate(seqs):
        _, acts = tiny.run_with_cache(torch.tensor([seq]), names_filter=s.cfg.hook_name)
        f = torch.relu(acts[s.cfg.hook_name][0] @ s.W_enc.detach() + 20.0)  # (T, 12)
        every += [(f[t], r, t) for t in range(1, len(seq))]
    for i in range(12):
        expected = sorted(((f[i].item(), r, t) for f, r, t in every), reverse=True)[:3]
        assert values[:, i].tolist() == pytest.approx([v for v, _, _ in expected], abs=1e-5)
        assert [(int(rows[j, i]), int(positions[j, i])) for j in range(3)] == \
            [(r, t) for _, r, t in expected]


def test_context_text_marks_the_token_and_cuts_its_context():
    tokenizer = toy.ToyTokenizer(["PAD", "BOS", "A", "B", "C"])
    tokens = torch.tensor([1, 2, 3, 4, 2, 3])
    assert analyze.context_text(tokenizer, tokens, 4, before=2, after=1) == "... B C [[A]] B"
    assert analyze.context_text(tokenizer, tokens, 1, before=2, after=0) == "BOS [[A]]"


@pytest.mark.parametrize("world_name", ["PersonaWorld", "LatinPersonaWorld"])
def test_document_personas_match_the_generators_draws(world_name):
    """The persona read off a document's name and attribute segments against the persona the
    generator drew for it (the first draw of its chunk, toy.PersonaWorld.draw_documents)."""
    import toy
    world = getattr(toy, world_name)(seed=3, n_docs=400)
    tokens = world.pretrain_tokens().long()  # (400, 32)
    drawn = torch.randint(world.n_personas, (400, 1),
                          generator=torch.Generator().manual_seed(3))[:, 0]
    read = analyze.document_personas(world, tokens)
    named = read >= 0
    assert named.float().mean() > 0.95  # nearly every document has a name or attribute segment
    assert torch.equal(read[named], drawn[named])
    queries = analyze.query_mask(world, tokens)
    names = {world.tokenizer.names[t] for t in tokens[queries].tolist()}
    assert names == {"ME"} | {f"AT{t}" for t in range(world.n_attribute_types)}


def test_aurocs_count_pairs_by_hand():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 4, (40, 3), generator=g).float()  # many ties
    y = torch.rand(40, generator=g) < 0.4
    got = analyze.aurocs(analyze.average_ranks(x), y)
    for j in range(3):
        pos, neg = x[y, j], x[~y, j]
        wins = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
        assert got[j].item() == pytest.approx(wins.mean().item(), abs=1e-6)


def test_probe_curve_finds_a_planted_unit_and_is_chance_on_shuffled_labels():
    """Unit 2 carries persona 1 (plus noise); the others are noise. With shuffled labels no unit
    carries anything: held-out accuracy near 0.5."""
    g = torch.Generator().manual_seed(4)
    personas = torch.randint(0, 2, (600,), generator=g)
    x = torch.randn(600, 5, generator=g)
    x[:, 2] += 3.0 * personas  # separable at about 93% (threshold 1.5, noise 1)
    test = torch.arange(600) % 4 == 0
    curve = analyze.probe_curve(x, personas, test, 2, sizes=(1, 2))
    assert curve["best_unit"] == [2, 2]
    assert min(curve["accuracy"]["1"]) > 0.88
    shuffled = personas[torch.randperm(600, generator=g)]
    null = analyze.probe_curve(x, shuffled, test, 2, sizes=(1,))
    assert abs(sum(null["accuracy"]["all"]) / 2 - 0.5) < 0.1


def test_selectivity_and_persona_fits_by_hand():
    means = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])  # (K=2, 3 features)
    assert analyze.selectivity(means).tolist() == pytest.approx([0.5, 1.0, 0.0])
    s = sae_with_rows(torch.eye(4))  # unit rows e0..e3
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.7]])  # persona 0: e0, e1
    v = torch.tensor([3.0, 4.0, 0.0, 0.0])  # in persona 0's two features
    fits = analyze.persona_fits(s, v, scores, 0, torch.arange(4), sizes=(1, 2))
    assert fits[1]["target"] == pytest.approx(3 / 5) and fits[2]["target"] == pytest.approx(1.0)
    assert fits[2]["target_coefficients"] == pytest.approx([3, 4], abs=1e-5)
    assert fits[2]["other_personas"] == pytest.approx([0.0], abs=1e-6)  # e2, e3: orthogonal
    assert fits[1]["most_aligned"] == pytest.approx(4 / 5)  # e1 alone


def test_persona_analyses_refuse_other_worlds():
    subject = analyze.Subject(None, None, "x", task=object(),
                              config=train.TrainConfig(task="twohop"))
    with pytest.raises(analyze.AnalysisError, match="reads a persona world.*'twohop'"):
        analyze.persona_world(subject, "sae_personas")


def test_sae_features_on_a_lora_run_from_the_command_line(runs, tmp_path, capsys):
    analyze.main(["sae_features", "--run", runs["lora1"], "--sae", runs["sae"], "--out",
                  str(tmp_path), "--sets", "oocr"])
    record = written(str(tmp_path), "sae_features")
    assert record["direction_source"] == "mean_diff" and record["vector_hook"] is None
    assert "the lora run's mean token difference" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Bad input in the functions: a ValueError subclass with one line


@pytest.mark.parametrize("call", [
    lambda m: analyze.activation_patching(m, CLEAN, CORRUPT[:-1], METRIC),
    lambda m: analyze.attribution_patching(m, CLEAN, CORRUPT[:-1], METRIC),
    lambda m: analyze.activation_patching(m, CLEAN, CORRUPT, METRIC, site="hook_nonsense"),
    lambda m: analyze.activation_patching(m, CLEAN, CORRUPT, METRIC, site="attn.hook_pattern"),
    lambda m: analyze.activation_patching(m, CLEAN, CORRUPT, METRIC, spans=[[0, T]]),
    lambda m: analyze.activation_patching(m, CLEAN, CORRUPT, METRIC, site="head",
                                          spans=[[0], [1]]),
    lambda m: analyze.activation_patching(m, CLEAN, CORRUPT, METRIC, direction="sideways"),
])
def test_bad_input_is_a_one_line_value_error(tiny, call):
    with pytest.raises(analyze.AnalysisError) as error:
        call(tiny)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


# -----------------------------------------------------------------------------
# Run directories, end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{adapter: run directory}: 5 steps each from the shipped toy model (no pretraining)."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for adapter in ("steer", "lora", "full"):
        out[adapter] = str(tmp / adapter)
        train.run(train.TrainConfig(adapter=adapter, out=out[adapter], steps=5, random_draws=0,
                                    cache_dir=str(tmp / "cache")))
    out["steer1"] = str(tmp / "steer1")  # beside the steering run's block 2: combine
    train.run(train.TrainConfig(adapter="steer", layers=[1], out=out["steer1"], steps=5,
                                random_draws=0, cache_dir=str(tmp / "cache")))
    out["adaptive"] = str(tmp / "adaptive")  # adaptive_scale
    train.run(train.TrainConfig(adapter="steer", positions="adaptive", out=out["adaptive"],
                                steps=5, random_draws=0, cache_dir=str(tmp / "cache")))
    out["lora1"] = str(tmp / "lora1")  # at the steering run's layer: the middle block of 4
    train.run(train.TrainConfig(adapter="lora", layers=[2], out=out["lora1"], steps=5,
                                random_draws=0, cache_dir=str(tmp / "cache")))
    out["sae"] = str(tmp / "sae")  # where the steering vector lands: block 2's output
    sae.run(sae.RunConfig(steps=20, batch_tokens=512, eval_seqs=32, threads=1, out=out["sae"]))
    for name, d_in, hook, trained_on in (
            ("narrow_sae", 16, "blocks.2.hook_resid_post", ""),
            ("deep_sae", 64, "blocks.9.hook_resid_post", ""),
            ("other_world_sae", 64, "blocks.2.hook_resid_post", "toy:persona:seed1")):
        out[name] = str(tmp / name)
        sae.save_sae(sae.SAE(sae.SAEConfig(d_in=d_in, d_sae=32, k=4, hook_name=hook,
                                           model_name=trained_on)), out[name])
    return out


@pytest.mark.parametrize("adapter", ["steer", "lora", "full"])
def test_a_run_directory_becomes_the_runs_model(runs, adapter):
    subject = analyze.load_run(runs[adapter])
    with open(os.path.join(runs[adapter], "metrics.json")) as f:
        metrics = json.load(f)
    tokens = torch.tensor([subject.eval_sets["oocr_in_context"].items[0].prompt])
    with torch.no_grad():
        base = subject.model(tokens)
        with subject.state(adapted=True):
            tuned = subject.model(tokens)
            assert tasks.evaluate(subject.model, subject.eval_sets) == metrics["eval"]["final"]
        assert torch.equal(subject.model(tokens), base)  # switched off again on exit
    assert tasks.evaluate(subject.model, subject.eval_sets) == metrics["eval"]["base"]
    assert (tuned - base).abs().max() > 1e-4
    assert [view for view, _ in subject.views()] == ["base", adapter]


def written(out, name):
    png, data = os.path.join(out, f"{name}.png"), os.path.join(out, f"{name}.json")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(data) as f:
        return json.load(f)


COMMANDS = {
    "logit_lens": ["--eval", "oocr", "--item", "1"],
    "attention": ["--eval", "in_distribution", "--item", "2", "--layers", "0,3"],
    "patching": ["--eval", "in_distribution", "--item", "0", "--span", "2,3", "--span", "1",
                 "--site", "resid_pre,mlp_out,hook_resid_mid"],
    "attribution": ["--eval", "oocr_in_context", "--item", "0", "--direction", "noise"],
    "read_vector": ["--coefficients", "0,1", "--keep", "100,10,0"],
    "lora_vs_steering": ["--steer-run", "{steer}", "--unrelated", "4"],
    "sae_features": ["--sae", "{sae}", "--sets", "oocr,in_distribution"],
    "sae_top_contexts": ["--sae", "{sae}", "--sequences", "100", "--n-features", "2",
                         "--top", "3"],
    "sae_personas": ["--sae", "{sae}", "--sequences", "300"],
    "sae_vs_neurons": ["--sae", "{sae}", "--sequences", "300"],
    "vector_lens": ["--prompts", "6", "--new-tokens", "3", "--top-k", "3"],
    "combine": ["--runs", "{steer1}", "--sets", "oocr"],
    "adaptive_scale": ["--prompts", "3", "--new-tokens", "2"],
}
# the run each subcommand reads (default: steer)
RUN_OF = {"lora_vs_steering": "lora1", "adaptive_scale": "adaptive"}


@pytest.mark.parametrize("name", list(analyze.ANALYSES))
def test_every_subcommand_writes_its_png_and_json(runs, name, tmp_path, capsys):
    argv = [a.format(**runs) for a in COMMANDS[name]]
    analyze.main([name, "--run", runs[RUN_OF.get(name, "steer")], "--out", str(tmp_path), *argv])
    record = written(str(tmp_path), name)
    assert record["analysis"] == name
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path}/{name}.png" in printed


def test_default_output_is_the_run_directory(runs):
    analyze.main(["logit_lens", "--run", runs["lora"]])
    record = written(os.path.join(runs["lora"], "analysis"), "logit_lens")
    assert set(record["views"]) == {"base", "lora"}
    final = record["views"]["lora"]["prob"][-1]
    assert len(final) == len(record["prompt"]["tokens"]) == 2  # BOS ME


def test_patching_records_raw_metrics_of_every_site(runs, tmp_path):
    analyze.main(["patching", "--run", runs["full"], "--out", str(tmp_path), "--eval",
                  "in_distribution"])
    record = written(str(tmp_path), "patching")
    assert set(record["sites"]) == {"resid_pre", "attn_out", "mlp_out", "head"}
    assert record["clean"]["labels"] == ["BOS", "CH", "O7", "O9"]
    assert record["corrupt"]["labels"] == ["BOS", "CH", "O4", "O10"]  # the next item, new answer
    corrupt = record["corrupt_metric"]
    for site in ("resid_pre", "attn_out", "mlp_out"):
        grid = torch.tensor(record["sites"][site]["metric"])  # (n_layers, T)
        assert grid.shape == (4, 4)
        # the prompts agree on positions 0-1, and causal attention keeps them equal there
        assert torch.allclose(grid[:, :2], torch.tensor(corrupt), atol=1e-4)
        assert (grid[:, 2:] - corrupt).abs().max() > 1e-2
    assert torch.tensor(record["sites"]["head"]["metric"]).shape == (4, 4)  # (n_layers, n_heads)


def test_adapter_contrast_patches_the_adapter_into_the_base_run(runs, tmp_path):
    analyze.main(["patching", "--run", runs["steer"], "--out", str(tmp_path), "--eval", "oocr",
                  "--contrast", "adapter", "--site", "resid_pre", "--span", "0-1"])
    record = written(str(tmp_path), "patching")
    assert record["clean"]["adapter"] and not record["corrupt"]["adapter"]
    assert record["clean"]["tokens"] == record["corrupt"]["tokens"]
    resid = torch.tensor(record["sites"]["resid_pre"]["metric"])[:, 0]  # (n_layers,)
    # the vector is added at block 2's MLP output: blocks 0-2's inputs do not hold it, block 3's
    # input at every position holds all of it
    assert torch.allclose(resid[:3], torch.tensor(record["corrupt_metric"]), atol=1e-4)
    assert abs(resid[3].item() - record["clean_metric"]) < 1e-4
    assert abs(record["clean_metric"] - record["corrupt_metric"]) > 1e-2


def test_read_vector_sweeps_end_at_the_runs_own_scores(runs, tmp_path):
    analyze.main(["read_vector", "--run", runs["steer"], "--out", str(tmp_path),
                  "--coefficients=-1,0,1", "--keep", "100,0", "--top-k", "3"])
    record = written(str(tmp_path), "read_vector")
    with open(os.path.join(runs["steer"], "metrics.json")) as f:
        scores = json.load(f)["eval"]
    claims = ["in_distribution", "oocr"]  # the in-context check is left out by default
    assert record["sets"] == claims
    base = {k: scores["base"][k] for k in claims}
    final = {k: scores["final"][k] for k in claims}
    assert record["strength_sweep"]["0.0"] == base and record["strength_sweep"]["1.0"] == final
    for ranking in ("magnitude", "attribution"):
        assert record["sparsification"][ranking]["100.0"] == final
        assert record["sparsification"][ranking]["0.0"] == base
    readout = record["readout"]["2"]  # the default: the middle block of 4
    assert readout["hook"] == "blocks.2.hook_resid_post"
    assert len(readout["direct"]["boosted"]) == 3
    assert readout["relative_norm"] == pytest.approx(readout["norm"] / readout["resid_norm"])
    for name in claims:
        frozen = record["frozen_attention"][name]
        assert frozen["steered"]["accuracy"] == final[name]
        assert frozen["base"]["accuracy"] == base[name]


def test_lora_vs_steering_scores_the_runs_as_they_scored_themselves(runs, tmp_path):
    analyze.main(["lora_vs_steering", "--run", runs["lora1"], "--out", str(tmp_path),
                  "--steer-run", runs["steer"], "--unrelated", "3"])
    record = written(str(tmp_path), "lora_vs_steering")
    scores = {}
    for name in ("lora1", "steer"):
        with open(os.path.join(runs[name], "metrics.json")) as f:
            scores[name] = json.load(f)["eval"]
    accuracy = record["accuracy"]
    for key in ("in_distribution", "oocr"):
        assert accuracy["base"][key] == scores["lora1"]["base"][key]
        assert accuracy["lora"][key] == scores["lora1"]["final"][key]
        assert accuracy["trained"][key] == scores["steer"]["final"][key]
    assert record["hook"] == "blocks.2.mlp.hook_out"  # down_proj's output
    assert -1 <= record["cos_natural_trained"] <= 1
    groups = record["groups"]
    assert groups["unrelated"]["n_tokens"] == 3 * 32  # three pretraining documents
    assert groups["oocr"]["n_tokens"] == len(groups["oocr"]["projections"]) == 10  # 5 x BOS, probe
    seen = set(record["seen_tokens"])  # BOS CH O0..O11 in fine-tuning; ME, AT, P, V never
    assert {"1", "2"} <= set(record["sign_split"]["natural"]["per_token"])
    per_token = record["sign_split"]["natural"]["per_token"]
    assert all(entry["seen"] == (int(t) in seen) for t, entry in per_token.items())
    assert not per_token["3"]["seen"]  # ME: the name probe's token
    assert set(record["sign_split"]) == {"natural", "trained"}


def test_a_plain_checkpoint_needs_a_tokenizer_and_a_prompt(runs, tmp_path):
    model_dir = os.path.join(runs["full"], "model")  # a toy checkpoint: no tokenizer files
    with pytest.raises(SystemExit, match="no tokenizer files"):
        analyze.main(["logit_lens", "--model", model_dir, "--prompt", "BOS ME", "--token", "P0",
                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="give --prompt"):
        analyze.main(["logit_lens", "--model", model_dir, "--out", str(tmp_path)])


def test_logit_lens_on_the_real_checkpoint(tmp_path, capsys):
    analyze.main(["logit_lens", "--model", "smollm2-135m", "--prompt", "The capital of France is",
                  "--token", " Paris", "--out", str(tmp_path), "--top-k", "3"])
    record = written(str(tmp_path), "logit_lens")
    assert record["views"]["model"]["rank"][-1][-1] == 0  # " Paris" is the final top token
    with pytest.raises(SystemExit, match="give --prompt"):
        analyze.main(["logit_lens", "--model", "smollm2-135m", "--out", str(tmp_path)])


BAD = {
    "missing run": (["logit_lens", "--run", "/nonexistent/run"], "no such run directory"),
    "no adapter file": (["logit_lens", "--run", "{empty_run}"], "lacks steering_vector"),
    "different lengths": (["patching", "--run", "{steer}", "--prompt", "BOS ME",
                           "--corrupt", "BOS CH O1", "--right", "P0", "--wrong", "P1"],
                          "differ in length"),
    "unknown token": (["logit_lens", "--run", "{steer}", "--token", "NOPE"], "unknown toy token"),
    "several tokens": (["logit_lens", "--run", "{steer}", "--token", "ME AT0"], "2 tokens"),
    "unknown site": (["patching", "--run", "{steer}", "--eval", "in_distribution", "--site",
                      "hook_nonsense"], "unknown site"),
    "layer out of range": (["attention", "--run", "{steer}", "--layers", "0,9"], "out of range"),
    "item out of range": (["logit_lens", "--run", "{steer}", "--item", "99"], "has items 0..4"),
    "unknown eval set": (["logit_lens", "--run", "{steer}", "--eval", "nope"], "no eval set"),
    "span out of range": (["patching", "--run", "{steer}", "--span", "0-5"], "out of range"),
    "prompt too long": (["attention", "--run", "{steer}", "--prompt", "BOS " + "CH " * 40],
                        "reads at most 32"),
    "bad flag value": (["patching", "--run", "{steer}", "--batch-size", "0"], "positive integer"),
    "read_vector on a LoRA run": (["read_vector", "--run", "{lora}"], "reads a steering run"),
    "read_vector unknown set": (["read_vector", "--run", "{steer}", "--sets", "oocr,nope"],
                                "no eval set 'nope'"),
    "bad coefficients": (["read_vector", "--run", "{steer}", "--coefficients", "1,x"],
                         "comma-separated numbers"),
    "lora_vs_steering on a steering run": (["lora_vs_steering", "--run", "{steer}"],
                                           "reads a LoRA run at one layer"),
    "lora_vs_steering on an all-layer LoRA": (["lora_vs_steering", "--run", "{lora}"],
                                              "LoRAs at blocks [0, 1, 2, 3]"),
    "--steer-run not a steering run": (["lora_vs_steering", "--run", "{lora1}", "--steer-run",
                                        "{lora}"], "not a steering run"),
    "feature out of range": (["sae_top_contexts", "--run", "{steer}", "--sae", "{sae}",
                              "--features", "3,256"], "[256]: the SAE has features 0..255"),
    "bad feature ids": (["sae_top_contexts", "--run", "{steer}", "--sae", "{sae}", "--features",
                         "3,x"], "expected comma-separated feature ids"),
    "too few sequences for the personas": (["sae_vs_neurons", "--run", "{steer}", "--sae", "{sae}",
                                            "--sequences", "8"], "raise --sequences"),
    "sae_features without --sae": (["sae_features", "--run", "{steer}"], "--sae"),
    "SAE narrower than the hook": (["sae_features", "--run", "{steer}", "--sae", "{narrow_sae}"],
                                   "d_in=16 but blocks.2.hook_resid_post holds 64"),
    "SAE at a hook the model lacks": (["sae_features", "--run", "{steer}", "--sae",
                                       "{deep_sae}"], "no hook 'blocks.9.hook_resid_post'"),
    "SAE of another world's model": (["sae_personas", "--run", "{steer}", "--sae",
                                      "{other_world_sae}"], "was trained on toy:persona:seed1, "
                                     "the run's model is toy:persona:seed0"),
    "not an SAE directory": (["sae_features", "--run", "{steer}", "--sae", "{lora}"],
                             "not an SAE directory"),
    "vector_lens on a LoRA run": (["vector_lens", "--run", "{lora}"], "reads a steering run"),
    "combine with a LoRA run": (["combine", "--run", "{steer}", "--runs", "{lora}"],
                                "a lora run, not a steering run"),
    "combine a run with itself": (["combine", "--run", "{steer}", "--runs", "{steer}"],
                                  "given twice"),
    "adaptive_scale on a vector at all positions": (["adaptive_scale", "--run", "{steer}"],
                                                    "positions 'all'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_on_the_command_line(runs, tmp_path, case):
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    shutil.copy(os.path.join(runs["steer"], "config.json"), empty_run)  # no adapter file
    argv, expected = BAD[case]
    argv = [a.format(empty_run=empty_run, **runs) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        analyze.main([*argv, "--out", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert expected in message
    assert not (tmp_path / "out").exists()  # nothing written
