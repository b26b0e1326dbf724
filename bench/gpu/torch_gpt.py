"""PyTorch baseline (eager, or with --compile torch.compile) for the GPT benchmark of the engine.

A nanoGPT-shaped decoder-only transformer (pre-LayerNorm, GELU MLP of 4x width, tied embeddings,
causal scaled-dot-product attention) trained with AdamW on random tokens; prints tokens/s and MFU
as one JSON line per precision. The Lockstep engine's GPT is compared against this in the same run.

    python3 bench/gpu/torch_gpt.py --layers 12 --width 768 --heads 12 --context 1024 --batch 8
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, width, heads, attention):
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # The same algorithm as the Lockstep engine: the full score matrix, masked softmax.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            y = att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, context, layers, width, heads, attention):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, attention) for _ in range(layers))
        self.lnf = nn.LayerNorm(width)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lnf(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precisions", default="tf32,bf16", help="any of fp32, tf32, bf16")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "manual"])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    a = p.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    for prec in a.precisions.split(","):
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        torch.backends.cudnn.allow_tf32 = prec == "tf32"
        model = GPT(a.vocab, a.context, a.layers, a.width, a.heads, a.attention).to(dev)
        step_model = torch.compile(model) if a.compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
        n_params = sum(p.numel() for p in model.parameters())
        x = torch.randint(0, a.vocab, (a.batch, a.context), device=dev)
        y = torch.randint(0, a.vocab, (a.batch, a.context), device=dev)
        times = []
        for i in range(a.warmup + a.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = step_model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        med = times[len(times) // 2]
        tokens = a.batch * a.context
        # PaLM estimate: 6N per token plus attention 12*L*H*Q*T = 12*L*width*T.
        flops_per_token = 6 * n_params + 12 * a.layers * a.width * a.context
        print(json.dumps({
            "impl": "pytorch-compile" if a.compile else "pytorch-eager", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
            "precision": prec, "attention": a.attention, "vocab": a.vocab, "params": n_params, "batch": a.batch, "context": a.context,
            "step_ms_median": round(med * 1e3, 2), "tokens_per_s": round(tokens / med),
            "mfu_vs_bf16_peak": round(flops_per_token * tokens / med / (a.peak_tflops * 1e12), 4),
            "mfu_vs_tf32_peak": round(flops_per_token * tokens / med / (a.peak_tflops / 2 * 1e12), 4),
            "final_loss": round(loss.item(), 4), "loss_is_finite": math.isfinite(loss.item()),
        }), flush=True)
        del model, step_model, opt


if __name__ == "__main__":
    main()
