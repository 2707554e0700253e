"""reproduce.py: a part's markdown from hand-written run records (mean ± spread and the verdict
against the shortcuts checked by hand), resumability, bad flags, the machine record. No training:
the parts here are cheap stand-ins."""

import os

import pytest
import torch

import reproduce
import sweep


def run_record(base_oocr, oocr, shortcuts):
    """A metrics.json-like record: base and tuned accuracies, and shortcut baselines whose
    oocr scores are `shortcuts` (bias, stats, direct, random mean, random 95th percentile)."""
    names = ("logit_bias", "answer_stats", "direct_path", "random_mean", "random_p95")
    return {"trainable_params": 64,
            "eval": {"base": {"in_distribution": 0.5, "oocr": base_oocr},
                     "final": {"in_distribution": 0.9, "oocr": oocr}},
            "baselines": {name: {"in_distribution": 0.5, "oocr": value}
                          for name, value in zip(names, shortcuts)}}


# two runs: oocr 0.6 and 0.8; best shortcuts 0.4 (rand95) and 0.2 (bias) -> margins 0.2 and 0.6
RUNS = [run_record(0.1, 0.6, (0.2, 0.3, 0.1, 0.1, 0.4)),
        run_record(0.3, 0.8, (0.2, 0.1, 0.0, 0.1, 0.1))]


def test_group_row_by_hand():
    row = reproduce.group_row("steer", RUNS, ("oocr",), "oocr")
    cells = [c.strip() for c in row.strip("|").split("|")]
    # oocr: base mean 0.2; tuned mean 0.7, sample sd sqrt(0.02) = 0.141
    assert cells[2] == "0.200 → 0.700 ± 0.141"
    # shortcut means: bias 0.2, stats 0.2, direct 0.05, rand95 0.25 (random_mean left out)
    assert cells[3] == "0.200 / 0.200 / 0.050 / 0.250"
    # margins 0.2 and 0.6: mean 0.4, sd sqrt(0.08) = 0.283 < 0.4 -> beats every shortcut
    assert cells[4] == "0.400 ± 0.283"
    assert cells[5] == "yes"


def test_verdict_by_hand():
    assert reproduce.verdict([0.1, -0.3]) == "no"  # mean -0.1
    assert reproduce.verdict([0.3, -0.1]) == "unclear"  # mean 0.1, sd 0.283
    assert reproduce.verdict([0.2]) == "yes"  # one run: its sign
    assert reproduce.verdict([0.0]) == "no"
    assert reproduce.verdict([None]) == "-"


def test_table_has_one_row_per_group():
    table = reproduce.group_table({"a": RUNS, "b": RUNS[:1]}, ("in_distribution", "oocr"), "oocr")
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| a |") and lines[3].startswith("| b |")
    assert "0.500 → 0.900 ± 0.000" in lines[3]


def test_paper_claims_from_numbers():
    acc = {"base": {"oocr": 0.0}, "lora": {"oocr": 0.5}, "natural": {"oocr": 0.4},
           "-natural": {"oocr": 0.0}}
    lost = dict(acc, lora={"oocr": 0.0})
    claim = reproduce.natural_vector_claim("persona", {"1": {"accuracy": lost},
                                                       "2": {"accuracy": acc}})
    assert "block 2: base 0.000, LoRA 0.500, natural 0.400, −natural 0.000 (keeps 80%)" \
        in claim.ours
    assert claim.verdict.startswith("the LoRA raises oocr above base and chance at 1 of 2 "
                                    "blocks; there the natural vector keeps at least half of its "
                                    "gain at 1, its negation at 0.")
    # a LoRA that lifts a below-chance base only to chance gains nothing; above it, the gain
    # counts from chance: (0.4 - 0.2) / (0.5 - 0.2)
    to_chance = dict(acc, lora={"oocr": 0.125})
    assert reproduce.natural_share(to_chance, chance=0.125) is None
    assert abs(reproduce.natural_share(acc, chance=0.2) - 2 / 3) < 1e-12
    table = {"100": {"oocr": 1.0}, "10": {"oocr": 0.75}, "1": {"oocr": 0.25}, "0": {"oocr": 0.0}}
    assert reproduce.effect_kept(table, "10", "oocr") == 0.75
    flat = {k: {"oocr": 0.5} for k in table}
    assert reproduce.effect_kept(flat, "10", "oocr") is None


def test_machine_record():
    m = reproduce.machine()
    assert m["torch"] == torch.__version__ and m["cores"] >= 1 and m["threads"] >= 1
    assert torch.__version__ in reproduce.machine_line(m)


@pytest.fixture
def cheap_part(monkeypatch):
    """A part that counts its calls and makes one figure, in place of the real parts."""
    calls = []

    def part(ctx):
        calls.append(ctx.quick)
        done = os.path.join(ctx.part_dir("cheap"), "done")  # a run to reuse, and one to train
        os.makedirs(done, exist_ok=True)
        with open(os.path.join(done, "metrics.json"), "w") as f:
            f.write('{"seconds": 7}')
        ctx.tally([done, os.path.join(ctx.out, "cheap", "new")])
        figure = os.path.join(ctx.part_dir("cheap"), "cheap.png")
        with open(figure, "wb") as f:
            f.write(b"png")
        return reproduce.Section(f"call {len(calls)}", [figure], {"n": len(calls)})

    monkeypatch.setattr(reproduce, "PARTS", {"cheap": reproduce.Part("1. cheap", part)})
    return calls


def test_resumable(cheap_part, tmp_path):
    results = tmp_path / "RESULTS.md"
    argv = ["--parts", "cheap", "--out", str(tmp_path / "out"), "--results", str(results)]
    reproduce.main(argv)
    assert cheap_part == [False] and "call 1" in results.read_text()
    assert "| 1 / 1 | 7 s |" in results.read_text()  # runs trained / reused, their seconds
    assert (tmp_path / "docs" / "results" / "cheap.png").exists()
    reproduce.main(argv)  # the record exists: skipped, its markdown reused
    assert cheap_part == [False] and "call 1" in results.read_text()
    reproduce.main(argv + ["--force"])
    assert cheap_part == [False, False] and "call 2" in results.read_text()
    reproduce.main(argv + ["--quick"])  # made at another scale: rerun
    assert cheap_part == [False, False, True]
    text = results.read_text()
    assert "This is a quick run" in text and "seeds: 0,1,2 → 0" in text
    assert torch.__version__ in text  # the machine line


def test_discussion_follows_the_full_study_only(cheap_part, tmp_path, monkeypatch):
    note = tmp_path / "discussion.md"
    note.write_text("## 7. Discussion\n\nwritten by hand\n")
    monkeypatch.setattr(reproduce, "DISCUSSION", str(note))
    results = tmp_path / "RESULTS.md"
    argv = ["--parts", "cheap", "--out", str(tmp_path / "out"), "--results", str(results)]
    reproduce.main(argv)
    assert results.read_text().endswith("call 1\n\n## 7. Discussion\n\nwritten by hand\n")
    reproduce.main(argv + ["--quick"])
    assert "written by hand" not in results.read_text()


def test_unrun_part_is_reported(cheap_part, tmp_path, monkeypatch):
    parts = dict(reproduce.PARTS, other=reproduce.Part("2. other", lambda ctx: None))
    monkeypatch.setattr(reproduce, "PARTS", parts)
    results = tmp_path / "RESULTS.md"
    reproduce.main(["--parts", "cheap", "--out", str(tmp_path), "--results", str(results)])
    assert "Not run (`python reproduce.py --parts other`)" in results.read_text()


def test_unknown_part_is_one_line():
    with pytest.raises(SystemExit) as exit:  # sys.exit(message): printed as one line
        reproduce.main(["--parts", "lora_vs_steering,nope"])
    message = str(exit.value.code)
    assert len(message.splitlines()) == 1 and "unknown part 'nope'" in message


def test_steering_vector_per_block_kind():
    """sweep.py's steer:L (the full study's per-block vectors), as reproduce.py labels it."""
    assert sweep.run_settings("steer:1", "persona", 0, 3, "").layers == [1]
    assert reproduce.kind_label("steer:1", "persona") == "`steer:1`: `--adapter steer --layers 1`"
    assert reproduce.kind_label("lora", "persona") == "`lora`: `--adapter lora` (all blocks)"
    with pytest.raises(ValueError, match="unknown run kind"):
        sweep.check_kind("steer:x")


def test_failing_part_is_one_line(monkeypatch, tmp_path):
    def broken(ctx):
        raise reproduce.train.RunError("--model x: no such checkpoint")

    monkeypatch.setattr(reproduce, "PARTS", {"broken": reproduce.Part("1. broken", broken)})
    with pytest.raises(SystemExit) as exit:
        reproduce.main(["--out", str(tmp_path), "--results", str(tmp_path / "R.md")])
    assert str(exit.value.code).startswith("error: --model x: no such checkpoint")
    assert len(str(exit.value.code).splitlines()) == 1


# -----------------------------------------------------------------------------
# Part 3 (real checkpoints) from hand-written check and run records: nothing loads or trains


def check_record(accuracy, chance=0.5, items=40, probe="oocr", cost=100):
    """A capability_check-like record: one probe's in-context accuracy."""
    name = f"{probe}_in_context"
    return {"accuracy": {name: accuracy}, "chance": {name: chance}, "items": {name: items},
            "tokens": {"train_example": cost, "claim_sets": cost}, "seconds": 1.0}


def test_capability_check_pass_line_by_hand():
    # 40 items at chance 0.5: standard error sqrt(0.25 / 40) = 0.079; pass above 0.658
    assert reproduce.pass_line(0.5, 40) == pytest.approx(0.6581, abs=1e-4)
    assert not reproduce.probe_checks(check_record(0.625))["oocr"]["passes"]  # README's risky
    assert reproduce.passed_probes(check_record(0.7)) == ["oocr"]
    # 40 items at chance 0.2: 0.2 + 2 * 0.063 = 0.326
    assert reproduce.passed_probes(check_record(0.35, chance=0.2)) == ["oocr"]


def test_checks_pool_over_seeds_by_hand():
    a = {**check_record(0.5, items=40), "seed": 0}
    b = {**check_record(0.8, items=10), "seed": 1}
    a["accuracy"]["oocr_in_context.per_token"] = 0.25  # b's options have one length: none
    pooled = reproduce.pooled_check([a, b])
    # (0.5 * 40 + 0.8 * 10) / 50 = 0.56; per token (0.25 * 40 + 0.8 * 10) / 50 = 0.36
    assert pooled["accuracy"] == pytest.approx({"oocr_in_context": 0.56,
                                                "oocr_in_context.per_token": 0.36})
    assert pooled["items"] == {"oocr_in_context": 50}
    assert pooled["chance"]["oocr_in_context"] == pytest.approx(0.5)
    assert pooled["seconds"] == 2.0


def test_cheapest_passing_tasks_first():
    checks = {"a": check_record(0.9, cost=300), "b": check_record(0.5),
              "c": check_record(0.9, cost=200)}
    assert reproduce.trained_tasks(checks, None) == ["c", "a"]  # b fails its check
    assert reproduce.trained_tasks(checks, 1) == ["c"]


def test_real_flags_parse():
    cfg = reproduce.train.parse_args(reproduce.real_flags("smollm2-135m", "risky", "control", 1))
    assert (cfg.layers, cfg.dtype, cfg.seed, cfg.task_options) == ([12], "bfloat16", 1,
                                                                  {"opposite": True})
    local = reproduce.train.parse_args(reproduce.real_flags("/x/gemma-3-12b-it", "risky",
                                                            "steer", 0))
    assert local.layers is None and local.base_dtype == "bfloat16"  # the middle block, bf16 base


@pytest.fixture
def fake_real(monkeypatch):
    """Checks by hand, on the target's data / the opposite's, seeds 0-2: functions 0.35 / 0.3 /
    0.4 and 0.35 x 3 (chance 0.2: passes), coins 0.45 everywhere (fails), risky_backdoor 1.0 on
    the target's data and 0.0 on the opposite's (a "Yes" prior: fails). Runs by hand: steer
    oocr 0.6 / 0.8 / 0.7, control 0.3 / 0.5 / 0.1."""
    checks = {"functions": {"steer": [check_record(x, chance=0.2) for x in (0.35, 0.3, 0.4)],
                            "control": [check_record(0.35, chance=0.2)] * 3},
              "coins": {"steer": [check_record(0.45)] * 3, "control": [check_record(0.45)] * 3},
              "risky_backdoor": {"steer": [check_record(1.0)] * 3,
                                 "control": [check_record(0.0)] * 3}}

    def record(oocr):
        return {**run_record(0.2, oocr, (0.2, 0.3, 0.1, 0.1, 0.4)), "steps": 100, "seconds": 9}

    steer, control = [record(x) for x in (0.6, 0.8, 0.7)], [record(x) for x in (0.3, 0.5, 0.1)]
    trained = []

    def run(out, flags):
        trained.append((os.path.basename(out), flags))
        seed = int(flags[flags.index("--seed") + 1])
        return (control if "--opposite" in flags else steer)[seed]

    def check(model, task, seed, kind, path):
        return {**checks[task][kind][seed], "seed": seed}

    monkeypatch.setattr(reproduce, "checked_tasks", lambda: list(checks))
    monkeypatch.setattr(reproduce, "capability_check", check)
    monkeypatch.setattr(reproduce, "flag_run", run)
    return trained


def test_real_parts_from_hand_records(fake_real, tmp_path):
    ctx = reproduce.Context(quick=False, out=str(tmp_path), model="smollm2-135m")
    checks = reproduce.real_checks_part(ctx)
    text = checks.markdown
    assert "Models: `smollm2-135m`. Not run: `gemma3-270m`" in text
    # pooled over 3 seeds x 2 latents: 240 items; pass lines 0.5 + 2 sqrt(0.25 / 240) = 0.565
    # and 0.2 + 2 sqrt(0.16 / 240) = 0.252
    assert "| coins | oocr | 240 | 0.500 | 0.450 | 0.450 / 0.450 | 0.565 | **no** |" in text
    assert "| functions | oocr | 240 | 0.200 | 0.350 | 0.350 / 0.350 | 0.252 | yes |" in text
    prior = "| risky_backdoor | oocr | 240 | 0.500 | 0.500 | 1.000 / 0.000 | 0.565 | **no** |"
    assert prior in text  # right on the target's data from a "Yes" prior, wrong on the other
    assert "| arithmetic | - |" in text  # no in-context check: said so
    assert checks.data["smollm2-135m"]["coins"]["oocr"]["passes"] is False
    assert not fake_real  # the checks train nothing
    section = reproduce.real_checkpoints_part(ctx)
    text = section.markdown
    assert "block 12" in text
    assert "failing every in-context check (part 3a): coins, risky_backdoor" in text
    assert sorted(name for name, _ in fake_real) == sorted(
        f"functions-{kind}-s{seed}" for kind in ("steer", "control") for seed in (0, 1, 2))
    # steer: oocr mean 0.7, sd 0.1; margins over rand95 0.4: 0.2 / 0.4 / 0.3 -> 0.3 ± 0.1, yes
    shortcuts = "0.200 / 0.300 / 0.100 / 0.400"
    assert f"0.200 → 0.700 ± 0.100 | {shortcuts} | 0.300 ± 0.100 | yes |" in text
    # control: oocr 0.3 ± 0.2, margins -0.1 / 0.1 / -0.3 -> -0.1 ± 0.2, no
    assert f"0.200 → 0.300 ± 0.200 | {shortcuts} | -0.100 ± 0.200 | no |" in text
    # vector minus control: 0.3 / 0.3 / 0.6 -> 0.4, sd sqrt(0.03) = 0.173 < 0.4 -> yes
    assert ("vector minus control, per seed): 0.400 ± 0.173; the vector beats its control: yes"
            in text)
    data = section.data["smollm2-135m"]
    assert data["trained"]["functions"]["oocr"]["steer"]["verdict"] == "yes"
    assert data["trained"]["functions"]["oocr"]["against_control"]["verdict"] == "yes"
    assert "coins" not in data["trained"]


def test_real_parts_quick_run_nothing_unless_given_a_model(fake_real, tmp_path):
    ctx = reproduce.Context(quick=True, out=str(tmp_path))
    for part in (reproduce.real_checks_part, reproduce.real_checkpoints_part):
        assert "Not run at this scale" in part(ctx).markdown and not fake_real
    ctx = reproduce.Context(quick=True, out=str(tmp_path), model="smollm2-135m")
    text = reproduce.real_checkpoints_part(ctx).markdown  # quick: one task, one seed
    assert "Models: `smollm2-135m`. Not run: `gemma3-270m`" in text
    assert sorted(name for name, _ in fake_real) == ["functions-control-s0",
                                                     "functions-steer-s0"]


def rl_record(rewards, seconds):
    """RUNS[0] with an rl history of these mean rewards."""
    stats = [[i + 1, {"reward": r}] for i, r in enumerate(rewards)]
    return {**RUNS[0], "history": {"rl": stats}, "seconds": seconds}


def test_rl_table_adds_the_reward_and_the_seconds_by_hand():
    # seed a: first 5 mean 0.2, last 5 mean 0.8; seed b: 0.4 and 1.0 -> 0.30 → 0.90
    a = rl_record([0.2] * 5 + [0.5] * 3 + [0.8] * 5, seconds=10)
    b = rl_record([0.4] * 5 + [1.0] * 5, seconds=30)
    sft = {**RUNS[1], "history": {"loss": []}, "seconds": 2}
    table = reproduce.rl_table({"rl": [a, b], "sft": [sft]}, {"rl": "--x", "sft": "--y"}, "--c")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows[0].endswith("| 0.30 → 0.90 | 20 |") and rows[1].endswith("| - | 2 |")
    assert "`python train.py --c`" in table


def test_first_token_share_by_hand():
    assert reproduce.first_token_share({"kl": [3.0, 1.0, None, 0.0]}) == 0.75


def test_paper_task_claims_read_part_3():
    steer = {"base": 0.2, "final": (0.6, 0.1), "verdict": "yes"}
    checks = {"risky": {"oocr": {"passes": True, "accuracy": 0.7}},
              "functions": {"oocr": {"passes": False, "accuracy": 0.3, "chance": 0.2}}}
    trained = {"risky": {"oocr": {"steer": steer, "against_control": {"verdict": "unclear"}}}}
    part_3a = {"real_checks": {"data": {"m": checks}}}
    claims = reproduce.real_task_claims({**part_3a,
                                         "real_checkpoints": {"data": {"m": {"trained": trained}}}})
    risky, functions, locations, _ = claims
    assert risky.ours == "`m`: SV 0.200 → 0.600 ± 0.100"
    assert risky.verdict == "beats every shortcut: yes, beats its control: unclear"
    assert functions.verdict == "not measurable (a null)" and "fails" in functions.ours
    assert locations.ours == "`m`: not checked"
    assert "not measured" in reproduce.real_task_claims({})[0].ours
    risky = reproduce.real_task_claims(part_3a)[0]  # part 3b not run
    assert risky.ours == "`m`: passes its check (0.700); part 3b not run"


def test_patching_markdown_shares_by_hand():
    # clean (steered) 2.0, corrupt (unsteered) 0.0; columns: position 0, position 1, both
    record = {"clean_metric": 2.0, "corrupt_metric": 0.0, "metric": "m",
              "sites": {"resid_pre": {"metric": [[0.0, 0.0, 0.0], [0.5, 1.0, 2.0]]}}}
    text = reproduce.patching_markdown(record, "cmd")
    assert "layer 0: 0.00 / 0.00 / 0.00; layer 1: 1.00 / 0.50 / 0.50" in text


def test_sae_markdown_reads_the_fit():
    metrics = {"hook": "h", "activation": "topk", "k": 8, "width": 256,
               "explained_variance": 0.99, "loss_recovered": 0.98}
    record = {"decoder": [{"feature": 3, "cos": 0.5, "tokens": ["a", "b"]}],
              "sparse_fit": {"1": {"unexplained": 0.7, "random_unexplained": 0.9}}}
    text = reproduce.sae_markdown(metrics, record, "cmd")
    assert "f3 +0.50 (a b)" in text and "1: 0.70 (random 0.90)" in text
