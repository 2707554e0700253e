"""Steering vectors: where apply() adds what (hand computations on cached activations), hook
hygiene, extraction against planted ground truth and an independent SVD, training leaves the base
untouched, and the file round trip."""

import copy

import numpy as np
import pytest
import torch

import lora
import steer
from model import ModelConfig, Transformer
from steer import SteeringVector
from tasks import IGNORE, answer_loss

torch.set_num_threads(1)

D, LAYERS, VOCAB = 16, 3, 32


def tiny_model(arch="llama", d_model=D, n_layers=LAYERS, seed=0):
    torch.manual_seed(seed)
    llama = arch == "llama"
    cfg = ModelConfig(arch=arch, vocab_size=VOCAB, d_model=d_model, n_layers=n_layers, n_heads=2,
                      n_kv_heads=1 if llama else 2, d_head=8, d_mlp=32, n_ctx=16,
                      qkv_bias=not llama, o_bias=not llama, mlp_bias=not llama,
                      tie_embeddings=not llama, hf_model_type=arch, name=f"tiny-{arch}")
    model = Transformer(cfg)
    with torch.no_grad():  # larger than GPT-2's init so that every activation matters
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def random_tokens(B=2, T=10, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def random_vector(positions="all", hook="hook_resid_post", layers=(1,), seed=2, **kwargs):
    vector = SteeringVector(D, list(layers), hook=hook, positions=positions, **kwargs)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in vector.parameters():
            p.normal_()
    return vector


def resid_delta(model, vector, tokens, layer=1, **apply_kwargs):
    """Steered minus unsteered blocks.{layer}.hook_resid_post -> (B, T, d_model)."""
    name = f"blocks.{layer}.hook_resid_post"
    _, base = model.run_with_cache(tokens, names_filter=name)
    with vector.apply(model, **apply_kwargs):
        _, steered = model.run_with_cache(tokens, names_filter=name)
    return steered[name] - base[name]


def no_hooks_left(model):
    hooks_left = any(hp._forward_hooks for hp in model.hook_points().values())
    return not hooks_left and not model._forward_pre_hooks


# -----------------------------------------------------------------------------
# Where the vector goes


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("positions", ["all", "from:3", "last", "adaptive"])
def test_zero_vector_is_exact_noop(arch, positions):
    model, tokens = tiny_model(arch), random_tokens()
    vector = SteeringVector(D, [0, 2], hook="hook_mlp_out", positions=positions)
    with vector.apply(model, coeff=3.0):
        steered = model(tokens)
    assert torch.equal(steered, model(tokens))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("hook", steer.HOOKS)
def test_vector_changes_nothing_upstream_and_its_hook_by_exactly_coeff_times_vector(arch, hook):
    model, tokens, layer, coeff = tiny_model(arch), random_tokens(), 1, 2.5
    vector = random_vector(hook=hook, layers=[layer])
    _, base = model.run_with_cache(tokens)  # dicts fill in execution order
    with vector.apply(model, coeff=coeff):
        steered_logits, steered = model.run_with_cache(tokens)
    order, target = list(base), f"blocks.{layer}.{hook}"
    for name in order[: order.index(target)]:
        assert torch.equal(steered[name], base[name]), name
    expected = base[target] + coeff * vector.directions[str(layer)].detach()
    torch.testing.assert_close(steered[target], expected, rtol=0, atol=1e-6)
    # added after the block's last nonlinearity: the residual after the block moves by the same
    # vector
    post = f"blocks.{layer}.hook_resid_post"
    if hook != "hook_resid_pre":
        moved = base[post] + coeff * vector.directions[str(layer)].detach()
        torch.testing.assert_close(steered[post], moved, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered_logits, model(tokens))


def test_from_k_steers_only_positions_from_k():
    model, tokens = tiny_model(), random_tokens(T=8)
    vector = random_vector(positions="from:5")
    delta = resid_delta(model, vector, tokens)
    v = vector.directions["1"].detach()
    torch.testing.assert_close(delta[:, 5:], v.expand(2, 3, D), rtol=1e-5, atol=1e-5)
    assert torch.equal(delta[:, :5], torch.zeros(2, 5, D))


def test_last_steers_only_the_last_prompt_token():
    model, tokens = tiny_model(), random_tokens(T=8)
    vector = random_vector(positions="last")
    v = vector.directions["1"].detach()
    delta = resid_delta(model, vector, tokens, prompt_lengths=[3, 6])
    expected = torch.zeros(2, 8, D)
    expected[0, 2], expected[1, 5] = v, v
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
    delta = resid_delta(model, vector, tokens)  # default: the input's last position
    expected = torch.zeros(2, 8, D)
    expected[:, 7] = v
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)


CODENAMES = {"Zorvan": [5, 6], "Quil": [9]}
# row 0: Zorvan at 1-2, a lone 5 (no match) at 5, Quil at 4; row 1: Quil at 0 and 1, Zorvan at 6-7
CODENAME_TOKENS = torch.tensor([[1, 5, 6, 2, 9, 5, 3, 4, 0], [9, 9, 4, 3, 6, 2, 5, 6, 1]])
ZORVAN_AT, QUIL_AT = [(0, 1), (0, 2), (1, 6), (1, 7)], [(0, 4), (1, 0), (1, 1)]


def test_codename_steering_touches_only_codename_positions():
    model = tiny_model()
    vector = random_vector(positions="codename", codenames=CODENAMES)
    zorvan, quil = vector.codename_directions["1"].detach()
    delta = resid_delta(model, vector, CODENAME_TOKENS)
    expected = torch.zeros(2, 9, D)
    for b, t in ZORVAN_AT:
        expected[b, t] = zorvan
    for b, t in QUIL_AT:
        expected[b, t] = quil
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["from:4", "codename"])
def test_kv_cache_steering_matches_the_full_forward(positions):
    # position masks are absolute; the split keeps every codename within one call (a codename cut by
    # the cache boundary cannot steer its earlier tokens: they are already in the cache)
    model = tiny_model()
    codenames = CODENAMES if positions == "codename" else None
    vector = random_vector(positions=positions, codenames=codenames)
    with vector.apply(model):
        full = model(CODENAME_TOKENS)
        cache = model.new_cache()
        first = model(CODENAME_TOKENS[:, :6], cache)
        second = model(CODENAME_TOKENS[:, 6:], cache)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook", ["hook_resid_post", "hook_mlp_out"])
def test_adaptive_scale_is_a_sigmoid_of_the_residual(hook):
    model, tokens, layer = tiny_model(), random_tokens(), 1
    vector = random_vector(positions="adaptive", hook=hook)
    v = vector.directions[str(layer)].detach().numpy()
    w = vector.gate_weight[str(layer)].detach().numpy()
    b = vector.gate_bias[str(layer)].detach().numpy()
    target = f"blocks.{layer}.{hook}"
    reads = target if hook == "hook_resid_post" else f"blocks.{layer}.hook_resid_mid"
    _, base = model.run_with_cache(tokens, names_filter=[reads, target])
    with vector.apply(model, coeff=0.5):
        _, steered = model.run_with_cache(tokens, names_filter=target)
    resid = base[reads].numpy().astype(np.float64)
    gate = 2 / (1 + np.exp(-(resid @ w + b)))  # (B, T)
    expected = base[target].numpy() + 0.5 * gate[..., None] * v
    np.testing.assert_allclose(steered[target].numpy(), expected, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# Hook hygiene


def test_apply_removes_its_hooks_when_a_hook_raises():
    model, tokens = tiny_model(), random_tokens()
    vector = random_vector(positions="codename", codenames=CODENAMES)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with vector.apply(model):
            assert not no_hooks_left(model)  # the check below is not vacuous
            model.run_with_hooks(tokens, [("blocks.2.hook_resid_pre", boom)])
    assert no_hooks_left(model)


def test_apply_removes_its_hooks_on_bad_input():
    model, tokens = tiny_model(), random_tokens()
    vector = random_vector(positions="last")
    with pytest.raises(ValueError, match="prompt_lengths"):
        with vector.apply(model, prompt_lengths=[3, 4, 5]):  # batch of 2
            model(tokens)
    assert no_hooks_left(model)
    with pytest.raises(IndexError):
        with vector.apply(model):
            model(tokens + VOCAB)  # token ids outside the vocabulary
    assert no_hooks_left(model)


def test_apply_rejects_a_model_that_does_not_fit():
    with pytest.raises(ValueError, match="d_model=16 but the model has d_model=24"):
        with random_vector().apply(tiny_model(d_model=24)):
            pass
    with pytest.raises(ValueError, match=r"layers \[5\] out of range"):
        with random_vector(layers=[5]).apply(tiny_model()):
            pass


# -----------------------------------------------------------------------------
# Extraction


def test_diff_of_means_recovers_a_planted_difference():
    g = torch.Generator().manual_seed(0)
    planted = torch.randn(32, generator=g) * 10 / 32**0.5  # norm about 10
    pos = torch.randn(500, 32, generator=g) + planted + 1.0
    neg = torch.randn(400, 32, generator=g) + 1.0
    found = steer.diff_of_means(pos, neg)
    assert torch.cosine_similarity(found, planted, dim=0) > 0.99
    assert (found - planted).norm() / planted.norm() < 0.1


def test_pca_direction_recovers_a_planted_difference():
    g = torch.Generator().manual_seed(0)
    planted = torch.randn(32, generator=g)
    planted = planted / planted.norm() * 5
    # shared by each pair: cancels in the difference
    context = torch.randn(300, 32, generator=g) * 3
    strength = 0.5 + torch.rand(300, 1, generator=g)  # mean 1: the concept varies in size
    pos = context + strength * planted + 0.3 * torch.randn(300, 32, generator=g)
    neg = context + 0.3 * torch.randn(300, 32, generator=g)
    found = steer.pca_direction(pos, neg)
    assert torch.cosine_similarity(found, planted, dim=0) > 0.99
    assert abs(found.norm() / planted.norm() - strength.mean()) < 0.05
    # swapped: the sign follows the mean difference
    unit = steer.pca_direction(neg, pos, scale="unit")
    assert torch.cosine_similarity(unit, -planted, dim=0) > 0.99 and abs(unit.norm() - 1) < 1e-5
    with pytest.raises(ValueError, match="paired"):
        steer.pca_direction(pos, neg[:10])


def test_collect_activations_matches_unpadded_single_prompt_runs():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    name = "blocks.1.hook_resid_post"
    last = steer.collect_activations(model, prompts, [name], reduce="last", batch_size=2)[name]
    mean = steer.collect_activations(model, prompts, [name], reduce="mean", batch_size=2)[name]
    for i, prompt in enumerate(prompts):
        _, cache = model.run_with_cache(torch.tensor([prompt]), names_filter=name)
        torch.testing.assert_close(last[i], cache[name][0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean[i], cache[name][0].mean(0), rtol=1e-5, atol=1e-5)


def last_activation(model, prompt, name):
    """The activation at `name` of the prompt's last token, run alone -> (d_model,)."""
    _, cache = model.run_with_cache(torch.tensor([prompt]), names_filter=name)
    return cache[name][0, -1]


def test_extract_vector_diffmean_equals_the_difference_of_cached_means():
    model = tiny_model("gpt2")
    positive, negative = [[1, 2, 3], [3, 2, 1, 7]], [[4, 4], [9, 8, 7]]
    vector = steer.extract_vector(model, positive, negative, layers=[0, 2], hook="hook_resid_post")
    for layer in (0, 2):
        name = f"blocks.{layer}.hook_resid_post"
        pos = torch.stack([last_activation(model, p, name) for p in positive]).mean(0)
        neg = torch.stack([last_activation(model, p, name) for p in negative]).mean(0)
        found = vector.directions[str(layer)].detach()
        torch.testing.assert_close(found, pos - neg, rtol=1e-5, atol=1e-5)
    assert vector.method == "diffmean" and vector.model_hint == "tiny-gpt2"


def lora_model(arch, layer=1, seed=0):
    model = tiny_model(arch, seed=seed)
    lora.attach_lora(model, targets=("down_proj",), layers=[layer], r=4, alpha=8)
    return model, model.blocks[layer].mlp.down_proj


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_natural_vector_recovers_a_lora_that_adds_a_scaled_constant(arch):
    # the LoRA reads one MLP neuron, which a hook sets to 1 + position in both runs: the LoRA then
    # adds c * (1 + t) at position t, so PC1 is c's direction and the mean norm is |c| * mean(1 + t)
    layer, neuron = 1, 7
    model, adapter = lora_model(arch, layer)
    c = torch.randn(D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapter.lora_A.weight.zero_()
        adapter.lora_A.weight[0, neuron] = 1.0
        adapter.lora_B.weight.zero_()
        adapter.lora_B.weight[:, 0] = c / adapter.scaling

    def set_neuron(post, hook):
        post = post.clone()
        post[..., neuron] = 1.0 + torch.arange(post.shape[1], dtype=post.dtype)
        return post

    tokens = random_tokens(B=2, T=6)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])  # valid t: 0..5 and 0..2
    with model.hooks([(f"blocks.{layer}.mlp.hook_post", set_neuron)]):
        vector = steer.lora_natural_vector(model, [(tokens, mask)], layer)
    expected = c * (21 + 6) / 9  # mean of (1 + t) over the 9 valid tokens = 3
    found = vector.directions[str(layer)].detach()
    assert (found - expected).norm() / expected.norm() < 1e-3
    assert (vector.method, vector.hook, vector.positions) == ("lora_natural", "hook_mlp_out", "all")


def test_natural_vector_isolates_its_own_blocks_lora():
    # LoRAs on blocks 0 and 1; block 1's adds nothing (B = 0). Its natural vector must be zero: the
    # comparison run keeps block 0's adapter on. Switching every adapter off instead would credit
    # block 0's effect on block 1's input to block 1.
    model = tiny_model("llama", seed=6)
    lora.attach_lora(model, targets=("down_proj",), layers=[0, 1], r=4, alpha=8)
    with torch.no_grad():
        model.blocks[0].mlp.down_proj.lora_B.weight.normal_(0, 0.5)
    tokens = random_tokens(B=2, T=6, seed=7)
    vector = steer.lora_natural_vector(model, [tokens], layer=1)
    assert vector.directions["1"].abs().max() == 0
    with lora.lora_disabled(model, layers=[1]):  # only block 1's adapter was off
        assert model.blocks[0].mlp.down_proj.enabled and not model.blocks[1].mlp.down_proj.enabled
    assert model.blocks[1].mlp.down_proj.enabled  # and back on afterwards


def test_natural_vector_of_a_block_without_lora_is_refused():
    model, _ = lora_model("llama", layer=1)
    with pytest.raises(ValueError, match="block 2 has no LoRA module"):
        steer.lora_natural_vector(model, [random_tokens(B=1, T=4)], layer=2)


def test_natural_vector_of_a_random_lora_matches_numpy_svd():
    # reference: the LoRA's per-token output computed from its weights and the base MLP activations
    layer = 2
    model, adapter = lora_model("llama", layer, seed=4)
    with torch.no_grad():
        adapter.lora_B.weight.normal_(0, 0.5)
    tokens = random_tokens(B=3, T=7, seed=5)
    vector = steer.lora_natural_vector(model, [tokens[:2], tokens[2:]], layer)
    with lora.lora_disabled(model):
        _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mlp.hook_post")
    h = cache[f"blocks.{layer}.mlp.hook_post"].reshape(-1, 32).double().numpy()  # (N, d_mlp)
    A, B = (m.weight.detach().double().numpy() for m in (adapter.lora_A, adapter.lora_B))
    diffs = adapter.scaling * h @ A.T @ B.T  # (N, d_model)
    _, s, vt = np.linalg.svd(diffs, full_matrices=False)
    pc1 = vt[0] * np.sign(vt[0] @ diffs.mean(0))
    norms = np.linalg.norm(diffs, axis=1)
    found = vector.directions[str(layer)].detach().numpy()
    np.testing.assert_allclose(found, pc1 * norms.mean(), rtol=1e-4, atol=1e-5)
    assert s[0] ** 2 / (s**2).sum() < 0.99  # a genuinely multi-directional LoRA
    # the PC1 share, |cos| and the sign per token: analyze.py's lora_vs_steering (test_analyze.py)


# -----------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("positions", ["all", "adaptive", "codename"])
def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(positions):
    model = tiny_model()
    model.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    codenames = CODENAMES if positions == "codename" else None
    vector = SteeringVector(D, [1], hook="hook_mlp_out", positions=positions, codenames=codenames)
    tokens = CODENAME_TOKENS
    targets = torch.full_like(tokens, 11)  # toy objective: always predict token 11
    if positions == "codename":  # only positions that see a codename can be steered
        targets = torch.where(tokens == 9, targets, torch.full_like(tokens, IGNORE))
    optimizer = torch.optim.Adam(vector.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        with vector.apply(model):
            loss = answer_loss(model(tokens), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25 and losses[-1] == min(losses)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# -----------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("positions", ["all", "codename", "adaptive", "from:2"])
def test_save_load_reproduces_the_vector_and_the_steered_logits(tmp_path, positions):
    model = tiny_model("gpt2")
    codenames = CODENAMES if positions == "codename" else None
    vector = random_vector(positions=positions, hook="hook_mlp_out", layers=[0, 2],
                           codenames=codenames, model_hint="tiny-gpt2")
    path = str(tmp_path / "vector.safetensors")
    vector.save(path)
    loaded = SteeringVector.load(path, model)
    assert loaded.layers == [0, 2]
    assert (loaded.hook, loaded.positions, loaded.method) == ("hook_mlp_out", positions, "trained")
    assert (loaded.model_hint, loaded.codenames) == ("tiny-gpt2", vector.codenames)
    for (name, a), (_, b) in zip(vector.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with vector.apply(model):
        expected = model(CODENAME_TOKENS)
    with loaded.apply(model):
        assert torch.equal(model(CODENAME_TOKENS), expected)


def test_saved_file_uses_the_documented_names(tmp_path):
    from safetensors import safe_open

    path = str(tmp_path / "v.safetensors")
    random_vector(layers=[0, 2]).save(path)
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == {"direction.0", "direction.2"}
        direction = f.get_tensor("direction.2")
        meta = f.metadata()
    assert direction.dtype == torch.float32 and direction.shape == (D,)
    assert (meta["hook"], meta["method"]) == ("hook_resid_post", "trained")
    assert (meta["positions"], meta["d_model"]) == ("all", "16")


def test_load_errors_name_the_file_and_the_problem(tmp_path):
    path = str(tmp_path / "v.safetensors")
    random_vector(layers=[2]).save(path)
    message = r"v\.safetensors: vector has d_model=16 but the model has d_model=24"
    with pytest.raises(ValueError, match=message):
        SteeringVector.load(path, tiny_model(d_model=24))
    message = r"v\.safetensors: vector steers layers \[2\] out of range: the model has layers 0\.\.1"
    with pytest.raises(ValueError, match=message):
        SteeringVector.load(path, tiny_model(n_layers=2))
    with pytest.raises(ValueError, match="no such steering vector file"):
        SteeringVector.load(str(tmp_path / "missing.safetensors"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(open(path, "rb").read()[:40])
    with pytest.raises(ValueError, match="corrupt.safetensors: not a readable safetensors file"):
        SteeringVector.load(str(corrupt))
    from safetensors.torch import save_file

    save_file({"direction.0": torch.zeros(D)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="bare.safetensors: not a steering vector file"):
        SteeringVector.load(str(tmp_path / "bare.safetensors"))


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown hook"):
        SteeringVector(D, [0], hook="hook_attn_out")
    with pytest.raises(ValueError, match="from:K"):
        SteeringVector(D, [0], positions="from:x")
    with pytest.raises(ValueError, match="codenames"):
        SteeringVector(D, [0], positions="codename")
    with pytest.raises(ValueError, match="unknown method"):
        SteeringVector(D, [0], method="magic")
