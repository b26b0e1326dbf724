"""Lockstep checkpoints against Hugging Face transformers (PyTorch, CPU).

1. Export: a small GPT trained by `lockstep-worker local` (2 data-parallel ranks) is exported
   with `lockstep-worker export`; `GPT2LMHeadModel.from_pretrained` loads it, and its logits on
   the validation text match the engine's (`lockstep-worker logits`) within 1e-4.
2. Import: a GPT-2 made and saved by transformers (every tensor randomised, so that a tensor
   in the wrong place or orientation shows) gives the engine the same logits, and
   `lockstep-worker import` fine-tunes it: the engine's loss of the imported weights before the
   first step is transformers' loss on the same windows, and training lowers it.

Run by `make test-hf` (which makes the virtual environment from requirements.txt):
    python roundtrip.py WORKER_BINARY DATA_FILE
"""

import gzip
import json
import math
import pathlib
import re
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

TOL = 1e-4
LAYERS, HEADS, EMBED, CONTEXT = 2, 2, 32, 32
BATCH, EVAL_BATCHES = 8, 5


def manifest(name, data, steps):
    return f"""apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata:
  name: {name}
spec:
  parallelism:
    dataParallel: 2
  training:
    workload: Ddp
    model:
      gpt: {{layers: {LAYERS}, heads: {HEADS}, embedDim: {EMBED}, contextLength: {CONTEXT}}}
    data: {{kind: Text, path: {data}}}
    optimizer: {{learningRate: 0.003, warmupSteps: 5}}
    batchSize: {BATCH}
    maxSteps: {steps}
    seed: 7
    checkpoint: {{everySteps: {steps}}}
    evaluation: {{everySteps: {steps}, maxBatches: {EVAL_BATCHES}}}
  template:
    spec:
      containers:
        - name: worker
          image: lockstep/worker:0.1.0
"""


def run(*argv):
    print("+", " ".join(str(a) for a in argv), flush=True)
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    sys.stdout.write(p.stdout)
    sys.stdout.write(p.stderr)
    if p.returncode != 0:
        sys.exit(f"FAIL: {argv[1]} exited with {p.returncode}")
    return p.stdout + p.stderr


def text_ids(data):
    """The text as the engine reads it: characters, vocabulary sorted, last 10% validation."""
    opener = gzip.open if str(data).endswith(".gz") else open
    with opener(data, "rt", encoding="utf-8") as f:
        text = f.read()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = [index[c] for c in text]
    split = len(ids) - len(ids) // 10
    return vocab, ids, split


def val_windows(ids, split, count):
    """The first `count` validation windows (inputs, targets) the engine evaluates."""
    n = (len(ids) - split - 1) // CONTEXT
    starts = [split + i * CONTEXT for i in range(min(n, count))]
    return [(ids[s : s + CONTEXT], ids[s + 1 : s + CONTEXT + 1]) for s in starts]


def engine_logits(worker, model, ids, out):
    run(worker, "logits", model, "--ids", ",".join(map(str, ids)), "--out", out)
    return load_file(str(out))["logits"]


def compare(what, ours, theirs):
    d = (ours - theirs).abs().max().item()
    print(f"{what}: largest logit difference {d:.3e} (tolerance {TOL:g})", flush=True)
    if not d <= TOL:
        sys.exit(f"FAIL: {what}: the logits differ by {d}")


def main():
    worker, data = pathlib.Path(sys.argv[1]).resolve(), pathlib.Path(sys.argv[2]).resolve()
    torch.manual_seed(0)
    vocab, ids, split = text_ids(data)
    windows = val_windows(ids, split, BATCH * EVAL_BATCHES)
    probe = windows[0][0]
    with tempfile.TemporaryDirectory(prefix="lockstep-hf-") as tmp:
        tmp = pathlib.Path(tmp)

        # 1. Lockstep -> transformers.
        (tmp / "train.yaml").write_text(manifest("hf-export", data, 40))
        run(worker, "local", tmp / "train.yaml", "--no-progress", "--workdir", tmp / "train")
        out = tmp / "exported"
        run(worker, "export", tmp / "train" / "checkpoints", "--out", out)
        exported_vocab = json.loads((out / "lockstep-vocab.json").read_text())
        if exported_vocab != vocab:
            sys.exit("FAIL: lockstep-vocab.json is not the text's vocabulary")
        model = GPT2LMHeadModel.from_pretrained(out).eval()
        with torch.no_grad():
            theirs = model(torch.tensor([probe])).logits[0]
        compare("export: engine vs transformers", engine_logits(worker, out, probe, tmp / "a"), theirs)
        ckpt = next((tmp / "train" / "checkpoints").rglob("step-*.safetensors"))
        compare("export: checkpoint vs transformers", engine_logits(worker, ckpt, probe, tmp / "b"), theirs)

        # 2. transformers -> Lockstep.
        cfg = GPT2Config(
            vocab_size=len(vocab), n_positions=CONTEXT, n_embd=EMBED, n_layer=LAYERS, n_head=HEADS,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        made = GPT2LMHeadModel(cfg)
        with torch.no_grad():
            for name, p in made.named_parameters():
                if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.05 * torch.randn_like(p))
        made.eval()
        saved = tmp / "from-transformers"
        made.save_pretrained(saved)
        with torch.no_grad():
            theirs = made(torch.tensor([probe])).logits[0]
            x = torch.tensor([w[0] for w in windows])
            y = torch.tensor([w[1] for w in windows])
            logits = made(x).logits
            hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
        compare("import: engine vs transformers", engine_logits(worker, saved, probe, tmp / "c"), theirs)

        (tmp / "tune.yaml").write_text(manifest("hf-import", data, 20))
        log = run(worker, "import", saved, tmp / "tune.yaml", "--no-progress", "--workdir", tmp / "tune")
        start = re.search(r"imported weights: val_loss = ([0-9.]+)", log)
        end = re.findall(r"val_loss = ([0-9.]+)", log)
        if not start or not end:
            sys.exit("FAIL: the import run logged no loss of the imported weights")
        start, end = float(start.group(1)), float(end[-1])
        print(f"import: transformers' loss {hf_loss:.6f}, the engine's before training {start:.6f}, after 20 steps {end:.6f}", flush=True)
        if not abs(start - hf_loss) <= TOL * max(1.0, hf_loss):
            sys.exit(f"FAIL: the engine's loss of the imported weights {start} is not transformers' {hf_loss}")
        if not end < start or not math.isfinite(end):
            sys.exit(f"FAIL: fine-tuning did not lower the loss ({start} -> {end})")
    print("PASS: checkpoints round-trip with transformers", flush=True)


if __name__ == "__main__":
    main()
