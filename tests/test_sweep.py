"""sweep.py end to end on the shipped persona model (two targets, steering vectors): the summary
against the runs' own metrics.json, and the cross-target matrix's diagonal against each run's final
score (the same vector on its own target's probe)."""

import json
import os
import statistics

import pytest

import sweep


@pytest.fixture(scope="module")
def two_target_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    sweep.main(["--task", "persona", "--seeds", "0", "--targets", "0,1", "--runs", "steer",
                "--out", str(out)])
    with open(os.path.join(out, "summary.json")) as f:
        return out, json.load(f)


def run_metrics(out, target):
    path = os.path.join(out, "runs", f"steer-seed0-target{target}", "metrics.json")
    with open(path) as f:
        return json.load(f)


def test_summary_is_the_mean_and_spread_of_the_runs(two_target_sweep):
    out, report = two_target_sweep
    runs = [run_metrics(out, t) for t in (0, 1)]
    oocr = report["summary"]["steer"]["oocr"]
    finals = [m["eval"]["final"]["oocr"] for m in runs]
    assert oocr["adapter"][0] == pytest.approx(statistics.fmean(finals))
    assert oocr["adapter"][1] == pytest.approx(statistics.stdev(finals))
    stats = [m["baselines"]["answer_stats"]["oocr"] for m in runs]
    assert oocr["answer_stats"][0] == pytest.approx(statistics.fmean(stats))
    assert report["summary"]["steer"]["oocr_in_context"]["answer_stats"] is None  # not scored
    assert os.path.getsize(os.path.join(out, "cross_target.png")) > 0


def test_cross_target_diagonal_is_each_runs_own_score(two_target_sweep):
    out, report = two_target_sweep
    matrix = report["cross_target"]["per_seed"][0]
    for i, target in enumerate((0, 1)):
        assert matrix[i][i] == run_metrics(out, target)["eval"]["final"]["oocr"]


def test_a_finished_sweep_reruns_from_its_files(two_target_sweep, monkeypatch):
    out, report = two_target_sweep

    def no_training(cfg, on_step=None):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep.train, "run", no_training)
    sweep.main(["--task", "persona", "--seeds", "0", "--targets", "0,1", "--runs", "steer",
                "--out", str(out)])


def test_unknown_run_kind_is_one_line_error():
    with pytest.raises(SystemExit, match="unknown run kind 'lora:x'"):
        sweep.main(["--runs", "lora:x"])
