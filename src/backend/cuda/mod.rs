//! The CUDA backend: [`Backend`] on any [`DeviceApi`] — cudarc on a GPU
//! ([`cudarc_device::CudarcDevice`]), or the CPU emulator ([`crate::emu::EmulatedDevice`]), so
//! the whole backend runs in `cargo test` without a GPU (design.md §4 item 3).
//!
//! Layers, top to bottom (docs/cuda-backend.md):
//! - this file: one method per op — kernel launches with the shapes of
//!   [`crate::cuda::launch`], matmuls and bias ops through the device GEMM, and the ops with no
//!   kernel yet through [`host_fallback`] (listed in [`host_fallback::HOST_FALLBACKS`]);
//! - [`buffer::CudaBuf`]: f32 buffers carved from a size-class [`pool::MemoryPool`];
//! - [`DeviceApi`]: allocate, copy, launch by name, events, GEMM.
//!
//! Index arrays (ids, positions, scatter plans) are uploaded per call into cached `u32`
//! scratch buffers ([`scratch::ScratchPool`]), as are the f64 reduction buffers and bf16 casts.
//! Device errors inside an op are internal failures (a kernel that faults, a lost device) and
//! panic with the device's message; shapes a kernel cannot launch fall back to the host.

pub mod arena;
mod attention;
pub mod buffer;
pub mod cublaslt;
pub mod cudarc_device;
pub mod elementwise;
pub mod free_lists;
pub mod host_fallback;
pub mod matmul;
pub mod mega_attention;
pub mod module_cache;
pub mod paged_attention;
pub mod pool;
pub mod scratch;
pub mod shadow;
pub mod shapes;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{
    Activation, AdamW, Backend, CemaWeightGrads, CemaWeights, ChunkCallError, MegaAttnShape,
    TsnStats,
};
use crate::cuda::launch::{self as launch_shapes, norms::Norm, LaunchShape};
use crate::cuda::scatter_plan::{self, RowScatterPlan};
use crate::emu::{DeviceApi, DeviceError, GemmShape, KernelArg, LaunchConfig, StreamId};
pub use buffer::{CudaBuf, NullArg};
use free_lists::StreamGate;
pub use matmul::Precision;
pub use pool::{MemoryPool, PoolStats};
pub use shadow::Bf16OperandStats;

/// [`Backend`] over the device `D`.
pub struct CudaBackend<D: DeviceApi> {
    device: Arc<D>,
    pool: Arc<MemoryPool<D>>,
    fallbacks: Mutex<BTreeMap<&'static str, u64>>,
    precision: Precision,
    bf16_scratch: matmul::Bf16Scratch<D>,
    scratch: scratch::ScratchPool<D>,
    /// The stream work goes to, shared with the pools (see [`Backend::fork`]).
    gate: Arc<StreamGate>,
    /// Whether [`Backend::join`] makes the main stream wait for the side stream; off only in
    /// the test that proves the emulator's hazard checker catches the missing wait.
    join_waits: AtomicBool,
    /// What [`Backend::overlaps_streams`] answers (`--stream-overlap`).
    stream_overlap: AtomicBool,
}

impl<D: DeviceApi> Drop for CudaBackend<D> {
    fn drop(&mut self) {
        // The pools free their buffers next, each on the stream that allocated it; a buffer
        // may still be in use by the other stream's work, so let all work finish first.
        // Nothing useful can be done with an error here (the device is gone either way).
        let _ = self.device.synchronize();
    }
}

fn fail(what: &str, e: DeviceError) -> ! {
    panic!("CUDA backend: {what}: {e}")
}

impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    /// A backend on `device` with an empty pool and f32 matmuls (see
    /// [`CudaBackend::with_precision`]).
    pub fn new(device: D) -> Self {
        let gate = Arc::new(StreamGate::new());
        Self {
            device: Arc::new(device),
            pool: Arc::new(MemoryPool::with_gate(gate.clone())),
            fallbacks: Mutex::new(BTreeMap::new()),
            precision: Precision::F32,
            bf16_scratch: matmul::Bf16Scratch::default(),
            scratch: scratch::ScratchPool::with_gate(gate.clone()),
            gate,
            join_waits: AtomicBool::new(true),
            stream_overlap: AtomicBool::new(true),
        }
    }

    /// Whether callers should overlap work on the two streams (on by default): MEGABYTE's
    /// decoder then runs global steps on the side stream, landing them in the next call
    /// (docs/cuda-backend.md, "Streams"). Off, every step runs in order on the main stream;
    /// worth comparing on a GPU where both steps are bandwidth-bound (docs/perf.md §8.6).
    pub fn set_stream_overlap(&self, on: bool) {
        self.stream_overlap.store(on, Ordering::Relaxed);
    }

    /// Debugging: `false` makes [`Backend::join`] skip the main stream's wait for the side
    /// stream, a planted synchronisation bug that the emulator's hazard checker must report
    /// (tests/engine_streams.rs). Never turn it off otherwise.
    pub fn set_join_waits(&self, wait: bool) {
        self.join_waits.store(wait, Ordering::Relaxed);
    }

    /// Switches the device and the pools to `stream`.
    fn switch_stream(&self, stream: StreamId) {
        self.device
            .set_stream(stream)
            .unwrap_or_else(|e| fail("set stream", e));
        self.gate.switch_to(stream);
    }

    /// Makes the current stream's later work follow the work issued so far on `from`.
    fn order_after(&self, from: StreamId) {
        let to = self.device.stream();
        self.device
            .set_stream(from)
            .unwrap_or_else(|e| fail("set stream", e));
        let event = self
            .device
            .record_event()
            .unwrap_or_else(|e| fail("record event", e));
        self.device
            .set_stream(to)
            .unwrap_or_else(|e| fail("set stream", e));
        self.device
            .wait_event(&event)
            .unwrap_or_else(|e| fail("wait event", e));
    }

    /// The device layer.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The memory pool's accounting.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// How the cached non-f32 scratch (index arrays, reduction buffers, bf16 casts) was
    /// served: device allocations vs reuses.
    pub fn scratch_stats(&self) -> scratch::ScratchStats {
        self.scratch.stats()
    }

    /// How often each host-fallback op ran since the backend was made (or last reset).
    pub fn host_fallback_calls(&self) -> BTreeMap<&'static str, u64> {
        self.fallbacks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Clears the host-fallback counters.
    pub fn reset_host_fallback_calls(&self) {
        self.fallbacks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn count_fallback(&self, op: &'static str) {
        *self
            .fallbacks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(op)
            .or_default() += 1;
    }

    /// A buffer of `len` elements with unspecified contents.
    fn alloc(&self, len: usize) -> CudaBuf<D> {
        let block = self
            .pool
            .take(&self.device, len)
            .unwrap_or_else(|e| fail("allocation", e));
        CudaBuf::new(block, len, self.pool.clone())
    }

    fn to_host(&self, buf: &CudaBuf<D>) -> Vec<f32> {
        if !buf.is_sole_view() {
            // A view of an arena: copy it out on the device first, so the download moves
            // the view's bytes only, not the whole arena.
            let mut staging = self.alloc(buf.len());
            self.copy_on_device(&mut staging, buf);
            return self.to_host(&staging);
        }
        let mut host = self
            .device
            .download(buf.allocation())
            .unwrap_or_else(|e| fail("download", e));
        host.truncate(buf.len());
        host
    }

    fn write_host(&self, buf: &mut CudaBuf<D>, host: &[f32]) {
        use crate::emu::DeviceBuffer;
        assert_eq!(host.len(), buf.len(), "write: length mismatch");
        let Some(block) = buf.sole_allocation_mut() else {
            // A view of an arena: upload into a pooled block, then one device copy.
            let mut staging = self.alloc(host.len());
            self.write_host(&mut staging, host);
            return self.copy_on_device(buf, &staging);
        };
        let capacity = block.len();
        // DeviceApi writes whole allocations; the slack past `len` gets zeros.
        let result = if capacity == host.len() {
            self.device.write(host, block)
        } else {
            let mut padded = Vec::with_capacity(capacity);
            padded.extend_from_slice(host);
            padded.resize(capacity, 0.0);
            self.device.write(&padded, block)
        };
        result.unwrap_or_else(|e| fail("upload", e));
    }

    /// An index array on the device, in a cached scratch buffer (at least one size class:
    /// kernels never read past the count they are given).
    fn indices(&self, host: &[u32]) -> scratch::Scratch<'_, D, u32> {
        self.scratch
            .upload(&self.device, host)
            .unwrap_or_else(|e| fail("index upload", e))
    }

    fn run(&self, kernel: &str, shape: LaunchShape, args: &[&dyn KernelArg]) {
        let config = LaunchConfig::new(shape.grid, shape.block, shape.shared_mem_bytes);
        self.device
            .launch(kernel, config, args)
            .unwrap_or_else(|e| fail(kernel, e));
    }

    fn gemm(&self, out: &mut CudaBuf<D>, a: &CudaBuf<D>, b: &CudaBuf<D>, shape: GemmShape) {
        out.invalidate_shadow();
        assert!(
            out.len() >= shape.m * shape.n
                && a.len() >= shape.m * shape.k
                && b.len() >= shape.k * shape.n,
            "matmul {}x{}x{}: buffers of {}, {}, {}",
            shape.m,
            shape.k,
            shape.n,
            out.len(),
            a.len(),
            b.len()
        );
        self.device
            .gemm_f32_at(out.at(), a.at(), b.at(), shape)
            .unwrap_or_else(|e| fail("gemm", e));
    }

    fn ones(&self, n: usize) -> CudaBuf<D> {
        let mut b = self.alloc(n);
        self.fill_on_device(&mut b, 1.0);
        b
    }

    /// `dst[r] += Σ src[sources of r]` in plan order (`rows_scatter_add_csr_f32`).
    fn scatter_add(&self, dst: &mut CudaBuf<D>, src: &CudaBuf<D>, plan: &RowScatterPlan, w: usize) {
        let offsets = self.indices(&plan.offsets);
        let sources = self.indices(&plan.sources);
        let (n_dst, wi) = (plan.n_dst() as i32, w as i32);
        self.run(
            "rows_scatter_add_csr_f32",
            launch_shapes::gathers::rows(plan.n_dst()),
            &[dst.block(), src.block(), &offsets, &sources, &n_dst, &wi],
        );
    }
}

fn plan_or_panic<T>(r: Result<T, scatter_plan::ScatterPlanError>) -> T {
    r.unwrap_or_else(|e| panic!("CUDA backend: scatter plan: {e}"))
}

fn opt<'a, D: DeviceApi>(b: Option<&'a CudaBuf<D>>, null: &'a NullArg<f32>) -> &'a dyn KernelArg {
    match b {
        Some(b) => b.block(),
        None => null,
    }
}

impl<D> Backend for CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    type Buf = CudaBuf<D>;
    type MegaAttnSaved = mega_attention::DeviceMegaAttnSaved<D>;
    type ChunkCache = mega_attention::DeviceChunkCache<D>;

    fn name(&self) -> String {
        format!("cuda ({})", self.device.name())
    }

    // ---- streams ----------------------------------------------------------------------

    fn fork<R>(&self, side: impl FnOnce() -> R) -> R {
        if self.gate.stream() == StreamId::Side {
            // Already on the side stream: in order with the enclosing fork's work.
            return side();
        }
        self.switch_stream(StreamId::Side);
        self.order_after(StreamId::Main);
        let result = side();
        self.switch_stream(StreamId::Main);
        result
    }

    fn overlaps_streams(&self) -> bool {
        self.stream_overlap.load(Ordering::Relaxed)
    }

    fn join(&self) {
        // Inside a fork's closure the side stream is current and in order with itself.
        if !self.gate.fork_open() || self.gate.stream() == StreamId::Side {
            return;
        }
        if self.join_waits.load(Ordering::Relaxed) {
            self.order_after(StreamId::Side);
        }
        self.gate.close();
        self.pool.release_held();
        self.scratch.release_held();
    }

    // ---- memory -------------------------------------------------------------------------

    fn zeros(&self, n: usize) -> CudaBuf<D> {
        let mut b = self.alloc(n);
        self.fill_zero(&mut b);
        b
    }

    fn zeros_many(&self, lens: &[usize]) -> Vec<CudaBuf<D>> {
        self.zeros_in_arena(lens)
    }

    fn upload_many(&self, hosts: &[&[f32]]) -> Vec<CudaBuf<D>> {
        self.upload_to_arena(hosts)
    }

    fn upload(&self, host: &[f32]) -> CudaBuf<D> {
        let mut b = self.alloc(host.len());
        self.write_host(&mut b, host);
        b
    }

    fn download(&self, buf: &CudaBuf<D>) -> Vec<f32> {
        self.to_host(buf)
    }

    fn len(&self, buf: &CudaBuf<D>) -> usize {
        buf.len()
    }

    fn copy(&self, dst: &mut CudaBuf<D>, src: &CudaBuf<D>) {
        self.copy_on_device(dst, src);
    }

    fn fill_zero(&self, buf: &mut CudaBuf<D>) {
        self.fill_zero_on_device(buf);
    }

    fn add_assign(&self, dst: &mut CudaBuf<D>, src: &CudaBuf<D>) {
        self.add_assign_on_device(dst, src);
    }

    fn scale(&self, buf: &mut CudaBuf<D>, s: f32) {
        self.scale_on_device(buf, s);
    }

    fn sum_squares(&self, buf: &CudaBuf<D>) -> f64 {
        self.sum_on_device(buf, true)
    }

    fn sum(&self, buf: &CudaBuf<D>) -> f64 {
        self.sum_on_device(buf, false)
    }

    fn gather_rows(&self, out: &mut CudaBuf<D>, src: &CudaBuf<D>, rows: &[u32], d: usize) {
        assert_eq!(out.len(), rows.len() * d, "gather_rows: output length");
        self.embedding_forward(out, src, rows, d, false);
    }

    fn scatter_rows(&self, dst: &mut CudaBuf<D>, src: &CudaBuf<D>, rows: &[u32], d: usize) {
        self.scatter_rows_on_device(dst, src, rows, d);
    }

    // ---- dense ----------------------------------------------------------------------------

    fn matmul(
        &self,
        out: &mut CudaBuf<D>,
        a: &CudaBuf<D>,
        b: &CudaBuf<D>,
        m: usize,
        k: usize,
        n: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) {
        let shape = GemmShape {
            m,
            k,
            n,
            trans_a,
            trans_b,
            accumulate,
        };
        self.matmul_at_precision(out, a, b, shape);
    }

    fn add_bias(&self, out: &mut CudaBuf<D>, bias: &CudaBuf<D>, n: usize, d: usize) {
        // out[n, d] += 1[n, 1] · bias[1, d]: a rank-1 GEMM, exact (one product by 1 per sum).
        let ones = self.ones(n);
        let shape = GemmShape {
            m: n,
            k: 1,
            n: d,
            trans_a: false,
            trans_b: false,
            accumulate: true,
        };
        self.gemm(out, &ones, bias, shape);
    }

    fn bias_backward(&self, dbias: &mut CudaBuf<D>, dout: &CudaBuf<D>, n: usize, d: usize) {
        // dbias[1, d] += 1[1, n] · dout[n, d]: the column sums as a GEMM.
        let ones = self.ones(n);
        let shape = GemmShape {
            m: 1,
            k: n,
            n: d,
            trans_a: false,
            trans_b: false,
            accumulate: true,
        };
        self.gemm(dbias, &ones, dout, shape);
    }

    // ---- normalization --------------------------------------------------------------------

    fn layernorm_forward(
        &self,
        out: &mut CudaBuf<D>,
        mean: &mut CudaBuf<D>,
        rstd: &mut CudaBuf<D>,
        x: &CudaBuf<D>,
        w: &CudaBuf<D>,
        b: &CudaBuf<D>,
        n: usize,
        d: usize,
        eps: f32,
    ) {
        let (ni, di) = (n as i32, d as i32);
        self.run(
            "layernorm_forward_f32",
            launch_shapes::norms::forward(n),
            &[
                out.block(),
                mean.block(),
                rstd.block(),
                x.block(),
                w.block(),
                b.block(),
                &ni,
                &di,
                &eps,
            ],
        );
    }

    fn layernorm_backward(
        &self,
        dx: &mut CudaBuf<D>,
        dw: &mut CudaBuf<D>,
        db: &mut CudaBuf<D>,
        dout: &CudaBuf<D>,
        x: &CudaBuf<D>,
        w: &CudaBuf<D>,
        mean: &CudaBuf<D>,
        rstd: &CudaBuf<D>,
        n: usize,
        d: usize,
    ) {
        let Ok(shape) = launch_shapes::norms::backward(Norm::LayerNorm, n, d) else {
            return self.host_fallback(
                "layernorm_backward",
                [dx, dw, db],
                &[dout, x, w, mean, rstd],
                |cpu, [dx, dw, db], i| {
                    cpu.layernorm_backward(dx, dw, db, &i[0], &i[1], &i[2], &i[3], &i[4], n, d)
                },
            );
        };
        let partials = self.alloc(launch_shapes::norms::partials_len(Norm::LayerNorm, n, d));
        let (ni, di) = (n as i32, d as i32);
        let chunks = launch_shapes::norms::backward_chunks(n) as i32;
        self.run(
            "layernorm_backward_f32",
            shape,
            &[
                dx.block(),
                partials.block(),
                dout.block(),
                x.block(),
                w.block(),
                mean.block(),
                rstd.block(),
                &ni,
                &di,
            ],
        );
        self.run(
            "layernorm_param_reduce_f32",
            launch_shapes::norms::param_reduce(d),
            &[dw.block(), db.block(), partials.block(), &chunks, &di],
        );
    }

    fn rmsnorm_forward(
        &self,
        out: &mut CudaBuf<D>,
        rstd: &mut CudaBuf<D>,
        x: &CudaBuf<D>,
        w: &CudaBuf<D>,
        n: usize,
        d: usize,
        eps: f32,
    ) {
        let (ni, di) = (n as i32, d as i32);
        self.run(
            "rmsnorm_forward_f32",
            launch_shapes::norms::forward(n),
            &[
                out.block(),
                rstd.block(),
                x.block(),
                w.block(),
                &ni,
                &di,
                &eps,
            ],
        );
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut CudaBuf<D>,
        dw: &mut CudaBuf<D>,
        dout: &CudaBuf<D>,
        x: &CudaBuf<D>,
        w: &CudaBuf<D>,
        rstd: &CudaBuf<D>,
        n: usize,
        d: usize,
    ) {
        let Ok(shape) = launch_shapes::norms::backward(Norm::RmsNorm, n, d) else {
            return self.host_fallback(
                "rmsnorm_backward",
                [dx, dw],
                &[dout, x, w, rstd],
                |cpu, [dx, dw], i| cpu.rmsnorm_backward(dx, dw, &i[0], &i[1], &i[2], &i[3], n, d),
            );
        };
        let partials = self.alloc(launch_shapes::norms::partials_len(Norm::RmsNorm, n, d));
        let (ni, di) = (n as i32, d as i32);
        let chunks = launch_shapes::norms::backward_chunks(n) as i32;
        self.run(
            "rmsnorm_backward_f32",
            shape,
            &[
                dx.block(),
                partials.block(),
                dout.block(),
                x.block(),
                w.block(),
                rstd.block(),
                &ni,
                &di,
            ],
        );
        self.run(
            "rmsnorm_param_reduce_f32",
            launch_shapes::norms::param_reduce(d),
            &[dw.block(), partials.block(), &chunks, &di],
        );
    }

    // ---- pointwise ------------------------------------------------------------------------

    fn activation_forward(&self, act: Activation, out: &mut CudaBuf<D>, x: &CudaBuf<D>) {
        assert_eq!(out.len(), x.len(), "activation_forward: length mismatch");
        let (n, id) = (x.len() as i64, launch_shapes::activations::act_id(act));
        self.run(
            "activation_forward_f32",
            launch_shapes::activations::activation(x.len()),
            &[out.block(), x.block(), &n, &id],
        );
    }

    fn activation_backward(
        &self,
        act: Activation,
        dx: &mut CudaBuf<D>,
        x: &CudaBuf<D>,
        dout: &CudaBuf<D>,
    ) {
        assert!(
            dx.len() == x.len() && dout.len() == x.len(),
            "activation_backward: lengths"
        );
        let (n, id) = (x.len() as i64, launch_shapes::activations::act_id(act));
        self.run(
            "activation_backward_f32",
            launch_shapes::activations::activation(x.len()),
            &[dx.block(), x.block(), dout.block(), &n, &id],
        );
    }

    fn mul(&self, out: &mut CudaBuf<D>, a: &CudaBuf<D>, b: &CudaBuf<D>) {
        self.mul_on_device(out, a, b);
    }

    fn add_scalar(&self, out: &mut CudaBuf<D>, x: &CudaBuf<D>, s: f32) {
        self.add_scalar_on_device(out, x, s);
    }

    fn swiglu_forward(&self, out: &mut CudaBuf<D>, x: &CudaBuf<D>, n: usize, h: usize) {
        let (ni, hi) = (n as i32, h as i32);
        self.run(
            "swiglu_forward_f32",
            launch_shapes::activations::swiglu(n, h),
            &[out.block(), x.block(), &ni, &hi],
        );
    }

    fn swiglu_backward(
        &self,
        dx: &mut CudaBuf<D>,
        x: &CudaBuf<D>,
        dout: &CudaBuf<D>,
        n: usize,
        h: usize,
    ) {
        let (ni, hi) = (n as i32, h as i32);
        self.run(
            "swiglu_backward_f32",
            launch_shapes::activations::swiglu(n, h),
            &[dx.block(), x.block(), dout.block(), &ni, &hi],
        );
    }

    // ---- attention ------------------------------------------------------------------------

    fn attention_forward(
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
        self.attention_forward_on_device(out, att, qkv, b, t, c, h, scale);
    }

    fn attention_backward(
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
        self.attention_backward_on_device(dqkv, dout, qkv, att, b, t, c, h, scale);
    }

    fn attention_decode(
        &self,
        out: &mut CudaBuf<D>,
        qkv: &CudaBuf<D>,
        k_cache: &CudaBuf<D>,
        v_cache: &CudaBuf<D>,
        lens: &[u32],
        block_table: &[u32],
        block_size: usize,
        c: usize,
        h: usize,
        scale: f32,
    ) {
        self.attention_decode_on_device(
            out,
            qkv,
            k_cache,
            v_cache,
            lens,
            block_table,
            block_size,
            c,
            h,
            scale,
        );
    }

    fn kv_append(
        &self,
        k_cache: &mut CudaBuf<D>,
        v_cache: &mut CudaBuf<D>,
        qkv: &CudaBuf<D>,
        entries: &[u32],
        c: usize,
    ) {
        self.kv_append_on_device(k_cache, v_cache, qkv, entries, c);
    }

    // ---- MEGALODON ------------------------------------------------------------------------

    fn timestep_norm_forward(
        &self,
        y: &mut CudaBuf<D>,
        saved_mean: &mut CudaBuf<D>,
        saved_rstd: &mut CudaBuf<D>,
        state_out: Option<&mut TsnStats<CudaBuf<D>>>,
        x: &CudaBuf<D>,
        w: &CudaBuf<D>,
        bias: &CudaBuf<D>,
        state_in: Option<&TsnStats<CudaBuf<D>>>,
        b: usize,
        l: usize,
        d: usize,
        g: usize,
        eps: f32,
    ) {
        let rows = b * l;
        let shapes = launch_shapes::timestep_norm::group_pass(rows, d, g)
            .and_then(|p| Ok((p, launch_shapes::timestep_norm::scan(b, g)?)));
        let Ok((pass, scan)) = shapes else {
            return self.tsn_forward_on_host(
                y, saved_mean, saved_rstd, state_out, x, w, bias, state_in, b, l, d, g, eps,
            );
        };
        let (ri, di, gi, bi, li) = (rows as i32, d as i32, g as i32, b as i32, l as i32);
        self.run(
            "tsn_group_moments_f32",
            pass,
            &[
                saved_mean.block(),
                saved_rstd.block(),
                x.block(),
                &ri,
                &di,
                &gi,
            ],
        );
        let null = NullArg::<f32>::new();
        let out = state_out.map(|s| &*s);
        self.run(
            "tsn_scan_f32",
            scan,
            &[
                saved_mean.block(),
                saved_rstd.block(),
                opt(out.map(|s| &s.count), &null),
                opt(out.map(|s| &s.mean), &null),
                opt(out.map(|s| &s.var), &null),
                opt(state_in.map(|s| &s.count), &null),
                opt(state_in.map(|s| &s.mean), &null),
                opt(state_in.map(|s| &s.var), &null),
                &bi,
                &li,
                &gi,
                &eps,
            ],
        );
        self.run(
            "tsn_normalize_f32",
            launch_shapes::timestep_norm::normalize(rows, d),
            &[
                y.block(),
                x.block(),
                w.block(),
                bias.block(),
                saved_mean.block(),
                saved_rstd.block(),
                &ri,
                &di,
                &gi,
            ],
        );
    }

    fn timestep_norm_backward(
        &self,
        dx: &mut CudaBuf<D>,
        dw: &mut CudaBuf<D>,
        db: &mut CudaBuf<D>,
        dstate_in: Option<(&mut CudaBuf<D>, &mut CudaBuf<D>)>,
        dy: &CudaBuf<D>,
        dstate_out: Option<(&CudaBuf<D>, &CudaBuf<D>)>,
        x: &CudaBuf<D>,
        w: &CudaBuf<D>,
        saved_mean: &CudaBuf<D>,
        saved_rstd: &CudaBuf<D>,
        state_in: Option<&TsnStats<CudaBuf<D>>>,
        b: usize,
        l: usize,
        d: usize,
        g: usize,
    ) {
        use launch_shapes::timestep_norm as tsn;
        let rows = b * l;
        let shapes = tsn::group_pass(rows, d, g)
            .and_then(|p| Ok((p, tsn::scan(b, g)?, tsn::backward_dx(rows, d)?)));
        let Ok((pass, scan, dx_shape)) = shapes else {
            return self.tsn_backward_on_host(
                dx, dw, db, dstate_in, dy, dstate_out, x, w, saved_mean, saved_rstd, state_in, b,
                l, d, g,
            );
        };
        let (ri, di, gi, bi, li) = (rows as i32, d as i32, g as i32, b as i32, l as i32);
        let sums = self.alloc(tsn::sums_len(rows, g).max(1));
        self.run(
            "tsn_backward_group_sums_f32",
            pass,
            &[
                sums.block(),
                dy.block(),
                x.block(),
                w.block(),
                saved_mean.block(),
                &ri,
                &di,
                &gi,
            ],
        );
        let null = NullArg::<f32>::new();
        let din = dstate_in.as_ref().map(|(m, v)| (&**m, &**v));
        self.run(
            "tsn_backward_scan_f32",
            scan,
            &[
                sums.block(),
                opt(din.map(|p| p.0), &null),
                opt(din.map(|p| p.1), &null),
                opt(dstate_out.map(|p| p.0), &null),
                opt(dstate_out.map(|p| p.1), &null),
                saved_mean.block(),
                saved_rstd.block(),
                opt(state_in.map(|s| &s.count), &null),
                opt(state_in.map(|s| &s.mean), &null),
                &bi,
                &li,
                &gi,
            ],
        );
        let partials = self.alloc(tsn::dx_partials_len(rows, d));
        let rpc = tsn::dx_rows_per_chunk(rows, d) as i32;
        let chunks = tsn::dx_chunks(rows, d) as i32;
        self.run(
            "tsn_backward_dx_f32",
            dx_shape,
            &[
                dx.block(),
                partials.block(),
                dy.block(),
                x.block(),
                w.block(),
                saved_mean.block(),
                saved_rstd.block(),
                sums.block(),
                &ri,
                &di,
                &gi,
                &rpc,
            ],
        );
        self.run(
            "tsn_backward_param_reduce_f32",
            tsn::param_reduce(d),
            &[dw.block(), db.block(), partials.block(), &chunks, &di],
        );
    }

    fn timestep_norm_step(
        &self,
        y: &mut CudaBuf<D>,
        state: &mut TsnStats<CudaBuf<D>>,
        x: &CudaBuf<D>,
        w: &CudaBuf<D>,
        bias: &CudaBuf<D>,
        b: usize,
        d: usize,
        g: usize,
        eps: f32,
    ) {
        let (bi, di, gi) = (b as i32, d as i32, g as i32);
        self.run(
            "tsn_step_f32",
            launch_shapes::timestep_norm::step(b),
            &[
                y.block(),
                state.count.block(),
                state.mean.block(),
                state.var.block(),
                x.block(),
                w.block(),
                bias.block(),
                &bi,
                &di,
                &gi,
                &eps,
            ],
        );
    }

    fn cema_forward(
        &self,
        y: &mut CudaBuf<D>,
        h_out: Option<&mut CudaBuf<D>>,
        x: &CudaBuf<D>,
        p: &CemaWeights<CudaBuf<D>>,
        h0: Option<&CudaBuf<D>>,
        b: usize,
        l: usize,
        d: usize,
        n: usize,
    ) {
        let Ok(shape) = launch_shapes::cema::forward(b, d, n) else {
            return self.cema_forward_on_host(y, h_out, x, p, h0, b, l, d, n);
        };
        let null = NullArg::<f32>::new();
        let (bi, li, di, ni) = (b as i32, l as i32, d as i32, n as i32);
        let h_out = h_out.map(|h| &*h);
        self.run(
            "cema_forward_f32",
            shape,
            &[
                y.block(),
                opt(h_out, &null),
                &null,
                x.block(),
                p.alpha.block(),
                p.delta.block(),
                p.theta.block(),
                p.gamma.block(),
                p.omega.block(),
                opt(h0, &null),
                &bi,
                &li,
                &di,
                &ni,
            ],
        );
    }

    fn cema_backward(
        &self,
        dx: &mut CudaBuf<D>,
        g: &mut CemaWeightGrads<CudaBuf<D>>,
        dh0: Option<&mut CudaBuf<D>>,
        dy: &CudaBuf<D>,
        dh_out: Option<&CudaBuf<D>>,
        x: &CudaBuf<D>,
        p: &CemaWeights<CudaBuf<D>>,
        h0: Option<&CudaBuf<D>>,
        b: usize,
        l: usize,
        d: usize,
        n: usize,
    ) {
        use launch_shapes::cema;
        let shapes = cema::forward(b, d, n).and_then(|f| Ok((f, cema::backward(d, n)?)));
        let Ok((fwd, bwd)) = shapes else {
            return self.cema_backward_on_host(dx, g, dh0, dy, dh_out, x, p, h0, b, l, d, n);
        };
        let null = NullArg::<f32>::new();
        let (bi, li, di, ni) = (b as i32, l as i32, d as i32, n as i32);
        // The seam does not carry the forward's chunk states to the backward: recompute them
        // (a forward without y and h_out only writes the states, about a third of its cost).
        let states = self.alloc(cema::chunk_states_len(b, l, d, n).max(1));
        self.run(
            "cema_forward_f32",
            fwd,
            &[
                &null,
                &null,
                states.block(),
                x.block(),
                p.alpha.block(),
                p.delta.block(),
                p.theta.block(),
                p.gamma.block(),
                p.omega.block(),
                opt(h0, &null),
                &bi,
                &li,
                &di,
                &ni,
            ],
        );
        let dh0 = dh0.map(|h| &*h);
        self.run(
            "cema_backward_f32",
            bwd,
            &[
                dx.block(),
                g.alpha.block(),
                g.delta.block(),
                g.theta.block(),
                g.gamma.block(),
                g.omega.block(),
                opt(dh0, &null),
                dy.block(),
                opt(dh_out, &null),
                x.block(),
                p.alpha.block(),
                p.delta.block(),
                p.theta.block(),
                p.gamma.block(),
                p.omega.block(),
                states.block(),
                &bi,
                &li,
                &di,
                &ni,
            ],
        );
    }

    fn cema_step(
        &self,
        y: &mut CudaBuf<D>,
        h: &mut CudaBuf<D>,
        x: &CudaBuf<D>,
        p: &CemaWeights<CudaBuf<D>>,
        b: usize,
        d: usize,
        n: usize,
    ) {
        use launch_shapes::cema;
        let coef = self.alloc(d * n * cema::STEP_COEF_FLOATS);
        let (bi, di, ni) = (b as i32, d as i32, n as i32);
        self.run(
            "cema_coefficients_f32",
            cema::coefficients(d, n),
            &[
                coef.block(),
                p.alpha.block(),
                p.delta.block(),
                p.theta.block(),
                p.gamma.block(),
                &di,
                &ni,
            ],
        );
        self.run(
            "cema_step_f32",
            cema::step(b, d),
            &[
                y.block(),
                h.block(),
                x.block(),
                coef.block(),
                p.omega.block(),
                &bi,
                &di,
                &ni,
            ],
        );
    }

    fn mega_attention_saved(&self, _s: &MegaAttnShape) -> Self::MegaAttnSaved {
        mega_attention::DeviceMegaAttnSaved::new()
    }

    fn mega_attention_forward(
        &self,
        out: &mut CudaBuf<D>,
        saved: &mut Self::MegaAttnSaved,
        z: &CudaBuf<D>,
        v: &CudaBuf<D>,
        gamma: &CudaBuf<D>,
        beta: &CudaBuf<D>,
        s: &MegaAttnShape,
    ) {
        self.mega_attention_forward_on_device(out, saved, z, v, gamma, beta, s);
    }

    fn mega_attention_backward(
        &self,
        dz: &mut CudaBuf<D>,
        dv: &mut CudaBuf<D>,
        dgamma: &mut CudaBuf<D>,
        dbeta: &mut CudaBuf<D>,
        dout: &CudaBuf<D>,
        z: &CudaBuf<D>,
        _v: &CudaBuf<D>,
        gamma: &CudaBuf<D>,
        _beta: &CudaBuf<D>,
        saved: &Self::MegaAttnSaved,
        s: &MegaAttnShape,
    ) {
        // V, β: the forward saved V head-major, and β has no part in any gradient.
        self.mega_attention_backward_on_device(dz, dv, dgamma, dbeta, dout, z, gamma, saved, s);
    }

    fn chunk_cache(
        &self,
        b: usize,
        heads: usize,
        dz: usize,
        dv: usize,
        chunk: usize,
    ) -> Self::ChunkCache {
        self.device_chunk_cache(b, heads, dz, dv, chunk)
    }

    fn chunk_cache_copy_row(
        &self,
        dst: &mut Self::ChunkCache,
        dst_row: usize,
        src: &Self::ChunkCache,
        src_row: usize,
    ) {
        self.device_chunk_cache_copy_row(dst, dst_row, src, src_row);
    }

    fn mega_attention_forward_cached(
        &self,
        out: &mut CudaBuf<D>,
        cache: &mut Self::ChunkCache,
        z: &CudaBuf<D>,
        v: &CudaBuf<D>,
        gamma: &CudaBuf<D>,
        beta: &CudaBuf<D>,
        s: &MegaAttnShape,
    ) -> Result<(), ChunkCallError> {
        self.mega_attention_forward_cached_on_device(out, cache, z, v, gamma, beta, s)
    }

    // ---- embeddings -----------------------------------------------------------------------

    fn embedding_forward(
        &self,
        out: &mut CudaBuf<D>,
        table: &CudaBuf<D>,
        ids: &[u32],
        d: usize,
        accumulate: bool,
    ) {
        assert!(
            d > 0 && table.len() % d == 0,
            "embedding: table is not rows of {d}"
        );
        let ids_buf = self.indices(ids);
        let (n, di, vocab) = (ids.len() as i32, d as i32, (table.len() / d) as i32);
        let acc = i32::from(accumulate);
        self.run(
            "embedding_forward_f32",
            shapes::embedding_forward(ids.len()),
            &[out.block(), table.block(), &ids_buf, &n, &di, &vocab, &acc],
        );
    }

    fn embedding_backward(
        &self,
        dtable: &mut CudaBuf<D>,
        dout: &CudaBuf<D>,
        ids: &[u32],
        d: usize,
    ) {
        // The CSR scatter adds each table row's tokens in token order, as the CPU op does,
        // for any table size (the shared-memory tile kernels cap the vocabulary).
        let rows = dtable.len() / d.max(1);
        let plan = plan_or_panic(RowScatterPlan::new("embedding ids", rows, ids.len(), |i| {
            Some(ids[i] as usize)
        }));
        self.scatter_add(dtable, dout, &plan, d);
    }

    fn patch_embed_forward(
        &self,
        out: &mut CudaBuf<D>,
        tok: &CudaBuf<D>,
        pos: &CudaBuf<D>,
        pad: &CudaBuf<D>,
        ids: &[u32],
        positions: &[u32],
        p: usize,
        dg: usize,
    ) {
        let (idb, posb) = (self.indices(ids), self.indices(positions));
        let (ni, pi, di) = (ids.len() as i32, p as i32, dg as i32);
        let (tr, pr) = ((tok.len() / dg) as i32, (pos.len() / dg) as i32);
        self.run(
            "patch_embed_forward_f32",
            launch_shapes::gathers::rows(ids.len()),
            &[
                out.block(),
                tok.block(),
                pos.block(),
                pad.block(),
                &idb,
                &posb,
                &ni,
                &pi,
                &di,
                &tr,
                &pr,
            ],
        );
    }

    fn patch_embed_backward(
        &self,
        dtok: &mut CudaBuf<D>,
        dpos: &mut CudaBuf<D>,
        dpad: &mut CudaBuf<D>,
        dout: &CudaBuf<D>,
        ids: &[u32],
        positions: &[u32],
        p: usize,
        dg: usize,
    ) {
        let plans = plan_or_panic(scatter_plan::patch_embed_plans(
            ids,
            positions,
            p,
            dtok.len() / dg,
            dpos.len() / dg,
        ));
        self.scatter_add(dtok, dout, &plans.tok, dg);
        self.scatter_add(dpos, dout, &plans.pos, dg);
        self.scatter_add(dpad, dout, &plans.pad, dg);
    }

    fn local_embed_forward(
        &self,
        out: &mut CudaBuf<D>,
        tok: &CudaBuf<D>,
        pos: &CudaBuf<D>,
        pad: &CudaBuf<D>,
        ids: &[u32],
        slots: &[u32],
        d: usize,
    ) {
        let (idb, slb) = (self.indices(ids), self.indices(slots));
        let (ni, di) = (ids.len() as i32, d as i32);
        let (tr, pr) = ((tok.len() / d) as i32, (pos.len() / d) as i32);
        self.run(
            "local_embed_forward_f32",
            launch_shapes::gathers::rows(ids.len()),
            &[
                out.block(),
                tok.block(),
                pos.block(),
                pad.block(),
                &idb,
                &slb,
                &ni,
                &di,
                &tr,
                &pr,
            ],
        );
    }

    fn local_embed_backward(
        &self,
        dtok: &mut CudaBuf<D>,
        dpos: &mut CudaBuf<D>,
        dpad: &mut CudaBuf<D>,
        dout: &CudaBuf<D>,
        ids: &[u32],
        slots: &[u32],
        d: usize,
    ) {
        let plans = plan_or_panic(scatter_plan::local_embed_plans(
            ids,
            slots,
            dtok.len() / d,
            dpos.len() / d,
        ));
        self.scatter_add(dtok, dout, &plans.tok, d);
        self.scatter_add(dpos, dout, &plans.pos, d);
        self.scatter_add(dpad, dout, &plans.pad, d);
    }

    // ---- loss -----------------------------------------------------------------------------

    fn cross_entropy_forward(
        &self,
        losses: &mut CudaBuf<D>,
        logits: &CudaBuf<D>,
        targets: &[u32],
        v: usize,
    ) {
        let tb = self.indices(targets);
        let (rows, vi) = (targets.len() as i32, v as i32);
        self.run(
            "cross_entropy_forward_f32",
            shapes::cross_entropy(targets.len()),
            &[losses.block(), logits.block(), &tb, &rows, &vi],
        );
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut CudaBuf<D>,
        logits: &CudaBuf<D>,
        targets: &[u32],
        v: usize,
        dloss: f32,
    ) {
        let tb = self.indices(targets);
        let (rows, vi) = (targets.len() as i32, v as i32);
        self.run(
            "cross_entropy_backward_f32",
            shapes::cross_entropy(targets.len()),
            &[dlogits.block(), logits.block(), &tb, &dloss, &rows, &vi],
        );
    }

    fn log_softmax(&self, out: &mut CudaBuf<D>, logits: &CudaBuf<D>, v: usize) {
        self.log_softmax_on_device(out, logits, v);
    }

    // ---- optimizer ------------------------------------------------------------------------

    fn adamw_step(
        &self,
        param: &mut CudaBuf<D>,
        grad: &CudaBuf<D>,
        m: &mut CudaBuf<D>,
        v: &mut CudaBuf<D>,
        hp: &AdamW,
    ) {
        let (c1, c2) = launch_shapes::adamw::bias_corrections(hp)
            .unwrap_or_else(|e| panic!("CUDA backend: {e}"));
        let n = param.len() as i64;
        let shape = launch_shapes::adamw::step(param.len());
        let scalars: [&dyn KernelArg; 8] = [
            &n,
            &hp.lr,
            &hp.beta1,
            &hp.beta2,
            &hp.eps,
            &hp.weight_decay,
            &c1,
            &c2,
        ];
        m.invalidate_shadow();
        v.invalidate_shadow();
        // A weight whose bf16 working copy exists gets it rewritten in the same pass.
        match param.shadow().and_then(|s| s.allocated()) {
            Some(shadow) => {
                let copy = param.shadow_arg(shadow);
                let buffers: [&dyn KernelArg; 5] =
                    [param.block(), &copy, grad.block(), m.block(), v.block()];
                self.run(
                    "adamw_step_f32_bf16_copy",
                    shape,
                    &[&buffers[..], &scalars[..]].concat(),
                );
                param.mark_shadow_fresh();
                self.bf16_scratch.stats().fused_adamw_steps += 1;
            }
            None => {
                let buffers: [&dyn KernelArg; 4] =
                    [param.block(), grad.block(), m.block(), v.block()];
                self.run(
                    "adamw_step_f32",
                    shape,
                    &[&buffers[..], &scalars[..]].concat(),
                );
                param.invalidate_shadow();
            }
        }
    }
}
