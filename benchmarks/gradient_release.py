"""Peak memory of one training step (forward + backward + step) with and without gradient
release (``Lion(..., step_in_backward=True)``), on a GPT-like model on CPU.

Each variant runs in its own process. glibc's mmap threshold is fixed at 64 KiB
(``MALLOC_MMAP_THRESHOLD_``), so every large tensor is its own mapping, returned to the
system when freed: the resident set then follows the live tensors. After two warm-up steps
(state created, the C++ kernels loaded) the process resets its peak RSS
(``/proc/self/clear_refs``), runs the measured steps, and reports the peak above the RSS it
had before them. The figure of merit is the saving, (ordinary − released), against the
gradients' bytes; the goal is ≥ 80%.

    python benchmarks/gradient_release.py                      # d=512, 6 layers, batch 1
    python benchmarks/gradient_release.py --d-model 384 --layers 4 --batch 4

Gradient release lowers the peak only where gradients make it. With a large batch against a
small model (the second command) the peak is at the loss, before any gradient exists (logits,
their log-softmax and its gradient), and the saving is small; the figures of both are in the
README's *Gradient release* section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

CHILD = """
import json, os, sys, torch
from torch import nn
import lionopt

args = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(args["threads"])


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, max(1, d // 64), batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, d, layers, context):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), 1)
        x = self.tok(idx) + self.pos(torch.arange(t))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


model = GPT(args["vocab"], args["d_model"], args["layers"], args["context"])
opt = lionopt.Lion(model.parameters(), lr=1e-4, weight_decay=0.1,
                   step_in_backward=args["released"], **args.get("impl", {}))
g = torch.Generator().manual_seed(1)
data = torch.randint(0, args["vocab"], (args["steps"] + 2, args["batch"], args["context"] + 1),
                     generator=g)


def train_step(batch):
    opt.zero_grad(set_to_none=True)
    logits = model(batch[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    opt.step()


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


for i in range(2):
    train_step(data[i])
from lionopt.kernels.cpu import dispatch
dispatch.wait(300)
train_step(data[1])
opt.zero_grad(set_to_none=True)  # the baseline: weights and state, no gradients
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss_kib("VmRSS:")
for i in range(args["steps"]):
    train_step(data[2 + i])
peak = rss_kib("VmHWM:")
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak_above_kib": peak - before, "param_bytes": params,
                  "n_params": sum(p.numel() for p in model.parameters())}))
"""


def run(args: argparse.Namespace, released: bool) -> dict:
    config = dict(vars(args), released=released)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, interleaved")
    args = parser.parse_args()
    rows = {"ordinary": [], "released": []}
    for _ in range(args.rounds):
        for name, released in (("ordinary", False), ("released", True)):
            rows[name].append(run(args, released))
    grad_mib = rows["ordinary"][0]["param_bytes"] / 2**20  # fp32: gradients = weights
    ordinary = min(r["peak_above_kib"] for r in rows["ordinary"]) / 1024
    released = min(r["peak_above_kib"] for r in rows["released"]) / 1024
    saving = ordinary - released
    n = rows["ordinary"][0]["n_params"]
    print(
        f"GPT-like: {n / 1e6:.1f}M params, gradients {grad_mib:.1f} MiB; batch {args.batch} x "
        f"{args.context} tokens; {args.threads} thread(s); min over {args.rounds} runs"
    )
    print(f"peak above the pre-step RSS, ordinary step: {ordinary:8.1f} MiB")
    print(f"peak above the pre-step RSS, released:      {released:8.1f} MiB")
    print(
        f"saving: {saving:.1f} MiB = {saving / grad_mib:.0%} of the gradients' bytes (goal >= 80%)"
    )


if __name__ == "__main__":
    main()
