//! Chrome trace-event recording of collectives and compute spans (`--trace FILE.json`).
//!
//! Off by default: every record point first does one relaxed load of [`enabled`], so the cost
//! with tracing off is a predictable branch. When on, events go into a process-wide buffer
//! (one rank = one process) and [`finish_rank`] (or [`finish_auto`]) hands them on at the end of the program.
//! Timestamps are `CLOCK_MONOTONIC` in microseconds, one clock for every process on the host, so
//! the ranks' tracks line up without any synchronisation. tprun merges the per-rank files with
//! [`merge`] into one file that Perfetto and chrome://tracing open: pid = rank, tid 1 = compute,
//! tid 2 = collectives, "X" complete events.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

use anyhow::Context;
use serde_json::{json, Value};

use crate::stats::OpKind;
use crate::DType;

/// Number of the inherited memfd (made by tprun, `O_APPEND`) each rank appends its events to.
pub const ENV_TRACE_FD: &str = "TPRUN_TRACE_FD";

/// Start of each rank's record in the memfd: magic, rank (u32 LE), length of the JSON (u64 LE).
const RECORD_MAGIC: &[u8; 4] = b"TPRT";
const RECORD_HEADER: usize = 16;

/// Track of compute spans.
pub const TID_COMPUTE: u32 = 1;
/// Track of collective calls.
pub const TID_COMM: u32 = 2;

static ENABLED: AtomicBool = AtomicBool::new(false);
static EVENTS: Mutex<Vec<Event>> = Mutex::new(Vec::new());
/// This rank's claim on tprun's memfd ([`ENV_TRACE_FD`]), taken by [`start_rank`].
static RANK_FD: Mutex<Option<File>> = Mutex::new(None);

/// What a recorded event carries besides its name and times.
#[derive(Clone, Debug)]
enum Detail {
    None,
    Layer(u32),
    Tokens { tokens: u32, start_pos: u32 },
    Comm(CommEvent),
}

/// One collective call as the trace shows it.
#[derive(Clone, Debug)]
pub struct CommEvent {
    /// Which collective.
    pub op: OpKind,
    /// Its size as [`crate::OpStats::bytes`] counts it.
    pub bytes: u64,
    /// The element type (`None` for broadcast and barrier, which move untyped bytes).
    pub dtype: Option<DType>,
    /// The algorithm the transport chose (`one_shot`, `ring`, `local`, ...), to tell slow
    /// calls apart by how they ran.
    pub algorithm: &'static str,
    /// Protocol steps the call took (chunks x phases).
    pub steps: u64,
    /// Seconds spent waiting for peers (the rest of the call moved or reduced data).
    pub wait_s: f64,
    /// The group made by `split` the call ran in (`None`: the world); each group gets a track
    /// of its own next to the world's "collectives".
    pub group: Option<std::sync::Arc<str>>,
}

/// Tracks of the groups seen so far in this process, by name: tid TID_COMM + 1 + index.
static GROUP_LANES: Mutex<Vec<std::sync::Arc<str>>> = Mutex::new(Vec::new());

/// The track of a group's collectives.
fn group_lane(name: &std::sync::Arc<str>) -> u32 {
    let Ok(mut lanes) = GROUP_LANES.lock() else {
        return TID_COMM;
    };
    let i = match lanes.iter().position(|l| l == name) {
        Some(i) => i,
        None => {
            lanes.push(name.clone());
            lanes.len() - 1
        }
    };
    TID_COMM + 1 + i as u32
}

#[derive(Clone, Debug)]
struct Event {
    name: &'static str,
    tid: u32,
    ts_us: f64,
    dur_us: f64,
    detail: Detail,
}

/// Whether events are being recorded (one relaxed load).
#[inline(always)]
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// Starts (or stops) recording in this process.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Relaxed);
}

/// `CLOCK_MONOTONIC` in microseconds: the same clock in every process of the host.
pub fn now_us() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `t`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3
}

fn push(e: Event) {
    if let Ok(mut v) = EVENTS.lock() {
        v.push(e);
    }
}

/// Records a finished collective that started at `start_us` (from [`now_us`]).
pub fn record_comm(start_us: f64, ev: CommEvent) {
    let end = now_us();
    let tid = ev.group.as_ref().map_or(TID_COMM, group_lane);
    push(Event {
        name: ev.op.name(),
        tid,
        ts_us: start_us,
        dur_us: end - start_us,
        detail: Detail::Comm(ev),
    });
}

/// A compute span: recorded when dropped, if tracing was on when it was made.
#[must_use = "the span ends when this guard is dropped"]
pub struct Span {
    start_us: Option<f64>,
    name: &'static str,
    detail: Detail,
}

impl Span {
    fn new(name: &'static str, detail: Detail) -> Span {
        Span {
            start_us: enabled().then(now_us),
            name,
            detail,
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(start) = self.start_us {
            push(Event {
                name: self.name,
                tid: TID_COMPUTE,
                ts_us: start,
                dur_us: now_us() - start,
                detail: std::mem::replace(&mut self.detail, Detail::None),
            });
        }
    }
}

/// A compute span named `name` (e.g. "lm_head", "sample").
#[inline]
pub fn span(name: &'static str) -> Span {
    Span::new(name, Detail::None)
}

/// A compute span of decoder layer `layer` (e.g. "attention", "mlp").
#[inline]
pub fn layer_span(name: &'static str, layer: usize) -> Span {
    Span::new(name, Detail::Layer(layer as u32))
}

/// A span over a forward pass of `tokens` new positions starting at `start_pos`.
#[inline]
pub fn forward_span(name: &'static str, tokens: usize, start_pos: usize) -> Span {
    Span::new(
        name,
        Detail::Tokens {
            tokens: tokens as u32,
            start_pos: start_pos as u32,
        },
    )
}

fn event_json(e: &Event, pid: usize) -> Value {
    let args = match &e.detail {
        Detail::None => json!({}),
        Detail::Layer(l) => json!({ "layer": l }),
        Detail::Tokens { tokens, start_pos } => json!({ "tokens": tokens, "start_pos": start_pos }),
        Detail::Comm(c) => {
            let mut a = json!({
                "bytes": c.bytes,
                "dtype": c.dtype.map_or("none", |d| d.name()),
                "algorithm": c.algorithm,
                "steps": c.steps,
                "wait_us": c.wait_s * 1e6,
                "move_us": (e.dur_us - c.wait_s * 1e6).max(0.0),
            });
            if let Some(g) = &c.group {
                a["group"] = json!(&**g);
            }
            a
        }
    };
    json!({
        "name": e.name,
        "cat": if matches!(e.detail, Detail::Comm(_)) { "comm" } else { "compute" },
        "ph": "X",
        "pid": pid,
        "tid": e.tid,
        "ts": e.ts_us,
        "dur": e.dur_us,
        "args": args,
    })
}

/// Takes this process's recorded events as Chrome trace events with `pid` = `rank`.
pub fn take_events(rank: usize) -> Vec<Value> {
    let events = match EVENTS.lock() {
        Ok(mut v) => std::mem::take(&mut *v),
        Err(_) => Vec::new(),
    };
    let mut out: Vec<Value> = events.iter().map(|e| event_json(e, rank)).collect();
    // Name the groups' tracks (the world's are named by `merge`).
    if let Ok(lanes) = GROUP_LANES.lock() {
        for (i, name) in lanes.iter().enumerate() {
            out.push(json!({"name": "thread_name", "ph": "M", "pid": rank,
                "tid": TID_COMM + 1 + i as u32, "args": {"name": format!("collectives {name}")}}));
        }
    }
    out
}

/// Starts recording in a rank of a job run with `--trace`. Under tprun (`$TPRUN_TRACE_FD` set)
/// it first claims the inherited memfd (CLOEXEC from now on), so a wrong fd fails before any work.
pub fn start_rank() -> anyhow::Result<()> {
    let fd = claim_trace_fd()?;
    if let Ok(mut g) = RANK_FD.lock() {
        *g = fd;
    }
    set_enabled(true);
    Ok(())
}

/// Set when [`start_from_env`] (not the program) started recording: the communicator then
/// hands the events to tprun when it is dropped.
static AUTO: AtomicBool = AtomicBool::new(false);

/// Starts recording in a program that links the collectives and runs under `tprun --trace` (any
/// `-- PROGRAM`, not only the built-ins): called when its communicator is made. True when it
/// started recording here, so that [`finish_auto`] is this caller's job.
pub fn start_from_env() -> anyhow::Result<bool> {
    if enabled() || std::env::var_os(ENV_TRACE_FD).is_none_or(|v| v.is_empty()) {
        return Ok(false);
    }
    start_rank()?;
    AUTO.store(true, Relaxed);
    Ok(true)
}

/// Hands the events recorded since [`start_from_env`] to tprun (once; later calls do nothing).
pub fn finish_auto(rank: usize) -> anyhow::Result<()> {
    if !AUTO.swap(false, Relaxed) {
        return Ok(());
    }
    set_enabled(false);
    let fd = RANK_FD.lock().ok().and_then(|mut g| g.take());
    match fd {
        Some(f) => append_record(&f, rank, &take_events(rank)),
        None => Ok(()),
    }
}

/// The memfd named in [`ENV_TRACE_FD`], if set: checked to be open and in append mode.
fn claim_trace_fd() -> anyhow::Result<Option<File>> {
    let Some(s) = std::env::var(ENV_TRACE_FD).ok().filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let (fd, _) = crate::shm::segment::claim_inherited_fd(ENV_TRACE_FD, &s)?;
    let fl = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .with_context(|| format!("{ENV_TRACE_FD}={s}"))?;
    anyhow::ensure!(
        nix::fcntl::OFlag::from_bits_truncate(fl).contains(nix::fcntl::OFlag::O_APPEND),
        "{ENV_TRACE_FD}={s}: not tprun's trace memfd (not in append mode)"
    );
    Ok(Some(File::from(fd)))
}

/// Ends this rank's part of a job traced into `out`: under tprun (`$TPRUN_TRACE_FD` set) appends
/// the events to tprun's memfd for tprun to merge; a rank started on its own writes a complete
/// trace to `out`.
pub fn finish_rank(out: &Path, rank: usize) -> anyhow::Result<()> {
    let claimed = RANK_FD.lock().ok().and_then(|mut g| g.take());
    let fd = match claimed {
        Some(f) => Some(f),
        None => claim_trace_fd()?,
    };
    let events = take_events(rank);
    match fd {
        Some(f) => append_record(&f, rank, &events),
        None => {
            check_out(out)?;
            merge(vec![(rank, events)], out).map(|_| ())
        }
    }
}

/// Appends rank `rank`'s events as one record, in a single write(2): with `O_APPEND` the kernel
/// places each write whole at the end of the file, so records of ranks finishing together never
/// interleave.
fn append_record(f: &File, rank: usize, events: &[Value]) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(RECORD_HEADER + 64 * events.len());
    buf.extend_from_slice(RECORD_MAGIC);
    buf.extend_from_slice(&(rank as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 8]);
    serde_json::to_writer(&mut buf, events)?;
    let len = (buf.len() - RECORD_HEADER) as u64;
    buf[8..RECORD_HEADER].copy_from_slice(&len.to_le_bytes());
    let n = loop {
        match (&*f).write(&buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r,
        }
    }
    .with_context(|| format!("rank {rank}: cannot write its trace to tprun's memfd"))?;
    anyhow::ensure!(
        n == buf.len(),
        "rank {rank}: only {n} of {} bytes of its trace reached tprun's memfd",
        buf.len()
    );
    Ok(())
}

/// Splits the memfd's records into each rank's events, ordered by rank; every rank 0..world
/// (world = highest rank + 1) must have written exactly one.
fn split_records(mut b: &[u8]) -> anyhow::Result<Vec<(usize, Vec<Value>)>> {
    let mut by_rank: Vec<Option<Vec<Value>>> = Vec::new();
    while !b.is_empty() {
        anyhow::ensure!(
            b.len() >= RECORD_HEADER && &b[..4] == RECORD_MAGIC,
            "the ranks' trace records are damaged"
        );
        let rank = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")) as usize;
        let len = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let body = usize::try_from(len)
            .ok()
            .and_then(|l| b.get(RECORD_HEADER..RECORD_HEADER.checked_add(l)?))
            .with_context(|| format!("rank {rank}'s trace record is cut short"))?;
        let v: Value = serde_json::from_slice(body)
            .with_context(|| format!("rank {rank}'s trace is not JSON"))?;
        let Value::Array(a) = v else {
            anyhow::bail!("rank {rank}'s trace is not a JSON array");
        };
        if by_rank.len() <= rank {
            by_rank.resize(rank + 1, None);
        }
        anyhow::ensure!(
            by_rank[rank].replace(a).is_none(),
            "rank {rank} wrote its trace twice"
        );
        b = &b[RECORD_HEADER + body.len()..];
    }
    anyhow::ensure!(!by_rank.is_empty(), "no rank wrote a trace");
    by_rank
        .into_iter()
        .enumerate()
        .map(|(r, e)| {
            e.map(|e| (r, e))
                .with_context(|| format!("rank {r} wrote no trace"))
        })
        .collect()
}

/// Merges each rank's events (`(rank, events)`, by rank) into one Chrome trace at `out`: names the
/// tracks ("rank r", "compute", "collectives") and moves time 0 to the job's first event. Returns
/// the number of events.
pub fn merge(ranks: Vec<(usize, Vec<Value>)>, out: &Path) -> anyhow::Result<usize> {
    let world = ranks.len();
    let mut events = Vec::new();
    let mut all = Vec::new();
    for (r, evs) in ranks {
        all.push(
            json!({"name": "process_name", "ph": "M", "pid": r, "tid": 0,
                        "args": {"name": format!("rank {r}")}}),
        );
        all.push(
            json!({"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0,
                        "args": {"sort_index": r}}),
        );
        all.push(
            json!({"name": "thread_name", "ph": "M", "pid": r, "tid": TID_COMPUTE,
                        "args": {"name": "compute"}}),
        );
        all.push(
            json!({"name": "thread_name", "ph": "M", "pid": r, "tid": TID_COMM,
                        "args": {"name": "collectives"}}),
        );
        events.extend(evs);
    }
    let t0 = events
        .iter()
        .filter_map(|e| e["ts"].as_f64())
        .fold(f64::INFINITY, f64::min);
    if t0.is_finite() {
        for e in &mut events {
            if let Some(ts) = e["ts"].as_f64() {
                e["ts"] = json!(ts - t0);
            }
        }
    }
    let n = events.len();
    all.extend(events);
    let doc = json!({
        "traceEvents": all,
        "displayTimeUnit": "ms",
        "otherData": {"clock": "CLOCK_MONOTONIC, microseconds since the job's first event",
                       "world_size": world},
    });
    // Replaced atomically, or written in place when it is a device or pipe (`/dev/stdout`).
    let bytes = serde_json::to_vec(&doc)?;
    crate::files::write_output(out, &bytes)
        .with_context(|| format!("cannot write trace {}", out.display()))?;
    Ok(n)
}

/// Writes `dir/ranks/rank{r}.json` for every rank in the PyTorch profiler's layout
/// ([`crate::hta`]), times from the job's first event as in the merged file. A folder of their
/// own: HTA takes every `*.json` of the folder it is given for a rank's trace.
fn write_rank_files(dir: &Path, ranks: &[(usize, Vec<Value>)]) -> anyhow::Result<()> {
    let dir = dir.join(RANKS_DIR);
    if !dir.is_dir() {
        std::fs::create_dir(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
    }
    let t0 = ranks
        .iter()
        .flat_map(|(_, evs)| evs.iter().filter_map(|e| e["ts"].as_f64()))
        .fold(f64::INFINITY, f64::min);
    for (r, evs) in ranks {
        let shifted: Vec<Value> = evs
            .iter()
            .map(|e| {
                let mut e = e.clone();
                if let Some(ts) = e["ts"].as_f64() {
                    e["ts"] = json!(ts - t0);
                }
                e
            })
            .collect();
        let doc = crate::hta::rank_trace(*r, ranks.len(), &shifted);
        let path = dir.join(format!("rank{r}.json"));
        // Pretty: HTA finds the rank with the regex `"rank":\s+(\d+)`, which needs the space.
        crate::files::write_output(&path, &serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("cannot write trace {}", path.display()))?;
    }
    Ok(())
}

/// Checks that `--trace` names a file in an existing directory.
fn check_out(out: &Path) -> anyhow::Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    anyhow::ensure!(
        parent.is_dir(),
        "--trace {}: directory {} does not exist",
        out.display(),
        parent.display()
    );
    anyhow::ensure!(
        !out.is_dir(),
        "--trace {}: is a directory, give a file name",
        out.display()
    );
    Ok(())
}

/// tprun's side of `--trace FILE.json`: one inheritable `O_APPEND` memfd (named to the ranks in
/// [`ENV_TRACE_FD`]) that every rank appends its events to, merged into FILE.json when the job
/// succeeds. It has no path: closing it (or tprun dying, even by SIGKILL, and then its ranks)
/// frees it, so nothing can be left behind.
pub struct JobTrace {
    fd: File,
    out: PathBuf,
    /// `--trace DIR/`: also one PyTorch-profiler-style file per rank (for HTA) in this folder.
    dir: Option<PathBuf>,
}

/// The subfolder of `--trace DIR/` that holds the per-rank traces (and nothing else).
pub const RANKS_DIR: &str = "ranks";

/// Removes what an earlier `--trace DIR/` job left in `dir` (the merged trace, the flight records,
/// the per-rank traces), so that a failed job cannot leave a stale trace beside its flight records.
fn clear_old_outputs(dir: &Path) -> anyhow::Result<()> {
    let mut old = vec![dir.join("trace.json"), dir.join("flight.json")];
    if let Ok(rd) = std::fs::read_dir(dir.join(RANKS_DIR)) {
        for f in rd.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with("rank") && name.ends_with(".json") {
                old.push(f.path());
            }
        }
    }
    for p in old {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("--trace: cannot remove {}", p.display()))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `--trace` names a folder (ends with `/` or is one): per-rank traces go there.
pub fn is_dir_target(out: &Path) -> bool {
    out.as_os_str().as_encoded_bytes().ends_with(b"/") || out.is_dir()
}

impl JobTrace {
    /// Checks that `out`'s directory exists (or, for `DIR/`, makes DIR and removes an earlier
    /// job's outputs there) and makes the memfd.
    pub fn new(out: &Path) -> anyhow::Result<JobTrace> {
        let dir = is_dir_target(out).then(|| out.to_path_buf());
        let out = match &dir {
            Some(d) => {
                if !d.is_dir() {
                    std::fs::create_dir(d)
                        .with_context(|| format!("--trace {}: cannot make it", d.display()))?;
                }
                clear_old_outputs(d)?;
                d.join("trace.json")
            }
            None => out.to_path_buf(),
        };
        let out = out.as_path();
        check_out(out)?;
        let fd = crate::shm::segment::inheritable_memfd("tprun-trace")
            .context("--trace: cannot make the ranks' trace memfd")?;
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_APPEND),
        )
        .context("--trace: cannot put the trace memfd in append mode")?;
        Ok(JobTrace {
            fd: File::from(fd),
            out: out.to_path_buf(),
            dir,
        })
    }

    /// Where tprun writes the flight records if the job is torn down: `DIR/flight.json`, or
    /// FILE.json's name with `.flight.json`.
    pub fn flight_path(&self) -> PathBuf {
        match &self.dir {
            Some(d) => d.join("flight.json"),
            None => self.out.with_extension("flight.json"),
        }
    }

    /// The environment variable to give every rank (the fd is inherited).
    pub fn env(&self) -> (&'static str, String) {
        (ENV_TRACE_FD, self.fd.as_raw_fd().to_string())
    }

    /// Merges the ranks' events into the output file (when `success`) and closes the memfd. A
    /// failed job writes no trace at all (no partial per-rank files); its flight records are
    /// written by the launcher at teardown ([`JobTrace::flight_path`]).
    pub fn finish(self, success: bool) -> anyhow::Result<()> {
        if success {
            let len = self.fd.metadata().context("--trace: the memfd")?.len();
            let mut b = vec![0u8; len as usize];
            self.fd
                .read_exact_at(&mut b, 0)
                .context("--trace: cannot read the ranks' trace memfd")?;
            let ranks = split_records(&b)?;
            if let Some(dir) = &self.dir {
                write_rank_files(dir, &ranks)?;
            }
            merge(ranks, &self.out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_comm_events_round_trip_through_the_memfd() {
        let dir = std::env::temp_dir().join(format!("tprun-trace-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("t.json");
        let job = JobTrace::new(&out).unwrap();
        set_enabled(true);
        {
            let _s = layer_span("attention", 3);
            record_comm(
                now_us(),
                CommEvent {
                    op: OpKind::AllReduce,
                    bytes: 12345,
                    dtype: Some(DType::F32),
                    algorithm: "one_shot",
                    steps: 1,
                    wait_s: 1e-6,
                    group: None,
                },
            );
        }
        set_enabled(false);
        drop(span("not recorded"));
        // Other tests of this process may have recorded too; the markers below are unique.
        // Rank 1 appends first: tprun orders by rank, not by arrival.
        append_record(&job.fd, 1, &[]).unwrap();
        append_record(&job.fd, 0, &take_events(0)).unwrap();
        job.finish(true).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(v["otherData"]["world_size"], 2);
        let evs = v["traceEvents"].as_array().unwrap();
        let ar: Vec<_> = evs
            .iter()
            .filter(|e| e["name"] == "all_reduce" && e["args"]["bytes"] == 12345)
            .collect();
        assert_eq!(ar.len(), 1);
        assert_eq!(ar[0]["args"]["dtype"], "float");
        assert_eq!(ar[0]["tid"], TID_COMM);
        assert_eq!(ar[0]["pid"], 0);
        let att = evs
            .iter()
            .find(|e| e["name"] == "attention" && e["args"]["layer"] == 3)
            .unwrap();
        assert_eq!(att["args"]["layer"], 3);
        assert!(att["dur"].as_f64().unwrap() >= ar[0]["dur"].as_f64().unwrap());
        assert!(evs
            .iter()
            .any(|e| e["ph"] == "M" && e["pid"] == 1 && e["args"]["name"] == "rank 1"));
        // A failed job writes nothing.
        std::fs::remove_file(&out).unwrap();
        let job = JobTrace::new(&out).unwrap();
        append_record(&job.fd, 0, &[]).unwrap();
        job.finish(false).unwrap();
        assert!(std::fs::read_dir(&dir).unwrap().next().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_or_missing_records_are_errors() {
        let rec = |rank: u32, body: &[u8], len: u64| {
            let mut b = RECORD_MAGIC.to_vec();
            b.extend_from_slice(&rank.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(body);
            b
        };
        let ok = split_records(&[rec(1, b"[]", 2), rec(0, b"[{}]", 4)].concat()).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!((ok[0].0, ok[0].1.len(), ok[1].0), (0, 1, 1));
        let err = |b: Vec<u8>| format!("{:#}", split_records(&b).unwrap_err());
        assert!(err(rec(1, b"[]", 2)).contains("rank 0 wrote no trace"));
        assert!(err(rec(0, b"[]", 9)).contains("cut short"));
        assert!(err([rec(0, b"[]", 2), rec(0, b"[]", 2)].concat()).contains("twice"));
        assert!(err(b"xx".to_vec()).contains("damaged"));
        assert!(err(rec(0, b"{}", 2)).contains("not a JSON array"));
        assert!(err(Vec::new()).contains("no rank"));
    }
}
