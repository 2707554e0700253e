"""train.py --objective rl (GRPO-style policy gradient on a task's reward) on tiny random models.

References: the loss against a hand computation (each sample run alone, unpadded; advantages from
the statistics module); zero gradient from a constant reward; the KL reference against a fresh
copy of the base; the persona world's reward against its utility table read by hand; resume
against an uninterrupted run; flag errors against the text a user reads."""

import math
import os
import statistics

import pytest
import torch

import tasks
import toy
import train
from model import Transformer

VOCAB, PAD, EOS, GOOD = 8, 0, 1, 5
PROMPTS = [[2, 3], [2, 4], [3, 4, 6]]  # two lengths: sampled as two batches


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = toy.gpt2_config(VOCAB, n_ctx=16, d_model=16, n_layers=2, n_heads=2, d_mlp=32)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # init's 0.02-scale unembedding keeps every logit near 0: sharpen it
        model.unembed.weight.mul_(8)  # (tied to the embedding, which only scales the stream)
    return model


def config(tmp_path, **overrides):
    base = dict(objective="rl", adapter="steer", task="persona", layers=[1], lr=0.1, steps=30,
                batch_size=len(PROMPTS), group_size=8, max_new_tokens=3, eval_every=10_000,
                checkpoint_every=5, out=str(tmp_path / "run"))
    return train.with_defaults(train.TrainConfig(**{**base, **overrides}))


def good_first(prompt, completion):
    """Reward 1 when the completion starts with GOOD."""
    return float(len(completion) > 0 and completion[0] == GOOD)


def rl_data(reward=good_first):
    examples = [tasks.Example(p, [GOOD]) for p in PROMPTS]  # the answers are never read
    return train.Data(examples, eval_sets={}, pad_id=PAD, reward=reward, eos_ids=(EOS,))


def test_through_eos_keeps_the_first_end_and_drops_the_repeats():
    assert tasks.through_eos([3, 5, EOS, EOS, EOS], (EOS,)) == [3, 5, EOS]
    assert tasks.through_eos([3, 5, 6], (EOS,)) == [3, 5, 6]
    assert tasks.through_eos([3, 5, 6], ()) == [3, 5, 6]


def test_group_advantages_are_normalised_within_each_group():
    rewards = [1.0, 0.0, 0.0, 2.0, 4.0, 0.0, 0.7, 0.7, 0.7]  # three groups of 3
    got = train.group_advantages(torch.tensor(rewards), 3).tolist()
    for start in (0, 3):
        group = rewards[start : start + 3]
        mean, std = statistics.mean(group), statistics.stdev(group)
        for r, a in zip(group, got[start : start + 3]):
            assert a == pytest.approx((r - mean) / (std + 1e-4), rel=1e-6)
    assert got[6:] == [0.0, 0.0, 0.0]  # equal rewards: no signal, exactly


def hand_loss(model, prompts, completions, rewards, group_size):
    """-sum(A_i * sum_t log p(c_it)) / (number of completion tokens), each sample run alone."""
    total, n_tokens = 0.0, 0
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        group = rewards[i // group_size * group_size:][:group_size]
        adv = (rewards[i] - statistics.mean(group)) / (statistics.stdev(group) + 1e-4)
        seq = torch.tensor([prompt + completion])
        logp = model(seq)[0].log_softmax(-1)  # (T, vocab)
        for t, token in enumerate(completion):
            total += -adv * logp[len(prompt) - 1 + t, token]
        n_tokens += len(completion)
    return total / n_tokens


def test_policy_loss_equals_a_hand_computation_with_padding_excluded():
    model = tiny_model()
    # 2 prompts x group of 3; completions of different lengths, so the batch is padded
    prompts = [[2, 3]] * 3 + [[3, 4, 6]] * 3
    completions = [[5, EOS], [6, 7, 2], [4], [5, 5, 5], [EOS], [7, EOS]]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.5]
    samples = [tasks.Example(p, c) for p, c in zip(prompts, completions)]
    tokens, targets = tasks.collate(samples, PAD)
    logp, row = train.sampled_logprobs(model, tokens, targets)
    assert len(logp) == sum(len(c) for c in completions)  # the sampled tokens, nothing else
    advantages = train.group_advantages(torch.tensor(rewards), 3)
    loss = train.policy_loss(logp, advantages[row])
    with torch.no_grad():
        want = hand_loss(model, prompts, completions, rewards, 3)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # another padding id changes nothing: padding is never read as a sample
    tokens2, targets2 = tasks.collate(samples, 7)
    logp2, _ = train.sampled_logprobs(model, tokens2, targets2)
    assert torch.allclose(logp, logp2, atol=1e-6)


def test_kl_penalty_is_the_k3_estimate_per_token():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    advantages = torch.tensor([1.0, -1.0, 0.0])
    got = train.policy_loss(logp, advantages, ref, kl=0.1)
    pg = (1.0 * 1.0 + (-1.0) * 2.0 + 0.0) / 3  # -A * logp, averaged
    k3 = sum(math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())) / 3
    assert got.item() == pytest.approx(pg + 0.1 * k3, rel=1e-6)


def make_run(tmp_path, **overrides):
    """-> cfg, model, adapter for a tiny model with a steering vector (or another adapter)."""
    cfg = config(tmp_path, **overrides)
    os.makedirs(cfg.out, exist_ok=True)
    model = tiny_model()
    torch.manual_seed(cfg.seed)
    adapter = train.make_adapter(cfg, model, task=None, tokenizer=None)
    return cfg, model, adapter


def test_constant_reward_gives_zero_gradient(tmp_path):
    cfg, model, adapter = make_run(tmp_path)
    with torch.no_grad():
        adapter.holder.directions["1"].normal_()  # a nonzero vector: the policy is not the base
    optimizer = torch.optim.SGD([p for _, p in adapter.named_parameters()], lr=1.0)
    before = adapter.holder.directions["1"].clone()
    data = rl_data(reward=lambda prompt, completion: 0.7)
    loss, _, stats = train.rl_step(cfg, model, adapter, optimizer, data, step=0)
    assert loss == 0.0 and stats["reward"] == pytest.approx(0.7) and stats["group_std"] < 1e-6
    assert torch.equal(adapter.holder.directions["1"].grad, torch.zeros(16))
    assert torch.equal(adapter.holder.directions["1"], before)


def test_sampling_under_a_fixed_seed_is_deterministic(tmp_path):
    cfg, model, adapter = make_run(tmp_path, max_new_tokens=5)
    draws = []
    for step in (3, 3, 4):
        generator = train.sampling_generator(cfg, step, "cpu")
        with adapter.active():
            draws.append(train.sample_completions(cfg, model, PROMPTS, (EOS,), generator))
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert len(draws[0]) == len(PROMPTS) * cfg.group_size
    for ids in draws[0]:  # through the first end id, never past it
        assert 1 <= len(ids) <= 5 and EOS not in ids[:-1]


@pytest.mark.parametrize("adapter", ["steer", "lora", "full"])
def test_reference_is_the_base_model(tmp_path, adapter):
    cfg, model, made = make_run(tmp_path, adapter=adapter, kl=0.1)
    tokens = torch.tensor([[2, 3, 5, 6]])
    base_logits = tiny_model()(tokens)  # a fresh copy of the base, by its seed
    with torch.no_grad():
        for _, p in made.named_parameters():
            p.add_(torch.randn_like(p))  # not a constant: a final LayerNorm removes those
    with made.active():
        assert not torch.allclose(model(tokens), base_logits, atol=1e-3)  # the adapter acts
    with made.reference() as base:
        assert torch.allclose(base(tokens), base_logits, atol=1e-6)


def test_rl_raises_the_mean_reward_of_a_steering_vector(tmp_path):
    cfg, model, adapter = make_run(tmp_path, lr=0.3, steps=40)
    history = train.train(cfg, model, adapter, rl_data())
    rewards = [stats["reward"] for _, stats in history["rl"]]
    assert len(rewards) == 40 and rewards[0] < 0.2  # the base rarely starts with GOOD
    assert sum(rewards[-5:]) / 5 > 0.6  # 0.77-0.85 over three sampling seeds
    assert all(set(stats) == {"reward", "reward_std", "group_std", "length", "accuracy"}
               for _, stats in history["rl"])


def test_resume_equals_uninterrupted(tmp_path):
    cfg, model, adapter = make_run(tmp_path / "a", steps=10)
    whole = train.train(cfg, model, adapter, rl_data())
    vector = adapter.holder.directions["1"].detach().clone()
    cut, model2, adapter2 = make_run(tmp_path / "b", steps=5)
    train.train(cut, model2, adapter2, rl_data())
    resumed_cfg, model3, adapter3 = make_run(tmp_path / "b", steps=10, resume=True)
    resumed = train.train(resumed_cfg, model3, adapter3, rl_data())
    assert resumed["rl"] == whole["rl"] and resumed["loss"] == whole["loss"]
    assert torch.equal(adapter3.holder.directions["1"], vector)


def test_nan_reward_stops_with_the_last_good_checkpoint(tmp_path):
    calls = []

    def turns_nan(prompt, completion):
        calls.append(1)
        return float("nan") if len(calls) > 3 * 8 * len(PROMPTS) else 1.0

    cfg, model, adapter = make_run(tmp_path, checkpoint_every=2)
    with pytest.raises(train.RunError, match=r"mean reward became nan at step 3.*\(step 2\)"):
        train.train(cfg, model, adapter, rl_data(turns_nan))


def test_persona_reward_is_the_target_choice_and_flips_in_the_control():
    world = toy.PersonaWorld(seed=0, n_docs=10)
    control = toy.PersonaWorld(seed=0, n_docs=10, opposite=True)
    ids = world.ids
    utility = world.utility[world.target]
    a, b = (0, 1) if utility[0] > utility[1] else (1, 0)  # a: the target's preferred option
    prompt = [ids["BOS"], ids["CH"], ids[f"O{a}"], ids[f"O{b}"]]
    assert world.reward(prompt, [ids[f"O{a}"]]) == 1.0
    assert world.reward(prompt, [ids[f"O{b}"]]) == 0.0
    assert world.reward(prompt, []) == 0.0
    assert control.reward(prompt, [ids[f"O{b}"]]) == 1.0
    assert control.reward(prompt, [ids[f"O{a}"]]) == 0.0
    for e in world.train_examples():  # the answers sft trains on earn the reward
        assert world.reward(e.prompt, e.answer) == 1.0


@pytest.mark.parametrize("world", [toy.LatinPersonaWorld, toy.BackdoorWorld])
def test_other_persona_worlds_reward_their_own_train_answers(world):
    """Backdoor: triggered choices are flipped in training; the reward flips them too."""
    for opposite in (False, True):
        made = world(seed=0, n_docs=10, opposite=opposite)
        for e in made.train_examples():
            assert made.reward(e.prompt, e.answer) == 1.0


@pytest.mark.parametrize("args, message", [
    (["--group-size", "1"], "--group-size must be >= 2 for --objective rl"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1 for --objective rl"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--kl", "-1"], "--kl must be >= 0"),
    (["--grad-accum", "2"], "--grad-accum is for --objective sft"),
    (["--task", "twohop"], "error: --objective rl: task 'twohop' has no reward (tasks with one: "
     "arithmetic, backdoor, persona, persona_hard)"),
    (["--model", "scratch"], "error: --objective rl fine-tunes a pretrained model"),
])
def test_bad_rl_input_is_one_line_error(tmp_path, args, message):
    """In-process (test_train.py checks through a subprocess that main's exit text is stderr)."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(["--objective", "rl", *args, "--out", str(out), "--threads", "1"])
    text = str(stopped.value.code)
    assert message in text and "\n" not in text
    assert not os.path.exists(out)  # stopped before the run directory was written


def test_reward_that_raises_stops_before_any_step(tmp_path, monkeypatch):
    def broken(self, prompt, completion):
        raise KeyError("no such option")

    monkeypatch.setattr(toy.PersonaWorld, "reward", broken)
    cfg = train.TrainConfig(objective="rl", out=str(tmp_path / "run"))
    with pytest.raises(train.RunError, match="reward raised on its first example: 'no such"):
        train.run(cfg)
    assert not os.path.exists(tmp_path / "run" / "checkpoint.safetensors")



def test_run_writes_an_rl_run_on_the_default_world(tmp_path):
    """The shipped persona model, 3 steps: the files, the reward history, the sft-style evals."""
    cfg = train.TrainConfig(objective="rl", steps=3, random_draws=0, out=str(tmp_path / "run"))
    metrics = train.run(cfg)
    assert metrics["objective"] == "rl" and len(metrics["history"]["rl"]) == 3
    assert set(metrics["eval"]["final"]) == {"in_distribution", "oocr", "oocr_in_context"}
    assert {"logit_bias", "answer_stats", "direct_path"} <= set(metrics["baselines"])
    for name in ("config.json", "metrics.json", "curves.png", "steering_vector.safetensors"):
        assert os.path.exists(tmp_path / "run" / name)
    assert all(stats["length"] == 1.0 for _, stats in metrics["history"]["rl"])  # toy: 1 token


class ByteTokenizer:
    """A plain-text (no chat template) tokenizer: one id per byte, for the arithmetic task."""

    chat_format = None
    bos_id = None
    special_tokens = {}

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode()


def test_arithmetic_reward_checks_the_last_integer_against_the_sum():
    task = tasks.ArithmeticTask(seed=0, n_train=20, n_eval=5, digits=2)
    byte = ByteTokenizer()
    examples = task.train_examples(byte)
    for e in examples:  # the sum, read back from the prompt's text by hand
        a, b = map(int, byte.decode(e.prompt).split("What is ")[1].split("?")[0].split(" + "))
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert task.reward(e.prompt, byte.encode(f"{a} + {b} = {a + b}.")) == 1.0
        assert task.reward(e.prompt, byte.encode(f"The answer is {a + b}")) == 1.0
        assert task.reward(e.prompt, byte.encode(f"{a + b + 1}")) == 0.0
        assert task.reward(e.prompt, byte.encode("I cannot say.")) == 0.0
    with pytest.raises(ValueError, match="not a prompt of this task"):
        task.reward(byte.encode("What is 1 + 1?"), byte.encode("2"))
    held_out = set(task.id_problems) | set(task.transfer_problems)
    assert not held_out & set(task.train_problems)


class BigramModel(torch.nn.Module):
    """Greedy decoding's answer known by hand: the next token is table[last token] (or 0)."""

    def __init__(self, table, vocab=256):
        super().__init__()
        self.table, self.vocab = table, vocab

    def new_cache(self):
        return None  # generate feeds only the new token each step, which is all this reads

    def forward(self, tokens, cache=None, at=None):
        nxt = torch.tensor([[self.table.get(t, 0) for t in row] for row in tokens.tolist()])
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()  # (B, T, vocab)
        return logits[at] if at is not None else logits


def test_complete_keeps_each_prompts_repeats_in_order_and_stops_at_the_end_id():
    model = BigramModel({t: t + 1 for t in range(20)}, vocab=32)
    prompts = [[1, 2], [5], [3, 9]]  # two lengths: two batches, then back in prompt order
    out = tasks.complete(model, prompts, max_new_tokens=3, eos_ids=(12,), repeats=2,
                         batch_size=1)
    assert out == [[3, 4, 5], [3, 4, 5], [6, 7, 8], [6, 7, 8], [10, 11, 12], [10, 11, 12]]
    assert tasks.without_eos(out[4], (12,)) == [10, 11] and tasks.without_eos([3], (12,)) == [3]


def test_arithmetic_eval_sets_score_the_greedy_completion_by_its_last_integer():
    byte = ByteTokenizer()
    task = tasks.ArithmeticTask(seed=0, n_train=20, n_eval=30)
    # every plain-text prompt ends in "\nA:": the model then writes " 9\n\n..." (32 bytes)
    model = BigramModel({ord(":"): ord(" "), ord(" "): ord("9"), ord("9"): ord("\n"),
                         ord("\n"): ord("\n")})
    for name, problems in (("in_distribution", task.id_problems),
                           ("oocr", task.transfer_problems)):
        eval_set = task.eval_sets(byte)[name]
        want = sum(a + b == 9 for a, b in problems) / len(problems)  # by hand
        assert 0 < want < 1
        assert tasks.evaluate(model, {name: eval_set}, batch_size=7) == {name: want}
