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
//! The storage is anonymous memory with transparent huge pages requested, shared by the weights
//! of a process in 64 MiB chunks: decode reads every weight once per token, and on the 4 KiB
//! pages of a virtual machine the TLB misses cost a third of one core's read bandwidth (20
//! against 30 GB/s measured on the 2-core EPYC).

use std::sync::{Arc, Mutex};

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
    /// Lays out the row-major `[n, k]` weight `w`; fails only if its storage cannot be mapped.
    pub fn pack<W: Weight>(w: &[W], n: usize, k: usize) -> Result<PackedWeight, AllocError> {
        assert_eq!(w.len(), n * k, "pack: weight is not [{n}, {k}]");
        let (dtype, per_word) = match W::as_weights(w) {
            WeightSlice::F32(_) => (PackedDtype::F32, 1),
            WeightSlice::BF16(_) => (PackedDtype::BF16, 2),
        };
        let row_words = k.div_ceil(per_word);
        let mut words = WordBuf::zeroed(n * row_words)?;
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
        Ok(PackedWeight { n, k, dtype, words })
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

/// Zero-initialised 32-bit words for one weight, carved out of a shared [`Chunk`].
pub(crate) struct WordBuf {
    chunk: Arc<Chunk>,
    /// Byte offset in the chunk (a multiple of 64).
    offset: usize,
    len: usize,
}

/// An anonymous mapping advised for transparent huge pages, from which weights are
/// bump-allocated: one mapping per tensor would leave every tensor under 2 MiB (q/k/v/o of a
/// small model) and the tail of every other on 4 KiB pages.
struct Chunk {
    map: memmap2::MmapMut,
    base: *mut u8,
}

// SAFETY: the mapping lives as long as the chunk; `base` is only dereferenced through WordBufs,
// which own disjoint byte ranges of it (handed out once by `WordBuf::zeroed` under a lock).
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

/// Size of a shared chunk; tensors from half of it up get a mapping of their own.
const CHUNK: usize = 64 << 20;

/// The chunk being filled and its next free byte.
static ARENA: Mutex<Option<(Arc<Chunk>, usize)>> = Mutex::new(None);

/// Weight storage that could not be mapped (out of memory or address space): an error, not an
/// abort, so a loader can say which tensor of which model did not fit.
#[derive(Debug)]
pub struct AllocError {
    /// Bytes asked for (`None` when the size itself overflowed).
    pub bytes: Option<usize>,
    source: Option<std::io::Error>,
}

impl std::fmt::Display for AllocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.bytes, &self.source) {
            (Some(b), Some(e)) => write!(f, "cannot map {b} bytes for weights: {e}"),
            (Some(b), None) => write!(f, "cannot map {b} bytes for weights"),
            (None, _) => write!(
                f,
                "cannot map weights: the size overflows the address space"
            ),
        }
    }
}

impl std::error::Error for AllocError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

impl Chunk {
    fn new(bytes: usize) -> Result<Arc<Chunk>, AllocError> {
        // An anonymous mapping starts zeroed.
        let mut map = memmap2::MmapMut::map_anon(bytes.max(1)).map_err(|e| AllocError {
            bytes: Some(bytes),
            source: Some(e),
        })?;
        // Huge pages are an optimisation: a kernel without THP refuses and nothing changes.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let base = map.as_mut_ptr();
        Ok(Arc::new(Chunk { map, base }))
    }
}

impl WordBuf {
    /// `len` zero words, from the shared chunk or (large tensors) a mapping of their own.
    pub(crate) fn zeroed(len: usize) -> Result<WordBuf, AllocError> {
        let bytes = len
            .checked_mul(4)
            .and_then(|b| b.checked_next_multiple_of(64))
            .ok_or(AllocError {
                bytes: None,
                source: None,
            })?;
        if bytes >= CHUNK / 2 {
            return Ok(WordBuf {
                chunk: Chunk::new(bytes)?,
                offset: 0,
                len,
            });
        }
        let mut arena = ARENA.lock().unwrap_or_else(|e| e.into_inner());
        let (chunk, used) = match arena.take() {
            Some((c, used)) if used + bytes <= c.map.len() => (c, used),
            _ => (Chunk::new(CHUNK)?, 0),
        };
        *arena = Some((chunk.clone(), used + bytes));
        Ok(WordBuf {
            chunk,
            offset: used,
            len,
        })
    }
    pub(crate) fn as_slice(&self) -> &[u32] {
        // SAFETY: `offset..offset + 4 * len` lies inside the chunk's mapping (checked when it
        // was handed out), is 64-byte aligned, and belongs to this WordBuf alone.
        unsafe { std::slice::from_raw_parts(self.chunk.base.add(self.offset).cast(), self.len) }
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u32] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only view of the range.
        unsafe { std::slice::from_raw_parts_mut(self.chunk.base.add(self.offset).cast(), self.len) }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_sizes_are_errors_not_aborts() {
        let e = WordBuf::zeroed(1 << 60).err().expect("2^62 bytes mapped");
        assert_eq!(e.bytes, Some(1 << 62));
        assert!(
            e.to_string()
                .contains("cannot map 4611686018427387904 bytes"),
            "{e}"
        );
        let e = WordBuf::zeroed(usize::MAX)
            .err()
            .expect("overflowing size mapped");
        assert!(e.to_string().contains("overflows"), "{e}");
    }
}
