//! Element-wise reductions over N source buffers, always in rank order:
//! `acc = x0; acc = op(acc, x1); ...` in f32, rounded once to the storage type (round to nearest
//! even). The AVX-512 and AVX2 paths do exactly the same f32 operations in the same order as the
//! scalar path, so every path (and every chunking of a buffer into SIMD body and scalar tail)
//! gives the same bits. `Max` and `Min` propagate NaN (the first NaN in rank order wins),
//! identically in every path; `Product` multiplies in rank order like `Sum` adds. A NaN result is always stored as the canonical quiet NaN (f32 0x7FC00000, bf16
//! 0x7FC0, f16 0x7E00): which NaN operand's payload survives an add is not something the compiler
//! or the ISA keeps fixed, and this way NaN outputs are bit-identical too.
//!
//! bf16 <-> f32 is a bit shift plus the usual "+0x7FFF + lsb" rounding (NaN kept, quiet bit set);
//! f16 uses F16C/AVX-512 conversions, and a software conversion with the same results on CPUs
//! without them.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::{DType, ReduceOp};

/// Which instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// Plain Rust loops (any CPU; the reference the others match bit for bit).
    Scalar,
    /// AVX2 + F16C.
    Avx2,
    /// AVX-512F.
    Avx512,
}

static DETECTED: AtomicU8 = AtomicU8::new(0);

impl Simd {
    /// The best level this CPU supports, unless `TPRUN_COMM_SIMD=scalar|avx2|avx512` asks for a
    /// lower one (for benchmarks and debugging). Detected once per process.
    pub fn detect() -> Simd {
        match DETECTED.load(Ordering::Relaxed) {
            1 => return Simd::Scalar,
            2 => return Simd::Avx2,
            3 => return Simd::Avx512,
            _ => {}
        }
        let avail = Simd::available();
        let best = *avail.last().unwrap_or(&Simd::Scalar);
        let chosen = match std::env::var("TPRUN_COMM_SIMD").ok().as_deref() {
            Some("scalar") => Simd::Scalar,
            Some("avx2") if avail.contains(&Simd::Avx2) => Simd::Avx2,
            _ => best,
        };
        let code = match chosen {
            Simd::Scalar => 1,
            Simd::Avx2 => 2,
            Simd::Avx512 => 3,
        };
        DETECTED.store(code, Ordering::Relaxed);
        chosen
    }

    /// Every level this CPU can run, lowest first.
    pub fn available() -> Vec<Simd> {
        #[allow(unused_mut)]
        let mut v = vec![Simd::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
                v.push(Simd::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                v.push(Simd::Avx512);
            }
        }
        v
    }
}

/// Safe entry point: `dst[i] = srcs[0][i] op srcs[1][i] op ...` (rank order), all slices holding
/// the same number of `dtype` elements.
///
/// # Panics
/// If the lengths differ, are not a multiple of the element size, `srcs` is empty, `op` does
/// not reduce `dtype` ([`crate::types::check_reducible`]), or `simd` is not supported by this
/// CPU.
pub fn reduce_into(simd: Simd, dtype: DType, op: ReduceOp, dst: &mut [u8], srcs: &[&[u8]]) {
    assert!(!srcs.is_empty(), "reduce_into needs at least one source");
    assert!(
        crate::types::check_reducible("reduce_into", dtype, op).is_ok(),
        "{op:?} does not reduce {}",
        dtype.name()
    );
    assert!(
        dst.len().is_multiple_of(dtype.size()),
        "length not a multiple of the element size"
    );
    assert!(
        srcs.iter().all(|s| s.len() == dst.len()),
        "source lengths differ"
    );
    assert!(
        Simd::available().contains(&simd),
        "{simd:?} not supported here"
    );
    let ptrs: Vec<*const u8> = srcs.iter().map(|s| s.as_ptr()).collect();
    // SAFETY: every pointer covers dst.len() bytes (checked above); dst is a distinct &mut, so it
    // cannot overlap any source; `simd` is supported (checked above).
    unsafe {
        reduce_raw(
            simd,
            dtype,
            op,
            dst.as_mut_ptr(),
            &ptrs,
            dst.len() / dtype.size(),
        )
    }
}

const F32: u8 = 0;
const BF16: u8 = 1;
const F16: u8 = 2;
const SUM: u8 = 0;
const MAX: u8 = 1;
const MIN: u8 = 2;
const PROD: u8 = 3;
const AVG: u8 = 4;

/// Raw reduction used by the transport.
///
/// # Safety
/// `dst` must be valid for `count` element writes and every `srcs[r]` for `count` element reads
/// (any alignment). `dst` may be *equal* to a source pointer (each block is fully loaded before it
/// is stored) but must not partially overlap one. `simd` must be supported by this CPU. `op` must
/// be one [`crate::types::check_reducible`] accepts for `dtype`; `PreMulSum` sums inputs the
/// transport has already scaled ([`premul_input`]).
pub unsafe fn reduce_raw(
    simd: Simd,
    dtype: DType,
    op: ReduceOp,
    dst: *mut u8,
    srcs: &[*const u8],
    count: usize,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        if count == 0 {
            return;
        }
        // PreMulSum's factors are per rank, so the transport scales each input first
        // ([`premul_input`]); what is left here is the rank-order sum of the scaled inputs.
        let op = match op {
            ReduceOp::PreMulSum(_) => ReduceOp::Sum,
            op => op,
        };
        macro_rules! dispatch {
            ($f:ident) => {
                match (dtype, op) {
                    (DType::F32, ReduceOp::Sum) => $f::<F32, SUM>(dst, srcs, count),
                    (DType::F32, ReduceOp::Max) => $f::<F32, MAX>(dst, srcs, count),
                    (DType::F32, ReduceOp::Min) => $f::<F32, MIN>(dst, srcs, count),
                    (DType::F32, ReduceOp::Product) => $f::<F32, PROD>(dst, srcs, count),
                    (DType::BF16, ReduceOp::Sum) => $f::<BF16, SUM>(dst, srcs, count),
                    (DType::BF16, ReduceOp::Max) => $f::<BF16, MAX>(dst, srcs, count),
                    (DType::BF16, ReduceOp::Min) => $f::<BF16, MIN>(dst, srcs, count),
                    (DType::BF16, ReduceOp::Product) => $f::<BF16, PROD>(dst, srcs, count),
                    (DType::F16, ReduceOp::Sum) => $f::<F16, SUM>(dst, srcs, count),
                    (DType::F16, ReduceOp::Max) => $f::<F16, MAX>(dst, srcs, count),
                    (DType::F16, ReduceOp::Min) => $f::<F16, MIN>(dst, srcs, count),
                    (DType::F16, ReduceOp::Product) => $f::<F16, PROD>(dst, srcs, count),
                    (DType::F32, ReduceOp::Avg) => $f::<F32, AVG>(dst, srcs, count),
                    (DType::BF16, ReduceOp::Avg) => $f::<BF16, AVG>(dst, srcs, count),
                    (DType::F16, ReduceOp::Avg) => $f::<F16, AVG>(dst, srcs, count),
                    // f64 and the integer types: one generic kernel (the compiler vectorises
                    // it; every element is reduced on its own, so the order is rank order).
                    _ => return generic::reduce(dtype, op, dst, srcs, count),
                }
            };
        }
        match simd {
            Simd::Scalar => dispatch!(kernel_scalar),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => dispatch!(kernel_avx2),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => dispatch!(kernel_avx512),
            #[cfg(not(target_arch = "x86_64"))]
            _ => dispatch!(kernel_scalar),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar conversions (the reference every SIMD path must match bit for bit).

/// bf16 bits -> f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 -> bf16 bits, round to nearest even; NaN stays NaN with the quiet bit set.
#[inline(always)]
pub fn f32_to_bf16(v: f32) -> u16 {
    let x = v.to_bits();
    if x & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((x >> 16) | 0x40) as u16;
    }
    (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16
}

/// f16 bits -> f32 (exact; NaN gets the quiet bit, as F16C does).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let e = ((h >> 10) & 0x1F) as u32;
    let m = (h & 0x3FF) as u32;
    if e == 0x1F {
        let nan = if m != 0 { 0x0040_0000 } else { 0 };
        return f32::from_bits(sign | 0x7F80_0000 | nan | (m << 13));
    }
    if e == 0 {
        // Zero or subnormal: m * 2^-24 is exact in f32.
        let mag = m as f32 * f32::from_bits(0x3380_0000);
        return f32::from_bits(sign | mag.to_bits());
    }
    f32::from_bits(sign | ((e + 112) << 23) | (m << 13))
}

/// f32 -> f16 bits, round to nearest even (subnormals and overflow to infinity included); NaN
/// keeps its top payload bits and gets the quiet bit, as F16C does.
#[inline(always)]
pub fn f32_to_f16(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let a = x & 0x7FFF_FFFF;
    if a > 0x7F80_0000 {
        return sign | 0x7E00 | ((a >> 13) & 0x3FF) as u16;
    }
    if a >= 0x477F_F000 {
        // >= 65520 rounds to infinity (this also covers infinity itself).
        return sign | 0x7C00;
    }
    if a < 0x3880_0000 {
        // Below the smallest normal f16 (2^-14): a multiple of 2^-24, rounded.
        let e = a >> 23;
        if e < 102 {
            // < 2^-25: rounds to zero.
            return sign;
        }
        let m = (a & 0x7F_FFFF) | 0x80_0000;
        let shift = 126 - e; // 14..=24
        let q = m >> shift;
        let r = m & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        let q = if r > half || (r == half && q & 1 == 1) {
            q + 1
        } else {
            q
        };
        return sign | q as u16;
    }
    let q = (((a >> 23) - 112) << 10) | ((a >> 13) & 0x3FF);
    let r = a & 0x1FFF;
    let q = if r > 0x1000 || (r == 0x1000 && q & 1 == 1) {
        q + 1
    } else {
        q
    };
    sign | q as u16
}

/// # Safety
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline(always)]
unsafe fn ld_s<const D: u8>(p: *const u8, i: usize) -> f32 {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        match D {
            F32 => (p as *const f32).add(i).read_unaligned(),
            BF16 => bf16_to_f32((p as *const u16).add(i).read_unaligned()),
            _ => f16_to_f32((p as *const u16).add(i).read_unaligned()),
        }
    }
}

/// Canonical quiet NaN every kernel stores for a NaN result.
pub const CANONICAL_NAN: u32 = 0x7FC0_0000;

/// # Safety
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline(always)]
unsafe fn st_s<const D: u8>(p: *mut u8, i: usize, v: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let v = if v.is_nan() {
            f32::from_bits(CANONICAL_NAN)
        } else {
            v
        };
        match D {
            F32 => (p as *mut f32).add(i).write_unaligned(v),
            BF16 => (p as *mut u16).add(i).write_unaligned(f32_to_bf16(v)),
            _ => (p as *mut u16).add(i).write_unaligned(f32_to_f16(v)),
        }
    }
}

/// The combine step, written so that it matches `maxps(acc, x)` / `minps(acc, x)` + "keep acc
/// if acc is NaN" (so the first NaN in rank order wins, and of two equal values, e.g. -0 and +0,
/// the later rank's).
#[inline(always)]
fn comb_s<const OP: u8>(acc: f32, x: f32) -> f32 {
    match OP {
        SUM | AVG => acc + x,
        PROD => acc * x,
        MAX if acc.is_nan() || acc > x => acc,
        MIN if acc.is_nan() || acc < x => acc,
        _ => x,
    }
}

/// Scalar kernel over `[start, count)`, blocked so the accumulators stay in L1.
///
/// # Safety
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline(always)]
unsafe fn scalar_range<const D: u8, const OP: u8>(
    dst: *mut u8,
    srcs: &[*const u8],
    start: usize,
    count: usize,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        const B: usize = 64;
        let mut acc = [0f32; B];
        let mut i = start;
        while i < count {
            let n = B.min(count - i);
            for (j, a) in acc[..n].iter_mut().enumerate() {
                *a = ld_s::<D>(srcs[0], i + j);
            }
            for &s in &srcs[1..] {
                for (j, a) in acc[..n].iter_mut().enumerate() {
                    *a = comb_s::<OP>(*a, ld_s::<D>(s, i + j));
                }
            }
            if OP == AVG {
                let div = srcs.len() as f32;
                for a in &mut acc[..n] {
                    *a /= div;
                }
            }
            for (j, a) in acc[..n].iter().enumerate() {
                st_s::<D>(dst, i + j, *a);
            }
            i += n;
        }
    }
}

/// # Safety
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
unsafe fn kernel_scalar<const D: u8, const OP: u8>(dst: *mut u8, srcs: &[*const u8], count: usize) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { scalar_range::<D, OP>(dst, srcs, 0, count) }
}

/// The kernel of f64 and the integer types: each element is reduced in its own type, in rank
/// order; integers wrap (two's complement) and Avg truncates toward zero; f64 follows the f32
/// kernels' rules (NaN-propagating max/min where the first NaN in rank order wins, ties take the
/// later rank, a canonical NaN stored). One instance per (type, operator), so the loops have no
/// branch on the operator and the compiler can vectorise them.
mod generic {
    use super::*;

    const BAND: u8 = 5;
    const BOR: u8 = 6;
    const BXOR: u8 = 7;

    pub(super) trait Lane: Copy + Default {
        /// # Safety
        /// `p` must be valid for reading element `i`.
        unsafe fn ld(p: *const u8, i: usize) -> Self;
        /// # Safety
        /// `p` must be valid for writing element `i`.
        unsafe fn st(p: *mut u8, i: usize, v: Self);
        fn comb<const OP: u8>(acc: Self, x: Self) -> Self;
        fn avg(sum: Self, n: usize) -> Self;
    }

    macro_rules! int_lane {
        ($($t:ty),*) => {$(
            impl Lane for $t {
                #[inline(always)]
                unsafe fn ld(p: *const u8, i: usize) -> Self {
                    // SAFETY: the caller guarantees element `i` is readable.
                    unsafe { (p as *const $t).add(i).read_unaligned() }
                }
                #[inline(always)]
                unsafe fn st(p: *mut u8, i: usize, v: Self) {
                    // SAFETY: the caller guarantees element `i` is writable.
                    unsafe { (p as *mut $t).add(i).write_unaligned(v) }
                }
                #[inline(always)]
                fn comb<const OP: u8>(acc: Self, x: Self) -> Self {
                    match OP {
                        SUM | AVG => acc.wrapping_add(x),
                        PROD => acc.wrapping_mul(x),
                        MAX => acc.max(x),
                        MIN => acc.min(x),
                        BAND => acc & x,
                        BOR => acc | x,
                        _ => acc ^ x,
                    }
                }
                #[inline(always)]
                fn avg(sum: Self, n: usize) -> Self {
                    // In i128, which holds every value of every integer type and any rank count:
                    // the quotient is exact (truncated toward zero) and fits the type again
                    // (dividing in the type itself would need N to fit i8/u8).
                    (sum as i128 / n as i128) as $t
                }
            }
        )*};
    }
    int_lane!(i8, u8, i32, u32, i64, u64);

    impl Lane for f64 {
        #[inline(always)]
        unsafe fn ld(p: *const u8, i: usize) -> Self {
            // SAFETY: the caller guarantees element `i` is readable.
            unsafe { (p as *const f64).add(i).read_unaligned() }
        }
        #[inline(always)]
        unsafe fn st(p: *mut u8, i: usize, v: Self) {
            let v = if v.is_nan() {
                f64::from_bits(CANONICAL_NAN_F64)
            } else {
                v
            };
            // SAFETY: the caller guarantees element `i` is writable.
            unsafe { (p as *mut f64).add(i).write_unaligned(v) }
        }
        #[inline(always)]
        fn comb<const OP: u8>(acc: Self, x: Self) -> Self {
            match OP {
                SUM | AVG => acc + x,
                PROD => acc * x,
                MAX if acc.is_nan() || acc > x => acc,
                MIN if acc.is_nan() || acc < x => acc,
                MAX | MIN => x,
                _ => unreachable!("bitwise reduction of double (check_reducible refuses it)"),
            }
        }
        #[inline(always)]
        fn avg(sum: Self, n: usize) -> Self {
            sum / n as f64
        }
    }

    /// # Safety
    /// As [`reduce_raw`].
    unsafe fn run<T: Lane, const OP: u8>(dst: *mut u8, srcs: &[*const u8], count: usize) {
        const B: usize = 64;
        let mut acc = [T::default(); B];
        let mut i = 0;
        // SAFETY: every index read or written is < count (the caller's contract).
        unsafe {
            while i < count {
                let n = B.min(count - i);
                for (j, a) in acc[..n].iter_mut().enumerate() {
                    *a = T::ld(srcs[0], i + j);
                }
                for &s in &srcs[1..] {
                    for (j, a) in acc[..n].iter_mut().enumerate() {
                        *a = T::comb::<OP>(*a, T::ld(s, i + j));
                    }
                }
                if OP == AVG {
                    for a in &mut acc[..n] {
                        *a = T::avg(*a, srcs.len());
                    }
                }
                for (j, a) in acc[..n].iter().enumerate() {
                    T::st(dst, i + j, *a);
                }
                i += n;
            }
        }
    }

    /// # Safety
    /// As [`reduce_raw`].
    unsafe fn by_op<T: Lane>(op: ReduceOp, dst: *mut u8, srcs: &[*const u8], count: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match op {
                ReduceOp::Sum | ReduceOp::PreMulSum(_) => run::<T, SUM>(dst, srcs, count),
                ReduceOp::Avg => run::<T, AVG>(dst, srcs, count),
                ReduceOp::Product => run::<T, PROD>(dst, srcs, count),
                ReduceOp::Max => run::<T, MAX>(dst, srcs, count),
                ReduceOp::Min => run::<T, MIN>(dst, srcs, count),
                ReduceOp::BAnd => run::<T, BAND>(dst, srcs, count),
                ReduceOp::BOr => run::<T, BOR>(dst, srcs, count),
                ReduceOp::BXor => run::<T, BXOR>(dst, srcs, count),
            }
        }
    }

    /// # Safety
    /// As [`reduce_raw`].
    pub(super) unsafe fn reduce(
        dtype: DType,
        op: ReduceOp,
        dst: *mut u8,
        srcs: &[*const u8],
        count: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match dtype {
                DType::F64 => by_op::<f64>(op, dst, srcs, count),
                DType::I8 => by_op::<i8>(op, dst, srcs, count),
                DType::U8 => by_op::<u8>(op, dst, srcs, count),
                DType::I32 => by_op::<i32>(op, dst, srcs, count),
                DType::U32 => by_op::<u32>(op, dst, srcs, count),
                DType::I64 => by_op::<i64>(op, dst, srcs, count),
                DType::U64 => by_op::<u64>(op, dst, srcs, count),
                d => unreachable!(
                    "bitwise reduction of {} (check_reducible refuses it)",
                    d.name()
                ),
            }
        }
    }
}

const fn esize(d: u8) -> usize {
    if d == F32 {
        4
    } else {
        2
    }
}

// ---------------------------------------------------------------------------------------------
// The block loop both instruction sets share.

/// Defines `kernel` in a SIMD module (`x512`, `x256`) from that module's `ld`, `st`, `comb` and
/// `fin`: blocks of four vectors reduced over every source in rank order, then single vectors,
/// then the scalar tail. One loop for both widths, so they cannot drift apart.
#[cfg(target_arch = "x86_64")]
macro_rules! block_kernel {
    ($feature:literal, $lanes:literal, $splat:ident) => {
        /// # Safety
        /// The CPU must support the module's instruction set.
        /// Every pointer must be valid for the elements read or written through it here, and a
        /// written range must not overlap a range another live reference uses.
        #[target_feature(enable = $feature)]
        pub unsafe fn kernel<const D: u8, const OP: u8>(
            dst: *mut u8,
            srcs: &[*const u8],
            count: usize,
        ) {
            // SAFETY: the caller upholds this function's `# Safety` contract.
            unsafe {
                let vb = $lanes * esize(D);
                let s0 = srcs[0];
                let rest = &srcs[1..];
                let mut i = 0;
                let div = $splat(srcs.len() as f32);
                while i + 4 * $lanes <= count {
                    let o = i * esize(D);
                    let mut a0 = ld::<D>(s0.add(o));
                    let mut a1 = ld::<D>(s0.add(o + vb));
                    let mut a2 = ld::<D>(s0.add(o + 2 * vb));
                    let mut a3 = ld::<D>(s0.add(o + 3 * vb));
                    for &s in rest {
                        a0 = comb::<OP>(a0, ld::<D>(s.add(o)));
                        a1 = comb::<OP>(a1, ld::<D>(s.add(o + vb)));
                        a2 = comb::<OP>(a2, ld::<D>(s.add(o + 2 * vb)));
                        a3 = comb::<OP>(a3, ld::<D>(s.add(o + 3 * vb)));
                    }
                    st::<D>(dst.add(o), fin::<OP>(a0, div));
                    st::<D>(dst.add(o + vb), fin::<OP>(a1, div));
                    st::<D>(dst.add(o + 2 * vb), fin::<OP>(a2, div));
                    st::<D>(dst.add(o + 3 * vb), fin::<OP>(a3, div));
                    i += 4 * $lanes;
                }
                while i + $lanes <= count {
                    let o = i * esize(D);
                    let mut a = ld::<D>(s0.add(o));
                    for &s in rest {
                        a = comb::<OP>(a, ld::<D>(s.add(o)));
                    }
                    st::<D>(dst.add(o), fin::<OP>(a, div));
                    i += $lanes;
                }
                scalar_range::<D, OP>(dst, srcs, i, count);
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// AVX-512 (16 lanes, 4 vectors per block).

#[cfg(target_arch = "x86_64")]
mod x512 {
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support `avx512f`.
    /// Every pointer must be valid for the elements read or written through it here, and a
    /// written range must not overlap a range another live reference uses.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn ld<const D: u8>(p: *const u8) -> __m512 {
        // SAFETY: the caller upholds this function's `# Safety` contract.
        unsafe {
            match D {
                F32 => _mm512_loadu_ps(p as *const f32),
                BF16 => {
                    let h = _mm256_loadu_si256(p as *const __m256i);
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
                _ => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            }
        }
    }

    /// # Safety
    /// The CPU must support `avx512f`.
    /// Every pointer must be valid for the elements read or written through it here, and a
    /// written range must not overlap a range another live reference uses.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn st<const D: u8>(p: *mut u8, v: __m512) {
        // SAFETY: the caller upholds this function's `# Safety` contract.
        unsafe {
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let v = _mm512_mask_blend_ps(
                nan,
                v,
                _mm512_castsi512_ps(_mm512_set1_epi32(CANONICAL_NAN as i32)),
            );
            match D {
                F32 => _mm512_storeu_ps(p as *mut f32, v),
                BF16 => {
                    // Round to nearest even; the canonical NaN has zero low bits, so it maps to 0x7FC0.
                    let b = _mm512_castps_si512(v);
                    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
                    let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
                    let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
                    _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(r));
                }
                _ => {
                    let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                    _mm256_storeu_si256(p as *mut __m256i, h);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support `avx512f`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn comb<const OP: u8>(acc: __m512, x: __m512) -> __m512 {
        let m = match OP {
            SUM | AVG => return _mm512_add_ps(acc, x),
            PROD => return _mm512_mul_ps(acc, x),
            MAX => _mm512_max_ps(acc, x),
            _ => _mm512_min_ps(acc, x),
        };
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(acc, acc);
        _mm512_mask_blend_ps(nan, m, acc)
    }

    /// The last step before the store: Avg divides the rank-order sum by N (`div`), as the
    /// scalar path does (IEEE division, so the same bits); every other operator stores as is.
    ///
    /// # Safety
    /// The CPU must support `avx512f`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn fin<const OP: u8>(acc: __m512, div: __m512) -> __m512 {
        if OP == AVG {
            _mm512_div_ps(acc, div)
        } else {
            acc
        }
    }

    block_kernel!("avx512f", 16, _mm512_set1_ps);
}

/// # Safety
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[cfg(target_arch = "x86_64")]
unsafe fn kernel_avx512<const D: u8, const OP: u8>(dst: *mut u8, srcs: &[*const u8], count: usize) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { x512::kernel::<D, OP>(dst, srcs, count) }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + F16C (8 lanes, 4 vectors per block).

#[cfg(target_arch = "x86_64")]
mod x256 {
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support `avx2,f16c`.
    /// Every pointer must be valid for the elements read or written through it here, and a
    /// written range must not overlap a range another live reference uses.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub unsafe fn ld<const D: u8>(p: *const u8) -> __m256 {
        // SAFETY: the caller upholds this function's `# Safety` contract.
        unsafe {
            match D {
                F32 => _mm256_loadu_ps(p as *const f32),
                BF16 => {
                    let h = _mm_loadu_si128(p as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                }
                _ => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            }
        }
    }

    /// # Safety
    /// The CPU must support `avx2,f16c`.
    /// Every pointer must be valid for the elements read or written through it here, and a
    /// written range must not overlap a range another live reference uses.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub unsafe fn st<const D: u8>(p: *mut u8, v: __m256) {
        // SAFETY: the caller upholds this function's `# Safety` contract.
        unsafe {
            let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
            let v = _mm256_blendv_ps(
                v,
                _mm256_castsi256_ps(_mm256_set1_epi32(CANONICAL_NAN as i32)),
                nan,
            );
            match D {
                F32 => _mm256_storeu_ps(p as *mut f32, v),
                BF16 => {
                    // Round to nearest even; the canonical NaN has zero low bits, so it maps to 0x7FC0.
                    let b = _mm256_castps_si256(v);
                    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
                    let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
                    let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, bias));
                    // Every lane is <= 0xFFFF, so unsigned saturation packs exactly.
                    let lo = _mm256_castsi256_si128(r);
                    let hi = _mm256_extracti128_si256::<1>(r);
                    _mm_storeu_si128(p as *mut __m128i, _mm_packus_epi32(lo, hi));
                }
                _ => {
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                    _mm_storeu_si128(p as *mut __m128i, h);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support `avx2,f16c`.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub unsafe fn comb<const OP: u8>(acc: __m256, x: __m256) -> __m256 {
        let m = match OP {
            SUM | AVG => return _mm256_add_ps(acc, x),
            PROD => return _mm256_mul_ps(acc, x),
            MAX => _mm256_max_ps(acc, x),
            _ => _mm256_min_ps(acc, x),
        };
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(acc, acc);
        _mm256_blendv_ps(m, acc, nan)
    }

    /// The last step before the store: Avg divides the rank-order sum by N (`div`), as the
    /// scalar path does (IEEE division, so the same bits); every other operator stores as is.
    ///
    /// # Safety
    /// The CPU must support `avx2,f16c`.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub unsafe fn fin<const OP: u8>(acc: __m256, div: __m256) -> __m256 {
        if OP == AVG {
            _mm256_div_ps(acc, div)
        } else {
            acc
        }
    }

    block_kernel!("avx2,f16c", 8, _mm256_set1_ps);
}

/// # Safety
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[cfg(target_arch = "x86_64")]
unsafe fn kernel_avx2<const D: u8, const OP: u8>(dst: *mut u8, srcs: &[*const u8], count: usize) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { x256::kernel::<D, OP>(dst, srcs, count) }
}

/// PreMulSum's local step: multiplies every element of `buf` by `factor` in the accumulation
/// type (f32 for f32, bf16 and f16; f64 for f64), rounded once to the storage type. Only float
/// types get here ([`crate::types::check_reducible`] refuses the others).
pub fn scale_in_place(dtype: DType, buf: &mut [u8], factor: f64) {
    match dtype {
        DType::F64 => {
            for c in buf.chunks_exact_mut(8) {
                let v = f64::from_le_bytes(c.try_into().unwrap()) * factor;
                let v = if v.is_nan() {
                    f64::from_bits(CANONICAL_NAN_F64)
                } else {
                    v
                };
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F32 | DType::BF16 | DType::F16 => {
            let f = factor as f32;
            let e = dtype.size();
            for c in buf.chunks_exact_mut(e) {
                let x = match dtype {
                    DType::F32 => f32::from_le_bytes(c.try_into().unwrap()),
                    DType::BF16 => bf16_to_f32(u16::from_le_bytes(c.try_into().unwrap())),
                    _ => f16_to_f32(u16::from_le_bytes(c.try_into().unwrap())),
                };
                let v = x * f;
                let v = if v.is_nan() {
                    f32::from_bits(CANONICAL_NAN)
                } else {
                    v
                };
                match dtype {
                    DType::F32 => c.copy_from_slice(&v.to_le_bytes()),
                    DType::BF16 => c.copy_from_slice(&f32_to_bf16(v).to_le_bytes()),
                    _ => c.copy_from_slice(&f32_to_f16(v).to_le_bytes()),
                }
            }
        }
        d => unreachable!("premulsum of {} (not a float type)", d.name()),
    }
}

/// Canonical quiet NaN stored for a NaN f64 result.
pub const CANONICAL_NAN_F64: u64 = 0x7FF8_0000_0000_0000;

/// What a transport reduces for `op`: PreMulSum becomes a [`scale_in_place`]d copy of `input`
/// summed with [`ReduceOp::Sum`]; every other operator reduces `input` as it is.
pub fn premul_input<'a>(
    dtype: DType,
    op: ReduceOp,
    input: &'a [u8],
) -> (std::borrow::Cow<'a, [u8]>, ReduceOp) {
    match op {
        ReduceOp::PreMulSum(f) => {
            let mut v = input.to_vec();
            scale_in_place(dtype, &mut v, f);
            (std::borrow::Cow::Owned(v), ReduceOp::Sum)
        }
        _ => (std::borrow::Cow::Borrowed(input), op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn splitmix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// f32 bit patterns that stress rounding: every exponent, mantissas near the rounding points.
    fn interesting_f32(n_random: usize) -> Vec<u32> {
        let mut v = Vec::new();
        for e in 0u32..256 {
            for m in [
                0u32, 1, 0x1000, 0x0FFF, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x18000,
                0x7F_FFFF, 0x7F_E000, 0x7F_F000, 0x40_0000, 0x40_0001, 0x7F_8000,
            ] {
                for s in [0u32, 0x8000_0000] {
                    v.push(s | (e << 23) | m);
                }
            }
        }
        let mut st = 7u64;
        for _ in 0..n_random {
            v.push(splitmix(&mut st) as u32);
        }
        v
    }

    #[test]
    fn bf16_conversion_matches_half() {
        for b in 0..=u16::MAX {
            let ours = bf16_to_f32(b);
            let theirs = bf16::from_bits(b).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan());
                assert_eq!(f32_to_bf16(ours), f32_to_bf16(theirs));
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "bf16 {b:#06x}");
            }
        }
        for x in interesting_f32(1 << 20) {
            let v = f32::from_bits(x);
            assert_eq!(f32_to_bf16(v), bf16::from_f32(v).to_bits(), "f32 {x:#010x}");
        }
    }

    #[test]
    fn f16_conversion_matches_half() {
        for h in 0..=u16::MAX {
            let ours = f16_to_f32(h);
            let theirs = f16::from_bits(h).to_f32();
            assert_eq!(ours.to_bits(), theirs.to_bits(), "f16 {h:#06x}");
        }
        for x in interesting_f32(1 << 20) {
            let v = f32::from_bits(x);
            assert_eq!(f32_to_f16(v), f16::from_f32(v).to_bits(), "f32 {x:#010x}");
        }
    }

    fn encode(dtype: DType, vals: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &v in vals {
            match dtype {
                DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
                DType::BF16 => out.extend_from_slice(&f32_to_bf16(v).to_le_bytes()),
                DType::F16 => out.extend_from_slice(&f32_to_f16(v).to_le_bytes()),
                d => unreachable!("{d:?} is not reduced"),
            }
        }
        out
    }

    /// Every SIMD level gives the scalar bits, for every dtype/op, odd lengths, misaligned
    /// buffers, special values (NaN, inf, -0, subnormals) and in-place use.
    #[test]
    fn simd_paths_match_scalar() {
        let mut st = 42u64;
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-40,
            -3e-39,
            65504.0,
            65520.0,
            3.4e38,
            1.0,
            -1.0,
        ];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for op in [
                ReduceOp::Sum,
                ReduceOp::Max,
                ReduceOp::Min,
                ReduceOp::Product,
                ReduceOp::Avg,
            ] {
                for n in 1..=9usize {
                    for &count in &[0usize, 1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 127, 200, 1000] {
                        let srcs: Vec<Vec<u8>> = (0..n)
                            .map(|_| {
                                let vals: Vec<f32> = (0..count)
                                    .map(|_| {
                                        let r = splitmix(&mut st);
                                        if r.is_multiple_of(7) {
                                            specials[(r >> 8) as usize % specials.len()]
                                        } else if r.is_multiple_of(5) {
                                            f32::from_bits((r >> 16) as u32)
                                        } else {
                                            ((r >> 20) as i32 % 2000) as f32 / 64.0
                                        }
                                    })
                                    .collect();
                                // One byte of offset makes every buffer misaligned.
                                let mut b = vec![0u8];
                                b.extend(encode(dtype, &vals));
                                b
                            })
                            .collect();
                        let views: Vec<&[u8]> = srcs.iter().map(|s| &s[1..]).collect();
                        let bytes = count * dtype.size();
                        let mut want = vec![0u8; bytes];
                        reduce_into(Simd::Scalar, dtype, op, &mut want, &views);
                        for simd in Simd::available() {
                            let mut got = vec![0u8; bytes + 1];
                            reduce_into(simd, dtype, op, &mut got[1..], &views);
                            assert_eq!(
                                &got[1..],
                                &want[..],
                                "{simd:?} {dtype:?} {op:?} n={n} count={count}"
                            );
                            // In place: dst == srcs[0].
                            let mut inplace = srcs[0].clone();
                            let mut ptrs: Vec<*const u8> =
                                views.iter().map(|s| s.as_ptr()).collect();
                            ptrs[0] = inplace[1..].as_ptr();
                            // SAFETY: all buffers hold `count` elements; dst equals srcs[0]
                            // exactly, which reduce_raw allows.
                            unsafe {
                                reduce_raw(simd, dtype, op, inplace[1..].as_mut_ptr(), &ptrs, count)
                            };
                            assert_eq!(
                                &inplace[1..],
                                &want[..],
                                "in place {simd:?} {dtype:?} {op:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// NaN results are the canonical NaN on every path, whatever NaNs went in.
    #[test]
    fn nan_results_are_canonical() {
        let nan_bits = |dtype: DType| match dtype {
            DType::F32 => CANONICAL_NAN.to_le_bytes().to_vec(),
            DType::BF16 => 0x7FC0u16.to_le_bytes().to_vec(),
            DType::F16 => 0x7E00u16.to_le_bytes().to_vec(),
            d => unreachable!("{d:?} is not reduced"),
        };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let count = 37; // SIMD body and scalar tail
            let pos = encode(dtype, &vec![f32::INFINITY; count]);
            let neg = encode(dtype, &vec![f32::NEG_INFINITY; count]);
            let odd_nan = encode(dtype, &vec![f32::from_bits(0xFFC0_1234); count]);
            let one = encode(dtype, &vec![1.0; count]);
            let zero = encode(dtype, &vec![0.0; count]);
            for simd in Simd::available() {
                for (op, srcs) in [
                    (ReduceOp::Sum, vec![&pos[..], &neg[..]]),
                    (ReduceOp::Sum, vec![&odd_nan[..], &one[..]]),
                    (ReduceOp::Max, vec![&one[..], &odd_nan[..], &pos[..]]),
                    (ReduceOp::Max, vec![&odd_nan[..], &pos[..]]),
                    (ReduceOp::Min, vec![&one[..], &odd_nan[..], &neg[..]]),
                    (ReduceOp::Min, vec![&odd_nan[..], &neg[..]]),
                    (ReduceOp::Product, vec![&pos[..], &one[..], &zero[..]]),
                    (ReduceOp::Product, vec![&one[..], &odd_nan[..]]),
                ] {
                    let mut out = vec![0u8; one.len()];
                    reduce_into(simd, dtype, op, &mut out, &srcs);
                    for c in out.chunks(dtype.size()) {
                        assert_eq!(c, &nan_bits(dtype)[..], "{simd:?} {dtype:?} {op:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn sum_is_rank_ordered_f32() {
        // (1e8 + 1) - 1e8 = 0 in f32, but 1e8 - 1e8 + 1 = 1: the order is observable.
        let a = 1e8f32.to_le_bytes();
        let b = 1f32.to_le_bytes();
        let c = (-1e8f32).to_le_bytes();
        for simd in Simd::available() {
            let mut out = [0u8; 4];
            reduce_into(simd, DType::F32, ReduceOp::Sum, &mut out, &[&a, &b, &c]);
            assert_eq!(f32::from_le_bytes(out), 0.0);
            reduce_into(simd, DType::F32, ReduceOp::Sum, &mut out, &[&a, &c, &b]);
            assert_eq!(f32::from_le_bytes(out), 1.0);
        }
    }

    /// Min and Product: the values, rank order in f32 (product rounds once per rank), NaN first
    /// in rank order wins for min as for max, and the SIMD paths agree (checked above too).
    #[test]
    fn min_and_product_are_rank_ordered_f32() {
        let f = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let a = f(&[3.0, -0.0, 1e30, 2.0, f32::NAN, 5.0, 7.0, 1.5]);
        let b = f(&[-1.0, 0.0, 1e30, f32::NEG_INFINITY, 1.0, f32::NAN, -7.0, 3.0]);
        let c = f(&[2.0, 1.0, 1e-30, 4.0, -1.0, 1.0, 0.0, 2.0]);
        for simd in Simd::available() {
            let mut out = [0u8; 32];
            reduce_into(simd, DType::F32, ReduceOp::Min, &mut out, &[&a, &b, &c]);
            let got: Vec<f32> = out
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(
                &got[..4],
                &[-1.0, 0.0, 1e-30, f32::NEG_INFINITY],
                "{simd:?}"
            );
            assert!(got[4].is_nan() && got[5].is_nan(), "{simd:?}");
            assert_eq!(&got[6..], &[-7.0, 1.5], "{simd:?}");
            // Of -0 and +0 the later rank's wins, as minps does.
            assert!(got[1].is_sign_positive(), "{simd:?}");
            reduce_into(simd, DType::F32, ReduceOp::Product, &mut out, &[&a, &b, &c]);
            let got: Vec<f32> = out
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            // 1e30 * 1e30 overflows to inf before * 1e-30: rank order, in f32.
            assert_eq!(got[2], f32::INFINITY, "{simd:?}");
            assert_eq!(got[0], -6.0, "{simd:?}");
            assert_eq!(got[7], 9.0, "{simd:?}");
            assert_eq!(got[6].to_bits(), (-0.0f32).to_bits(), "{simd:?}");
            reduce_into(simd, DType::F32, ReduceOp::Product, &mut out, &[&c, &a, &b]);
            let got: Vec<f32> = out
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(got[2], 1e30, "{simd:?}");
        }
    }

    /// The generic kernel: integer averages are exact quotients of the wrapped sum whatever N
    /// (also past what i8/u8 hold), truncated toward zero; f64 keeps the f32 rules.
    #[test]
    fn generic_kernel_integers_and_f64() {
        let avg_i8 = |vals: &[i8]| {
            let srcs: Vec<[u8; 1]> = vals.iter().map(|v| v.to_le_bytes()).collect();
            let views: Vec<&[u8]> = srcs.iter().map(|s| &s[..]).collect();
            let mut out = [0u8];
            reduce_into(Simd::Scalar, DType::I8, ReduceOp::Avg, &mut out, &views);
            i8::from_le_bytes(out)
        };
        assert_eq!(avg_i8(&[-7, 0]), -3);
        assert_eq!(avg_i8(&[7, 0]), 3);
        // 100 + 100 wraps to -56, / 2.
        assert_eq!(avg_i8(&[100, 100]), -28);
        // 129 ranks of -1 wrap to 127: 127 / 129 = 0 (a count clamped to i8's 127 gave 1).
        assert_eq!(avg_i8(&[-1; 128]), -1);
        assert_eq!(avg_i8(&[-1; 129]), 0);
        let mut u = [0u8];
        let ones = [[255u8]; 300];
        let views: Vec<&[u8]> = ones.iter().map(|s| &s[..]).collect();
        reduce_into(Simd::Scalar, DType::U8, ReduceOp::Avg, &mut u, &views);
        // 300 * 255 mod 256 = 212, / 300 = 0.
        assert_eq!(u[0], 0);

        let f = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let a = f(&[1.0, f64::NAN, -0.0, 3.0]);
        let b = f(&[f64::NAN, 2.0, 0.0, 5.0]);
        let mut out = vec![0u8; 32];
        for (op, want) in [
            (ReduceOp::Max, [f64::NAN, f64::NAN, 0.0, 5.0]),
            (ReduceOp::Avg, [f64::NAN, f64::NAN, 0.0, 4.0]),
        ] {
            reduce_into(Simd::detect(), DType::F64, op, &mut out, &[&a, &b]);
            for (c, w) in out.chunks(8).zip(want) {
                let bits = u64::from_le_bytes(c.try_into().unwrap());
                let wb = if w.is_nan() {
                    CANONICAL_NAN_F64
                } else {
                    w.to_bits()
                };
                assert_eq!(bits, wb, "{op:?}");
            }
        }
    }
}
