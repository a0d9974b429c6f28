//! `tprun perf`: the nccl-tests table for tprun's collectives.
//!
//! Every rank runs the same loop; rank 0 prints. A row's time is the mean over `--iters` calls on
//! each rank, then the maximum over ranks. Sizes double from `--min-bytes` to `--max-bytes`; for
//! all-gather and reduce-scatter the size is the whole gathered/scattered buffer, rounded down to
//! a multiple of world size x element size (as nccl-tests does). `--check` fills every input with
//! rank-dependent values and compares every output element, bit for bit, with a serial rank-order
//! reference computed locally; `#wrong` is the number of mismatches summed over ranks.

use anyhow::{bail, ensure, Context};
use half::{bf16, f16};

#[cfg(feature = "cuda")]
#[path = "perf_cuda.rs"]
mod cuda;

use collectives::units::parse_size;
use collectives::{CommExt, Communicator, DType, Float, Hierarchy, ReduceOp};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerfOp {
    #[value(alias = "all_reduce", alias = "allreduce")]
    AllReduce,
    #[value(alias = "all_gather", alias = "allgather")]
    AllGather,
    #[value(alias = "reduce_scatter", alias = "reducescatter")]
    ReduceScatter,
    Broadcast,
    All,
}

impl PerfOp {
    fn name(self) -> &'static str {
        match self {
            PerfOp::AllReduce => "all_reduce",
            PerfOp::AllGather => "all_gather",
            PerfOp::ReduceScatter => "reduce_scatter",
            PerfOp::Broadcast => "broadcast",
            PerfOp::All => "all",
        }
    }
    /// nccl-tests' factor from algorithm bandwidth to bus bandwidth.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            PerfOp::AllReduce => 2.0 * (n - 1.0) / n,
            PerfOp::AllGather | PerfOp::ReduceScatter => (n - 1.0) / n,
            PerfOp::Broadcast | PerfOp::All => 1.0,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerfDType {
    #[value(alias = "float", alias = "float32")]
    F32,
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "half", alias = "float16")]
    F16,
}

impl PerfDType {
    fn dtype(self) -> DType {
        match self {
            PerfDType::F32 => DType::F32,
            PerfDType::Bf16 => DType::BF16,
            PerfDType::F16 => DType::F16,
        }
    }
    fn cli_name(self) -> &'static str {
        match self {
            PerfDType::F32 => "f32",
            PerfDType::Bf16 => "bf16",
            PerfDType::F16 => "f16",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Collective to measure (`all` = each in turn).
    #[arg(long, value_enum, default_value = "all-reduce")]
    pub op: PerfOp,
    /// Element type (reductions are computed in f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: PerfDType,
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
    /// Root rank of broadcast.
    #[arg(long, default_value_t = 0)]
    pub root: usize,
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

/// Rank `r`'s input value at index `i`: uniform in [-1, 1) with a full mantissa, so that the
/// summation order shows in the result.
fn value(r: usize, i: usize) -> f32 {
    let h = splitmix(((r as u64) << 40) ^ i as u64 ^ 0x7072_756E);
    ((h >> 40) as f32) / (1u64 << 23) as f32 - 1.0
}

/// Typed view of the buffers, so that fill/check use the `half` crate's conversions (an
/// implementation independent of the transport's).
trait Pattern: Float {
    fn fill(buf: &mut [u8], r: usize, base: usize) {
        for (i, x) in bytemuck::cast_slice_mut::<u8, Self>(buf)
            .iter_mut()
            .enumerate()
        {
            *x = Self::from_f32(value(r, base + i));
        }
    }
    fn bits_eq(a: Self, b: Self) -> bool {
        bytemuck::bytes_of(&a) == bytemuck::bytes_of(&b)
    }
}
impl Pattern for f32 {}
impl Pattern for bf16 {}
impl Pattern for f16 {}

/// Expected element `i` of the reduction over ranks of `value(r, base + i)`, rank order, f32.
fn reduced<T: Pattern>(n: usize, base: usize, i: usize) -> T {
    let mut acc = T::from_f32(value(0, base + i)).to_f32();
    for r in 1..n {
        acc += T::from_f32(value(r, base + i)).to_f32();
    }
    T::from_f32(acc)
}

fn count_wrong<T: Pattern>(out: &[u8], want: impl Fn(usize) -> T) -> u64 {
    bytemuck::cast_slice::<u8, T>(out)
        .iter()
        .enumerate()
        .filter(|(i, &x)| !T::bits_eq(x, want(*i)))
        .count() as u64
}

/// Buffers for one size (u32-aligned storage so the typed views are valid).
struct Bufs {
    a: Vec<u32>,
    b: Vec<u32>,
    a_len: usize,
    b_len: usize,
}

impl Bufs {
    fn new(a_len: usize, b_len: usize) -> Bufs {
        Bufs {
            a: vec![0; a_len.div_ceil(4)],
            b: vec![0; b_len.div_ceil(4)],
            a_len,
            b_len,
        }
    }
    fn a(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.a)[..self.a_len]
    }
    fn both(&mut self) -> (&mut [u8], &mut [u8]) {
        (
            &mut bytemuck::cast_slice_mut(&mut self.a)[..self.a_len],
            &mut bytemuck::cast_slice_mut(&mut self.b)[..self.b_len],
        )
    }
}

struct Case {
    op: PerfOp,
    dtype: PerfDType,
    n: usize,
    rank: usize,
    root: usize,
    /// Elements per rank segment (all-gather input, reduce-scatter output) or of the buffer.
    per: usize,
    bufs: Bufs,
}

impl Case {
    fn new(
        op: PerfOp,
        dtype: PerfDType,
        size: u64,
        n: usize,
        rank: usize,
        root: usize,
    ) -> Option<Case> {
        let e = dtype.dtype().size();
        let size = size as usize;
        let (per, a, b) = match op {
            PerfOp::AllReduce | PerfOp::Broadcast => {
                let c = size / e;
                (c, c * e, 0)
            }
            PerfOp::AllGather => {
                let c = size / (e * n);
                (c, c * e, c * e * n)
            }
            PerfOp::ReduceScatter => {
                let c = size / (e * n);
                (c, c * e * n, c * e)
            }
            PerfOp::All => unreachable!(),
        };
        (per > 0).then(|| Case {
            op,
            dtype,
            n,
            rank,
            root,
            per,
            bufs: Bufs::new(a, b),
        })
    }

    /// Bytes as the table reports them and the element count behind them.
    fn bytes_count(&self) -> (u64, u64) {
        let e = self.dtype.dtype().size() as u64;
        let c = match self.op {
            PerfOp::AllGather | PerfOp::ReduceScatter => (self.per * self.n) as u64,
            _ => self.per as u64,
        };
        (c * e, c)
    }

    fn fill(&mut self) {
        match self.dtype {
            PerfDType::F32 => self.fill_t::<f32>(),
            PerfDType::Bf16 => self.fill_t::<bf16>(),
            PerfDType::F16 => self.fill_t::<f16>(),
        }
    }

    fn fill_t<T: Pattern>(&mut self) {
        let r = self.rank;
        T::fill(self.bufs.a(), r, 0);
    }

    fn run(&mut self, comm: &mut dyn Communicator) -> collectives::Result<()> {
        let dt = self.dtype.dtype();
        match self.op {
            PerfOp::AllReduce => comm.all_reduce_raw(self.bufs.a(), dt, ReduceOp::Sum),
            PerfOp::Broadcast => comm.broadcast_raw(self.bufs.a(), self.root),
            PerfOp::AllGather => {
                let (a, b) = self.bufs.both();
                comm.all_gather_raw(a, b, dt)
            }
            PerfOp::ReduceScatter => {
                let (a, b) = self.bufs.both();
                comm.reduce_scatter_raw(a, b, dt, ReduceOp::Sum)
            }
            PerfOp::All => unreachable!(),
        }
    }

    fn wrong(&mut self) -> u64 {
        match self.dtype {
            PerfDType::F32 => self.wrong_t::<f32>(),
            PerfDType::Bf16 => self.wrong_t::<bf16>(),
            PerfDType::F16 => self.wrong_t::<f16>(),
        }
    }

    fn wrong_t<T: Pattern>(&mut self) -> u64 {
        let (n, rank, root, per) = (self.n, self.rank, self.root, self.per);
        let (a, b) = self.bufs.both();
        match self.op {
            PerfOp::AllReduce => count_wrong::<T>(a, |i| reduced::<T>(n, 0, i)),
            PerfOp::Broadcast => count_wrong::<T>(a, |i| T::from_f32(value(root, i))),
            PerfOp::AllGather => count_wrong::<T>(b, |j| T::from_f32(value(j / per, j % per))),
            PerfOp::ReduceScatter => count_wrong::<T>(b, |i| reduced::<T>(n, rank * per, i)),
            PerfOp::All => unreachable!(),
        }
    }
}

/// What perf measures: a host transport on host buffers, or (feature `cuda`, `--device cuda`,
/// which the launcher passes to the ranks as `TPRUN_DEVICE=cuda`) the CUDA transport on device
/// buffers.
enum PerfComm {
    Host(Box<dyn Communicator>),
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::Device>),
}

impl PerfComm {
    fn from_env() -> anyhow::Result<PerfComm> {
        if std::env::var("TPRUN_DEVICE").is_ok_and(|d| d == "cuda") {
            #[cfg(feature = "cuda")]
            return Ok(PerfComm::Cuda(Box::new(cuda::Device::new()?)));
            #[cfg(not(feature = "cuda"))]
            bail!(crate::device::NO_CUDA_BUILD);
        }
        let comm = collectives::from_env().context("perf: cannot set up the collectives")?;
        Ok(PerfComm::Host(comm))
    }

    fn comm(&mut self) -> &mut dyn Communicator {
        match self {
            PerfComm::Host(c) => c.as_mut(),
            #[cfg(feature = "cuda")]
            PerfComm::Cuda(d) => &mut d.comm,
        }
    }

    /// Fills the case's inputs (and copies them to the device).
    fn fill(&mut self, case: &mut Case) -> anyhow::Result<()> {
        case.fill();
        match self {
            PerfComm::Host(_) => Ok(()),
            #[cfg(feature = "cuda")]
            PerfComm::Cuda(d) => d.load(case),
        }
    }

    fn run(&mut self, case: &mut Case) -> collectives::Result<()> {
        match self {
            PerfComm::Host(c) => case.run(c.as_mut()),
            #[cfg(feature = "cuda")]
            PerfComm::Cuda(d) => d.run(case),
        }
    }

    /// Seconds of one device-to-device copy of `bytes` (mean of `iters`), on the device only.
    fn copy_seconds(&mut self, bytes: u64, iters: usize) -> anyhow::Result<Option<f64>> {
        match self {
            PerfComm::Host(_) => {
                let _ = (bytes, iters);
                Ok(None)
            }
            #[cfg(feature = "cuda")]
            PerfComm::Cuda(d) => d.copy_seconds(bytes, iters).map(Some),
        }
    }

    /// The case's wrong elements (after copying device results back).
    fn wrong(&mut self, case: &mut Case) -> anyhow::Result<u64> {
        match self {
            PerfComm::Host(_) => {}
            #[cfg(feature = "cuda")]
            PerfComm::Cuda(d) => d.store(case)?,
        }
        Ok(case.wrong())
    }
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

fn bench_size(pc: &mut PerfComm, case: &mut Case, args: &Args) -> anyhow::Result<Row> {
    let n = pc.comm().world_size();
    pc.fill(case)?;
    for _ in 0..args.warmup {
        pc.run(case)?;
    }
    pc.comm().barrier()?;
    let t0 = std::time::Instant::now();
    for _ in 0..args.iters {
        pc.run(case)?;
    }
    let local = t0.elapsed().as_secs_f64() / args.iters as f64;
    let secs = max_over_ranks(pc.comm(), local)?;
    let wrong = if args.check {
        pc.fill(case)?;
        pc.run(case)?;
        let w = pc.wrong(case)?;
        Some(gather_u64(pc.comm(), w)?.into_iter().sum())
    } else {
        None
    };
    let (bytes, count) = case.bytes_count();
    let copy_us = match pc.copy_seconds(bytes, args.iters)? {
        Some(s) => Some(max_over_ranks(pc.comm(), s)? * 1e6),
        None => None,
    };
    let algbw = bytes as f64 / secs / 1e9;
    Ok(Row {
        op: case.op.name(),
        bytes,
        count,
        dtype: case.dtype.cli_name(),
        time_us: secs * 1e6,
        algbw_gbps: algbw,
        busbw_gbps: algbw * case.op.bus_factor(n),
        wrong,
        copy_us,
    })
}

fn print_table(op: PerfOp, rows: &[Row], n: usize, hier: Option<Hierarchy>, args: &Args) {
    let dt = args.dtype.dtype();
    println!(
        "# tprun perf: {} on {n} ranks, {} ({}), {} iters after {} warmup, check {}",
        op.name(),
        args.dtype.cli_name(),
        dt.name(),
        args.iters,
        args.warmup,
        if args.check { "on" } else { "off" }
    );
    if let Some(h) = hier {
        println!(
            "# hierarchy: {} nodes x {} ranks per node (shared memory in a node, MPI between nodes)",
            h.nodes, h.per_node
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
    check_sizes(args)?;
    let mut pc = PerfComm::from_env()?;
    let (n, rank) = (pc.comm().world_size(), pc.comm().rank());
    check_fits(args, n)?;
    let ops = ops_of(args.op);
    let sizes = doubling_sizes(args.min_bytes, args.max_bytes);
    let mut all_rows = Vec::new();
    for &op in &ops {
        let rows = measure_op(&mut pc, op, &sizes, args)?;
        if rank == 0 && !args.json {
            print_table(op, &rows, n, pc.comm().hierarchy(), args);
        }
        all_rows.extend(rows);
    }
    if rank == 0 && args.json {
        print_json(&ops, &all_rows, n, args);
    }
    if rank == 0 {
        if let Some(path) = &args.plot {
            let series = series_of(&all_rows);
            crate::plot::busbw_svg(path, &plot_title(args.dtype.cli_name(), &[n]), &series)?;
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

/// `--root` names a rank of `n`, and the buffers of `n` ranks fit in this machine's memory.
fn check_fits(args: &Args, n: usize) -> anyhow::Result<()> {
    ensure!(
        args.root < n,
        "--root {} is out of range for {n} ranks",
        args.root
    );
    // Buffers per rank are at most max_bytes * (1 + 1/n); sizes the machine cannot hold would
    // end in a swap storm or the OOM killer, not in a result.
    let need = (n as f64 + 1.0) * args.max_bytes as f64;
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
fn ops_of(op: PerfOp) -> Vec<PerfOp> {
    match op {
        PerfOp::All => vec![
            PerfOp::AllReduce,
            PerfOp::AllGather,
            PerfOp::ReduceScatter,
            PerfOp::Broadcast,
        ],
        op => vec![op],
    }
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
    op: PerfOp,
    sizes: &[u64],
    args: &Args,
) -> anyhow::Result<Vec<Row>> {
    let (n, rank) = (pc.comm().world_size(), pc.comm().rank());
    let mut rows: Vec<Row> = Vec::new();
    for &size in sizes {
        let Some(mut case) = Case::new(op, args.dtype, size, n, rank, args.root) else {
            continue;
        };
        // Sizes that round to an already measured one (all-gather on 3 ranks) are skipped.
        if rows.last().is_some_and(|r| r.bytes == case.bytes_count().0) {
            continue;
        }
        let row = bench_size(pc, &mut case, args)
            .with_context(|| format!("perf {} at {size} bytes", op.name()))?;
        rows.push(row);
    }
    Ok(rows)
}

/// `--json`: one object with every row and each op's average bus bandwidth.
fn print_json(ops: &[PerfOp], all_rows: &[Row], n: usize, args: &Args) {
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
        "dtype": args.dtype.cli_name(),
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
    }
}
