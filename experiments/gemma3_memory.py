"""
How much GPU memory does training on gemma-3-12b-it need? Weights are counted from the config
(on the meta device: no memory); activations are measured, not guessed: one real 12B block runs
forward in bf16 on the CPU and every tensor autograd saves for the backward is counted once
(frozen weights, which autograd also keeps, excluded: they are already counted).

    python experiments/gemma3_memory.py            # ~1 min, ~2 GB of RAM, CPU only

A steering vector or a LoRA trains with the base frozen, so the backward needs the same saved
activations as full fine-tuning minus the weight gradients; the table adds weights + activations
(+ gradients and AdamW's two fp32 moments for a full fine-tune).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from model import Block, ModelConfig, Transformer  # noqa: E402

GIB = 2**30
# gemma-3-12b-it's text model (config.json's text_config)
GEMMA3_12B = ModelConfig(arch="gemma3", vocab_size=262208, d_model=3840, n_layers=48, n_heads=16,
                         n_kv_heads=8, d_head=256, d_mlp=15360, n_ctx=131072, norm_eps=1e-6,
                         qkv_bias=False, o_bias=False, mlp_bias=False, sliding_window=1024,
                         query_pre_attn_scalar=256,
                         rope_scaling={"rope_type": "linear", "factor": 8.0})


def parameter_count(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())  # tied head counted once


def saved_bytes_per_token(cfg, n_tokens, layer=0):
    """Bytes autograd keeps for one block's backward, per token (bf16, input requiring grad)."""
    block = Block(cfg, layer).to(torch.bfloat16).requires_grad_(False)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(1, n_tokens, cfg.d_model, dtype=torch.bfloat16, requires_grad=True)
    with torch.device("meta"):
        model = Transformer(cfg)  # only for its RoPE tables
    model.inv_freq_local = model.inv_freq = torch.ones(cfg.d_head // 2)
    rope = model.ropes(0, n_tokens, torch.bfloat16)[layer]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x, rope, None)
    return sum(seen.values()) / n_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512,
                        help="sequence length of the measured block")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = GEMMA3_12B
    n_params = parameter_count(cfg)
    weights = 2 * n_params  # bf16
    per_token = cfg.n_layers * saved_bytes_per_token(cfg, args.tokens)
    print(f"gemma-3-12b text model: {n_params / 1e9:.2f}B parameters, "
          f"bf16 weights {weights / GIB:.1f} GiB")
    print(f"saved activations: {per_token / 2**20:.1f} MiB per token over {cfg.n_layers} blocks "
          f"(measured on one block at T={args.tokens})")
    full_state = weights + weights + 2 * 4 * n_params  # + bf16 gradients + fp32 AdamW moments
    print("batch x tokens | steer / LoRA (frozen bf16 base) | full fine-tune, AdamW")
    for batch, tokens in ((1, 512), (4, 256), (8, 256), (8, 512), (16, 512)):
        activations = batch * tokens * per_token
        print(f"{batch:5d} x {tokens:4d}   | {(weights + activations) / GIB:7.1f} GiB"
              f"                   | {(full_state + activations) / GIB:7.1f} GiB")


if __name__ == "__main__":
    main()
