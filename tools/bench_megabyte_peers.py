#!/usr/bin/env python3
"""Benchmark mega's MEGABYTE against its PyTorch peers, side by side, in one invocation.

Measured on one machine, with one thread count, on one model configuration (design.md §8):

  a. megabyte-pytorch 0.3.6 training step (forward + backward + Adam), bytes/s = B*T / step;
  b. megabyte-pytorch generation, 512 new bytes after a 256-byte prompt, batch 1 and 8;
  c. a plain byte-level decoder-only transformer in PyTorch (pre-LN, learned positions,
     preallocated KV cache), with about as many parameters as mega's MEGABYTE config,
     generating the same 512 bytes, batch 1 and 8;
  d. torch f32 GEMM rates (GFLOP/s) at 1 thread and at the benchmark's thread count;
  e. mega itself: `mega bench train|generate ... --json` as subprocesses with
     RAYON_NUM_THREADS set to the same thread count ("mega: not available" when the binary is
     missing or fails).

Every figure is the median of several timed runs after warm-up, with min and max beside it.
Results go to a JSON file and a markdown table (printed and written next to the JSON).

Set up the peers first:  bash tools/peers-env.sh
Then:                    tools/.venv-peers/bin/python tools/bench_megabyte_peers.py --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# glibc reads these once, when the process starts, so they must be in the environment before
# Python runs: without them PyTorch's large per-step buffers are mmapped and unmapped every
# step and the page faults swing the timings 2-4x (design.md §8).
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "17179869184",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "TQDM_DISABLE": "1",  # megabyte-pytorch's generate() wraps its loop in tqdm
}
REPO = Path(__file__).resolve().parent.parent
PEERS_VENV_PYTHON = REPO / "tools" / ".venv-peers" / "bin" / "python"


def reexec_if_needed() -> None:
    """Restart under the peers venv and with the malloc and OpenMP settings, when missing."""
    python = sys.executable
    wanted = dict(MALLOC_ENV)
    policy = omp_wait_policy_from_argv(sys.argv[1:])
    if policy != "default":
        wanted["OMP_WAIT_POLICY"] = policy
    try:
        import torch  # noqa: F401
    except ImportError:
        if not PEERS_VENV_PYTHON.exists():
            sys.exit("torch is not importable; run `bash tools/peers-env.sh` first")
        if Path(sys.prefix).resolve() == PEERS_VENV_PYTHON.parent.parent.resolve():
            sys.exit("torch does not import from tools/.venv-peers; re-run tools/peers-env.sh")
        python = str(PEERS_VENV_PYTHON)
    if python != sys.executable or any(os.environ.get(k) != v for k, v in wanted.items()):
        env = dict(os.environ, **wanted)
        os.execve(python, [python, os.path.abspath(__file__), *sys.argv[1:]], env)


def omp_wait_policy_from_argv(argv: list) -> str:
    """--omp-wait-policy has to be known before argparse runs (it goes into the re-exec env)."""
    for i, a in enumerate(argv):
        if a.startswith("--omp-wait-policy="):
            return a.split("=", 1)[1]
        if a == "--omp-wait-policy" and i + 1 < len(argv):
            return argv[i + 1]
    return "PASSIVE"


# ----------------------------------------------------------------------------------------
# Configurations and analytic counts


@dataclass
class BenchConfig:
    """One shared configuration; every engine is built from it."""

    global_dim: int = 512  # mega: D_gw = P * D_G (paper-strict); megabyte-pytorch: dim[0]
    local_dim: int = 256
    global_layers: int = 6
    local_layers: int = 2
    patch: int = 8
    seq_len: int = 2048
    batch: int = 4
    vocab: int = 256
    ffn_mult: int = 4
    heads: int = 8  # megabyte-pytorch: 8 heads x 64 in every stage
    dim_head: int = 64
    prompt_len: int = 256
    gen_len: int = 512
    gen_batches: tuple = (1, 8)


QUICK = BenchConfig(
    global_dim=128,
    local_dim=64,
    global_layers=2,
    local_layers=1,
    seq_len=256,
    batch=2,
    heads=2,
    dim_head=32,
    prompt_len=32,
    gen_len=32,
    gen_batches=(1, 2),
)


def mega_config_json(c: BenchConfig) -> dict:
    """The same configuration in mega's config-file format (docs/megabyte-model.md)."""
    return {
        "model": "megabyte",
        "vocab_size": c.vocab,
        "patch_size": c.patch,
        "max_seq_len": c.seq_len,
        "global_byte_dim": c.global_dim // c.patch,
        "global_dim": c.global_dim,
        "global_layers": c.global_layers,
        "global_heads": max(1, c.global_dim // 64),
        "local_dim": c.local_dim,
        "local_layers": c.local_layers,
        "local_heads": max(1, c.local_dim // 64),
        "ffn_mult": c.ffn_mult,
        "activation": "relu",
        "init_std": 0.006,
    }


def mega_param_count(c: BenchConfig) -> int:
    """Parameters of mega's MEGABYTE (docs/megabyte-model.md table), paper-strict widths."""
    d_g = c.global_dim // c.patch  # per-byte global embedding width D_G
    dg, dl, v = c.global_dim, c.local_dim, c.vocab

    def layer(d: int) -> int:
        f = c.ffn_mult * d
        return 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)

    glob = v * d_g + c.seq_len * d_g + c.patch * d_g + c.global_layers * layer(dg) + 2 * dg
    loc = v * dl + c.patch * dl + dl + c.local_layers * layer(dl) + 2 * dl
    return glob + d_g * dl + loc


def mega_train_flops_per_byte(c: BenchConfig) -> float:
    """Training FLOPs per byte of mega's MEGABYTE: 3 x forward matmul FLOPs.

    Forward, per byte: the global stack runs once per patch (K = T/P positions), the local
    stack and the tied head once per byte. Attention counts the causal average of (n+1)/2
    keys per query: 2*d FLOPs for the scores and 2*d for the weighted values.
    """
    dg, dl, p, k = c.global_dim, c.local_dim, c.patch, c.seq_len // c.patch
    g_layer = 2 * (4 * dg * dg + 2 * dg * c.ffn_mult * dg)
    l_layer = 2 * (4 * dl * dl + 2 * dl * c.ffn_mult * dl)
    fwd = (
        c.global_layers * (g_layer + 4 * dg * (k + 1) / 2) / p
        + 2 * (dg // p) * dl  # W_GL
        + c.local_layers * (l_layer + 4 * dl * (p + 1) / 2)
        + 2 * dl * c.vocab
    )
    return 3 * fwd


def mp_param_count(c: BenchConfig) -> int:
    """Parameters of megabyte-pytorch's 2-stage MEGABYTE (spec §8.1), no positions."""
    inner, dg, dl, v, p = c.heads * c.dim_head, c.global_dim, c.local_dim, c.vocab, c.patch

    def layer(d: int) -> int:
        f = c.ffn_mult * d
        return (d + 4 * d * inner) + (d + d * f + f + f * d + d)

    embed = v * dl + (v * dl + 2 * p * dl + p * dl * dg + dg + 2 * dg)
    stacks = c.global_layers * layer(dg) + dg + c.local_layers * layer(dl) + dl
    return dg + dl + embed + stacks + (dg * p * dl + p * dl) + (dl * v + v)


def mp_train_flops_per_byte(c: BenchConfig) -> float:
    """Training FLOPs per byte of megabyte-pytorch: 3 x forward matmul FLOPs.

    Forward, per byte of a T-byte sequence (K = T/P patches):
      patch embedder Linear(P*D_L -> D_G) once per patch;
      global stack on K+1 positions (start vector + K patches), per layer q/k/v/out
        (D_G x 512 each way) + FF (2 x D_G x 4D_G), attention over (n+1)/2 keys on average;
      Linear(D_G -> P*D_L) on K positions;
      local stack on P+1 positions per patch (start vector + P bytes), attention likewise;
      output head Linear(D_L -> 256) on P+1 positions per patch.
    Elementwise work (norms, GELU, token shift, softmax, Adam) is not counted.
    """
    inner, dg, dl, p, k = c.heads * c.dim_head, c.global_dim, c.local_dim, c.patch, c.seq_len // c.patch

    def layer(d: int, n: int) -> float:
        return 2 * (4 * d * inner + 2 * d * c.ffn_mult * d) + 4 * inner * (n + 1) / 2

    fwd = (
        2 * p * dl * dg / p
        + c.global_layers * layer(dg, k + 1) * (k + 1) / k / p
        + 2 * dg * p * dl / p
        + c.local_layers * layer(dl, p + 1) * (p + 1) / p
        + 2 * dl * c.vocab * (p + 1) / p
    )
    return 3 * fwd


@dataclass
class PlainShape:
    """Width and depth of the plain transformer chosen to match mega's parameter count."""

    dim: int
    layers: int
    heads: int
    max_len: int
    params: int = 0
    target_params: int = 0


def plain_param_count(dim: int, layers: int, max_len: int, c: BenchConfig) -> int:
    f = c.ffn_mult * dim
    layer = 4 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * f + f) + (f * dim + dim)
    return c.vocab * dim + max_len * dim + layers * layer + 2 * dim  # tied output head


def choose_plain_shape(c: BenchConfig) -> PlainShape:
    """Widths in multiples of 64 (heads of 64), depth 2..32: the closest parameter count."""
    target = mega_param_count(c)
    best = None
    for dim in range(64, 2049, 64):
        for layers in range(2, 33):
            n = plain_param_count(dim, layers, c.seq_len, c)
            # prefer the closest count, then the shape nearest MEGABYTE's global stack
            key = (abs(n - target) / target > 0.05, abs(dim - c.global_dim), abs(n - target))
            if best is None or key < best[0]:
                best = (key, dim, layers, n)
    _, dim, layers, n = best
    return PlainShape(
        dim=dim, layers=layers, heads=max(1, dim // 64), max_len=c.seq_len, params=n, target_params=target
    )


# ----------------------------------------------------------------------------------------
# Timing


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_busy_fraction(seconds: float = 2.0) -> float:
    """Fraction of all CPUs busy over `seconds` (this process idles meanwhile, so it is the
    other tenants' load)."""

    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except OSError:
        return float("nan")
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


QUIET = {"max_busy": 1.0, "wait_s": 0.0}  # set from the command line


def wait_for_quiet() -> float:
    """Wait (up to QUIET["wait_s"]) until the other tenants use at most QUIET["max_busy"] of
    the CPUs; returns the last busy fraction seen, which goes into the results."""
    deadline = time.perf_counter() + QUIET["wait_s"]
    busy = cpu_busy_fraction()
    while busy > QUIET["max_busy"] and time.perf_counter() < deadline:
        time.sleep(5)
        busy = cpu_busy_fraction()
    return busy


@dataclass
class Timing:
    """Seconds per run, after warm-up, and what was measured."""

    seconds: list
    warmup: int
    load_before: str
    load_after: str
    others_busy_before: float
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def summary(self, work: float) -> dict:
        """Rates for `work` units per run (bytes or FLOPs): median, min and max rate."""
        if not self.seconds:
            return {
                "median": None,
                "min": None,
                "max": None,
                "spread": None,
                "noisy": False,
                "runs": 0,
                "warmup": self.warmup,
                "seconds": [],
                "load_before": self.load_before,
                "others_busy_before": self.others_busy_before,
                "load_after": self.load_after,
                "note": self.note,
            }
        rates = sorted(work / s for s in self.seconds)
        spread = (rates[-1] - rates[0]) / statistics.median(rates)
        return {
            "median": work / self.median,
            "min": rates[0],
            "max": rates[-1],
            "spread": spread,
            "noisy": spread > 0.10,
            "runs": len(self.seconds),
            "warmup": self.warmup,
            "seconds": self.seconds,
            "load_before": self.load_before,
            "others_busy_before": self.others_busy_before,
            "load_after": self.load_after,
            "note": self.note,
        }


class OverBudget(Exception):
    """A single run passed the measurement's hard deadline."""


DEADLINE = {"t": float("inf")}


def check_deadline() -> None:
    """Called inside long runs (generation loops), so one run cannot run away."""
    if time.perf_counter() > DEADLINE["t"]:
        raise OverBudget


def measure(
    run_once, warmup: int, runs: int, budget_s: float, note: str = "", warm_once=None, quiet: bool = True
) -> Timing:
    """Warm up, then time up to `runs` runs, stopping early when the next run would overrun
    `budget_s` (at least one run is always timed).

    `run_once` returns the seconds to count for that run (it times itself, so a run may
    report an estimate, see megabyte-pytorch generation). `warm_once` (default `run_once`)
    is the warm-up; warm-ups stop early once they have used half the budget. With `quiet`,
    it first waits for the other tenants to calm down (wait_for_quiet); either way it records
    how busy they were.
    """
    busy = wait_for_quiet() if quiet else cpu_busy_fraction(0.5)
    load_before = load_average()
    start = time.perf_counter()
    DEADLINE["t"] = start + 2 * budget_s  # hard stop, even inside a run
    seconds = []
    try:
        for _ in range(warmup):
            (warm_once or run_once)()
            if time.perf_counter() - start > budget_s / 2:
                break
        last = 0.0
        for _ in range(runs):
            if seconds and time.perf_counter() - start + last > budget_s:
                break
            t0 = time.perf_counter()
            seconds.append(run_once())
            last = time.perf_counter() - t0
    except OverBudget:
        note = (note + "; " if note else "") + f"stopped at the hard deadline ({2 * budget_s:g} s)"
        log("  " + note)
    finally:
        DEADLINE["t"] = float("inf")
    return Timing(seconds, warmup, load_before, load_average(), busy, note)


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S} load {load_average()}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# megabyte-pytorch


def build_mp(c: BenchConfig, max_patches: int, flash: bool):
    from MEGABYTE_pytorch import MEGABYTE

    return MEGABYTE(
        num_tokens=c.vocab,
        dim=(c.global_dim, c.local_dim),
        depth=(c.global_layers, c.local_layers),
        max_seq_len=(max_patches, c.patch),
        dim_head=c.dim_head,
        heads=c.heads,
        ff_mult=c.ffn_mult,
        flash_attn=flash,
    )


def bench_mp_train(c: BenchConfig, args, torch) -> dict:
    torch.manual_seed(0)
    model = build_mp(c, c.seq_len // c.patch, args.mp_flash).train()
    params = sum(p.numel() for p in model.parameters())
    assert params == mp_param_count(c), (params, mp_param_count(c))
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    # bytes 1..255: pad_id 0 is also megabyte-pytorch's ignore_index
    ids = torch.randint(1, c.vocab, (c.batch, c.seq_len))

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(ids, return_loss=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    t = measure(step, args.warmup, args.runs, args.budget_s)
    out = t.summary(c.batch * c.seq_len)
    out["params"] = params
    out["train_flops_per_byte"] = mp_train_flops_per_byte(c)
    return out, model.state_dict()


def bench_mp_generate(c: BenchConfig, args, torch, state, batch: int) -> dict:
    """megabyte-pytorch generation of gen_len bytes after a prompt_len-byte prompt.

    Its generate() has no cache: step i runs the full forward on the whole prefix and keeps
    the last position, for prod(max_seq_len) - len(prompt) steps. With no positional
    embeddings, max_seq_len[0] changes no parameter, so a model built with
    max_seq_len = ((prompt+gen)/P, P) holds the trained weights and its generate() makes
    exactly `gen_len` bytes.

    "full" times that generate() call as it is. "per-patch" times the same loop body
    (forward on the prefix, top-k 0.9, Gumbel sampling, append) once for each distinct
    padded prefix length and weights it by the number of steps that share that length: the
    forward right-pads every prefix to a multiple of P, so the steps within one patch run
    the same computation. Its sum estimates one full generate() at 1/P of the cost, which
    keeps batch 8 within the time budget. Batch 1 measures both, as a check.
    """
    from MEGABYTE_pytorch.megabyte import gumbel_sample, top_k

    total = c.prompt_len + c.gen_len
    assert total % c.patch == 0
    model = build_mp(c, total // c.patch, args.mp_flash)
    model.load_state_dict(state)
    model.eval()
    prompt = torch.randint(1, c.vocab, (batch, c.prompt_len))

    def full() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            seq = model.generate(prompt)
            dt = time.perf_counter() - t0
        assert seq.numel() == batch * total
        return dt

    # prefix lengths grouped by the padded length the forward computes on
    groups = {}
    for n in range(c.prompt_len, total):
        groups.setdefault(-(-n // c.patch) * c.patch, []).append(n)
    filler = torch.randint(1, c.vocab, (batch, total))

    def per_patch() -> float:
        estimate = 0.0
        with torch.inference_mode():
            for lengths in groups.values():
                seq = filler[:, : lengths[0]]
                t0 = time.perf_counter()
                logits = model(seq)[:, -1]
                sampled = gumbel_sample(top_k(logits, thres=0.9), dim=-1, temperature=1.0)
                seq = torch.cat((seq, sampled[:, None]), dim=-1)
                estimate += (time.perf_counter() - t0) * len(lengths)
                check_deadline()
        return estimate

    def warm_step() -> None:
        # one step at the longest prefix: allocates the largest buffers and warms the kernels
        with torch.inference_mode():
            model(filler[:, : total - 1])

    result = {}
    work = batch * c.gen_len
    note = f"per-patch estimate ({len(groups)} timed steps of {c.gen_len})"
    result["per_patch"] = measure(
        per_patch, args.gen_warmup + 1, args.runs, args.budget_s, note, warm_once=warm_step
    ).summary(work)
    est = result["per_patch"]["median"]
    predicted = batch * c.gen_len / est if est else float("inf")
    if batch == 1 or args.mp_full_all:
        if predicted <= args.budget_s:
            result["full"] = measure(full, 0, args.mp_full_runs, args.budget_s, "generate() as shipped").summary(work)
        else:
            log(f"  skipping generate() as shipped: about {predicted:.0f} s per call, over --budget-s")
    return result


# ----------------------------------------------------------------------------------------
# Plain KV-cached byte transformer


def make_plain_model(torch, shape: PlainShape, c: BenchConfig):
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        """Pre-LN block: x + attn(LN(x)), then x + MLP(LN(x)), GELU (tanh)."""

        def __init__(self, dim: int, heads: int):
            super().__init__()
            self.heads, self.head_dim = heads, dim // heads
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc, self.proj = nn.Linear(dim, c.ffn_mult * dim), nn.Linear(c.ffn_mult * dim, dim)

        def forward(self, x, k_cache, v_cache, pos: int):
            """x [B, n, D] at positions pos..pos+n-1; writes K/V there and attends causally."""
            b, n, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, self.head_dim).unbind(2)
            k_cache[:, :, pos : pos + n] = k.transpose(1, 2)
            v_cache[:, :, pos : pos + n] = v.transpose(1, 2)
            keys, values = k_cache[:, :, : pos + n], v_cache[:, :, : pos + n]
            # one new query sees every cached key; a prefill block needs the causal mask
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=n > 1 and pos == 0)
            x = x + self.out(y.transpose(1, 2).reshape(b, n, d))
            return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class PlainByteTransformer(nn.Module):
        """Byte-level decoder-only transformer: learned positions, tied output head."""

        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(c.vocab, shape.dim)
            self.pos = nn.Embedding(shape.max_len, shape.dim)
            self.blocks = nn.ModuleList(Block(shape.dim, shape.heads) for _ in range(shape.layers))
            self.ln_f = nn.LayerNorm(shape.dim)

        def new_cache(self, batch: int, length: int):
            hd = shape.dim // shape.heads
            return [
                (torch.empty(batch, shape.heads, length, hd), torch.empty(batch, shape.heads, length, hd))
                for _ in self.blocks
            ]

        def forward(self, ids, cache, pos: int):
            """Logits of the last position of `ids` [B, n], placed at positions pos.."""
            n = ids.shape[1]
            x = self.tok(ids) + self.pos.weight[pos : pos + n]
            for block, (k_cache, v_cache) in zip(self.blocks, cache):
                x = block(x, k_cache, v_cache, pos)
            return self.ln_f(x[:, -1]) @ self.tok.weight.t()

    return PlainByteTransformer()


def check_plain_cache(torch, c: BenchConfig) -> float:
    """The cached decode must give the logits of an uncached causal forward over the whole
    prefix; returns the largest difference seen (tiny model, a few steps)."""
    shape = PlainShape(dim=64, layers=2, heads=2, max_len=32)
    torch.manual_seed(1)
    model = make_plain_model(torch, shape, c).eval()
    ids = torch.randint(0, c.vocab, (2, 12))
    worst = 0.0
    with torch.inference_mode():
        cache = model.new_cache(2, 12)
        logits = model(ids[:, :5], cache, 0)
        for n in range(5, 12):
            reference = model(ids[:, :n], model.new_cache(2, 12), 0)
            worst = max(worst, float((logits - reference).abs().max()))
            logits = model(ids[:, n : n + 1], cache, n)
    assert worst < 1e-4, f"KV-cached decode disagrees with the full forward by {worst}"
    return worst


def bench_plain_generate(c: BenchConfig, args, torch, shape: PlainShape, batch: int) -> dict:
    from MEGABYTE_pytorch.megabyte import gumbel_sample, top_k

    torch.manual_seed(0)
    model = make_plain_model(torch, shape, c).eval()
    params = sum(p.numel() for p in model.parameters())
    assert params == shape.params, (params, shape.params)
    total = c.prompt_len + c.gen_len
    assert total <= shape.max_len
    prompt = torch.randint(1, c.vocab, (batch, c.prompt_len))

    def generate() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = model.new_cache(batch, total)
            out = torch.empty(batch, c.gen_len, dtype=torch.long)
            logits = model(prompt, cache, 0)
            for i in range(c.gen_len):
                # same sampler as megabyte-pytorch's generate(): top-k 0.9 then Gumbel-max
                nxt = gumbel_sample(top_k(logits, thres=0.9), dim=-1, temperature=1.0)
                out[:, i] = nxt
                if i + 1 < c.gen_len:
                    logits = model(nxt[:, None], cache, c.prompt_len + i)
                if i % 32 == 0:
                    check_deadline()
            return time.perf_counter() - t0

    t = measure(generate, args.gen_warmup, args.runs, args.budget_s, "KV cache, includes prefill")
    out = t.summary(batch * c.gen_len)
    out["params"] = params
    return out


# ----------------------------------------------------------------------------------------
# GEMM


def bench_gemm(torch, shapes, thread_counts, budget_s: float) -> list:
    rows = []
    wait_for_quiet()  # once for the whole block: these measurements take seconds
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for m, k, n in shapes:
            a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
            flops = 2.0 * m * k * n
            torch.mm(a, b, out=out)
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            reps = max(1, int(0.3 / max(time.perf_counter() - t0, 1e-6)))

            def run(a=a, b=b, out=out, reps=reps) -> float:
                t1 = time.perf_counter()
                for _ in range(reps):
                    torch.mm(a, b, out=out)
                return (time.perf_counter() - t1) / reps

            s = measure(run, 1, 7, budget_s / 4, quiet=False).summary(flops / 1e9)
            rows.append({"m": m, "k": k, "n": n, "threads": threads, "gflops": s})
            log(f"gemm {m}x{k}x{n} threads={threads}: {s['median']:.1f} GFLOP/s")
    return rows


# ----------------------------------------------------------------------------------------
# mega (our engine)


def run_mega(args, extra: list, threads: int) -> dict:
    """One `mega bench ... --json` call; returns its JSON or an `error`."""
    cmd = [args.mega, "bench", *extra, "--json"]
    if not Path(args.mega).exists() and shutil.which(args.mega) is None:
        return {"available": False, "error": f"mega: not available ({args.mega} not found)", "command": cmd}
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    for k in [*MALLOC_ENV, "OMP_WAIT_POLICY"]:  # mega runs without the peers' settings
        env.pop(k, None)
    busy = wait_for_quiet()
    log(f"mega: {' '.join(cmd)}")
    load_before = load_average()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.mega_timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "error": f"mega: not available ({e})", "command": cmd}
    if p.returncode != 0:
        return {
            "available": False,
            "error": f"mega: not available (exit {p.returncode}: {p.stderr.strip()[-500:]})",
            "command": cmd,
        }
    parsed = None
    for text in [p.stdout] + [line for line in reversed(p.stdout.splitlines()) if line.lstrip().startswith("{")]:
        try:
            parsed = json.loads(text)
            break
        except ValueError:
            continue
    if not isinstance(parsed, dict) or "bytes_per_s_median" not in parsed:
        return {
            "available": False,
            "error": "mega: not available (no JSON with bytes_per_s_median on stdout)",
            "command": cmd,
            "stdout_tail": p.stdout[-500:],
        }
    parsed.update(
        available=True, command=cmd, load_before=load_before, load_after=load_average(), others_busy_before=busy
    )
    rates = (
        [r for r in parsed.get("runs", []) if isinstance(r, (int, float))]
        if isinstance(parsed.get("runs"), list)
        else []
    )
    if rates:  # mega reports one rate per timed run
        med = parsed["bytes_per_s_median"]
        parsed["summary"] = {
            "median": med,
            "min": min(rates),
            "max": max(rates),
            "runs": len(rates),
            "spread": (max(rates) - min(rates)) / med,
            "noisy": (max(rates) - min(rates)) / med > 0.10,
            "others_busy_before": busy,
        }
    return parsed


# ----------------------------------------------------------------------------------------
# Report


def fmt_rate(x) -> str:
    if x is None:
        return "n/a"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def cell(s) -> str:
    if not s:
        return "n/a"
    if s.get("median") is None:
        return "over budget"
    flag = " (noisy)" if s.get("noisy") else ""
    busy = s.get("others_busy_before")
    others = "" if busy is None or math.isnan(busy) else f", others {busy:.0%}"
    return f"**{fmt_rate(s['median'])}** [{fmt_rate(s['min'])}–{fmt_rate(s['max'])}, n={s['runs']}{others}]{flag}"


def mega_cell(m: dict) -> str:
    if not m.get("available"):
        return "not available"
    return cell(m.get("summary")) if m.get("summary") else f"**{fmt_rate(m['bytes_per_s_median'])}**"


def ratio(a, b) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{a / b:.2f}×"


def markdown(res: dict) -> str:
    c = res["config"]
    t = res["threads"]
    mp, plain, mega = res["megabyte_pytorch"], res["plain_transformer"], res["mega"]
    lines = [
        f"### Peers benchmark — {res['date']} — threads = {t}",
        "",
        (
            f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores); torch {res['torch']['version']} "
            f"({res['torch']['blas']}, OMP_WAIT_POLICY={res['env'].get('OMP_WAIT_POLICY') or 'unset'}); "
            f"load average at start {res['load_start']}, at end {res['load_end']}."
        ),
        f"Command: `{res['command']}`",
        "",
        (
            f"Config: global width {c['global_dim']} x {c['global_layers']} layers, local width {c['local_dim']} x "
            f"{c['local_layers']} layers, P = {c['patch']}, T = {c['seq_len']}, batch {c['batch']}; generation "
            f"{c['gen_len']} bytes after {c['prompt_len']}. Parameters: mega {res['params']['mega']:,} (analytic), "
            f"megabyte-pytorch {res['params']['megabyte_pytorch']:,}, plain transformer {res['params']['plain']:,} "
            f"(d={res['plain_shape']['dim']}, L={res['plain_shape']['layers']})."
        ),
        "",
        (
            "Bytes/s, **median** [min–max, timed runs after warm-up, share of all CPUs other processes used "
            "just before]:"
        ),
        "",
        "| measurement | mega | megabyte-pytorch | plain KV-cached (torch) | mega / megabyte-pytorch | mega / plain |",
        "|---|---|---|---|---|---|",
    ]
    mega_train = mega.get("train", {})
    mt = mega_train.get("bytes_per_s_median") if mega_train.get("available") else None
    mp_train = mp.get("train")
    lines.append(
        f"| train step (fwd+bwd+Adam), B·T/s | {mega_cell(mega_train)} | {cell(mp_train)} "
        f"| — | {ratio(mt, mp_train and mp_train['median'])} | — |"
    )
    for b in c["gen_batches"]:
        key = f"batch{b}"
        mg = mega.get(f"generate_{key}", {})
        mgv = mg.get("bytes_per_s_median") if mg.get("available") else None
        mpg = mp.get("generate", {}).get(key, {})
        pp = plain.get("generate", {}).get(key)
        mp_cells = cell(mpg.get("per_patch")) + (" per-patch est." if mpg.get("per_patch") else "")
        if "full" in mpg:
            mp_cells += f"; generate(): {cell(mpg['full'])}"
        lines.append(
            f"| generate b={b}, bytes/s | {mega_cell(mg)} | {mp_cells} | {cell(pp)} "
            f"| {ratio(mgv, mpg.get('per_patch', {}).get('median'))} | {ratio(mgv, pp and pp['median'])} |"
        )
    g0 = res["gemm"][0] if res["gemm"] else {"m": "?", "k": "?", "n": "?"}
    lines += [
        "",
        (
            f"Training compute against the measured torch GEMM rate ({g0['m']}×{g0['k']}×{g0['n']} f32, "
            "same thread count); FLOPs/byte are analytic matmul counts (3 × forward):"
        ),
        "",
        "| engine | train FLOPs/byte | achieved GFLOP/s | torch GEMM GFLOP/s | fraction | own GEMM GFLOP/s | fraction of own |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in res["train_efficiency"].items():

        def f(x, fmt):
            return "n/a" if x is None else format(x, fmt)

        lines.append(
            f"| {name} | {f(row['flops_per_byte'] / 1e6, '.2f')} M | {f(row['achieved_gflops'], '.1f')} | "
            f"{f(row['torch_gemm_gflops'], '.1f')} | {f(row['fraction_of_torch_gemm'], '.0%')} | "
            f"{f(row.get('own_gemm_gflops'), '.1f')} | {f(row.get('fraction_of_own_gemm'), '.0%')} |"
        )
    lines += [
        "",
        "torch f32 GEMM (M×K·K×N), GFLOP/s median [min–max]:",
        "",
        "| M×K×N | threads | GFLOP/s |",
        "|---|---|---|",
    ]
    for g in res["gemm"]:
        s = g["gflops"]
        flag = " (noisy)" if s["noisy"] else ""
        lines.append(
            f"| {g['m']}×{g['k']}×{g['n']} | {g['threads']} | **{s['median']:.1f}** "
            f"[{s['min']:.1f}–{s['max']:.1f}, n={s['runs']}, others {s['others_busy_before']:.0%}]{flag} |"
        )
    notes = [
        m.get("error") or m.get("config_mismatch")
        for m in mega.values()
        if isinstance(m, dict) and (m.get("error") or m.get("config_mismatch"))
    ]
    if notes:
        lines += ["", "; ".join(sorted(set(notes)))]
    noisy = [k for k, v in iter_summaries(res) if v.get("noisy")]
    if noisy:
        lines += ["", "Noisy (max−min > 10 % of median): " + ", ".join(noisy)]
    return "\n".join(lines) + "\n"


def iter_summaries(res: dict, prefix: str = ""):
    for k, v in res.items():
        if isinstance(v, dict):
            if "median" in v and "runs" in v:
                yield prefix + k, v
            else:
                yield from iter_summaries(v, prefix + k + ".")


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release()}


# ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: tools/.venv-peers/bin/python tools/bench_megabyte_peers.py "
        "--threads 2 --out runs/peers-t2.json",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every engine (default: all)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (cut short by --budget-s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs for training steps")
    p.add_argument("--gen-warmup", type=int, default=1, help="untimed warm-up runs for generation")
    p.add_argument("--budget-s", type=float, default=120.0, help="time budget per measurement, seconds")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration, 2 runs")
    p.add_argument("--mega", default=str(REPO / "target" / "release" / "mega"), help="path to the mega binary")
    p.add_argument("--mega-preset", default="bench", help="mega's --preset (must describe the same config)")
    p.add_argument("--mega-timeout-s", type=float, default=900.0)
    p.add_argument("--mp-full-runs", type=int, default=2, help="runs of megabyte-pytorch's real generate()")
    p.add_argument("--mp-full-all", action="store_true", help="also run the real generate() at batch > 1")
    p.add_argument(
        "--mp-no-flash",
        dest="mp_flash",
        action="store_false",
        help="megabyte-pytorch einsum attention instead of SDPA (flash_attn=False)",
    )
    p.add_argument(
        "--quiet-max-busy",
        type=float,
        default=0.25,
        help="before each measurement, wait until other processes use at most this fraction "
        "of all CPUs (sampled over 2 s) ...",
    )
    p.add_argument("--quiet-wait-s", type=float, default=180.0, help="... but wait at most this long")
    p.add_argument(
        "--omp-wait-policy",
        choices=["PASSIVE", "ACTIVE", "default"],
        default="PASSIVE",
        help="OMP_WAIT_POLICY for torch (default PASSIVE: on a shared machine, spinning OpenMP "
        "threads stall each other at every barrier; 'default' leaves libgomp's spin-then-sleep)",
    )
    p.add_argument("--skip", default="", help="comma list of parts to skip: mp-train,mp-gen,plain,gemm,mega")
    p.add_argument(
        "--out",
        default=None,
        help="JSON output path (default runs/peers-t{threads}.json); the markdown table goes next to it (.md)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.warmup, args.gen_warmup, args.mp_full_runs, args.quiet_wait_s = 2, 1, 1, 1, 0.0
    if args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main() -> None:
    reexec_if_needed()
    args = parse_args()
    QUIET.update(max_busy=args.quiet_max_busy, wait_s=args.quiet_wait_s)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    c = QUICK if args.quick else BenchConfig()
    skip = set(filter(None, args.skip.split(",")))
    out_path = Path(args.out or REPO / "runs" / f"peers{'-quick' if args.quick else ''}-t{args.threads}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shape = choose_plain_shape(c)
    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "torch": {
            "version": torch.__version__,
            "blas": blas,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "threads": args.threads,
        "quick": args.quick,
        "env": {k: os.environ.get(k) for k in [*MALLOC_ENV, "OMP_WAIT_POLICY"]},
        "config": asdict(c),
        "plain_shape": asdict(shape),
        "params": {"mega": mega_param_count(c), "megabyte_pytorch": mp_param_count(c), "plain": shape.params},
        "load_start": load_average(),
        "megabyte_pytorch": {"flash_attn": args.mp_flash, "generate": {}},
        "plain_transformer": {"generate": {}},
        "mega": {},
    }
    log(f"threads={args.threads} config={asdict(c)} plain={asdict(shape)}")

    gemm_shapes = [(2048, 2048, 2048), (8192, 512, 2048), (8192, 256, 1024)]
    if args.quick:
        gemm_shapes = [(512, 512, 512)]
    res["gemm"] = [] if "gemm" in skip else bench_gemm(torch, gemm_shapes, sorted({1, args.threads}), args.budget_s)
    torch.set_num_threads(args.threads)

    state = None
    if "mp-train" not in skip or "mp-gen" not in skip:
        log("megabyte-pytorch training step")
        mp_train, state = bench_mp_train(c, args, torch) if "mp-train" not in skip else (None, None)
        if mp_train:
            res["megabyte_pytorch"]["train"] = mp_train
            log(f"  {fmt_rate(mp_train['median'])} bytes/s")
    if "mp-gen" not in skip:
        if state is None:
            torch.manual_seed(0)
            state = build_mp(c, c.seq_len // c.patch, args.mp_flash).state_dict()
        for b in c.gen_batches:
            log(f"megabyte-pytorch generate batch {b}")
            r = bench_mp_generate(c, args, torch, state, b)
            res["megabyte_pytorch"]["generate"][f"batch{b}"] = r
            log("  " + ", ".join(f"{k}: {fmt_rate(v['median'])} bytes/s" for k, v in r.items()))
    if "plain" not in skip:
        res["plain_transformer"]["cache_check_max_abs_diff"] = check_plain_cache(torch, c)
        for b in c.gen_batches:
            log(f"plain transformer generate batch {b}")
            r = bench_plain_generate(c, args, torch, shape, b)
            res["plain_transformer"]["generate"][f"batch{b}"] = r
            log(f"  {fmt_rate(r['median'])} bytes/s")

    if "mega" not in skip:
        if args.quick:  # no preset has the smoke config: hand mega the same config as a file
            cfg_path = out_path.with_suffix(".mega-config.json")
            cfg_path.write_text(json.dumps(mega_config_json(c), indent=2) + "\n")
            model = ["--model", "megabyte", "--config", str(cfg_path)]
        else:
            model = ["--model", "megabyte", "--preset", args.mega_preset]
        timing = ["--runs", str(args.runs), "--warmup", str(args.warmup)]
        res["mega"]["train"] = run_mega(
            args, ["train", *model, "--batch-size", str(c.batch), "--seq-len", str(c.seq_len), *timing], args.threads
        )
        for b in c.gen_batches:
            res["mega"][f"generate_batch{b}"] = run_mega(
                args,
                [
                    "generate",
                    *model,
                    "--prompt-len",
                    str(c.prompt_len),
                    "--gen-len",
                    str(c.gen_len),
                    "--batch-size",
                    str(b),
                    *timing,
                ],
                args.threads,
            )
        for k, v in res["mega"].items():
            log(f"mega {k}: {v.get('bytes_per_s_median', v.get('error'))}")
            if v.get("available") and v.get("params") != mega_param_count(c):
                v["config_mismatch"] = f"mega reports {v.get('params')} parameters, expected {mega_param_count(c)}"
                log("  WARNING: " + v["config_mismatch"])
            if v.get("available") and v.get("threads") not in (None, args.threads):
                v["config_mismatch"] = f"mega reports {v.get('threads')} threads, asked for {args.threads}"
                log("  WARNING: " + v["config_mismatch"])

    torch_gemm = next(
        (
            g["gflops"]["median"]
            for g in res["gemm"]
            if (g["m"], g["k"], g["n"]) == gemm_shapes[0] and g["threads"] == args.threads
        ),
        None,
    )
    eff = {}
    mp_train = res["megabyte_pytorch"].get("train")
    if mp_train and mp_train["median"]:
        achieved = mp_train["median"] * mp_train["train_flops_per_byte"] / 1e9
        eff["megabyte-pytorch"] = {
            "flops_per_byte": mp_train["train_flops_per_byte"],
            "achieved_gflops": achieved,
            "torch_gemm_gflops": torch_gemm,
            "fraction_of_torch_gemm": achieved / torch_gemm if torch_gemm else None,
        }
    mt = res["mega"].get("train", {})
    fpb = mt.get("train_flops_per_byte") or mega_train_flops_per_byte(c)
    achieved = mt["bytes_per_s_median"] * fpb / 1e9 if mt.get("available") else None
    own = mt.get("gemm_gflops") if mt.get("available") else None
    eff["mega"] = {
        "flops_per_byte": fpb,
        "flops_per_byte_source": "mega JSON" if mt.get("train_flops_per_byte") else "analytic (this script)",
        "achieved_gflops": achieved,
        "torch_gemm_gflops": torch_gemm,
        "fraction_of_torch_gemm": achieved / torch_gemm if achieved and torch_gemm else None,
        "own_gemm_gflops": own,
        "fraction_of_own_gemm": achieved / own if achieved and own else None,
    }
    res["train_efficiency"] = eff
    res["load_end"] = load_average()

    out_path.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out_path.with_suffix(".md").write_text(md)
    print(md)
    log(f"wrote {out_path} and {out_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
