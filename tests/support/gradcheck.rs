//! Whole-model gradient check shared by the model tests: analytic gradients of the mean loss
//! (f64 CPU backend) against central finite differences at chosen entries of every tensor.

use mega::backend::cpu::Cpu;
use mega::model::LanguageModel;

/// Check `model`'s gradients at `params` on `windows` (`b` windows scoring `t` bytes).
/// `probes(i, grads_i)` picks the entries of tensor `i` to test. The error is relative, with
/// `floor` as the smallest scale (a central difference of a loss ≈ 6 with step 1e-5 carries
/// ~1e-10–1e-9 of rounding noise, which must not count against gradients that are exactly
/// zero). Fails above 1e-5; returns the worst error and where it was.
pub fn check_model_gradients<M: LanguageModel<Cpu<f64>>>(
    model: &M,
    params: &[Vec<f64>],
    windows: &[u8],
    (b, t): (usize, usize),
    floor: f64,
    mut probes: impl FnMut(usize, &[f64]) -> Vec<usize>,
) -> (f64, String) {
    let be = Cpu::<f64>::new();
    let mut grads = model.layout().zeros(&be);
    let mut ws = model.workspace(&be, b, t, true);
    model.forward(&be, params, &mut ws, windows);
    model.backward(&be, params, &mut grads, &mut ws);
    let mut eval_ws = model.workspace(&be, b, t, false);
    let mut params = params.to_vec();
    let h = 1e-5;
    let mut worst = (0.0, String::new());
    for (i, spec) in model.layout().specs.iter().enumerate() {
        for j in probes(i, &grads[i]) {
            let base = params[i][j];
            params[i][j] = base + h;
            let lp = model.forward(&be, &params, &mut eval_ws, windows);
            params[i][j] = base - h;
            let lm = model.forward(&be, &params, &mut eval_ws, windows);
            params[i][j] = base;
            let fd = (lp - lm) / (2.0 * h);
            let an = grads[i][j];
            let err = (fd - an).abs() / (fd.abs() + an.abs()).max(floor);
            if err > worst.0 {
                worst = (
                    err,
                    format!("{}[{j}]: analytic {an:e} fd {fd:e}", spec.name),
                );
            }
            assert!(
                err < 1e-5,
                "{}[{j}]: analytic {an:e} vs finite difference {fd:e} (rel {err:e})",
                spec.name
            );
        }
    }
    println!(
        "worst relative gradient error: {:e} at {}",
        worst.0, worst.1
    );
    worst
}
