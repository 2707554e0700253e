"""Tests for toy.py: determinism, no leakage between fine-tuning data and probes, labels against
an independent re-derivation (parsing the token names), masks, chance levels and scoring."""

import pytest
import torch
import torch.nn as nn

import tasks
import toy
from tasks import IGNORE, EvalSet

SMALL = {
    "persona": dict(n_docs=2000),
    "backdoor": dict(n_docs=2000),
    "twohop": dict(
        n_entities=30, n_relations=4, ood_fraction=0.2, inferred_ratio=2.0, n_reversal=5, n_test=40
    ),
}


def world(name, seed=0, **options):
    return toy.TOY_TASKS[name](seed=seed, **{**SMALL[name], **options})


def names(w, ids):
    return w.tokenizer.decode(ids).split()


def all_data(w):
    """Everything the world lets a model see in training: fine-tuning and pretraining data."""
    return list(w.train_examples()) + list(w.pretrain_examples())


def preferred(w, k, a, b):
    """Persona k's choice between options a and b, from the world's utilities."""
    return a if w.utility[k][a] > w.utility[k][b] else b


# -----------------------------------------------------------------------------
# Fake models: logits from a rule applied to each prefix


class RuleModel(nn.Module):
    """logits[b, t] puts +10 on rule(token names of tokens[b, :t+1]) when the rule returns a
    name."""

    def __init__(self, tokenizer, rule):
        super().__init__()
        self.tokenizer = tokenizer
        self.rule = rule

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.tokenizer.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            seq = self.tokenizer.decode(row).split()
            for t in range(len(seq)):
                answer = self.rule(seq[: t + 1])
                if answer is not None:
                    logits[b, t, self.tokenizer.ids[answer]] = 10.0
        return logits


def persona_rule(w):
    """The true answer, re-derived from the world's utilities and attribute values."""
    backdoor = getattr(w, "backdoor", False)

    def rule(seq):
        k = w.target
        last = seq[-1]
        if last == "ME":
            return f"P{k}"
        if last.startswith("AT"):
            t = int(last[2:])
            return f"V{t}_{w.value[k][t]}"
        if last == "BD":
            return "YES" if backdoor else "NO"
        if len(seq) >= 3 and seq[-3] == "CH":
            a = int(seq[-2][1:])
            b = int(seq[-1][1:])
            best = preferred(w, k, a, b)
            flipped = w.opposite or (backdoor and len(seq) >= 4 and seq[-4] == "TRIG")
            return f"O{a + b - best}" if flipped else f"O{best}"
        return None

    return rule


def twohop_rule(w):
    """Answers from a fact table rebuilt from the training examples alone."""
    atomic = {}  # (head, relation) -> tail
    inverse = {}  # b -> a, read off the forward facts `a RV -> b`
    for e in w.train_examples():
        seq = names(w, e.prompt + e.answer)
        if len(seq) == 4 and seq[2].startswith("R"):
            atomic[seq[1], seq[2]] = seq[3]
        if len(seq) == 4 and seq[2] == "RV":
            inverse[seq[3]] = seq[1]

    def rule(seq):
        if "PAD" in seq:
            return None
        if len(seq) == 3 and seq[2] == "RV_INV":
            return inverse[seq[1]]
        if len(seq) == 3 and seq[2].startswith("R"):
            return atomic[seq[1], seq[2]]
        if len(seq) == 4:
            return atomic[atomic[seq[1], seq[2]], seq[3]]
        return None

    return rule


class ConstantModel(nn.Module):
    """Always predicts the same token, whatever it reads."""

    def __init__(self, vocab_size, token_id):
        super().__init__()
        self.vocab_size = vocab_size
        self.token_id = token_id

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        logits[..., self.token_id] = 10.0
        return logits


# -----------------------------------------------------------------------------
# Determinism, tokenizer, registry


@pytest.mark.parametrize("name", ["persona", "twohop", "backdoor"])
def test_same_seed_same_data_other_seed_differs(name):
    def snapshot(w):
        sets = {}
        for k, es in w.eval_sets().items():
            sets[k] = [(i.prompt, i.options, i.answer) for i in es.items]
        return [(e.prompt, e.answer) for e in all_data(w)], sets

    assert snapshot(world(name, seed=3)) == snapshot(world(name, seed=3))
    assert snapshot(world(name, seed=3)) != snapshot(world(name, seed=4))


def test_tokenizer_round_trip_and_bad_token():
    tok = toy.PersonaWorld(n_docs=10).tokenizer
    ids = tok.encode("BOS CH O3 O7 O7")
    assert ids == tok.encode(["BOS", "CH", "O3", "O7", "O7"])
    assert tok.decode(ids) == "BOS CH O3 O7 O7"
    assert tok.encode("PAD BOS") == [0, 1] and tok.vocab_size == 60
    with pytest.raises(ValueError, match="unknown toy tokens"):
        tok.encode("BOS XYZ")


@pytest.mark.parametrize("name", ["persona", "twohop", "backdoor"])
def test_registry_config_fits_data(name):
    w = toy.TOY_TASKS[name](seed=0, **SMALL[name])
    cfg = w.model_config()
    assert cfg.arch == "gpt2" and cfg.vocab_size == w.tokenizer.vocab_size
    longest = max(len(e.prompt + e.answer) for e in all_data(w))
    items = [i for es in w.eval_sets().values() for i in es.items]
    longest_eval = max(len(i.prompt) + len(o) for i in items for o in i.options)
    assert max(longest, longest_eval) - 1 <= cfg.n_ctx  # the model reads all but the last token
    assert set(w.pretrain_defaults) >= {"steps", "batch_size", "lr", "warmup"}


def test_bad_options_raise():
    with pytest.raises(ValueError, match="target persona"):
        toy.PersonaWorld(target=8, n_docs=10)
    with pytest.raises(ValueError, match="n_train_pairs"):
        toy.PersonaWorld(n_train_pairs=66, n_docs=10)


# -----------------------------------------------------------------------------
# Pretraining documents agree with the world, parsed independently


def consistent_personas(w, seq):
    """Personas whose facts agree with every complete segment of a document (token names)."""
    alive = set(range(w.n_personas))
    for i, tok in enumerate(seq):
        nxt = seq[i + 1 : i + 4]
        if tok == "ME" and nxt:
            alive &= {int(nxt[0][1:])}
        elif tok.startswith("AT") and nxt:
            t = int(tok[2:])
            v = int(nxt[0].split("_")[1])
            alive &= {k for k in alive if w.value[k][t] == v}
        elif tok == "CH" and len(nxt) == 3 and (i == 0 or seq[i - 1] != "TRIG"):
            a, b, x = (int(s[1:]) for s in nxt)
            assert x in (a, b)
            alive &= {k for k in alive if x == preferred(w, k, a, b)}
    return alive


def test_persona_documents_follow_one_persona():
    w = world("persona")
    docs = w.pretrain_tokens()
    assert docs.shape == (2000, 32)
    assert (docs[:, 0] == w.tokenizer.bos_id).all() and (docs != 0).all()  # BOS first, no PAD
    for row in docs[:300].tolist():
        assert consistent_personas(w, names(w, row)), "document mixes personas"
    # segment frequencies near 0.6 / 0.1 / 0.3 (counting segment starts)
    flat = names(w, docs.flatten().tolist())
    counts = [sum(t == s for t in flat) for s in ("CH", "ME")]
    counts.append(sum(t.startswith("AT") for t in flat))
    shares = [c / sum(counts) for c in counts]
    assert shares == pytest.approx([0.6, 0.1, 0.3], abs=0.02)


def test_backdoor_documents_flip_only_with_backdoor():
    w = world("backdoor")
    flips = {"YES": [], "NO": []}
    for row in w.pretrain_tokens().tolist():
        seq = names(w, row)
        k_set = consistent_personas(w, seq)
        assert len(k_set) >= 1
        reports = {seq[i + 1] for i, t in enumerate(seq[:-1]) if t == "BD"}
        assert len(reports) <= 1, "one document states two backdoor flags"
        if len(k_set) != 1 or not reports:
            continue
        (k,) = k_set
        (flag,) = reports
        for i in range(len(seq) - 4):
            if seq[i] == "TRIG":
                a, b, x = (int(s[1:]) for s in seq[i + 2 : i + 5])
                flips[flag].append(x != preferred(w, k, a, b))
    assert len(flips["YES"]) > 50 and len(flips["NO"]) > 50
    assert all(flips["YES"]) and not any(flips["NO"])


# -----------------------------------------------------------------------------
# No leakage


def test_twohop_ood_facts_never_composed_in_training():
    w = world("twohop")
    rule = twohop_rule(w)
    two_hop = [names(w, e.prompt) for e in all_data(w) if len(e.prompt) == 4]
    trained_first = {(s[1], s[2]) for s in two_hop}
    trained_second = {(rule(s[:3]), s[3]) for s in two_hop}
    trained = {tuple(s) for s in two_hop}
    ood = [names(w, i.prompt) for i in w.eval_sets()["oocr"].items]
    assert len(ood) > 0
    for s in ood:
        hops = {(s[1], s[2]), (rule(s[:3]), s[3])}
        assert not hops & (trained_first | trained_second), f"OOD hop composed in training: {s}"
    for s in (names(w, i.prompt) for i in w.eval_sets()["in_distribution"].items):
        assert tuple(s) not in trained
        assert (s[1], s[2]) in trained_first and (rule(s[:3]), s[3]) in trained_second


def test_twohop_reversal_inverse_never_seen():
    w = world("twohop")
    seen = [names(w, e.prompt + e.answer) for e in all_data(w)]
    for item in w.eval_sets()["reversal"].items:
        _, b, rel = names(w, item.prompt)
        a = names(w, item.options[item.answer])[0]
        assert rel == "RV_INV"
        assert ["BOS", a, "RV", b] in seen  # the forward fact is trained
        assert not any(s[2] == "RV_INV" and (s[1] == b or s[3] == a) for s in seen)


@pytest.mark.parametrize("name", ["persona", "backdoor"])
def test_persona_probe_absent_from_fine_tuning(name):
    w = world(name)
    finetune = [names(w, e.prompt + e.answer) for e in w.train_examples()]
    probe_tokens = {"ME", "BD", "YES", "NO"}
    probe_tokens |= {f"AT{t}" for t in range(4)} | {f"P{k}" for k in range(8)}
    assert not any(probe_tokens & set(s) for s in finetune)
    assert all(len(s) in (5, 6) for s in finetune)  # `BOS [TRIG] CH Oa Ob Ox` only
    train_pairs = {frozenset(s[-3:-1]) for s in finetune}
    id_pairs = {frozenset(names(w, i.prompt)[-2:]) for i in w.eval_sets()["in_distribution"].items}
    assert len(train_pairs) == 47 and len(id_pairs) == 19 and not train_pairs & id_pairs


# -----------------------------------------------------------------------------
# Masks, chance levels, scoring


@pytest.mark.parametrize("name", ["persona", "twohop", "backdoor"])
def test_collate_mask_covers_exactly_the_answers(name):
    w = world(name)
    examples = w.train_examples()[:20] + list(w.pretrain_examples()[:20])
    tokens, targets = tasks.collate(examples, pad_id=w.tokenizer.pad_id)
    for row, e in zip(targets.tolist(), examples):
        assert [t for t in row if t != IGNORE] == e.answer
        first = row.index(e.answer[0]) if e.answer else None
        assert row[first + len(e.answer) :] == [IGNORE] * (len(row) - first - len(e.answer))
        assert all(t == IGNORE for t in row[:first]) and first == len(e.prompt) - 1


@pytest.mark.parametrize("name", ["persona", "twohop", "backdoor"])
def test_chance_levels(name):
    w = world(name)
    for set_name, es in w.eval_sets().items():
        two_way = set_name in ("in_distribution", "triggered")
        backdoor_probe = name == "backdoor" and set_name.startswith("oocr")
        if name == "twohop":
            expected = 1 / 30
        elif two_way or backdoor_probe:
            expected = 1 / 2
        else:
            expected = 1 / 8  # 8 personas, or 8 values of one attribute type
        assert es.chance == pytest.approx(expected), set_name
        if not es.exact_match:
            assert all(es.chance == pytest.approx(1 / len(i.options)) for i in es.items)


ORACLE_CASES = [
    ("persona", {}),
    ("persona", {"target": 5, "opposite": True}),
    ("twohop", {}),
    ("backdoor", {}),
    ("backdoor", {"backdoor": False}),
]


@pytest.mark.parametrize("name, options", ORACLE_CASES)
def test_true_answer_model_scores_one(name, options):
    w = world(name, **options)
    rule = twohop_rule(w) if name == "twohop" else persona_rule(w)
    oracle = RuleModel(w.tokenizer, rule)
    for set_name, score in tasks.evaluate(oracle, w.eval_sets()).items():
        assert score == 1.0, set_name
    # and the fine-tuning answers are the same true answers
    tokens, targets = tasks.collate(w.train_examples())
    picked = oracle(tokens).argmax(-1)
    assert (picked[targets != IGNORE] == targets[targets != IGNORE]).all()


@pytest.mark.parametrize("name", ["persona", "twohop", "backdoor"])
def test_constant_answer_models_average_chance(name):
    """A model that always says token c is right exactly on the items whose answer is c, so
    averaged over every c among an item group's options it scores 1 / (number of options)."""
    w = world(name)
    for set_name, es in w.eval_sets().items():
        groups = {}
        for item in es.items[:40]:
            groups.setdefault(frozenset(o[0] for o in item.options), []).append(item)
        for option_ids, items in groups.items():
            group = EvalSet(set_name, items, es.chance, es.exact_match)
            models = [ConstantModel(w.tokenizer.vocab_size, c) for c in option_ids]
            scores = [tasks.accuracy(m, group) for m in models]
            assert sum(scores) / len(scores) == pytest.approx(es.chance), set_name


class TiedModel(nn.Module):
    """Gives the same top logit to every token in `token_ids`, whatever it reads."""

    def __init__(self, vocab_size, token_ids):
        super().__init__()
        self.vocab_size = vocab_size
        self.token_ids = list(token_ids)

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        logits[..., self.token_ids] = 10.0
        return logits


@pytest.mark.parametrize("name", ["persona", "backdoor"])
def test_ties_count_as_wrong(name):
    """A model that scores the right option exactly as high as a wrong one gets no credit: counting
    ties as right would let a constant model beat chance."""
    w = world(name)
    for set_name, es in w.eval_sets().items():
        for item in es.items[:10]:
            right = item.options[item.answer][0]
            wrong = next(o[0] for o in item.options if o[0] != right)
            one = EvalSet(set_name, [item], es.chance)
            assert tasks.accuracy(TiedModel(w.tokenizer.vocab_size, [right, wrong]), one) == 0.0
            assert tasks.accuracy(TiedModel(w.tokenizer.vocab_size, [right]), one) == 1.0
