//! The kernel manifest: every CUDA source of the crate and its `extern "C" __global__` entry
//! points. It is the single list that drives all three consumers:
//! - `build.rs` compiles each source with nvcc to PTX (when `ptx` is set) and, with g++, into
//!   the CPU emulator library, exporting one `cuemu_thunk_<entry>` per entry point;
//! - [`crate::kernels::MODULES`] embeds the PTX for cudarc's `load_function`;
//! - [`crate::emu`] launches the entry points on the CPU by name.
//!
//! This file is also compiled into `build.rs` (via `#[path]`), so it must stay plain data with
//! no dependencies.

/// One CUDA source file and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// Module name: the file stem, unique across the manifest.
    pub name: &'static str,
    /// Path of the source relative to `kernels/`.
    pub path: &'static str,
    /// The `extern "C" __global__` functions, in source order.
    pub entry_points: &'static [&'static str],
    /// Whether the source is compiled to PTX and shipped (false for emulator-only sources such
    /// as the harness self-test with its planted bugs).
    pub ptx: bool,
}

/// Every kernel source, sorted by name.
pub const KERNEL_SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "activations",
        path: "activations.cu",
        entry_points: &[
            "activation_forward_f32",
            "activation_forward_bf16",
            "activation_backward_f32",
            "activation_backward_bf16",
            "swiglu_forward_f32",
            "swiglu_forward_bf16",
            "swiglu_backward_f32",
            "swiglu_backward_bf16",
        ],
        ptx: true,
    },
    KernelSource {
        name: "adamw",
        path: "adamw.cu",
        entry_points: &["adamw_step_f32", "adamw_step_f32_bf16_copy"],
        ptx: true,
    },
    KernelSource {
        name: "cast",
        path: "cast.cu",
        entry_points: &["cast_f32_to_bf16", "cast_bf16_to_f32"],
        ptx: true,
    },
    KernelSource {
        name: "cema",
        path: "cema.cu",
        entry_points: &[
            "cema_forward_f32",
            "cema_backward_f32",
            "cema_coefficients_f32",
            "cema_step_f32",
        ],
        ptx: true,
    },
    KernelSource {
        name: "cross_entropy",
        path: "cross_entropy.cu",
        entry_points: &["cross_entropy_forward_f32", "cross_entropy_backward_f32"],
        ptx: true,
    },
    KernelSource {
        name: "elementwise",
        path: "elementwise.cu",
        entry_points: &[
            "add_assign_f32",
            "scale_f32",
            "mul_f32",
            "add_scalar_f32",
            "fill_f32",
            "rows_copy_f32",
        ],
        ptx: true,
    },
    KernelSource {
        name: "embedding",
        path: "embedding.cu",
        entry_points: &[
            "embedding_forward_f32",
            "embedding_forward_bf16",
            "embedding_backward_atomic_f32",
            "embedding_backward_atomic_bf16",
            "embedding_backward_partials_f32",
            "embedding_backward_partials_bf16",
            "embedding_backward_reduce_f32",
        ],
        ptx: true,
    },
    KernelSource {
        name: "mega_attention",
        path: "mega_attention.cu",
        entry_points: &[
            "mega_attn_project_forward_f32",
            "mega_attn_project_backward_f32",
            "mega_attn_to_heads_f32",
            "mega_attn_from_heads_f32",
            "mega_attn_cached_softmax_f32",
        ],
        ptx: true,
    },
    KernelSource {
        name: "megabyte_gathers",
        path: "megabyte_gathers.cu",
        entry_points: &[
            "patch_embed_forward_f32",
            "patch_embed_forward_bf16",
            "local_embed_forward_f32",
            "local_embed_forward_bf16",
            "rows_scatter_add_csr_f32",
            "rows_scatter_add_csr_bf16",
        ],
        ptx: true,
    },
    KernelSource {
        name: "norms",
        path: "norms.cu",
        entry_points: &[
            "layernorm_forward_f32",
            "layernorm_forward_bf16",
            "layernorm_backward_f32",
            "layernorm_backward_bf16",
            "layernorm_param_reduce_f32",
            "rmsnorm_forward_f32",
            "rmsnorm_forward_bf16",
            "rmsnorm_backward_f32",
            "rmsnorm_backward_bf16",
            "rmsnorm_param_reduce_f32",
        ],
        ptx: true,
    },
    KernelSource {
        name: "paged_attention",
        path: "paged_attention.cu",
        entry_points: &[
            "paged_attention_partition_f32",
            "paged_attention_combine_f32",
        ],
        ptx: true,
    },
    KernelSource {
        name: "reduce",
        path: "reduce.cu",
        entry_points: &["sum_partials_f32", "sum_combine_f64"],
        ptx: true,
    },
    KernelSource {
        name: "rope",
        path: "rope.cu",
        entry_points: &["rope_forward_f32", "rope_backward_f32"],
        ptx: true,
    },
    KernelSource {
        name: "selftest",
        path: "emu/selftest.cu",
        entry_points: &[
            "selftest_block_sum",
            "selftest_missing_barrier",
            "selftest_early_return",
            "selftest_divergent_barrier",
            "selftest_read_past_end",
            "selftest_shared_overflow",
            "selftest_dyn_smem_poison",
            "selftest_warp_ops",
            "selftest_wmma_gemm",
            "selftest_wmma_misaligned",
            "selftest_bf16_convert",
        ],
        ptx: false,
    },
    KernelSource {
        name: "softmax",
        path: "softmax.cu",
        entry_points: &[
            "causal_softmax_forward_f32",
            "causal_softmax_backward_f32",
            "log_softmax_f32",
        ],
        ptx: true,
    },
    KernelSource {
        name: "timestep_norm",
        path: "timestep_norm.cu",
        entry_points: &[
            "tsn_group_moments_f32",
            "tsn_scan_f32",
            "tsn_normalize_f32",
            "tsn_backward_group_sums_f32",
            "tsn_backward_scan_f32",
            "tsn_backward_dx_f32",
            "tsn_backward_param_reduce_f32",
            "tsn_step_f32",
        ],
        ptx: true,
    },
];

/// Names kernels give their `extern __shared__` (dynamic shared memory) arrays. The emulator
/// defines each as an alias of one per-thread buffer; the convention is a single `smem`.
pub const DYNAMIC_SHARED_NAMES: &[&str] = &["smem"];
