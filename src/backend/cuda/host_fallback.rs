//! The ops that have no CUDA kernel yet: each downloads its buffers, runs the CPU backend's
//! op on the host and uploads what it wrote. Every one of them is listed in [`HOST_FALLBACKS`]
//! with the kernel that replaces it; the backend counts the calls
//! ([`super::CudaBackend::host_fallback_calls`]) so a training step shows which ops still
//! leave the device.
//!
//! This is correct (bit-for-bit the CPU op) but slow on a GPU: two PCIe copies per call.
//! The training attentions of both models and the log-softmax run on the device
//! (attention.rs, mega_attention.rs); the streaming MEGALODON attention over its chunk cache is
//! the one left.

use super::buffer::CudaBuf;
use super::CudaBackend;
use crate::backend::cpu::Cpu;
use crate::backend::{Backend, CemaWeightGrads, CemaWeights, TsnStats};
use crate::emu::DeviceApi;

/// One op that runs on the host, and what replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFallback {
    /// The `Backend` method.
    pub op: &'static str,
    /// The kernel (or device API call) that will replace the host round trip.
    pub replaced_by: &'static str,
}

/// Every op of [`super::CudaBackend`] that may run on the host.
pub const HOST_FALLBACKS: &[HostFallback] = &[
    HostFallback {
        op: "cema_forward",
        replaced_by: "only when cema_forward_f32 cannot launch the shape (N > 70): a wider kernel",
    },
    HostFallback {
        op: "cema_backward",
        replaced_by: "only when cema_backward_f32 cannot launch the shape (N > 36)",
    },
    HostFallback {
        op: "timestep_norm_forward",
        replaced_by: "only for shapes the TimestepNorm kernels reject (b > 65535 rows)",
    },
    HostFallback {
        op: "timestep_norm_backward",
        replaced_by: "only for shapes the TimestepNorm kernels reject",
    },
    HostFallback {
        op: "layernorm_backward",
        replaced_by: "only for d > 6144, past the kernel's shared-memory partials",
    },
    HostFallback {
        op: "rmsnorm_backward",
        replaced_by: "only for d > 12288, past the kernel's shared-memory partials",
    },
];

impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    /// Runs `op` on the host: downloads `outs` (so `+=` outputs keep their contents) and
    /// `ins`, calls `f` with the CPU backend, and uploads `outs` again.
    pub(super) fn host_fallback<const N: usize>(
        &self,
        op: &'static str,
        outs: [&mut CudaBuf<D>; N],
        ins: &[&CudaBuf<D>],
        f: impl FnOnce(&Cpu<f32>, &mut [Vec<f32>; N], &[Vec<f32>]),
    ) {
        debug_assert!(
            HOST_FALLBACKS.iter().any(|h| h.op == op),
            "{op} missing from HOST_FALLBACKS"
        );
        self.count_fallback(op);
        let mut host_outs: [Vec<f32>; N] = std::array::from_fn(|i| self.to_host(outs[i]));
        let host_ins: Vec<Vec<f32>> = ins.iter().map(|b| self.to_host(b)).collect();
        f(&Cpu::<f32>::new(), &mut host_outs, &host_ins);
        for (buf, host) in outs.into_iter().zip(&host_outs) {
            self.write_host(buf, host);
        }
    }
}

/// The host ops with optional buffers (carried states), which [`CudaBackend::host_fallback`]'s
/// fixed output list cannot express.
impl<D> CudaBackend<D>
where
    D: DeviceApi + Send + Sync + 'static,
    D::Buffer<f32>: Send,
{
    fn stats_to_host(&self, s: &TsnStats<CudaBuf<D>>) -> TsnStats<Vec<f32>> {
        TsnStats {
            count: self.to_host(&s.count),
            mean: self.to_host(&s.mean),
            var: self.to_host(&s.var),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn tsn_forward_on_host(
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
        self.count_fallback("timestep_norm_forward");
        let (mut hy, mut hm, mut hr) = (
            self.to_host(y),
            self.to_host(saved_mean),
            self.to_host(saved_rstd),
        );
        let mut h_out = state_out.as_ref().map(|s| self.stats_to_host(s));
        let h_in = state_in.map(|s| self.stats_to_host(s));
        Cpu::<f32>::new().timestep_norm_forward(
            &mut hy,
            &mut hm,
            &mut hr,
            h_out.as_mut(),
            &self.to_host(x),
            &self.to_host(w),
            &self.to_host(bias),
            h_in.as_ref(),
            b,
            l,
            d,
            g,
            eps,
        );
        self.write_host(y, &hy);
        self.write_host(saved_mean, &hm);
        self.write_host(saved_rstd, &hr);
        if let (Some(s), Some(h)) = (state_out, h_out) {
            self.write_host(&mut s.count, &h.count);
            self.write_host(&mut s.mean, &h.mean);
            self.write_host(&mut s.var, &h.var);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn tsn_backward_on_host(
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
        self.count_fallback("timestep_norm_backward");
        let (mut hdx, mut hdw, mut hdb) = (self.to_host(dx), self.to_host(dw), self.to_host(db));
        let mut hdin = dstate_in
            .as_ref()
            .map(|(m, v)| (self.to_host(m), self.to_host(v)));
        let hdout = dstate_out.map(|(m, v)| (self.to_host(m), self.to_host(v)));
        let h_in = state_in.map(|s| self.stats_to_host(s));
        Cpu::<f32>::new().timestep_norm_backward(
            &mut hdx,
            &mut hdw,
            &mut hdb,
            hdin.as_mut().map(|(m, v)| (m, v)),
            &self.to_host(dy),
            hdout.as_ref().map(|(m, v)| (m, v)),
            &self.to_host(x),
            &self.to_host(w),
            &self.to_host(saved_mean),
            &self.to_host(saved_rstd),
            h_in.as_ref(),
            b,
            l,
            d,
            g,
        );
        self.write_host(dx, &hdx);
        self.write_host(dw, &hdw);
        self.write_host(db, &hdb);
        if let (Some((m, v)), Some((hm, hv))) = (dstate_in, hdin) {
            self.write_host(m, &hm);
            self.write_host(v, &hv);
        }
    }

    fn cema_to_host(&self, p: &CemaWeights<CudaBuf<D>>) -> [Vec<f32>; 5] {
        [p.alpha, p.delta, p.theta, p.gamma, p.omega].map(|b| self.to_host(b))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn cema_forward_on_host(
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
        self.count_fallback("cema_forward");
        let [alpha, delta, theta, gamma, omega] = self.cema_to_host(p);
        let hp = CemaWeights {
            alpha: &alpha,
            delta: &delta,
            theta: &theta,
            gamma: &gamma,
            omega: &omega,
        };
        let mut hy = self.to_host(y);
        let mut hh = h_out.as_ref().map(|h| self.to_host(h));
        let hh0 = h0.map(|h| self.to_host(h));
        Cpu::<f32>::new().cema_forward(
            &mut hy,
            hh.as_mut(),
            &self.to_host(x),
            &hp,
            hh0.as_ref(),
            b,
            l,
            d,
            n,
        );
        self.write_host(y, &hy);
        if let (Some(h), Some(hh)) = (h_out, hh) {
            self.write_host(h, &hh);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn cema_backward_on_host(
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
        self.count_fallback("cema_backward");
        let [alpha, delta, theta, gamma, omega] = self.cema_to_host(p);
        let hp = CemaWeights {
            alpha: &alpha,
            delta: &delta,
            theta: &theta,
            gamma: &gamma,
            omega: &omega,
        };
        let mut hg =
            [&*g.alpha, &*g.delta, &*g.theta, &*g.gamma, &*g.omega].map(|b| self.to_host(b));
        let mut hdx = self.to_host(dx);
        let mut hdh0 = dh0.as_ref().map(|h| self.to_host(h));
        let hdh_out = dh_out.map(|h| self.to_host(h));
        let hh0 = h0.map(|h| self.to_host(h));
        {
            let [ga, gd, gt, gg, go] = &mut hg;
            let mut grads = CemaWeightGrads {
                alpha: ga,
                delta: gd,
                theta: gt,
                gamma: gg,
                omega: go,
            };
            Cpu::<f32>::new().cema_backward(
                &mut hdx,
                &mut grads,
                hdh0.as_mut(),
                &self.to_host(dy),
                hdh_out.as_ref(),
                &self.to_host(x),
                &hp,
                hh0.as_ref(),
                b,
                l,
                d,
                n,
            );
        }
        self.write_host(dx, &hdx);
        let [ga, gd, gt, gg, go] = &hg;
        self.write_host(g.alpha, ga);
        self.write_host(g.delta, gd);
        self.write_host(g.theta, gt);
        self.write_host(g.gamma, gg);
        self.write_host(g.omega, go);
        if let (Some(h), Some(hh)) = (dh0, hdh0) {
            self.write_host(h, &hh);
        }
    }
}
