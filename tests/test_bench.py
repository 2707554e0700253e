"""
Tests of bench.py without timing assertions: the FLOP formulas against hand computations on a
tiny config, the interleaving schedule (fake callables and a fake clock), that rows leave both
models as they found them, that the patching rows' two sides agree, the JSON of a tiny end-to-end
run, and one-line flag errors.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import lora
from checkpoint import save_model
from model import ModelConfig, Transformer

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")

# d 4, 2 query heads and 1 KV head of 2 dims, SwiGLU of 6, 2 layers, vocab 10. Per token and
# block: q 4x4 = 16, k 4x2 = 8, v 8, o 16, gate 24, up 24, down 24: 120 weights.
HAND = ModelConfig(arch="llama", vocab_size=10, d_model=4, n_layers=2, n_heads=2, n_kv_heads=1,
                   d_head=2, d_mlp=6, qkv_bias=False, o_bias=False, mlp_bias=False)
B, T, N_ANSWER = 2, 3, 2  # 2 sequences of 3 tokens; logits at 2 answer positions in all
# forward: blocks 2 * 120 * 2 layers * 6 tokens = 2880; attention 4 * (2 heads * 2) * (3*4/2 = 6
# pairs) = 96 per sequence and layer, x 2 layers x 2 sequences = 384
BLOCKS, ATTENTION = 2880, 384
ATTENTION_PER_SEQ_LAYER = 96
LINEAR_PER_SEQ_LAYER = 2 * 120 * 3  # 720
UNEMBED = 2 * 4 * 10  # per position


def test_forward_flops_by_hand():
    assert bench.block_weights(HAND) == 120
    assert bench.attention_flops(HAND, T) == ATTENTION_PER_SEQ_LAYER
    assert bench.forward_flops(HAND, B, T, B * T) == BLOCKS + ATTENTION + 6 * UNEMBED == 3744
    assert bench.forward_flops(HAND, B, T, N_ANSWER) == 3424


FORWARD = BLOCKS + ATTENTION + N_ANSWER * UNEMBED  # a training step's forward: 3424


def test_full_fine_tune_is_three_forwards():
    # every op computes its input gradient (the embedding trains) and every weight its gradient:
    # linear 3x, attention 1x + 2x, the tied unembedding 3x
    assert bench.train_flops(HAND, B, T, N_ANSWER, bench.Trains("full")) == 3 * FORWARD == 10272


def test_steering_flops_by_hand():
    last = bench.Trains("steer", layers=(1,))  # after the last block's MLP: only the unembedding
    assert bench.train_flops(HAND, B, T, N_ANSWER, last) == FORWARD + N_ANSWER * UNEMBED == 3584
    # at block 0's MLP output: input gradients through block 1 (linear 1x, attention 2x)
    first = bench.Trains("steer", layers=(0,))
    above = B * (LINEAR_PER_SEQ_LAYER + 2 * ATTENTION_PER_SEQ_LAYER)  # 1824
    assert bench.train_flops(HAND, B, T, N_ANSWER, first) == FORWARD + above + 160 == 5408
    # block 1's resid_pre is block 0's output: the same backward; all layers = the lowest one
    pre = bench.Trains("steer", layers=(1,), hook="hook_resid_pre")
    both = bench.Trains("steer", layers=(0, 1))
    assert bench.train_flops(HAND, B, T, N_ANSWER, pre) == 5408
    assert bench.train_flops(HAND, B, T, N_ANSWER, both) == 5408


def test_lora_flops_by_hand():
    trains = bench.Trains("lora", targets=("q_proj", "v_proj"), rank=1)
    # the lowest adapter is block 0's q_proj: every op above it computes its input gradient.
    # block 0: attention 2 * 96, o 2*16*3 = 96, gate+up 2*48*3 = 288, down 2*24*3 = 144 -> 720;
    # block 1: q/k/v 2*32*3 = 192, attention 192, o 96, gate+up 288, down 144 -> 912
    base_backward = B * (720 + 912)  # 3264
    # adapters per token, r = 1: q (4 -> 4) forward 2*8 = 16, backward 2*(2*4 + 4) = 24, and in
    # block 1 the gradient of x through A, 2*4 = 8; v (4 -> 2): 2*6 = 12, 2*(2*2 + 4) = 16, + 8
    adapters = (16 + 24 + 12 + 16 + 16 + 24 + 8 + 12 + 16 + 8) * T * B  # 152 * 6 = 912
    expected = FORWARD + base_backward + adapters + N_ANSWER * UNEMBED
    assert bench.train_flops(HAND, B, T, N_ANSWER, trains) == expected == 7760


# -----------------------------------------------------------------------------
# The schedule


def test_schedule_alternates_pairs_after_warmup():
    order = bench.schedule(repeats=4, warmup=1)
    assert order[:2] == [("a", True), ("b", True)]
    timed = [side for side, warm in order if not warm]
    assert timed == ["b", "a", "a", "b", "b", "a", "a", "b"]
    assert not any(warm for _, warm in order[2:])


def test_interleaved_times_only_timed_runs_in_alternating_order():
    calls, now = [], [0.0]
    cost = {"warm_a": 100.0, "warm_b": 100.0, "a": 1.0, "b": 2.0}

    def fake(name):
        def run():
            calls.append(name)
            now[0] += cost[name]
            return f"{name}{len(calls)}"

        return run

    a, b = bench.interleaved(fake("a"), fake("b"), repeats=3, warmup=2, warm_a=fake("warm_a"),
                             warm_b=fake("warm_b"), clock=lambda: now[0])
    assert calls == ["warm_a", "warm_b", "warm_b", "warm_a", "a", "b", "b", "a", "a", "b"]
    assert a.times == [1.0] * 3 and b.times == [2.0] * 3  # no warm-up second counted
    assert (a.first, b.first) == ("warm_a1", "warm_b2")
    assert (a.last, b.last) == ("a9", "b10")
    assert a.summary()["median"] == 1.0 and b.summary()["min"] == 2.0


def test_rows_select_by_name_or_prefix():
    assert [r.name for r in bench.select_rows("forward")] == ["forward_fp32", "forward_bf16"]
    names = [r.name for r in bench.select_rows("eval,train_lora")]
    assert names == ["train_lora_fp32", "train_lora_bf16", "eval"]
    with pytest.raises(ValueError, match="unknown row 'forwards'"):
        bench.select_rows("forwards")


# -----------------------------------------------------------------------------
# Rows on a tiny model: both models come back clean


def tiny_llama_dir(path):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=97, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, d_head=8, d_mlp=48, qkv_bias=False, o_bias=False,
                      mlp_bias=False)
    save_model(Transformer(cfg), str(path))
    return str(path)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def one_thread():
    # 2 threads on 2 cores that other jobs share spin in OpenMP barriers: steps of a tiny model
    # then take 100x longer
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PEFT on HF 5
def test_training_rows_leave_both_models_clean(tmp_path, one_thread):
    args, settings = bench.parse_args(["--model", tiny_llama_dir(tmp_path / "tiny"), "--quick"])
    ctx, diff = bench.prepare(args, settings, str(tmp_path / "hf"))
    assert diff <= bench.LOGITS_ATOL
    ours, hf = ctx.model("ours"), ctx.model("theirs")
    before = (state(ours), state(hf), [m for m, _ in hf.named_modules()])
    for row in bench.select_rows("train"):
        record = bench.run_row(ctx, row, repeats=1)
        assert not lora.lora_modules(ours)
        assert all(p.requires_grad for p in ours.parameters())
        assert all(p.requires_grad for p in hf.parameters())
        assert [m for m, _ in hf.named_modules()] == before[2]  # PEFT unloaded
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before[0].items())
        assert all(torch.equal(v, hf.state_dict()[k]) for k, v in before[1].items())
        assert not ours.training and not hf.training
        if row.dtype == "float32":  # every adapter starts as a no-op: the base model's loss
            assert record["extra"]["first_loss"]["diff"] < 1e-4
        assert 0 < record["flops"]["ours"] and 0 < record["flops"]["theirs"]


def test_patching_rows_agree_with_their_loop_on_the_toy_model(one_thread):
    ctx = bench.Context(bench.QUICK, "cpu", hf_dir=None)
    for row in bench.select_rows("patching_toy"):
        n_tokens, corrupted = bench.TOY_PAIRS[row.name.removeprefix("patching_toy_")]
        record = bench.run_row(ctx, row, repeats=1)
        assert record["extra"]["patches"] == 4 * n_tokens  # every (layer, position) of 4 layers
        assert record["extra"]["max_diff"] < 1e-5
        assert f"corrupted at {corrupted}" in record["notes"]


# -----------------------------------------------------------------------------
# The command line


def run_bench(*flags):
    return subprocess.run([sys.executable, BENCH, *flags], capture_output=True, text=True,
                          cwd=os.path.dirname(BENCH))


def test_json_of_a_tiny_end_to_end_run(tmp_path):
    out = tmp_path / "bench.json"
    done = run_bench("--model", tiny_llama_dir(tmp_path / "tiny"), "--rows", "forward",
                     "--repeats", "2", "--quick", "--memory-rows", "forward_fp32",
                     "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert {"machine", "date", "settings", "peak_flops", "rows"} <= set(results)
    assert {"cpu", "cores", "torch_threads", "torch", "device"} <= set(results["machine"])
    assert set(results["peak_flops"]) == {"float32", "bfloat16"}
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["forward_fp32", "forward_bf16"]
    for r in rows.values():
        for side in ("ours", "theirs"):
            assert len(r[side]["times"]) == 2
            assert r[side]["min"] <= r[side]["median"]
        assert r["ratio_median"] == pytest.approx(r["ours"]["median"] / r["theirs"]["median"])
        assert r["ratio_min"] == pytest.approx(r["ours"]["min"] / r["theirs"]["min"])
        assert r["flops"]["ours"] == r["flops"]["theirs"] > 0
        assert set(r["utilisation"]) == {"ours", "theirs"}
    memory = rows["forward_fp32"]["memory"]
    for side in ("ours", "theirs"):
        assert memory[side]["peak_mb"] >= memory[side]["rss_after_load_mb"] > 0
        assert memory[side]["increase_mb"] >= 0
    assert rows["forward_bf16"]["memory"] is None
    table = bench.markdown_table(results).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| `forward_fp32` |")
    assert all(len(line) <= 100 for line in bench.table_lines(results))
    assert "forward_fp32" in done.stdout


@pytest.mark.parametrize("flags, message", [
    (["--rows", "nonsense"], "unknown row 'nonsense'"),
    (["--repeats", "0"], "expected a positive integer"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flag_is_one_line_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_flag_from_the_shell_has_no_traceback():
    done = run_bench("--rows", "nonsense")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "Traceback" not in done.stderr and "unknown row 'nonsense'" in done.stderr
