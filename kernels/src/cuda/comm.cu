// Collectives over CUDA IPC. Every rank has one slab (collectives::cuda_plan::SlabLayout):
//   [0, 4)            error word: 0, or the first timeout (op << 16 | phase << 8 | peer) | 1 << 31
//   [flags_off, ...)  u64 flags [phase][src rank][block]: block b of rank src wrote `seq` there
//   [data_off, ...)   the staged payload
// `slabs` is a device array of every rank's slab address as this process maps it (its own
// included). A block signals every peer with a release store at system scope and waits for every
// peer's flag with acquire loads; the wait gives up after timeout_ns, sets the error word and
// returns, so a dead peer becomes a CommError on the host instead of a hung GPU.
// Reductions run in f32 in rank order (acc = x0; acc = op(acc, x1) ...) and round once, so the
// one-shot and two-shot algorithms and the CPU path give the same bits.

#define PHASE_COPIED 0
#define PHASE_REDUCED 1
#define PHASE_DONE 2

struct Slabs {
    const u64* base;
    u64 flags_off, data_off;
    int rank, world, max_blocks, op_id;
    u64 seq;
    u64 timeout_ns;
};

__device__ __forceinline__ u64* flag_at(const Slabs& s, int owner, int phase, int src) {
    u64* f = (u64*)(s.base[owner] + s.flags_off);
    return f + ((size_t)phase * s.world + src) * s.max_blocks + blockIdx.x;
}

__device__ __forceinline__ char* data_of(const Slabs& s, int owner) {
    return (char*)(s.base[owner] + s.data_off);
}

// Block-level rendezvous with every peer for one phase. Returns false after a timeout (the error
// word is set); the whole block then stops.
__device__ bool sync_phase(const Slabs& s, int phase) {
    __shared__ int failed;
    if (threadIdx.x == 0) failed = 0;
    __syncthreads();
    if (threadIdx.x < s.world) {
        int p = threadIdx.x;
        __threadfence_system();
        st_release_sys(flag_at(s, p, phase, s.rank), s.seq);
        const u64* mine = flag_at(s, s.rank, phase, p);
        u64 start = now_ns();
        // "Flag has reached seq": flags only grow, and 64 bits never wrap, so a block that has
        // not run for any number of operations still reads its stale flag as not arrived.
        while (ld_acquire_sys(mine) < s.seq) {
            if (now_ns() - start > s.timeout_ns) {
                u32 code = 0x80000000u | ((u32)s.op_id << 16) | ((u32)phase << 8) | (u32)p;
                atomicCAS((u32*)s.base[s.rank], 0u, code);
                failed = 1;
                break;
            }
        }
    }
    __syncthreads();
    return failed == 0;
}

__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, u64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, u64 i, float v) {
    p[i] = isnan(v) ? __uint_as_float(0x7fc00000u) : v;
}
__device__ __forceinline__ void st(bf16_t* p, u64 i, float v) {
    p[i] = isnan(v) ? (bf16_t)0x7fc0 : f32_to_bf16(v);
}

// ReduceOp: 0 sum, 1 product, 2 max, 3 min; max and min propagate NaN.
__device__ __forceinline__ float combine(int op, float a, float b) {
    switch (op) {
    case 0: return a + b;
    case 1: return a * b;
    case 2: return (isnan(a) || isnan(b)) ? __uint_as_float(0x7fc00000u) : (b > a ? b : a);
    default: return (isnan(a) || isnan(b)) ? __uint_as_float(0x7fc00000u) : (b < a ? b : a);
    }
}

template <typename T>
__device__ void reduce_range(const Slabs& s, int op, T* out, u64 lo, u64 hi) {
    for (u64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float acc = ld((const T*)data_of(s, 0), i);
        for (int q = 1; q < s.world; q++) acc = combine(op, acc, ld((const T*)data_of(s, q), i));
        st(out, i, acc);
    }
}

template <typename T>
__device__ void copy_elems(T* dst, const T* src, u64 lo, u64 hi) {
    for (u64 i = lo + threadIdx.x; i < hi; i += blockDim.x) dst[i] = src[i];
}

__device__ __forceinline__ u64 min_u64(u64 a, u64 b) { return a < b ? a : b; }

// One-shot all-reduce: stage, rendezvous, every rank reads every peer. For small messages.
template <typename T>
__device__ void all_reduce_oneshot(Slabs s, int op, const T* in, T* out, u64 n) {
    u64 per = (n + gridDim.x - 1) / gridDim.x;
    u64 lo = min_u64(n, blockIdx.x * per), hi = min_u64(n, lo + per);
    copy_elems((T*)data_of(s, s.rank), in, lo, hi);
    if (!sync_phase(s, PHASE_COPIED)) return;
    reduce_range(s, op, out, lo, hi);
    sync_phase(s, PHASE_DONE);
}

// Reduce-scatter in segments of `seg` elements (segment r is rank r's); with `gather`, then
// all-gather of the reduced segments (two-shot all-reduce, `out` is n elements), else `out`
// receives rank r's segment only. Block b owns sub-range b of every segment in every phase, so
// its per-block flags cover exactly the data it reads next.
template <typename T>
__device__ void reduce_scatter(Slabs s, int op, const T* in, T* out, u64 n, u64 seg,
                               int gather) {
    u64 sub = (seg + gridDim.x - 1) / gridDim.x;
    T* own = (T*)data_of(s, s.rank);
    for (int g = 0; g < s.world; g++) {
        u64 lo = min_u64(n, g * seg + blockIdx.x * sub);
        u64 hi = min_u64(min_u64(n, (g + 1) * seg), lo + sub);
        copy_elems(own, in, lo, hi);
    }
    if (!sync_phase(s, PHASE_COPIED)) return;
    u64 lo = min_u64(n, s.rank * seg + blockIdx.x * sub);
    u64 hi = min_u64(min_u64(n, (s.rank + 1) * seg), lo + sub);
    if (!gather) {
        for (u64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
            float acc = ld((const T*)data_of(s, 0), i);
            for (int q = 1; q < s.world; q++)
                acc = combine(op, acc, ld((const T*)data_of(s, q), i));
            st(out, i - s.rank * seg, acc);
        }
        sync_phase(s, PHASE_DONE);
        return;
    }
    // In place in this rank's own segment: no peer reads it before PHASE_REDUCED.
    reduce_range(s, op, own, lo, hi);
    if (!sync_phase(s, PHASE_REDUCED)) return;
    for (int g = 0; g < s.world; g++) {
        u64 glo = min_u64(n, g * seg + blockIdx.x * sub);
        u64 ghi = min_u64(min_u64(n, (g + 1) * seg), glo + sub);
        copy_elems(out, (const T*)data_of(s, g), glo, ghi);
    }
    sync_phase(s, PHASE_DONE);
}

#define SLABS_PARAMS                                                                           \
    const u64 *slabs, u64 flags_off, u64 data_off, int rank, int world, int max_blocks, u64 seq, \
        u64 timeout_ns
#define SLABS(op_id) Slabs{slabs, flags_off, data_off, rank, world, max_blocks, op_id, seq, timeout_ns}

extern "C" __global__ void all_reduce_oneshot_f32(SLABS_PARAMS, int op, const float* in,
                                                  float* out, u64 n) {
    all_reduce_oneshot(SLABS(1), op, in, out, n);
}
extern "C" __global__ void all_reduce_oneshot_bf16(SLABS_PARAMS, int op, const bf16_t* in,
                                                   bf16_t* out, u64 n) {
    all_reduce_oneshot(SLABS(1), op, in, out, n);
}
extern "C" __global__ void all_reduce_twoshot_f32(SLABS_PARAMS, int op, const float* in,
                                                  float* out, u64 n, u64 seg) {
    reduce_scatter(SLABS(1), op, in, out, n, seg, 1);
}
extern "C" __global__ void all_reduce_twoshot_bf16(SLABS_PARAMS, int op, const bf16_t* in,
                                                   bf16_t* out, u64 n, u64 seg) {
    reduce_scatter(SLABS(1), op, in, out, n, seg, 1);
}
extern "C" __global__ void reduce_scatter_f32(SLABS_PARAMS, int op, const float* in, float* out,
                                              u64 n, u64 seg) {
    reduce_scatter(SLABS(3), op, in, out, n, seg, 0);
}
extern "C" __global__ void reduce_scatter_bf16(SLABS_PARAMS, int op, const bf16_t* in,
                                               bf16_t* out, u64 n, u64 seg) {
    reduce_scatter(SLABS(3), op, in, out, n, seg, 0);
}

// All-gather of `bytes` per rank into out[world * bytes], in 4-byte words when bytes % 4 == 0.
extern "C" __global__ void all_gather(SLABS_PARAMS, const char* in, char* out, u64 bytes) {
    Slabs s = SLABS(2);
    bool words = (bytes & 3) == 0;
    u64 n = words ? bytes / 4 : bytes;
    u64 per = (n + gridDim.x - 1) / gridDim.x;
    u64 lo = min_u64(n, blockIdx.x * per), hi = min_u64(n, lo + per);
    if (words) copy_elems((u32*)data_of(s, rank), (const u32*)in, lo, hi);
    else copy_elems(data_of(s, rank), in, lo, hi);
    if (!sync_phase(s, PHASE_COPIED)) return;
    for (int q = 0; q < world; q++) {
        if (words) copy_elems((u32*)out + q * n, (const u32*)data_of(s, q), lo, hi);
        else copy_elems(out + q * n, (const char*)data_of(s, q), lo, hi);
    }
    sync_phase(s, PHASE_DONE);
}

// Broadcast `bytes` from root's buf to every rank's buf (in place).
extern "C" __global__ void broadcast(SLABS_PARAMS, char* buf, u64 bytes, int root) {
    Slabs s = SLABS(4);
    u64 per = (bytes + gridDim.x - 1) / gridDim.x;
    u64 lo = min_u64(bytes, blockIdx.x * per), hi = min_u64(bytes, lo + per);
    if (rank == root) copy_elems(data_of(s, rank), (const char*)buf, lo, hi);
    if (!sync_phase(s, PHASE_COPIED)) return;
    if (rank != root) copy_elems(buf, (const char*)data_of(s, root), lo, hi);
    sync_phase(s, PHASE_DONE);
}

// Every rank's block 0 meets every peer's: one launch with one block.
extern "C" __global__ void barrier(SLABS_PARAMS) {
    Slabs s = SLABS(5);
    sync_phase(s, PHASE_DONE);
}
