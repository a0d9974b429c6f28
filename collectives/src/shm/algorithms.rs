//! The five collectives over the protocol steps (see the [module docs](super) for which
//! algorithm runs when). Each checks its arguments before its first step, so a bad call leaves
//! the communicator usable.

use super::protocol::Desc;
use super::ShmComm;
use crate::reduce::reduce_raw;
use crate::stats::OpKind;
use crate::{DType, ReduceOp, Result};

/// Bytes of each peer's piece that the single-copy all-reduce copies into scratch at a time
/// (small enough to stay in L2 while it is reduced).
const DIRECT_SUB_BYTES: usize = 256 << 10;

/// Where a rank's reduced slice goes in the single-copy reductions.
#[derive(Clone, Copy)]
enum SliceTo {
    /// Its own output (the all-reduce, the root of a reduce).
    Own(*mut u8),
    /// The root's lent buffer (a reduce's other ranks).
    Lender(usize),
}

/// Splits `m` elements into `n` slices on 64-byte boundaries; slice `k` is `[lo, hi)`.
fn slice_bounds(m: usize, n: usize, k: usize, elem: usize) -> (usize, usize) {
    let unit = (64 / elem).max(1);
    let units = m.div_ceil(unit);
    let lo = (k * units / n * unit).min(m);
    let hi = ((k + 1) * units / n * unit).min(m);
    (lo, hi)
}

impl ShmComm {
    pub(super) fn check_len(&self, len: usize, dtype: DType, what: &str) -> Result<usize> {
        if !len.is_multiple_of(dtype.size()) {
            return Err(self.invalid(format!(
                "{what} is {len} bytes, not a whole number of {} elements",
                dtype.name()
            )));
        }
        Ok(len / dtype.size())
    }

    /// All-reduce of `input` into `buf` (`input` None: in place). Out of place, the first step
    /// reads `input` where it would read `buf`, so no copy precedes the call.
    pub(super) fn all_reduce_impl(
        &mut self,
        input: Option<&[u8]>,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        crate::types::check_reducible("all_reduce", dtype, op)?;
        if let Some(i) = input {
            crate::args::same_len("all_reduce", i.len(), buf.len())?;
        }
        let e = dtype.size();
        let count = self.check_len(buf.len(), dtype, "the buffer")?;
        // PreMulSum: this rank's input, scaled (in place, or a scaled copy of `input`), is what
        // it contributes to a sum.
        let (scaled, op) = match (input, op) {
            (None, ReduceOp::PreMulSum(f)) => {
                crate::reduce::scale_in_place(dtype, buf, f);
                (None, ReduceOp::Sum)
            }
            (Some(i), op) => match crate::reduce::premul_input(dtype, op, i) {
                (std::borrow::Cow::Owned(v), op) => (Some(v), op),
                (_, op) => (None, op),
            },
            (None, op) => (None, op),
        };
        let src: *const u8 = match (&scaled, input) {
            (Some(v), _) => v.as_ptr(),
            (None, Some(i)) => i.as_ptr(),
            (None, None) => buf.as_ptr(),
        };
        if count == 0 {
            return Ok(());
        }
        let base = buf.as_mut_ptr();
        if self.world == 1 {
            // A reduction of one source: the kernels' rules still apply (canonical NaN).
            // SAFETY: dst equals the one source or is distinct from it; count elements each.
            unsafe { reduce_raw(self.simd, dtype, op, base, &[src], count) };
            return Ok(());
        }
        let desc = Desc::new(OpKind::AllReduce, Some(dtype), Some(op), 0, buf.len());
        let one_shot = buf.len() <= self.opts.one_shot_max;
        if !one_shot && self.use_direct(buf.len(), self.opts.direct_all_reduce_max)? {
            self.all_reduce_direct(src, base, count, dtype, op, &desc)?;
            drop(scaled);
            return Ok(());
        }
        let unit = 64 / e;
        let chunk = (self.lay.slot.min(self.opts.chunk_bytes) / e / unit * unit).max(unit);
        let mut c0 = 0;
        while c0 < count {
            let m = chunk.min(count - c0);
            // SAFETY: c0 + m <= count, so the chunk is inside `buf` and inside the source.
            let (i, o) = unsafe { (src.add(c0 * e), base.add(c0 * e)) };
            if one_shot {
                self.all_reduce_one_shot(i, o, m, dtype, op, &desc)?;
            } else {
                self.all_reduce_rs_ag(i, o, m, dtype, op, &desc)?;
            }
            c0 += m;
        }
        drop(scaled);
        Ok(())
    }

    /// Single-copy all-reduce, three steps for any size: (1) every rank lends its input and
    /// reduces its 1/N slice of the whole buffer in rank order, copying the peers' pieces of it
    /// into scratch a sub-chunk at a time; (2) every rank lends its output and copies the
    /// peers' reduced slices out of theirs; (3) the owners learn their buffers are free. The
    /// same kernel over the same rank-ordered sources: the same bits as the other algorithms.
    pub(super) fn all_reduce_direct(
        &mut self,
        src: *const u8,
        out: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        desc: &Desc,
    ) -> Result<()> {
        let (me, w, e) = (self.rank, self.world, dtype.size());
        let (s, h) = self.lend_step(desc, src)?;
        self.wait_all(s, h, desc)?;
        self.reduce_slice_direct(src, h, count, dtype, op, SliceTo::Own(out))?;
        let (s2, h2) = self.lend_step(desc, out)?;
        for k in 1..w {
            let p = (me + k) % w;
            self.wait_step(p, h2, s2, desc)?;
            let (plo, phi) = slice_bounds(count, w, p, e);
            // SAFETY: [plo, phi) is inside `out` (count elements) and is peer p's slice, which
            // p finished reading from us before it published step s2 + 1 (it read it in step
            // s); nothing else writes it now.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add(plo * e), (phi - plo) * e) };
            self.read_lent(p, h2, plo * e, dst)?;
        }
        self.direct_done(desc, true)
    }

    /// Step 1 of the single-copy reductions, after every rank lent its input in place `h`:
    /// reduces this rank's 1/N slice of `count` elements in rank order, copying the peers'
    /// pieces of it into scratch a sub-chunk at a time, into `to`.
    fn reduce_slice_direct(
        &mut self,
        src: *const u8,
        h: usize,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        to: SliceTo,
    ) -> Result<()> {
        let (me, w, e) = (self.rank, self.world, dtype.size());
        let (lo, hi) = slice_bounds(count, w, me, e);
        let unit = 64 / e;
        let sub = ((DIRECT_SUB_BYTES / e) / unit * unit).max(unit);
        let mut scratch = std::mem::take(&mut self.scratch);
        // The peers' pieces, then (to a peer) our reduced sub-chunk.
        scratch.resize(w * sub * e, 0);
        let (pieces, result) = scratch.split_at_mut((w - 1) * sub * e);
        let mut c = lo;
        let res = (|| {
            while c < hi {
                let m = sub.min(hi - c);
                let mut k = 0;
                for p in 0..w {
                    if p == me {
                        // SAFETY: c + m <= count, inside the source.
                        self.srcs[p] = unsafe { src.add(c * e) };
                    } else {
                        let piece = &mut pieces[k * sub * e..(k * sub + m) * e];
                        self.read_lent(p, h, c * e, piece)?;
                        self.srcs[p] = piece.as_ptr();
                        k += 1;
                    }
                }
                match to {
                    // SAFETY: every source holds m elements (our input, or scratch pieces just
                    // filled); `out + c` is our own slice, equal to our source (in place) or
                    // distinct from every source. No peer reads our slice of `out` meanwhile.
                    SliceTo::Own(out) => unsafe {
                        reduce_raw(self.simd, dtype, op, out.add(c * e), &self.srcs, m)
                    },
                    SliceTo::Lender(root) => {
                        let dst = &mut result[..m * e];
                        // SAFETY: as above; `dst` is scratch distinct from every source.
                        unsafe {
                            reduce_raw(self.simd, dtype, op, dst.as_mut_ptr(), &self.srcs, m)
                        };
                        // The root lent its buffer (its input, in place): our slice of it is
                        // read by us alone, and we have just read this sub-chunk.
                        self.write_lent(root, h, c * e, dst)?;
                    }
                }
                c += m;
            }
            Ok(())
        })();
        self.scratch = scratch;
        res
    }

    /// Single-copy reduce to `root`, two steps: (1) every rank lends its buffer and reduces its
    /// 1/N slice as the single-copy all-reduce does, the root into its own buffer, the others
    /// straight into the root's (their slice of it, which only they read); (2) the owners learn
    /// their buffers are free. One slice's reduction per rank, in parallel, where the one-shot
    /// reduce leaves the whole reduction to the root.
    fn reduce_direct(
        &mut self,
        buf: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        root: usize,
        desc: &Desc,
    ) -> Result<()> {
        let (s, h) = self.lend_step(desc, buf)?;
        self.wait_all(s, h, desc)?;
        let to = if self.rank == root {
            SliceTo::Own(buf)
        } else {
            SliceTo::Lender(root)
        };
        self.reduce_slice_direct(buf, h, count, dtype, op, to)?;
        self.direct_done(desc, true)
    }

    /// One step: copy in, wait for everyone, reduce all N slots in rank order into `out`.
    pub(super) fn all_reduce_one_shot(
        &mut self,
        input: *const u8,
        out: *mut u8,
        m: usize,
        dtype: DType,
        op: ReduceOp,
        desc: &Desc,
    ) -> Result<()> {
        let (s, h) = self.begin_step(desc)?;
        let me = self.rank;
        // SAFETY: `input` holds m elements (caller); our half holds slot >= m * size bytes and no
        // peer reads it until we publish (begin_step waited for that).
        unsafe { std::ptr::copy_nonoverlapping(input, self.data(me, h), m * dtype.size()) };
        self.publish();
        self.wait_all(s, h, desc)?;
        for p in 0..self.world {
            self.srcs[p] = if p == me { input } else { self.data(p, h) };
        }
        // SAFETY: every source holds m elements: peers' halves were published for step s and stay
        // untouched until we publish step s + 2; `out` equals srcs[me] (in place) or is distinct
        // from every source, which reduce_raw allows.
        unsafe { reduce_raw(self.simd, dtype, op, out, &self.srcs, m) };
        Ok(())
    }

    /// Two steps: reduce our 1/N of the chunk from every slot, then gather the others' slices.
    pub(super) fn all_reduce_rs_ag(
        &mut self,
        input: *const u8,
        out: *mut u8,
        m: usize,
        dtype: DType,
        op: ReduceOp,
        desc: &Desc,
    ) -> Result<()> {
        let e = dtype.size();
        let me = self.rank;
        let (s, h) = self.begin_step(desc)?;
        // SAFETY: as in all_reduce_one_shot.
        unsafe { std::ptr::copy_nonoverlapping(input, self.data(me, h), m * e) };
        self.publish();
        self.wait_all(s, h, desc)?;
        let (s2, h2) = self.begin_step(desc)?;
        let (lo, hi) = slice_bounds(m, self.world, me, e);
        if hi > lo {
            for p in 0..self.world {
                let src = if p == me { input } else { self.data(p, h) };
                // SAFETY: lo < hi <= m, inside every chunk-sized source.
                self.srcs[p] = unsafe { src.add(lo * e) };
            }
            // SAFETY: sources as in all_reduce_one_shot; dst equals srcs[me] or is distinct
            // from every source. Our half h2 is free (begin_step), and [lo, hi) fits in it.
            unsafe {
                let dst = out.add(lo * e);
                reduce_raw(self.simd, dtype, op, dst, &self.srcs, hi - lo);
                std::ptr::copy_nonoverlapping(dst, self.data(me, h2).add(lo * e), (hi - lo) * e);
            }
        }
        self.publish();
        for k in 1..self.world {
            let p = (me + k) % self.world;
            self.wait_step(p, h2, s2, desc)?;
            let (lo, hi) = slice_bounds(m, self.world, p, e);
            // SAFETY: peer p published its reduced [lo, hi) of step s2 in its half h2.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.data(p, h2).add(lo * e),
                    out.add(lo * e),
                    (hi - lo) * e,
                )
            };
        }
        Ok(())
    }

    /// The gathered/scattered side must be `world` times the per-rank side.
    pub(super) fn check_world_len(
        &self,
        big: &str,
        big_len: usize,
        small: &str,
        small_len: usize,
    ) -> Result<()> {
        if big_len != small_len * self.world {
            return Err(self.invalid(format!(
                "{big} is {big_len} bytes, expected world size {} x {small} {small_len} = {}",
                self.world,
                small_len * self.world
            )));
        }
        Ok(())
    }

    pub(super) fn all_gather_impl(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
    ) -> Result<()> {
        self.check_len(input.len(), dtype, "the input")?;
        let ib = input.len();
        self.check_world_len("output", output.len(), "input", ib)?;
        let me = self.rank;
        output[me * ib..(me + 1) * ib].copy_from_slice(input);
        if self.world == 1 || ib == 0 {
            return Ok(());
        }
        let desc = Desc::new(OpKind::AllGather, Some(dtype), None, 0, ib);
        if self.use_direct(ib, usize::MAX)? {
            let (s, h) = self.lend_step(&desc, input.as_ptr())?;
            for k in 1..self.world {
                let p = (me + k) % self.world;
                self.wait_step(p, h, s, &desc)?;
                self.read_lent(p, h, 0, &mut output[p * ib..(p + 1) * ib])?;
            }
            return self.direct_done(&desc, true);
        }
        let mut c0 = 0;
        while c0 < ib {
            let m = self.lay.slot.min(ib - c0);
            let (s, h) = self.begin_step(&desc)?;
            // SAFETY: [c0, c0+m) is inside `input`; our half is free and holds slot >= m bytes.
            unsafe { std::ptr::copy_nonoverlapping(input.as_ptr().add(c0), self.data(me, h), m) };
            self.publish();
            for k in 1..self.world {
                let p = (me + k) % self.world;
                self.wait_step(p, h, s, &desc)?;
                let dst = &mut output[p * ib + c0..p * ib + c0 + m];
                // SAFETY: peer p published m bytes of step s in its half h.
                unsafe { std::ptr::copy_nonoverlapping(self.data(p, h), dst.as_mut_ptr(), m) };
            }
            c0 += m;
        }
        Ok(())
    }

    pub(super) fn reduce_scatter_impl(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        crate::types::check_reducible("reduce_scatter", dtype, op)?;
        let e = dtype.size();
        let count = self.check_len(output.len(), dtype, "the output")?;
        let ob = output.len();
        self.check_world_len("input", input.len(), "output", ob)?;
        let (input, op) = crate::reduce::premul_input(dtype, op, input);
        let input: &[u8] = &input;
        let me = self.rank;
        if count == 0 {
            return Ok(());
        }
        if self.world == 1 {
            // SAFETY: one source of count elements, a distinct destination of as many.
            unsafe {
                reduce_raw(
                    self.simd,
                    dtype,
                    op,
                    output.as_mut_ptr(),
                    &[input.as_ptr()],
                    count,
                )
            };
            return Ok(());
        }
        let desc = Desc::new(OpKind::ReduceScatter, Some(dtype), Some(op), 0, ob);
        let unit = 64 / e;
        let chunk = ((self.lay.slot / self.world / e) / unit * unit).max(1);
        let inp = input.as_ptr();
        let mut c0 = 0;
        while c0 < count {
            let m = chunk.min(count - c0);
            let (s, h) = self.begin_step(&desc)?;
            let mine = self.data(me, h);
            for q in 0..self.world {
                if q != me {
                    // SAFETY: segment q's [c0, c0+m) is inside `input`; slot piece q (m elements
                    // at q*m) fits because m <= slot / world / e.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            inp.add((q * count + c0) * e),
                            mine.add(q * m * e),
                            m * e,
                        )
                    };
                }
            }
            self.publish();
            self.wait_all(s, h, &desc)?;
            for p in 0..self.world {
                self.srcs[p] = if p == me {
                    // SAFETY: inside `input` (our own segment).
                    unsafe { inp.add((me * count + c0) * e) }
                } else {
                    // SAFETY: peer p's piece for us, published for step s.
                    unsafe { self.data(p, h).add(me * m * e) }
                };
            }
            // SAFETY: m elements in every source and in output[c0..]; output is a distinct &mut.
            unsafe {
                reduce_raw(
                    self.simd,
                    dtype,
                    op,
                    output.as_mut_ptr().add(c0 * e),
                    &self.srcs,
                    m,
                )
            };
            c0 += m;
        }
        Ok(())
    }

    pub(super) fn broadcast_impl(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(self.invalid(format!(
                "root {root} out of range for world size {}",
                self.world
            )));
        }
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        let desc = Desc::new(OpKind::Broadcast, None, None, root, buf.len());
        if buf.len() >= self.opts.direct_rooted_min
            && self.use_direct(buf.len(), self.opts.direct_rooted_max)?
        {
            let (s, h) = self.begin_step(&desc)?;
            if self.rank == root {
                self.lend(h, buf.as_ptr());
                self.publish();
            } else {
                self.publish();
                self.wait_step(root, h, s, &desc)?;
                self.read_lent(root, h, 0, buf)?;
            }
            return self.direct_done(&desc, self.rank == root);
        }
        let n = buf.len();
        let mut c0 = 0;
        while c0 < n {
            let m = self.lay.slot.min(n - c0);
            let (s, h) = self.begin_step(&desc)?;
            if self.rank == root {
                // SAFETY: [c0, c0+m) inside buf; our half is free.
                unsafe {
                    std::ptr::copy_nonoverlapping(buf.as_ptr().add(c0), self.data(root, h), m)
                };
                self.publish();
                self.verify_later(s, h, desc);
            } else {
                self.publish();
                self.wait_step(root, h, s, &desc)?;
                // SAFETY: the root published m bytes of step s in its half h.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.data(root, h), buf.as_mut_ptr().add(c0), m)
                };
            }
            c0 += m;
        }
        Ok(())
    }

    pub(super) fn barrier_impl(&mut self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let desc = Desc::new(OpKind::Barrier, None, None, 0, 0);
        let (s, h) = self.begin_step(&desc)?;
        self.publish();
        self.wait_all(s, h, &desc)
    }
}

/// The rooted and personalised collectives over the same steps.
impl ShmComm {
    /// Reduce to `root`. Up to `one_shot_max` bytes: per chunk one step, every rank copies in and
    /// only the root waits and reduces all N slots. Larger: per chunk, every rank reduces its 1/N
    /// slice into its other half (its own `buf` stays as it was), then the root gathers the
    /// slices: two steps, the reduction spread over the ranks. Non-roots never wait for the root
    /// (their next step waits for everyone, which is enough for the double buffer).
    pub(super) fn reduce_impl(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        crate::types::check_reducible("reduce", dtype, op)?;
        crate::args::root("reduce", root, self.world)?;
        let count = self.check_len(buf.len(), dtype, "the buffer")?;
        if count == 0 {
            return Ok(());
        }
        if self.world == 1 {
            return self.all_reduce_impl(None, buf, dtype, op);
        }
        // PreMulSum reduces a scaled copy; everything else reads `buf` itself.
        let (scaled, op) = match crate::reduce::premul_input(dtype, op, buf) {
            (std::borrow::Cow::Owned(v), op) => (Some(v), op),
            (_, op) => (None, op),
        };
        let own: *const u8 = scaled.as_ref().map_or(buf.as_ptr(), |v| v.as_ptr());
        let out = buf.as_mut_ptr();
        let e = dtype.size();
        let desc = Desc::new(OpKind::Reduce, Some(dtype), Some(op), root, buf.len());
        // PreMulSum's scaled input is not the root's buffer, which the single copy needs.
        if buf.len() >= self.opts.direct_reduce_min
            && scaled.is_none()
            && self.use_direct(buf.len(), self.opts.direct_all_reduce_max)?
        {
            return self.reduce_direct(out, count, dtype, op, root, &desc);
        }
        let unit = 64 / e;
        let chunk = (self.lay.slot.min(self.opts.chunk_bytes) / e / unit * unit).max(unit);
        let one_shot = buf.len() <= self.opts.one_shot_max;
        let me = self.rank;
        let mut c0 = 0;
        while c0 < count {
            let m = chunk.min(count - c0);
            let lo_b = c0 * e;
            let (s, h) = self.begin_step(&desc)?;
            // SAFETY: [lo_b, lo_b + m * e) is inside `own` (buf or its scaled copy); our half is
            // free and holds >= m elements.
            unsafe { std::ptr::copy_nonoverlapping(own.add(lo_b), self.data(me, h), m * e) };
            self.publish();
            if one_shot {
                if me == root {
                    self.wait_all(s, h, &desc)?;
                    for p in 0..self.world {
                        self.srcs[p] = if p == me {
                            // SAFETY: inside `own`.
                            unsafe { own.add(lo_b) }
                        } else {
                            self.data(p, h)
                        };
                    }
                    // SAFETY: every source holds m elements (peers' published for step s); dst
                    // is our buffer's chunk, equal to our source or distinct from all of them.
                    unsafe { reduce_raw(self.simd, dtype, op, out.add(lo_b), &self.srcs, m) };
                }
            } else {
                self.wait_all(s, h, &desc)?;
                let (s2, h2) = self.begin_step(&desc)?;
                let (lo, hi) = slice_bounds(m, self.world, me, e);
                if hi > lo {
                    for p in 0..self.world {
                        let src = if p == me {
                            // SAFETY: inside `own`.
                            unsafe { own.add(lo_b) }
                        } else {
                            self.data(p, h) as *const u8
                        };
                        // SAFETY: lo < hi <= m, inside every chunk-sized source.
                        self.srcs[p] = unsafe { src.add(lo * e) };
                    }
                    // SAFETY: the sources were published for step s and stay until step s + 2;
                    // our half h2 (free after begin_step) is distinct from all of them.
                    unsafe {
                        let dst = self.data(me, h2).add(lo * e);
                        reduce_raw(self.simd, dtype, op, dst, &self.srcs, hi - lo);
                    }
                }
                self.publish();
                if me == root {
                    for p in 0..self.world {
                        if p != me {
                            self.wait_step(p, h2, s2, &desc)?;
                        }
                        let (lo, hi) = slice_bounds(m, self.world, p, e);
                        // SAFETY: rank p published its reduced [lo, hi) of step s2 in half h2
                        // (our own slice is in our half h2 too); the chunk is inside `buf`.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                self.data(p, h2).add(lo * e),
                                out.add(lo_b + lo * e),
                                (hi - lo) * e,
                            )
                        };
                    }
                }
            }
            c0 += m;
        }
        Ok(())
    }

    /// Gather to `root`: per slot-sized chunk one step; every rank copies in, the root copies
    /// every peer's chunk out as it arrives.
    pub(super) fn gather_impl(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        crate::args::root("gather", root, self.world)?;
        self.check_len(input.len(), dtype, "the input")?;
        let (ib, me) = (input.len(), self.rank);
        if me == root {
            self.check_world_len("output", output.len(), "input", ib)?;
            output[me * ib..(me + 1) * ib].copy_from_slice(input);
        }
        if self.world == 1 || ib == 0 {
            return Ok(());
        }
        let desc = Desc::new(OpKind::Gather, Some(dtype), None, root, ib);
        if ib >= self.opts.direct_rooted_min && self.use_direct(ib, self.opts.direct_rooted_max)? {
            // Every peer writes its piece into the root's output, in parallel.
            let (s, h) = self.begin_step(&desc)?;
            if me == root {
                self.lend(h, output.as_ptr());
                self.publish();
            } else {
                self.publish();
                self.wait_step(root, h, s, &desc)?;
                self.write_lent(root, h, me * ib, input)?;
            }
            return self.direct_done(&desc, me == root);
        }
        let mut c0 = 0;
        while c0 < ib {
            let m = self.lay.slot.min(ib - c0);
            let (s, h) = self.begin_step(&desc)?;
            if me != root {
                // SAFETY: [c0, c0+m) is inside `input`; our half is free and holds >= m bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(input.as_ptr().add(c0), self.data(me, h), m)
                };
            }
            self.publish();
            if me == root {
                for k in 1..self.world {
                    let p = (me + k) % self.world;
                    self.wait_step(p, h, s, &desc)?;
                    let dst = &mut output[p * ib + c0..p * ib + c0 + m];
                    // SAFETY: peer p published m bytes of step s in its half h.
                    unsafe { std::ptr::copy_nonoverlapping(self.data(p, h), dst.as_mut_ptr(), m) };
                }
            }
            c0 += m;
        }
        Ok(())
    }

    /// Scatter from `root`: per step the root copies a piece of every rank's chunk (at most
    /// slot / N bytes each) into its half, and each rank copies its piece out.
    pub(super) fn scatter_impl(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        crate::args::root("scatter", root, self.world)?;
        self.check_len(output.len(), dtype, "the output")?;
        let (ob, me) = (output.len(), self.rank);
        if me == root {
            self.check_world_len("input", input.len(), "output", ob)?;
            output.copy_from_slice(&input[me * ob..(me + 1) * ob]);
        }
        if self.world == 1 || ob == 0 {
            return Ok(());
        }
        let desc = Desc::new(OpKind::Scatter, Some(dtype), None, root, ob);
        if ob >= self.opts.direct_rooted_min && self.use_direct(ob, self.opts.direct_rooted_max)? {
            let (s, h) = self.begin_step(&desc)?;
            if me == root {
                self.lend(h, input.as_ptr());
                self.publish();
            } else {
                self.publish();
                self.wait_step(root, h, s, &desc)?;
                self.read_lent(root, h, me * ob, output)?;
            }
            return self.direct_done(&desc, me == root);
        }
        let piece = (self.lay.slot / self.world / 64 * 64).max(1);
        let mut c0 = 0;
        while c0 < ob {
            let m = piece.min(ob - c0);
            let (s, h) = self.begin_step(&desc)?;
            if me == root {
                let mine = self.data(me, h);
                for q in (0..self.world).filter(|&q| q != me) {
                    // SAFETY: rank q's [c0, c0+m) is inside `input`; piece q (m bytes at q*m)
                    // fits because m <= slot / world.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            input.as_ptr().add(q * ob + c0),
                            mine.add(q * m),
                            m,
                        )
                    };
                }
                self.publish();
                self.verify_later(s, h, desc);
            } else {
                self.publish();
                self.wait_step(root, h, s, &desc)?;
                // SAFETY: the root published our piece of step s in its half h.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.data(root, h).add(me * m),
                        output.as_mut_ptr().add(c0),
                        m,
                    )
                };
            }
            c0 += m;
        }
        Ok(())
    }

    /// Equal-chunk all-to-all: per step every rank copies a piece of each peer's chunk (at most
    /// slot / N bytes) into its half, then copies its own piece out of every peer's half.
    pub(super) fn all_to_all_impl(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
    ) -> Result<()> {
        let w = self.world;
        crate::args::same_len("all_to_all", input.len(), output.len())?;
        let count = self.check_len(input.len(), dtype, "the input")?;
        if !count.is_multiple_of(w) {
            return Err(self.invalid(format!(
                "the input holds {count} {} elements, not a multiple of the group's {w} ranks",
                dtype.name()
            )));
        }
        let (cb, me) = (input.len() / w, self.rank);
        output[me * cb..(me + 1) * cb].copy_from_slice(&input[me * cb..(me + 1) * cb]);
        if w == 1 || cb == 0 {
            return Ok(());
        }
        let desc = Desc::new(OpKind::AllToAll, Some(dtype), None, 0, input.len());
        if self.use_direct(cb, usize::MAX)? {
            let (s, h) = self.lend_step(&desc, input.as_ptr())?;
            for k in 1..w {
                let p = (me + k) % w;
                self.wait_step(p, h, s, &desc)?;
                self.read_lent(p, h, me * cb, &mut output[p * cb..(p + 1) * cb])?;
            }
            return self.direct_done(&desc, true);
        }
        let piece = (self.lay.slot / w / 64 * 64).max(1);
        let mut c0 = 0;
        while c0 < cb {
            let m = piece.min(cb - c0);
            let (s, h) = self.begin_step(&desc)?;
            let mine = self.data(me, h);
            for q in (0..w).filter(|&q| q != me) {
                // SAFETY: chunk q's [c0, c0+m) is inside `input`; piece q fits (m <= slot / w).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        input.as_ptr().add(q * cb + c0),
                        mine.add(q * m),
                        m,
                    )
                };
            }
            self.publish();
            for k in 1..w {
                let p = (me + k) % w;
                self.wait_step(p, h, s, &desc)?;
                // SAFETY: peer p published our piece of step s in its half h.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.data(p, h).add(me * m),
                        output.as_mut_ptr().add(p * cb + c0),
                        m,
                    )
                };
            }
            c0 += m;
        }
        Ok(())
    }

    /// All-to-all with per-peer counts: pairwise transfers over the channels, as one grouped
    /// call (each rank knows only its own counts, so the steps could not agree).
    pub(super) fn all_to_allv_impl(
        &mut self,
        input: &[u8],
        send_counts: &[usize],
        output: &mut [u8],
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<()> {
        let (me, w) = (self.rank, self.world);
        let mut ops =
            crate::args::all_to_allv_ops(input, send_counts, output, recv_counts, dtype, me, w)?;
        self.send_recv_impl(&mut ops)
    }
}
