//! Causal multi-head attention on the CPU: training forward/backward, single-query decode
//! against a KV cache, and the cache append.
//!
//! Layouts follow [`crate::backend::Backend::attention_forward`]: `qkv` is `[b, t, 3c]` with
//! per row `[q | k | v]`, head `i` owning channels `i·c/h .. (i+1)·c/h` of each part.

use super::Real;

/// Causal attention forward: `out = [b, t, c]`, `att = [b, h, t, t]` probabilities.
#[allow(clippy::too_many_arguments)]
pub fn forward<F: Real>(
    out: &mut [F],
    att: &mut [F],
    qkv: &[F],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    reference::forward(out, att, qkv, b, t, c, h, scale)
}

/// Causal attention backward: `dqkv += …` given `dout` and the saved `att`.
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Real>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    att: &[F],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    reference::backward(dqkv, dout, qkv, att, b, t, c, h, scale)
}

/// Single-query attention of each row `r` over its first `lens[r]` cached keys.
#[allow(clippy::too_many_arguments)]
pub fn decode<F: Real>(
    out: &mut [F],
    qkv: &[F],
    k_cache: &[F],
    v_cache: &[F],
    lens: &[u32],
    t_max: usize,
    c: usize,
    h: usize,
    scale: F,
) {
    reference::decode(out, qkv, k_cache, v_cache, lens, t_max, c, h, scale)
}

/// Copy the `k` and `v` parts of `qkv[r]` into the caches at position `pos[r]`.
pub fn kv_append<F: Real>(
    k_cache: &mut [F],
    v_cache: &mut [F],
    qkv: &[F],
    pos: &[u32],
    t_max: usize,
    c: usize,
) {
    reference::kv_append(k_cache, v_cache, qkv, pos, t_max, c)
}

/// Plain loop implementations, the independent yardstick for the fast paths.
pub mod reference {
    use super::Real;

    /// Reference of [`super::forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward<F: Real>(
        out: &mut [F],
        att: &mut [F],
        qkv: &[F],
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: F,
    ) {
        assert_eq!(c % h, 0);
        assert_eq!(qkv.len(), b * t * 3 * c);
        assert_eq!(out.len(), b * t * c);
        assert_eq!(att.len(), b * h * t * t);
        let hs = c / h;
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..t {
                    let q = (bi * t + i) * 3 * c + hi * hs;
                    let arow = ((bi * h + hi) * t + i) * t;
                    let mut max = F::neg_infinity();
                    for j in 0..=i {
                        let k = (bi * t + j) * 3 * c + c + hi * hs;
                        let mut s = F::zero();
                        for d in 0..hs {
                            s = s + qkv[q + d] * qkv[k + d];
                        }
                        s = s * scale;
                        att[arow + j] = s;
                        max = max.max(s);
                    }
                    let mut sum = F::zero();
                    for j in 0..=i {
                        let e = (att[arow + j] - max).exp();
                        att[arow + j] = e;
                        sum = sum + e;
                    }
                    for j in 0..t {
                        att[arow + j] = if j <= i { att[arow + j] / sum } else { F::zero() };
                    }
                    let o = (bi * t + i) * c + hi * hs;
                    for d in 0..hs {
                        let mut acc = F::zero();
                        for j in 0..=i {
                            let v = (bi * t + j) * 3 * c + 2 * c + hi * hs;
                            acc = acc + att[arow + j] * qkv[v + d];
                        }
                        out[o + d] = acc;
                    }
                }
            }
        }
    }

    /// Reference of [`super::backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn backward<F: Real>(
        dqkv: &mut [F],
        dout: &[F],
        qkv: &[F],
        att: &[F],
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: F,
    ) {
        assert_eq!(c % h, 0);
        assert_eq!(qkv.len(), b * t * 3 * c);
        assert_eq!(dqkv.len(), b * t * 3 * c);
        assert_eq!(dout.len(), b * t * c);
        assert_eq!(att.len(), b * h * t * t);
        let hs = c / h;
        let mut datt = vec![F::zero(); t];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..t {
                    let arow = ((bi * h + hi) * t + i) * t;
                    let o = (bi * t + i) * c + hi * hs;
                    // dP[j] = dout_i · v_j ; dv_j += P[j] dout_i
                    for j in 0..=i {
                        let v = (bi * t + j) * 3 * c + 2 * c + hi * hs;
                        let mut s = F::zero();
                        for d in 0..hs {
                            s = s + dout[o + d] * qkv[v + d];
                            dqkv[v + d] = dqkv[v + d] + att[arow + j] * dout[o + d];
                        }
                        datt[j] = s;
                    }
                    // softmax backward: dS[j] = P[j] (dP[j] - Σ_k P[k] dP[k])
                    let mut dot = F::zero();
                    for j in 0..=i {
                        dot = dot + att[arow + j] * datt[j];
                    }
                    let q = (bi * t + i) * 3 * c + hi * hs;
                    for j in 0..=i {
                        let ds = att[arow + j] * (datt[j] - dot) * scale;
                        let k = (bi * t + j) * 3 * c + c + hi * hs;
                        for d in 0..hs {
                            dqkv[q + d] = dqkv[q + d] + ds * qkv[k + d];
                            dqkv[k + d] = dqkv[k + d] + ds * qkv[q + d];
                        }
                    }
                }
            }
        }
    }

    /// Reference of [`super::decode`].
    #[allow(clippy::too_many_arguments)]
    pub fn decode<F: Real>(
        out: &mut [F],
        qkv: &[F],
        k_cache: &[F],
        v_cache: &[F],
        lens: &[u32],
        t_max: usize,
        c: usize,
        h: usize,
        scale: F,
    ) {
        assert_eq!(c % h, 0);
        let b = lens.len();
        assert_eq!(qkv.len(), b * 3 * c);
        assert_eq!(out.len(), b * c);
        assert_eq!(k_cache.len(), b * t_max * c);
        assert_eq!(v_cache.len(), b * t_max * c);
        let hs = c / h;
        let mut scores = vec![F::zero(); t_max];
        for r in 0..b {
            let len = lens[r] as usize;
            assert!(len >= 1 && len <= t_max, "decode length {len} outside 1..={t_max}");
            for hi in 0..h {
                let q = r * 3 * c + hi * hs;
                let mut max = F::neg_infinity();
                for (j, sj) in scores.iter_mut().enumerate().take(len) {
                    let k = (r * t_max + j) * c + hi * hs;
                    let mut s = F::zero();
                    for d in 0..hs {
                        s = s + qkv[q + d] * k_cache[k + d];
                    }
                    *sj = s * scale;
                    max = max.max(*sj);
                }
                let mut sum = F::zero();
                for sj in scores.iter_mut().take(len) {
                    *sj = (*sj - max).exp();
                    sum = sum + *sj;
                }
                let o = r * c + hi * hs;
                for d in 0..hs {
                    let mut acc = F::zero();
                    for (j, sj) in scores.iter().enumerate().take(len) {
                        acc = acc + *sj * v_cache[(r * t_max + j) * c + hi * hs + d];
                    }
                    out[o + d] = acc / sum;
                }
            }
        }
    }

    /// Reference of [`super::kv_append`].
    pub fn kv_append<F: Real>(
        k_cache: &mut [F],
        v_cache: &mut [F],
        qkv: &[F],
        pos: &[u32],
        t_max: usize,
        c: usize,
    ) {
        let b = pos.len();
        assert_eq!(qkv.len(), b * 3 * c);
        assert_eq!(k_cache.len(), b * t_max * c);
        assert_eq!(v_cache.len(), b * t_max * c);
        for r in 0..b {
            let p = pos[r] as usize;
            assert!(p < t_max, "cache position {p} outside 0..{t_max}");
            for d in 0..c {
                k_cache[(r * t_max + p) * c + d] = qkv[r * 3 * c + c + d];
                v_cache[(r * t_max + p) * c + d] = qkv[r * 3 * c + 2 * c + d];
            }
        }
    }
}
