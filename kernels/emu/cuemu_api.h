/* C ABI of the CUDA-on-CPU emulator: what Rust (src/emu/) calls.
 *
 * Plain C so that bindgen can read it; src/emu/bindings.rs is generated from this file
 * (tools/emu-bindings.sh checks that the committed copy is fresh).
 *
 * A launch runs every block of the grid on the calling OS thread, one block after another;
 * the threads of a block are fibers switched at barriers and warp collectives. Settings
 * (schedule, strictness) and the last error are per OS thread, so parallel callers are
 * independent.
 */
#ifndef CUEMU_API_H
#define CUEMU_API_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** A grid or block shape, as CUDA's dim3. */
typedef struct cuemu_dim3 {
    uint32_t x;
    uint32_t y;
    uint32_t z;
} cuemu_dim3;

/** The order in which the fibers of a block are resumed at synchronization points. */
typedef enum cuemu_schedule {
    /** Round-robin in ascending thread order; warps advance in near lockstep. */
    CUEMU_SCHEDULE_FORWARD = 0,
    /** Round-robin in descending thread order; blocks also run in reverse order. */
    CUEMU_SCHEDULE_REVERSE = 1,
    /** Always resume the lowest runnable thread: low warps run ahead to each barrier. */
    CUEMU_SCHEDULE_GREEDY_LOW = 2,
    /** Always resume the highest runnable thread: high warps run ahead to each barrier. */
    CUEMU_SCHEDULE_GREEDY_HIGH = 3,
    /** Resume a pseudo-random runnable thread (seeded, so reproducible). */
    CUEMU_SCHEDULE_RANDOM = 4
} cuemu_schedule;

/** Result codes of cuemu_launch. */
typedef enum cuemu_status {
    CUEMU_OK = 0,
    /** Bad grid, block or shared-memory size; nothing ran. */
    CUEMU_ERROR_INVALID_CONFIG = 1,
    /** Threads exited while others wait at a barrier, or no thread can make progress. */
    CUEMU_ERROR_DEADLOCK = 2,
    /** Threads of one block wait at different __syncthreads call sites. */
    CUEMU_ERROR_DIVERGENT_BARRIER = 3,
    /** A warp collective was misused (mask without the caller, mixed operations, ...). */
    CUEMU_ERROR_WARP_COLLECTIVE = 4,
    /** The kernel wrote dynamic shared memory past the launch's shared_mem_bytes. */
    CUEMU_ERROR_SHARED_OVERFLOW = 5,
    /** Wrong number or size of kernel arguments (checked against the kernel signature). */
    CUEMU_ERROR_ARGUMENTS = 6,
    /** Kernel code broke an API rule the emulator checks (wmma alignment, __trap(), ...). */
    CUEMU_ERROR_KERNEL = 7
} cuemu_status;

/** One launched kernel: calls the kernel with arguments unpacked from `params`. */
typedef void (*cuemu_thunk)(void **params);

/** What a kernel parameter is, for checking the arguments a caller passes. */
typedef enum cuemu_arg_kind {
    CUEMU_ARG_POINTER = 0,
    CUEMU_ARG_SIGNED = 1,
    CUEMU_ARG_UNSIGNED = 2,
    CUEMU_ARG_FLOAT = 3,
    CUEMU_ARG_OTHER = 4
} cuemu_arg_kind;

/** One kernel parameter: its size in bytes and kind; for pointers also the pointee's. */
typedef struct cuemu_arg_info {
    uint32_t size;
    /** A cuemu_arg_kind. */
    uint32_t kind;
    /** sizeof the pointee (0 for void* and non-pointers). */
    uint32_t elem_size;
    /** The pointee's cuemu_arg_kind (CUEMU_ARG_OTHER for non-pointers). */
    uint32_t elem_kind;
    /** 1 when the pointee is const-qualified (the kernel only reads through the pointer). */
    uint32_t elem_const;
} cuemu_arg_info;

/** A kernel's parameter list, as deduced from its C++ signature. */
typedef struct cuemu_kernel_signature {
    uint32_t n_args;
    const cuemu_arg_info *args;
} cuemu_kernel_signature;

/**
 * Runs `thunk` over `grid` × `block` threads with `shared_mem_bytes` of dynamic shared memory,
 * like cuLaunchKernel: `params[i]` points to the value of the i-th kernel argument.
 * Returns CUEMU_OK, or an error whose message cuemu_last_error() returns.
 */
int cuemu_launch(cuemu_dim3 grid, cuemu_dim3 block, uint32_t shared_mem_bytes, cuemu_thunk thunk,
                 void **params);

/** Sets this OS thread's schedule; `seed` is used by CUEMU_SCHEDULE_RANDOM only. */
void cuemu_set_schedule(cuemu_schedule schedule, uint64_t seed);

/**
 * Strict (1, the default): threads that exited while others wait at a __syncthreads are a
 * deadlock error. Lenient (0): exited threads count as arrived, as GPUs usually behave.
 */
void cuemu_set_strict(int strict);

/** The message of this OS thread's last failed launch ("" if none); valid until the next launch. */
const char *cuemu_last_error(void);

/** Largest dynamic shared memory a launch may ask for, in bytes. */
uint32_t cuemu_max_dynamic_shared_bytes(void);

#ifdef __cplusplus
}
#endif

#endif /* CUEMU_API_H */
