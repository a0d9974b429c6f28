// Attention over the KV cache: cache[pos, kv_head, head_dim] in f32, grouped-query heads.

// Writes `tokens` new keys/values at positions start.. into the cache. Grid (tokens, kv_heads).
extern "C" __global__ void kv_append(const float* k, const float* v, float* k_cache,
                                     float* v_cache, int start, int kv_heads, int head_dim) {
    size_t src = ((size_t)blockIdx.x * kv_heads + blockIdx.y) * head_dim;
    size_t dst = ((size_t)(start + blockIdx.x) * kv_heads + blockIdx.y) * head_dim;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
        k_cache[dst + i] = k[src + i];
        v_cache[dst + i] = v[src + i];
    }
}

// One query row against keys 0..len: softmax(q.k * scale) . v. Scores live in dynamic shared
// memory (len floats); the block is one (token, head).
__device__ void attend(const float* q, const float* k_cache, const float* v_cache, float* out,
                       int len, int kv_heads, int kvh, int head_dim, float scale) {
    extern __shared__ float scores[];
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float* kj = k_cache + ((size_t)j * kv_heads + kvh) * head_dim;
        float d = 0.0f;
        for (int i = 0; i < head_dim; i++) d += q[i] * kj[i];
        scores[j] = d * scale;
    }
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_max(m);
    float s = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        float e = expf(scores[j] - m);
        scores[j] = e;
        s += e;
    }
    s = block_sum(s);
    float inv = 1.0f / s;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < len; j++)
            acc += scores[j] * v_cache[((size_t)j * kv_heads + kvh) * head_dim + i];
        out[i] = acc * inv;
    }
}

// The local KV head of local query head h: global query head q_head0 + h belongs to global KV
// head (q_head0 + h) / group, held here from kv_head0 on (the plan's local_kv_of; a rank's query
// heads need not start on a group boundary).
__device__ __forceinline__ int kv_of(int h, int q_head0, int group, int kv_head0) {
    return (q_head0 + h) / group - kv_head0;
}

// Prefill: token t (absolute position past + t) sees positions 0..=past+t. Grid (tokens, heads).
extern "C" __global__ void attention_prefill(const float* q, const float* k_cache,
                                             const float* v_cache, float* out, int past,
                                             int heads, int kv_heads, int head_dim, float scale,
                                             int q_head0, int group, int kv_head0) {
    int t = blockIdx.x, h = blockIdx.y;
    size_t row = ((size_t)t * heads + h) * head_dim;
    attend(q + row, k_cache, v_cache, out + row, past + t + 1, kv_heads,
           kv_of(h, q_head0, group, kv_head0), head_dim, scale);
}

// Decode: one new token per step over the whole cache (len positions). Grid (heads).
extern "C" __global__ void attention_decode(const float* q, const float* k_cache,
                                            const float* v_cache, float* out, int len, int heads,
                                            int kv_heads, int head_dim, float scale, int q_head0,
                                            int group, int kv_head0) {
    int h = blockIdx.x;
    size_t row = (size_t)h * head_dim;
    attend(q + row, k_cache, v_cache, out + row, len, kv_heads,
           kv_of(h, q_head0, group, kv_head0), head_dim, scale);
}
