//! The pure-Rust CPU backend: the reference for every op and the default device.
//!
//! Generic over the element type so the same code runs in f32 (training, inference) and in
//! f64 (finite-difference gradient checks).
//!
//! Each op lives in its own module with two implementations: a fast path (gemm, rayon over
//! rows, fused loops), which [`Cpu`] calls, and a `reference` submodule of plain loops that
//! the tests hold the fast path to.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod bias;
pub mod cema;
pub mod chunk_cache;
pub mod elementwise;
pub mod embedding;
pub mod kv_cache;
mod lanes;
pub mod layernorm;
pub mod loss;
pub mod matmul;
pub mod megabyte_embed;
pub mod megalodon_attention;
pub mod memory;
pub mod parallel;
pub mod rmsnorm;
pub mod scatter_add;
pub mod swiglu;
pub mod timestep_norm;

use num_traits::Float;

use super::{
    Activation, AdamW, Backend, CemaWeightGrads, CemaWeights, ChunkCallError, MegaAttnShape,
    TsnStats,
};

/// Element types the CPU backend computes in (`f32`, `f64`).
pub trait Real:
    Float
    + num_traits::FromPrimitive
    + std::iter::Sum
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
}
impl Real for f32 {}
impl Real for f64 {}

/// `x` as an `F` (rounded to nearest when `F` is narrower).
pub fn real<F: Real>(x: f64) -> F {
    // f32 and f64 accept every f64 (out-of-range values become ±inf), so this cannot fail
    // for the element types the backend implements.
    F::from_f64(x).expect("Real types represent every f64 up to rounding")
}

/// The CPU backend. Parallelism comes from the global rayon pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu<F: Real = f32> {
    _elem: std::marker::PhantomData<F>,
}

impl<F: Real> Cpu<F> {
    /// A CPU backend computing in `F`.
    pub fn new() -> Self {
        Self {
            _elem: std::marker::PhantomData,
        }
    }
}

/// Borrow CEMA weight buffers as the op's slices.
fn cema_params<'a, F>(p: &'a CemaWeights<Vec<F>>) -> cema::CemaParams<'a, F> {
    cema::CemaParams {
        alpha: p.alpha,
        delta: p.delta,
        theta: p.theta,
        gamma: p.gamma,
        omega: p.omega,
    }
}

fn tsn_state<F>(s: &TsnStats<Vec<F>>) -> timestep_norm::TsnState<'_, F> {
    timestep_norm::TsnState {
        count: &s.count,
        mean: &s.mean,
        var: &s.var,
    }
}

fn tsn_state_mut<F>(s: &mut TsnStats<Vec<F>>) -> timestep_norm::TsnStateMut<'_, F> {
    timestep_norm::TsnStateMut {
        count: &mut s.count,
        mean: &mut s.mean,
        var: &mut s.var,
    }
}

impl<F: Real> Backend for Cpu<F> {
    type Buf = Vec<F>;
    type MegaAttnSaved = megalodon_attention::MegaAttnSaved<F>;
    type ChunkCache = megalodon_attention::ChunkKvCache<F>;

    fn name(&self) -> String {
        "cpu".to_string()
    }

    fn zeros(&self, n: usize) -> Vec<F> {
        vec![F::zero(); n]
    }

    fn upload(&self, host: &[f32]) -> Vec<F> {
        memory::upload(host)
    }

    fn download(&self, buf: &Vec<F>) -> Vec<f32> {
        memory::download(buf)
    }

    fn len(&self, buf: &Vec<F>) -> usize {
        buf.len()
    }

    fn copy(&self, dst: &mut Vec<F>, src: &Vec<F>) {
        assert_eq!(dst.len(), src.len(), "copy: length mismatch");
        dst.copy_from_slice(src);
    }

    fn fill_zero(&self, buf: &mut Vec<F>) {
        buf.fill(F::zero());
    }

    fn add_assign(&self, dst: &mut Vec<F>, src: &Vec<F>) {
        memory::add_assign(dst, src);
    }

    fn scale(&self, buf: &mut Vec<F>, s: f32) {
        memory::scale(buf, real(s as f64));
    }

    fn sum_squares(&self, buf: &Vec<F>) -> f64 {
        memory::sum_squares(buf)
    }

    fn sum(&self, buf: &Vec<F>) -> f64 {
        memory::sum(buf)
    }

    fn gather_rows(&self, out: &mut Vec<F>, src: &Vec<F>, rows: &[u32], d: usize) {
        memory::gather_rows(out, src, rows, d);
    }

    fn scatter_rows(&self, dst: &mut Vec<F>, src: &Vec<F>, rows: &[u32], d: usize) {
        memory::scatter_rows(dst, src, rows, d);
    }

    fn matmul(
        &self,
        out: &mut Vec<F>,
        a: &Vec<F>,
        b: &Vec<F>,
        m: usize,
        k: usize,
        n: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) {
        matmul::matmul(out, a, b, m, k, n, trans_a, trans_b, accumulate);
    }

    fn add_bias(&self, out: &mut Vec<F>, bias: &Vec<F>, n: usize, d: usize) {
        bias::add_bias(out, bias, n, d);
    }

    fn bias_backward(&self, dbias: &mut Vec<F>, dout: &Vec<F>, n: usize, d: usize) {
        bias::bias_backward(dbias, dout, n, d);
    }

    fn layernorm_forward(
        &self,
        out: &mut Vec<F>,
        mean: &mut Vec<F>,
        rstd: &mut Vec<F>,
        x: &Vec<F>,
        w: &Vec<F>,
        b: &Vec<F>,
        n: usize,
        d: usize,
        eps: f32,
    ) {
        layernorm::forward(out, mean, rstd, x, w, b, n, d, real(eps as f64));
    }

    fn layernorm_backward(
        &self,
        dx: &mut Vec<F>,
        dw: &mut Vec<F>,
        db: &mut Vec<F>,
        dout: &Vec<F>,
        x: &Vec<F>,
        w: &Vec<F>,
        mean: &Vec<F>,
        rstd: &Vec<F>,
        n: usize,
        d: usize,
    ) {
        layernorm::backward(dx, dw, db, dout, x, w, mean, rstd, n, d);
    }

    fn rmsnorm_forward(
        &self,
        out: &mut Vec<F>,
        rstd: &mut Vec<F>,
        x: &Vec<F>,
        w: &Vec<F>,
        n: usize,
        d: usize,
        eps: f32,
    ) {
        rmsnorm::forward(out, rstd, x, w, n, d, real(eps as f64));
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut Vec<F>,
        dw: &mut Vec<F>,
        dout: &Vec<F>,
        x: &Vec<F>,
        w: &Vec<F>,
        rstd: &Vec<F>,
        n: usize,
        d: usize,
    ) {
        rmsnorm::backward(dx, dw, dout, x, w, rstd, n, d);
    }

    fn activation_forward(&self, act: Activation, out: &mut Vec<F>, x: &Vec<F>) {
        activation::forward(act, out, x);
    }

    fn activation_backward(&self, act: Activation, dx: &mut Vec<F>, x: &Vec<F>, dout: &Vec<F>) {
        activation::backward(act, dx, x, dout);
    }

    fn mul(&self, out: &mut Vec<F>, a: &Vec<F>, b: &Vec<F>) {
        elementwise::mul(out, a, b);
    }

    fn add_scalar(&self, out: &mut Vec<F>, x: &Vec<F>, s: f32) {
        elementwise::add_scalar(out, x, real(s as f64));
    }

    fn swiglu_forward(&self, out: &mut Vec<F>, x: &Vec<F>, n: usize, h: usize) {
        swiglu::forward(out, x, n, h);
    }

    fn swiglu_backward(&self, dx: &mut Vec<F>, x: &Vec<F>, dout: &Vec<F>, n: usize, h: usize) {
        swiglu::backward(dx, x, dout, n, h);
    }

    fn attention_forward(
        &self,
        out: &mut Vec<F>,
        att: &mut Vec<F>,
        qkv: &Vec<F>,
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: f32,
    ) {
        attention::forward(out, att, qkv, b, t, c, h, real(scale as f64));
    }

    fn attention_backward(
        &self,
        dqkv: &mut Vec<F>,
        dout: &Vec<F>,
        qkv: &Vec<F>,
        att: &Vec<F>,
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: f32,
    ) {
        attention::backward(dqkv, dout, qkv, att, b, t, c, h, real(scale as f64));
    }

    fn attention_decode(
        &self,
        out: &mut Vec<F>,
        qkv: &Vec<F>,
        k_cache: &Vec<F>,
        v_cache: &Vec<F>,
        lens: &[u32],
        block_table: &[u32],
        block_size: usize,
        c: usize,
        h: usize,
        scale: f32,
    ) {
        let pages = attention::KvPages {
            k: k_cache,
            v: v_cache,
            block_table,
            block_size,
            c,
        };
        attention::decode(out, qkv, &pages, lens, h, real(scale as f64));
    }

    fn kv_append(
        &self,
        k_cache: &mut Vec<F>,
        v_cache: &mut Vec<F>,
        qkv: &Vec<F>,
        entries: &[u32],
        c: usize,
    ) {
        kv_cache::append(k_cache, v_cache, qkv, entries, c);
    }

    fn timestep_norm_forward(
        &self,
        y: &mut Vec<F>,
        saved_mean: &mut Vec<F>,
        saved_rstd: &mut Vec<F>,
        state_out: Option<&mut TsnStats<Vec<F>>>,
        x: &Vec<F>,
        w: &Vec<F>,
        bias: &Vec<F>,
        state_in: Option<&TsnStats<Vec<F>>>,
        b: usize,
        l: usize,
        d: usize,
        g: usize,
        eps: f32,
    ) {
        timestep_norm::forward(
            y,
            saved_mean,
            saved_rstd,
            state_out.map(tsn_state_mut),
            x,
            w,
            bias,
            state_in.map(tsn_state),
            b,
            l,
            d,
            g,
            real(eps as f64),
        );
    }

    fn timestep_norm_backward(
        &self,
        dx: &mut Vec<F>,
        dw: &mut Vec<F>,
        db: &mut Vec<F>,
        dstate_in: Option<(&mut Vec<F>, &mut Vec<F>)>,
        dy: &Vec<F>,
        dstate_out: Option<(&Vec<F>, &Vec<F>)>,
        x: &Vec<F>,
        w: &Vec<F>,
        saved_mean: &Vec<F>,
        saved_rstd: &Vec<F>,
        state_in: Option<&TsnStats<Vec<F>>>,
        b: usize,
        l: usize,
        d: usize,
        g: usize,
    ) {
        timestep_norm::backward(
            dx,
            dw,
            db,
            dstate_in.map(|(m, v)| (m.as_mut_slice(), v.as_mut_slice())),
            dy,
            dstate_out.map(|(m, v)| (m.as_slice(), v.as_slice())),
            x,
            w,
            saved_mean,
            saved_rstd,
            state_in.map(tsn_state),
            b,
            l,
            d,
            g,
        );
    }

    fn timestep_norm_step(
        &self,
        y: &mut Vec<F>,
        state: &mut TsnStats<Vec<F>>,
        x: &Vec<F>,
        w: &Vec<F>,
        bias: &Vec<F>,
        b: usize,
        d: usize,
        g: usize,
        eps: f32,
    ) {
        timestep_norm::step(
            y,
            tsn_state_mut(state),
            x,
            w,
            bias,
            b,
            d,
            g,
            real(eps as f64),
        );
    }

    fn cema_forward(
        &self,
        y: &mut Vec<F>,
        h_out: Option<&mut Vec<F>>,
        x: &Vec<F>,
        p: &CemaWeights<Vec<F>>,
        h0: Option<&Vec<F>>,
        b: usize,
        l: usize,
        d: usize,
        n: usize,
    ) {
        cema::forward(
            y,
            h_out.map(|h| h.as_mut_slice()),
            x,
            &cema_params(p),
            h0.map(|h| h.as_slice()),
            b,
            l,
            d,
            n,
        );
    }

    fn cema_backward(
        &self,
        dx: &mut Vec<F>,
        g: &mut CemaWeightGrads<Vec<F>>,
        dh0: Option<&mut Vec<F>>,
        dy: &Vec<F>,
        dh_out: Option<&Vec<F>>,
        x: &Vec<F>,
        p: &CemaWeights<Vec<F>>,
        h0: Option<&Vec<F>>,
        b: usize,
        l: usize,
        d: usize,
        n: usize,
    ) {
        let mut grads = cema::CemaGrads {
            alpha: g.alpha,
            delta: g.delta,
            theta: g.theta,
            gamma: g.gamma,
            omega: g.omega,
        };
        cema::backward(
            dx,
            &mut grads,
            dh0.map(|h| h.as_mut_slice()),
            dy,
            dh_out.map(|h| h.as_slice()),
            x,
            &cema_params(p),
            h0.map(|h| h.as_slice()),
            b,
            l,
            d,
            n,
        );
    }

    fn cema_step(
        &self,
        y: &mut Vec<F>,
        h: &mut Vec<F>,
        x: &Vec<F>,
        p: &CemaWeights<Vec<F>>,
        b: usize,
        d: usize,
        n: usize,
    ) {
        cema::step(y, h, x, &cema_params(p), b, d, n);
    }

    fn mega_attention_saved(&self, s: &MegaAttnShape) -> Self::MegaAttnSaved {
        megalodon_attention::saved_new(s)
    }

    fn mega_attention_forward(
        &self,
        out: &mut Vec<F>,
        saved: &mut Self::MegaAttnSaved,
        z: &Vec<F>,
        v: &Vec<F>,
        gamma: &Vec<F>,
        beta: &Vec<F>,
        s: &MegaAttnShape,
    ) {
        megalodon_attention::forward(out, saved, z, v, gamma, beta, s);
    }

    fn mega_attention_backward(
        &self,
        dz: &mut Vec<F>,
        dv: &mut Vec<F>,
        dgamma: &mut Vec<F>,
        dbeta: &mut Vec<F>,
        dout: &Vec<F>,
        z: &Vec<F>,
        v: &Vec<F>,
        gamma: &Vec<F>,
        beta: &Vec<F>,
        saved: &Self::MegaAttnSaved,
        s: &MegaAttnShape,
    ) {
        megalodon_attention::backward(dz, dv, dgamma, dbeta, dout, z, v, gamma, beta, saved, s);
    }

    fn chunk_cache(
        &self,
        b: usize,
        heads: usize,
        dz: usize,
        dv: usize,
        chunk: usize,
    ) -> Self::ChunkCache {
        megalodon_attention::ChunkKvCache::new(b, heads, dz, dv, chunk)
    }

    fn chunk_cache_copy_row(
        &self,
        dst: &mut Self::ChunkCache,
        dst_row: usize,
        src: &Self::ChunkCache,
        src_row: usize,
    ) {
        chunk_cache::copy_row(dst, dst_row, src, src_row);
    }

    fn mega_attention_forward_cached(
        &self,
        out: &mut Vec<F>,
        cache: &mut Self::ChunkCache,
        z: &Vec<F>,
        v: &Vec<F>,
        gamma: &Vec<F>,
        beta: &Vec<F>,
        s: &MegaAttnShape,
    ) -> Result<(), ChunkCallError> {
        megalodon_attention::forward_cached(out, cache, z, v, gamma, beta, s)
    }

    fn embedding_forward(
        &self,
        out: &mut Vec<F>,
        table: &Vec<F>,
        ids: &[u32],
        d: usize,
        accumulate: bool,
    ) {
        embedding::forward(out, table, ids, d, accumulate);
    }

    fn embedding_backward(&self, dtable: &mut Vec<F>, dout: &Vec<F>, ids: &[u32], d: usize) {
        embedding::backward(dtable, dout, ids, d);
    }

    fn patch_embed_forward(
        &self,
        out: &mut Vec<F>,
        tok: &Vec<F>,
        pos: &Vec<F>,
        pad: &Vec<F>,
        ids: &[u32],
        positions: &[u32],
        p: usize,
        dg: usize,
    ) {
        megabyte_embed::patch_forward(out, tok, pos, pad, ids, positions, p, dg);
    }

    fn patch_embed_backward(
        &self,
        dtok: &mut Vec<F>,
        dpos: &mut Vec<F>,
        dpad: &mut Vec<F>,
        dout: &Vec<F>,
        ids: &[u32],
        positions: &[u32],
        p: usize,
        dg: usize,
    ) {
        megabyte_embed::patch_backward(dtok, dpos, dpad, dout, ids, positions, p, dg);
    }

    fn local_embed_forward(
        &self,
        out: &mut Vec<F>,
        tok: &Vec<F>,
        pos: &Vec<F>,
        pad: &Vec<F>,
        ids: &[u32],
        slots: &[u32],
        d: usize,
    ) {
        megabyte_embed::local_forward(out, tok, pos, pad, ids, slots, d);
    }

    fn local_embed_backward(
        &self,
        dtok: &mut Vec<F>,
        dpos: &mut Vec<F>,
        dpad: &mut Vec<F>,
        dout: &Vec<F>,
        ids: &[u32],
        slots: &[u32],
        d: usize,
    ) {
        megabyte_embed::local_backward(dtok, dpos, dpad, dout, ids, slots, d);
    }

    fn cross_entropy_forward(
        &self,
        losses: &mut Vec<F>,
        logits: &Vec<F>,
        targets: &[u32],
        v: usize,
    ) {
        loss::cross_entropy_forward(losses, logits, targets, v);
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut Vec<F>,
        logits: &Vec<F>,
        targets: &[u32],
        v: usize,
        dloss: f32,
    ) {
        loss::cross_entropy_backward(dlogits, logits, targets, v, real(dloss as f64));
    }

    fn log_softmax(&self, out: &mut Vec<F>, logits: &Vec<F>, v: usize) {
        loss::log_softmax(out, logits, v);
    }

    fn adamw_step(
        &self,
        param: &mut Vec<F>,
        grad: &Vec<F>,
        m: &mut Vec<F>,
        v: &mut Vec<F>,
        hp: &AdamW,
    ) {
        adamw::step(param, grad, m, v, hp);
    }
}
