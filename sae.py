"""
Sparse autoencoders (SAEs) on one hook of a model: train one on the activations a task's texts
produce there, measure it, and save it in SAELens's file layout.

    python sae.py                                    # the persona world's toy model, block 2
    python sae.py --model toy --task persona --hook blocks.2.hook_resid_post --k 8 --width 256 \\
        --steps 2000 --out runs/sae-persona
    python sae.py --model smollm2-135m --task risky --hook blocks.12.hook_resid_post --width 2048

An SAE reads an activation x (d_in) and writes it back as a sparse sum of unit-norm decoder rows:
    f = act((x - b_dec) @ W_enc + b_enc)   (d_sae)     x_hat = f @ W_dec + b_dec   (d_in)
`act` is TopK (the default: the k largest pre-activations kept, through a ReLU as in SAELens, so
exactly k are chosen and at most k are non-zero) or ReLU with an L1 penalty on f. Decoder rows are
renormalised to unit norm after every step, so a feature's activation is its size in the stream
and L1 cannot shrink f by growing W_dec. Dead features (no activation over the last
`dead_after_tokens` training tokens) are revived by the AuxK loss of Gao et al. (2024): the
k_aux largest pre-activations of the dead features alone must reconstruct the live features'
residual error, which gives dead features a gradient toward directions the live ones miss.

Activations come from the task's texts: a toy world's pretraining documents (6M tokens: streamed,
the model runs on each step's documents) or a text task's training texts and eval prompts with
their answers (a few hundred: run through the model once and cached). Position 0 (BOS or the chat
template's first token, an attention sink with an outsized norm) is neither trained on nor
spliced. `eval_seqs` sequences drawn at random (at most a fifth) are held out for the metrics:
- explained variance 1 - sum |x - x_hat|^2 / sum |x - mean x|^2 (normalised MSE = 1 - it),
- mean L0 (non-zero features per token), dead features (never active on the held-out tokens),
  dense features (active on more than DENSE_FREQ of them),
- loss recovered (L_zero - L_sae) / (L_zero - L_clean): the next-token loss with the SAE's
  reconstruction spliced in at the hook, between zero-ablating the hook and the clean model.

A run directory holds config.json (our settings), cfg.json + sae_weights.safetensors (SAELens's
layout: W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec), metrics.json and
checkpoint.safetensors (for --resume), each written atomically.
"""

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import tasks
import toy
import train
from checkpoint import CheckpointError, atomic_write, first_line, read_json, write_json

DENSE_FREQ = 0.1  # a feature active on more than this share of tokens counts as dense
EVAL_TOKENS = 2048  # tokens per forward when measuring (SmolLM2's logits: 400 MB)
BUFFER_BYTES = 2**28  # a corpus whose activations fit in 256 MB is run through the model once
ARCHITECTURES = {"topk": "topk", "relu": "standard"}  # our --activation -> SAELens architecture


class SAEError(ValueError):
    """Bad input or a failed run; the command line prints it as one line."""


# -----------------------------------------------------------------------------
# The SAE


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    activation: str = "topk"  # "topk" or "relu" (with an L1 penalty)
    k: int = 8  # topk: features chosen per token
    hook_name: str = "blocks.2.hook_resid_post"
    model_name: str = ""


class SAE(torch.nn.Module):
    """W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in): SAELens's names,
    shapes and arithmetic (b_dec is subtracted from the input before encoding)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.activation not in ARCHITECTURES:
            choices = ", ".join(ARCHITECTURES)
            raise SAEError(f"activation {cfg.activation!r}: choose from {choices}")
        if cfg.activation == "topk" and not 0 < cfg.k <= cfg.d_sae:
            raise SAEError(f"k={cfg.k} must be in 1..d_sae={cfg.d_sae}")
        self.cfg = cfg
        W_dec = F.normalize(torch.randn(cfg.d_sae, cfg.d_in), dim=-1)  # unit rows
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone())  # tied at init, as SAELens and Gao et al.
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_in))

    def pre_acts(self, x):
        """x (..., d_in) -> pre-activations (..., d_sae)."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre):
        if self.cfg.activation == "relu":
            return F.relu(pre)
        top = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))

    def encode(self, x):
        """x (..., d_in) -> feature activations (..., d_sae)."""
        return self.activate(self.pre_acts(x))

    def decode(self, f):
        """f (..., d_sae) -> reconstruction (..., d_in)."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x):
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self):
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))


# -----------------------------------------------------------------------------
# Files: SAELens's layout. cfg.json is written in the flat form every SAELens version reads
# (versions >= 6 convert it on load: hook_name and model_name move into its metadata).


WEIGHT_SHAPES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"),
                 "b_enc": ("d_sae",), "b_dec": ("d_in",)}


def sae_lens_cfg(cfg):
    out = {
        "architecture": ARCHITECTURES[cfg.activation],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": hook_layer(cfg.hook_name),
        "hook_head_index": None,
        "activation_fn": "topk" if cfg.activation == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if cfg.activation == "topk" else {},
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "prepend_bos": True,
    }
    if cfg.activation == "topk":
        out["k"] = cfg.k
    return out


def hook_layer(hook_name):
    """blocks.{l}.* -> l; 0 for hooks before the first block (SAELens wants an int)."""
    parts = hook_name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else 0


def save_sae(sae, directory):
    os.makedirs(directory, exist_ok=True)
    tensors = {name: getattr(sae, name).detach().float().cpu().contiguous()
               for name in WEIGHT_SHAPES}
    path = os.path.join(directory, "sae_weights.safetensors")
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    write_json(os.path.join(directory, "cfg.json"), sae_lens_cfg(sae.cfg))


def config_from_sae_lens(saved, path):
    """A SAELens cfg.json (flat, before version 6, or with `metadata` / `meta`) -> SAEConfig."""
    meta = saved.get("metadata") or saved.get("meta") or {}
    architecture = saved.get("architecture", "standard")
    activation_fn = saved.get("activation_fn", saved.get("activation_fn_str", "relu"))
    if architecture == "topk" or activation_fn == "topk":
        activation = "topk"
        k = saved.get("k", (saved.get("activation_fn_kwargs") or {}).get("k"))
    elif architecture == "standard" and activation_fn == "relu":
        activation, k = "relu", 0
    else:
        raise SAEError(f"{path}: architecture {architecture!r} ({activation_fn}) is not supported "
                       "(topk or standard ReLU)")
    if saved.get("normalize_activations", "none") not in ("none", None, False):
        raise SAEError(f"{path}: normalize_activations={saved['normalize_activations']!r} "
                       "is not supported")
    if not saved.get("apply_b_dec_to_input", True):
        raise SAEError(f"{path}: apply_b_dec_to_input=false is not supported")
    # SAELens >= 6 options that change the arithmetic (a decoder-norm rescale inside TopK, inputs
    # reshaped per head): read silently, they would give other activations than SAELens's
    if saved.get("rescale_acts_by_decoder_norm"):
        raise SAEError(f"{path}: rescale_acts_by_decoder_norm=true is not supported")
    if saved.get("reshape_activations", "none") not in ("none", None):
        raise SAEError(f"{path}: reshape_activations={saved['reshape_activations']!r} "
                       "is not supported")
    hook_name = meta.get("hook_name", saved.get("hook_name", ""))
    model_name = meta.get("model_name", saved.get("model_name", "")) or ""
    try:
        return SAEConfig(d_in=int(saved["d_in"]), d_sae=int(saved["d_sae"]), activation=activation,
                         k=int(k or 0), hook_name=hook_name, model_name=model_name)
    except (KeyError, TypeError, ValueError) as e:
        raise SAEError(f"{path}: not an SAE config ({first_line(e)})") from None


def load_sae(directory, device="cpu"):
    """A directory in SAELens's layout (ours or SAELens's own) -> SAE."""
    cfg_path = os.path.join(directory, "cfg.json")
    weights_path = os.path.join(directory, "sae_weights.safetensors")
    for path in (cfg_path, weights_path):
        if not os.path.isfile(path):
            raise SAEError(f"{directory}: no {os.path.basename(path)} (not an SAE directory)")
    try:
        cfg = config_from_sae_lens(read_json(cfg_path), cfg_path)
        with safe_open(weights_path, "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError as e:
        raise SAEError(str(e)) from None
    except SAEError:
        raise
    except Exception as e:
        raise SAEError(f"{weights_path}: unreadable ({first_line(e)})") from None
    sae = SAE(cfg)
    sizes = {"d_in": cfg.d_in, "d_sae": cfg.d_sae}
    for name, dims in WEIGHT_SHAPES.items():
        expected = tuple(sizes[d] for d in dims)
        if name not in state:
            raise SAEError(f"{weights_path}: no tensor {name}")
        if tuple(state[name].shape) != expected:
            raise SAEError(f"{weights_path}: {name} has shape {tuple(state[name].shape)}, "
                           f"cfg.json says {expected}")
        getattr(sae, name).data.copy_(state[name].float())
    return sae.to(device)


# -----------------------------------------------------------------------------
# Activations at a hook


class StopForward(Exception):
    """Raised by the capturing hook: the blocks after it need not run."""


def hook_activations(model, tokens, hook_name):
    """tokens (B, T) -> the activation at the hook (B, T, d); later blocks are skipped."""
    captured = {}

    def capture(x, hook):
        captured["x"] = x.detach()
        raise StopForward

    with torch.no_grad(), model.hooks([(hook_name, capture)]):
        try:
            model(tokens)
        except StopForward:
            pass
    return captured["x"]


def check_hook(model, hook_name, sae=None):
    """The hook must exist and hold (B, T, d); an SAE must be as wide as d -> d."""
    if hook_name not in model.hook_points():
        example = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        raise SAEError(f"the model has no hook {hook_name!r} (e.g. {example})")
    x = hook_activations(model, torch.zeros(1, 2, dtype=torch.long,
                                            device=next(model.parameters()).device), hook_name)
    if x.dim() != 3:
        raise SAEError(f"hook {hook_name} holds {tuple(x.shape)}: an SAE reads (B, T, d) hooks")
    d = x.shape[-1]
    if sae is not None and sae.cfg.d_in != d:
        raise SAEError(f"the SAE reads d_in={sae.cfg.d_in} but {hook_name} holds {d} dimensions")
    return d


# -----------------------------------------------------------------------------
# The corpus: token sequences and the positions an SAE reads


@dataclass
class Corpus:
    tokens: torch.Tensor  # (N, T) long, right-padded
    mask: torch.Tensor  # (N, T) bool: real tokens, position 0 excluded
    targets: torch.Tensor  # (N, T) long: the next token, tasks.IGNORE where there is none
    lengths: torch.Tensor  # (N,) real tokens per row

    def __len__(self):
        return len(self.tokens)

    def rows(self, idx):
        """The rows idx, cut to the longest of them: padding costs a real model's forward."""
        T = int(self.lengths[idx].max())
        return Corpus(self.tokens[idx, :T], self.mask[idx, :T], self.targets[idx, :T],
                      self.lengths[idx])

    def batches(self, max_tokens=EVAL_TOKENS):
        """Rows of similar length together, at most max_tokens (rows x longest) a batch."""
        order = self.lengths.argsort(descending=True)
        start = 0
        while start < len(order):
            T = int(self.lengths[order[start]])
            n = max(1, max_tokens // T)
            yield self.rows(order[start : start + n])
            start += n


def corpus_of_sequences(seqs, pad_id=0):
    """[[ids]] -> Corpus. Sequences of fewer than 2 tokens have no position to read."""
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise SAEError("empty corpus: no sequence of 2 tokens or more to read activations from")
    tokens = tasks.right_pad(seqs, pad_id)  # (N, T)
    lengths = torch.tensor([len(s) for s in seqs])
    real = torch.arange(tokens.shape[1]) < lengths[:, None]  # (N, T)
    mask = real.clone()
    mask[:, 0] = False
    targets = torch.full_like(tokens, tasks.IGNORE)
    targets[:, :-1] = torch.where(real[:, 1:], tokens[:, 1:], tasks.IGNORE)
    return Corpus(tokens, mask, targets, lengths)


def corpus_of_documents(docs):
    """Packed documents (N, T), every token real (toy.Documents) -> Corpus, without a Python loop
    over 200k rows."""
    tokens = docs.long()  # (N, T)
    if tokens.numel() == 0 or tokens.shape[1] < 2:
        raise SAEError("empty corpus: no document of 2 tokens or more to read activations from")
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    targets = torch.full_like(tokens, tasks.IGNORE)
    targets[:, :-1] = tokens[:, 1:]
    return Corpus(tokens, mask, targets, torch.full((len(tokens),), tokens.shape[1]))


def task_corpus(task, tokenizer):
    """A toy world's pretraining documents, or a text task's texts: its training examples (prompt
    + answer) and its eval prompts with their right answers (300 training texts alone are few)."""
    if hasattr(task, "pretrain_examples"):
        docs = task.pretrain_examples()
        if isinstance(docs, toy.Documents):
            return corpus_of_documents(docs.tokens)
        return corpus_of_sequences([e.prompt + e.answer for e in docs], tokenizer.pad_id)
    texts = [e.prompt + e.answer for e in task.train_examples(tokenizer)]
    for eval_set in task.eval_sets(tokenizer).values():
        texts += [item.prompt + item.options[item.answer] for item in eval_set.items]
    return corpus_of_sequences(texts)


def split_corpus(corpus, eval_seqs, seed=0):
    """-> (train, held out): eval_seqs sequences (at most a fifth) drawn at random are held out;
    at random, not the last ones, since a text task's corpus ends with its longest eval prompts."""
    n_eval = min(eval_seqs, len(corpus) // 5)
    if n_eval == 0:
        raise SAEError(f"corpus of {len(corpus)} sequence(s): too few to hold any out for metrics")
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed))
    return corpus.rows(order[n_eval:].sort().values), corpus.rows(order[:n_eval].sort().values)


def batch_activations(model, corpus, hook_name, device):
    """-> the activations (n, d) at the corpus's masked positions, in float32."""
    x = hook_activations(model, corpus.tokens.to(device), hook_name)  # (B, T, d)
    return x[corpus.mask.to(device)].float()


def corpus_activations(model, corpus, hook_name, device, desc="activations"):
    """-> the activations (n, d) at every masked position of the corpus, in length-sorted
    batches (so their order is not the corpus's)."""
    batches = list(corpus.batches())
    return torch.cat([batch_activations(model, b, hook_name, device)
                      for b in tqdm(batches, desc=desc, dynamic_ncols=True, disable=None,
                                    leave=False)])


# -----------------------------------------------------------------------------
# Training


@dataclass
class TrainSettings:
    steps: int = 2000
    lr: float = 1e-3
    l1: float = 0.1  # relu: L1 coefficient (see sae_loss)
    aux_coeff: float = 1 / 32  # AuxK's weight (Gao et al.)
    dead_after_tokens: int = 20_000  # a feature not active for this many tokens is dead
    checkpoint_every: int = 200
    seed: int = 0


def normalised_mse(x, x_hat):
    """sum |x - x_hat|^2 / sum |x - mean x|^2 over a batch: 0 = perfect, 1 = the mean's error."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def aux_k_loss(sae, x, x_hat, pre, dead):
    """Gao et al.'s AuxK: the top k_aux pre-activations among dead features (k_aux = d_in / 2)
    reconstruct the residual x - x_hat, so dead features move toward what the live ones miss."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    k_aux = min(sae.cfg.d_in // 2 or 1, n_dead)
    dead_pre = pre.masked_fill(~dead, -torch.inf)  # (n, d_sae)
    top = dead_pre.topk(k_aux, dim=-1)
    f_aux = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    residual = (x - x_hat).detach()
    return normalised_mse(residual, f_aux @ sae.W_dec)


def sae_loss(sae, x, settings, dead):
    """x (n, d_in) -> (loss, parts). The reconstruction term is normalised by the batch's variance,
    so one learning rate serves a toy model's stream and a real model's ~10x larger one."""
    pre = sae.pre_acts(x)
    f = sae.activate(pre)
    x_hat = sae.decode(f)
    mse = normalised_mse(x, x_hat)
    loss = mse
    parts = {"nmse": mse.item()}
    if sae.cfg.activation == "relu":
        scale = (x - x.mean(0)).pow(2).sum(-1).mean().sqrt().clamp_min(1e-12)
        l1 = f.abs().sum(-1).mean() / scale  # unit decoder rows: |f| is the feature's size
        loss = loss + settings.l1 * l1
        parts["l1"] = l1.item()
    aux = aux_k_loss(sae, x, x_hat, pre, dead)
    loss = loss + settings.aux_coeff * aux
    parts["aux"] = aux.item()
    parts["l0"] = (f > 0).float().sum(-1).mean().item()
    return loss, parts, f


def save_checkpoint(path, step, sae, optimizer, since_active, history):
    train.save_checkpoint(path, step, sae, optimizer, history,
                          extra={"since_active": since_active.cpu()})


def load_checkpoint(path, sae, optimizer):
    """Restores the SAE, Adam's moments and the RNG in place -> (step, since_active, history)."""
    try:
        step, history, extra = train.load_checkpoint(path, sae, optimizer)
    except train.RunError as e:
        raise SAEError(str(e)) from None
    return step, extra["since_active"], history


def sae_step(sae, optimizer, x, settings, since_active):
    """One optimizer step on x (n, d_in) -> (loss parts, since_active), or (parts, None) with the
    SAE untouched when the loss is not finite."""
    dead = (since_active >= settings.dead_after_tokens).to(x.device)
    loss, parts, f = sae_loss(sae, x, settings, dead)
    parts["dead"] = int(dead.sum())
    if not math.isfinite(loss.item()):
        return {**parts, "loss": loss.item()}, None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    sae.normalize_decoder()
    active = (f > 0).any(0).cpu()  # (d_sae,)
    return parts, torch.where(active, 0, since_active + len(x))


def train_sae(sae, batch_at, settings, out=None, resume=False, desc="sae"):
    """Train `sae` on batch_at(step) -> activations (n, d_in), a pure function of the step so a
    resumed run sees the batches an uninterrupted one would. Checkpoints into out/ (if given)
    -> history {"loss": [[step, {parts}]]}."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr)
    ckpt = os.path.join(out, "checkpoint.safetensors") if out else None
    step, history = 0, {"loss": []}
    since_active = torch.zeros(sae.cfg.d_sae, dtype=torch.long)  # tokens since last active
    if resume and ckpt and os.path.exists(ckpt):
        step, since_active, history = load_checkpoint(ckpt, sae, optimizer)
    saved_step = step if ckpt and os.path.exists(ckpt) else None
    bar = tqdm(total=settings.steps, initial=step, desc=desc, dynamic_ncols=True, disable=None)
    with train.StopRequest() as stop:  # Ctrl-C: finish the step, checkpoint, stop
        while step < settings.steps and not stop.requested:
            x = batch_at(step)  # (n, d_in)
            if step == 0:
                with torch.no_grad():
                    sae.b_dec.copy_(x.mean(0))  # start at the data's centre, not the origin
            parts, since_active = sae_step(sae, optimizer, x, settings, since_active)
            if since_active is None:
                where = "none written yet" if saved_step is None else f"{ckpt} (step {saved_step})"
                raise SAEError(f"loss became {parts['loss']} at step {step}; stopped. "
                               f"Last good checkpoint: {where}")
            step += 1
            history["loss"].append([step, {k: round(v, 6) for k, v in parts.items()}])
            bar.set_postfix(nmse=f"{parts['nmse']:.4f}", l0=f"{parts['l0']:.1f}",
                            dead=parts["dead"])
            bar.update(1)
            if ckpt and (step % settings.checkpoint_every == 0 or step == settings.steps
                         or stop.requested):
                save_checkpoint(ckpt, step, sae, optimizer, since_active, history)
                saved_step = step
    bar.close()
    if step < settings.steps:
        raise SAEError(f"interrupted at step {step}; checkpoint saved: "
                       "resume with the same flags plus --resume")
    return history


# -----------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def reconstruction_metrics(sae, xs):
    """xs: [(n, d_in)] held-out activation batches -> explained variance, normalised MSE, mean L0,
    dead and dense features (shares of d_sae) and each feature's firing frequency."""
    x = torch.cat(xs)  # (n, d_in)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    nmse = normalised_mse(x, x_hat).item()
    freq = (f > 0).float().mean(0)  # (d_sae,)
    return {
        "explained_variance": 1 - nmse,
        "nmse": nmse,
        "l0": (f > 0).float().sum(-1).mean().item(),
        "dead_frac": (freq == 0).float().mean().item(),
        "dense_frac": (freq > DENSE_FREQ).float().mean().item(),
        "n_tokens": len(x),
    }, freq


def splice_hook(corpus_mask, replace):
    """A hook that replaces the activation at the masked positions with replace(x) (n, d)."""

    def hook(x, _):
        x = x.clone()
        x[corpus_mask] = replace(x[corpus_mask].float()).to(x.dtype)
        return x

    return hook


def next_token_loss(model, corpus, hook_name=None, replace=None, device="cpu",
                    max_tokens=EVAL_TOKENS):
    """Mean next-token cross-entropy over the corpus's masked positions, optionally with the
    activation at those positions of the hook replaced."""
    total, n = 0.0, 0
    for batch in corpus.batches(max_tokens):
        tokens, mask = batch.tokens.to(device), batch.mask.to(device)
        targets = batch.targets.to(device)
        scored = mask & (targets != tasks.IGNORE)  # (B, T): read by the SAE and with a next token
        hooks = [(hook_name, splice_hook(mask, replace))] if replace else []
        with torch.no_grad(), model.hooks(hooks):
            logits = model(tokens, at=scored)  # (n, vocab)
        total += F.cross_entropy(logits.float(), targets[scored], reduction="sum").item()
        n += int(scored.sum())
    return total / max(n, 1)


def loss_recovered(model, sae, corpus, device="cpu", max_tokens=EVAL_TOKENS):
    """-> {clean, sae, zero, loss_recovered}: (L_zero - L_sae) / (L_zero - L_clean)."""
    hook = sae.cfg.hook_name
    clean = next_token_loss(model, corpus, device=device, max_tokens=max_tokens)
    spliced = next_token_loss(model, corpus, hook, sae, device, max_tokens)
    zero = next_token_loss(model, corpus, hook, torch.zeros_like, device, max_tokens)
    recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
    return {"loss_clean": clean, "loss_sae": spliced, "loss_zero": zero,
            "loss_recovered": recovered}


def evaluate(model, sae, corpus, device="cpu"):
    """All metrics of an SAE on a held-out corpus -> (metrics, feature frequencies)."""
    x = corpus_activations(model, corpus, sae.cfg.hook_name, device, desc="held-out activations")
    metrics, freq = reconstruction_metrics(sae, [x])
    metrics.update(loss_recovered(model, sae, corpus, device))
    return metrics, freq


# -----------------------------------------------------------------------------
# A run: settings, the model and corpus, training, metrics, files


@dataclass
class RunConfig:
    model: str = "toy"
    task: str = "persona"
    hook: str = "blocks.2.hook_resid_post"
    activation: str = "topk"
    k: int = 8
    width: int = 256
    steps: int = 2000
    lr: float = 1e-3
    l1: float = 0.1
    batch_tokens: int = 2048  # activations per step
    eval_seqs: int = 512  # held-out sequences for the metrics
    checkpoint_every: int = 200
    seed: int = 0  # the task's, as train.py's --seed: a toy world (and its model) is one per seed
    sae_seed: int | None = None  # the SAE's own (init, batches, held-out split); None: seed
    threads: int | None = None
    device: str = "cpu"
    out: str = ""
    resume: bool = False


def subject_name(cfg):
    """The SAE's model_name: model, task and task seed (analyze.py checks it against a run's)."""
    return f"{cfg.model}:{cfg.task}:seed{cfg.seed}"


def load_subject(cfg):
    """-> (model, tokenizer, task): the model as train.py loads it (toy worlds: the shipped or
    cached pretrained model), frozen."""
    tcfg = train.with_defaults(train.TrainConfig(task=cfg.task, model=cfg.model, seed=cfg.seed))
    try:
        task = train.make_task(tcfg)
        if cfg.model == "toy":
            train.pretrain_toy_model(tcfg, task)
        model, tokenizer = train.base_model(tcfg, task, cfg.device)
    except (train.RunError, CheckpointError) as e:
        raise SAEError(str(e)) from None
    return model.eval().requires_grad_(False), tokenizer, task


def check_run_dir(cfg):
    """A new run needs an empty --out; --resume needs the settings of the run it continues."""
    try:
        train.check_resumable(cfg.out, cfg.resume, train.as_json(cfg), train.as_json(RunConfig()),
                              ignored=("resume", "threads"))
    except train.RunError as e:
        raise SAEError(str(e)) from None


def own_seed(cfg):
    """The seed of the SAE's init, batches and held-out split."""
    return cfg.seed if cfg.sae_seed is None else cfg.sae_seed


def epoch_order(step, batch_size, n, seed):
    """The indices of a step's batch: a seeded permutation of 0..n-1 per epoch, read in order;
    a pure function of the step, so a resumed run sees the batches an uninterrupted one would."""
    k = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty_like(k)
    for epoch in (k // n).unique().tolist():
        at = k // n == epoch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out[at] = perm[k[at] % n]
    return out


def streamed_batches(model, corpus, cfg):
    """batch_at(step): the activations of the step's sequences, as many as make about
    batch_tokens, run through the model at each step (a toy world's 6M tokens do not fit)."""
    per_row = corpus.mask.sum().item() / len(corpus)
    n_rows = max(1, round(cfg.batch_tokens / per_row))

    def batch_at(step):
        rows = corpus.rows(epoch_order(step, n_rows, len(corpus), own_seed(cfg)))
        return batch_activations(model, rows, cfg.hook, cfg.device)

    return batch_at


def buffered_batches(model, corpus, cfg):
    """batch_at(step): batch_tokens activations drawn from all of the corpus's, computed once (a
    text task's few hundred texts: one pass of the model instead of one per step)."""
    buffer = corpus_activations(model, corpus, cfg.hook, cfg.device, desc="caching activations")

    def batch_at(step):
        order = epoch_order(step, cfg.batch_tokens, len(buffer), own_seed(cfg))
        return buffer[order.to(buffer.device)]

    return batch_at


def training_batches(model, corpus, cfg, d_in):
    if corpus.mask.sum().item() * d_in * 4 <= BUFFER_BYTES:
        return buffered_batches(model, corpus, cfg)
    return streamed_batches(model, corpus, cfg)


def print_metrics(metrics):
    sparsity = f"k={metrics['k']}" if metrics["activation"] == "topk" else f"l1={metrics['l1']}"
    print(f"\nSAE {metrics['hook']} | {metrics['model']} {metrics['task']} | "
          f"{metrics['activation']} {sparsity} width {metrics['width']} | "
          f"{metrics['steps']} steps, {metrics['seconds']:.0f} s")
    print(f"explained variance {metrics['explained_variance']:.3f} (nmse {metrics['nmse']:.3f})  "
          f"L0 {metrics['l0']:.2f}  dead {100 * metrics['dead_frac']:.1f}%  "
          f"dense {100 * metrics['dense_frac']:.1f}%")
    print(f"loss recovered {metrics['loss_recovered']:.3f}  (clean {metrics['loss_clean']:.4f}, "
          f"SAE {metrics['loss_sae']:.4f}, zero-ablated {metrics['loss_zero']:.4f}; "
          f"{metrics['n_tokens']} held-out tokens)")


def run(cfg):
    """Train and measure one SAE; writes everything into cfg.out -> metrics."""
    own = "" if cfg.sae_seed is None else f"-sae{cfg.sae_seed}"
    cfg.out = cfg.out or os.path.join("runs", f"sae-{cfg.task}-{cfg.hook}-seed{cfg.seed}{own}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_run_dir(cfg)
    model, tokenizer, task = load_subject(cfg)
    d_in = check_hook(model, cfg.hook)
    train_corpus, held_out = split_corpus(task_corpus(task, tokenizer), cfg.eval_seqs,
                                          own_seed(cfg))
    torch.manual_seed(own_seed(cfg))
    # the seed names the model too: a toy world of another seed is another model of one width
    sae_cfg = SAEConfig(d_in=d_in, d_sae=cfg.width, activation=cfg.activation, k=cfg.k,
                        hook_name=cfg.hook, model_name=subject_name(cfg))
    sae = SAE(sae_cfg).to(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
    settings = TrainSettings(steps=cfg.steps, lr=cfg.lr, l1=cfg.l1,
                             checkpoint_every=cfg.checkpoint_every, seed=own_seed(cfg))
    started = time.time()
    batch_at = training_batches(model, train_corpus, cfg, d_in)
    history = train_sae(sae, batch_at, settings, cfg.out, cfg.resume, desc=f"sae {cfg.hook}")
    seconds = time.time() - started
    metrics, freq = evaluate(model, sae, held_out, device=cfg.device)
    save_sae(sae, cfg.out)
    metrics = {"model": cfg.model, "task": cfg.task, "hook": cfg.hook,
               "activation": cfg.activation, "k": cfg.k if cfg.activation == "topk" else None,
               "l1": cfg.l1 if cfg.activation == "relu" else None,
               "width": cfg.width, "steps": cfg.steps, "seconds": round(seconds, 2),
               **metrics, "feature_freq": [round(v, 6) for v in freq.tolist()],
               "history": history}
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    return metrics


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    d = RunConfig()
    p = train.OneLineParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="toy (the task's pretrained model) | "
                   "smollm2-135m | an HF checkpoint dir | a .gguf file (default: toy)")
    p.add_argument("--task", default=d.task, choices=sorted(train.all_tasks()),
                   help="whose texts feed the SAE: a toy world's pretraining documents or a text "
                   "task's training texts and eval prompts (default: persona)")
    p.add_argument("--hook", default=d.hook, help=f"hook point read (default: {d.hook})")
    p.add_argument("--activation", default=d.activation, choices=list(ARCHITECTURES),
                   help="topk, or relu with an L1 penalty (default: topk)")
    p.add_argument("--k", type=train.positive_int, default=d.k, help="topk: active features per "
                   f"token (default: {d.k})")
    p.add_argument("--width", type=train.positive_int, default=d.width,
                   help=f"features, d_sae (default: {d.width})")
    p.add_argument("--steps", type=train.positive_int, default=d.steps,
                   help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default: {d.lr})")
    p.add_argument("--l1", type=float, default=d.l1, help="relu: L1 coefficient on |f| / the "
                   f"batch's rms norm (default: {d.l1})")
    p.add_argument("--batch-tokens", type=train.positive_int, default=d.batch_tokens,
                   help=f"activations per step (default: {d.batch_tokens})")
    p.add_argument("--eval-seqs", type=train.positive_int, default=d.eval_seqs,
                   help=f"held-out sequences for the metrics (default: {d.eval_seqs})")
    p.add_argument("--checkpoint-every", type=train.positive_int, default=d.checkpoint_every,
                   help=f"steps between checkpoints (default: {d.checkpoint_every})")
    p.add_argument("--seed", type=int, default=d.seed, help="the task's seed, as train.py's "
                   "(a toy world and its pretrained model), and the SAE's unless --sae-seed "
                   "(default: 0)")
    p.add_argument("--sae-seed", type=int, help="the SAE's own seed (init, batches, held-out "
                   "split) on the same model (default: --seed)")
    p.add_argument("--threads", type=train.positive_int,
                   help="CPU threads for torch (default: 1 on toy models, torch's own otherwise)")
    p.add_argument("--device", default=d.device, help="(default: cpu)")
    p.add_argument("--out", default="", help="run directory (default: runs/sae-<task>-<hook>-"
                   "seed<seed>[-sae<sae-seed>])")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "last checkpoint")
    return p


def parse_args(argv=None):
    parser = build_parser()
    cfg = RunConfig(**vars(parser.parse_args(argv)))
    if not cfg.lr > 0 or cfg.l1 < 0:
        parser.error("--lr must be positive and --l1 >= 0")
    if cfg.threads is None and cfg.task in toy.TOY_TASKS:
        cfg.threads = 1  # toy matmuls are too small to share a core (see train.py's --threads)
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    try:
        metrics = run(cfg)
    except (SAEError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted; the last checkpoint (if any) is in {cfg.out}: "
                 "resume with the same flags plus --resume")
    print_metrics(metrics)
    print(f"\nwrote {cfg.out}/: cfg.json sae_weights.safetensors (SAELens layout) "
          "metrics.json config.json")


if __name__ == "__main__":
    main()
