#!/usr/bin/env python3
"""Golden fixtures for the MEGALODON model, produced by megalodon-jax 0.2.2 (CPU, float32).

megalodon-jax is a third-party JAX port that follows the official MEGALODON code at the source
level (shared/spec/megalodon.md, tag [J]); nobody on this team wrote it, which is what makes it a
golden reference (design.md §7.3). This script

  1. builds a tiny megalodon-jax model (byte vocabulary, 2 layers, D = 32, H = 2, z = 16,
     v = 24, N = 4, G = 4, chunk C = 8, SwiGLU with F = 48, RoPE base 10000, untied head,
     no embedding scale, dropouts 0);
  2. replaces EVERY parameter with a random value (no initial values survive: the CEMA
     alpha/delta/theta/gamma/omega, every plus-one norm scale and bias, the Q/K gamma and beta,
     every linear weight and bias, the embedding and the head), generated under the official
     state-dict names and shapes of spec §3 and mapped into megalodon-jax's parameter tree;
  3. runs the full forward pass on a fixed batch of two byte rows of length 40 (five chunks),
     the next-token cross-entropy loss and its gradient with respect to every parameter, and a
     streaming forward that feeds the same bytes in calls of 5, 1, 2, 8, 8, 1, 7, 8 tokens
     (the call-size rules of spec §16.2 hold: no call straddles a chunk boundary);
  4. checks itself before writing anything:
       * an independent NumPy float64 implementation of the spec equations (written here from
         the spec, not from megalodon-jax: TimestepNorm from the cumulative-sum definition
         §5.1, CEMA from the step recurrence §4.3, chunked attention and RoPE §6.4, the
         two-hop block §3) agrees with the megalodon-jax logits;
       * the streaming logits agree with the full-sequence logits;
       * megalodon-jax's gradients agree with central finite differences of the NumPy
         float64 loss on sampled elements of every parameter tensor;
       * the written fixture reloads into a fresh megalodon-jax model and reproduces the stored
         logits bit for bit.

Fixture layout (safetensors, little-endian, row-major, all float tensors f32):
  megalodon_tiny.safetensors
    <official name>        every parameter under the official state-dict name and shape
                           (docs/megalodon-model.md); linear weights are (out, in)
    grad.<official name>   d loss / d parameter, same shape
    input                  i32 [2, 40] bytes
    logits                 f32 [2, 40, 256]; logits[:, t] predicts input[:, t + 1]
    loss                   f32 [1]: mean next-token cross-entropy (nats) over the 2 * 39
                           pairs (logits[:, t], input[:, t + 1]), t = 0..38
    metadata "config"      the hyper-parameter JSON; "generator" names the tool and versions.
  megalodon_tiny_stream.safetensors
    the same parameters, input, and:
    call_sizes             i32 [8] = 5, 1, 2, 8, 8, 1, 7, 8
    logits                 f32 [2, 40, 256]: the streamed logits, concatenated over the calls
    metadata as above.

Usage (from the repository root):
    bash tools/megalodon-env.sh && tools/.venv-megalodon/bin/python tools/golden_megalodon.py
Re-running regenerates byte-identical files (fixed seeds; XLA CPU runs are deterministic).
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

# One host thread and no float64 in JAX: the fixture is the port's plain float32 behaviour.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save  # noqa: E402

from megalodon_jax import MegalodonConfig, MegalodonForCausalLM  # noqa: E402
from megalodon_jax.checkpoint import apply_model_state_dict, model_state_dict  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures"

CONFIG = {
    "model": "megalodon",
    "vocab_size": 256,
    "model_dim": 32,
    "num_layers": 2,
    "num_heads": 2,
    "z_dim": 16,
    "value_dim": 24,
    "cema_ndim": 4,
    "norm_num_groups": 4,
    "chunk_size": 8,
    "ffn_hidden_dim": 48,
    "swiglu": True,
    "rope_base": 10000.0,
    "norm_eps": 1e-5,
    "share_emb": False,
    "scale_emb": False,
}

SEQ_LEN = 40
STREAM_CALL_SIZES = (5, 1, 2, 8, 8, 1, 7, 8)
PARAM_SEED = 20240417
INPUT_ROWS = (
    b"MEGALODON: chunked attention + CEMA!!\n\x00\xff",
    b"\x01\x02 the quick brown fox jumps over it:)\x7f\x80",
)

# Acceptance limits of the self-checks.
REFERENCE_TOL = 5e-5  # max |NumPy f64 - megalodon-jax f32| over the logits
STREAM_TOL = 5e-5  # max |streamed - full| (both f32 megalodon-jax)
GRAD_REL_TOL = 2e-3  # |jax - finite difference| / (|fd| + 1e-2 * max|grad tensor|)


# --------------------------------------------------------------------------------------------
# Official parameter names and shapes (spec §3) and random values for them
# --------------------------------------------------------------------------------------------


def official_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every trainable parameter of the official state dict (world size 1), in a fixed order."""
    d, z, v = cfg["model_dim"], cfg["z_dim"], cfg["value_dim"]
    n, f, vocab = cfg["cema_ndim"], cfg["ffn_hidden_dim"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, d)}
    for i in range(cfg["num_layers"]):
        m, h = f"layers.{i}.mega", f"layers.{i}.nffn"
        shapes.update({
            f"{m}.timenorm.weight": (d,),
            f"{m}.timenorm.bias": (d,),
            f"{m}.cema.alpha": (d, n, 1),
            f"{m}.cema.delta": (d, n, 1),
            f"{m}.cema.theta": (d, 1, 1),
            f"{m}.cema.gamma": (d, n, 2),
            f"{m}.cema.omega": (d, 1),
            f"{m}.rmsnorm.weight": (d,),
            f"{m}.wz.weight": (z, d),
            f"{m}.wz.bias": (z,),
            f"{m}.wv.weight": (v, d),
            f"{m}.wv.bias": (v,),
            f"{m}.wr.weight": (v, d),
            f"{m}.wr.bias": (v,),
            f"{m}.wh1.weight": (d, d),
            f"{m}.wh1.bias": (d,),
            f"{m}.wh2.weight": (d, v),
            f"{m}.gamma": (2, z),
            f"{m}.beta": (2, z),
            f"{h}.norm.weight": (d,),
            f"{h}.norm.bias": (d,),
            f"{h}.fc1.weight": (f, d),
            f"{h}.fc2.weight": (d, f),
        })
        if cfg["swiglu"]:
            shapes[f"{h}.fc3.weight"] = (f, d)
    shapes["output.final_norm.weight"] = (d,)
    shapes["output.final_norm.bias"] = (d,)
    shapes["output.output.weight"] = (vocab, d)
    return shapes


def random_parameters(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Random f32 values for every parameter, with spreads that keep activations O(1).

    Plus-one scales (norm weights, Q/K gamma) lie around 0 so the effective scale is 1 ± 0.3 or
    so; the CEMA logits are spread wider than their init so that the decay rates, phases and
    input rates differ visibly between channels and orders; linear weights have std
    1/sqrt(fan_in) and biases std 0.2.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in official_shapes(cfg).items():
        leaf = name.rsplit(".", 2)
        if name == "embed.weight":
            value = rng.normal(0.0, 1.0, shape)
        elif name == "output.output.weight":
            value = rng.normal(0.0, 1.2 / np.sqrt(shape[1]), shape)
        elif name.endswith(".cema.alpha"):
            value = rng.normal(0.0, 1.0, shape)
        elif name.endswith(".cema.delta"):
            value = rng.normal(0.0, 1.0, shape)
        elif name.endswith(".cema.theta"):
            value = rng.normal(0.0, 1.5, shape)
        elif name.endswith(".cema.gamma"):
            value = rng.normal(0.0, 1.0, shape)
        elif name.endswith(".cema.omega"):
            value = rng.uniform(-0.8, 0.8, shape)
        elif name.endswith("mega.gamma"):
            value = rng.normal(0.0, 0.5, shape)
        elif name.endswith("mega.beta"):
            value = rng.normal(0.0, 0.3, shape)
        elif leaf[-1] == "weight" and len(shape) == 1:
            value = rng.uniform(-0.3, 0.3, shape)  # plus-one norm scale
        elif leaf[-1] == "bias" and (".norm." in name or "timenorm" in name or "final_norm" in name):
            value = rng.normal(0.0, 0.2, shape)
        elif leaf[-1] == "weight":
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
        elif leaf[-1] == "bias":
            value = rng.normal(0.0, 0.2, shape)
        else:
            raise AssertionError(f"no rule for {name}")
        out[name] = np.asarray(value, dtype=np.float32)
    return out


def input_bytes() -> np.ndarray:
    rows = [np.frombuffer(r, dtype=np.uint8) for r in INPUT_ROWS]
    assert all(len(r) == SEQ_LEN for r in rows), [len(r) for r in rows]
    return np.stack(rows).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Mapping between the official names and megalodon-jax's native parameter tree
# --------------------------------------------------------------------------------------------


def official_to_native(official: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official state-dict tensors -> megalodon-jax native names (checkpoint.model_state_dict)."""
    native: dict[str, np.ndarray] = {}
    for name, value in official.items():
        if name == "embed.weight":
            native["model.embed.weight"] = value
        elif name == "output.output.weight":
            native["lm_head.weight"] = value
        elif name.startswith("output.final_norm."):
            native["model.norm." + name.rsplit(".", 1)[1]] = value
        elif ".mega." in name:
            layer, rest = name.split(".mega.")
            prefix = f"model.{layer}.attn"
            if rest == "cema.gamma":
                native[f"{prefix}.cema.gamma_real"] = np.ascontiguousarray(value[..., 0])
                native[f"{prefix}.cema.gamma_imag"] = np.ascontiguousarray(value[..., 1])
            elif rest == "cema.omega":
                native[f"{prefix}.cema.omega"] = np.ascontiguousarray(value[:, 0])
            elif rest == "rmsnorm.weight":
                native[f"{prefix}.rmsnorm.gamma"] = value
            else:
                native[f"{prefix}.{rest}"] = value
        elif ".nffn." in name:
            layer, rest = name.split(".nffn.")
            native[f"model.{layer}.ffn.{rest}"] = value
        else:
            raise AssertionError(f"unmapped official name {name}")
    return native


def native_to_official(native: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """Inverse of official_to_native (used for gradients)."""
    out: dict[str, np.ndarray] = {}
    for name in official_shapes(cfg):
        if name == "embed.weight":
            out[name] = native["model.embed.weight"]
        elif name == "output.output.weight":
            out[name] = native["lm_head.weight"]
        elif name.startswith("output.final_norm."):
            out[name] = native["model.norm." + name.rsplit(".", 1)[1]]
        elif ".mega." in name:
            layer, rest = name.split(".mega.")
            prefix = f"model.{layer}.attn"
            if rest == "cema.gamma":
                out[name] = np.stack(
                    [native[f"{prefix}.cema.gamma_real"], native[f"{prefix}.cema.gamma_imag"]], -1
                )
            elif rest == "cema.omega":
                out[name] = native[f"{prefix}.cema.omega"][:, None]
            elif rest == "rmsnorm.weight":
                out[name] = native[f"{prefix}.rmsnorm.gamma"]
            else:
                out[name] = native[f"{prefix}.{rest}"]
        else:
            layer, rest = name.split(".nffn.")
            out[name] = native[f"model.{layer}.ffn.{rest}"]
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def jax_config(cfg: dict) -> MegalodonConfig:
    return MegalodonConfig(
        vocab_size=cfg["vocab_size"],
        model_dim=cfg["model_dim"],
        num_layers=cfg["num_layers"],
        num_heads=cfg["num_heads"],
        z_dim=cfg["z_dim"],
        value_dim=cfg["value_dim"],
        ffn_hidden_dim=cfg["ffn_hidden_dim"],
        cema_ndim=cfg["cema_ndim"],
        chunk_size=cfg["chunk_size"],
        norm_num_groups=cfg["norm_num_groups"],
        norm_eps=cfg["norm_eps"],
        rope_base=cfg["rope_base"],
        swiglu=cfg["swiglu"],
        scale_emb=cfg["scale_emb"],
        share_emb=cfg["share_emb"],
        dropout=0.0,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def jax_model(cfg: dict, official: dict[str, np.ndarray]) -> MegalodonForCausalLM:
    """A megalodon-jax model whose every parameter is replaced by `official` (strict keys)."""
    model = MegalodonForCausalLM(jax_config(cfg), key=jax.random.PRNGKey(0))
    native = official_to_native(official)
    template = model_state_dict(model)
    assert set(native) == set(template), sorted(set(native) ^ set(template))
    model, report = apply_model_state_dict(model, {k: jnp.asarray(v) for k, v in native.items()})
    assert not report["initialized"], report["initialized"]
    # Every parameter must now differ from its initial value (nothing left at init).
    after = model_state_dict(model)
    for k in template:
        assert not np.array_equal(np.asarray(template[k]), np.asarray(after[k])), k
    return model


def jax_loss(model: MegalodonForCausalLM, tokens: jnp.ndarray) -> jnp.ndarray:
    """Mean next-token cross-entropy: logits[:, t] against tokens[:, t + 1]."""
    return model.compute_loss(tokens, tokens, deterministic=True)


def jax_streamed_logits(model: MegalodonForCausalLM, tokens: np.ndarray, sizes) -> np.ndarray:
    cache = None
    pieces = []
    start = 0
    for size in sizes:
        logits, cache = model(
            jnp.asarray(tokens[:, start:start + size]), cache=cache, return_cache=True
        )
        pieces.append(np.asarray(logits))
        start += size
    assert start == tokens.shape[1]
    return np.concatenate(pieces, axis=1)


# --------------------------------------------------------------------------------------------
# Independent NumPy float64 reference, written from shared/spec/megalodon.md
# --------------------------------------------------------------------------------------------


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def ref_timestep_norm(x, w, b, groups, eps):
    """Spec §5.1: cumulative group mean / population variance over all timesteps <= t."""
    bsz, length, d = x.shape
    dg = d // groups
    xg = x.reshape(bsz, length, groups, dg)
    count = np.arange(1, length + 1, dtype=np.float64)[None, :, None] * dg
    mean = np.cumsum(xg.sum(-1), axis=1) / count  # (B, L, G)
    # Population variance of every scalar seen so far around the current mean.
    sq = np.cumsum((xg**2).sum(-1), axis=1) / count
    var = sq - mean**2
    y = (xg - mean[..., None]) / np.sqrt(var[..., None] + eps)
    return y.reshape(bsz, length, d) * (w + 1.0) + b


def ref_cema(x, alpha, delta, theta, gamma, omega):
    """Spec §4.2-4.3: h_t = p x_t + q h_{t-1};  y_t = Re(sum_n gam h_t) + omega x_t."""
    d, n = alpha.shape[0], alpha.shape[1]
    a = sigmoid(alpha[:, :, 0])
    dl = sigmoid(delta[:, :, 0])
    phi = sigmoid(theta[:, 0, 0])[:, None] * (2.0 * np.pi / n) * np.arange(1, n + 1)[None, :]
    p = a
    q = (1.0 - a * dl) * np.exp(1j * phi)
    gam = (gamma[..., 0] + 1j * gamma[..., 1]) / np.sqrt(n)
    bsz, length, _ = x.shape
    h = np.zeros((bsz, d, n), dtype=np.complex128)
    y = np.empty_like(x)
    for t in range(length):
        h = p[None] * x[:, t, :, None] + q[None] * h
        y[:, t] = (gam[None] * h).sum(-1).real + omega[:, 0][None] * x[:, t]
    return y


def ref_rope(x, positions, base):
    """Adjacent-pair RoPE (spec §6.4): pairs (2i, 2i+1), inv_i = base^(-2i/dz)."""
    dz = x.shape[-1]
    inv = base ** (-np.arange(0, dz, 2, dtype=np.float64) / dz)  # (dz/2,)
    ang = positions[:, None] * inv[None, :]  # (L, dz/2)
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = xe * cos - xo * sin
    out[..., 1::2] = xe * sin + xo * cos
    return out


def ref_layer(x, p, prefix, cfg):
    d, heads, eps = cfg["model_dim"], cfg["num_heads"], cfg["norm_eps"]
    z_dim, v_dim, chunk = cfg["z_dim"], cfg["value_dim"], cfg["chunk_size"]
    dz, dv = z_dim // heads, v_dim // heads
    bsz, length, _ = x.shape
    m, f = prefix + ".mega.", prefix + ".nffn."

    def lin(inp, name, bias=True):
        out = inp @ p[name + ".weight"].T
        return out + p[name + ".bias"] if bias else out

    xn = ref_timestep_norm(
        x, p[m + "timenorm.weight"], p[m + "timenorm.bias"], cfg["norm_num_groups"], eps
    )
    xc = ref_cema(
        xn, p[m + "cema.alpha"], p[m + "cema.delta"], p[m + "cema.theta"],
        p[m + "cema.gamma"], p[m + "cema.omega"],
    )
    mm = xc / np.sqrt((xc**2).mean(-1, keepdims=True) + eps) * (p[m + "rmsnorm.weight"] + 1.0)
    zz = lin(mm, m + "wz").reshape(bsz, length, heads, dz)
    zz = zz / np.sqrt((zz**2).mean(-1, keepdims=True) + eps)
    gam = p[m + "gamma"].reshape(2, heads, dz)
    bet = p[m + "beta"].reshape(2, heads, dz)
    q = zz * (gam[0] + 1.0) / np.sqrt(dz) + bet[0]
    k = zz * (gam[1] + 1.0) / np.sqrt(dz) + bet[1]
    vv = silu(lin(xn, m + "wv")).reshape(bsz, length, heads, dv)
    r = silu(lin(mm, m + "wr"))
    pos = (np.arange(length) % chunk).astype(np.float64)
    q = ref_rope(q, pos, cfg["rope_base"])
    k = ref_rope(k, pos, cfg["rope_base"])
    o = np.zeros((bsz, length, heads, dv))
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        qs, ks, vs = q[:, start:stop], k[:, start:stop], vv[:, start:stop]
        s = np.einsum("bihd,bjhd->bhij", qs, ks)  # no 1/sqrt(d) temperature
        n_c = stop - start
        s = np.where(np.tril(np.ones((n_c, n_c), bool))[None, None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        o[:, start:stop] = np.einsum("bhij,bjhd->bihd", s, vs)
    o = o.reshape(bsz, length, v_dim)
    hh = lin(mm, m + "wh1") + (o * r) @ p[m + "wh2.weight"].T
    y_hat = x + hh
    mu = y_hat.mean(-1, keepdims=True)
    var = ((y_hat - mu) ** 2).mean(-1, keepdims=True)
    u = (y_hat - mu) / np.sqrt(var + eps) * (p[f + "norm.weight"] + 1.0) + p[f + "norm.bias"]
    hidden = silu(u @ p[f + "fc1.weight"].T)
    if cfg["swiglu"]:
        hidden = hidden * (u @ p[f + "fc3.weight"].T)
    return x + hidden @ p[f + "fc2.weight"].T  # two-hop residual: block input X


def ref_logits(params: dict[str, np.ndarray], tokens: np.ndarray, cfg: dict) -> np.ndarray:
    p = {k: v.astype(np.float64) for k, v in params.items()}
    x = p["embed.weight"][tokens]
    if cfg["scale_emb"]:
        x = x * np.sqrt(cfg["model_dim"])
    for i in range(cfg["num_layers"]):
        x = ref_layer(x, p, f"layers.{i}", cfg)
    hn = ref_timestep_norm(
        x, p["output.final_norm.weight"], p["output.final_norm.bias"],
        cfg["norm_num_groups"], cfg["norm_eps"],
    )
    head = p["embed.weight"] if cfg["share_emb"] else p["output.output.weight"]
    return hn @ head.T


def ref_loss(params, tokens, cfg) -> float:
    logits = ref_logits(params, tokens, cfg)[:, :-1]
    target = tokens[:, 1:]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, target[..., None], -1)[..., 0]
    return float((lse - picked).mean())


def check_gradients(params, grads, tokens, cfg, rng) -> float:
    """Central differences of the f64 reference loss vs the jax gradient; returns worst ratio."""
    worst = 0.0
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    for name, g in grads.items():
        flat = g.reshape(-1)
        scale = np.abs(flat).max()
        # the largest-gradient element plus a few random ones
        picks = {int(np.argmax(np.abs(flat)))} | set(rng.choice(flat.size, 3, replace=False).tolist())
        for idx in sorted(picks):
            h = 1e-4
            plus = {k: v.copy() for k, v in p64.items()}
            minus = {k: v.copy() for k, v in p64.items()}
            plus[name].reshape(-1)[idx] += h
            minus[name].reshape(-1)[idx] -= h
            fd = (ref_loss(plus, tokens, cfg) - ref_loss(minus, tokens, cfg)) / (2 * h)
            err = abs(fd - float(flat[idx])) / (abs(fd) + 1e-2 * scale + 1e-12)
            worst = max(worst, err)
            if err > GRAD_REL_TOL:
                raise SystemExit(f"gradient mismatch {name}[{idx}]: jax {flat[idx]} fd {fd}")
    return worst


# --------------------------------------------------------------------------------------------


def generator_string() -> str:
    return (
        f"tools/golden_megalodon.py: megalodon-jax {version('megalodon-jax')}, "
        f"jax {jax.__version__}, jaxlib {version('jaxlib')}, equinox {version('equinox')}, "
        f"numpy {np.__version__}, safetensors {version('safetensors')}; "
        f"float32 on CPU; parameter seed {PARAM_SEED}"
    )


def write_fixture(path: Path, tensors: dict[str, np.ndarray]) -> None:
    metadata = {
        "config": json.dumps(CONFIG, sort_keys=True),
        "generator": generator_string(),
    }
    path.write_bytes(save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata))


def reload_check(path: Path, expected_logits: np.ndarray, stream: bool) -> None:
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    cfg = json.loads(meta["config"])
    assert cfg == CONFIG
    params = {k: stored[k] for k in official_shapes(cfg)}
    for k, shape in official_shapes(cfg).items():
        assert stored[k].shape == shape and stored[k].dtype == np.float32, k
    model = jax_model(cfg, params)
    tokens = stored["input"]
    if stream:
        logits = jax_streamed_logits(model, tokens, [int(s) for s in stored["call_sizes"]])
    else:
        logits = np.asarray(model(jnp.asarray(tokens))[0])
    assert np.array_equal(logits, stored["logits"]), np.abs(logits - stored["logits"]).max()
    assert np.array_equal(stored["logits"], expected_logits)


def main() -> int:
    cfg = CONFIG
    params = random_parameters(cfg, PARAM_SEED)
    tokens = input_bytes()
    model = jax_model(cfg, params)

    logits = np.asarray(model(jnp.asarray(tokens))[0])
    assert logits.dtype == np.float32 and logits.shape == (2, SEQ_LEN, cfg["vocab_size"])

    # 1. independent reference
    reference = ref_logits(params, tokens, cfg)
    ref_diff = float(np.abs(reference - logits).max())
    print(f"max |logit| {np.abs(logits).max():.3f}, logit std {logits.std():.3f}")
    print(f"NumPy f64 spec reference vs megalodon-jax f32 logits: max abs diff {ref_diff:.3e}")
    if ref_diff > REFERENCE_TOL:
        raise SystemExit("reference mismatch")

    # 2. streaming
    streamed = jax_streamed_logits(model, tokens, STREAM_CALL_SIZES)
    stream_diff = float(np.abs(streamed - logits).max())
    stream_ref_diff = float(np.abs(streamed - reference).max())
    print(
        f"streamed (calls {STREAM_CALL_SIZES}) vs full megalodon-jax: max abs diff "
        f"{stream_diff:.3e}; vs NumPy reference {stream_ref_diff:.3e}"
    )
    if stream_diff > STREAM_TOL:
        raise SystemExit("streaming mismatch")

    # 3. loss and gradients
    loss, grad_tree = eqx.filter_value_and_grad(jax_loss)(model, jnp.asarray(tokens))
    grads = native_to_official(
        {k: np.asarray(v) for k, v in model_state_dict(grad_tree).items()}, cfg
    )
    ref_l = ref_loss(params, tokens, cfg)
    print(f"loss megalodon-jax {float(loss):.7f}, NumPy reference {ref_l:.7f}, "
          f"diff {abs(float(loss) - ref_l):.2e}")
    if abs(float(loss) - ref_l) > 1e-5:
        raise SystemExit("loss mismatch")
    worst = check_gradients(params, grads, tokens, cfg, np.random.default_rng(7))
    print(f"gradients vs central differences of the f64 reference: worst scaled error {worst:.2e}")
    for k, g in grads.items():
        if not np.any(g != 0):
            raise SystemExit(f"gradient of {k} is all zero")

    # 4. write and reload
    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    full_path = FIXTURE_DIR / "megalodon_tiny.safetensors"
    tensors = dict(params)
    tensors.update({f"grad.{k}": v for k, v in grads.items()})
    tensors["input"] = tokens
    tensors["logits"] = logits
    tensors["loss"] = np.asarray([float(loss)], dtype=np.float32)
    write_fixture(full_path, tensors)
    reload_check(full_path, logits, stream=False)

    stream_path = FIXTURE_DIR / "megalodon_tiny_stream.safetensors"
    tensors = dict(params)
    tensors["input"] = tokens
    tensors["call_sizes"] = np.asarray(STREAM_CALL_SIZES, dtype=np.int32)
    tensors["logits"] = streamed
    write_fixture(stream_path, tensors)
    reload_check(stream_path, streamed, stream=True)

    for path in (full_path, stream_path):
        print(f"wrote {path.relative_to(REPO_ROOT)} ({path.stat().st_size} bytes), reload reproduces logits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
