// tprun's CUDA emulator, kernel side: forced in front of every module the stand-in NVRTC
// compiles with the host C++ compiler (emu.cpp). Maps what the .cu sources use onto the
// emulator's runtime: per-OS-thread indices the block scheduler rewrites at every fiber switch,
// `__shared__` as thread-local storage (one OS thread runs one block at a time), barriers and
// warp exchanges through the runtime's function table, atomics and the system-scope
// acquire/release helpers (prelude.cuh's host branch) as GCC builtins.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <cmath>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __shared__ static thread_local

struct uint3 { unsigned x, y, z; };
typedef uint3 dim3;

struct EmuThread { uint3 tid, bid, bdim, gdim; void* dynamic_shared; };
struct EmuApi {
    int version;
    void (*syncthreads)(const void* site);
    uint64_t (*shfl_xor)(unsigned mask, uint64_t bits, int lane_mask, int width);
    void (*poll)();
};
extern "C" {
thread_local EmuThread __emu_thread;
const EmuApi* __emu_api = nullptr;
__attribute__((visibility("default"))) EmuThread* __emu_thread_state() { return &__emu_thread; }
__attribute__((visibility("default"))) int __emu_bind(const EmuApi* api) {
    __emu_api = api;
    return 1;
}
}

#define threadIdx (__emu_thread.tid)
#define blockIdx (__emu_thread.bid)
#define blockDim (__emu_thread.bdim)
#define gridDim (__emu_thread.gdim)
#define warpSize 32

// The call site (a static per expansion) lets the scheduler tell two different barriers apart.
#define __syncthreads() __emu_api->syncthreads(({ static const char __emu_site = 0; &__emu_site; }))

template <typename T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = __emu_api->shfl_xor(mask, bits, lane_mask, width);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
using std::isnan;
using std::isinf;

static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
static inline T atomicCAS(T* p, T compare, T val) {
    __atomic_compare_exchange_n(p, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}
template <typename T>
static inline T atomicAdd(T* p, T v) {
    if constexpr (std::is_floating_point<T>::value) {
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);
        while (!__atomic_compare_exchange_n(p, &old, old + v, false, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST)) {
        }
        return old;
    } else {
        return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    }
}
template <typename T>
static inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }

// prelude.cuh's host branch of the system-scope flag helpers. A poll yields to the block's other
// fibers (and, when every fiber is polling, to other processes).
static inline void tprun_host_st_release_sys(unsigned long long* p, unsigned long long v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline unsigned long long tprun_host_ld_acquire_sys(const unsigned long long* p) {
    unsigned long long v = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    __emu_api->poll();
    return v;
}
static inline unsigned long long tprun_host_now_ns() {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ull + (unsigned long long)t.tv_nsec;
}

// The launch wrappers the stand-in NVRTC appends for every `extern "C" __global__` kernel:
// cuLaunchKernel's `void** params` unpacked as the kernel's own parameter types, and the
// parameters' sizes (the driver copies the values at launch, as CUDA does).
template <typename T>
using __emu_bare = typename std::remove_cv<typename std::remove_reference<T>::type>::type;
template <typename... A, size_t... I>
static inline void __emu_call(void (*f)(A...), void** a, std::index_sequence<I...>) {
    f(*static_cast<__emu_bare<A>*>(a[I])...);
}
template <typename... A>
static inline void __emu_invoke(void (*f)(A...), void** a) {
    __emu_call(f, a, std::index_sequence_for<A...>{});
}
template <typename... A>
struct __emu_sizes_of {
    static constexpr unsigned n = sizeof...(A);
    static constexpr unsigned sizes[sizeof...(A) + 1] = {(unsigned)sizeof(__emu_bare<A>)..., 0};
};
template <typename... A>
static inline const unsigned* __emu_sizes(void (*)(A...), unsigned* n) {
    *n = sizeof...(A);
    return __emu_sizes_of<A...>::sizes;
}
#define __EMU_ENTRY(name)                                                                      \
    extern "C" __attribute__((visibility("default"))) void __emu_entry_##name(void** a) {       \
        __emu_invoke(name, a);                                                                 \
    }                                                                                          \
    extern "C" __attribute__((visibility("default"))) const unsigned* __emu_params_##name(      \
        unsigned* n) {                                                                         \
        return __emu_sizes(name, n);                                                           \
    }
