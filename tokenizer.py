"""
Tokenizers on tiktoken for byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3, Qwen2), built from
an HF tokenizer.json, from vocab.json + merges.txt, or (checkpoint.py) from GGUF metadata, with
the chat formats of instruct models (ChatML, Llama 3).

HF stores tokens as printable "byte-level" strings; tiktoken wants raw bytes with a rank per token.
Read top to bottom: pre-tokenizer regexes -> the byte alphabet -> Tokenizer -> building one.
"""

import json

import regex  # tiktoken's own dependency: the same regex dialect as its pre-tokenizer
import tiktoken

# GPT-2's pre-tokenizer regex (HF ByteLevel with use_regex=True)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# HF's Digits(individual_digits=True) followed by ByteLevel, as one regex: every digit alone, no
# " ?\p{N}+" rule, and a digit ends a whitespace run just as a non-space does (SmolLM2's "smollm")
DIGITS_GPT2_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# Llama 3's and Qwen2's split regex (GGUF files name the pre-tokenizer instead of storing it)
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GGUF_PRE_TOKENIZERS = {
    "gpt2": GPT2_PATTERN,
    "default": GPT2_PATTERN,
    "smollm": DIGITS_GPT2_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "qwen2": QWEN2_PATTERN,
}


def byte_level_alphabet():
    """GPT-2's map byte -> printable unicode char (bytes_to_unicode), inverted: char -> byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # unprintable bytes are shifted above 255
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    """Byte-level BPE on tiktoken, with special tokens parsed in text (as HF does) and a chat format.
    ranks: {token bytes: id}, special_tokens: {text: id}, pattern: the pre-tokenizer regex."""

    def __init__(self, ranks, special_tokens, pattern, bos_id=None, eos_ids=(), chat_format=None,
                 name="bpe"):
        self.enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.special_tokens = special_tokens
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.chat_format = chat_format  # "chatml", "llama3" or None
        self.vocab_size = max([*ranks.values(), *special_tokens.values()]) + 1
        # tiktoken panics (a Rust BaseException) on a byte the vocabulary lacks: such text takes a
        # slower path
        self.missing_bytes = set(range(256)) - {b[0] for b in ranks if len(b) == 1}
        self.words = regex.compile(pattern)
        longest_first = sorted(special_tokens, key=len, reverse=True)
        self.specials = regex.compile("|".join(regex.escape(t) for t in longest_first) or "(?!)")

    def encode(self, text):
        if self.missing_bytes.isdisjoint(text.encode("utf-8", "surrogatepass")):
            return self.enc.encode(text, allowed_special="all")
        ids, start = [], 0
        for special in self.specials.finditer(text):
            ids += self.encode_words(text[start : special.start()])
            ids.append(self.special_tokens[special.group()])
            start = special.end()
        return ids + self.encode_words(text[start:])

    def encode_words(self, text):
        # as HF does: split into words first, then drop the bytes without a token inside each word
        # and merge what is left ("a\x04b" -> "a", "b"; a 4-byte char keeps its 3 known bytes)
        ids = []
        for word in self.words.findall(text):
            raw = word.encode("utf-8", "surrogatepass")
            known = bytes(b for b in raw if b not in self.missing_bytes)
            if known:
                # tiktoken's BPE of one word, without its regex split: a private method, since
                # tiktoken has no public API that encodes bytes
                ids += self.enc._encode_single_piece(known)
        return ids

    def decode(self, ids):
        return self.enc.decode(list(ids), errors="replace")

    def format_chat(self, messages, add_generation_prompt=True):
        """messages: [{"role": ..., "content": ...}] -> prompt text in the model's chat format."""
        if self.chat_format == "chatml":  # SmolLM2, Qwen2
            turns = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
            reply = "<|im_start|>assistant\n"
            return "".join(turns) + (reply if add_generation_prompt else "")
        if self.chat_format == "llama3":
            turn = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
            turns = [turn.format(m["role"], m["content"]) for m in messages]
            reply = "<|start_header_id|>assistant<|end_header_id|>\n\n"
            return "<|begin_of_text|>" + "".join(turns) + (reply if add_generation_prompt else "")
        raise ValueError("this tokenizer has no chat format (not a ChatML or Llama-3 instruct model)")


def chat_format_of(special_tokens):
    if "<|im_start|>" in special_tokens:
        return "chatml"
    if "<|start_header_id|>" in special_tokens:
        return "llama3"
    return None


def bpe_tokenizer(vocab, merges, special_tokens, pattern, bos_id=None, eos_ids=(), source=""):
    """vocab {byte-level string: id}, merges ["a b", ...] in priority order -> Tokenizer.
    tiktoken ranks a merge by the id of its result, so ids must grow with merge priority
    (true of GPT-2, SmolLM2, Llama 3, Qwen2); only the 256 byte tokens and merge results are
    ranked."""
    to_byte = byte_level_alphabet()

    def as_bytes(token):
        return bytes(to_byte[c] for c in token)

    ranks = {as_bytes(t): i for t, i in vocab.items() if len(t) == 1 and t in to_byte}
    last = -1
    for merge in merges:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        merged = a + b
        if merged not in vocab:
            raise ValueError(f"{source}: merge {a!r} + {b!r} makes {merged!r}, not in the vocabulary")
        if vocab[merged] <= last and as_bytes(merged) not in ranks:
            raise ValueError(f"{source}: token ids do not follow merge order; tiktoken cannot rank them")
        last = max(last, vocab[merged])
        ranks.setdefault(as_bytes(merged), vocab[merged])
    end_of_turn = [special_tokens[t] for t in ("<|im_end|>", "<|eot_id|>") if t in special_tokens]
    return Tokenizer(
        ranks,
        special_tokens,
        pattern,
        bos_id=bos_id,
        eos_ids=sorted(set(eos_ids) | set(end_of_turn)),
        chat_format=chat_format_of(special_tokens),
    )


def pattern_from_pre_tokenizer(pre, source):
    """The regex of a tokenizer.json pre_tokenizer: ByteLevel, Split+ByteLevel, Digits+ByteLevel."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s["type"] for s in steps]
    digits = any(s["type"] == "Digits" and s.get("individual_digits") for s in steps)
    split = [s for s in steps if s["type"] == "Split"]
    byte_level = [s for s in steps if s["type"] == "ByteLevel"]
    if split and byte_level and not digits:
        return split[0]["pattern"]["Regex"]
    if byte_level and byte_level[0].get("use_regex", True) and not split:
        return DIGITS_GPT2_PATTERN if digits else GPT2_PATTERN
    supported = "supported: ByteLevel, Split+ByteLevel, Digits+ByteLevel"
    raise ValueError(f"{source}: unsupported pre-tokenizer {kinds} ({supported})")


def tokenizer_from_hf_json(path, eos_ids=()):
    with open(path) as f:
        spec = json.load(f)
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"{path}: tokenizer model {spec['model']['type']!r} is not byte-level BPE")
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    pattern = pattern_from_pre_tokenizer(spec.get("pre_tokenizer"), path)
    model = spec["model"]
    vocab, merges = model["vocab"], model["merges"]
    return bpe_tokenizer(vocab, merges, special, pattern, eos_ids=eos_ids, source=path)


def tokenizer_from_vocab_merges(vocab_path, merges_path, eos_ids=()):
    with open(vocab_path) as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    merges = [line for line in lines if line.strip() and not line.startswith("#version")]
    # GPT-2's vocab.json lists its special tokens (<|endoftext|>) among the ordinary ones
    special = {t: i for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")}
    return bpe_tokenizer(vocab, merges, special, GPT2_PATTERN, eos_ids=eos_ids, source=vocab_path)
