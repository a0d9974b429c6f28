//! Weights laid out once, at load, for the kernels that read them.
//!
//! A `[n, k]` weight (Hugging Face's `[out, in]`) is cut into panels of [`PANEL`] output rows.
//! Inside a panel the storage is transposed into 32-bit words: word `p` of all 32 rows, then word
//! `p + 1`, and so on. An f32 weight has one element per word; a bf16 weight has two (elements
//! `2p` and `2p + 1` of the row, the even one in the low half, exactly the pair that `vdpbf16ps`
//! multiplies). So every kernel streams its panels front to back, one 128-byte step (two
//! AVX-512 vectors of 16 output rows) at a time, and no product needs a horizontal sum: each
//! output row is one SIMD lane. The last panel is only as wide as the rows left (`n % 32`), so
//! nothing is padded but the odd element past an odd `k` of a bf16 row (zero).
//!
//! The storage is an anonymous mapping with transparent huge pages requested: decode reads every
//! weight once per token, and on the 4 KiB pages of a virtual machine the TLB misses cost a third
//! of one core's read bandwidth (20 against 30 GB/s measured on the 2-core EPYC).

use crate::portable::Weight;
use crate::WeightSlice;

/// Output rows per panel: two AVX-512 vectors of f32.
pub const PANEL: usize = 32;

/// How a [`PackedWeight`] stores its elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedDtype {
    F32,
    BF16,
}

/// A `[n, k]` weight in the panel layout described in the module docs.
pub struct PackedWeight {
    n: usize,
    k: usize,
    dtype: PackedDtype,
    words: WordBuf,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight[{}, {}] {:?}", self.n, self.k, self.dtype)
    }
}

impl PackedWeight {
    /// Lays out the row-major `[n, k]` weight `w`.
    pub fn pack<W: Weight>(w: &[W], n: usize, k: usize) -> PackedWeight {
        assert_eq!(w.len(), n * k, "pack: weight is not [{n}, {k}]");
        let (dtype, per_word) = match W::as_weights(w) {
            WeightSlice::F32(_) => (PackedDtype::F32, 1),
            WeightSlice::BF16(_) => (PackedDtype::BF16, 2),
        };
        let row_words = k.div_ceil(per_word);
        let mut words = WordBuf::zeroed(n * row_words);
        let out = words.as_mut_slice();
        // Rows of 32-bit words: an f32 row as is, a bf16 row as pairs (little-endian, so the
        // even element lands in the low half), padded with a zero element when `k` is odd.
        let word_of = |row: usize, p: usize| -> u32 {
            match W::as_weights(w) {
                WeightSlice::F32(v) => v[row * k + p].to_bits(),
                WeightSlice::BF16(v) => {
                    let lo = v[row * k + 2 * p].to_bits() as u32;
                    let hi = if 2 * p + 1 < k {
                        v[row * k + 2 * p + 1].to_bits() as u32
                    } else {
                        0
                    };
                    lo | hi << 16
                }
            }
        };
        for row in 0..n {
            let (panel, lane) = (row / PANEL, row % PANEL);
            let (base, width) = (panel * PANEL * row_words, (n - panel * PANEL).min(PANEL));
            for p in 0..row_words {
                out[base + p * width + lane] = word_of(row, p);
            }
        }
        PackedWeight { n, k, dtype, words }
    }

    /// Output rows (`n`).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input columns (`k`).
    pub fn cols(&self) -> usize {
        self.k
    }

    pub fn dtype(&self) -> PackedDtype {
        self.dtype
    }

    /// Resident bytes, padding included.
    pub fn bytes(&self) -> usize {
        self.words.len * 4
    }

    /// Panels of [`PANEL`] rows.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// 32-bit words per row (and steps per panel).
    pub(crate) fn row_words(&self) -> usize {
        match self.dtype {
            PackedDtype::F32 => self.k,
            PackedDtype::BF16 => self.k.div_ceil(2),
        }
    }

    /// Output rows in panel `p`: [`PANEL`], or fewer in the last one.
    pub fn panel_width(&self, p: usize) -> usize {
        (self.n - p * PANEL).min(PANEL)
    }

    /// The words of panel `p`: `row_words()` steps of `panel_width(p)` words.
    pub(crate) fn panel(&self, p: usize) -> &[u32] {
        let start = p * PANEL * self.row_words();
        &self.words.as_slice()[start..start + self.panel_width(p) * self.row_words()]
    }

    /// Row `r` widened to f32 (exact) into `out` (`[k]`): the embedding lookup.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.n && out.len() == self.k,
            "row_into: row {r} of {self:?}"
        );
        let panel = self.panel(r / PANEL);
        let (lane, width) = (r % PANEL, self.panel_width(r / PANEL));
        match self.dtype {
            PackedDtype::F32 => {
                for (p, o) in out.iter_mut().enumerate() {
                    *o = f32::from_bits(panel[p * width + lane]);
                }
            }
            PackedDtype::BF16 => {
                for (i, o) in out.iter_mut().enumerate() {
                    let w = panel[(i / 2) * width + lane];
                    *o = f32::from_bits(if i % 2 == 0 { w << 16 } else { w & 0xffff_0000 });
                }
            }
        }
    }
}

/// Zero-initialised 32-bit words in an anonymous mapping advised for huge pages.
struct WordBuf {
    map: memmap2::MmapMut,
    len: usize,
}

impl WordBuf {
    fn zeroed(len: usize) -> WordBuf {
        // An anonymous mapping starts zeroed. A failed mapping is out of memory, which the
        // global allocator would report the same way.
        let map = memmap2::MmapMut::map_anon((len * 4).max(1))
            .unwrap_or_else(|e| panic!("cannot map {} bytes for a weight: {e}", len * 4));
        // Huge pages are an optimisation: a kernel without THP refuses and nothing changes.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        WordBuf { map, len }
    }
    fn as_slice(&self) -> &[u32] {
        bytemuck::cast_slice(&self.map[..self.len * 4])
    }
    fn as_mut_slice(&mut self) -> &mut [u32] {
        bytemuck::cast_slice_mut(&mut self.map[..self.len * 4])
    }
}

/// The portable kernel: the output rows of one panel (`out`, `panel_width` long) for one x row, each a plain sequential
/// f32 sum over `k` (the SIMD paths differ only in summation order).
pub(crate) fn panel_dot(w: &PackedWeight, panel: usize, x: &[f32], out: &mut [f32]) {
    let words = w.panel(panel);
    let width = w.panel_width(panel);
    let mut acc = [0f32; PANEL];
    match w.dtype {
        PackedDtype::F32 => {
            for (p, step) in words.chunks_exact(width).enumerate() {
                let xv = x[p];
                for (a, &v) in acc.iter_mut().zip(step) {
                    *a += f32::from_bits(v) * xv;
                }
            }
        }
        PackedDtype::BF16 => {
            for (p, step) in words.chunks_exact(width).enumerate() {
                let xe = x[2 * p];
                let xo = x.get(2 * p + 1).copied().unwrap_or(0.0);
                for (a, &v) in acc.iter_mut().zip(step) {
                    *a += f32::from_bits(v << 16) * xe;
                    *a += f32::from_bits(v & 0xffff_0000) * xo;
                }
            }
        }
    }
    let n = out.len();
    out.copy_from_slice(&acc[..n]);
}
