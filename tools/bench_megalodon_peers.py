#!/usr/bin/env python3
"""Side-by-side MEGALODON throughput: megalodon-jax (CPU) and this engine, in one invocation.

Config (both sides): byte vocabulary V = 256, D = 512, 6 layers, H = 2, z = 128 (dz = 64),
v = 1024 (dv = 512), N = 16, G = 32, chunk C = 256, SwiGLU F = 1024, RoPE base 10000, untied
head, dropouts 0; training sequences of L = 2048 bytes at batch 1 and 4.

Measurements (each one is a separate subprocess, bounded by --budget-s of work and a hard
timeout of --budget-s + 30 s, so that no figure takes more than about 3 minutes):
  peer-train    megalodon-jax forward + backward + optax AdamW (global-norm clip 1.0, the
                engine's trainer hyper-parameters) as one jitted step with donated buffers;
                tokens/s = B * L / step time, median of the steps after the compiling one
                (the first of them dropped as warm-up when three or more fit the budget);
                peak resident memory of that process (VmHWM, and the parent's wait4
                ru_maxrss).
  peer-decode   megalodon_jax.generate (its jitted lax.scan decoder with the fixed-capacity
                streaming cache), prompt 256 bytes, 512 new bytes, temperature 1: generated
                bytes/s of all rows with the prefill included (as `mega bench generate`
                counts), and the decode-only rate from the difference with a 1-token run.
  ours-train    `MEGA bench train --model megalodon --preset bench --batch-size B --seq-len 2048`
  ours-decode   `MEGA bench generate --model megalodon --preset bench --batch-size B
                 --prompt-len 256 --gen-len 512`
                (MEGA defaults to target/release/mega; a failing command is reported as
                 'not available' and the script goes on.)

The peers run with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ = 17179869184 so that
glibc does not return their large per-step buffers to the OS (design.md §8).

Usage (from the repository root):
    bash tools/megalodon-env.sh
    tools/.venv-megalodon/bin/python tools/bench_megalodon_peers.py [--batches 1,4]
        [--mega target/release/mega] [--budget-s 150] [--skip-peer] [--skip-ours]
        [--json-out FILE]
Prints one JSON object per measurement and a Markdown summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

BENCH_CONFIG = {
    "model": "megalodon",
    "vocab_size": 256,
    "model_dim": 512,
    "num_layers": 6,
    "num_heads": 2,
    "z_dim": 128,
    "value_dim": 1024,
    "cema_ndim": 16,
    "norm_num_groups": 32,
    "chunk_size": 256,
    "ffn_hidden_dim": 1024,
    "swiglu": True,
    "rope_base": 10000.0,
    "norm_eps": 1e-5,
    "share_emb": False,
    "scale_emb": False,
}
SEQ_LEN = 2048
PROMPT_LEN = 256
GEN_LEN = 512
MAX_TIMED_RUNS = 5
PEER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "17179869184",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
}
# The engine's trainer defaults (src/bench.rs), so both sides do the same optimizer work.
ADAMW = {"lr": 1e-3, "b1": 0.9, "b2": 0.98, "eps": 1e-8, "weight_decay": 0.1, "clip": 1.0}


# --------------------------------------------------------------------------------------------
# Worker side (runs in its own process; imports JAX only here)
# --------------------------------------------------------------------------------------------


def peak_rss_mib() -> dict:
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return {
        "vmhwm_mib": hwm,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def build_model():
    import jax
    from megalodon_jax import MegalodonConfig, MegalodonForCausalLM

    c = BENCH_CONFIG
    cfg = MegalodonConfig(
        vocab_size=c["vocab_size"],
        model_dim=c["model_dim"],
        num_layers=c["num_layers"],
        num_heads=c["num_heads"],
        z_dim=c["z_dim"],
        value_dim=c["value_dim"],
        ffn_hidden_dim=c["ffn_hidden_dim"],
        cema_ndim=c["cema_ndim"],
        chunk_size=c["chunk_size"],
        norm_num_groups=c["norm_num_groups"],
        norm_eps=c["norm_eps"],
        rope_base=c["rope_base"],
        swiglu=c["swiglu"],
        scale_emb=c["scale_emb"],
        share_emb=c["share_emb"],
    )
    model = MegalodonForCausalLM(cfg, key=jax.random.PRNGKey(0))
    return cfg, model


def worker_train(batch: int, budget_s: float) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    start = time.perf_counter()
    cfg, model = build_model()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = optax.chain(
        optax.clip_by_global_norm(ADAMW["clip"]),
        optax.adamw(
            ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
            weight_decay=ADAMW["weight_decay"],
        ),
    )
    opt_state = optimizer.init(params)

    def loss_fn(p, tokens):
        return eqx.combine(p, static).compute_loss(tokens, tokens, deterministic=True)

    def step(p, state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    tokens = jnp.asarray(
        ((np.arange(batch * SEQ_LEN) * 7919) % 251).reshape(batch, SEQ_LEN).astype(np.int32)
    )
    emit({"event": "setup", "seconds": time.perf_counter() - start,
          "params": cfg.parameter_count_breakdown()["total"]})

    # Every step after the compiling one is timed; when at least three fit the budget the
    # first of them is dropped as warm-up (allocator and page-cache effects), otherwise all
    # count, so that batch 4 on a slow, shared machine still gives a figure within budget.
    times = []
    losses = []
    n = 0
    while True:
        t = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, tokens)
        loss.block_until_ready()
        dt = time.perf_counter() - t
        losses.append(float(loss))
        if n > 0:
            times.append(dt)
        emit({"event": "compile+step" if n == 0 else "step", "seconds": dt, "loss": float(loss)})
        n += 1
        elapsed = time.perf_counter() - start
        # At least one post-compile step; the parent's hard timeout bounds a slow machine.
        if len(times) > MAX_TIMED_RUNS or (times and elapsed + 1.1 * dt > budget_s):
            break
    counted = times[1:] if len(times) >= 3 else times
    med = statistics.median(counted)
    emit({
        "event": "result",
        "bench": "peer-train",
        "batch_size": batch,
        "seq_len": SEQ_LEN,
        "step_seconds": times,
        "warmup_dropped": len(times) >= 3,
        "tokens_per_s_median": batch * SEQ_LEN / med,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        **peak_rss_mib(),
    })


def worker_decode(batch: int, budget_s: float) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from megalodon_jax import generate

    start = time.perf_counter()
    cfg, model = build_model()
    pattern = np.frombuffer(b"the quick brown fox ", dtype=np.uint8)
    prompt = jnp.asarray(np.stack([
        pattern[(np.arange(PROMPT_LEN) + r) % len(pattern)] for r in range(batch)
    ]).astype(np.int32))
    key = jax.random.PRNGKey(0)

    def run(new_tokens: int) -> float:
        t = time.perf_counter()
        out, _, _ = generate(model, prompt, new_tokens, key, temperature=1.0)
        out.block_until_ready()
        return time.perf_counter() - t

    emit({"event": "setup", "seconds": time.perf_counter() - start})
    compile_1 = run(1)
    one = run(1)
    emit({"event": "compile+run (1 token)", "seconds": compile_1})
    compile_full = run(GEN_LEN)
    emit({"event": "compile+run", "seconds": compile_full})
    full = []
    ones = [one]
    while True:
        dt = run(GEN_LEN)
        full.append(dt)
        ones.append(run(1))
        emit({"event": "timed", "seconds": dt})
        elapsed = time.perf_counter() - start
        if len(full) >= MAX_TIMED_RUNS or elapsed + 1.2 * dt > budget_s:
            break
    med_full = statistics.median(full)
    med_one = statistics.median(ones)
    emit({
        "event": "result",
        "bench": "peer-decode",
        "batch_size": batch,
        "prompt_len": PROMPT_LEN,
        "gen_len": GEN_LEN,
        "run_seconds": full,
        "one_token_run_seconds": ones,
        "bytes_per_s_median": batch * GEN_LEN / med_full,
        "decode_only_bytes_per_s": batch * (GEN_LEN - 1) / max(med_full - med_one, 1e-9),
        "prefill_plus_one_seconds": med_one,
        **peak_rss_mib(),
    })


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def run_bounded(cmd: list[str], env: dict, timeout_s: float) -> dict:
    """Run cmd, kill its process group after timeout_s; return output, status and child rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO_ROOT,
                                start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        return {
            "returncode": proc.returncode,
            "timed_out": timed_out.is_set(),
            "wall_s": wall,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
            "ru_maxrss_mib": usage.ru_maxrss / 1024.0,
        }


def last_json(text: str, want_event: str | None = None) -> dict | None:
    found = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if want_event is None or obj.get("event") == want_event:
            found = obj
    return found


def peer(kind: str, batch: int, budget_s: float) -> dict:
    env = dict(os.environ, **PEER_ENV)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--batch", str(batch), "--budget-s", str(budget_s)]
    r = run_bounded(cmd, env, budget_s + 30)
    result = last_json(r["stdout"], "result")
    events = [json.loads(x) for x in r["stdout"].splitlines() if x.startswith("{")]
    if result is None:
        result = {"bench": f"peer-{kind}", "batch_size": batch, "status": "failed",
                  "error": (r["stderr"].strip().splitlines() or ["(no output)"])[-1],
                  "timed_out": r["timed_out"]}
        # Killed at the hard timeout: keep what the finished steps say.
        steps = [e["seconds"] for e in events if e.get("event") == "step"]
        if kind == "train" and steps:
            med = statistics.median(steps)
            result.update({"step_seconds": steps, "tokens_per_s_median": batch * SEQ_LEN / med,
                           "status": "partial (timed out)"})
    else:
        result["status"] = "ok"
    result["events"] = events
    result["wall_s"] = r["wall_s"]
    result["wait4_ru_maxrss_mib"] = r["ru_maxrss_mib"]
    result["command"] = " ".join(cmd[1:])
    return result


def ours(kind: str, batch: int, mega: str, timeout_s: float) -> dict:
    if kind == "train":
        args = ["bench", "train", "--model", "megalodon", "--preset", "bench",
                "--batch-size", str(batch), "--seq-len", str(SEQ_LEN),
                "--warmup", "1", "--runs", "3", "--json"]
    else:
        args = ["bench", "generate", "--model", "megalodon", "--preset", "bench",
                "--batch-size", str(batch), "--prompt-len", str(PROMPT_LEN),
                "--gen-len", str(GEN_LEN), "--warmup", "1", "--runs", "3", "--json"]
    cmd = [mega, *args]
    base = {"bench": f"ours-{kind}", "batch_size": batch, "command": " ".join(cmd)}
    if not Path(mega).exists():
        return {**base, "status": "not available", "error": f"{mega} does not exist"}
    r = run_bounded(cmd, dict(os.environ), timeout_s)
    if r["returncode"] != 0:
        lines = r["stderr"].strip().splitlines() or ["(no output)"]
        reason = "timed out" if r["timed_out"] else lines[-1]
        return {**base, "status": "not available", "error": reason}
    try:
        data = json.loads(r["stdout"])
    except json.JSONDecodeError:
        return {**base, "status": "not available", "error": "output is not JSON"}
    return {**base, "status": "ok", "result": data, "wall_s": r["wall_s"],
            "wait4_ru_maxrss_mib": r["ru_maxrss_mib"]}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "megalodon-jax": ver("megalodon-jax"),
        "jax": ver("jax"),
        "jaxlib": ver("jaxlib"),
        "optax": ver("optax"),
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def fmt(x, unit="", digits=0):
    return "n/a" if x is None else f"{x:,.{digits}f}{unit}"


def summary(results: list[dict]) -> str:
    rows = ["| measurement | batch | figure | peak RSS | status |", "|---|---|---|---|---|"]
    for r in results:
        b = r["batch_size"]
        status = r.get("status")
        if r["bench"] == "peer-train":
            fig = f"{fmt(r.get('tokens_per_s_median'), digits=0)} tokens/s"
            if r.get("step_seconds"):
                fig += " (steps " + ", ".join(f"{s:.2f}" for s in r["step_seconds"]) + " s)"
            rss = fmt(r.get("vmhwm_mib") or r.get("wait4_ru_maxrss_mib"), " MiB")
        elif r["bench"] == "peer-decode":
            fig = (f"{fmt(r.get('bytes_per_s_median'), digits=1)} bytes/s incl. prefill; "
                   f"{fmt(r.get('decode_only_bytes_per_s'), digits=1)} decode-only")
            rss = fmt(r.get("vmhwm_mib"), " MiB")
        else:
            data = r.get("result") or {}
            fig = f"{fmt(data.get('bytes_per_s_median'), digits=1)} bytes/s" if data else "n/a"
            rss = fmt(r.get("wait4_ru_maxrss_mib"), " MiB")
        if status != "ok":
            status = f"{status}: {r.get('error', '')}"
        rows.append(f"| {r['bench']} | {b} | {fig} | {rss} | {status} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--mega", default=os.environ.get("MEGA", str(REPO_ROOT / "target/release/mega")))
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="work budget of one measurement (hard timeout: +30 s)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--json-out")
    ap.add_argument("--worker", choices=["train", "decode"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        (worker_train if args.worker == "train" else worker_decode)(args.batch, args.budget_s)
        return 0

    batches = [int(b) for b in args.batches.split(",") if b]
    report = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "uptime_before": uptime(),
        "config": BENCH_CONFIG,
        "seq_len": SEQ_LEN,
        "prompt_len": PROMPT_LEN,
        "gen_len": GEN_LEN,
        "adamw": ADAMW,
        "peer_env": PEER_ENV,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": [],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "results"}), flush=True)
    plan = []
    for b in batches:
        if not args.skip_peer:
            plan.append(("peer", "train", b))
        if not args.skip_ours:
            plan.append(("ours", "train", b))
    if not args.skip_decode:
        for b in batches:
            if not args.skip_peer:
                plan.append(("peer", "decode", b))
            if not args.skip_ours:
                plan.append(("ours", "decode", b))
    for side, kind, b in plan:
        load = uptime()
        if side == "peer":
            r = peer(kind, b, args.budget_s)
        else:
            r = ours(kind, b, args.mega, args.budget_s + 30)
        r["uptime_before"] = load
        report["results"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "events"}), flush=True)
    report["uptime_after"] = uptime()
    print()
    print(summary(report["results"]))
    print(f"\nload before: {report['uptime_before']}\nload after:  {report['uptime_after']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
