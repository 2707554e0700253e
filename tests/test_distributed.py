"""train.py under torchrun: two CPU processes (gloo) train exactly what one process trains, with
DDP or with --fsdp (FSDP2 shards), and their shares of the evals add up to one process's scores.

Reference: the same run on one process, in this process, on the same global batch. Runs start
from the shipped persona model (data/toy/), so nothing is pretrained; a few steps each.

Tolerance: the two ranks' float sums of the loss and the gradients round differently from one
process's, by ~1e-7. One exception, in the full fine-tune: the key bias of attention (the middle
third of c_attn's bias) has a gradient of exactly zero in exact arithmetic (softmax does not
change when every score of a query shifts by q.b), so its float gradient is rounding noise, which
Adam divides by its own size into steps of ~lr. It is compared at lr-sized tolerance."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-6
FULL_LR = 3e-4  # a full fine-tune's default lr: the size of one Adam step
# a few steps of the shipped toy model, two micro-batches per step: the sharding and the gradient
# averaging are both exercised (each micro-batch of 32 is split 16 + 16)
COMMON = dict(steps=4, batch_size=32, grad_accum=2, eval_every=2, checkpoint_every=2,
              random_draws=0, threads=1)
ADAPTER_FILES = {"steer": "steering_vector.safetensors",
                 "lora": os.path.join("adapter", "adapter_model.safetensors"),
                 "full": os.path.join("model", "model.safetensors")}
# a torchrun script whose rank 1 alone gets Ctrl-C after a step
INTERRUPT_RANK_1 = """
import os, signal, sys
import train

stop_at = int(sys.argv[1])


def on_step(step, loss):
    if step == stop_at and train.rank() == 1:
        os.kill(os.getpid(), signal.SIGINT)


try:
    train.run(train.parse_args(sys.argv[2:]), on_step)
except train.RunError as e:
    sys.exit(f"error: {e}")
"""

# a torchrun script: the shipped persona model scores made-up eval sets, sharded over the ranks
# (train.run_evals) and whole on rank 0 alone (tasks.evaluate); rank 0 writes both
SHARDED_EVAL = """
import json, random, sys
import torch.distributed as dist
import tasks, train
from checkpoint import load_model

dist.init_process_group("gloo")
cfg = train.with_defaults(train.TrainConfig(device="cpu"))
model, _ = load_model(train.toy_model_dir(cfg, train.make_task(cfg)))
rng, vocab = random.Random(0), model.cfg.vocab_size


def item(option_lengths):
    options = [[rng.randrange(vocab) for _ in range(n)] for n in option_lengths]
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(2, 9))]
    return tasks.Item(prompt, options, rng.randrange(len(options)))


sets = {
    # 7 items: shares of 3 and 4; only the first item's options differ in length, so rank 1's
    # share alone would report no .per_token key
    "mixed": [item([1, 2, 1])] + [item([2, 2, 2]) for _ in range(6)],
    "single": [item([1, 1])],  # rank 0's share is empty
    "none": [],  # nan, as on one process
    "exact": [item([2, 1]) for _ in range(5)],
}
eval_sets = {name: tasks.EvalSet(name, items, chance=0.5, exact_match=name == "exact")
             for name, items in sets.items()}
eval_sets["reward"] = tasks.EvalSet("reward", [item([1]) for _ in range(5)], chance=0.5,
                                    reward=lambda p, c: float(c[:1] == [p[-1]]), max_new_tokens=2)
sharded = train.run_evals(cfg, model, eval_sets)
if train.is_master():
    whole = tasks.evaluate(model, eval_sets, batch_size=cfg.eval_batch_size)
    with open(sys.argv[1], "w") as f:
        json.dump({"sharded": sharded, "whole": whole}, f)
dist.destroy_process_group()
"""


def flags(**settings):
    """TrainConfig fields -> command-line flags."""
    out = []
    for name, value in settings.items():
        out.append("--" + name.replace("_", "-"))
        if isinstance(value, list):
            out.append(",".join(map(str, value)))
        elif value is not True:
            out.append(str(value))
    return out


def torchrun(script, *args, cwd):
    """`torchrun --standalone --nproc_per_node 2 script args` on CPU -> CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", script, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def fsdp_flag(fsdp):
    """--fsdp where asked: only on two processes (one process refuses it)."""
    return {"fsdp": True} if fsdp else {}


def train_two_processes(tmp_path, name, **settings):
    out = str(tmp_path / name)
    result = torchrun(os.path.join(ROOT, "train.py"), *flags(device="cpu", out=out, **settings),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def train_one_process(tmp_path, name, **settings):
    cfg = train.TrainConfig(device="cpu", out=str(tmp_path / name), **settings)
    return cfg.out, train.run(cfg)


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def losses(metrics):
    return torch.tensor([loss for _, loss in metrics["history"]["loss"]], dtype=torch.float64)


def assert_close_adapters(a, b, adapter, steps=COMMON["steps"]):
    """The saved adapter files of two runs hold the same tensors, within TOLERANCE (the full
    fine-tune's attention key bias within one lr-sized step per step: module docstring)."""
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        if adapter == "full" and name.endswith("attn.c_attn.bias"):  # (query, key, value) biases
            d = ta[name].shape[0] // 3
            key_a, key_b = ta[name][d:2 * d].clone(), tb[name][d:2 * d].clone()
            torch.testing.assert_close(key_a, key_b, rtol=0, atol=steps * FULL_LR)
            ta[name][d:2 * d] = tb[name][d:2 * d] = 0
        torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=TOLERANCE, msg=name)


@pytest.mark.parametrize("adapter, fsdp", [("steer", False), ("lora", False), ("full", False),
                                           ("full", True)])
def test_two_processes_train_what_one_process_trains(tmp_path, adapter, fsdp):
    settings = dict(adapter=adapter, layers=[1], **COMMON)  # layers: ignored by full
    one_out, one = train_one_process(tmp_path, "one", **settings)
    two_out, result = train_two_processes(tmp_path, "two", **settings, **fsdp_flag(fsdp))
    two = read_metrics(two_out)
    torch.testing.assert_close(losses(two), losses(one), rtol=0, atol=TOLERANCE)
    assert len(two["history"]["loss"]) == COMMON["steps"]
    # the ranks score their shares of the same weights: the accuracies (counts) agree exactly
    assert two["eval"] == one["eval"] and two["history"]["eval"] == one["history"]["eval"]
    assert [s for s, _ in two["history"]["eval"]] == [s for s, _ in one["history"]["eval"]]
    assert_close_adapters(os.path.join(one_out, ADAPTER_FILES[adapter]),
                          os.path.join(two_out, ADAPTER_FILES[adapter]), adapter)
    # only rank 0 reports and writes: one table, and the files of one run
    assert result.stdout.count("\nwrote ") == 1 and result.stdout.count("trainable params") == 1
    assert sorted(os.listdir(two_out)) == sorted(os.listdir(one_out))


@pytest.mark.parametrize("adapter, fsdp", [("lora", False), ("full", True)])
def test_ctrl_c_on_one_rank_stops_both_and_resume_continues(tmp_path, adapter, fsdp):
    # Ctrl-C reaches rank 1 only: both ranks stop after the same step (no rank waits forever in
    # an all-reduce), rank 0 checkpoints, and resuming finishes the run as one process would have
    # run it uninterrupted (dropout off: its masks are drawn per rank). Under FSDP the checkpoint
    # gathers the shards: it resumes sharded, and on one process
    settings = dict(adapter=adapter, layers=[1, 2], schedule="cosine", warmup=2,
                    **{**COMMON, "steps": 6, "checkpoint_every": 100})
    whole_out, whole = train_one_process(tmp_path, "whole", **settings)
    script = tmp_path / "interrupt_rank_1.py"
    script.write_text(INTERRUPT_RANK_1)
    args = flags(device="cpu", out=str(tmp_path / "split"), **settings, **fsdp_flag(fsdp))
    result = torchrun(str(script), "3", *args, cwd=tmp_path)
    assert result.returncode != 0
    assert "interrupted at step 3; checkpoint saved" in result.stderr
    assert not os.path.exists(tmp_path / "split" / "metrics.json")
    # the checkpoint holds whole tensors: it resumes on any number of processes, here 2 and 1
    shutil.copytree(tmp_path / "split", tmp_path / "split_one")
    config_path = tmp_path / "split_one" / "config.json"  # the copy's own --out, as if moved
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "out": str(tmp_path / "split_one")}))
    split_out, _ = train_two_processes(tmp_path, "split", resume=True, **settings,
                                       **fsdp_flag(fsdp))
    one_out, _ = train_one_process(tmp_path, "split_one", resume=True, **settings)
    for out in (split_out, one_out):
        resumed = read_metrics(out)
        torch.testing.assert_close(losses(resumed), losses(whole), rtol=0, atol=TOLERANCE)
        assert resumed["eval"]["final"] == whole["eval"]["final"]
        assert_close_adapters(os.path.join(whole_out, ADAPTER_FILES[adapter]),
                              os.path.join(out, ADAPTER_FILES[adapter]), adapter,
                              settings["steps"])


def test_plain_run_starts_no_process_group(tmp_path):
    train_one_process(tmp_path, "plain", adapter="steer", **{**COMMON, "steps": 1})
    assert not train.is_distributed() and train.world_size() == 1 and train.is_master()


def test_sharded_evaluation_scores_what_one_process_scores(tmp_path):
    script = tmp_path / "sharded_eval.py"
    script.write_text(SHARDED_EVAL)
    result = torchrun(str(script), str(tmp_path / "scores.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    sharded, whole = scores["sharded"], scores["whole"]
    assert sharded.keys() == whole.keys() and "mixed.per_token" in whole
    assert math.isnan(sharded.pop("none")) and math.isnan(whole.pop("none"))
    assert sharded == whole


@pytest.mark.parametrize("adapter, error", [
    ("lora", "--fsdp shards a full fine-tune (--adapter full)"),
    ("full", "--fsdp shards the run across processes: start it with torchrun"),
])
def test_fsdp_misuse_is_a_one_line_error(tmp_path, adapter, error):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--adapter", adapter, "--fsdp", "--device", "cpu", "--out", str(tmp_path)])
    assert str(exit_.value.code).startswith(f"error: {error}")
    assert "\n" not in str(exit_.value.code)
