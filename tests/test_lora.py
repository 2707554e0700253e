"""LoRA against hand computations and against PEFT on tiny random HF models (no downloads)."""

import json
import math
import os

import pytest
import torch
import torch.nn as nn

from checkpoint import load_model
from lora import (LoRALinear, attach_lora, count_trainable, load_lora, lora_disabled, lora_modules,
                  merge_lora, save_lora, unmerge_lora)
from model import ModelConfig, Transformer

torch.set_num_threads(1)

LLAMA = ModelConfig(arch="llama", vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    d_head=16, d_mlp=128, qkv_bias=False, o_bias=False, mlp_bias=False,
                    tie_embeddings=False, hf_model_type="llama")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return Transformer(LLAMA).eval()


def tokens(vocab=64, seed=1):
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))  # (B, T)


def randomize_lora_B(model, seed=2, std=0.5):
    """Untrained adapters are no-ops; random B makes every adapter change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# -----------------------------------------------------------------------------
# The layer and the wrapper, against hand computations


def test_layer_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    # alpha / r and alpha / sqrt(r), r = 4
    for rslora, scaling in ((False, 16 / 4), (True, 16 / 2)):
        layer = LoRALinear(base, r=4, alpha=16, rslora=rslora)
        nn.init.normal_(layer.lora_B.weight)
        x = torch.randn(3, 12)
        A, B = layer.lora_A.weight, layer.lora_B.weight  # (4, 12), (6, 4)
        expected = x @ (base.weight + scaling * B @ A).T + base.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_dropout_acts_on_the_input_of_A_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 6), r=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 12)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)  # the same draw the layer will make
    torch.manual_seed(7)
    expected = layer.base(x) + dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer.train()(x), expected, atol=1e-5, rtol=0)
    no_dropout = layer.base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer.eval()(x), no_dropout, atol=1e-5, rtol=0)


def test_init_is_peft_kaiming_uniform_and_zero_B():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 32), r=64)
    # kaiming_uniform(a=sqrt(5)): gain sqrt(2 / 6), bound gain * sqrt(3 / fan_in)
    bound = 1 / math.sqrt(256)
    A = layer.lora_A.weight
    assert A.shape == (64, 256) and layer.lora_B.weight.shape == (32, 64)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    # uniform(-b, b) has std b / sqrt(3)
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_untrained_lora_is_exact_noop():
    model, x = tiny_llama(), tokens()
    base_logits = model(x)
    attach_lora(model, targets=("q_proj", "v_proj", "down_proj"))
    assert torch.equal(model(x), base_logits)


def test_only_lora_params_train_and_count_matches_hand_sum():
    model = tiny_llama()
    wrapped = attach_lora(model, targets=("q_proj", "v_proj", "down_proj"), r=8)
    assert sorted(wrapped) == sorted(f"blocks.{l}.{m}" for l in range(2)
                                     for m in ("attn.q_proj", "attn.v_proj", "mlp.down_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r * (in + out): q 64 -> 64, v 64 -> 2 kv heads * 16 = 32, down 128 -> 64; two layers
    assert count_trainable(model) == 2 * 8 * ((64 + 64) + (64 + 32) + (128 + 64))


def test_gradients_reach_only_the_adapter():
    model = tiny_llama()
    attach_lora(model, targets="down_proj", layers=1)
    randomize_lora_B(model)
    model(tokens()).logsumexp(-1).mean().backward()
    layer = model.blocks[1].mlp.down_proj
    assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0
    assert layer.base.weight.grad is None and model.embed.weight.grad is None


def test_layer_selection_and_our_own_names():
    model = tiny_llama()
    assert list(attach_lora(model, targets=("attn.q_proj",), layers=1)) == ["blocks.1.attn.q_proj"]
    gpt2 = Transformer(ModelConfig(arch="gpt2", n_layers=2)).eval()
    assert sorted(attach_lora(gpt2, targets="c_proj")) == [f"blocks.{l}.{m}" for l in range(2)
                                                          for m in ("attn.o_proj", "mlp.down_proj")]


def test_unknown_target_is_a_one_line_error():
    message = r"'embed_tokens' matches no Linear module; valid names: .*down_proj"
    with pytest.raises(ValueError, match=message):
        attach_lora(tiny_llama(), targets=("embed_tokens",))
    gpt2 = Transformer(ModelConfig(arch="gpt2"))
    with pytest.raises(ValueError, match="matches no Linear module; valid names"):
        attach_lora(gpt2, targets=("q_proj",))  # GPT-2 has a fused c_attn
    with pytest.raises(ValueError, match=r"out of range: the model has layers 0\.\.1"):
        attach_lora(tiny_llama(), layers=[2])


def test_disabled_gives_base_and_restores_even_on_error():
    model, x = tiny_llama(), tokens()
    base_logits = model(x)
    attach_lora(model, targets=("q_proj", "down_proj"))
    randomize_lora_B(model)
    lora_logits = model(x)
    assert (lora_logits - base_logits).abs().max() > 1e-2
    with lora_disabled(model):
        assert torch.equal(model(x), base_logits)
    with pytest.raises(RuntimeError):
        with lora_disabled(model):
            raise RuntimeError("boom")
    assert all(m.enabled for m in lora_modules(model).values())
    assert torch.equal(model(x), lora_logits)


def test_merge_matches_unmerged_and_unmerge_restores_base():
    model, x = tiny_llama(), tokens()
    base_weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    base_logits = model(x)
    attach_lora(model, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=8)
    randomize_lora_B(model)
    lora_logits = model(x)
    layer = model.blocks[0].mlp.down_proj
    base_weight = base_weights["blocks.0.mlp.down_proj.weight"]
    by_hand = base_weight + (8 / 4) * layer.lora_B.weight @ layer.lora_A.weight
    merge_lora(model)
    torch.testing.assert_close(layer.base.weight, by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), lora_logits, atol=1e-5, rtol=0)
    merge_lora(model)  # a second merge must not add the delta twice
    torch.testing.assert_close(model(x), lora_logits, atol=1e-5, rtol=0)
    with lora_disabled(model):  # switched off while merged: the delta is taken back out
        torch.testing.assert_close(model(x), base_logits, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(layer.base.weight, base_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), lora_logits, atol=1e-5, rtol=0)


def test_save_load_reproduces_logits_exactly(tmp_path):
    model, x = tiny_llama(), tokens()
    attach_lora(model, targets=("q_proj", "down_proj"), layers=[0], r=4, alpha=8, rslora=True)
    randomize_lora_B(model)
    save_lora(model, tmp_path, base_model_name="tiny")
    fresh = tiny_llama()
    loaded = load_lora(fresh, tmp_path)
    assert sorted(loaded) == ["blocks.0.attn.q_proj", "blocks.0.mlp.down_proj"]
    assert loaded["blocks.0.attn.q_proj"].scaling == 8 / 2
    assert torch.equal(fresh(x), model(x))


# -----------------------------------------------------------------------------
# PEFT interoperability on tiny random HF checkpoints


def hf_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                         pad_token_id=None)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "base")
    return hf, load_model(str(tmp_path / "base"))[0]


def hf_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                        bos_token_id=0, eos_token_id=1)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "base")
    return hf, load_model(str(tmp_path / "base"))[0]


def hf_gemma3(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, max_position_embeddings=64, sliding_window=4,
                              sliding_window_pattern=2)
    hf = Gemma3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "base")
    return hf, load_model(str(tmp_path / "base"))[0]


def peft_logits(hf, adapter_dir, x):
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(hf, str(adapter_dir)).eval()(x).logits


@pytest.mark.parametrize("make, targets, layers", [
    (hf_llama, ("q_proj", "v_proj", "down_proj"), None),
    (hf_gpt2, ("c_attn", "c_fc"), None),
    (hf_llama, ("self_attn.q_proj", "mlp.down_proj"), [1]),
    (hf_gpt2, ("c_attn", "c_proj"), 1),
    (hf_gemma3, ("q_proj", "k_proj", "down_proj"), None),
])
def test_our_adapter_loads_in_peft_with_same_logits(tmp_path, make, targets, layers):
    hf, ours = make(tmp_path)
    x = tokens()
    with torch.no_grad():
        base_logits = hf(x).logits
    attach_lora(ours, targets=targets, layers=layers, r=4, alpha=8)
    randomize_lora_B(ours)
    save_lora(ours, tmp_path / "adapter", base_model_name=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (make is hf_gpt2)
    expected = peft_logits(hf, tmp_path / "adapter", x)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter really acts inside PEFT
    torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("make, targets, layers", [
    (hf_llama, ["q_proj", "v_proj", "down_proj"], None),
    (hf_gpt2, ["c_attn", "c_fc"], [0]),
    (hf_gemma3, ["q_proj", "o_proj", "gate_proj"], [1]),
])
def test_peft_adapter_loads_into_ours_with_same_logits(tmp_path, make, targets, layers):
    from peft import LoraConfig, get_peft_model

    hf, ours = make(tmp_path)
    x = tokens()
    layer_args = {} if layers is None else {"layers_to_transform": layers}
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                               fan_in_fan_out=make is hf_gpt2, **layer_args))
    randomize_lora_B(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    with torch.no_grad():
        expected = peft_model(x).logits
        with peft_model.disable_adapter():
            assert (expected - peft_model(x).logits).abs().max() > 1e-2
    loaded = load_lora(ours, tmp_path / "peft_adapter")
    n_targeted = len(targets) * (2 if layers is None else len(layers))
    assert len(loaded) == n_targeted
    torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0)


# -----------------------------------------------------------------------------
# Adapters that do not fit the model


@pytest.fixture
def saved_adapter(tmp_path):
    model = tiny_llama()
    attach_lora(model, targets=("q_proj", "down_proj"), r=8)
    save_lora(model, tmp_path)
    return tmp_path


def edit_config(directory, **changes):
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_wrong_rank_is_refused(saved_adapter):
    edit_config(saved_adapter, r=4)
    message = (r"adapter_model\.safetensors: tensor .*lora_A\.weight "
               r"has shape \(8, 64\), expected \(4, 64\)")
    with pytest.raises(ValueError, match=message):
        load_lora(tiny_llama(), saved_adapter)


def test_absent_target_module_is_refused(saved_adapter):
    edit_config(saved_adapter, target_modules=["c_attn"])
    message = r"adapter_config\.json: adapter does not fit this model .*'c_attn' matches no"
    with pytest.raises(ValueError, match=message):
        load_lora(tiny_llama(), saved_adapter)
    with pytest.raises(ValueError, match=message):
        load_lora(tiny_llama(), saved_adapter)  # the failed load left the model without LoRA
    # the weights for down_proj now name no targeted module
    edit_config(saved_adapter, target_modules=["q_proj"])
    model = tiny_llama()
    message = (r"adapter_model\.safetensors: tensor .*mlp\.down_proj\.lora_A\.weight "
               r"names no targeted module")
    with pytest.raises(ValueError, match=message):
        load_lora(model, saved_adapter)
    assert not lora_modules(model)


def test_missing_file_and_wrong_type_are_refused(saved_adapter):
    edit_config(saved_adapter, peft_type="IA3")
    with pytest.raises(ValueError, match=r"adapter_config\.json: peft_type is 'IA3', only 'LORA'"):
        load_lora(tiny_llama(), saved_adapter)
    edit_config(saved_adapter, peft_type="LORA")
    os.remove(saved_adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: missing adapter weights"):
        load_lora(tiny_llama(), saved_adapter)
    with pytest.raises(ValueError, match=r"adapter_config\.json: missing adapter config"):
        load_lora(tiny_llama(), saved_adapter / "nowhere")
