"""sae.py: sparse autoencoders on a hook's activations.

References: a planted sparse dictionary the SAE must find (each atom has a decoder row with cosine
> 0.9); loss recovered against a hand computation (the hook's activation replaced by hand and the
later blocks run with start_at_layer, the cross-entropy from log_softmax); TopK against a sort of
the pre-activations; SAELens's file layout against its documented key names and shapes, and a
SAELens-v6-style cfg.json written by hand; the end-to-end run against a stated threshold."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import sae
from model import ModelConfig, Transformer

torch.set_num_threads(1)


def planted_atoms(n_atoms=32, d=32, seed=12345):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n_atoms, d, generator=g), dim=-1)  # (n_atoms, d) unit rows


def planted_batches(atoms, k=3, n=256, nan_at=None):
    """batch_at(step): each sample is k distinct atoms with coefficients in [1, 2)."""

    def batch_at(step):
        g = torch.Generator().manual_seed(1000 + step)
        idx = torch.rand(n, len(atoms), generator=g).topk(k, dim=-1).indices  # (n, k)
        coef = 1 + torch.rand(n, k, generator=g)  # (n, k)
        x = (coef[..., None] * atoms[idx]).sum(1)  # (n, d)
        return x * float("nan") if step == nan_at else x

    return batch_at


def random_sae(d_in=8, d_sae=16, k=2, activation="topk", hook="blocks.0.hook_resid_post",
               seed=0):
    torch.manual_seed(seed)
    s = sae.SAE(sae.SAEConfig(d_in=d_in, d_sae=d_sae, k=k, activation=activation,
                              hook_name=hook))
    with torch.no_grad():
        s.b_enc.normal_(0, 0.1)
        s.b_dec.normal_(0, 0.1)
        s.W_enc.add_(0.3 * torch.randn_like(s.W_enc))
    return s


def tiny_model(seed=0):
    """A 2-layer GPT with weights large enough that the hook matters to the loss."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=2, d_head=4,
                      d_mlp=16, n_ctx=8)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# The SAE itself


def test_sae_recovers_a_planted_sparse_dictionary():
    atoms = planted_atoms()
    torch.manual_seed(0)
    s = sae.SAE(sae.SAEConfig(d_in=32, d_sae=96, k=3))
    before = (atoms @ s.W_dec.detach().T).max(1).values  # (n_atoms,) best cosine at init
    # 3x as many features as atoms: at 2x, 1 world seed of 7 left an atom at cosine 0.80
    settings = sae.TrainSettings(steps=300, lr=1e-2, dead_after_tokens=5000)
    sae.train_sae(s, planted_batches(atoms), settings)
    norms = s.W_dec.detach().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # unit decoder rows
    best = (atoms @ s.W_dec.detach().T).max(1).values  # rows are unit: these are cosines
    assert before.max() < 0.9  # random rows do not match by chance
    assert best.min() > 0.9, f"atoms without a matching feature: {(best <= 0.9).sum()}"


def test_topk_keeps_exactly_the_k_largest_pre_activations():
    s = random_sae(d_in=8, d_sae=16, k=3)
    with torch.no_grad():
        s.b_enc.fill_(10.0)  # every pre-activation positive: the ReLU after TopK zeroes none
    x = torch.randn(5, 7, 8)
    f = s.encode(x)  # (5, 7, 16)
    assert ((f != 0).sum(-1) == 3).all()
    pre = (x - s.b_dec) @ s.W_enc + s.b_enc  # by hand, as SAELens writes it
    top3 = pre.sort(-1, descending=True).indices[..., :3]
    chosen = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, top3, True)
    assert torch.equal(f != 0, chosen)
    assert torch.allclose(f[chosen], pre[chosen])
    # with arbitrary biases, never more than k (SAELens's ReLU may zero a chosen negative one)
    s2 = random_sae(d_in=8, d_sae=16, k=3)
    assert ((s2.encode(torch.randn(200, 8)) != 0).sum(-1) <= 3).all()


def test_relu_sae_is_relu_of_the_affine_map_and_recovers_the_dictionary_too():
    s = random_sae(activation="relu")
    x = torch.randn(4, 8)
    expected = torch.relu((x - s.b_dec) @ s.W_enc + s.b_enc) @ s.W_dec + s.b_dec
    assert torch.allclose(s(x), expected, atol=1e-6)
    atoms = planted_atoms()
    torch.manual_seed(0)
    r = sae.SAE(sae.SAEConfig(d_in=32, d_sae=96, activation="relu"))
    settings = sae.TrainSettings(steps=300, lr=1e-2, l1=0.1, dead_after_tokens=5000)
    last = sae.train_sae(r, planted_batches(atoms), settings)["loss"][-1][1]
    assert last["nmse"] < 0.1 and last["l0"] < 12  # sparse and reconstructing (planted L0 = 3)
    assert (atoms @ r.W_dec.detach().T).max(1).values.min() > 0.9  # measured: 0.94


def test_metrics_on_a_hand_made_sae():
    """Three features on a 2-d stream: 0 and 2 fire on every token, 1 on none."""
    s = sae.SAE(sae.SAEConfig(d_in=2, d_sae=3, activation="relu"))
    with torch.no_grad():
        s.W_enc.copy_(torch.tensor([[1.0, 0, 0], [0, -1.0, 0]]))
        s.W_dec.copy_(torch.tensor([[1.0, 0], [0, 1.0], [0, 1.0]]))
        s.b_enc.copy_(torch.tensor([0.0, -5.0, 0.5]))  # 1: never on; 2: always, at 0.5
        s.b_dec.zero_()
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 1.0], [2.0, -1.0]])
    metrics, freq = sae.reconstruction_metrics(s, [x[:2], x[2:]])
    # x_hat = (x0, 0.5); errors: (0, .5) (0, .5) (0, .5) (0, 1.5) -> 0.25 * 3 + 2.25 = 3
    # variance around the mean (2, 0): 1 + 1 + 1 + 1 = 4
    assert metrics["explained_variance"] == pytest.approx(1 - 3 / 4)
    assert metrics["l0"] == pytest.approx(2.0)
    assert freq.tolist() == [1.0, 0.0, 1.0]
    assert metrics["dead_frac"] == pytest.approx(1 / 3)
    assert metrics["dense_frac"] == pytest.approx(2 / 3)


# -----------------------------------------------------------------------------
# Loss recovered against a hand computation


def hand_loss(model, seqs, hook_layer, replace=None):
    """Mean next-token loss over positions 1..len-2 of each sequence, one sequence at a time,
    with blocks.{hook_layer}.hook_resid_post's positions 1.. replaced by replace(x)."""
    total, n = 0.0, 0
    for seq in seqs:
        tokens = torch.tensor([seq])
        name = f"blocks.{hook_layer}.hook_resid_post"
        _, cache = model.run_with_cache(tokens, names_filter=name)
        resid = cache[name].clone()  # (1, T, d)
        if replace is not None:
            resid[0, 1:] = replace(resid[0, 1:])
        logits = model(resid, start_at_layer=hook_layer + 1)  # (1, T, vocab)
        logp = torch.log_softmax(logits[0], -1)
        for t in range(1, len(seq) - 1):
            total -= logp[t, seq[t + 1]].item()
            n += 1
    return total / n


def test_loss_recovered_equals_a_hand_computation():
    model = tiny_model()
    s = random_sae(d_in=8, d_sae=16, k=2, hook="blocks.0.hook_resid_post")
    seqs = [[1, 5, 3, 7, 2, 9], [1, 4, 4], [1, 8, 2, 6, 11, 3, 12, 5]]  # ragged: padding too
    corpus = sae.corpus_of_sequences(seqs, pad_id=0)
    got = sae.loss_recovered(model, s, corpus, max_tokens=12)  # batches of 1 and 2 rows
    clean = hand_loss(model, seqs, 0)
    with torch.no_grad():
        spliced = hand_loss(model, seqs, 0, s)
    zero = hand_loss(model, seqs, 0, torch.zeros_like)
    assert got["loss_clean"] == pytest.approx(clean, abs=1e-5)
    assert got["loss_sae"] == pytest.approx(spliced, abs=1e-5)
    assert got["loss_zero"] == pytest.approx(zero, abs=1e-5)
    assert abs(zero - clean) > 0.05 and abs(spliced - clean) > 1e-3  # the check has teeth
    assert got["loss_recovered"] == pytest.approx((zero - spliced) / (zero - clean), abs=1e-4)


# -----------------------------------------------------------------------------
# Files: SAELens's layout


def test_files_round_trip_in_sae_lens_layout(tmp_path):
    s = random_sae(d_in=8, d_sae=16, k=2, hook="blocks.1.hook_resid_post")
    sae.save_sae(s, str(tmp_path))
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    assert shapes == {"W_enc": (8, 16), "W_dec": (16, 8), "b_enc": (16,), "b_dec": (8,)}
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", 8, 16, 2)
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["hook_layer"] == 1
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    back = sae.load_sae(str(tmp_path))
    for name in sae.WEIGHT_SHAPES:
        assert torch.equal(getattr(back, name), getattr(s, name))
    assert back.cfg == s.cfg
    x = torch.randn(10, 8)
    assert torch.equal(back(x), s(x))


def test_loads_a_sae_lens_v6_standard_sae(tmp_path):
    """A cfg.json as SAELens 6 writes it (hook name in `metadata`), written here by hand."""
    g = torch.Generator().manual_seed(0)
    weights = {"W_enc": torch.randn(8, 16, generator=g), "W_dec": torch.randn(16, 8, generator=g),
               "b_enc": torch.randn(16, generator=g), "b_dec": torch.randn(8, generator=g)}
    save_file(weights, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": 8, "d_sae": 16, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"hook_name": "blocks.0.hook_resid_post", "model_name": "gpt2",
                        "sae_lens_version": "6.12.1"}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    s = sae.load_sae(str(tmp_path))
    assert (s.cfg.activation, s.cfg.hook_name, s.cfg.model_name) == ("relu", cfg["metadata"]
                                                                     ["hook_name"], "gpt2")
    x = torch.randn(3, 8, generator=g)
    by_hand = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    assert torch.allclose(s(x), by_hand @ weights["W_dec"] + weights["b_dec"], atol=1e-5)


# -----------------------------------------------------------------------------
# Training: resume, NaN, bad input


def test_resume_continues_exactly(tmp_path):
    atoms = planted_atoms(n_atoms=16, d=8)

    def fresh():
        torch.manual_seed(0)
        return sae.SAE(sae.SAEConfig(d_in=8, d_sae=24, k=2))

    straight = fresh()
    sae.train_sae(straight, planted_batches(atoms, k=2, n=64), sae.TrainSettings(steps=6))
    out = str(tmp_path)
    first = fresh()
    sae.train_sae(first, planted_batches(atoms, k=2, n=64),
                  sae.TrainSettings(steps=3, checkpoint_every=3), out=out)
    resumed = fresh()  # a new process: only the checkpoint carries the state
    sae.train_sae(resumed, planted_batches(atoms, k=2, n=64),
                  sae.TrainSettings(steps=6, checkpoint_every=3), out=out, resume=True)
    for name in sae.WEIGHT_SHAPES:
        assert torch.allclose(getattr(resumed, name), getattr(straight, name), atol=1e-6)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    atoms = planted_atoms(n_atoms=16, d=8)
    s = sae.SAE(sae.SAEConfig(d_in=8, d_sae=24, k=2))
    settings = sae.TrainSettings(steps=10, checkpoint_every=2)
    with pytest.raises(sae.SAEError) as e:
        sae.train_sae(s, planted_batches(atoms, k=2, n=64, nan_at=5), settings, out=str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and "nan at step 5" in message and "(step 4)" in message
    restored = sae.SAE(sae.SAEConfig(d_in=8, d_sae=24, k=2))
    optimizer = torch.optim.Adam(restored.parameters())
    step, _, _ = sae.load_checkpoint(str(tmp_path / "checkpoint.safetensors"), restored,
                                     optimizer)
    assert step == 4 and torch.isfinite(restored.W_dec).all()


def one_line_error(fn):
    with pytest.raises(sae.SAEError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_gives_one_line_errors(tmp_path):
    model = tiny_model()
    assert "no hook 'blocks.9.hook_resid_post'" in one_line_error(
        lambda: sae.check_hook(model, "blocks.9.hook_resid_post"))
    wide = random_sae(d_in=12, d_sae=16)
    assert "d_in=12" in one_line_error(
        lambda: sae.check_hook(model, "blocks.0.hook_resid_post", wide))
    assert "(B, T, d)" in one_line_error(lambda: sae.check_hook(model, "blocks.0.attn.hook_z"))
    assert "empty corpus" in one_line_error(lambda: sae.corpus_of_sequences([]))
    assert "empty corpus" in one_line_error(lambda: sae.corpus_of_sequences([[1], [2]]))
    assert "not an SAE directory" in one_line_error(lambda: sae.load_sae(str(tmp_path)))
    s = random_sae(d_in=8, d_sae=16)
    sae.save_sae(s, str(tmp_path))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 32}))
    assert "W_enc has shape (8, 16)" in one_line_error(lambda: sae.load_sae(str(tmp_path)))
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu",
                                                   "activation_fn": "relu"}))
    assert "jumprelu" in one_line_error(lambda: sae.load_sae(str(tmp_path)))
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
    assert "rescale_acts_by_decoder_norm" in one_line_error(lambda: sae.load_sae(str(tmp_path)))
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "reshape_activations": "hook_z"}))
    assert "reshape_activations='hook_z'" in one_line_error(lambda: sae.load_sae(str(tmp_path)))


def test_command_line_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        sae.main(["--hook", "blocks.7.hook_resid_post", "--out", out, "--steps", "1"])
    assert str(e.value).startswith("error: the model has no hook 'blocks.7.hook_resid_post'")
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        sae.main(["--lr", "0", "--out", out])
    assert "\n" not in str(e.value) and "--lr" in str(e.value)


# -----------------------------------------------------------------------------
# End to end: the persona world's shipped toy model

TOY_THRESHOLD = 0.9  # explained variance after 150 steps (measured: 0.98)


def test_end_to_end_on_the_default_toy_model(tmp_path):
    out = str(tmp_path / "sae")
    cfg = sae.RunConfig(steps=150, eval_seqs=128, checkpoint_every=50, threads=1, out=out)
    metrics = sae.run(cfg)
    assert metrics["explained_variance"] > TOY_THRESHOLD
    assert metrics["l0"] == pytest.approx(8, abs=0.05)  # TopK: k per token, rarely fewer
    assert metrics["loss_clean"] < metrics["loss_sae"] < metrics["loss_zero"]
    assert metrics["loss_recovered"] > 0.8
    assert sorted(os.listdir(out)) == ["cfg.json", "checkpoint.safetensors", "config.json",
                                       "metrics.json", "sae_weights.safetensors"]
    saved = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert saved["explained_variance"] == metrics["explained_variance"]
    back = sae.load_sae(out)
    assert (back.cfg.d_in, back.cfg.d_sae, back.cfg.hook_name) == (64, 256, cfg.hook)
    assert back.cfg.model_name == "toy:persona:seed0"  # the world's seed names its model
    # the same --out again is refused; --resume of a finished run only re-measures
    assert "already holds a run" in one_line_error(lambda: sae.run(cfg))


def test_sae_seed_changes_the_sae_not_the_model():
    """--seed is the task's (a toy world of another seed is another model); --sae-seed only the
    SAE's init, batches and held-out split."""
    cfg = sae.parse_args(["--sae-seed", "2"])
    assert (cfg.seed, sae.own_seed(cfg), sae.subject_name(cfg)) == (0, 2, "toy:persona:seed0")
    cfg = sae.parse_args(["--seed", "3"])
    assert (sae.own_seed(cfg), sae.subject_name(cfg)) == (3, "toy:persona:seed3")
