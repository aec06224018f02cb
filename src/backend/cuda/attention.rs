//! MEGABYTE's causal multi-head attention on the device, unfused: strided-batched GEMMs for
//! the products and row kernels (`kernels/softmax.cu`) for the softmax, with the `[b, h, t, t]`
//! probabilities materialised in device memory (the training contract of
//! [`Backend::attention_forward`](crate::backend::Backend::attention_forward) saves them for the
//! backward anyway). Also the row log-softmax. Nothing here touches the host.
//!
//! The heads of `qkv` `[b, t, 3c]` are addressed in place: head `i` of `q` is the `[t, c/h]`
//! matrix at element `i·c/h` with leading dimension `3c`, so (batch, head) pairs form a
//! two-level grid of equally strided matrices. cuBLAS batches over one stride, so each
//! product is one strided-batched GEMM per head over the batch (or per batch row over the
//! heads, whichever needs fewer calls).
//!
//! Under [`Precision::Bf16Gemm`] every product takes bf16 operands
//! ([`DeviceApi::gemm_strided_batched_bf16`], f32 accumulate and output): `qkv`, the
//! probabilities, `dout` and the score gradients are cast (`cast_f32_to_bf16`, round to
//! nearest even) into cached scratch right before the GEMMs that read them; the softmax and
//! every stored tensor stay f32.
//!
//! The score GEMMs compute the full `[t, t]` square although the softmax only reads the lower
//! triangle: twice the FLOPs of a causal product, the price of using plain GEMMs until the
//! fused kernels land (docs/perf.md §8).

use half::bf16;

use super::buffer::CudaBuf;
use super::scratch::Scratch;
use super::{CudaBackend, Precision};
use crate::cuda::launch::{self as launch_shapes, softmax as softmax_shape};
use crate::emu::{DeviceApi, MatrixLayout, StridedGemm};

/// Where the matrix of (batch row `bi`, head `hi`) of one operand starts:
/// `base + bi·per_batch + hi·per_head`, rows `ld` apart.
#[derive(Debug, Clone, Copy)]
struct HeadOperand {
    base: usize,
    ld: usize,
    per_batch: usize,
    per_head: usize,
}

impl HeadOperand {
    /// The layout of one strided-batched call: the `outer`-th head (batching over the batch
    /// rows) when `heads_outer`, else the `outer`-th batch row (batching over the heads).
    fn layout(self, outer: usize, heads_outer: bool) -> MatrixLayout {
        if heads_outer {
            MatrixLayout::new(self.base + outer * self.per_head, self.ld, self.per_batch)
        } else {
            MatrixLayout::new(self.base + outer * self.per_batch, self.ld, self.per_head)
        }
    }
}

/// The operands of causal attention at one shape.
#[derive(Debug, Clone, Copy)]
struct AttentionLayout {
    b: usize,
    t: usize,
    h: usize,
    hs: usize,
    c: usize,
}

impl AttentionLayout {
    fn new(b: usize, t: usize, c: usize, h: usize) -> Self {
        assert!(
            h > 0 && c % h == 0,
            "channels {c} must split evenly into {h} heads"
        );
        Self {
            b,
            t,
            h,
            hs: c / h,
            c,
        }
    }

    /// Part `part` (0 = q, 1 = k, 2 = v) of `[b, t, 3c]`.
    fn qkv(&self, part: usize) -> HeadOperand {
        HeadOperand {
            base: part * self.c,
            ld: 3 * self.c,
            per_batch: self.t * 3 * self.c,
            per_head: self.hs,
        }
    }

    /// `[b, t, c]` (out, dout).
    fn rows(&self) -> HeadOperand {
        HeadOperand {
            base: 0,
            ld: self.c,
            per_batch: self.t * self.c,
            per_head: self.hs,
        }
    }

    /// `[b, h, t, t]` (probabilities, scores and their gradients).
    fn square(&self) -> HeadOperand {
        HeadOperand {
            base: 0,
            ld: self.t,
            per_batch: self.h * self.t * self.t,
            per_head: self.t * self.t,
        }
    }

    /// Rows of all the `[t, t]` matrices together.
    fn square_rows(&self) -> usize {
        self.b * self.h * self.t
    }
}

/// One product over every (batch, head) pair: `out = alpha·op(a)·op(b) + beta·out`.
#[derive(Debug, Clone, Copy)]
struct HeadGemm {
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    out: HeadOperand,
    a: HeadOperand,
    b: HeadOperand,
    beta: f32,
}

/// The strided-batched GEMMs of `g` over every (batch, head) pair: one per head batched over
/// the batch rows, or one per batch row batched over the heads when that is fewer calls.
/// `offsets` (out, a, b) shift every matrix (views into larger allocations).
fn head_gemms(
    shape: AttentionLayout,
    g: HeadGemm,
    offsets: [usize; 3],
) -> impl Iterator<Item = StridedGemm> {
    let heads_outer = shape.h <= shape.b;
    let (outer, batch) = if heads_outer {
        (shape.h, shape.b)
    } else {
        (shape.b, shape.h)
    };
    (0..outer).map(move |i| {
        let shifted = |op: HeadOperand, offset: usize| {
            let mut layout = op.layout(i, heads_outer);
            layout.offset += offset;
            layout
        };
        StridedGemm {
            m: g.m,
            k: g.k,
            n: g.n,
            batch,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            a: shifted(g.a, offsets[1]),
            b: shifted(g.b, offsets[2]),
            out: shifted(g.out, offsets[0]),
            alpha: 1.0,
            beta: g.beta,
        }
    })
}

fn int(x: usize, what: &str) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("CUDA backend: {what} = {x} exceeds i32"))
}

impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    /// Runs `g` for every (batch, head) pair as strided-batched GEMMs on the f32 operands.
    fn head_gemm(
        &self,
        out: &mut CudaBuf<D>,
        a: &CudaBuf<D>,
        b: &CudaBuf<D>,
        shape: AttentionLayout,
        g: HeadGemm,
    ) {
        // The buffers may be views into larger allocations.
        let offsets = [out.offset(), a.offset(), b.offset()];
        for gemm in head_gemms(shape, g, offsets) {
            self.device
                .gemm_strided_batched_f32(out.allocation(), a.allocation(), b.allocation(), &gemm)
                .unwrap_or_else(|e| super::fail("attention gemm", e));
        }
    }

    /// [`Self::head_gemm`] on bf16 copies of the inputs (f32 accumulate into f32 `out`). The
    /// copies start at element 0 ([`Self::cast_to_bf16_scratch`]).
    fn head_gemm_bf16(
        &self,
        out: &mut CudaBuf<D>,
        a: &D::Buffer<bf16>,
        b: &D::Buffer<bf16>,
        shape: AttentionLayout,
        g: HeadGemm,
    ) {
        for gemm in head_gemms(shape, g, [out.offset(), 0, 0]) {
            self.device
                .gemm_strided_batched_bf16(out.allocation(), a, b, &gemm)
                .unwrap_or_else(|e| super::fail("attention bf16 gemm", e));
        }
    }

    /// A bf16 copy of `src` (round to nearest even, `cast_f32_to_bf16`) in cached scratch.
    fn cast_to_bf16_scratch(&self, src: &CudaBuf<D>) -> Scratch<'_, D, bf16> {
        let dst = self
            .scratch
            .take::<bf16>(&self.device, src.len())
            .unwrap_or_else(|e| super::fail("bf16 scratch", e));
        if !src.is_empty() {
            let n = src.len() as i64;
            self.run(
                "cast_f32_to_bf16",
                launch_shapes::elementwise(src.len()),
                &[&dst, src.block(), &n],
            );
        }
        dst
    }

    fn bf16_gemms(&self) -> bool {
        self.precision == Precision::Bf16Gemm
    }

    /// [`Backend::attention_forward`](crate::backend::Backend::attention_forward) on the
    /// device: `att = Q·Kᵀ` (all pairs), causal softmax of `scale·att` in place, `out = P·V`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_forward_on_device(
        &self,
        out: &mut CudaBuf<D>,
        att: &mut CudaBuf<D>,
        qkv: &CudaBuf<D>,
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: f32,
    ) {
        let s = AttentionLayout::new(b, t, c, h);
        assert_eq!(qkv.len(), b * t * 3 * c, "qkv must be [b, t, 3c]");
        assert_eq!(out.len(), b * t * c, "out must be [b, t, c]");
        assert_eq!(att.len(), b * h * t * t, "att must be [b, h, t, t]");
        if out.is_empty() {
            return;
        }
        let scores = HeadGemm {
            m: t,
            k: s.hs,
            n: t,
            trans_a: false,
            trans_b: true,
            out: s.square(),
            a: s.qkv(0),
            b: s.qkv(1),
            beta: 0.0,
        };
        let qkv16 = self.bf16_gemms().then(|| self.cast_to_bf16_scratch(qkv));
        match &qkv16 {
            Some(q16) => self.head_gemm_bf16(att, q16, q16, s, scores),
            None => self.head_gemm(att, qkv, qkv, s, scores),
        }
        let (rows, ti) = (int(s.square_rows(), "b·h·t"), int(t, "t"));
        let probs: &CudaBuf<D> = att;
        self.run(
            "causal_softmax_forward_f32",
            softmax_shape::rows(s.square_rows()),
            &[probs.block(), probs.block(), &rows, &ti, &scale],
        );
        let values = HeadGemm {
            m: t,
            k: t,
            n: s.hs,
            trans_a: false,
            trans_b: false,
            out: s.rows(),
            a: s.square(),
            b: s.qkv(2),
            beta: 0.0,
        };
        match &qkv16 {
            Some(q16) => {
                let p16 = self.cast_to_bf16_scratch(att);
                self.head_gemm_bf16(out, &p16, q16, s, values);
            }
            None => self.head_gemm(out, att, qkv, s, values),
        }
    }

    /// [`Backend::attention_backward`](crate::backend::Backend::attention_backward) on the
    /// device: `dP = dout·Vᵀ`, `dS = scale·P ⊙ (dP − rowsum(dP ⊙ P))` in place, then
    /// `dQ += dS·K`, `dK += dSᵀ·Q`, `dV += Pᵀ·dout`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_on_device(
        &self,
        dqkv: &mut CudaBuf<D>,
        dout: &CudaBuf<D>,
        qkv: &CudaBuf<D>,
        att: &CudaBuf<D>,
        b: usize,
        t: usize,
        c: usize,
        h: usize,
        scale: f32,
    ) {
        let s = AttentionLayout::new(b, t, c, h);
        assert_eq!(qkv.len(), b * t * 3 * c, "qkv must be [b, t, 3c]");
        assert_eq!(dqkv.len(), b * t * 3 * c, "dqkv must be [b, t, 3c]");
        assert_eq!(dout.len(), b * t * c, "dout must be [b, t, c]");
        assert_eq!(att.len(), b * h * t * t, "att must be [b, h, t, t]");
        if dout.is_empty() {
            return;
        }
        let mut ds = self.alloc(b * h * t * t);
        let dprobs = HeadGemm {
            m: t,
            k: s.hs,
            n: t,
            trans_a: false,
            trans_b: true,
            out: s.square(),
            a: s.rows(),
            b: s.qkv(2),
            beta: 0.0,
        };
        let inputs16 = self.bf16_gemms().then(|| {
            (
                self.cast_to_bf16_scratch(qkv),
                self.cast_to_bf16_scratch(dout),
            )
        });
        match &inputs16 {
            Some((q16, dout16)) => self.head_gemm_bf16(&mut ds, dout16, q16, s, dprobs),
            None => self.head_gemm(&mut ds, dout, qkv, s, dprobs),
        }
        let (rows, ti) = (int(s.square_rows(), "b·h·t"), int(t, "t"));
        self.run(
            "causal_softmax_backward_f32",
            softmax_shape::rows(s.square_rows()),
            &[ds.block(), att.block(), ds.block(), &rows, &ti, &scale],
        );
        // The three gradients accumulate into their parts of dqkv (beta = 1).
        let dq = HeadGemm {
            m: t,
            k: t,
            n: s.hs,
            trans_a: false,
            trans_b: false,
            out: s.qkv(0),
            a: s.square(),
            b: s.qkv(1),
            beta: 1.0,
        };
        let dk = HeadGemm {
            trans_a: true,
            out: s.qkv(1),
            b: s.qkv(0),
            ..dq
        };
        let dv = HeadGemm {
            trans_a: true,
            out: s.qkv(2),
            b: s.rows(),
            ..dq
        };
        match &inputs16 {
            Some((q16, dout16)) => {
                let (ds16, p16) = (
                    self.cast_to_bf16_scratch(&ds),
                    self.cast_to_bf16_scratch(att),
                );
                self.head_gemm_bf16(dqkv, &ds16, q16, s, dq);
                self.head_gemm_bf16(dqkv, &ds16, q16, s, dk);
                self.head_gemm_bf16(dqkv, &p16, dout16, s, dv);
            }
            None => {
                self.head_gemm(dqkv, &ds, qkv, s, dq);
                self.head_gemm(dqkv, &ds, qkv, s, dk);
                self.head_gemm(dqkv, att, dout, s, dv);
            }
        }
    }

    /// [`Backend::log_softmax`](crate::backend::Backend::log_softmax) on the device
    /// (`log_softmax_f32`, one warp per row).
    pub(super) fn log_softmax_on_device(
        &self,
        out: &mut CudaBuf<D>,
        logits: &CudaBuf<D>,
        v: usize,
    ) {
        assert!(v > 0, "vocabulary size must be positive");
        assert_eq!(
            logits.len() % v,
            0,
            "logits length must be a multiple of v = {v}"
        );
        assert_eq!(out.len(), logits.len(), "out must match logits");
        let rows = logits.len() / v;
        if rows == 0 {
            return;
        }
        let (rows_i, vi) = (int(rows, "rows"), int(v, "v"));
        self.run(
            "log_softmax_f32",
            softmax_shape::rows(rows),
            &[out.block(), logits.block(), &rows_i, &vi],
        );
    }
}
