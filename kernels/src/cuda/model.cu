// Element-wise and row kernels of the Qwen2 forward pass. Activations f32; norm weights, biases and
// the embedding table f32, as the CPU path keeps them (the projections' bf16 go through cuBLAS).

// out[t, :] = table[ids[t] - row_start, :] for ids in this rank's vocabulary shard, else zeros
// (the other ranks' rows arrive through the all-reduce). Grid: one block per token.
extern "C" __global__ void embedding_gather(const float* table, const int* ids, float* out,
                                            int hidden, int row_start, int rows) {
    int t = blockIdx.x;
    int r = ids[t] - row_start;
    bool mine = r >= 0 && r < rows;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(size_t)t * hidden + i] = mine ? table[(size_t)r * hidden + i] : 0.0f;
}

// y = x / sqrt(mean(x^2) + eps) * w, one block per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int hidden,
                                    float eps) {
    const float* xr = x + (size_t)blockIdx.x * hidden;
    float* yr = y + (size_t)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    float inv = rsqrtf(block_sum(ss) / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
}

// Rotary embedding, rotate-half form, in place on x[t, head, :]. Grid (tokens, heads).
// inv_freq[head_dim / 2] is the CPU path's table (uploaded once), so the angles pos * inv_freq
// are the same f32 products as on the CPU.
extern "C" __global__ void rope(float* x, const int* pos, const float* inv_freq, int heads,
                                int head_dim) {
    int t = blockIdx.x, h = blockIdx.y, half = head_dim / 2;
    float* v = x + ((size_t)t * heads + h) * head_dim;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf((float)pos[t] * inv_freq[i], &s, &c);
        float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

// out = silu(gate) * up.
extern "C" __global__ void silu_gate(const float* gate, const float* up, float* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// x[r, c] += bias[c] for `rows` rows of `cols`.
extern "C" __global__ void bias_add(float* x, const float* bias, int rows, int cols) {
    int n = rows * cols;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        x[i] += bias[i % cols];
}

// x += y (the residual adds).
extern "C" __global__ void add_inplace(float* x, const float* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        x[i] += y[i];
}

// An f32 activation as two bf16 terms, x = hi + lo to about 2^-17 relative: out[i] = hi,
// out[n + i] = lo (x - hi is exact in f32). One bf16 GEMM over both halves (2n rows) and
// sum_halves then give W x with f32-grade activations, reading W once.
extern "C" __global__ void f32_to_bf16_split(const float* in, bf16_t* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float x = in[i];
        bf16_t hi = f32_to_bf16(x);
        out[i] = hi;
        out[(size_t)n + i] = f32_to_bf16(x - bf16_to_f32(hi));
    }
}

// y[i] = halves[i] + halves[n + i]: the two terms' products added.
extern "C" __global__ void sum_halves(const float* halves, float* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        y[i] = halves[i] + halves[(size_t)n + i];
}

// Largest logit of this rank's shard and its global index (offset added); ties go to the lowest
// index, NaN never wins, like the CPU argmax. One block; out_val/out_idx one element each.
extern "C" __global__ void argmax(const float* x, int n, int index_offset, float* out_val,
                                  int* out_idx) {
    __shared__ float sv[1024];
    __shared__ int si[1024];
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = x[i];
        if (v > best || (v == best && i < idx)) { best = v; idx = i; }
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = idx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float ov = sv[threadIdx.x + s];
            int oi = si[threadIdx.x + s];
            if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
                sv[threadIdx.x] = ov;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        *out_val = sv[0];
        // Nothing won (every logit NaN, or an empty shard): -1, the host's "no candidate".
        *out_idx = si[0] == 0x7fffffff ? -1 : si[0] + index_offset;
    }
}

// Sampling, step 1: x = exp((x - max) / temperature) in place and *out_sum = sum(x). One block.
extern "C" __global__ void softmax_temperature(float* x, int n, float inv_temp, float* out_sum) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float e = expf((x[i] - m) * inv_temp);
        x[i] = e;
        s += e;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) *out_sum = s;
}

// Sampling, step 2: the first index whose running sum of weights reaches u * total (inverse CDF).
// Sequential in one thread: the vocabulary shard is small next to the matmuls around it, and a
// fixed order keeps the draw reproducible for a given u.
extern "C" __global__ void sample_inverse_cdf(const float* w, int n, float total, float u,
                                              int* out_idx) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    float target = u * total, run = 0.0f;
    int pick = n - 1;
    for (int i = 0; i < n; i++) {
        run += w[i];
        if (run >= target) { pick = i; break; }
    }
    *out_idx = pick;
}
