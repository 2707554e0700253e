"""Fake language models for scoring tests: a rule written as a function of whole sequences, given
model.Transformer's call signature (a KV cache, logits only at some positions), so tasks.evaluate
scores it exactly as it scores a real model."""

import torch
import torch.nn as nn


class HistoryCache:
    """Stands in for model.LayerCache: it keeps the tokens read so far, not keys and values."""

    def __init__(self):
        self.tokens = None  # (B, T_past)

    def __len__(self):
        return 0 if self.tokens is None else self.tokens.shape[1]

    def repeat_rows(self, k):
        self.tokens = self.tokens.repeat_interleave(k, dim=0)


class SequenceModel(nn.Module):
    """Subclasses define sequence_logits(tokens (B, T)) -> logits (B, T, vocab) from the whole
    sequence; forward adds what model.Transformer's forward takes."""

    def new_cache(self):
        return [HistoryCache()]

    def forward(self, tokens, cache=None, at=None):
        history = tokens
        if cache:
            past = cache[0].tokens
            history = tokens if past is None else torch.cat([past, tokens], dim=1)
            cache[0].tokens = history
        logits = self.sequence_logits(history)[:, -tokens.shape[1] :]  # (B, T, vocab)
        return logits if at is None else logits[at]
