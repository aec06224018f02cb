//! The lazily loaded module and function cache: a kernel's PTX module is loaded the first time
//! one of its entry points is launched, and every function is resolved once (module loads are
//! tens of milliseconds of JIT on a GPU; a training step launches hundreds of kernels).
//!
//! Generic over what a module and a function are, so the cudarc device stores
//! `Arc<CudaModule>` / `CudaFunction` while the unit tests count loads with plain values.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::emu::DeviceError;
use crate::kernels::{KernelModule, MODULES};

/// The embedded PTX module that defines `kernel`, if any.
pub fn module_of(kernel: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.entry_points.contains(&kernel))
}

/// Loaded modules by name and resolved functions by kernel name.
pub struct KernelCache<M, F> {
    modules: Mutex<HashMap<&'static str, M>>,
    functions: Mutex<HashMap<String, F>>,
}

impl<M, F> Default for KernelCache<M, F> {
    fn default() -> Self {
        Self {
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        }
    }
}

impl<M: Clone, F: Clone> KernelCache<M, F> {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The function `kernel`, loading its module with `load_module` and resolving it with
    /// `load_function` on first use only.
    pub fn function(
        &self,
        kernel: &str,
        load_module: impl FnOnce(&'static KernelModule) -> Result<M, DeviceError>,
        load_function: impl FnOnce(&M, &str) -> Result<F, DeviceError>,
    ) -> Result<F, DeviceError> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(kernel) {
            return Ok(f.clone());
        }
        let module = module_of(kernel).ok_or_else(|| {
            DeviceError::Driver(format!(
                "kernel {kernel:?} is in no embedded PTX module (src/kernels/manifest.rs)"
            ))
        })?;
        let loaded = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match modules.get(module.name) {
                Some(m) => m.clone(),
                None => {
                    let m = load_module(module)?;
                    modules.insert(module.name, m.clone());
                    m
                }
            }
        };
        let f = load_function(&loaded, kernel)?;
        functions.insert(kernel.to_string(), f.clone());
        Ok(f)
    }

    /// Modules loaded so far.
    pub fn loaded_modules(&self) -> usize {
        self.modules.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn every_manifest_kernel_has_a_module() {
        for m in MODULES {
            for &k in m.entry_points {
                assert_eq!(module_of(k).unwrap().name, m.name);
            }
        }
        assert!(module_of("selftest_block_sum").is_none(), "emulator-only");
        assert!(module_of("no_such_kernel").is_none());
    }

    #[test]
    fn modules_and_functions_load_once() {
        let cache = KernelCache::<String, (String, usize)>::new();
        let (module_loads, function_loads) = (Cell::new(0), Cell::new(0));
        let get = |kernel: &str| {
            cache
                .function(
                    kernel,
                    |m| {
                        module_loads.set(module_loads.get() + 1);
                        Ok(m.name.to_string())
                    },
                    |m, k| {
                        function_loads.set(function_loads.get() + 1);
                        Ok((format!("{m}::{k}"), function_loads.get()))
                    },
                )
                .unwrap()
        };
        let a = get("layernorm_forward_f32");
        assert_eq!(a.0, "norms::layernorm_forward_f32");
        assert_eq!(get("layernorm_forward_f32"), a, "cached, not reloaded");
        get("rmsnorm_forward_f32");
        get("adamw_step_f32");
        assert_eq!(module_loads.get(), 2, "norms once, adamw once");
        assert_eq!(function_loads.get(), 3);
        assert_eq!(cache.loaded_modules(), 2);
    }

    #[test]
    fn unknown_kernels_and_load_failures_are_errors() {
        let cache = KernelCache::<u32, u32>::new();
        let err = cache.function("nope", |_| Ok(0), |_, _| Ok(0)).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = cache
            .function(
                "adamw_step_f32",
                |_| Err(DeviceError::Driver("JIT failed".into())),
                |_, _| Ok(0),
            )
            .unwrap_err();
        assert!(err.to_string().contains("JIT failed"));
        // A failed load is not cached: the next call tries again.
        assert_eq!(
            cache
                .function("adamw_step_f32", |_| Ok(7), |m, _| Ok(*m + 1))
                .unwrap(),
            8
        );
    }
}
