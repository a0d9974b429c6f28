//! Chrome trace-event recording of collectives and compute spans (`--trace FILE.json`).
//!
//! Off by default: every record point first does one relaxed load of [`enabled`], so the cost
//! with tracing off is a predictable branch. When on, events go into a process-wide buffer
//! (one rank = one process) and [`write_rank_file`] writes them at the end of the program.
//! Timestamps are `CLOCK_MONOTONIC` in microseconds, one clock for every process on the host, so
//! the ranks' tracks line up without any synchronisation. tprun merges the per-rank files with
//! [`merge`] into one file that Perfetto and chrome://tracing open: pid = rank, tid 1 = compute,
//! tid 2 = collectives, "X" complete events.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

use anyhow::Context;
use serde_json::{json, Value};

use crate::stats::OpKind;
use crate::DType;

/// Directory (made by tprun, removed by tprun) where rank r writes `rank{r}.json`.
pub const ENV_TRACE_DIR: &str = "TPRUN_TRACE_DIR";

/// Track of compute spans.
pub const TID_COMPUTE: u32 = 1;
/// Track of collective calls.
pub const TID_COMM: u32 = 2;

static ENABLED: AtomicBool = AtomicBool::new(false);
static EVENTS: Mutex<Vec<Event>> = Mutex::new(Vec::new());

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
    pub op: OpKind,
    pub bytes: u64,
    pub dtype: Option<DType>,
    pub algorithm: &'static str,
    /// Protocol steps the call took (chunks x phases).
    pub steps: u64,
    /// Seconds spent waiting for peers (the rest of the call moved or reduced data).
    pub wait_s: f64,
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
    push(Event {
        name: ev.op.name(),
        tid: TID_COMM,
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
        Detail::Comm(c) => json!({
            "bytes": c.bytes,
            "dtype": c.dtype.map_or("none", |d| d.name()),
            "algorithm": c.algorithm,
            "steps": c.steps,
            "wait_us": c.wait_s * 1e6,
            "move_us": (e.dur_us - c.wait_s * 1e6).max(0.0),
        }),
    };
    json!({
        "name": e.name,
        "cat": if e.tid == TID_COMM { "comm" } else { "compute" },
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
    events.iter().map(|e| event_json(e, rank)).collect()
}

/// Ends this rank's part of a job traced into `out`: under tprun (`$TPRUN_TRACE_DIR` set) writes
/// the events for tprun to merge; a rank started on its own writes a complete trace to `out`.
pub fn finish_rank(out: &Path, rank: usize) -> anyhow::Result<()> {
    match std::env::var_os(ENV_TRACE_DIR) {
        Some(d) if !d.is_empty() => {
            write_rank_file(&Path::new(&d).join(format!("rank{rank}.json")), rank)
        }
        _ => {
            let job = JobTrace::new(out)?;
            write_rank_file(&job.dir.join(format!("rank{rank}.json")), rank)?;
            job.finish(true)
        }
    }
}

/// Writes (and clears) this process's events to `path` as a JSON array.
fn write_rank_file(path: &Path, rank: usize) -> anyhow::Result<()> {
    let events = Value::Array(take_events(rank));
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path)
            .with_context(|| format!("cannot write trace file {}", path.display()))?,
    );
    serde_json::to_writer(&mut f, &events)
        .and_then(|_| f.flush().map_err(serde_json::Error::io))
        .with_context(|| format!("cannot write trace file {}", path.display()))?;
    Ok(())
}

/// Merges the per-rank event arrays `dir/rank{r}.json` (r = 0, 1, ... every rank of the job)
/// into one Chrome trace at `out`: names the tracks ("rank r", "compute", "collectives") and
/// moves time 0 to the job's first event. Returns the number of events.
pub fn merge(dir: &Path, out: &Path) -> anyhow::Result<usize> {
    let mut world = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = e?.file_name();
        let r = name.to_str().and_then(|n| {
            n.strip_prefix("rank")?
                .strip_suffix(".json")?
                .parse::<usize>()
                .ok()
        });
        if let Some(r) = r {
            world = world.max(r + 1);
        }
    }
    anyhow::ensure!(world > 0, "no rank wrote a trace into {}", dir.display());
    let mut events = Vec::new();
    for r in 0..world {
        let p = dir.join(format!("rank{r}.json"));
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("rank {r} wrote no trace ({})", p.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("rank {r}'s trace {} is not JSON", p.display()))?;
        let Value::Array(a) = v else {
            anyhow::bail!("rank {r}'s trace {} is not a JSON array", p.display());
        };
        events.extend(a);
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
    let mut all = Vec::with_capacity(n + 3 * world);
    for r in 0..world {
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
    }
    all.extend(events);
    let doc = json!({
        "traceEvents": all,
        "displayTimeUnit": "ms",
        "otherData": {"clock": "CLOCK_MONOTONIC, microseconds since the job's first event",
                       "world_size": world},
    });
    let tmp = {
        let mut s = out.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let res = (|| -> anyhow::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_json::to_writer(&mut f, &doc)?;
        f.flush()?;
        drop(f);
        std::fs::rename(&tmp, out)?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write trace {}", out.display()));
    }
    Ok(n)
}

/// tprun's side of `--trace FILE.json`: a temporary directory the ranks write into (named to them
/// in [`ENV_TRACE_DIR`]), merged into FILE.json when the job succeeds, and removed in every case
/// (also when dropped early by an error).
pub struct JobTrace {
    dir: PathBuf,
    out: PathBuf,
}

impl JobTrace {
    /// Checks that `out`'s directory exists and makes the temporary directory.
    pub fn new(out: &Path) -> anyhow::Result<JobTrace> {
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
        let base = std::env::temp_dir();
        let mut i = 0u32;
        let dir = loop {
            let d = base.join(format!("tprun-trace-{}-{i}", std::process::id()));
            match std::fs::create_dir(&d) {
                Ok(()) => break d,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && i < 100 => i += 1,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "--trace: cannot make a temporary directory in {}",
                            base.display()
                        )
                    })
                }
            }
        };
        Ok(JobTrace {
            dir,
            out: out.to_path_buf(),
        })
    }

    /// The environment variable to give every rank.
    pub fn env(&self) -> (&'static str, &Path) {
        (ENV_TRACE_DIR, &self.dir)
    }

    /// Merges the ranks' events into the output file (when `success`) and removes the
    /// temporary directory.
    pub fn finish(self, success: bool) -> anyhow::Result<()> {
        if success {
            merge(&self.dir, &self.out)?;
        }
        Ok(())
    }
}

impl Drop for JobTrace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_comm_events_round_trip_through_merge() {
        let dir = std::env::temp_dir().join(format!("tprun-trace-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
                },
            );
        }
        set_enabled(false);
        drop(span("not recorded"));
        // Other tests of this process may have recorded too; the markers below are unique.
        let ev = take_events(0);
        std::fs::write(dir.join("rank0.json"), Value::Array(ev).to_string()).unwrap();
        std::fs::write(dir.join("rank1.json"), "[]").unwrap();
        let out = dir.join("t.json");
        assert!(merge(&dir, &out).unwrap() >= 2);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let evs = v["traceEvents"].as_array().unwrap();
        let ar: Vec<_> = evs
            .iter()
            .filter(|e| e["name"] == "all_reduce" && e["args"]["bytes"] == 12345)
            .collect();
        assert_eq!(ar.len(), 1);
        assert_eq!(ar[0]["args"]["dtype"], "float");
        assert_eq!(ar[0]["tid"], TID_COMM);
        let att = evs
            .iter()
            .find(|e| e["name"] == "attention" && e["args"]["layer"] == 3)
            .unwrap();
        assert_eq!(att["args"]["layer"], 3);
        assert!(att["dur"].as_f64().unwrap() >= ar[0]["dur"].as_f64().unwrap());
        assert!(evs
            .iter()
            .any(|e| e["ph"] == "M" && e["pid"] == 1 && e["args"]["name"] == "rank 1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
