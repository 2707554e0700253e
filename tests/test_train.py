"""train.py end to end, on a shortened persona world (20k documents, 300 pretraining steps).

References: the OOCR gain is judged against chance and the base model; "base untouched" against a
copy of the weights taken before training; resume against an uninterrupted run."""

import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import tasks
import toy
import train
from checkpoint import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_WORLD = {"n_docs": 20_000}


def config(tmp_path, name, **overrides):
    base = dict(task_options=dict(SHORT_WORLD), pretrain_steps=300, cache_dir=str(tmp_path.parent / "toy_cache"),
                out=str(tmp_path / name), steps=60, eval_every=30, checkpoint_every=20)
    return train.TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def short_default(tmp_path_factory):
    """The embedded default (pretrain, then a steering vector), shortened."""
    tmp = tmp_path_factory.mktemp("default")
    cfg = config(tmp, "steer", steps=150)
    return cfg, train.run(cfg)


def toy_checkpoint(cfg):
    task = train.get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    return os.path.join(train.toy_cache_path(cfg, task), "model")


def test_default_steer_run_shows_oocr(short_default):
    _, metrics = short_default
    base, final, chance = metrics["eval"]["base"], metrics["eval"]["final"], metrics["chance"]
    assert chance["oocr"] == pytest.approx(1 / 8)
    assert base["oocr"] <= 0.4  # the pretrained model does not know the target persona
    assert final["oocr"] >= 0.8  # the steering vector trained on choices alone lifts the probe
    assert final["in_distribution"] > base["in_distribution"]


def test_metrics_json_schema(short_default):
    cfg, _ = short_default
    with open(os.path.join(cfg.out, "metrics.json")) as f:
        m = json.load(f)
    assert isinstance(m["task"], str) and isinstance(m["model"], str) and m["adapter"] == "steer"
    assert isinstance(m["steps"], int) and isinstance(m["seconds"], float) and m["trainable_params"] == 64
    for section in (m["chance"], m["eval"]["base"], m["eval"]["final"]):
        assert {"in_distribution", "oocr"} <= set(section) and all(isinstance(v, float) for v in section.values())
    for name in ("config.json", "steering_vector.safetensors", "curves.png", "checkpoint.safetensors"):
        assert os.path.getsize(os.path.join(cfg.out, name)) > 0
    with open(os.path.join(cfg.out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(cfg.out, "config.json")) as f:
        assert json.load(f)["steps"] == cfg.steps


def test_steer_leaves_base_weights_bit_identical(short_default, tmp_path):
    cfg, _ = short_default
    model, _ = load_model(toy_checkpoint(cfg))
    before = copy.deepcopy(model.state_dict())
    task = train.get_task(cfg.task, seed=0, **cfg.task_options)
    run_cfg = train.with_defaults(replace_cfg(cfg, steps=20, lr=1e-2))
    adapter = train.make_adapter(run_cfg, model, task, task.tokenizer)
    train.train(run_cfg, model, adapter, task.train_examples(), task.eval_sets(), 0, "cpu", str(tmp_path))
    assert any(p.abs().sum() > 0 for _, p in adapter.named_parameters())  # the vector did train
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


@pytest.mark.parametrize("adapter", ["full", "lora", "steer"])
def test_every_adapter_lowers_training_loss(short_default, tmp_path, adapter):
    cfg, _ = short_default
    m = train.run(config(tmp_path, adapter, adapter=adapter, model=toy_checkpoint(cfg), steps=40, layers=[1]))
    losses = [loss for _, loss in m["history"]["loss"]]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert m["trainable_params"] == {"full": sum(p.numel() for p in load_model(toy_checkpoint(cfg))[0].parameters()),
                                     "lora": 4 * (256 + 64), "steer": 64}[adapter]


def interrupt_at(step_to_stop, monkeypatch):
    """Send ourselves Ctrl-C while `step_to_stop` runs, as a user would."""
    real_step = train.train_step

    def step(step, *args):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(step, *args)

    monkeypatch.setattr(train, "train_step", step)


def test_resume_equals_uninterrupted(short_default, tmp_path, monkeypatch):
    cfg, _ = short_default
    # dropout and a cosine schedule with warmup: RNG state and step count must both survive the restart
    common = dict(adapter="lora", model=toy_checkpoint(cfg), steps=30, layers=[1, 2], lora_dropout=0.1,
                  schedule="cosine", warmup=5, batch_size=32, checkpoint_every=100)
    whole = train.run(config(tmp_path, "whole", **common))
    interrupt_at(12, monkeypatch)
    with pytest.raises(train.RunError, match="interrupted at step 13; checkpoint saved"):
        train.run(config(tmp_path, "split", **common))
    monkeypatch.undo()
    resumed = train.run(config(tmp_path, "split", resume=True, **common))
    assert resumed["history"]["loss"] == whole["history"]["loss"]
    assert resumed["eval"]["final"] == whole["eval"]["final"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(short_default, tmp_path):
    cfg, _ = short_default
    run_cfg = config(tmp_path, "nan", model=toy_checkpoint(cfg), lr=1e30, steps=20, checkpoint_every=1, grad_clip=0.0)
    with pytest.raises(train.RunError, match=r"loss became (nan|inf) at step \d+; stopped. Last good checkpoint: .*\(step \d+\)"):
        train.run(run_cfg)
    from safetensors import safe_open

    with safe_open(os.path.join(run_cfg.out, "checkpoint.safetensors"), "pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys() if k.startswith("param."))


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.parametrize("args, message", [
    (["--adapter", "qlora"], "argument --adapter: invalid choice: 'qlora'"),
    (["--steps", "0"], "must be a positive integer"),
    (["--layers", "1,x"], "expected comma-separated layer numbers"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--model", "no/such/dir", "--task", "risky"], "error: no/such/dir: no such file or directory"),
    (["--model", "scratch", "--task", "risky"], "error: --model scratch needs a toy task"),
    (["--resume", "--out", "nothing_here"], "error: --resume: nothing_here holds no run to resume"),
])
def test_bad_input_is_one_line_error(tmp_path, args, message):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_out_dir_holding_another_run_is_refused(short_default, tmp_path):
    cfg, _ = short_default
    with pytest.raises(train.RunError, match="already holds a run"):
        train.run(replace_cfg(cfg, steps=10))
    with pytest.raises(train.RunError, match=r"was run with other settings \(steps\)"):
        train.run(replace_cfg(cfg, steps=10, resume=True))


def test_bad_layer_is_refused(short_default, tmp_path):
    cfg, _ = short_default
    with pytest.raises(train.RunError, match=r"out of range: the model has layers 0..3"):
        train.run(config(tmp_path, "bad_layer", model=toy_checkpoint(cfg), layers=[7]))


def test_task_registered_twice_is_refused(monkeypatch):
    monkeypatch.setitem(toy.TOY_TASKS, "risky", object)
    with pytest.raises(ValueError, match="registered twice"):
        train.get_task("risky")
