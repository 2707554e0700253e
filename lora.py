"""
Hand-rolled LoRA with PEFT's semantics, attached to a model.py Transformer from outside.

A LoRALinear wraps a frozen nn.Linear and adds a trainable low-rank update:
    y = base(x) + lora_B(lora_A(dropout(x))) * scaling
    scaling = alpha / r  (rsLoRA: alpha / sqrt(r))
lora_A starts kaiming-uniform, lora_B at zero, so an untrained adapter changes nothing.

Files are PEFT's: adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<HF module path>.lora_{A,B}.weight`, so `peft.PeftModel.from_pretrained`
loads our adapters onto the HF model and `load_lora` loads PEFT's onto ours.
Modules are named as in the HF checkpoint (model.hf_module_names): targets such as "q_proj",
"self_attn.q_proj", GPT-2 "c_attn" match as PEFT's target_modules do; our own names ("qkv",
"mlp.down_proj") are accepted too and written to the config under their HF names.

Read top to bottom: the layer -> attaching -> switching off / merging -> saving and loading.
"""

import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
from safetensors.torch import save_file

from checkpoint import (atomic_write, first_line, hf_module_names, is_conv1d, read_json,
                        read_safetensors, write_json)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # what PeftModel puts before the HF module path

# -----------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0, rslora=False):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.base = base
        self.r = r
        self.alpha = alpha
        self.dropout_p = dropout
        self.rslora = rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # fp32 adapter even on a bf16 base, as PEFT does by default (autocast_adapter_dtype)
        factory = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)  # weight (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True  # False: the base layer alone (lora_disabled)
        self.merged = False  # True: the update is folded into base.weight

    def delta_weight(self):
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)

    def forward(self, x):
        if self.merged and not self.enabled:  # the delta is inside base.weight: take it out again
            weight = self.base.weight - self.delta_weight().to(self.base.weight.dtype)
            return nn.functional.linear(x, weight, self.base.bias)
        y = self.base(x)
        if not self.enabled or self.merged:
            return y
        x = self.dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(x)) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold scaling * B @ A into base.weight (fast inference); forward is unchanged."""
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}"


# -----------------------------------------------------------------------------
# Attaching


def lora_modules(model):
    """{our module path: LoRALinear} of every adapter in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def path_matches(path, target):
    # PEFT's rule for a list of target_modules: the whole path or a suffix of dotted components
    return path == target or path.endswith("." + target)


def layer_of(path):
    """Layer index of a module inside blocks.{i}, else None (e.g. unembed)."""
    parts = path.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def linear_paths(model):
    """{our path: HF path} of every nn.Linear that LoRA may wrap."""
    names = hf_module_names(model.cfg)
    paths = {p: names[p] for p, m in model.named_modules() if type(m) is nn.Linear and p in names}
    if model.cfg.tie_embeddings:  # merging into a tied head would change the embedding too
        paths.pop("unembed", None)
    return paths


def normalize_layers(model, layers):
    """None (every layer), an int or a list -> a sorted list of the model's layers (or None)."""
    if layers is None:
        return None
    layers = [layers] if isinstance(layers, int) else sorted(set(layers))
    model.cfg.check_layers(layers)
    return layers


def select_targets(model, targets, layers):
    """Our paths to wrap, and the HF target_modules that name exactly them for PEFT."""
    if isinstance(targets, str):
        targets = [targets]
    candidates = linear_paths(model)
    if layers is not None:
        candidates = {p: hf for p, hf in candidates.items() if layer_of(p) in layers}
    chosen = set()  # our paths
    hf_targets = []  # the names PEFT's config will list
    for target in targets:
        by_hf = [p for p, hf in candidates.items() if path_matches(hf, target)]
        by_ours = [p for p in candidates if path_matches(p, target)]
        if not by_hf and not by_ours:
            where = "" if layers is None else f" in layers {layers}"
            raise ValueError(f"LoRA target {target!r} matches no Linear module{where}; "
                             f"valid names: {', '.join(target_names(model))}")
        chosen.update(by_hf + by_ours)
        if by_hf:  # already an HF name: write it as given, as PEFT would
            hf_targets.append(target)
        else:  # our name: write the HF names of what it matched, without the layer prefix
            hf_targets += [hf_suffix(candidates[p]) for p in by_ours]
    return sorted(chosen, key=list(candidates).index), sorted(set(hf_targets))


def target_names(model):
    """The last component of every wrappable module's name, HF's and ours, sorted."""
    paths = linear_paths(model)
    names = {p.rsplit(".", 1)[-1] for p in paths} | {hf.rsplit(".", 1)[-1] for hf in paths.values()}
    return sorted(names)


def hf_suffix(hf_path):
    # "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj": a layer-free name that is still
    # specific enough not to catch other modules
    parts = hf_path.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[digits[0] + 1:]) if digits else hf_path


def attach_lora(model, targets=("down_proj",), layers=None, r=8, alpha=16, dropout=0.0,
                rslora=False):
    """Wrap the targeted nn.Linear modules in LoRALinear and freeze everything else.
    targets: PEFT-style names (HF or ours); layers: None (all), an int or a list of layer indices.
    Returns {our module path: LoRALinear}."""
    if lora_modules(model):
        raise ValueError("model already has LoRA modules; attach to a fresh model")
    layers = normalize_layers(model, layers)
    paths, hf_targets = select_targets(model, targets, layers)
    model.requires_grad_(False)
    wrapped = {}
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        wrapped[path] = LoRALinear(getattr(parent, leaf), r, alpha, dropout, rslora)
        setattr(parent, leaf, wrapped[path])
    # for save_lora's config
    model.lora_targets = hf_targets
    model.lora_layers = layers
    return wrapped


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -----------------------------------------------------------------------------
# Switching off and merging


@contextmanager
def lora_disabled(model, layers=None):
    """Adapters off inside the block, restored on exit: every adapter (the base model), or only
    those inside the given blocks (layers: a list of layer indices)."""
    chosen = lora_modules(model).items()
    modules = [m for path, m in chosen if layers is None or layer_of(path) in layers]
    before = [m.enabled for m in modules]
    try:
        for m in modules:
            m.enabled = False
        yield model
    finally:
        for m, was in zip(modules, before):
            m.enabled = was


def merge_lora(model):
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model):
    for m in lora_modules(model).values():
        m.unmerge()


# -----------------------------------------------------------------------------
# Saving and loading (PEFT's files)


def adapter_config(model, modules, base_model_name):
    settings = {(m.r, m.alpha, m.dropout_p, m.rslora) for m in modules.values()}
    if len(settings) > 1:
        raise ValueError("all LoRA modules must share r, alpha, dropout and rslora "
                         "to be saved as one adapter")
    first = next(iter(modules.values()))
    cfg = model.cfg
    targets = getattr(model, "lora_targets", None)
    if not targets:  # modules wrapped by hand: name them by their HF paths
        targets = sorted({hf_suffix(hf_module_names(cfg)[p]) for p in modules})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or cfg.name or None,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout_p,
        "use_rslora": first.rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": any(is_conv1d(cfg, p) for p in modules),  # GPT-2's Conv1D
        "inference_mode": True,
    }
    layers = getattr(model, "lora_layers", None)
    if layers is not None:  # PEFT finds the index after layers_pattern in the HF path
        config["layers_to_transform"] = layers
        config["layers_pattern"] = "h" if cfg.hf_model_type == "gpt2" else "layers"
    return config


def save_lora(model, directory, base_model_name=None):
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA modules to save (call attach_lora first)")
    config = adapter_config(model, modules, base_model_name)
    names = hf_module_names(model.cfg)
    state = {}
    for path, m in modules.items():
        # Conv1D or not, PEFT's lora_A is (r, in) and lora_B (out, r): no transpose here
        key = f"{KEY_PREFIX}{names[path]}"
        state[f"{key}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        state[f"{key}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp))
    write_json(os.path.join(directory, CONFIG_NAME), config)


# PEFT settings we do not implement, at the value that switches each off
PLAIN_LORA = {
    "bias": "none",
    "use_dora": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layer_replication": None,
    "target_parameters": None,
}


def read_adapter_config(path):
    if not os.path.exists(path):
        raise ValueError(f"{path}: missing adapter config")
    config = read_json(path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path}: peft_type is {peft_type!r}, only 'LORA' is supported")
    for key, plain in PLAIN_LORA.items():
        if config.get(key, plain) not in (plain, None, {}, []):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported "
                             f"(only plain LoRA: {key}={plain!r})")
    if not isinstance(config.get("target_modules"), list):
        targets = config.get("target_modules")
        raise ValueError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    return config


def check_adapter_weights(path, state, modules, names):
    expected = {}
    for p, m in modules.items():
        expected[f"{KEY_PREFIX}{names[p]}.lora_A.weight"] = m.lora_A.weight
        expected[f"{KEY_PREFIX}{names[p]}.lora_B.weight"] = m.lora_B.weight
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing)")
    if unexpected:
        raise ValueError(f"{path}: tensor {unexpected[0]} names no targeted module of this model "
                         f"({len(unexpected)} such)")
    for key, param in expected.items():
        if state[key].shape != param.shape:
            shapes = f"has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}"
            raise ValueError(f"{path}: tensor {key} {shapes}")
    return expected


def load_lora(model, directory):
    """Attach LoRA as adapter_config.json says and load adapter_model.safetensors (ours or PEFT's).
    Returns {our module path: LoRALinear}; on any misfit the model is left without LoRA."""
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    config = read_adapter_config(config_path)
    if not os.path.exists(weights_path):
        raise ValueError(f"{weights_path}: missing adapter weights")
    state = read_safetensors(weights_path)
    try:
        modules = attach_lora(
            model,
            targets=config["target_modules"],
            layers=config.get("layers_to_transform"),
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout", 0.0),
            rslora=config.get("use_rslora", False),
        )
    except ValueError as e:
        message = f"adapter does not fit this model ({first_line(e)})"
        raise ValueError(f"{config_path}: {message}") from None
    try:
        expected = check_adapter_weights(weights_path, state, modules, hf_module_names(model.cfg))
    except ValueError:
        detach_lora(model)
        raise
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key])
    return modules


def detach_lora(model):
    """Put the original nn.Linear modules back (unmerged first)."""
    for path, m in lora_modules(model).items():
        m.unmerge()
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, m.base)
    model.lora_targets = None
    model.lora_layers = None
