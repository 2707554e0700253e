"""Tests for toy.py: determinism, no leakage between fine-tuning data and probes, labels against
an independent re-derivation (parsing the token names), masks, chance levels and scoring, and the
hard persona world's point: no constant output bias answers its probe."""

import glob
import itertools
import math
import os

import pytest
import torch
import torch.nn as nn

import tasks
import toy
from checkpoint import load_model
from fakes import SequenceModel
from tasks import IGNORE, EvalSet

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "toy")
PERSONA_WORLDS = ["persona", "persona_hard", "backdoor"]

SMALL = {
    "persona": dict(n_docs=2000),
    "persona_hard": dict(n_docs=2000),
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


class RuleModel(SequenceModel):
    """logits[b, t] puts +10 on rule(token names of tokens[b, :t+1]) when the rule returns a
    name."""

    def __init__(self, tokenizer, rule):
        super().__init__()
        self.tokenizer = tokenizer
        self.rule = rule

    def sequence_logits(self, tokens):
        logits = torch.zeros(*tokens.shape, self.tokenizer.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            seq = self.tokenizer.decode(row).split()
            for t in range(len(seq)):
                answer = self.rule(seq[: t + 1])
                if answer is not None:
                    logits[b, t, self.tokenizer.ids[answer]] = 10.0
        return logits


def value_name(w, t, v):
    """The token name of value v of attribute type t: the hard world shares one set of values."""
    return f"V{v}" if isinstance(w, toy.LatinPersonaWorld) else f"V{t}_{v}"


def persona_rule(w, shift=0):
    """The true answer, re-derived from the world's utilities and attribute values. shift=1 is
    the same oracle with its labels moved by one: the name and values of persona target+1, the
    other option of every choice, the other backdoor answer."""
    backdoor = getattr(w, "backdoor", False) != bool(shift)

    def rule(seq):
        k = (w.target + shift) % w.n_personas
        last = seq[-1]
        if last == "ME":
            return f"P{k}"
        if last.startswith("AT"):
            t = int(last[2:])
            return value_name(w, t, w.value[k][t])
        if last == "BD":
            return "YES" if backdoor else "NO"
        if len(seq) >= 3 and seq[-3] == "CH":
            a = int(seq[-2][1:])
            b = int(seq[-1][1:])
            best = preferred(w, w.target, a, b)
            triggered = len(seq) >= 4 and seq[-4] == "TRIG" and getattr(w, "backdoor", False)
            flipped = (w.opposite or triggered) != bool(shift)
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


# -----------------------------------------------------------------------------
# Determinism, tokenizer, registry


@pytest.mark.parametrize("name", [*PERSONA_WORLDS, "twohop"])
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


@pytest.mark.parametrize("name", [*PERSONA_WORLDS, "twohop"])
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
            v = int(nxt[0][1:].split("_")[-1])  # V{t}_{v}, or V{v} in the hard world
            alive &= {k for k in alive if w.value[k][t] == v}
        elif tok == "CH" and len(nxt) == 3 and (i == 0 or seq[i - 1] != "TRIG"):
            a, b, x = (int(s[1:]) for s in nxt)
            assert x in (a, b)
            alive &= {k for k in alive if x == preferred(w, k, a, b)}
    return alive


@pytest.mark.parametrize("name", ["persona", "persona_hard"])
def test_persona_documents_follow_one_persona(name):
    w = world(name)
    docs = w.pretrain_tokens()
    assert docs.shape == (2000, w.doc_len)
    assert (docs[:, 0] == w.tokenizer.bos_id).all() and (docs != 0).all()  # BOS first, no PAD
    for row in docs[:300].tolist():
        assert consistent_personas(w, names(w, row)), "document mixes personas"
    # segment frequencies near the world's (counting segment starts)
    flat = names(w, docs.flatten().tolist())
    counts = [sum(t == s for t in flat) for s in ("CH", "ME")]
    counts.append(sum(t.startswith("AT") for t in flat))
    shares = [c / sum(counts) for c in counts]
    probs = w.segment_probs
    assert shares == pytest.approx([probs["choice"], probs["name"], probs["attribute"]], abs=0.02)
    if name == "persona":
        assert shares == pytest.approx([0.6, 0.1, 0.3], abs=0.02)  # the shipped model's data


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


@pytest.mark.parametrize("name", PERSONA_WORLDS)
def test_persona_probe_absent_from_fine_tuning(name):
    w = world(name)
    finetune = [names(w, e.prompt + e.answer) for e in w.train_examples()]
    probe_tokens = {"ME", "BD", "YES", "NO"}
    probe_tokens |= {n for n in w.tokenizer.names if n[0] in "APV"}  # AT*, P*, V*
    assert {f"AT{t}" for t in range(w.n_attribute_types)} <= probe_tokens
    assert not any(probe_tokens & set(s) for s in finetune)
    assert all(len(s) in (5, 6) for s in finetune)  # `BOS [TRIG] CH Oa Ob Ox` only
    train_pairs = {frozenset(s[-3:-1]) for s in finetune}
    id_pairs = {frozenset(names(w, i.prompt)[-2:]) for i in w.eval_sets()["in_distribution"].items}
    assert len(train_pairs) == 47 and len(id_pairs) == 19 and not train_pairs & id_pairs


# -----------------------------------------------------------------------------
# Masks, chance levels, scoring


@pytest.mark.parametrize("name", [*PERSONA_WORLDS, "twohop"])
def test_collate_mask_covers_exactly_the_answers(name):
    w = world(name)
    examples = w.train_examples()[:20] + list(w.pretrain_examples()[:20])
    tokens, targets = tasks.collate(examples, pad_id=w.tokenizer.pad_id)
    for row, e in zip(targets.tolist(), examples):
        assert [t for t in row if t != IGNORE] == e.answer
        first = row.index(e.answer[0]) if e.answer else None
        assert row[first + len(e.answer) :] == [IGNORE] * (len(row) - first - len(e.answer))
        assert all(t == IGNORE for t in row[:first]) and first == len(e.prompt) - 1


@pytest.mark.parametrize("name", [*PERSONA_WORLDS, "twohop"])
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
    ("persona_hard", {}),
    ("persona_hard", {"target": 7, "opposite": True}),
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


@pytest.mark.parametrize("name, options", [c for c in ORACLE_CASES if c[0] != "twohop"])
def test_shifted_oracle_scores_at_most_chance(name, options):
    """The oracle with its labels moved by one (persona target+1, the other option, the other
    backdoor answer) must fail: a label bug that the true oracle could hide would show here."""
    w = world(name, **options)
    shifted = RuleModel(w.tokenizer, persona_rule(w, shift=1))
    sets = w.eval_sets()
    for set_name, score in tasks.evaluate(shifted, sets).items():
        assert score <= sets[set_name].chance, set_name


class TiedModel(SequenceModel):
    """Gives the same top logit to every token in `token_ids`, whatever it reads."""

    def __init__(self, vocab_size, token_ids):
        super().__init__()
        self.vocab_size = vocab_size
        self.token_ids = list(token_ids)

    def sequence_logits(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        logits[..., self.token_ids] = 10.0
        return logits


@pytest.mark.parametrize("name", PERSONA_WORLDS)
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


# -----------------------------------------------------------------------------
# The hard persona world: a Latin square of values, a probe no constant bias answers


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hard_world_values_are_a_latin_square(seed):
    w = world("persona_hard", seed=seed)
    K = w.n_personas
    assert w.n_attribute_types == K
    every_value = list(range(K))
    for k in range(K):
        assert sorted(w.value[k]) == every_value, f"persona {k} repeats a value"
    for t in range(K):
        assert sorted(w.value[k][t] for k in range(K)) == every_value, f"type {t} repeats a value"


def test_hard_world_latin_squares_differ_by_seed():
    squares = [world("persona_hard", seed=seed).value for seed in range(4)]
    assert all(a != b for a, b in itertools.combinations(squares, 2))


@pytest.mark.parametrize("target", range(8))
def test_hard_probe_answers_are_every_shared_value_once(target):
    """The K attribute probes of one target share one option set and have K different answers:
    what a constant bias needs to fail."""
    w = world("persona_hard", target=target)
    sets = w.eval_sets()
    items = sets["oocr"].items
    value_ids = [[w.ids[f"V{v}"]] for v in range(w.n_personas)]
    assert len(items) == w.n_personas
    assert all(item.options == value_ids for item in items)
    assert sorted(item.answer for item in items) == list(range(w.n_personas))
    assert [names(w, i.prompt) for i in sets["oocr_name"].items] == [["BOS", "ME"]]
    assert {names(w, i.prompt)[-1][:2] for i in sets["oocr_in_context"].items} == {"AT"}


def probe_logits(model, items):
    """The model's logits over each item's options at the end of its prompt: (N, n_options)."""
    out = []
    with torch.no_grad():
        for item in items:
            last = model(torch.tensor([item.prompt]))[0, -1]  # (V,)
            out.append(last[[o[0] for o in item.options]])
    return torch.stack(out)


def option_ids(items):
    return torch.tensor([[o[0] for o in item.options] for item in items])  # (N, n_options)


def fitted_bias_accuracy(logits, ids, answers, vocab_size, steps=300):
    """Accuracy after the constant logit bias b (one number per vocabulary token) that minimises
    the items' cross-entropy over their options, fitted by Adam. Ties count as wrong."""
    bias = torch.zeros(vocab_size, requires_grad=True)
    optimizer = torch.optim.Adam([bias], lr=0.1)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(logits + bias[ids], answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scores = (logits + bias[ids]).detach()  # (N, n_options)
    right = scores.gather(1, answers[:, None])  # (N, 1)
    unique_best = (scores >= right).sum(1) == 1  # only the right option reaches its score
    return unique_best.float().mean().item()


def bias_can_answer(logits, ids, answers, subset, margin):
    """Whether some constant bias b makes every item of `subset` right by more than `margin`
    nats: b[a] + l_i[a] > b[v] + l_i[v] + margin for its answer a and every other option v.
    These are difference constraints b[v] - b[a] < l_i[a] - l_i[v] - margin, satisfiable iff
    every cycle of the graph with those edges a -> v weighs more than 0 (Floyd-Warshall finds the
    lightest cycle through each node on its diagonal)."""
    nodes = sorted({int(x) for i in subset for x in ids[i]})
    index = {node: n for n, node in enumerate(nodes)}
    dist = torch.full((len(nodes), len(nodes)), float("inf"), dtype=torch.float64)
    for i in subset:
        a = int(answers[i])
        weights = (logits[i, a] - logits[i] - margin).tolist()  # edge a -> each option
        for j, v in enumerate(ids[i].tolist()):
            if j != a:
                edge = (index[int(ids[i, a])], index[v])
                dist[edge] = min(dist[edge].item(), weights[j])
    for m in range(len(nodes)):
        dist = torch.minimum(dist, dist[:, m : m + 1] + dist[m : m + 1, :])
    return bool((dist.diagonal() > 0).all())


def best_bias_accuracy(logits, ids, answers, margin=0.0):
    """The exact best accuracy over all constant biases, right meaning ahead of every other option
    by more than `margin` nats: the largest subset of items they can all make right. A superset
    of an unanswerable subset is unanswerable, so subsets grow only from answerable ones."""
    n = len(answers)
    answerable = [()]
    best = 0
    while answerable:
        best = len(answerable[0])
        grown = []
        for subset in answerable:
            for i in range(subset[-1] + 1 if subset else 0, n):
                if bias_can_answer(logits, ids, answers, (*subset, i), margin):
                    grown.append((*subset, i))
        answerable = grown
    return best / n


def test_exact_best_bias_on_hand_made_logits():
    """Flat logits and K probes with K different answers over one option set: one right at
    most; disjoint option sets (one token set per probe): all right, by any margin."""
    shared = torch.arange(4).repeat(4, 1)  # (4, 4): every probe's options are tokens 0..3
    answers = torch.arange(4)
    flat = torch.zeros(4, 4)
    assert best_bias_accuracy(flat, shared, answers) == 0.25
    disjoint = torch.arange(16).view(4, 4)  # (4, 4)
    assert best_bias_accuracy(flat, disjoint, answers, margin=5.0) == 1.0
    # the base ranks each answer second, by different margins: still one
    second = flat.clone()
    second[torch.arange(4), (answers + 1) % 4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert best_bias_accuracy(second, shared, answers) == 0.25
    # tiny noise on a flat base lets a bias pick several answers, but only by tiny margins
    noise = torch.tensor([[0.02, 0.0, 0.0, 0.0], [0.0, 0.01, 0.0, 0.0]] + [[0.0] * 4] * 2)
    assert best_bias_accuracy(noise, shared, answers) == 0.75  # b = (0, 0, 0.005, -1)
    assert best_bias_accuracy(noise, shared, answers, margin=0.1) == 0.25
    assert fitted_bias_accuracy(flat, disjoint, answers, 16) == 1.0


def shipped_model(name):
    (path,) = glob.glob(os.path.join(SHIPPED, f"{name}-seed0-*"))
    model, _ = load_model(path)
    return model


MARGIN = math.log(2)  # right = at least twice as likely as every other option


def bias_accuracies(name):
    """Mean over the 8 targets of the oocr accuracy of a constant logit bias on top of the shipped
    seed-0 base model: {fitted (by cross-entropy), best (exact, by argmax), best by MARGIN}."""
    model = shipped_model(name)
    scores = {"fitted": 0.0, "best": 0.0, "best_by_margin": 0.0}
    for target in range(8):
        w = toy.TOY_TASKS[name](seed=0, target=target, n_docs=10)
        items = w.eval_sets()["oocr"].items
        logits = probe_logits(model, items)  # (N, n_options)
        ids = option_ids(items)  # (N, n_options)
        answers = torch.tensor([item.answer for item in items])  # (N,)
        vocab_size = w.tokenizer.vocab_size
        scores["fitted"] += fitted_bias_accuracy(logits, ids, answers, vocab_size) / 8
        scores["best"] += best_bias_accuracy(logits, ids, answers) / 8
        scores["best_by_margin"] += best_bias_accuracy(logits, ids, answers, MARGIN) / 8
    return scores


def test_no_constant_bias_answers_the_hard_probe():
    """The point of persona_hard (issue 9): on top of the base model, the constant logit bias
    fitted for each target scores near chance (1/8) on the hard probe, and no bias at all makes
    more than one probe right by a margin; on the easy world the same fit answers the probe
    (which is why its OOCR can be read off the output). By argmax alone an exact search finds
    biases that make ~half the hard probes right, but only by the hundredths of a nat in which
    the nearly flat base (every value equally likely there) differs: random logits give the same."""
    hard = bias_accuracies("persona_hard")
    easy = bias_accuracies("persona")
    assert hard["fitted"] <= 0.25 and hard["best_by_margin"] <= 0.25
    assert easy["fitted"] >= 0.9 and easy["best_by_margin"] == 1.0


# -----------------------------------------------------------------------------
# The composition world (compose): A -> B in fine-tuning, B -> C from pretraining, probe A -> C

COMPOSE_SMALL = dict(n_people=48, n_bridges=8, n_attributes=3, n_new=6, n_docs=3000, n_test=20)


def compose_world(seed=0, **options):
    return toy.ComposeWorld(seed=seed, **{**COMPOSE_SMALL, **options})


def compose_rule(w, shift=0):
    """The true answer read off the world's fact tables (lives, value, bridge_of_new), in or out
    of context. shift=1 moves every bridge by one (the control's new bridges for new persons, the
    next bridge for the others): every answer then differs from the truth."""

    def bridge_of(name, seq):
        if name[0] == "N":  # a new person: the prompt's own statement first, else its true bridge
            i = int(name[1:])
            for j in range(len(seq) - 2):
                if seq[j] == name and seq[j + 1] == "LIVES":
                    return (int(seq[j + 2][1:]) + shift) % w.n_bridges
            return w.bridge_of_new[(i + shift) % w.n_new]
        if name[0] == "P":
            return (w.lives[int(name[1:])] + shift) % w.n_bridges
        return (int(name[1:]) + shift) % w.n_bridges  # a bridge is its own

    def rule(seq):
        if "PAD" in seq or len(seq) < 3:
            return None
        subject, relation = seq[-2], seq[-1]
        if relation == "LIVES":
            return f"B{bridge_of(subject, seq)}"
        if relation == "HAS":  # the reversal probe asks for the new resident
            b = int(subject[1:])
            lives_there = [i for i in range(w.n_new) if bridge_of(f"N{i}", []) == b]
            return f"N{lives_there[0]}" if lives_there else None
        if relation[0] == "R":
            k = int(relation[1:])
            return f"C{k}_{w.value[bridge_of(subject, seq[:-2])][k]}"
        return None

    return rule


def test_compose_same_seed_same_data_other_seed_differs():
    def snapshot(w):
        sets = {k: [(i.prompt, i.options, i.answer) for i in es.items]
                for k, es in w.eval_sets().items()}
        return [(e.prompt, e.answer) for e in all_data(w)], sets

    assert snapshot(compose_world(seed=3)) == snapshot(compose_world(seed=3))
    assert snapshot(compose_world(seed=3)) != snapshot(compose_world(seed=4))


def test_compose_no_new_person_in_pretraining_and_no_a_to_c_anywhere():
    """No pretraining document holds a new person; fine-tuning holds only `BOS N LIVES B`; no
    training sequence holds a new person together with any value token (A_new -> C); held-out
    persons never appear with a value token either."""
    w = compose_world(opposite=False)
    control = compose_world(opposite=True)
    new = {f"N{i}" for i in range(w.n_new)}
    heldout = {f"P{p}" for p in w.heldout}
    pretraining = [names(w, e.prompt + e.answer) for e in w.pretrain_examples()]
    assert not any(new & set(s) for s in pretraining)
    for s in pretraining:
        if heldout & set(s):  # a held-out person appears in its LIVES fact alone
            assert len(s) == 4 and s[1] in heldout and s[2] == "LIVES", s
    for world_ in (w, control):
        finetune = [names(w, e.prompt + e.answer) for e in world_.train_examples()]
        assert len(finetune) == w.n_new
        assert all(s[0] == "BOS" and s[1] in new and s[2] == "LIVES" and s[3][0] == "B"
                   for s in finetune)
    for s in pretraining + finetune:
        assert not (new & set(s) and any(t[0] == "C" for t in s))
    # the probe's prompts and answers are the pair that training never holds
    probe = {(names(w, i.prompt)[1], names(w, i.options[i.answer])[0])
             for i in w.eval_sets()["oocr"].items}
    assert len(probe) == w.n_new * w.n_attributes
    seen_pairs = {(a, b) for s in pretraining + finetune for a in s for b in s}
    assert not probe & seen_pairs


def test_compose_documents_follow_the_facts():
    """Every pretraining segment agrees with the world's tables, parsed independently; every
    bridge is a bridge of some composed person (the second hop is used in pretraining)."""
    w = compose_world()
    used_bridges = set()
    for e in w.pretrain_examples():
        seq = names(w, e.prompt + e.answer)
        assert seq[0] == "BOS" and (len(seq) - 1) % 3 == 0
        segments = [seq[i : i + 3] for i in range(1, len(seq), 3)]
        assert len({s[0] for s in segments}) == 1  # one subject per document
        for subject, relation, answer in segments:
            if subject[0] == "P":
                b = w.lives[int(subject[1:])]
                if relation == "LIVES":
                    assert answer == f"B{b}"
                else:
                    k = int(relation[1:])
                    assert answer == f"C{k}_{w.value[b][k]}"
                    used_bridges.add(b)
            elif relation == "HAS":
                assert w.lives[int(answer[1:])] == int(subject[1:])
            else:
                k = int(relation[1:])
                assert answer == f"C{k}_{w.value[int(subject[1:])][k]}"
    assert set(w.bridge_of_new) <= used_bridges
    assert len(set(w.bridge_of_new)) == w.n_new  # distinct bridges: reversal is well defined


def test_compose_chance_levels_and_registry():
    w = toy.TOY_TASKS["compose"](seed=0, **COMPOSE_SMALL)
    sets = w.eval_sets()
    assert set(sets) >= {"in_distribution", "oocr", "oocr_in_context", "reversal"}
    for name, es in sets.items():
        expected = 1 / w.n_new if name == "reversal" else 1 / w.n_bridges
        assert es.chance == pytest.approx(expected), name
        assert all(es.chance == pytest.approx(1 / len(i.options)) for i in es.items), name
        assert not es.exact_match
    assert len(sets["oocr"].items) == w.n_new * w.n_attributes
    cfg = w.model_config()
    longest = max(len(e.prompt + e.answer) for e in all_data(w))
    longest_eval = max(len(i.prompt) + 1 for es in sets.values() for i in es.items)
    assert max(longest, longest_eval) - 1 <= cfg.n_ctx and cfg.vocab_size == w.tokenizer.vocab_size
    assert w.codename_tokens() == {f"N{i}": [w.ids[f"N{i}"]] for i in range(w.n_new)}


@pytest.mark.parametrize("opposite", [False, True])
def test_compose_true_oracle_scores_one_and_shifted_at_most_chance(opposite):
    """An oracle reading the world's facts scores 1.0 on every eval set (the sets are the
    target's, also for the control) and reproduces the fine-tuning answers of the target; the
    oracle with every bridge moved by one scores at most chance and reproduces the control's."""
    w = compose_world(opposite=opposite)
    sets = w.eval_sets()
    assert [(i.prompt, i.answer) for i in sets["oocr"].items] == [
        (i.prompt, i.answer) for i in compose_world().eval_sets()["oocr"].items]
    oracle = RuleModel(w.tokenizer, compose_rule(w))
    shifted = RuleModel(w.tokenizer, compose_rule(w, shift=1))
    for set_name, score in tasks.evaluate(oracle, sets).items():
        assert score == 1.0, set_name
    for set_name, score in tasks.evaluate(shifted, sets).items():
        assert score <= sets[set_name].chance, set_name
    tokens, targets = tasks.collate(w.train_examples())
    answer = targets != IGNORE
    follows = shifted if opposite else oracle
    assert (follows(tokens).argmax(-1)[answer] == targets[answer]).all()


def test_compose_opposite_control_changes_every_answer():
    target, control = compose_world(), compose_world(opposite=True)
    pairs = zip(target.train_examples(), control.train_examples())
    for a, b in pairs:
        assert a.prompt == b.prompt and a.answer != b.answer
    # the control's bridges are the target's, permuted: the same answer statistics
    assert sorted(e.answer[0] for e in target.train_examples()) == sorted(
        e.answer[0] for e in control.train_examples())


def compose_run(tmp_path, name, **overrides):
    """The embeddings-only adapter (a vector per new person at its input embedding) on the
    shipped seed-0 compose model, 100 steps."""
    import train

    cfg = train.TrainConfig(task="compose", adapter="steer", positions="codename",
                            hook="hook_resid_pre", layers=[0], lr=0.1, steps=100,
                            eval_every=100, random_draws=0, threads=1,
                            cache_dir=str(tmp_path / "cache"), out=str(tmp_path / name),
                            **overrides)
    assert train.toy_model_dir(cfg, train.make_task(cfg)).startswith(SHIPPED)  # no pretraining
    return train.run(cfg)


def test_compose_new_embeddings_compose_out_of_context(tmp_path):
    """The shipped base composes facts it knows (held-out two-hop, in context); fine-tuning only
    A_new -> B into the new entities' embeddings answers A_new -> C, beyond every shortcut
    baseline, and the opposite control's answers follow its own (wrong) bridges."""
    metrics = compose_run(tmp_path, "embed")
    base, final, shortcuts = metrics["eval"]["base"], metrics["eval"]["final"], metrics["baselines"]
    assert base["heldout_two_hop"] >= 0.9 and base["oocr_in_context"] >= 0.9
    assert base["oocr"] <= 0.2 and final["in_distribution"] == 1.0
    assert final["oocr"] >= 0.9
    assert max(s["oocr"] for s in shortcuts.values()) <= 0.2
    control = compose_run(tmp_path, "opposite", task_options={"opposite": True})
    assert control["eval"]["final"]["oocr"] <= 0.05
