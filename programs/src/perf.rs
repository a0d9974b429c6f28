//! `tprun perf`: the nccl-tests table for tprun's collectives.
//!
//! Every rank runs the same loop; rank 0 prints. A row's time is the mean over `--iters` calls on
//! each rank, then the maximum over ranks. Sizes double from `--min-bytes` to `--max-bytes`, and
//! bytes are counted as nccl-tests counts them: the buffer for all-reduce, broadcast, reduce and
//! send-recv (bytes sent); the whole gathered/scattered buffer for all-gather, reduce-scatter,
//! gather and scatter; a rank's whole input for all-to-all; those sizes are rounded down to a
//! multiple of world size x element size. `--check` fills every input with rank-dependent values
//! and compares every output element, bit for bit, on every rank, with a serial rank-order
//! reference computed locally (the documented order of `collectives::reduce`, written here
//! again with the `half` crate's conversions); `#wrong` is the number of mismatches summed over
//! ranks.
//!
//! `--group-size K` splits the world into groups of K consecutive ranks
//! (`split(Some(rank / K), rank)`) and runs the sweep inside every group at once; each group has
//! its own input values, so one group's data showing up in another's counts as wrong. Times and
//! `#wrong` are then over all ranks of all groups, and bus bandwidth is a group's.

use anyhow::{bail, ensure, Context};
use half::{bf16, f16};

#[cfg(feature = "cuda")]
#[path = "perf_cuda.rs"]
mod cuda;

use collectives::units::parse_size;
use collectives::{CommError, CommExt, Communicator, DType, Float, Hierarchy, P2p, ReduceOp};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerfOp {
    #[value(alias = "all_reduce", alias = "allreduce")]
    AllReduce,
    #[value(alias = "all_gather", alias = "allgather")]
    AllGather,
    #[value(alias = "reduce_scatter", alias = "reducescatter")]
    ReduceScatter,
    Broadcast,
    Reduce,
    Gather,
    Scatter,
    #[value(alias = "all_to_all", alias = "alltoall")]
    AllToAll,
    // A ring: each rank sends to rank+1 and receives from rank-1 in one grouped call.
    #[value(alias = "send_recv", alias = "sendrecv")]
    SendRecv,
    // all-reduce, all-gather, reduce-scatter and broadcast, in turn.
    All,
}

impl PerfOp {
    fn name(self) -> &'static str {
        match self {
            PerfOp::AllReduce => "all_reduce",
            PerfOp::AllGather => "all_gather",
            PerfOp::ReduceScatter => "reduce_scatter",
            PerfOp::Broadcast => "broadcast",
            PerfOp::Reduce => "reduce",
            PerfOp::Gather => "gather",
            PerfOp::Scatter => "scatter",
            PerfOp::AllToAll => "all_to_all",
            PerfOp::SendRecv => "send_recv",
            PerfOp::All => "all",
        }
    }
    /// nccl-tests' factor from algorithm bandwidth to bus bandwidth.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            PerfOp::AllReduce => 2.0 * (n - 1.0) / n,
            PerfOp::AllGather
            | PerfOp::ReduceScatter
            | PerfOp::Gather
            | PerfOp::Scatter
            | PerfOp::AllToAll => (n - 1.0) / n,
            PerfOp::Broadcast | PerfOp::Reduce | PerfOp::SendRecv | PerfOp::All => 1.0,
        }
    }
    /// Whether `--redop` applies.
    fn reduces(self) -> bool {
        matches!(
            self,
            PerfOp::AllReduce | PerfOp::ReduceScatter | PerfOp::Reduce | PerfOp::All
        )
    }
    /// Whether `--root` applies.
    fn rooted(self) -> bool {
        matches!(
            self,
            PerfOp::Broadcast | PerfOp::Reduce | PerfOp::Gather | PerfOp::Scatter | PerfOp::All
        )
    }
    /// Whether the CUDA transport runs it on device buffers (perf `--device cuda`).
    pub fn on_device(self) -> bool {
        matches!(
            self,
            PerfOp::AllReduce
                | PerfOp::AllGather
                | PerfOp::ReduceScatter
                | PerfOp::Broadcast
                | PerfOp::All
        )
    }
    /// Buffer bytes per rank, at most, per byte of `--max-bytes` on `n` ranks.
    fn memory_factor(self, n: usize) -> f64 {
        match self {
            PerfOp::AllReduce | PerfOp::Broadcast | PerfOp::Reduce => 1.0,
            PerfOp::AllToAll | PerfOp::SendRecv => 2.0,
            _ => 1.0 + 1.0 / n as f64,
        }
    }
}

/// `--dtype`: every [`DType`] by its short or C name (also `float32`, `float16`).
fn parse_dtype(s: &str) -> Result<DType, String> {
    let s = s.trim();
    let alias = match s {
        "float32" => Some(DType::F32),
        "float16" => Some(DType::F16),
        "float64" => Some(DType::F64),
        _ => None,
    };
    alias.or_else(|| DType::parse(s)).ok_or_else(|| {
        let names: Vec<&str> = DTYPES.iter().map(|d| d.short_name()).collect();
        format!("expected one of {}", names.join(" "))
    })
}

/// The types in the order help and errors list them.
const DTYPES: [DType; 10] = [
    DType::F64,
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::I8,
    DType::U8,
    DType::I32,
    DType::U32,
    DType::I64,
    DType::U64,
];

/// `--redop`: every [`ReduceOp`] by its name.
fn parse_redop(s: &str) -> Result<ReduceOp, String> {
    ReduceOp::parse(s.trim()).ok_or_else(|| {
        let names: Vec<&str> = ReduceOp::ALL.iter().map(|o| o.name()).collect();
        format!("expected one of {}", names.join(" "))
    })
}

/// The factor rank `r` of a group passes to `--redop premulsum` (exact in every float type, and
/// different per rank, so that a result shows which rank's factor went where).
fn premul_factor(r: usize) -> f64 {
    1.0 + (r % 8) as f64 / 4.0
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Collectives to measure, comma-separated (`all` = all-reduce, all-gather, reduce-scatter
    /// and broadcast in turn).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all-reduce")]
    pub op: Vec<PerfOp>,
    /// Element type: f64 f32 f16 bf16 i8 u8 i32 u32 i64 u64 (f16 and bf16 reduce in f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,
    /// Reduction of all-reduce, reduce-scatter and reduce: sum prod max min avg, band bor bxor
    /// (integer types), premulsum (float types; rank r's factor is 1 + (r mod 8)/4).
    #[arg(long, default_value = "sum", value_parser = parse_redop)]
    pub redop: ReduceOp,
    /// Smallest size in bytes (K/M/G suffixes, powers of 1024).
    #[arg(long, default_value = "8", value_parser = parse_bounded_size)]
    pub min_bytes: u64,
    /// Largest size in bytes (K/M/G suffixes, powers of 1024).
    #[arg(long, default_value = "64M", value_parser = parse_bounded_size)]
    pub max_bytes: u64,
    /// Timed calls per size.
    #[arg(long, default_value_t = 20, value_parser = parse_count)]
    pub iters: usize,
    /// Untimed calls per size before timing.
    #[arg(long, default_value_t = 5, value_parser = parse_count)]
    pub warmup: usize,
    /// Check every element against a serial rank-order reference (#wrong column).
    #[arg(long)]
    pub check: bool,
    /// Root rank of broadcast, reduce, gather and scatter (a group rank with --group-size).
    #[arg(long, default_value_t = 0)]
    pub root: usize,
    /// Run the sweep inside groups of K consecutive ranks (made with split), all groups at once;
    /// K must divide the number of ranks.
    #[arg(long, value_name = "K", value_parser = parse_group_size)]
    pub group_size: Option<usize>,
    /// Multi-node all-reduce (feature `mpi`): reproducible (the default: the one-host result's
    /// bits) or fast (node partial sums: the same bits on every rank, not the one-host ones);
    /// sets TPRUN_HIER_MODE for this rank. --check then compares with the fast mode's order.
    #[arg(long, value_enum, value_name = "MODE")]
    pub hier_mode: Option<HierMode>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also draw busbw against size, one line per op, to this SVG file (rank 0).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
    /// Plot saved `perf --json` outputs instead of measuring (repeatable; one line per op and
    /// world size; runs without ranks). Needs --plot.
    #[arg(long, value_name = "FILE.json", requires = "plot")]
    pub from: Vec<std::path::PathBuf>,
}

/// `--hier-mode`: the value of `TPRUN_HIER_MODE` it sets.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HierMode {
    Reproducible,
    Fast,
}

/// One line of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub op: &'static str,
    pub bytes: u64,
    pub count: u64,
    pub dtype: &'static str,
    pub time_us: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
    /// Mismatching elements summed over ranks; None without --check.
    pub wrong: Option<u64>,
    /// `--device cuda`: the time of one device-to-device copy of `bytes` on a rank's GPU (the
    /// floor a collective of that size is held against), the maximum over ranks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_us: Option<f64>,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An element type as the check sees it: its input values and the reference reduction, written
/// independently of the transport's kernels.
trait Elem: bytemuck::Pod {
    /// An input value from 64 random bits: floats uniform in [-1, 1) with a full mantissa (so the
    /// summation order shows in the result), integers all their bits.
    fn gen(h: u64) -> Self;
    /// `xs` (every rank's input, rank order, `n` of them) reduced as `collectives::reduce`
    /// documents: `acc = x0; acc = op(acc, x1); ...`, f16/bf16 in f32, integers wrapping, avg
    /// divided by `n` once at the end.
    fn reduce(op: ReduceOp, xs: impl Iterator<Item = Self>, n: usize) -> Self;
    /// PreMulSum's local step: `self * f` in the accumulation type, rounded to this type. Never
    /// called for integers (perf refuses premulsum of integers before it starts).
    fn premul(self, f: f64) -> Self;
}

/// One step of a float reduction (no NaN among perf's inputs; max/min keep the accumulator on
/// ties, as documented).
macro_rules! float_step {
    ($op:expr, $a:expr, $x:expr) => {
        match $op {
            ReduceOp::Product => $a * $x,
            ReduceOp::Max => {
                if $a.is_nan() || $a > $x {
                    $a
                } else {
                    $x
                }
            }
            ReduceOp::Min => {
                if $a.is_nan() || $a < $x {
                    $a
                } else {
                    $x
                }
            }
            _ => $a + $x,
        }
    };
}

/// A value uniform in [-1, 1) with 23 mantissa bits (perf's f32/bf16/f16 inputs).
fn unit_f32(h: u64) -> f32 {
    ((h >> 40) as f32) / (1u64 << 23) as f32 - 1.0
}

macro_rules! f32_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            fn gen(h: u64) -> Self {
                <$t as Float>::from_f32(unit_f32(h))
            }
            fn reduce(op: ReduceOp, mut xs: impl Iterator<Item = Self>, n: usize) -> Self {
                let mut acc = xs.next().map_or(0.0, |x| x.to_f32());
                for x in xs {
                    let x = x.to_f32();
                    acc = float_step!(op, acc, x);
                }
                if op == ReduceOp::Avg {
                    acc /= n as f32;
                }
                <$t as Float>::from_f32(acc)
            }
            fn premul(self, f: f64) -> Self {
                <$t as Float>::from_f32(self.to_f32() * f as f32)
            }
        }
    )*};
}
f32_elem!(f32, bf16, f16);

impl Elem for f64 {
    fn gen(h: u64) -> Self {
        ((h >> 11) as f64) / (1u64 << 52) as f64 - 1.0
    }
    fn reduce(op: ReduceOp, mut xs: impl Iterator<Item = Self>, n: usize) -> Self {
        let mut acc = xs.next().unwrap_or(0.0);
        for x in xs {
            acc = float_step!(op, acc, x);
        }
        if op == ReduceOp::Avg {
            acc /= n as f64;
        }
        acc
    }
    fn premul(self, f: f64) -> Self {
        self * f
    }
}

macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            fn gen(h: u64) -> Self {
                h as $t
            }
            fn reduce(op: ReduceOp, mut xs: impl Iterator<Item = Self>, n: usize) -> Self {
                let mut acc = xs.next().unwrap_or(0);
                for x in xs {
                    acc = match op {
                        ReduceOp::Product => acc.wrapping_mul(x),
                        ReduceOp::Max => acc.max(x),
                        ReduceOp::Min => acc.min(x),
                        ReduceOp::BAnd => acc & x,
                        ReduceOp::BOr => acc | x,
                        ReduceOp::BXor => acc ^ x,
                        _ => acc.wrapping_add(x),
                    };
                }
                if op == ReduceOp::Avg {
                    // Truncated toward zero; perf runs fewer ranks than i8 counts to.
                    acc /= n as $t;
                }
                acc
            }
            fn premul(self, _f: f64) -> Self {
                self
            }
        }
    )*};
}
int_elem!(i8, u8, i32, u32, i64, u64);

/// Runs `$body` with `$t` bound to the Rust type of `$dtype`.
macro_rules! with_type {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::I8 => {
                type $t = i8;
                $body
            }
            DType::U8 => {
                type $t = u8;
                $body
            }
            DType::I32 => {
                type $t = i32;
                $body
            }
            DType::U32 => {
                type $t = u32;
                $body
            }
            DType::I64 => {
                type $t = i64;
                $body
            }
            DType::U64 => {
                type $t = u64;
                $body
            }
        }
    };
}

/// What every case of one run shares: the type, the reduction, this rank's place in its group.
#[derive(Clone, Copy, Debug)]
struct Setup {
    dtype: DType,
    /// `--redop` as given (PreMulSum with each rank's own factor is made per rank).
    redop: ReduceOp,
    /// Ranks in the group and this rank's number there.
    n: usize,
    rank: usize,
    root: usize,
    /// The group's number (0 without groups): part of every input value.
    group: u64,
    /// `(nodes, ranks per node)` when all-reduce and reduce run the fast hierarchy (node sums
    /// in local rank order, then the nodes' sums in node order, each rounded to the type).
    fast: Option<(usize, usize)>,
}

impl Setup {
    /// Group rank `r`'s input element `i`.
    fn input<T: Elem>(&self, r: usize, i: usize) -> T {
        let g = self.group.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        T::gen(splitmix(((r as u64) << 40) ^ i as u64 ^ 0x7072_756E ^ g))
    }
    /// The reduction this rank asks for (premulsum with its own factor).
    fn redop_of(&self, r: usize) -> ReduceOp {
        match self.redop {
            ReduceOp::PreMulSum(_) => ReduceOp::PreMulSum(premul_factor(r)),
            op => op,
        }
    }
    /// Element `i` of the reduction over the group's inputs, rank order.
    fn reduced<T: Elem>(&self, i: usize) -> T {
        self.reduced_over(i, 0..self.n)
    }
    /// Element `i` reduced over the ranks `ranks`, in that order.
    fn reduced_over<T: Elem>(&self, i: usize, ranks: std::ops::Range<usize>) -> T {
        let xs = ranks.map(|r| match self.redop_of(r) {
            ReduceOp::PreMulSum(f) => self.input::<T>(r, i).premul(f),
            _ => self.input::<T>(r, i),
        });
        T::reduce(self.plain_op(), xs, self.n)
    }
    fn plain_op(&self) -> ReduceOp {
        match self.redop {
            ReduceOp::PreMulSum(_) => ReduceOp::Sum,
            op => op,
        }
    }
    /// Element `i` of all-reduce and reduce: the fast hierarchy's order where it runs, else
    /// [`Setup::reduced`].
    fn all_reduced<T: Elem>(&self, i: usize) -> T {
        match self.fast {
            Some((k, l)) => {
                let sums = (0..k).map(|node| self.reduced_over::<T>(i, node * l..(node + 1) * l));
                T::reduce(self.plain_op(), sums, k)
            }
            None => self.reduced(i),
        }
    }
}

fn count_wrong<T: Elem>(out: &[u8], want: impl Fn(usize) -> T) -> u64 {
    bytemuck::cast_slice::<u8, T>(out)
        .iter()
        .enumerate()
        .filter(|(i, x)| bytemuck::bytes_of(*x) != bytemuck::bytes_of(&want(*i)))
        .count() as u64
}

/// Outputs are set to this before the checked call, so that an output the call did not write
/// shows as wrong.
const POISON: u8 = 0xA5;

/// Buffers for one size (u64-aligned storage so the typed views of every type are valid).
struct Bufs {
    a: Vec<u64>,
    b: Vec<u64>,
    a_len: usize,
    b_len: usize,
}

/// Storage every size and op of one run shares, grown to the largest size first and never
/// freed: like nccl-tests (and the MPI programs perf is compared with), every call runs in memory
/// that stays mapped for the whole sweep. Fresh buffers per size would be mapped and unmapped
/// each time, and on some virtual machines new pages copy several times slower for their first
/// few passes (measured: a 16 MiB memcpy into fresh pages took 2.9, 2.5, 2.0, 1.5 ms on its 2nd
/// to 5th pass, 1.2 ms from then on).
#[derive(Default)]
struct Pool {
    a: Vec<u64>,
    b: Vec<u64>,
}

impl Pool {
    /// Grows (and touches) the storage to hold `case`'s buffers.
    fn reserve_for(&mut self, case: Option<Case>) {
        if let Some(c) = case {
            c.bufs.into_pool(self);
        }
    }
}

impl Bufs {
    /// Views of `pool`'s storage, grown (never shrunk) to these lengths.
    fn from_pool(pool: &mut Pool, a_len: usize, b_len: usize) -> Bufs {
        let (mut a, mut b) = (std::mem::take(&mut pool.a), std::mem::take(&mut pool.b));
        if a.len() < a_len.div_ceil(8) {
            a.resize(a_len.div_ceil(8), 0);
        }
        if b.len() < b_len.div_ceil(8) {
            b.resize(b_len.div_ceil(8), 0);
        }
        Bufs { a, b, a_len, b_len }
    }
    fn into_pool(self, pool: &mut Pool) {
        pool.a = self.a;
        pool.b = self.b;
    }
    fn both(&mut self) -> (&mut [u8], &mut [u8]) {
        (
            &mut bytemuck::cast_slice_mut(&mut self.a)[..self.a_len],
            &mut bytemuck::cast_slice_mut(&mut self.b)[..self.b_len],
        )
    }
}

/// One op at one size on this rank: its buffers (`a` the input, or the buffer of in-place ops;
/// `b` the output) and how to run and check it.
struct Case {
    op: PerfOp,
    s: Setup,
    /// The reduction this rank passes (its own premulsum factor).
    redop: ReduceOp,
    /// Elements per rank segment (all-gather input, reduce-scatter output, gather/scatter
    /// per-rank part, all-to-all chunk) or of the buffer.
    per: usize,
    bufs: Bufs,
}

impl Case {
    #[cfg(test)]
    fn new(op: PerfOp, s: Setup, size: u64) -> Option<Case> {
        Case::in_pool(op, s, size, &mut Pool::default())
    }

    /// A case whose buffers come from `pool` (give them back with `bufs.into_pool`).
    fn in_pool(op: PerfOp, s: Setup, size: u64, pool: &mut Pool) -> Option<Case> {
        let (e, n) = (s.dtype.size(), s.n);
        let size = size as usize;
        let whole = size / e;
        let seg = size / (e * n);
        let at_root = s.rank == s.root;
        // (per, a elements, b elements)
        let (per, a, b) = match op {
            PerfOp::AllReduce | PerfOp::Broadcast | PerfOp::Reduce => (whole, whole, 0),
            PerfOp::SendRecv => (whole, whole, whole),
            PerfOp::AllGather => (seg, seg, seg * n),
            PerfOp::ReduceScatter => (seg, seg * n, seg),
            PerfOp::Gather => (seg, seg, if at_root { seg * n } else { 0 }),
            PerfOp::Scatter => (seg, if at_root { seg * n } else { 0 }, seg),
            PerfOp::AllToAll => (seg, seg * n, seg * n),
            PerfOp::All => unreachable!(),
        };
        (per > 0).then(|| Case {
            op,
            s,
            redop: s.redop_of(s.rank),
            per,
            bufs: Bufs::from_pool(pool, a * e, b * e),
        })
    }

    /// Bytes as the table reports them (nccl-tests' count) and the element count behind them.
    fn bytes_count(&self) -> (u64, u64) {
        let e = self.s.dtype.size() as u64;
        let c = match self.op {
            PerfOp::AllGather
            | PerfOp::ReduceScatter
            | PerfOp::Gather
            | PerfOp::Scatter
            | PerfOp::AllToAll => (self.per * self.s.n) as u64,
            _ => self.per as u64,
        };
        (c * e, c)
    }

    /// This rank's inputs, and the poison in its outputs.
    fn fill(&mut self) {
        with_type!(self.s.dtype, T => self.fill_t::<T>())
    }

    fn fill_t<T: Elem>(&mut self) {
        let s = self.s;
        let (a, b) = self.bufs.both();
        for (i, x) in bytemuck::cast_slice_mut::<u8, T>(a).iter_mut().enumerate() {
            *x = s.input(s.rank, i);
        }
        b.fill(POISON);
    }

    fn run(&mut self, comm: &mut dyn Communicator) -> collectives::Result<()> {
        let (dt, redop, root) = (self.s.dtype, self.redop, self.s.root);
        let (n, me) = (self.s.n, self.s.rank);
        let (a, b) = self.bufs.both();
        match self.op {
            PerfOp::AllReduce => comm.all_reduce_raw(a, dt, redop),
            PerfOp::Broadcast => comm.broadcast_raw(a, root),
            PerfOp::AllGather => comm.all_gather_raw(a, b, dt),
            PerfOp::ReduceScatter => comm.reduce_scatter_raw(a, b, dt, redop),
            PerfOp::Reduce => comm.reduce_raw(a, dt, redop, root),
            PerfOp::Gather => comm.gather_raw(a, b, dt, root),
            PerfOp::Scatter => comm.scatter_raw(a, b, dt, root),
            PerfOp::AllToAll => comm.all_to_all_raw(a, b, dt),
            PerfOp::SendRecv => comm.send_recv_raw(
                &mut [
                    P2p::Send {
                        buf: a,
                        peer: (me + 1) % n,
                    },
                    P2p::Recv {
                        buf: b,
                        peer: (me + n - 1) % n,
                    },
                ],
                dt,
            ),
            PerfOp::All => unreachable!(),
        }
    }

    /// Elements of this rank's results that differ from the reference.
    fn wrong(&mut self) -> u64 {
        with_type!(self.s.dtype, T => self.wrong_t::<T>())
    }

    fn wrong_t<T: Elem>(&mut self) -> u64 {
        let (s, per) = (self.s, self.per);
        let (rank, root, n) = (s.rank, s.root, s.n);
        let (a, b) = self.bufs.both();
        match self.op {
            PerfOp::AllReduce => count_wrong::<T>(a, |i| s.all_reduced(i)),
            PerfOp::Reduce if rank == root => count_wrong::<T>(a, |i| s.all_reduced(i)),
            // The other ranks' buffers are left as they were.
            PerfOp::Reduce => count_wrong::<T>(a, |i| s.input(rank, i)),
            PerfOp::Broadcast => count_wrong::<T>(a, |i| s.input(root, i)),
            PerfOp::AllGather => count_wrong::<T>(b, |j| s.input(j / per, j % per)),
            PerfOp::ReduceScatter => count_wrong::<T>(b, |i| s.reduced(rank * per + i)),
            // Only the root receives (the others' output is empty).
            PerfOp::Gather => count_wrong::<T>(b, |j| s.input(j / per, j % per)),
            PerfOp::Scatter => count_wrong::<T>(b, |i| s.input(root, rank * per + i)),
            PerfOp::AllToAll => count_wrong::<T>(b, |j| s.input(j / per, rank * per + j % per)),
            PerfOp::SendRecv => count_wrong::<T>(b, |i| s.input((rank + n - 1) % n, i)),
            PerfOp::All => unreachable!(),
        }
    }
}

/// The device perf measures: a host transport on host buffers, or (feature `cuda`,
/// `--device cuda`, which the launcher passes to the ranks as `TPRUN_DEVICE=cuda`) the CUDA
/// transport on device buffers.
enum Dev {
    Host(Box<dyn Communicator>),
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::Device>),
}

/// The world's communicator and, with `--group-size`, this rank's group made from it.
struct PerfComm {
    dev: Dev,
    group: Option<Box<dyn Communicator>>,
}

impl PerfComm {
    fn from_env(args: &Args) -> anyhow::Result<PerfComm> {
        let dev = if std::env::var("TPRUN_DEVICE").is_ok_and(|d| d == "cuda") {
            if let Some((flag, why)) = cuda_refuses(args) {
                bail!("{flag} is not available with --device cuda: {why}");
            }
            #[cfg(feature = "cuda")]
            {
                Dev::Cuda(Box::new(cuda::Device::new()?))
            }
            #[cfg(not(feature = "cuda"))]
            bail!(crate::device::NO_CUDA_BUILD);
        } else {
            if let Some(mode) = args.hier_mode {
                let v = if mode == HierMode::Fast {
                    "fast"
                } else {
                    "reproducible"
                };
                // Before any thread starts: the communicator reads it once, when it is made.
                std::env::set_var(collectives::ENV_HIER_MODE, v);
            }
            Dev::Host(collectives::from_env().context("perf: cannot set up the collectives")?)
        };
        Ok(PerfComm { dev, group: None })
    }

    /// The whole job's communicator.
    fn world(&mut self) -> &mut dyn Communicator {
        match &mut self.dev {
            Dev::Host(c) => c.as_mut(),
            #[cfg(feature = "cuda")]
            Dev::Cuda(d) => &mut d.comm,
        }
    }

    /// The communicator the sweep runs on: this rank's group, or the world.
    fn comm(&mut self) -> &mut dyn Communicator {
        match (&mut self.group, &mut self.dev) {
            (Some(g), _) => g.as_mut(),
            (None, Dev::Host(c)) => c.as_mut(),
            #[cfg(feature = "cuda")]
            (None, Dev::Cuda(d)) => &mut d.comm,
        }
    }

    /// `--group-size k`: groups of `k` consecutive ranks.
    fn split(&mut self, k: usize) -> anyhow::Result<()> {
        let rank = self.world().rank();
        let group = self
            .world()
            .split(Some((rank / k) as u32), rank as i64)
            .with_context(|| format!("perf --group-size {k}: cannot split the world"))?
            .with_context(|| format!("perf --group-size {k}: split gave rank {rank} no group"))?;
        self.group = Some(group);
        Ok(())
    }

    /// Fills the case's inputs (and copies them to the device).
    fn fill(&mut self, case: &mut Case) -> anyhow::Result<()> {
        case.fill();
        match &mut self.dev {
            Dev::Host(_) => Ok(()),
            #[cfg(feature = "cuda")]
            Dev::Cuda(d) => d.load(case),
        }
    }

    fn run(&mut self, case: &mut Case) -> collectives::Result<()> {
        if let Some(g) = &mut self.group {
            return case.run(g.as_mut());
        }
        match &mut self.dev {
            Dev::Host(c) => case.run(c.as_mut()),
            #[cfg(feature = "cuda")]
            Dev::Cuda(d) => d.run(case),
        }
    }

    /// Seconds of one device-to-device copy of `bytes` (mean of `iters`), on the device only.
    fn copy_seconds(&mut self, bytes: u64, iters: usize) -> anyhow::Result<Option<f64>> {
        match &mut self.dev {
            Dev::Host(_) => {
                let _ = (bytes, iters);
                Ok(None)
            }
            #[cfg(feature = "cuda")]
            Dev::Cuda(d) => d.copy_seconds(bytes, iters).map(Some),
        }
    }

    /// The case's wrong elements (after copying device results back).
    fn wrong(&mut self, case: &mut Case) -> anyhow::Result<u64> {
        match &mut self.dev {
            Dev::Host(_) => {}
            #[cfg(feature = "cuda")]
            Dev::Cuda(d) => d.store(case)?,
        }
        Ok(case.wrong())
    }
}

/// The options `--device cuda` cannot run, and why (checked by the launcher before any rank
/// starts, and by each rank).
pub fn cuda_refuses(args: &Args) -> Option<(String, &'static str)> {
    if let Some(op) = args.op.iter().find(|o| !o.on_device()) {
        return Some((
            format!("--op {}", op.name()),
            "the CUDA transport has no device-buffer path for it yet (all-reduce, all-gather, reduce-scatter and broadcast have one)",
        ));
    }
    if args.group_size.is_some() {
        return Some((
            "--group-size".into(),
            "the CUDA transport's groups are host-staged; perf measures device buffers on the whole job",
        ));
    }
    None
}

/// Every rank's `x`, in rank order (8 bytes each, moved by an all-gather).
fn gather_u64(comm: &mut dyn Communicator, x: u64) -> anyhow::Result<Vec<u64>> {
    let n = comm.world_size();
    let mut out = vec![0u64; n];
    comm.all_gather(&[x], &mut out)?;
    Ok(out)
}

/// The largest of every rank's `x` (a row's time is its slowest rank's).
fn max_over_ranks(comm: &mut dyn Communicator, x: f64) -> anyhow::Result<f64> {
    Ok(gather_u64(comm, x.to_bits())?
        .into_iter()
        .map(f64::from_bits)
        .fold(0.0, f64::max))
}

/// One row: warm-up, the timed calls, and (`--check`) one more call on fresh inputs, checked.
/// Every group starts the timed calls together (a barrier of the world); time and `#wrong` are
/// over the world's ranks.
fn bench_size(pc: &mut PerfComm, case: &mut Case, args: &Args) -> anyhow::Result<Row> {
    let n = pc.comm().world_size();
    pc.fill(case)?;
    for _ in 0..args.warmup {
        pc.run(case)?;
    }
    pc.world().barrier()?;
    let t0 = std::time::Instant::now();
    for _ in 0..args.iters {
        pc.run(case)?;
    }
    let local = t0.elapsed().as_secs_f64() / args.iters as f64;
    let secs = max_over_ranks(pc.world(), local)?;
    let wrong = if args.check {
        pc.fill(case)?;
        pc.run(case)?;
        let w = pc.wrong(case)?;
        Some(gather_u64(pc.world(), w)?.into_iter().sum())
    } else {
        None
    };
    let (bytes, count) = case.bytes_count();
    let copy_us = match pc.copy_seconds(bytes, args.iters)? {
        Some(s) => Some(max_over_ranks(pc.world(), s)? * 1e6),
        None => None,
    };
    let algbw = bytes as f64 / secs / 1e9;
    Ok(Row {
        op: case.op.name(),
        bytes,
        count,
        dtype: case.s.dtype.short_name(),
        time_us: secs * 1e6,
        algbw_gbps: algbw,
        busbw_gbps: algbw * case.op.bus_factor(n),
        wrong,
        copy_us,
    })
}

/// The table's first line: the op, where it ran, the type, and the reduction or root where
/// they apply.
fn table_title(op: PerfOp, n: usize, world: usize, args: &Args) -> String {
    let dt = args.dtype;
    let groups = match world / n.max(1) {
        1 if args.group_size.is_none() => String::new(),
        1 => format!(" in 1 group (--group-size {n} of {world})"),
        g => format!(" in each of {g} groups (--group-size {n} of {world})"),
    };
    let redop = match (op.reduces(), args.redop) {
        (false, _) => String::new(),
        (true, ReduceOp::PreMulSum(_)) => {
            ", redop premulsum (rank r's factor 1 + (r mod 8)/4)".into()
        }
        (true, o) => format!(", redop {}", o.name()),
    };
    let root = match op.rooted() {
        true => format!(", root {}", args.root),
        false => String::new(),
    };
    format!(
        "# tprun perf: {} on {n} ranks{groups}, {} ({}){redop}{root}, {} iters after {} warmup, check {}",
        op.name(),
        dt.short_name(),
        dt.name(),
        args.iters,
        args.warmup,
        if args.check { "on" } else { "off" }
    )
}

fn print_table(
    op: PerfOp,
    rows: &[Row],
    (n, world): (usize, usize),
    hier: Option<Hierarchy>,
    args: &Args,
) {
    let dt = args.dtype;
    println!("{}", table_title(op, n, world, args));
    if let Some(h) = hier {
        println!(
            "# hierarchy: {} nodes x {} ranks per node (shared memory in a node, MPI between nodes), all-reduce {}",
            h.nodes,
            h.per_node,
            if h.fast {
                "fast (node partial sums: the same bits on every rank, not the one-host bits)"
            } else {
                "reproducible (the one-host bits)"
            }
        );
    }
    // The device's copy floor, as a last column, where there is one.
    let copy = rows.iter().any(|r| r.copy_us.is_some());
    let extra = |s: &str| match copy {
        true => format!("  {s:>10}"),
        false => String::new(),
    };
    println!("#");
    println!(
        "# {:>10}  {:>12}  {:>8}  {:>10}  {:>8}  {:>8}  {:>6}{}",
        "size",
        "count",
        "type",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        extra("d2d copy")
    );
    println!(
        "# {:>10}  {:>12}  {:>8}  {:>10}  {:>8}  {:>8}  {:>6}{}",
        "(B)",
        "(elements)",
        "",
        "(us)",
        "(GB/s)",
        "(GB/s)",
        "",
        extra("(us)")
    );
    for r in rows {
        let wrong = r.wrong.map_or("N/A".to_string(), |w| w.to_string());
        println!(
            "  {:>10}  {:>12}  {:>8}  {:>10.2}  {:>8.2}  {:>8.2}  {:>6}{}",
            r.bytes,
            r.count,
            dt.name(),
            r.time_us,
            r.algbw_gbps,
            r.busbw_gbps,
            wrong,
            extra(&r.copy_us.map_or(String::new(), |c| format!("{c:.2}")))
        );
    }
    let wrong: u64 = rows.iter().filter_map(|r| r.wrong).sum();
    if args.check {
        println!(
            "# Out of bounds values : {wrong} {}",
            if wrong == 0 { "OK" } else { "FAILED" }
        );
    }
    println!("# Avg bus bandwidth    : {:.4}", avg_busbw(rows));
    println!("#");
}

fn avg_busbw(rows: &[Row]) -> f64 {
    if rows.is_empty() {
        0.0
    } else {
        rows.iter().map(|r| r.busbw_gbps).sum::<f64>() / rows.len() as f64
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut pc = PerfComm::from_env(args)?;
    let (world, rank) = (pc.world().world_size(), pc.world().rank());
    check_args(args, world)?;
    check_fits(args, world)?;
    let k = args.group_size.unwrap_or(world);
    let group = rank / k;
    if args.group_size.is_some() {
        pc.split(k)?;
    }
    let setup = Setup {
        dtype: args.dtype,
        redop: args.redop,
        n: pc.comm().world_size(),
        rank: pc.comm().rank(),
        root: args.root,
        group: group as u64,
        // Groups (MpiGroup) and avg always reduce in the flat order.
        fast: pc
            .world()
            .hierarchy()
            .filter(|h| h.fast && args.group_size.is_none() && args.redop != ReduceOp::Avg)
            .map(|h| (h.nodes, h.per_node)),
    };
    let ops = ops_of(&args.op);
    let sizes = doubling_sizes(args.min_bytes, args.max_bytes);
    let mut all_rows = Vec::new();
    let mut pool = Pool::default();
    for &op in &ops {
        let rows = measure_op(&mut pc, &mut pool, op, &sizes, setup, args)?;
        if rank == 0 && !args.json {
            print_table(op, &rows, (k, world), pc.world().hierarchy(), args);
        }
        all_rows.extend(rows);
    }
    if rank == 0 && args.json {
        print_json(&ops, &all_rows, (k, world), args);
    }
    if rank == 0 {
        if let Some(path) = &args.plot {
            let series = series_of(&all_rows);
            crate::plot::busbw_svg(
                path,
                &plot_title(args.dtype.short_name(), &[world]),
                &series,
            )?;
            eprintln!("tprun perf: wrote {}", path.display());
        }
    }
    let wrong: u64 = all_rows.iter().filter_map(|r| r.wrong).sum();
    if wrong > 0 {
        bail!("perf --check: {wrong} wrong elements");
    }
    Ok(())
}

/// Largest `--min-bytes` / `--max-bytes` (1 TiB): above any machine's memory, low enough that
/// the size arithmetic (buffers for every rank, bytes per second) cannot overflow.
pub const MAX_SIZE: u64 = 1 << 40;
/// Largest `--iters` / `--warmup`: a billion calls already run for hours (tests use it as
/// "forever"); more is a typo, not a measurement.
pub const MAX_COUNT: usize = 1_000_000_000;

/// A byte count up to [`MAX_SIZE`] (clap names the flag and the value in its error).
fn parse_bounded_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n > MAX_SIZE {
        return Err(format!("expected a size up to {MAX_SIZE} bytes (1024G)"));
    }
    Ok(n)
}

/// A call count up to [`MAX_COUNT`].
fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n <= MAX_COUNT as u64 => Ok(n as usize),
        _ => Err(format!("expected a whole number up to {MAX_COUNT}")),
    }
}

/// `--group-size`: at least 1 rank.
fn parse_group_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(k) if k >= 1 => Ok(k),
        _ => Err("expected a number of ranks, at least 1".into()),
    }
}

/// The size and iteration options make sense on their own (checked before the collectives start).
fn check_sizes(args: &Args) -> anyhow::Result<()> {
    ensure!(args.min_bytes >= 1, "--min-bytes must be at least 1");
    ensure!(
        args.min_bytes <= args.max_bytes,
        "--min-bytes {} is larger than --max-bytes {}",
        args.min_bytes,
        args.max_bytes
    );
    ensure!(args.iters >= 1, "--iters must be at least 1");
    Ok(())
}

/// The options make sense together for a job of `world` ranks: sizes, the group size, the
/// root, and the reduction for the type (the launcher checks this before any rank starts, and
/// every rank again).
pub fn check_args(args: &Args, world: usize) -> anyhow::Result<()> {
    check_sizes(args)?;
    let k = match args.group_size {
        Some(k) => {
            ensure!(
                world.is_multiple_of(k),
                "--group-size {k} does not divide the {world} ranks (groups are {k} consecutive ranks)"
            );
            k
        }
        None => world,
    };
    match args.group_size {
        Some(_) => ensure!(
            args.root < k,
            "--root {} is out of range for groups of {k} ranks (--group-size {k})",
            args.root
        ),
        None => ensure!(
            args.root < k,
            "--root {} is out of range for {k} ranks",
            args.root
        ),
    }
    if args.op.iter().any(|o| o.reduces()) {
        if let Err(e) = collectives::types::check_reducible("perf", args.dtype, args.redop) {
            let why = match e {
                CommError::Invalid { msg, .. } => msg,
                e => e.to_string(),
            };
            bail!(
                "--redop {} does not go with --dtype {}: {why}",
                args.redop.name(),
                args.dtype.short_name()
            );
        }
    }
    Ok(())
}

/// The buffers of `n` ranks fit in this machine's memory.
fn check_fits(args: &Args, n: usize) -> anyhow::Result<()> {
    // Buffers per rank are at most max_bytes times the ops' memory factor; sizes the machine
    // cannot hold would end in a swap storm or the OOM killer, not in a result.
    let factor = ops_of(&args.op)
        .iter()
        .map(|o| o.memory_factor(args.group_size.unwrap_or(n)))
        .fold(1.0, f64::max);
    let need = n as f64 * factor * args.max_bytes as f64;
    if let Some(ram) = total_memory_bytes() {
        const GIB: f64 = (1u64 << 30) as f64;
        ensure!(
            need <= ram as f64,
            "--max-bytes {}: {n} ranks need about {:.1} GiB of buffers in all, more than this machine's {:.1} GiB of memory",
            args.max_bytes,
            need / GIB,
            ram as f64 / GIB
        );
    }
    Ok(())
}

/// The ops `--op` stands for, in table order.
fn ops_of(ops: &[PerfOp]) -> Vec<PerfOp> {
    let mut out = Vec::new();
    for &op in ops {
        let each = match op {
            PerfOp::All => vec![
                PerfOp::AllReduce,
                PerfOp::AllGather,
                PerfOp::ReduceScatter,
                PerfOp::Broadcast,
            ],
            op => vec![op],
        };
        for o in each {
            if !out.contains(&o) {
                out.push(o);
            }
        }
    }
    out
}

/// `min`, `2 min`, `4 min`, ... up to `max` (and no further than u64 reaches).
fn doubling_sizes(min: u64, max: u64) -> Vec<u64> {
    let mut sizes = Vec::new();
    let mut s = min;
    while s <= max {
        sizes.push(s);
        s = match s.checked_mul(2) {
            Some(v) => v,
            None => break,
        };
    }
    sizes
}

/// One table: `op` at every size (on every rank, in step).
fn measure_op(
    pc: &mut PerfComm,
    pool: &mut Pool,
    op: PerfOp,
    sizes: &[u64],
    setup: Setup,
    args: &Args,
) -> anyhow::Result<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    if let Some(&max) = sizes.last() {
        let largest = Case::in_pool(op, setup, max, pool);
        pool.reserve_for(largest);
    }
    for &size in sizes {
        let Some(mut case) = Case::in_pool(op, setup, size, pool) else {
            continue;
        };
        // Sizes that round to an already measured one (all-gather on 3 ranks) are skipped.
        if rows.last().is_some_and(|r| r.bytes == case.bytes_count().0) {
            case.bufs.into_pool(pool);
            continue;
        }
        let row = bench_size(pc, &mut case, args)
            .with_context(|| format!("perf {} at {size} bytes", op.name()));
        case.bufs.into_pool(pool);
        rows.push(row?);
    }
    Ok(rows)
}

/// `--json`: one object with every row and each op's average bus bandwidth.
fn print_json(ops: &[PerfOp], all_rows: &[Row], (k, n): (usize, usize), args: &Args) {
    let avg: serde_json::Map<String, serde_json::Value> = ops
        .iter()
        .map(|op| {
            let rows: Vec<Row> = all_rows
                .iter()
                .filter(|r| r.op == op.name())
                .cloned()
                .collect();
            (op.name().to_string(), serde_json::json!(avg_busbw(&rows)))
        })
        .collect();
    let out = serde_json::json!({
        "world_size": n,
        "dtype": args.dtype.short_name(),
        "redop": args.redop.name(),
        "root": args.root,
        "group_size": k,
        "iters": args.iters,
        "warmup": args.warmup,
        "check": args.check,
        "avg_busbw_gbps": avg,
        "rows": all_rows,
    });
    println!("{out}");
}

/// One plot line per op of one run.
fn series_of(rows: &[Row]) -> Vec<crate::plot::Series> {
    let mut out: Vec<crate::plot::Series> = Vec::new();
    for r in rows {
        let label = r.op.to_string();
        match out.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.push((r.bytes, r.busbw_gbps)),
            None => out.push(crate::plot::Series {
                label,
                points: vec![(r.bytes, r.busbw_gbps)],
            }),
        }
    }
    out
}

fn plot_title(dtype: &str, worlds: &[usize]) -> String {
    let ns: Vec<String> = worlds.iter().map(|n| n.to_string()).collect();
    format!("tprun perf: bus bandwidth, {dtype}, {} ranks", ns.join("/"))
}

/// A saved run: world size, dtype name, rows of (op, bytes, busbw GB/s).
type Saved = (usize, String, Vec<(String, u64, f64)>);

/// A saved `perf --json` result: the JSON object line of the file (a `[rankN]: ` prefix from
/// the launcher is allowed).
fn read_saved(path: &std::path::Path) -> anyhow::Result<Saved> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--from {}: cannot read", path.display()))?;
    let obj = text
        .lines()
        .map(|l| {
            let l = l.trim();
            match l.strip_prefix("[rank") {
                Some(rest) => rest.split_once("]: ").map_or(l, |(_, j)| j),
                None => l,
            }
        })
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("rows").is_some())
        .with_context(|| {
            format!(
                "--from {}: no `tprun perf --json` object in it",
                path.display()
            )
        })?;
    let n = obj["world_size"].as_u64().unwrap_or(0) as usize;
    let dtype = obj["dtype"].as_str().unwrap_or("?").to_string();
    let rows = obj["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some((
                r["op"].as_str()?.to_string(),
                r["bytes"].as_u64()?,
                r["busbw_gbps"].as_f64()?,
            ))
        })
        .collect();
    Ok((n, dtype, rows))
}

/// `perf --plot FILE.svg --from a.json [--from b.json ...]`: plots saved results (no ranks).
/// Lines are labelled `op N=n` when the files hold more than one world size.
pub fn plot_saved(args: &Args) -> anyhow::Result<()> {
    let path = args.plot.as_ref().context("--from needs --plot FILE.svg")?;
    let runs = args
        .from
        .iter()
        .map(|p| read_saved(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut worlds: Vec<usize> = runs.iter().map(|r| r.0).collect();
    worlds.sort_unstable();
    worlds.dedup();
    let mut dtypes: Vec<&str> = runs.iter().map(|r| r.1.as_str()).collect();
    dtypes.sort_unstable();
    dtypes.dedup();
    let mut series: Vec<crate::plot::Series> = Vec::new();
    for (n, _, rows) in &runs {
        for (op, bytes, bw) in rows {
            let label = if worlds.len() > 1 {
                format!("{op} N={n}")
            } else {
                op.clone()
            };
            match series.iter_mut().find(|s| s.label == label) {
                Some(s) => s.points.push((*bytes, *bw)),
                None => series.push(crate::plot::Series {
                    label,
                    points: vec![(*bytes, *bw)],
                }),
            }
        }
    }
    for s in &mut series {
        s.points.sort_by_key(|p| p.0);
    }
    crate::plot::busbw_svg(path, &plot_title(&dtypes.join("/"), &worlds), &series)?;
    eprintln!("tprun perf: wrote {}", path.display());
    Ok(())
}

/// Physical memory of the machine, if the kernel says.
fn total_memory_bytes() -> Option<u64> {
    // SAFETY: sysinfo only writes into the zeroed struct we pass.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `si` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        return None;
    }
    Some(si.totalram as u64 * si.mem_unit.max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_factors() {
        assert_eq!(PerfOp::AllReduce.bus_factor(4), 1.5);
        assert_eq!(PerfOp::AllGather.bus_factor(4), 0.75);
        assert_eq!(PerfOp::ReduceScatter.bus_factor(2), 0.5);
        assert_eq!(PerfOp::Broadcast.bus_factor(8), 1.0);
        assert_eq!(PerfOp::Reduce.bus_factor(8), 1.0);
        assert_eq!(PerfOp::Gather.bus_factor(4), 0.75);
        assert_eq!(PerfOp::Scatter.bus_factor(4), 0.75);
        assert_eq!(PerfOp::AllToAll.bus_factor(2), 0.5);
        assert_eq!(PerfOp::SendRecv.bus_factor(8), 1.0);
    }

    const OPS: [PerfOp; 9] = [
        PerfOp::AllReduce,
        PerfOp::AllGather,
        PerfOp::ReduceScatter,
        PerfOp::Broadcast,
        PerfOp::Reduce,
        PerfOp::Gather,
        PerfOp::Scatter,
        PerfOp::AllToAll,
        PerfOp::SendRecv,
    ];

    fn setup(dtype: DType, redop: ReduceOp, n: usize, rank: usize, root: usize) -> Setup {
        Setup {
            dtype,
            redop,
            n,
            rank,
            root,
            group: 0,
            fast: None,
        }
    }

    /// Bytes as nccl-tests counts them, on 4 ranks at 1 KiB of f32.
    #[test]
    fn bytes_as_nccl_tests() {
        for (op, per, bytes) in [
            (PerfOp::AllReduce, 256, 1024),
            (PerfOp::Broadcast, 256, 1024),
            (PerfOp::Reduce, 256, 1024),
            (PerfOp::SendRecv, 256, 1024),
            (PerfOp::AllGather, 64, 1024),
            (PerfOp::ReduceScatter, 64, 1024),
            (PerfOp::Gather, 64, 1024),
            (PerfOp::Scatter, 64, 1024),
            (PerfOp::AllToAll, 64, 1024),
        ] {
            let c = Case::new(op, setup(DType::F32, ReduceOp::Sum, 4, 1, 0), 1024).unwrap();
            assert_eq!((c.per, c.bytes_count()), (per, (bytes, 256)), "{op:?}");
        }
        // Per-rank ops round down to ranks x element size; below that there is no row.
        let c = Case::new(
            PerfOp::AllToAll,
            setup(DType::F64, ReduceOp::Sum, 3, 0, 0),
            100,
        );
        assert_eq!(c.unwrap().bytes_count(), (96, 12));
        assert!(Case::new(
            PerfOp::Gather,
            setup(DType::F64, ReduceOp::Sum, 4, 0, 0),
            31
        )
        .is_none());
    }

    /// In a world of one every op is a copy (or the identity): the check finds no wrong element,
    /// then exactly the one element corrupted after the call.
    #[test]
    fn check_counts_a_corrupted_element() {
        for op in OPS {
            for dtype in DType::ALL {
                let mut c = Case::new(op, setup(dtype, ReduceOp::Sum, 1, 0, 0), 64).unwrap();
                c.fill();
                c.run(&mut collectives::local::SoloComm).unwrap();
                assert_eq!(c.wrong(), 0, "{op:?} {dtype:?}");
                let (a, b) = c.bufs.both();
                let out = if b.is_empty() { a } else { b };
                out[dtype.size() * 3] ^= 0x10;
                assert_eq!(c.wrong(), 1, "{op:?} {dtype:?}");
            }
        }
    }

    /// The reference agrees with the in-process transport (threads as ranks) for every op, type
    /// and reduction, on 3 ranks, with root 2.
    #[test]
    fn reference_matches_thread_ranks() {
        for dtype in DType::ALL {
            for redop in ReduceOp::ALL {
                if collectives::types::check_reducible("t", dtype, redop).is_err() {
                    continue;
                }
                // The reductions only change the reducing ops.
                let ops: &[PerfOp] = match redop {
                    ReduceOp::Sum => &OPS,
                    _ => &[PerfOp::AllReduce, PerfOp::ReduceScatter, PerfOp::Reduce],
                };
                let res = collectives::thread::run_world(3, |rank, comm| {
                    let mut wrong = Vec::new();
                    for &op in ops {
                        let mut c =
                            Case::new(op, setup(dtype, redop, 3, rank, 2), 3 * 136).expect("a row");
                        c.fill();
                        c.run(comm)?;
                        wrong.push((op, c.wrong()));
                    }
                    Ok(wrong)
                });
                for (rank, r) in res.into_iter().enumerate() {
                    let wrong = r.unwrap_or_else(|e| panic!("{dtype:?} {redop:?}: {e:#}"));
                    assert!(
                        wrong.iter().all(|(_, w)| *w == 0),
                        "{dtype:?} {redop:?} rank {rank}: {wrong:?}"
                    );
                }
            }
        }
    }

    /// Every reduction differs from the others on perf's inputs (so a transport that applied the
    /// wrong one would be caught), and premulsum's per-rank factors change the sum.
    /// The fast hierarchy's order (node sums, then nodes) is a different float result from the
    /// flat rank order on perf's inputs, so perf --check tells the two modes apart; integers,
    /// max and min are the same either way.
    #[test]
    fn the_fast_hierarchy_reference_differs_from_flat_for_float_sums_only() {
        let differ = |dtype, redop| {
            let flat = setup(dtype, redop, 4, 0, 0);
            let fast = Setup {
                fast: Some((2, 2)),
                ..flat
            };
            with_type!(dtype, T => (0..4096).filter(|&i| {
                bytemuck::bytes_of(&flat.reduced::<T>(i)) != bytemuck::bytes_of(&fast.all_reduced::<T>(i))
            }).count())
        };
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            assert!(differ(dtype, ReduceOp::Sum) > 0, "{dtype:?}");
            assert!(differ(dtype, ReduceOp::PreMulSum(1.0)) > 0, "{dtype:?}");
            assert_eq!(differ(dtype, ReduceOp::Max), 0, "{dtype:?}");
        }
        for dtype in [DType::I32, DType::U8, DType::I64] {
            assert_eq!(differ(dtype, ReduceOp::Sum), 0, "{dtype:?}");
            assert_eq!(differ(dtype, ReduceOp::Product), 0, "{dtype:?}");
        }
    }

    #[test]
    fn reductions_are_told_apart() {
        for dtype in [DType::F32, DType::F64, DType::I32, DType::U8] {
            let outs: Vec<Vec<u8>> = ReduceOp::ALL
                .into_iter()
                .filter(|&o| collectives::types::check_reducible("t", dtype, o).is_ok())
                .map(|redop| {
                    let s = setup(dtype, redop, 3, 0, 0);
                    with_type!(dtype, T => (0..64)
                        .flat_map(|i| bytemuck::bytes_of(&s.reduced::<T>(i)).to_vec())
                        .collect())
                })
                .collect();
            for (i, x) in outs.iter().enumerate() {
                for y in &outs[i + 1..] {
                    assert_ne!(x, y, "{dtype:?}: two reductions give the same 64 elements");
                }
            }
        }
    }

    #[test]
    fn options_checked_together() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: Args,
        }
        let args = |v: &[&str]| Cli::try_parse_from([&["perf"], v].concat()).map(|c| c.a);
        let err = |v: &[&str], n| format!("{:#}", check_args(&args(v).unwrap(), n).unwrap_err());
        assert!(err(&["--redop", "band", "--dtype", "f32"], 2)
            .starts_with("--redop band does not go with --dtype f32: band is a bitwise"));
        assert!(err(
            &["--op", "reduce", "--redop", "premulsum", "--dtype", "i64"],
            2
        )
        .contains("premulsum takes float types"));
        assert_eq!(
            err(&["--group-size", "3"], 4),
            "--group-size 3 does not divide the 4 ranks (groups are 3 consecutive ranks)"
        );
        assert!(err(&["--group-size", "2", "--root", "2"], 4).contains("groups of 2 ranks"));
        // A reduction that goes with no op measured is not refused; every type parses.
        let a = args(&[
            "--op",
            "all-gather,send_recv",
            "--redop",
            "bxor",
            "--dtype",
            "bf16",
        ]);
        check_args(&a.unwrap(), 2).unwrap();
        for d in DType::ALL {
            assert_eq!(args(&["--dtype", d.short_name()]).unwrap().dtype, d);
        }
        assert!(args(&["--dtype", "q4"]).is_err());
        assert!(args(&["--group-size", "0"]).is_err());
        let a = args(&["--op", "all,reduce,all-reduce"]).unwrap();
        assert_eq!(ops_of(&a.op).len(), 5);
    }
}
