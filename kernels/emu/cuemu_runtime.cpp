// The emulator runtime: fibers, schedules, barriers, warp collectives and cuemu_launch.
//
// Compiled once per build through a generated TU that includes this file and then defines
// each dynamic shared-memory name with CUEMU_DEFINE_DYN_SMEM (the alias must live in the TU
// that defines its target). See kernels/emu/README.md for the design.
//
// Everything here runs on the OS thread that called cuemu_launch: the fibers of a block share
// it, so no locks are needed and all state is thread_local.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// The storage behind every `extern __shared__` name (see CUEMU_DEFINE_DYN_SMEM).
thread_local __attribute__((aligned(64))) unsigned char cuemu_dyn_smem_storage[CUEMU_MAX_DYN_SMEM_BYTES];

// Sanitizer hooks, present only when the runtime of one is linked in.
extern "C" void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, std::size_t size) __attribute__((weak));

namespace cuemu {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;
// Bytes after the launch's dynamic shared memory that must still hold the 0xFF poison when a
// block ends; anything else means the kernel wrote past its shared_mem_bytes.
constexpr std::size_t kSmemCanaryBytes = 4096;
constexpr unsigned kMaxThreadsPerBlock = 1024;

// Reached through an out-of-line function: under UBSan, GCC null-checks the address of a TLS
// object by flags that the linker's TLS relaxation no longer sets (a false report otherwise).
__attribute__((noinline)) unsigned char* dyn_smem() { return cuemu_dyn_smem_storage; }

// ---- context switch -----------------------------------------------------------------------

#if defined(__x86_64__)
extern "C" void cuemu_switch_context(void** save_sp, void* load_sp);
extern "C" void cuemu_fiber_trampoline();
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save_sp, and restores the same from load_sp (System V ABI).
asm(R"(
    .text
    .globl cuemu_switch_context
    .type cuemu_switch_context,@function
cuemu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuemu_switch_context,.-cuemu_switch_context

    .globl cuemu_fiber_trampoline
    .type cuemu_fiber_trampoline,@function
cuemu_fiber_trampoline:
    .cfi_startproc
    .cfi_undefined rip
    movq %rbx, %rdi
    callq *%r12
    ud2
    .cfi_endproc
    .size cuemu_fiber_trampoline,.-cuemu_fiber_trampoline
)");
#endif

// ---- fiber stacks -------------------------------------------------------------------------

struct Stack {
    unsigned char* mapping = nullptr;  // guard page first, then kStackBytes usable
    std::size_t page = 0;
    // An abandoned fiber (error path) may leave ASan redzones poisoned on its stack.
    bool needs_unpoison = false;

    unsigned char* low() const { return mapping + page; }
    unsigned char* high() const { return mapping + page + kStackBytes; }
};

struct StackPool {
    std::vector<Stack> stacks;
    ~StackPool() {
        for (Stack& s : stacks) {
            // Under ASan, frames that ran on a fiber stack leave their redzones poisoned (a
            // fiber is abandoned, not unwound); once unmapped, the range can come back as a new
            // thread's stack and TLS, whose first write would then be reported. Clear it first.
            if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(s.low(), kStackBytes);
            munmap(s.mapping, s.page + kStackBytes);
        }
    }
    // Maps stacks until there are n; false if the system refuses.
    bool ensure(std::size_t n) {
        while (stacks.size() < n) {
            Stack s;
            s.page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
            void* m = mmap(nullptr, s.page + kStackBytes, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) return false;
            s.mapping = static_cast<unsigned char*>(m);
            // The guard page turns a fiber stack overflow into a SIGSEGV at the faulting access
            // instead of silent corruption of the neighbouring stack.
            mprotect(s.mapping, s.page, PROT_NONE);
            stacks.push_back(s);
        }
        return true;
    }
};

// ---- runnable set -------------------------------------------------------------------------

class ThreadSet {
public:
    void reset(unsigned n) {
        n_ = n;
        words_.assign((n + 63) / 64, 0);
    }
    void set(unsigned i) { words_[i / 64] |= 1ull << (i % 64); }
    void clear(unsigned i) { words_[i / 64] &= ~(1ull << (i % 64)); }
    bool any() const {
        for (auto w : words_)
            if (w) return true;
        return false;
    }
    // Lowest member ≥ from, or -1.
    int first_from(unsigned from) const {
        if (from >= n_) return -1;
        unsigned wi = from / 64;
        std::uint64_t w = words_[wi] & (~0ull << (from % 64));
        for (;;) {
            if (w) return static_cast<int>(wi * 64 + std::countr_zero(w));
            if (++wi >= words_.size()) return -1;
            w = words_[wi];
        }
    }
    // Highest member ≤ from, or -1.
    int last_upto(int from) const {
        if (from < 0) return -1;
        unsigned wi = static_cast<unsigned>(from) / 64;
        const unsigned bit = static_cast<unsigned>(from) % 64;
        std::uint64_t w = words_[wi] & (bit == 63 ? ~0ull : ((1ull << (bit + 1)) - 1));
        for (;;) {
            if (w) return static_cast<int>(wi * 64 + 63 - std::countl_zero(w));
            if (wi == 0) return -1;
            w = words_[--wi];
        }
    }
    unsigned size() const { return n_; }

private:
    unsigned n_ = 0;
    std::vector<std::uint64_t> words_;
};

// ---- per-launch state ---------------------------------------------------------------------

enum class FiberState : std::uint8_t { runnable, at_barrier, at_warp_op, exited };

// What a fiber asks of the scheduler when it switches back to it.
enum class Request : std::uint8_t { none, barrier, warp_op, exit, abort };

struct Fiber {
    void* sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t context;
#endif
    Stack* stack = nullptr;
    uint3 tid{};
    unsigned index = 0;
    FiberState state = FiberState::runnable;
    Request request = Request::none;
    // Where the fiber waits (for error messages and divergence checks).
    const char* file = "";
    unsigned line = 0;
    // Barrier arrival.
    BarrierKind barrier_kind = BarrierKind::plain;
    int predicate = 0;
    // Warp collective arrival.
    WarpOp op = WarpOp::syncwarp;
    unsigned mask = 0;
    std::uint64_t value = 0;
    int arg = 0;
    int width = 32;
    // Results handed back when the fiber is released.
    std::uint64_t result = 0;
    int pred_result = 0;
};

struct Settings {
    cuemu_schedule schedule = CUEMU_SCHEDULE_FORWARD;
    std::uint64_t seed = 0;
    bool strict = true;
};

struct Launch {
    cuemu_thunk thunk = nullptr;
    void** params = nullptr;
    std::vector<Fiber> fibers;
    ThreadSet runnable;
    unsigned n_threads = 0;
    unsigned n_warps = 0;
    unsigned n_exited = 0;
    unsigned barrier_waiting = 0;
    std::vector<unsigned> warp_live;     // lanes that exist and have not exited
    std::vector<unsigned> warp_waiting;  // lanes waiting at a warp collective
    void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t scheduler_context;
#endif
    Fiber* current = nullptr;
    int last_picked = -1;
    std::uint64_t rng = 0;
    int status = CUEMU_OK;
    std::string message;
    std::string abort_reason;  // kernel_error's text, until the scheduler reports it
};

thread_local Settings t_settings;
thread_local Launch* t_launch = nullptr;
thread_local StackPool t_stacks;
thread_local std::string t_last_error;
thread_local bool t_smem_poisoned = false;
thread_local long long t_clock = 0;

// ---- messages -----------------------------------------------------------------------------

// Source paths are absolute; from "kernels/" on (or the base name) is enough to find the line.
std::string short_path(const char* file) {
    std::string f = file ? file : "?";
    const auto k = f.rfind("kernels/");
    if (k != std::string::npos) return f.substr(k + 8);
    const auto slash = f.rfind('/');
    return slash == std::string::npos ? f : f.substr(slash + 1);
}

std::string site(const char* file, unsigned line) { return short_path(file) + ":" + std::to_string(line); }

std::string dim_text(uint3 v) {
    return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

// "t0-t7,t12" for a sorted list of linear thread indices; long lists end in "… (N threads)".
std::string thread_list(const std::vector<unsigned>& ids) {
    constexpr int kMaxRanges = 6;
    std::string out;
    int ranges = 0;
    for (std::size_t i = 0; i < ids.size();) {
        std::size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
        if (++ranges > kMaxRanges) {
            out += ",… (" + std::to_string(ids.size()) + " threads)";
            break;
        }
        if (!out.empty()) out += ",";
        out += "t" + std::to_string(ids[i]);
        if (j > i) out += "-t" + std::to_string(ids[j]);
        i = j + 1;
    }
    return out;
}

const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::shfl_idx: return "__shfl_sync";
        case WarpOp::shfl_up: return "__shfl_up_sync";
        case WarpOp::shfl_down: return "__shfl_down_sync";
        case WarpOp::shfl_xor: return "__shfl_xor_sync";
        case WarpOp::ballot: return "__ballot_sync";
        case WarpOp::any: return "__any_sync";
        case WarpOp::all: return "__all_sync";
        case WarpOp::syncwarp: return "__syncwarp";
        case WarpOp::reduce_add: return "__reduce_add_sync";
        case WarpOp::reduce_min_u:
        case WarpOp::reduce_min_i: return "__reduce_min_sync";
        case WarpOp::reduce_max_u:
        case WarpOp::reduce_max_i: return "__reduce_max_sync";
        case WarpOp::reduce_and: return "__reduce_and_sync";
        case WarpOp::reduce_or: return "__reduce_or_sync";
        case WarpOp::reduce_xor: return "__reduce_xor_sync";
        case WarpOp::match_any: return "__match_any_sync";
        case WarpOp::match_all: return "__match_all_sync";
        case WarpOp::wmma: return "wmma::*_sync";
    }
    return "warp collective";
}

// Groups the waiting fibers by what and where they wait: "t0-t7 at __syncthreads
// (selftest.cu:12); t8 at __shfl_sync (selftest.cu:20)".
std::string describe_waiting(const Launch& l) {
    std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
    for (const Fiber& f : l.fibers) {
        if (f.state != FiberState::at_barrier && f.state != FiberState::at_warp_op) continue;
        const std::string key = std::string(f.state == FiberState::at_barrier ? "__syncthreads" : op_name(f.op)) +
                                " (" + site(f.file, f.line) + ")";
        auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
        if (it == groups.end()) {
            groups.push_back({key, {f.index}});
        } else {
            it->second.push_back(f.index);
        }
    }
    std::string out;
    for (const auto& g : groups) {
        if (!out.empty()) out += "; ";
        out += thread_list(g.second) + " at " + g.first;
    }
    return out;
}

void fail(Launch& l, int status, const std::string& what) {
    if (l.status != CUEMU_OK) return;
    l.status = status;
    l.message = what + " in block " + dim_text(blockIdx);
}

// ---- fiber switching ----------------------------------------------------------------------

void fiber_main(Fiber* f);

void init_fiber_stack(Launch& l, Fiber& f) {
    Stack& s = *f.stack;
    if (s.needs_unpoison && __asan_unpoison_memory_region) {
        __asan_unpoison_memory_region(s.low(), kStackBytes);
    }
    s.needs_unpoison = false;
#if defined(__x86_64__)
    (void)l;
    // Initial frame as cuemu_switch_context pops it; `ret` enters the trampoline with a
    // 16-byte aligned stack, which then calls fiber_main(rbx).
    auto* top = reinterpret_cast<std::uint64_t*>(s.high());
    std::uint64_t* sp = top - 2;                                           // aligned slot
    *--sp = reinterpret_cast<std::uint64_t>(&cuemu_fiber_trampoline);      // return address
    *--sp = 0;                                                             // rbp: ends unwinding
    *--sp = reinterpret_cast<std::uint64_t>(&f);                           // rbx
    *--sp = reinterpret_cast<std::uint64_t>(&fiber_main);                  // r12
    *--sp = 0;                                                             // r13
    *--sp = 0;                                                             // r14
    *--sp = 0;                                                             // r15
    *--sp = 0x1f80ull | (0x037full << 32);                                 // MXCSR, x87 CW
    f.sp = sp;
#else
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = s.low();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, reinterpret_cast<void (*)()>(&fiber_main), 1, &f);
#endif
}

void switch_to_fiber(Launch& l, Fiber& f) {
#if defined(__x86_64__)
    cuemu_switch_context(&l.scheduler_sp, f.sp);
#else
    swapcontext(&l.scheduler_context, &f.context);
#endif
}

void switch_to_scheduler(Launch& l, Fiber& f) {
#if defined(__x86_64__)
    cuemu_switch_context(&f.sp, l.scheduler_sp);
#else
    swapcontext(&f.context, &l.scheduler_context);
#endif
}

void fiber_main(Fiber* f) {
    Launch& l = *t_launch;
    l.thunk(l.params);
    f->request = Request::exit;
    switch_to_scheduler(l, *f);
    __builtin_trap();  // an exited fiber is never resumed
}

// ---- barrier ------------------------------------------------------------------------------

void release(Launch& l, Fiber& f) {
    f.state = FiberState::runnable;
    l.runnable.set(f.index);
}

void try_complete_barrier(Launch& l) {
    if (l.barrier_waiting == 0) return;
    const unsigned live = l.n_threads - l.n_exited;
    if (l.barrier_waiting < live) return;
    if (l.n_exited > 0 && t_settings.strict) {
        fail(l, CUEMU_ERROR_DEADLOCK,
             "deadlock: " + std::to_string(l.n_exited) + " of " + std::to_string(l.n_threads) +
                 " threads exited while the others wait: " + describe_waiting(l));
        return;
    }
    // Every live thread is here; they must all be at the same call site.
    const Fiber* first = nullptr;
    int count = 0;
    for (Fiber& f : l.fibers) {
        if (f.state != FiberState::at_barrier) continue;
        if (!first) {
            first = &f;
        } else if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
            fail(l, CUEMU_ERROR_DIVERGENT_BARRIER, "divergent __syncthreads: " + describe_waiting(l));
            return;
        }
        count += f.predicate != 0;
    }
    const unsigned arrived = l.barrier_waiting;
    l.barrier_waiting = 0;
    for (Fiber& f : l.fibers) {
        if (f.state != FiberState::at_barrier) continue;
        switch (f.barrier_kind) {
            case BarrierKind::plain: f.result = 0; break;
            case BarrierKind::count: f.result = static_cast<std::uint64_t>(count); break;
            case BarrierKind::all: f.result = static_cast<unsigned>(count) == arrived; break;
            case BarrierKind::any: f.result = count > 0; break;
        }
        release(l, f);
    }
}

// ---- warp collectives ---------------------------------------------------------------------

// Shuffle source lane for `lane`, or -1 when the lane keeps its own value.
int shuffle_source(const Fiber& f, unsigned lane) {
    const int width = f.width;
    const int base = static_cast<int>(lane) & ~(width - 1);
    const int pos = static_cast<int>(lane) - base;
    switch (f.op) {
        case WarpOp::shfl_idx: return base + (f.arg & (width - 1));
        case WarpOp::shfl_up: return pos - f.arg < 0 ? -1 : static_cast<int>(lane) - f.arg;
        case WarpOp::shfl_down: return pos + f.arg >= width ? -1 : static_cast<int>(lane) + f.arg;
        case WarpOp::shfl_xor: {
            const int src = static_cast<int>(lane) ^ f.arg;
            // Later groups are out of reach (own value); earlier ones are readable.
            return src >= base + width || src >= 32 ? -1 : src;
        }
        default: return -1;
    }
}

void complete_warp_op(Launch& l, unsigned warp, unsigned members) {
    Fiber* lanes[32] = {};
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (members & (1u << lane)) lanes[lane] = &l.fibers[warp * 32 + lane];
    }
    const Fiber& any = *lanes[std::countr_zero(members)];
    // One collective, one operation: mixing, say, a ballot with a shuffle is a kernel bug.
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (lanes[lane] && lanes[lane]->op != any.op) {
            fail(l, CUEMU_ERROR_WARP_COLLECTIVE,
                 "warp " + std::to_string(warp) + " lanes meet at different collectives: " + describe_waiting(l));
            return;
        }
    }
    if (any.op == WarpOp::wmma) {
        for (unsigned lane = 0; lane < 32; ++lane) {
            if (lanes[lane] && (lanes[lane]->line != any.line || std::strcmp(lanes[lane]->file, any.file) != 0)) {
                fail(l, CUEMU_ERROR_WARP_COLLECTIVE,
                     "warp " + std::to_string(warp) + " lanes are in different wmma calls: " + describe_waiting(l));
                return;
            }
        }
    }
    std::uint64_t ballot = 0;
    std::uint32_t sum = 0, band = ~0u, bor = 0, bxor = 0;
    std::uint32_t umin = ~0u, umax = 0;
    std::int32_t imin = INT32_MAX, imax = INT32_MIN;
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (!lanes[lane]) continue;
        const std::uint64_t v = lanes[lane]->value;
        const auto v32 = static_cast<std::uint32_t>(v);
        if (v) ballot |= 1ull << lane;
        sum += v32;
        band &= v32;
        bor |= v32;
        bxor ^= v32;
        umin = std::min(umin, v32);
        umax = std::max(umax, v32);
        imin = std::min(imin, static_cast<std::int32_t>(v32));
        imax = std::max(imax, static_cast<std::int32_t>(v32));
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
        Fiber* f = lanes[lane];
        if (!f) continue;
        switch (f->op) {
            case WarpOp::shfl_idx:
            case WarpOp::shfl_up:
            case WarpOp::shfl_down:
            case WarpOp::shfl_xor: {
                const int src = shuffle_source(*f, lane);
                if (src < 0) {
                    f->result = f->value;
                } else if (src < 32 && lanes[src]) {
                    f->result = lanes[src]->value;
                } else {
                    // Reading a lane that is not taking part is undefined in CUDA; all-ones
                    // bits (NaN, -1) make a kernel that relies on it fail its checks.
                    f->result = ~0ull;
                }
                break;
            }
            case WarpOp::ballot: f->result = ballot; break;
            case WarpOp::any: f->result = ballot != 0; break;
            case WarpOp::all: f->result = ballot == members; break;
            case WarpOp::syncwarp:
            case WarpOp::wmma: f->result = 0; break;
            case WarpOp::reduce_add: f->result = sum; break;
            case WarpOp::reduce_min_u: f->result = umin; break;
            case WarpOp::reduce_max_u: f->result = umax; break;
            case WarpOp::reduce_min_i: f->result = static_cast<std::uint32_t>(imin); break;
            case WarpOp::reduce_max_i: f->result = static_cast<std::uint32_t>(imax); break;
            case WarpOp::reduce_and: f->result = band; break;
            case WarpOp::reduce_or: f->result = bor; break;
            case WarpOp::reduce_xor: f->result = bxor; break;
            case WarpOp::match_any:
            case WarpOp::match_all: {
                const std::uint64_t keep = f->arg >= 8 ? ~0ull : ((1ull << (8 * f->arg)) - 1);
                unsigned same = 0;
                for (unsigned o = 0; o < 32; ++o) {
                    if (lanes[o] && (lanes[o]->value & keep) == (f->value & keep)) same |= 1u << o;
                }
                if (f->op == WarpOp::match_any) {
                    f->result = same;
                } else {
                    f->pred_result = same == members;
                    f->result = same == members ? members : 0;
                }
                break;
            }
        }
    }
    l.warp_waiting[warp] &= ~members;
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (lanes[lane]) release(l, *lanes[lane]);
    }
}

// Completes every collective of `warp` whose participants (mask ∩ live lanes) have all
// arrived with the same mask.
void try_complete_warp(Launch& l, unsigned warp) {
    unsigned pending = l.warp_waiting[warp];
    while (pending != 0 && l.status == CUEMU_OK) {
        const unsigned lane = static_cast<unsigned>(std::countr_zero(pending));
        const unsigned mask = l.fibers[warp * 32 + lane].mask;
        const unsigned needed = mask & l.warp_live[warp];
        unsigned same_mask = 0;
        for (unsigned m = l.warp_waiting[warp]; m != 0; m &= m - 1) {
            const unsigned o = static_cast<unsigned>(std::countr_zero(m));
            if (l.fibers[warp * 32 + o].mask == mask) same_mask |= 1u << o;
        }
        pending &= ~same_mask;
        if ((needed & ~same_mask) == 0) complete_warp_op(l, warp, same_mask);
    }
}

// ---- scheduler ----------------------------------------------------------------------------

std::uint64_t next_random(Launch& l) {
    // xorshift64*: cheap, and reproducible from the seed.
    l.rng ^= l.rng >> 12;
    l.rng ^= l.rng << 25;
    l.rng ^= l.rng >> 27;
    return l.rng * 0x2545F4914F6CDD1Dull;
}

int pick_next(Launch& l) {
    const ThreadSet& r = l.runnable;
    const int n = static_cast<int>(l.n_threads);
    switch (t_settings.schedule) {
        case CUEMU_SCHEDULE_FORWARD: {
            const int next = r.first_from(static_cast<unsigned>(l.last_picked + 1));
            return next >= 0 ? next : r.first_from(0);
        }
        case CUEMU_SCHEDULE_REVERSE: {
            const int next = r.last_upto(l.last_picked - 1);
            return next >= 0 ? next : r.last_upto(n - 1);
        }
        case CUEMU_SCHEDULE_GREEDY_LOW: return r.first_from(0);
        case CUEMU_SCHEDULE_GREEDY_HIGH: return r.last_upto(n - 1);
        case CUEMU_SCHEDULE_RANDOM: {
            const int start = static_cast<int>(next_random(l) % static_cast<std::uint64_t>(n));
            const int next = r.first_from(static_cast<unsigned>(start));
            return next >= 0 ? next : r.first_from(0);
        }
    }
    return r.first_from(0);
}

void handle_request(Launch& l, Fiber& f) {
    const unsigned warp = f.index / 32;
    const unsigned lane = f.index % 32;
    const Request request = f.request;
    f.request = Request::none;
    switch (request) {
        case Request::none: break;
        case Request::exit:
            f.state = FiberState::exited;
            ++l.n_exited;
            l.warp_live[warp] &= ~(1u << lane);
            try_complete_warp(l, warp);
            try_complete_barrier(l);
            break;
        case Request::abort:
            fail(l, CUEMU_ERROR_KERNEL,
                 l.abort_reason + " at " + site(f.file, f.line) + " (thread t" + std::to_string(f.index) + ")");
            break;
        case Request::barrier:
            f.state = FiberState::at_barrier;
            ++l.barrier_waiting;
            try_complete_barrier(l);
            break;
        case Request::warp_op:
            if ((f.mask & (1u << lane)) == 0) {
                fail(l, CUEMU_ERROR_WARP_COLLECTIVE,
                     std::string(op_name(f.op)) + " at " + site(f.file, f.line) + ": thread t" +
                         std::to_string(f.index) + " is not in its own mask");
                break;
            }
            if (f.width <= 0 || f.width > 32 || (f.width & (f.width - 1)) != 0) {
                fail(l, CUEMU_ERROR_WARP_COLLECTIVE,
                     std::string(op_name(f.op)) + " at " + site(f.file, f.line) + ": width " +
                         std::to_string(f.width) + " is not a power of two up to 32");
                break;
            }
            f.state = FiberState::at_warp_op;
            l.warp_waiting[warp] |= 1u << lane;
            try_complete_warp(l, warp);
            break;
    }
}

void run_block(Launch& l) {
    for (unsigned i = 0; i < l.n_threads; ++i) {
        Fiber& f = l.fibers[i];
        f.index = i;
        f.tid = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
        f.state = FiberState::runnable;
        f.request = Request::none;
        init_fiber_stack(l, f);
    }
    l.runnable.reset(l.n_threads);
    for (unsigned i = 0; i < l.n_threads; ++i) l.runnable.set(i);
    l.n_exited = 0;
    l.barrier_waiting = 0;
    for (unsigned w = 0; w < l.n_warps; ++w) {
        const unsigned lanes = std::min(32u, l.n_threads - w * 32);
        l.warp_live[w] = lanes == 32 ? ~0u : ((1u << lanes) - 1);
        l.warp_waiting[w] = 0;
    }
    l.last_picked = t_settings.schedule == CUEMU_SCHEDULE_REVERSE ? static_cast<int>(l.n_threads) : -1;

    while (l.status == CUEMU_OK) {
        const int next = pick_next(l);
        if (next < 0) {
            if (l.n_exited == l.n_threads) return;
            fail(l, CUEMU_ERROR_DEADLOCK,
                 "deadlock: no thread can continue (" + std::to_string(l.n_exited) + " of " +
                     std::to_string(l.n_threads) + " exited): " + describe_waiting(l));
            break;
        }
        l.last_picked = next;
        Fiber& f = l.fibers[static_cast<unsigned>(next)];
        l.runnable.clear(f.index);
        l.current = &f;
        threadIdx = f.tid;
        switch_to_fiber(l, f);
        l.current = nullptr;
        handle_request(l, f);
    }
    // The block was abandoned: fibers that did not exit leave frames on their stacks.
    for (unsigned i = 0; i < l.n_threads; ++i) {
        if (l.fibers[i].state != FiberState::exited) l.fibers[i].stack->needs_unpoison = true;
    }
}

void death_callback() {
    if (t_launch) {
        std::fprintf(stderr, "cuemu: error raised in blockIdx=(%u,%u,%u) threadIdx=(%u,%u,%u)\n", blockIdx.x,
                     blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    }
}

bool valid_config(cuemu_dim3 grid, cuemu_dim3 block, std::uint32_t smem, std::string* why) {
    const unsigned long long threads = 1ull * block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
        *why = "grid has a zero dimension";
    } else if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        *why = "grid exceeds (2^31-1, 65535, 65535)";
    } else if (threads == 0) {
        *why = "block has a zero dimension";
    } else if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > kMaxThreadsPerBlock) {
        *why = "block exceeds 1024 threads (x, y ≤ 1024, z ≤ 64)";
    } else if (smem > CUEMU_MAX_DYN_SMEM_BYTES) {
        *why = "dynamic shared memory " + std::to_string(smem) + " B exceeds " +
               std::to_string(CUEMU_MAX_DYN_SMEM_BYTES) + " B";
    } else {
        return true;
    }
    return false;
}

}  // namespace

// ---- hooks called from kernel code --------------------------------------------------------

int block_barrier(BarrierKind kind, int predicate, const char* file, unsigned line) {
    Launch& l = *t_launch;
    Fiber& f = *l.current;
    f.request = Request::barrier;
    f.barrier_kind = kind;
    f.predicate = predicate;
    f.file = file;
    f.line = line;
    switch_to_scheduler(l, f);
    return static_cast<int>(f.result);
}

std::uint64_t warp_collective(WarpOp op, unsigned mask, std::uint64_t value, int arg, int width, int* pred_out,
                              const char* file, unsigned line) {
    Launch& l = *t_launch;
    Fiber& f = *l.current;
    f.request = Request::warp_op;
    f.op = op;
    f.mask = mask;
    f.value = value;
    f.arg = arg;
    f.width = width;
    f.file = file;
    f.line = line;
    switch_to_scheduler(l, f);
    if (pred_out) *pred_out = f.pred_result;
    return f.result;
}

void kernel_error(const char* what, const char* file, unsigned line) {
    Launch& l = *t_launch;
    Fiber& f = *l.current;
    l.abort_reason = what;
    f.request = Request::abort;
    f.file = file;
    f.line = line;
    switch_to_scheduler(l, f);
    __builtin_trap();  // an aborted launch never resumes its fibers
}

unsigned live_lanes() {
    const Launch& l = *t_launch;
    return l.warp_live[l.current->index / 32];
}

long long clock_ticks() { return ++t_clock; }

}  // namespace cuemu

// ---- C ABI --------------------------------------------------------------------------------

using namespace cuemu;

extern "C" int cuemu_launch(cuemu_dim3 grid, cuemu_dim3 block, uint32_t shared_mem_bytes, cuemu_thunk thunk,
                            void** params) {
    t_last_error.clear();
    std::string why;
    if (t_launch) {
        t_last_error = "cuemu_launch called from inside a kernel (dynamic parallelism is not emulated)";
        return CUEMU_ERROR_INVALID_CONFIG;
    }
    if (!thunk) {
        t_last_error = "no kernel";
        return CUEMU_ERROR_INVALID_CONFIG;
    }
    if (!valid_config(grid, block, shared_mem_bytes, &why)) {
        t_last_error = "invalid launch configuration: " + why;
        return CUEMU_ERROR_INVALID_CONFIG;
    }
    static const bool death_callback_set = [] {
        if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(&death_callback);
        return true;
    }();
    (void)death_callback_set;

    Launch l;
    l.thunk = thunk;
    l.params = params;
    l.n_threads = block.x * block.y * block.z;
    l.n_warps = (l.n_threads + 31) / 32;
    l.fibers.resize(l.n_threads);
    l.warp_live.assign(l.n_warps, 0);
    l.warp_waiting.assign(l.n_warps, 0);
    if (!t_stacks.ensure(l.n_threads)) {
        t_last_error = "cannot map fiber stacks";
        return CUEMU_ERROR_INVALID_CONFIG;
    }
    for (unsigned i = 0; i < l.n_threads; ++i) l.fibers[i].stack = &t_stacks.stacks[i];
    l.rng = t_settings.seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
    if (l.rng == 0) l.rng = 1;

    unsigned char* smem = dyn_smem();
    if (!t_smem_poisoned) {
        std::memset(smem, 0xff, CUEMU_MAX_DYN_SMEM_BYTES);
        t_smem_poisoned = true;
    }
    const std::size_t canary_end = std::min<std::size_t>(CUEMU_MAX_DYN_SMEM_BYTES, shared_mem_bytes + kSmemCanaryBytes);

    gridDim = dim3(grid.x, grid.y, grid.z);
    blockDim = dim3(block.x, block.y, block.z);
    const unsigned long long n_blocks = 1ull * grid.x * grid.y * grid.z;
    const bool reverse = t_settings.schedule == CUEMU_SCHEDULE_REVERSE;
    t_launch = &l;
    for (unsigned long long k = 0; k < n_blocks && l.status == CUEMU_OK; ++k) {
        const unsigned long long b = reverse ? n_blocks - 1 - k : k;
        blockIdx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                         static_cast<unsigned>(b / (1ull * grid.x * grid.y))};
        // Fresh poison for every block, so a read of dynamic shared memory that no thread of
        // this block wrote sees NaN / -1 rather than a previous block's values.
        std::memset(smem, 0xff, shared_mem_bytes);
        run_block(l);
        if (l.status == CUEMU_OK) {
            for (std::size_t i = shared_mem_bytes; i < canary_end; ++i) {
                if (smem[i] != 0xff) {
                    fail(l, CUEMU_ERROR_SHARED_OVERFLOW,
                         "dynamic shared memory written at byte " + std::to_string(i) + ", past the launch's " +
                             std::to_string(shared_mem_bytes) + " bytes");
                    break;
                }
            }
        }
    }
    t_launch = nullptr;
    // Between launches the whole storage holds the poison, so the next launch's canary check
    // sees only its own writes.
    std::memset(smem, 0xff, canary_end);
    if (l.status != CUEMU_OK) t_last_error = l.message;
    return l.status;
}

extern "C" void cuemu_set_schedule(cuemu_schedule schedule, uint64_t seed) {
    t_settings.schedule = schedule;
    t_settings.seed = seed;
}

extern "C" void cuemu_set_strict(int strict) { t_settings.strict = strict != 0; }

extern "C" const char* cuemu_last_error(void) { return t_last_error.c_str(); }

extern "C" uint32_t cuemu_max_dynamic_shared_bytes(void) { return CUEMU_MAX_DYN_SMEM_BYTES; }
