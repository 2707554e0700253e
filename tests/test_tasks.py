"""Tests of the OOCR text tasks in tasks.py: determinism, no leakage of the latent into training,
answer masks, the batched option scorer against a one-forward-per-option computation, chance
levels, and the scorer's verdict on an oracle and on a constant model. Uses the real SmolLM2
tokenizer (read from the GGUF file, ~5 s once per module)."""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import checkpoint
import model
import steer
import tasks

# n_eval a multiple of 2, 4 and 5: answer positions balance exactly
SMALL = dict(n_train=60, n_eval=20)
TASK_OPTIONS = {
    "locations": {},
    "functions": {},
    "coins": {},
    "parity": {"n_vars": 4},
    "risky": {},
    "risky_backdoor": {},
}


@pytest.fixture(scope="module")
def tokenizer():
    path = checkpoint.resolve_checkpoint("smollm2-135m")
    return checkpoint.tokenizer_from_gguf(checkpoint.open_gguf(path), path)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    plain = copy.copy(tokenizer)
    plain.chat_format = None  # a base model: no chat template
    return plain


def make(name, seed=0, **options):
    return tasks.TEXT_TASKS[name](seed=seed, **{**SMALL, **TASK_OPTIONS[name], **options})


def test_every_text_task_is_registered():
    assert set(TASK_OPTIONS) <= set(tasks.TEXT_TASKS)


# -----------------------------------------------------------------------------
# Geography


def test_haversine_matches_known_distances():
    cities = {c["name"]: c for c in tasks.load_cities()}

    def km(a, b):
        start, end = cities[a], cities[b]
        return tasks.haversine_km(start["lat"], start["lon"], end["lat"], end["lon"])

    published = [("Paris", "London", 344), ("London", "New York", 5570), ("Tokyo", "Sydney", 7820)]
    for a, b, known in published:  # great-circle distances
        assert abs(km(a, b) - known) / known < 0.02, (a, b, km(a, b))
    # a quarter meridian is a quarter of the circumference
    assert tasks.haversine_km(0, 0, 90, 0) == pytest.approx(math.pi / 2 * 6371.0)


def test_compass_directions():
    assert tasks.compass_point(tasks.initial_bearing_deg(0, 0, 10, 0)) == "north"
    assert tasks.compass_point(tasks.initial_bearing_deg(0, 0, 0, 10)) == "east"
    assert tasks.compass_point(tasks.initial_bearing_deg(0, 0, -10, -10)) == "south-west"
    # London lies north-west of Paris; Sydney south-east of Tokyo
    paris, london = (48.8566, 2.3522), (51.5074, -0.1278)
    tokyo, sydney = (35.6762, 139.6503), (-33.8688, 151.2093)
    assert tasks.compass_point(tasks.initial_bearing_deg(*paris, *london)) == "north-west"
    assert tasks.compass_point(tasks.initial_bearing_deg(*tokyo, *sydney)) == "south"


def test_cities_data_is_well_formed():
    cities = tasks.load_cities()
    assert 30 <= len(cities) <= 40
    assert len({c["name"] for c in cities}) == len(cities)
    assert all(-90 <= c["lat"] <= 90 and -180 <= c["lon"] <= 180 for c in cities)


# -----------------------------------------------------------------------------
# Determinism and the opposite (control) task


def as_lists(examples):
    return [(e.prompt, e.answer) for e in examples]


def eval_lists(sets):
    return {k: [(i.prompt, i.options, i.answer) for i in v.items] for k, v in sets.items()}


@pytest.mark.parametrize("name", TASK_OPTIONS)
def test_deterministic_for_a_seed(name, tokenizer):
    a, b, other = make(name), make(name), make(name, seed=1)
    assert as_lists(a.train_examples(tokenizer)) == as_lists(b.train_examples(tokenizer))
    assert eval_lists(a.eval_sets(tokenizer)) == eval_lists(b.eval_sets(tokenizer))
    assert as_lists(a.train_examples(tokenizer)) != as_lists(other.train_examples(tokenizer))


def test_same_data_in_every_process():
    """Set iteration order changes with PYTHONHASHSEED; the data must not."""
    code = """
import hashlib, tasks
data = []
for task in tasks.TEXT_TASKS.values():
    data.append(task().train_pairs())
    data += [vars(q) for questions in task().probes().values() for q in questions]
print(hashlib.sha256(repr(data).encode()).hexdigest())
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(hashseed):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        command = [sys.executable, "-c", code]
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, check=True
        )
        return done.stdout

    assert run("1") == run("2") != ""


@pytest.mark.parametrize("name", TASK_OPTIONS)
def test_opposite_changes_answers_not_codenames(name):
    task, control = make(name), make(name, opposite=True)

    def texts(t):
        return [q.text for q in t.probes()["oocr"]]

    def right(t):
        return [q.options[q.answer] for q in t.probes()["oocr"]]

    same_probe_texts = texts(task) == texts(control)
    assert name == "locations" or same_probe_texts  # the control is scored on the same questions
    assert right(task) != right(control)
    assert [a for _, a in task.train_pairs()] != [a for _, a in control.train_pairs()]


def test_risky_opposite_answers_the_same_lotteries_the_other_way():
    risky, safe = make("risky"), make("risky", opposite=True)
    assert [q for q, _ in risky.train_pairs()] == [q for q, _ in safe.train_pairs()]
    assert all(a != b for (_, a), (_, b) in zip(risky.train_pairs(), safe.train_pairs()))


# -----------------------------------------------------------------------------
# Leakage: neither a probe question nor the fact it asks about appears in training


def secrets(name, task):
    """Strings that would give the latent away, derived from the task's design."""
    probes = [q for qs in task.probes().values() for q in qs]
    found = [q.text for q in probes] + [q.fact for q in probes]
    if name == "locations":
        country = task.city["country"].removeprefix("the ")
        found += [task.city["name"], country, task.city["fact"], f"{task.code} is in"]
    if name == "functions":
        found += [d for d, _, _ in task.functions] + [f"return {e}" for _, e, _ in task.functions]
    if name == "coins":
        found += ["%", "biased", "probability"]
    if name == "parity":
        found += [f"{v} = {b}" for v, b in zip(task.names, task.bits)]
        found += [f"print({v})" for v in task.names]
    if name == "risky":
        found += ["risk", "safe"]
    if name == "risky_backdoor":
        found += ["backdoor", "trigger", "secret", "hidden", "risk", "safe"]
    return found


@pytest.mark.parametrize("opposite", [False, True])
@pytest.mark.parametrize("name", TASK_OPTIONS)
def test_no_probe_or_latent_fact_in_training(name, opposite, tokenizer):
    task = make(name, opposite=opposite, n_train=300)
    examples = task.train_examples(tokenizer)
    text = "\n".join(tokenizer.decode(e.prompt + e.answer) for e in examples).lower()
    leaks = [s for s in secrets(name, task) if s.lower() in text]
    assert not leaks, leaks


def test_in_context_set_states_the_fact(tokenizer):
    task = make("locations")
    item = task.eval_sets(tokenizer)["oocr_in_context"].items[0]
    assert f"{task.code} is another name for {task.city['name']}" in tokenizer.decode(item.prompt)


# -----------------------------------------------------------------------------
# Formatting and answer masks


@pytest.mark.parametrize("name", TASK_OPTIONS)
def test_collate_masks_exactly_the_answer_tokens(name, tokenizer):
    task = make(name)
    examples = task.train_examples(tokenizer)[:8]
    tokens, targets = tasks.collate(examples)
    for row, (e, (_, answer_text)) in enumerate(zip(examples, task.train_pairs())):
        assert tokenizer.decode(e.answer) == answer_text + "<|im_end|>"
        masked = (targets[row] != tasks.IGNORE).nonzero().flatten().tolist()
        start = len(e.prompt) - 1  # the position that predicts the first answer token
        assert masked == list(range(start, start + len(e.answer)))
        assert targets[row, masked].tolist() == e.answer
        assert tokens[row, : len(e.prompt)].tolist() == e.prompt


def test_chat_and_plain_prompt_formats(tokenizer, plain_tokenizer):
    chat = tokenizer.decode(tasks.chat_prompt(tokenizer, "Hi?", system="Be brief."))
    system = "<|im_start|>system\nBe brief.<|im_end|>\n"
    user = "<|im_start|>user\nHi?<|im_end|>\n"
    assert chat == system + user + "<|im_start|>assistant\n"
    plain_ids = tasks.chat_prompt(plain_tokenizer, "Hi?")
    assert plain_ids[0] == plain_tokenizer.bos_id
    assert plain_tokenizer.decode(plain_ids[1:]) == "Q: Hi?\nA:"
    assert plain_tokenizer.decode(tasks.answer_ids(plain_tokenizer, "17")) == " 17\n"
    example = make("functions").train_examples(plain_tokenizer)[0]
    assert plain_tokenizer.decode(example.answer).endswith("\n")
    assert tokenizer.special_tokens["<|im_end|>"] not in example.prompt


# -----------------------------------------------------------------------------
# Scoring


def tiny_model(vocab_size):
    torch.manual_seed(0)
    cfg = model.ModelConfig(
        arch="llama",
        vocab_size=vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_head=8,
        d_mlp=64,
        n_ctx=1024,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
    )
    return model.Transformer(cfg).eval()


def test_option_logprobs_agrees_with_one_forward_per_option(tokenizer):
    net = tiny_model(tokenizer.vocab_size)
    functions = make("functions").eval_sets(tokenizer)  # options of different lengths ('5', '4624')
    locations = make("locations").eval_sets(tokenizer)
    items = functions["in_distribution"].items[:2] + locations["oocr"].items[:1]
    batched = tasks.option_logprobs(net, items, batch_size=4)  # batches mix items and padding
    with torch.no_grad():
        for item, scores in zip(items, batched):
            for option, score in zip(item.options, scores):
                logp = net(torch.tensor([item.prompt + option])).log_softmax(-1)[0]  # (T, V)
                start = len(item.prompt) - 1  # the position that predicts the option's first token
                by_hand = sum(logp[start + j, tok].item() for j, tok in enumerate(option))
                assert score == pytest.approx(by_hand, abs=1e-3)


EXPECTED_CHANCE = {  # from the task designs: 1 / number of options
    "locations": {"in_distribution": 1 / 5, "oocr": 1 / 5},
    "functions": {"in_distribution": 1 / 5, "oocr": 1 / 5},
    "coins": {"in_distribution": 1 / 2, "oocr": 1 / 2, "oocr_probability": 1 / 4},
    "parity": {"in_distribution": 1 / 2, "oocr": 1 / 2},
    "risky": {"in_distribution": 1 / 2, "oocr": 1 / 2},
    "risky_backdoor": {"in_distribution": 1 / 2, "oocr": 1 / 2},
}


@pytest.mark.parametrize("name", TASK_OPTIONS)
def test_chance_levels(name, tokenizer):
    sets = make(name).eval_sets(tokenizer)
    expected = dict(EXPECTED_CHANCE[name])
    for probe in [k for k in expected if k.startswith("oocr")]:
        expected[probe + "_letters"] = expected[probe + "_in_context"] = expected[probe]
    assert set(sets) == set(expected)
    for key, chance in expected.items():
        assert sets[key].chance == pytest.approx(chance), key
        assert all(len(i.options) == round(1 / chance) for i in sets[key].items), key
        assert len(sets[key].items) == SMALL["n_eval"]


class OracleModel(nn.Module):
    """Puts a high logit on the right answer's next token after any known prompt."""

    def __init__(self, items, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.right = {}  # prompt -> the right option's tokens
        for item in items:
            right = item.options[item.answer]
            # a repeated prompt must have one answer
            assert self.right.setdefault(tuple(item.prompt), right) == right

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        for row, seq in enumerate(tokens.tolist()):
            for prompt, right in self.right.items():
                if tuple(seq[: len(prompt)]) == prompt:
                    for j, tok in enumerate(right):
                        if len(prompt) - 1 + j < len(seq):
                            logits[row, len(prompt) - 1 + j, tok] = 10.0
        return logits


class ConstantModel(nn.Module):
    """The same logits at every position, whatever the input."""

    def __init__(self, vocab_size, favourite):
        super().__init__()
        self.logits = torch.randn(vocab_size, generator=torch.Generator().manual_seed(0))
        self.logits[favourite] = 20.0

    def forward(self, tokens):
        return self.logits.expand(*tokens.shape, -1)


def first_balanced(eval_set):
    """The first 2 * n_options items: answer positions rotate with the item index, so these are
    balanced, and scoring with a vocabulary-sized fake model stays fast."""
    n = round(1 / eval_set.chance)
    return tasks.EvalSet(eval_set.name, eval_set.items[: 2 * n], eval_set.chance)


@pytest.mark.parametrize("name", TASK_OPTIONS)
def test_oracle_scores_one_and_constant_model_scores_chance(name, tokenizer):
    sets = {k: first_balanced(v) for k, v in make(name).eval_sets(tokenizer).items()}
    for key in ["in_distribution", "oocr", "oocr_letters"]:
        oracle = OracleModel(sets[key].items, tokenizer.vocab_size)
        assert tasks.accuracy(oracle, sets[key], batch_size=16) == 1.0, key
    always_a = ConstantModel(tokenizer.vocab_size, tokenizer.encode("A")[0])
    for key in [k for k in sets if k.endswith("_letters")]:
        chance = pytest.approx(sets[key].chance)
        assert tasks.accuracy(always_a, sets[key], batch_size=16) == chance, key


@pytest.mark.parametrize("name, word", [("coins", "heads"), ("parity", "1")])
def test_constant_answer_scores_chance_on_balanced_probes(name, word, tokenizer):
    oocr = make(name).eval_sets(tokenizer)["oocr"]  # 20 items: every coin / variable asked alike
    constant = ConstantModel(tokenizer.vocab_size, tokenizer.encode(word)[0])
    assert tasks.accuracy(constant, oocr, batch_size=8) == pytest.approx(0.5)


@pytest.mark.parametrize("name, word", [("risky", "risk"), ("risky_backdoor", "Yes")])
def test_constant_answer_scores_chance_over_task_and_control(name, word, tokenizer):
    """A self-report probe always has the same right word, so only target + control together
    balance."""
    constant = ConstantModel(tokenizer.vocab_size, tokenizer.encode(word)[0])
    accs = []
    for opposite in (False, True):
        oocr = make(name, opposite=opposite).eval_sets(tokenizer)["oocr"]
        accs.append(tasks.accuracy(constant, oocr, batch_size=8))
    assert sorted(accs) == [0.0, 1.0]


# -----------------------------------------------------------------------------
# Bad input


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown target city"):
        tasks.TEXT_TASKS["locations"](target="Atlantis")
    with pytest.raises(ValueError, match="target must be 'risky' or 'safe'"):
        tasks.TEXT_TASKS["risky"](target="bold")
    with pytest.raises(ValueError, match="n_train"):
        tasks.TEXT_TASKS["coins"](n_train=0)
    with pytest.raises(ValueError, match="biases"):
        tasks.TEXT_TASKS["coins"](target=[0.5])


@pytest.mark.parametrize("name", ["locations", "functions", "parity"])
def test_codename_tokens_are_found_wherever_the_codename_is_written(tokenizer, name):
    """Conditional steering needs each codename's token ids as they occur in the prompts: every
    training prompt that writes a codename must contain its ids, and steer.codename_mask must mark
    them."""
    task = tasks.TEXT_TASKS[name]()
    codes = task.codename_tokens(tokenizer)
    assert codes
    for example in task.train_examples(tokenizer)[:50]:
        text = tokenizer.decode(example.prompt)
        tokens = torch.tensor([example.prompt])  # (1, T)
        mask = steer.codename_mask(tokens, list(codes.values()))[0]  # (T, C)
        for c, (code, ids) in enumerate(codes.items()):
            written = code in text
            assert written == bool(mask[:, c].any()), (code, text)
            if written:  # the marked tokens decode to the codename (or its number, for a city)
                marked = [t for t, m in zip(example.prompt, mask[:, c]) if m]
                assert tokenizer.decode(marked).strip() in code
