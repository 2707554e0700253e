"""
Tokenizers on tiktoken for byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3, Qwen2), built from
an HF tokenizer.json, from vocab.json + merges.txt, or (checkpoint.py) from GGUF metadata, and for
SentencePiece BPE vocabularies (Gemma 3, from GGUF metadata), with the chat formats of instruct
models (ChatML, Llama 3, Gemma).

HF stores tokens as printable "byte-level" strings; tiktoken wants raw bytes with a rank per token.
Read top to bottom: pre-tokenizer regexes -> the byte alphabet -> Tokenizer -> building one ->
SentencePiece BPE (its own ranks, its own tokenizer class).
"""

import json
import re

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
        self.chat_format = chat_format  # "chatml", "llama3", "gemma" or None
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
        if self.chat_format == "gemma":
            return gemma_chat(messages, add_generation_prompt)
        raise ValueError("this tokenizer has no chat format (not a ChatML, Llama-3 or Gemma model)")


def gemma_chat(messages, add_generation_prompt):
    """Gemma 3's chat template: no system turn (its text opens the first user turn, then a blank
    line), the assistant is "model", and each turn's text is stripped (the template's `trim`)."""
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    turns = []
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError("Gemma's chat alternates user/assistant turns, starting with the user")
        role = "model" if m["role"] == "assistant" else m["role"]
        text = (prefix if i == 0 else "") + m["content"].strip()
        turns.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    reply = "<start_of_turn>model\n"
    return "<bos>" + "".join(turns) + (reply if add_generation_prompt else "")


def chat_format_of(special_tokens):
    if "<|im_start|>" in special_tokens:
        return "chatml"
    if "<|start_header_id|>" in special_tokens:
        return "llama3"
    if "<start_of_turn>" in special_tokens:
        return "gemma"
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


# -----------------------------------------------------------------------------
# SentencePiece BPE (Gemma 3)
#
# SentencePiece writes each space as "▁", cuts out its user-defined tokens whole (Gemma: runs of
# "\n", of "▁" and of "\t", some HTML tags), starts every other stretch from characters and merges
# any two neighbours whose concatenation is a piece, the best-scored first (the leftmost among
# equals); a character with no piece becomes the tokens of its UTF-8 bytes, <0x00>..<0xFF>.
# tiktoken merges the same way by lowest rank, but from bytes, so the ranks here are not the ids:
# every byte, then the bytes of each character joined up (so that characters form before any
# merge), then the pieces of two or more characters by score; each rank maps back to its id(s).

SPACE = "\u2581"  # "▁"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # SentencePiece's (and GGUF's) types


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece BPE without a dummy prefix (Gemma 3), on tiktoken. Control and user-defined
    tokens written in the text are parsed as special tokens, as HF does (SentencePiece itself
    parses only the user-defined ones). encode adds no BOS, like Tokenizer.encode.
    ranks: {bytes: rank}, rank_ids: [ids of each rank], special_tokens: {text: id},
    token_bytes: [bytes of each id], pattern: the pre-tokenizer regex (word_pattern)."""

    def __init__(self, ranks, rank_ids, special_tokens, pattern, token_bytes, bos_id=None,
                 eos_ids=(), chat_format=None, name="sentencepiece"):
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens={})
        self.id_of_rank = [ids[0] for ids in rank_ids]
        # the ranks left as more than one token: a character with no piece, as bytes
        self.byte_fallback = {rank: ids for rank, ids in enumerate(rank_ids) if len(ids) > 1}
        self.special_tokens = special_tokens
        self.special_ids = {text.replace(" ", SPACE): i for text, i in special_tokens.items()}
        self.specials = re.compile(longest_match_pattern(self.special_ids))
        self.token_bytes = token_bytes
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.chat_format = chat_format
        self.vocab_size = len(token_bytes)

    def encode(self, text):
        text = text.replace(" ", SPACE)
        ids, start = [], 0
        for special in self.specials.finditer(text):
            ids += self.encode_ordinary(text[start : special.start()])
            ids.append(self.special_ids[special.group()])
            start = special.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_ordinary(self, text):
        """Text with spaces written "▁" and no special token -> ids."""
        ranks = self.enc.encode_ordinary(text) if text else []
        if self.byte_fallback.keys().isdisjoint(ranks):
            return [self.id_of_rank[r] for r in ranks]
        return [i for r in ranks for i in self.byte_fallback.get(r, (self.id_of_rank[r],))]

    def decode(self, ids):
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")


def longest_match_pattern(strings):
    """A regex that finds the longest of `strings` at the leftmost place, written as a trie: Python
    tries a plain alternation's branches one by one at every character, 0.3 s per 100 KB of text
    with Gemma's 6 414 special tokens, the trie 1 ms."""
    trie = {}
    for s in strings:
        node = trie
        for char in s:
            node = node.setdefault(char, {})
        node[""] = {}  # a string ends here

    def pattern(node):
        branches = [re.escape(c) + pattern(child) for c, child in sorted(node.items()) if c]
        if not branches:
            return ""
        group = "(?:" + "|".join(branches) + ")"
        return group + "?" if "" in node else group  # greedy: the longer string when both match

    return pattern(trie) or "(?!)"


def word_pattern(pieces, source):
    """tiktoken's pre-tokenizer regex for SentencePiece pieces: a word is a run of "▁" and what
    follows it up to the next "▁". Cutting the text there changes no token, since no piece spans
    the cut: training cut its words there too, so the pieces with a "▁" after another character
    are few (Gemma 3: ">▁</") and a word keeps them whole. Without the cuts tiktoken would merge
    a whole line at once."""
    after_char = re.compile(f"[^{SPACE}]{SPACE}")
    crossing = sorted((p for p in pieces if SPACE in p[1:] and after_char.search(p)), key=len,
                      reverse=True)
    for a in crossing:
        # kept whole only if it starts and ends inside a word, and no two can overlap in a text
        overlaps = any(a[-k:] == b[:k] for b in crossing for k in range(1, min(len(a), len(b))))
        if SPACE in (a[0], a[-1]) or overlaps:
            raise ValueError(f"{source}: piece {a!r} spans words in a way words cannot keep whole")
    keep = "".join(re.escape(p) + "|" for p in crossing)
    return f"{SPACE}*(?:{keep}[^{SPACE}])+|{SPACE}+"


def sentencepiece_ranks(tokens, scores, token_types, source):
    """tiktoken's ranks for a SentencePiece BPE vocabulary -> (ranks {bytes: rank},
    rank_ids [the ids each rank stands for])."""
    byte_id = {int(t[3:5], 16): i for i, (t, kind) in enumerate(zip(tokens, token_types))
               if kind == BYTE}
    if len(byte_id) != 256:
        raise ValueError(f"{source}: byte fallback needs the 256 tokens <0x00>..<0xFF>")
    normal = [i for i, kind in enumerate(token_types) if kind == NORMAL]
    piece_id = {tokens[i]: i for i in normal}
    merged = sorted((i for i in normal if len(tokens[i]) > 1), key=lambda i: -scores[i])
    for a, b in zip(merged, merged[1:]):
        if scores[a] == scores[b]:  # SentencePiece takes the leftmost of the two, tiktoken cannot
            raise ValueError(f"{source}: pieces {tokens[a]!r} and {tokens[b]!r} tie in score")

    def as_bytes(raw):  # a character (or part of one) with no piece: its bytes' tokens
        return tuple(byte_id[b] for b in raw)

    ranks = {bytes([b]): b for b in range(256)}
    rank_ids = [(piece_id.get(chr(b), byte_id[b]),) if b < 0x80 else (byte_id[b],)
                for b in range(256)]
    for char in sorted(set("".join(tokens[i] for i in normal))):  # every character a merge uses
        raw = char.encode("utf-8")
        for end in range(2, len(raw) + 1):
            if raw[:end] not in ranks:
                ranks[raw[:end]] = len(rank_ids)
                whole = end == len(raw) and char in piece_id
                rank_ids.append((piece_id[char],) if whole else as_bytes(raw[:end]))
    for i in merged:
        ranks[tokens[i].encode("utf-8")] = len(rank_ids)
        rank_ids.append((i,))
    return ranks, rank_ids


def unreachable_pieces(ranks, pieces):
    """The pieces (bytes) that BPE never makes, because merging their own text stops short of
    them (Gemma 3: "▁YYYY" -> "▁Y" "YY" "Y", and 3 more). For a piece to form, no merge may cross
    its edges in the text, so what happens inside is what happens to the piece alone: it forms
    nowhere. They must go, since tiktoken returns a word that is a whole piece without merging."""
    # _encode_single_piece runs no regex; 0xFF, in no UTF-8 text, merges with nothing and keeps
    # tiktoken from looking the piece up whole
    enc = tiktoken.Encoding("check", pat_str=".", mergeable_ranks=ranks, special_tokens={})
    return [p for p in pieces if enc._encode_single_piece(p + b"\xff") != [ranks[p], 0xFF]]


def sentencepiece_tokenizer(tokens, scores, token_types, bos_id=None, eos_ids=(), source="",
                            add_space_prefix=False):
    """A SentencePiece BPE vocabulary (GGUF: tokenizer.ggml.model "llama": tokens, scores,
    token_type) -> SentencePieceTokenizer, which encodes as SentencePiece does. <end_of_turn>
    joins eos_ids. A vocabulary that wants a dummy prefix space (Llama 2) is refused."""
    if add_space_prefix:
        raise ValueError(f"{source}: SentencePiece with a dummy prefix space is not supported")
    ranks, rank_ids = sentencepiece_ranks(tokens, scores, token_types, source)
    pieces = [t for t, kind in zip(tokens, token_types) if kind == NORMAL and len(t) > 1]
    for piece in unreachable_pieces(ranks, [p.encode("utf-8") for p in pieces]):
        del ranks[piece]
    special = {t.replace(SPACE, " "): i for i, (t, kind) in enumerate(zip(tokens, token_types))
               if kind in (UNKNOWN, CONTROL, USER_DEFINED)}
    token_bytes = [t.replace(SPACE, " ").encode("utf-8") for t in tokens]
    for i, (t, kind) in enumerate(zip(tokens, token_types)):
        if kind == BYTE:
            token_bytes[i] = bytes([int(t[3:5], 16)])
    end_of_turn = [special["<end_of_turn>"]] if "<end_of_turn>" in special else []
    return SentencePieceTokenizer(
        ranks,
        rank_ids,
        special,
        word_pattern(pieces, source),
        token_bytes,
        bos_id=bos_id,
        eos_ids=sorted(set(eos_ids) | set(end_of_turn)),
        chat_format=chat_format_of(special),
    )
