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
    assert claim.verdict.startswith("the LoRA raises oocr at 1 of 2 blocks; there the natural "
                                    "vector keeps at least half of its gain at 1, its "
                                    "negation at 0.")
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
        open(os.path.join(done, "metrics.json"), "w").close()
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
    assert "| 1 / 1 |" in results.read_text()  # train.py runs: trained / reused
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
