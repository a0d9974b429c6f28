//! `tprun analyze TRACE`: reads a `--trace` (the merged FILE.json, or the DIR/ of `--trace DIR/`)
//! and answers the first questions of a communication study: per rank compute, collective and
//! wait time; per collective call the arrival skew across ranks and who arrived last; the top
//! stragglers; the communication exposed per forward (all of it: tprun's collectives are
//! synchronous, nothing overlaps them); and, for the TP model, the all-reduce wait per layer
//! (attention vs MLP). `--json` for scripts, `--svg` for a per-rank timeline and a rank × layer
//! wait heat map.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The merged trace (FILE.json) or the folder of `--trace DIR/`.
    #[arg(value_name = "TRACE")]
    pub trace: PathBuf,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Also draw a per-rank timeline (compute grey, collectives red) and, for the TP model, a
    /// rank × layer heat map of the all-reduce wait to FILE.svg.
    #[arg(long, value_name = "FILE.svg")]
    pub svg: Option<PathBuf>,
    /// A rank counts as a call's straggler when it arrived last by at least this much.
    #[arg(long, default_value_t = 5000.0, value_name = "US")]
    pub min_skew_us: f64,
}

/// One event of one rank: name, start, duration (µs), layer, wait (µs).
#[derive(Clone, Debug)]
struct Ev {
    name: String,
    ts: f64,
    dur: f64,
    layer: Option<u64>,
    wait: f64,
}

impl Ev {
    fn end(&self) -> f64 {
        self.ts + self.dur
    }
}

/// Each rank's compute spans and collective calls, in time order.
#[derive(Default, Debug)]
struct RankEvents {
    compute: Vec<Ev>,
    comm: Vec<Ev>,
}

fn load(path: &Path) -> anyhow::Result<Vec<RankEvents>> {
    let file = if path.is_dir() {
        path.join("trace.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let evs = doc["traceEvents"]
        .as_array()
        .with_context(|| format!("{} has no traceEvents", file.display()))?;
    let mut ranks: BTreeMap<usize, RankEvents> = BTreeMap::new();
    for e in evs.iter().filter(|e| e["ph"] == "X") {
        let rank = e["pid"].as_u64().unwrap_or(0) as usize;
        let ev = Ev {
            name: e["name"].as_str().unwrap_or("?").to_string(),
            ts: e["ts"].as_f64().unwrap_or(0.0),
            dur: e["dur"].as_f64().unwrap_or(0.0),
            layer: e["args"]["layer"].as_u64(),
            wait: e["args"]["wait_us"].as_f64().unwrap_or(0.0),
        };
        let r = ranks.entry(rank).or_default();
        match e["cat"].as_str() {
            Some("comm") => r.comm.push(ev),
            Some("compute") => r.compute.push(ev),
            _ => {}
        }
    }
    anyhow::ensure!(!ranks.is_empty(), "{}: no events", file.display());
    let mut out: Vec<RankEvents> = ranks.into_values().collect();
    for r in &mut out {
        r.comm.sort_by(|a, b| a.ts.total_cmp(&b.ts));
        r.compute.sort_by(|a, b| a.ts.total_cmp(&b.ts));
    }
    Ok(out)
}

/// Length of the union of `spans` (sorted by start).
fn union_us(spans: &[Ev]) -> f64 {
    let (mut total, mut end) = (0.0, f64::NEG_INFINITY);
    for s in spans {
        if s.end() > end {
            total += s.end() - s.ts.max(end);
            end = s.end();
        }
    }
    total
}

/// Call k (1-based) of every rank: the latest arrival minus the earliest, and the latest rank.
struct Call {
    seq: usize,
    op: String,
    skew: f64,
    last: usize,
}

fn calls(ranks: &[RankEvents]) -> Vec<Call> {
    let n = ranks.iter().map(|r| r.comm.len()).min().unwrap_or(0);
    (0..n)
        .map(|k| {
            let arrivals = ranks.iter().map(|r| r.comm[k].ts);
            let (last, latest) =
                arrivals
                    .clone()
                    .enumerate()
                    .fold(
                        (0, f64::NEG_INFINITY),
                        |b, (i, t)| if t > b.1 { (i, t) } else { b },
                    );
            let first = arrivals.fold(f64::INFINITY, f64::min);
            Call {
                seq: k + 1,
                op: ranks[0].comm[k].name.clone(),
                skew: latest - first,
                last,
            }
        })
        .collect()
}

/// Per rank: the calls it was last at by at least `min_skew`, worst (most skew in all) first.
fn stragglers(calls: &[Call], world: usize, min_skew: f64) -> Vec<Value> {
    let mut per: Vec<(usize, Vec<usize>, f64)> = (0..world).map(|r| (r, vec![], 0.0)).collect();
    for c in calls.iter().filter(|c| c.skew >= min_skew) {
        per[c.last].1.push(c.seq);
        per[c.last].2 += c.skew;
    }
    per.retain(|p| !p.1.is_empty());
    per.sort_by(|a, b| b.2.total_cmp(&a.2));
    per.into_iter()
        .map(|(rank, calls, total)| {
            json!({"rank": rank, "mean_skew_us": total / calls.len() as f64, "calls": calls})
        })
        .collect()
}

/// Collective calls inside `span` on the same rank.
fn inside<'a>(comm: &'a [Ev], span: &Ev) -> impl Iterator<Item = &'a Ev> {
    let (start, end) = (span.ts, span.end());
    let from = comm.partition_point(|c| c.ts < start);
    comm[from..].iter().take_while(move |c| c.end() <= end)
}

/// Mean over ranks of the collective time and wait inside each `forward` span.
fn forwards(ranks: &[RankEvents]) -> Value {
    let (mut n, mut comm, mut wait, mut dur) = (0usize, 0.0, 0.0, 0.0);
    for r in ranks {
        for f in r.compute.iter().filter(|e| e.name == "forward") {
            n += 1;
            dur += f.dur;
            for c in inside(&r.comm, f) {
                comm += c.dur;
                wait += c.wait;
            }
        }
    }
    let m = n.max(1) as f64;
    json!({"forwards": n / ranks.len().max(1), "mean_forward_us": dur / m,
           "exposed_comm_us": comm / m, "wait_us": wait / m})
}

/// One rank's all-reduce wait and time inside each layer's attention and MLP spans (µs):
/// `[attention wait, attention comm, mlp wait, mlp comm]` per layer.
fn layer_sums(r: &RankEvents) -> BTreeMap<u64, [f64; 4]> {
    let mut t: BTreeMap<u64, [f64; 4]> = BTreeMap::new();
    for s in r.compute.iter() {
        let (Some(layer), col) = (s.layer, s.name.as_str()) else {
            continue;
        };
        let col = match col {
            "attention" => 0,
            "mlp" => 2,
            _ => continue,
        };
        let row = t.entry(layer).or_default();
        for c in inside(&r.comm, s) {
            row[col] += c.wait;
            row[col + 1] += c.dur;
        }
    }
    t
}

/// Per layer: the all-reduce wait inside its attention and MLP spans, mean per rank (µs).
fn layers(ranks: &[RankEvents]) -> Vec<Value> {
    let mut t: BTreeMap<u64, [f64; 4]> = BTreeMap::new();
    for r in ranks {
        for (l, v) in layer_sums(r) {
            let row = t.entry(l).or_default();
            for (a, b) in row.iter_mut().zip(v) {
                *a += b;
            }
        }
    }
    let w = ranks.len().max(1) as f64;
    t.into_iter()
        .map(|(l, v)| {
            json!({"layer": l, "attention_wait_us": v[0] / w, "attention_comm_us": v[1] / w,
                   "mlp_wait_us": v[2] / w, "mlp_comm_us": v[3] / w})
        })
        .collect()
}

fn report(ranks: &[RankEvents], min_skew: f64) -> Value {
    let per_rank: Vec<Value> = ranks
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let comm: f64 = r.comm.iter().map(|c| c.dur).sum();
            let wait: f64 = r.comm.iter().map(|c| c.wait).sum();
            // Compute spans nest and contain collectives: the union, less the calls inside.
            let compute = (union_us(&r.compute) - comm).max(0.0);
            json!({"rank": i, "compute_us": compute, "comm_us": comm, "wait_us": wait,
                   "calls": r.comm.len()})
        })
        .collect();
    let calls = calls(ranks);
    let mut worst: Vec<&Call> = calls.iter().collect();
    worst.sort_by(|a, b| b.skew.total_cmp(&a.skew));
    let worst: Vec<Value> = worst
        .iter()
        .take(10)
        .map(|c| json!({"call": c.seq, "op": c.op, "skew_us": c.skew, "last_rank": c.last}))
        .collect();
    let mean_skew = calls.iter().map(|c| c.skew).sum::<f64>() / calls.len().max(1) as f64;
    json!({
        "world_size": ranks.len(),
        "ranks": per_rank,
        "calls": calls.len(),
        "mean_skew_us": mean_skew,
        "worst_calls": worst,
        "stragglers": stragglers(&calls, ranks.len(), min_skew),
        "per_forward": forwards(ranks),
        "layers": layers(ranks),
    })
}

fn ms(v: &Value) -> String {
    format!("{:.3}", v.as_f64().unwrap_or(0.0) / 1e3)
}

/// A count for a padded column (`Value`'s Display ignores width).
fn int(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn print_tables(r: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "rank  compute_ms  comm_ms  wait_ms  calls");
    for x in r["ranks"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:>4}  {:>10}  {:>7}  {:>7}  {:>5}",
            int(&x["rank"]),
            ms(&x["compute_us"]),
            ms(&x["comm_us"]),
            ms(&x["wait_us"]),
            int(&x["calls"])
        );
    }
    let _ = writeln!(
        s,
        "\n{} collective calls per rank; mean arrival skew {} ms",
        r["calls"],
        ms(&r["mean_skew_us"])
    );
    let _ = writeln!(s, "worst calls:  call  op              skew_ms  last rank");
    for c in r["worst_calls"].as_array().into_iter().flatten().take(5) {
        let _ = writeln!(
            s,
            "            {:>6}  {:<14}  {:>7}  {:>9}",
            int(&c["call"]),
            c["op"].as_str().unwrap_or("?"),
            ms(&c["skew_us"]),
            int(&c["last_rank"])
        );
    }
    let _ = writeln!(s, "stragglers (last by >= the minimum skew), worst first:");
    for x in r["stragglers"].as_array().into_iter().flatten().take(5) {
        let calls = x["calls"].as_array().map_or(0, |c| c.len());
        let _ = writeln!(
            s,
            "  rank {}: last at {calls} calls, mean skew {} ms",
            x["rank"],
            ms(&x["mean_skew_us"])
        );
    }
    let f = &r["per_forward"];
    if f["forwards"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            s,
            "\nper forward ({} forwards): {} ms, exposed communication {} ms (wait {} ms)",
            f["forwards"],
            ms(&f["mean_forward_us"]),
            ms(&f["exposed_comm_us"]),
            ms(&f["wait_us"])
        );
    }
    let layers = r["layers"].as_array().into_iter().flatten();
    let mut first = true;
    for l in layers {
        if std::mem::take(&mut first) {
            let _ = writeln!(
                s,
                "\nlayer  attn_wait_ms  attn_comm_ms  mlp_wait_ms  mlp_comm_ms   (mean per rank)"
            );
        }
        let _ = writeln!(
            s,
            "{:>5}  {:>12}  {:>12}  {:>11}  {:>11}",
            int(&l["layer"]),
            ms(&l["attention_wait_us"]),
            ms(&l["attention_comm_us"]),
            ms(&l["mlp_wait_us"]),
            ms(&l["mlp_comm_us"])
        );
    }
    s
}

mod svg;

pub fn run(a: &Args) -> anyhow::Result<()> {
    let ranks = load(&a.trace)?;
    let r = report(&ranks, a.min_skew_us);
    if let Some(out) = &a.svg {
        collectives::files::write_output(out, svg::draw(&ranks).as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    let text = if a.json {
        serde_json::to_string_pretty(&r)? + "\n"
    } else {
        print_tables(&r)
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?;
    Ok(())
}
