"""train.py end to end through run() / main() and the files a run writes, on a shortened persona
world (20k documents, 300 pretraining steps).

References: the OOCR gain is judged against chance and the base model; "base untouched" by the
base model reloaded from disk plus the saved adapter reproducing the run's numbers; resume against
an uninterrupted run; flag errors and --help against the text a user reads."""

import glob
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import baselines
import lora
import steer
import tasks
import toy
import train
from checkpoint import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_WORLD = {"n_docs": 20_000}


def config(tmp_path, name, **overrides):
    base = dict(
        task_options=dict(SHORT_WORLD),
        pretrain_steps=300,
        cache_dir=str(tmp_path.parent / "toy_cache"),
        out=str(tmp_path / name),
        steps=60,
        eval_every=30,
        checkpoint_every=20,
        random_draws=3,  # the report's schema, not its statistics, is what these runs check
    )
    return train.TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def short_default(tmp_path_factory):
    """The embedded default (pretrain, then a steering vector), shortened."""
    tmp = tmp_path_factory.mktemp("default")
    cfg = config(tmp, "steer", steps=150)
    return cfg, train.run(cfg)


def toy_checkpoint(cfg):
    """The pretrained model that the default run wrote into its cache dir."""
    (path,) = glob.glob(os.path.join(cfg.cache_dir, f"{cfg.task}-seed{cfg.seed}-*", "model"))
    return path


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_default_steer_run_shows_oocr(short_default):
    _, metrics = short_default
    base, final, chance = metrics["eval"]["base"], metrics["eval"]["final"], metrics["chance"]
    assert chance["oocr"] == pytest.approx(1 / 8)
    assert base["oocr"] <= 0.4  # the pretrained model does not know the target persona
    assert final["oocr"] >= 0.8  # the steering vector trained on choices alone lifts the probe
    assert final["in_distribution"] > base["in_distribution"]


def test_metrics_json_schema(short_default):
    cfg, _ = short_default
    m = read_json(os.path.join(cfg.out, "metrics.json"))
    assert isinstance(m["task"], str) and isinstance(m["model"], str) and m["adapter"] == "steer"
    assert isinstance(m["steps"], int) and isinstance(m["seconds"], float)
    assert m["trainable_params"] == 64
    for section in (m["chance"], m["eval"]["base"], m["eval"]["final"]):
        assert {"in_distribution", "oocr"} <= set(section)
        assert all(isinstance(v, float) for v in section.values())
    files = ("config.json", "steering_vector.safetensors", "curves.png", "checkpoint.safetensors")
    for name in files:
        assert os.path.getsize(os.path.join(cfg.out, name)) > 0
    with open(os.path.join(cfg.out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    shortcuts = {"logit_bias", "answer_stats", "direct_path", "random_mean", "random_p95"}
    assert set(m["baselines"]) == shortcuts
    claims = {k for k in m["eval"]["final"] if not k.endswith("_in_context")}
    for scores in m["baselines"].values():  # every baseline scored on every eval but the checks
        assert set(scores) == claims
    assert set(m["baseline_fits"]) == {"logit_bias_norm", "answer_stats_norm"}
    assert read_json(os.path.join(cfg.out, "config.json"))["steps"] == cfg.steps


def evaluate_files(cfg, model):
    """Accuracies of `model` (the base reloaded from disk, with the run's adapter) on the run's
    eval sets, as run() computes them."""
    task = train.get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    return tasks.evaluate(model, task.eval_sets(task.tokenizer), batch_size=64)  # the toy default


def test_steer_leaves_base_weights_untouched(short_default):
    # the base reloaded from disk plus the saved vector reproduce the run's final numbers: had
    # training changed the base weights in memory, the trained vector would not fit the file's base
    cfg, metrics = short_default
    model, _ = load_model(toy_checkpoint(cfg))
    vector = steer.SteeringVector.load(os.path.join(cfg.out, "steering_vector.safetensors"), model)
    assert any(p.abs().sum() > 0 for p in vector.parameters())  # the vector did train
    with torch.no_grad(), vector.apply(model):
        assert evaluate_files(cfg, model) == metrics["eval"]["final"]
    assert evaluate_files(cfg, model) == metrics["eval"]["base"]  # hooks gone: the base again


def load_run_model(cfg, adapter):
    """The model a finished run describes, rebuilt from its files."""
    if adapter == "full":
        return load_model(os.path.join(cfg.out, "model"))[0]
    model, _ = load_model(toy_checkpoint(cfg))
    lora.load_lora(model, os.path.join(cfg.out, "adapter"))
    return model


@pytest.mark.parametrize("adapter", ["full", "lora", "steer"])
def test_every_adapter_lowers_training_loss(short_default, tmp_path, adapter):
    cfg, _ = short_default
    run_cfg = config(tmp_path, adapter, adapter=adapter, model=toy_checkpoint(cfg), steps=40,
                     layers=[1])
    m = train.run(run_cfg)
    losses = [loss for _, loss in m["history"]["loss"]]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    n_base = sum(p.numel() for p in load_model(toy_checkpoint(cfg))[0].parameters())
    assert m["trainable_params"] == {"full": n_base, "lora": 4 * (256 + 64), "steer": 64}[adapter]
    # the data baselines were computed on the base model, before any weight changed
    model, _ = load_model(toy_checkpoint(cfg))
    task = train.get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    pad_id = task.tokenizer.pad_id  # a toy world brings its own tokenizer
    data_scores, _ = baselines.data_baselines(model, task.train_examples(), pad_id,
                                              train.claim_sets(task.eval_sets()),
                                              batch_size=64)  # the toy default
    assert {k: m["baselines"][k] for k in data_scores} == data_scores
    vector_only = {"direct_path", "random_mean", "random_p95"}
    assert (vector_only <= set(m["baselines"])) == (adapter == "steer")
    if adapter != "steer":  # the saved weights reproduce the run's numbers (steer: test above)
        with torch.no_grad():
            assert evaluate_files(run_cfg, load_run_model(run_cfg, adapter)) == m["eval"]["final"]


def interrupt_at(step_to_stop):
    """An on_step callback that sends us Ctrl-C after `step_to_stop` steps, as a user would."""

    def on_step(step, loss):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


def test_resume_equals_uninterrupted(short_default, tmp_path):
    cfg, _ = short_default
    # dropout and a cosine schedule with warmup: RNG state and step count must both survive the
    # restart
    common = dict(adapter="lora", model=toy_checkpoint(cfg), steps=30, layers=[1, 2],
                  lora_dropout=0.1, schedule="cosine", warmup=5, batch_size=32,
                  checkpoint_every=100)
    whole = train.run(config(tmp_path, "whole", **common))
    with pytest.raises(train.RunError, match="interrupted at step 13; checkpoint saved"):
        train.run(config(tmp_path, "split", **common), on_step=interrupt_at(13))
    resumed = train.run(config(tmp_path, "split", resume=True, **common))
    assert resumed["history"]["loss"] == whole["history"]["loss"]
    assert resumed["eval"]["final"] == whole["eval"]["final"]
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(short_default, tmp_path):
    cfg, _ = short_default
    run_cfg = config(tmp_path, "nan", model=toy_checkpoint(cfg), lr=1e30, steps=20,
                     checkpoint_every=1, grad_clip=0.0)
    message = r"loss became (nan|inf) at step \d+; stopped. Last good checkpoint: .*\(step \d+\)"
    with pytest.raises(train.RunError, match=message):
        train.run(run_cfg)
    with safe_open(os.path.join(run_cfg.out, "checkpoint.safetensors"), "pt") as f:
        params = [f.get_tensor(k) for k in f.keys() if k.startswith("param.")]
    assert all(torch.isfinite(p).all() for p in params)


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [sys.executable, os.path.join(ROOT, "train.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.parametrize("args, message", [
    (["--adapter", "qlora"], "argument --adapter: invalid choice: 'qlora'"),
    (["--steps", "0"], "must be a positive integer"),
    (["--layers", "1,x"], "expected comma-separated layer numbers"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--positions", "last"], "--positions last is for single prompts"),
    (["--base-dtype", "bfloat16"], "--base-dtype bfloat16 needs a frozen base"),
    (["--adapter", "full", "--dtype", "bfloat16", "--base-dtype", "bfloat16"],
     "--base-dtype bfloat16 needs a frozen base"),
    (["--model", "no/such/dir", "--task", "risky"], "error: no/such/dir: no such file or directory"),
    (["--model", "scratch", "--task", "risky"], "error: --model scratch needs a toy task"),
    (["--resume", "--out", "nothing_here"], "error: --resume: nothing_here holds no run to resume"),
])
def test_bad_input_is_one_line_error(tmp_path, args, message):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help_shows_every_default(tmp_path):
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    seed_help = "seed of the task's data, the data order and the adapter's init (default: 0)"
    assert f"--seed SEED {seed_help}" in text
    assert "comma-separated module names, e.g. down_proj,q_proj (default: down_proj)" in text
    assert "(default: steer 1e-2 on toy models and 1e-1 on real ones" in text  # the lr rule
    assert "--layers LAYERS, --layer LAYERS" in text
    for action in train.build_parser()._actions:  # every flag's help ends with its default
        assert action.dest == "help" or "(default: " in action.help, action.dest


def test_flags_set_config_fields_and_unset_flags_keep_defaults():
    cfg = train.parse_args(["--grad-clip", "0", "--layer", "2", "--lora-targets", "q_proj,v_proj",
                            "--target", "3", "--opposite"])
    assert cfg.grad_clip == 0.0 and cfg.layers == [2] and cfg.lora_targets == ["q_proj", "v_proj"]
    assert cfg.task_options == {"target": 3, "opposite": True}
    defaults = train.parse_args([])
    assert defaults == train.TrainConfig()  # every flag's default is the dataclass field's


def test_control_run_is_scored_on_the_target_eval_sets(short_default, tmp_path):
    # same base model, same eval sets: the base numbers of the target run and the control run agree
    # (scored on the opposite task's sets, the control's base in_distribution would be 1 - target's)
    cfg, target = short_default
    options = {**SHORT_WORLD, "opposite": True}
    control_cfg = config(tmp_path, "control", model=toy_checkpoint(cfg), task_options=options,
                         steps=40)
    control = train.run(control_cfg)
    assert control["eval"]["base"] == target["eval"]["base"]
    # the check above can tell the two apart
    assert control["eval"]["base"]["in_distribution"] != 0.5
    # trained on the target's less preferred options, it gives fewer target answers than the base
    assert control["eval"]["final"]["in_distribution"] < control["eval"]["base"]["in_distribution"]


def test_default_world_starts_from_the_shipped_model(tmp_path):
    # the default recipe's pretrained model ships in data/toy/: nothing is pretrained or cached,
    # and the run's base numbers are those of the shipped weights
    cfg = train.TrainConfig(cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), steps=2)
    metrics = train.run(cfg)
    assert not os.path.exists(cfg.cache_dir)
    (shipped,) = glob.glob(os.path.join(ROOT, "data", "toy", "persona-seed0-*"))
    model, _ = load_model(shipped)
    with torch.no_grad():
        assert evaluate_files(cfg, model) == metrics["eval"]["base"]


def test_out_dir_holding_another_run_is_refused(short_default):
    cfg, _ = short_default
    with pytest.raises(train.RunError, match="already holds a run"):
        train.run(replace(cfg, steps=10))
    with pytest.raises(train.RunError, match=r"was run with other settings \(steps\)"):
        train.run(replace(cfg, steps=10, resume=True))


def test_bad_layer_is_refused(short_default, tmp_path):
    cfg, _ = short_default
    with pytest.raises(train.RunError, match=r"out of range: the model has layers 0..3"):
        train.run(config(tmp_path, "bad_layer", model=toy_checkpoint(cfg), layers=[7]))


def test_task_registered_twice_is_refused(monkeypatch):
    monkeypatch.setitem(toy.TOY_TASKS, "risky", object)
    with pytest.raises(ValueError, match="registered twice"):
        train.get_task("risky")


def test_printed_table_shows_every_baseline_and_the_margin(short_default, capsys):
    _, metrics = short_default
    train.print_table(metrics)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("eval "))
    columns = ["chance", "base", "steer", "bias", "stats", "direct", "random", "rand95", "margin"]
    assert header.split() == ["eval", *columns]
    oocr = [float(x) for x in next(line for line in lines if line.startswith("oocr ")).split()[1:]]
    shortcuts = metrics["baselines"]
    strongest = max(shortcuts[name]["oocr"] for name in ("logit_bias", "answer_stats",
                                                         "direct_path", "random_p95"))
    assert oocr[columns.index("margin")] == pytest.approx(metrics["eval"]["final"]["oocr"]
                                                           - strongest, abs=1e-3)
