//! The host-side plan of the device forward (issue 20), in plain Rust so it is unit-tested on
//! machines without a GPU, as `collectives::cuda_plan` is for the comm kernels: the grid, block,
//! dynamic shared memory and argument list of every model kernel (kernels/src/cuda/model.cu and
//! attention.cu, checked against the sources' signatures by the tests), and the cuBLAS call
//! that computes a row-major `y = x · Wᵀ`.
//!
//! Nothing here has run on a GPU.

/// Threads per block of the row and element-wise kernels.
pub const THREADS: u32 = 256;
/// Threads of `argmax`: its shared arrays hold 1024 entries, so at most 1024.
pub const ARGMAX_THREADS: u32 = 1024;
/// Blocks of the grid-stride element-wise kernels, at most.
pub const MAX_BLOCKS: u32 = 1024;
/// The dynamic shared memory the attention kernels may use on a GPU whose opt-in limit per block
/// is `optin` bytes (cuDeviceGetAttribute's MAX_SHARED_MEMORY_PER_BLOCK_OPTIN): what their static
/// arrays leave. Attention keeps one f32 score per position, so a launch attends to at most a
/// quarter of this many positions.
pub fn attention_dynamic_bytes(optin: i32) -> i32 {
    optin - ATTENTION_STATIC_SHARED
}

/// kernels::cuda::sources::ATTENTION_STATIC_SHARED_MAX, the bound the NVRTC tests hold the
/// CUBIN's figure to; a copy, because this module builds without the `cuda` feature (the device
/// model's tests check they are equal).
pub const ATTENTION_STATIC_SHARED: i32 = 4096;

/// One kernel argument, in the order the kernel declares it.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    /// A device buffer, by role (`"x"`, `"k_cache"`).
    Buf(&'static str),
    I32(i32),
    F32(f32),
}

/// A launch: kernel name, grid, block, dynamic shared bytes, arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
    pub args: Vec<Arg>,
}

fn i32_of(n: usize) -> i32 {
    i32::try_from(n).expect("kernel size argument exceeds i32")
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).expect("grid dimension exceeds u32")
}

/// A grid-stride launch over `n` elements.
fn elementwise(kernel: &'static str, n: usize, args: Vec<Arg>) -> Launch {
    let blocks = u32_of(n.div_ceil(THREADS as usize)).clamp(1, MAX_BLOCKS);
    Launch {
        kernel,
        grid: (blocks, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
        args,
    }
}

fn rows(kernel: &'static str, grid: (u32, u32, u32), threads: u32, args: Vec<Arg>) -> Launch {
    Launch {
        kernel,
        grid,
        block: (threads, 1, 1),
        shared_bytes: 0,
        args,
    }
}

/// `embedding_gather(table, ids, out, hidden, row_start, rows)`: one block per token.
pub fn embedding_gather(tokens: usize, hidden: usize, vocab: std::ops::Range<usize>) -> Launch {
    use Arg::*;
    let args = vec![
        Buf("table"),
        Buf("ids"),
        Buf("out"),
        I32(i32_of(hidden)),
        I32(i32_of(vocab.start)),
        I32(i32_of(vocab.len())),
    ];
    rows("embedding_gather", (u32_of(tokens), 1, 1), THREADS, args)
}

/// `rms_norm(x, w, y, hidden, eps)`: one block per row (block_sum needs a power-of-two block).
pub fn rms_norm(tokens: usize, hidden: usize, eps: f32) -> Launch {
    use Arg::*;
    let args = vec![Buf("x"), Buf("w"), Buf("y"), I32(i32_of(hidden)), F32(eps)];
    rows("rms_norm", (u32_of(tokens), 1, 1), THREADS, args)
}

/// `rope(x, pos, inv_freq, heads, head_dim)` in place: grid (tokens, heads), half a head of
/// threads.
pub fn rope(tokens: usize, heads: usize, head_dim: usize) -> Launch {
    use Arg::*;
    let threads = u32_of((head_dim / 2).max(1)).min(THREADS);
    let args = vec![
        Buf("x"),
        Buf("pos"),
        Buf("inv_freq"),
        I32(i32_of(heads)),
        I32(i32_of(head_dim)),
    ];
    rows("rope", (u32_of(tokens), u32_of(heads), 1), threads, args)
}

/// `silu_gate(gate, up, out, n)`.
pub fn silu_gate(n: usize) -> Launch {
    use Arg::*;
    let args = vec![Buf("gate"), Buf("up"), Buf("out"), I32(i32_of(n))];
    elementwise("silu_gate", n, args)
}

/// `bias_add(x, bias, rows, cols)`.
pub fn bias_add(rows: usize, cols: usize) -> Launch {
    use Arg::*;
    let args = vec![Buf("x"), Buf("bias"), I32(i32_of(rows)), I32(i32_of(cols))];
    elementwise("bias_add", rows * cols, args)
}

/// `add_inplace(x, y, n)`: the residual add `x += y`.
pub fn add_inplace(n: usize) -> Launch {
    use Arg::*;
    let args = vec![Buf("x"), Buf("y"), I32(i32_of(n))];
    elementwise("add_inplace", n, args)
}

/// `f32_to_bf16_split(in, out, n)`: the activations as two bf16 terms, `out[..n]` then
/// `out[n..2n]`, for the bf16 GEMM.
pub fn f32_to_bf16_split(n: usize) -> Launch {
    use Arg::*;
    let args = vec![Buf("in"), Buf("out"), I32(i32_of(n))];
    elementwise("f32_to_bf16_split", n, args)
}

/// `sum_halves(halves, y, n)`: `y = halves[..n] + halves[n..2n]`.
pub fn sum_halves(n: usize) -> Launch {
    use Arg::*;
    let args = vec![Buf("halves"), Buf("y"), I32(i32_of(n))];
    elementwise("sum_halves", n, args)
}

/// `argmax(x, n, index_offset, out_val, out_idx)`: one block of [`ARGMAX_THREADS`] (the
/// reduction halves the block, so a power of two).
pub fn argmax(n: usize, index_offset: usize) -> Launch {
    use Arg::*;
    let args = vec![
        Buf("x"),
        I32(i32_of(n)),
        I32(i32_of(index_offset)),
        Buf("out_val"),
        Buf("out_idx"),
    ];
    rows("argmax", (1, 1, 1), ARGMAX_THREADS, args)
}

/// `kv_append(k, v, k_cache, v_cache, start, kv_heads, head_dim)`: grid (tokens, kv_heads).
pub fn kv_append(tokens: usize, start: usize, kv_heads: usize, head_dim: usize) -> Launch {
    use Arg::*;
    let args = vec![
        Buf("k"),
        Buf("v"),
        Buf("k_cache"),
        Buf("v_cache"),
        I32(i32_of(start)),
        I32(i32_of(kv_heads)),
        I32(i32_of(head_dim)),
    ];
    let threads = u32_of(head_dim.max(1)).min(THREADS);
    rows(
        "kv_append",
        (u32_of(tokens), u32_of(kv_heads), 1),
        threads,
        args,
    )
}

/// Attention heads of this rank, how its query heads map to its KV heads, and how many
/// positions one launch can hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The global index of this rank's first query head and first KV head, and query heads per
    /// KV head: local query head h reads local KV head `(q_head0 + h) / group - kv_head0`
    /// (`ShardPlan::local_kv_of`; a rank's heads need not start on a group boundary).
    pub q_head0: usize,
    pub kv_head0: usize,
    pub group: usize,
    /// Positions whose scores fit the kernels' dynamic shared memory.
    pub max_positions: usize,
}

impl Heads {
    /// This rank's heads from its plan; `max_positions` from the loaded kernels.
    pub fn of(plan: &crate::model::plan::ShardPlan, max_positions: usize) -> Heads {
        Heads {
            heads: plan.q_heads.len(),
            kv_heads: plan.kv_heads.len(),
            head_dim: plan.head_dim,
            q_head0: plan.q_heads.start,
            kv_head0: plan.kv_heads.start,
            group: plan.group,
            max_positions,
        }
    }

    /// The arguments after the buffers and the length: heads, kv_heads, head_dim, scale
    /// `1/sqrt(head_dim)`, q_head0, group, kv_head0.
    fn args(&self) -> [Arg; 7] {
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        [
            Arg::I32(i32_of(self.heads)),
            Arg::I32(i32_of(self.kv_heads)),
            Arg::I32(i32_of(self.head_dim)),
            Arg::F32(scale),
            Arg::I32(i32_of(self.q_head0)),
            Arg::I32(i32_of(self.group)),
            Arg::I32(i32_of(self.kv_head0)),
        ]
    }

    /// Scores for `len` positions in dynamic shared memory; `None` past `max_positions`.
    fn scores_bytes(&self, len: usize) -> Option<u32> {
        (len <= self.max_positions).then(|| u32_of(len * 4))
    }
}

/// `attention_prefill(q, k_cache, v_cache, out, past, heads, kv_heads, head_dim, scale,
/// q_head0, group, kv_head0)`: grid (tokens, heads); the last token sees `past + tokens`
/// positions.
pub fn attention_prefill(tokens: usize, past: usize, h: Heads) -> Option<Launch> {
    let mut args = vec![
        Arg::Buf("q"),
        Arg::Buf("k_cache"),
        Arg::Buf("v_cache"),
        Arg::Buf("out"),
        Arg::I32(i32_of(past)),
    ];
    args.extend(h.args());
    Some(Launch {
        kernel: "attention_prefill",
        grid: (u32_of(tokens), u32_of(h.heads), 1),
        block: (THREADS, 1, 1),
        shared_bytes: h.scores_bytes(past + tokens)?,
        args,
    })
}

/// `attention_decode(q, k_cache, v_cache, out, len, heads, kv_heads, head_dim, scale, q_head0,
/// group, kv_head0)`: grid (heads), one new token over `len` cached positions (itself
/// included).
pub fn attention_decode(len: usize, h: Heads) -> Option<Launch> {
    let mut args = vec![
        Arg::Buf("q"),
        Arg::Buf("k_cache"),
        Arg::Buf("v_cache"),
        Arg::Buf("out"),
        Arg::I32(i32_of(len)),
    ];
    args.extend(h.args());
    Some(Launch {
        kernel: "attention_decode",
        grid: (u32_of(h.heads), 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: h.scores_bytes(len)?,
        args,
    })
}

/// Most elements one element-wise launch covers: the kernels index with `int` and step by the
/// grid, so sizes stay well below 2^31.
pub const MAX_ELEMENTS: usize = 1 << 30;

/// Rows per launch for rows of `width` elements, so a launch stays within [`MAX_ELEMENTS`].
pub fn rows_per_piece(width: usize) -> usize {
    (MAX_ELEMENTS / width.max(1)).max(1)
}

/// A column-major cuBLAS GEMM `C = op(A) · op(B)` (cublasGemmEx's arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub transa: bool,
    pub transb: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
}

/// Row-major `y[tokens, out] = x[tokens, inp] · W[out, inp]ᵀ` as cuBLAS sees it: column-major
/// `yᵀ[out, tokens] = W · xᵀ`, where row-major `W` is column-major `[inp, out]` (so A is
/// transposed) and row-major `x` is column-major `xᵀ` `[inp, tokens]`.
pub fn linear(tokens: usize, out: usize, inp: usize) -> Gemm {
    Gemm {
        transa: true,
        transb: false,
        m: i32_of(out),
        n: i32_of(tokens),
        k: i32_of(inp),
        lda: i32_of(inp),
        ldb: i32_of(inp),
        ldc: i32_of(out),
    }
}

impl Gemm {
    /// The product on the host, column-major, as cuBLAS defines it (the tests' reference).
    pub fn reference(&self, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (self.m as usize, self.n as usize, self.k as usize);
        let (lda, ldb, ldc) = (self.lda as usize, self.ldb as usize, self.ldc as usize);
        let at = |i: usize, p: usize| match self.transa {
            true => a[p + i * lda],
            false => a[i + p * lda],
        };
        let bt = |p: usize, j: usize| match self.transb {
            true => b[j + p * ldb],
            false => b[p + j * ldb],
        };
        for j in 0..n {
            for i in 0..m {
                c[i + j * ldc] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
            }
        }
    }
}

#[cfg(test)]
#[path = "cuda_plan_tests.rs"]
mod tests;
