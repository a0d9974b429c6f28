//! Per-rank traces in the layout of the PyTorch profiler, which Holistic Trace Analysis (HTA)
//! loads (`--trace DIR/` writes `DIR/rank{r}.json`). What HTA needs, read from its source
//! (hta/common/trace_parser.py, hta/utils/utils.py, analyzers/): a top-level `distributedInfo`
//! with `rank` and `world_size`; "GPU kernels" are events whose `args.stream` is an integer >= 0;
//! a kernel is communication when its name matches `^nccl.*Kernel`, computation otherwise. So each
//! collective becomes a `record_param_comms` cpu_op carrying the arguments PyTorch's
//! `record_param_comms` records, plus an `ncclDevKernel_*` kernel on stream 7; compute is each
//! compute span's own time (less its child spans and the collectives) as kernels on the same
//! stream, which never overlap (HTA merges a stream's kernels; tprun's collectives are
//! synchronous), and every compute span is also a user_annotation.
//! Times are whole microseconds: HTA rounds float `ts` up and `ts + dur` down
//! (trace_parser.round_down_time_stamps), which turns every sub-microsecond span into a negative
//! duration and made the temporal breakdown's compute time negative; rounding both ends of every
//! span to the nearest microsecond here keeps spans that touch touching and sums unbiased.

use serde_json::{json, Value};

/// The pseudo stream every kernel of a rank goes on.
const STREAM: u32 = 7;

/// PyTorch's names: c10d's collective name, the NCCL kernel's op, torch's dtype name.
fn torch_names(op: &str, dtype: &str) -> (&'static str, &'static str, &'static str) {
    let (coll, kernel) = match op {
        "all_reduce" => ("allreduce", "AllReduce_Sum"),
        "all_gather" => ("allgather", "AllGather"),
        "reduce_scatter" => ("reduce_scatter", "ReduceScatter_Sum"),
        "broadcast" => ("broadcast", "Broadcast"),
        _ => ("barrier", "AllReduce_Sum"),
    };
    let t = match dtype {
        "float" => "Float",
        "bfloat16" => "BFloat16",
        "half" => "Half",
        "uint8" => "Byte",
        "int32" => "Int",
        "int64" => "Long",
        "uint32" => "UInt32",
        "uint64" => "UInt64",
        _ => "Byte",
    };
    (coll, kernel, t)
}

fn dtype_size(dtype: &str) -> u64 {
    match dtype {
        "bfloat16" | "half" => 2,
        "float" | "int32" | "uint32" => 4,
        "int64" | "uint64" => 8,
        _ => 1,
    }
}

/// A time in whole microseconds (see the module comment).
fn us(t: f64) -> i64 {
    t.round() as i64
}

fn span(e: &Value) -> (f64, f64) {
    let ts = e["ts"].as_f64().unwrap_or(0.0);
    (ts, ts + e["dur"].as_f64().unwrap_or(0.0))
}

/// `(start, end)` pieces of `[a, b)` left after removing the sorted, disjoint `holes`.
fn cut(a: f64, b: f64, holes: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut at = a;
    let first = holes.partition_point(|h| h.1 <= a);
    for &(h0, h1) in &holes[first..] {
        if h0 >= b {
            break;
        }
        if h0 > at {
            out.push((at, h0));
        }
        at = at.max(h1);
    }
    if b > at {
        out.push((at, b));
    }
    out
}

/// Each compute span's innermost enclosing compute span (spans nest: a forward holds layers).
fn parents(compute: &[&Value]) -> Vec<Option<usize>> {
    let mut order: Vec<usize> = (0..compute.len()).collect();
    order.sort_by(|&i, &j| {
        let (a, b) = (span(compute[i]), span(compute[j]));
        a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1))
    });
    let mut parent = vec![None; compute.len()];
    let mut stack: Vec<usize> = Vec::new();
    for i in order {
        let (s, e) = span(compute[i]);
        while stack.last().is_some_and(|&t| span(compute[t]).1 <= s) {
            stack.pop();
        }
        if let Some(&t) = stack.last() {
            if span(compute[t]).1 >= e {
                parent[i] = Some(t);
            }
        }
        stack.push(i);
    }
    parent
}

/// `spans` sorted by start and overlapping ones joined, as [`cut`] needs.
fn disjoint(mut spans: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(spans.len());
    for (a, b) in spans {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Every compute span's own time as `(name, start, end)` kernels: the span less its child spans
/// and the collectives, so that the kernels of a rank never overlap and add up to the union of
/// its compute spans less the collectives (what `tprun analyze` calls compute).
fn compute_kernels<'a>(compute: &[&'a Value], comm: &[&Value]) -> Vec<(&'a Value, f64, f64)> {
    let mut holes: Vec<Vec<(f64, f64)>> = vec![Vec::new(); compute.len()];
    for (i, p) in parents(compute).into_iter().enumerate() {
        if let Some(p) = p {
            holes[p].push(span(compute[i]));
        }
    }
    let comm = disjoint(comm.iter().map(|e| span(e)).collect());
    let mut out = Vec::new();
    for (e, mut h) in compute.iter().zip(holes) {
        h.extend_from_slice(&comm);
        let (a, b) = span(e);
        for (s, t) in cut(a, b, &disjoint(h)) {
            out.push((&e["name"], s, t));
        }
    }
    out
}

/// Rank `rank`'s events (tprun's own form, from [`crate::trace`]) as a PyTorch-profiler trace.
pub fn rank_trace(rank: usize, world: usize, events: &[Value]) -> Value {
    let is_comm = |e: &&Value| e["cat"] == "comm";
    let comm: Vec<&Value> = events.iter().filter(is_comm).collect();
    let compute: Vec<&Value> = events.iter().filter(|e| e["cat"] == "compute").collect();
    let mut out = vec![
        json!({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
               "args": {"name": format!("rank {rank}")}}),
        json!({"name": "thread_name", "ph": "M", "pid": rank, "tid": STREAM,
               "args": {"name": format!("stream {STREAM}")}}),
    ];
    let group: Vec<usize> = (0..world).collect();
    for (k, e) in comm.iter().enumerate() {
        let op = e["name"].as_str().unwrap_or("barrier");
        let dtype = e["args"]["dtype"].as_str().unwrap_or("uint8");
        let (coll, kernel, tdtype) = torch_names(op, dtype);
        let (a, b) = span(e);
        let n = e["args"]["bytes"].as_u64().unwrap_or(0) / dtype_size(dtype);
        let w = world.max(1) as u64;
        let (inn, outn) = match op {
            "all_gather" => (n / w, n),
            "reduce_scatter" => (n, n / w),
            _ => (n, n),
        };
        let args = json!({
            "Collective name": coll, "dtype": tdtype, "In msg nelems": inn,
            "Out msg nelems": outn, "Group size": world, "Process Group Name": "0",
            "Process Group Ranks": format!("{group:?}"), "Rank": rank, "External id": k + 1,
            "tprun op": op, "wait_us": e["args"]["wait_us"],
        });
        // No `correlation` link to the kernel: HTA's linking fails on small traces (it narrows
        // the index column to int8), and nothing of what it computes here needs it.
        out.push(
            json!({"ph": "X", "cat": "cpu_op", "name": "record_param_comms",
            "pid": rank, "tid": 1, "ts": us(a), "dur": us(b) - us(a), "args": args.clone()}),
        );
        let mut ka = args;
        ka["stream"] = json!(STREAM);
        ka["device"] = json!(rank);
        ka["correlation"] = json!(-1);
        out.push(json!({"ph": "X", "cat": "kernel",
            "name": format!("ncclDevKernel_{kernel}_{}_SHM", dtype),
            "pid": rank, "tid": STREAM, "ts": us(a), "dur": us(b) - us(a), "args": ka}));
    }
    for e in &compute {
        let (a, b) = span(e);
        out.push(
            json!({"ph": "X", "cat": "user_annotation", "name": e["name"],
            "pid": rank, "tid": 1, "ts": us(a), "dur": us(b) - us(a), "args": e["args"]}),
        );
    }
    // Pieces that round to nothing are left out: a zero-length kernel adds no time.
    for (name, s, t) in compute_kernels(&compute, &comm) {
        if us(t) > us(s) {
            out.push(json!({"ph": "X", "cat": "kernel", "name": name,
                "pid": rank, "tid": STREAM, "ts": us(s), "dur": us(t) - us(s),
                "args": {"stream": STREAM, "device": rank, "correlation": -1}}));
        }
    }
    json!({
        "schemaVersion": 1,
        "distributedInfo": {"backend": "tprun-shm", "rank": rank, "world_size": world},
        "deviceProperties": [],
        "traceEvents": out,
        "displayTimeUnit": "ms",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_carry_record_param_comms_args_and_compute_is_cut_around_them() {
        let evs = vec![
            json!({"name": "attention", "cat": "compute", "ts": 0.0, "dur": 10.0,
                   "args": {"layer": 0}}),
            json!({"name": "all_gather", "cat": "comm", "ts": 4.0, "dur": 2.0,
                   "args": {"bytes": 64, "dtype": "bfloat16", "wait_us": 1.0}}),
            json!({"name": "forward", "cat": "compute", "ts": 0.0, "dur": 20.0, "args": {}}),
        ];
        let t = rank_trace(1, 4, &evs);
        assert_eq!(t["distributedInfo"]["rank"], 1);
        assert_eq!(t["distributedInfo"]["world_size"], 4);
        let evs = t["traceEvents"].as_array().unwrap();
        let cpu = evs
            .iter()
            .find(|e| e["name"] == "record_param_comms")
            .unwrap();
        let a = &cpu["args"];
        assert_eq!(a["Collective name"], "allgather");
        assert_eq!(a["dtype"], "BFloat16");
        assert_eq!(
            (a["In msg nelems"].as_u64(), a["Out msg nelems"].as_u64()),
            (Some(8), Some(32))
        );
        assert_eq!(a["Group size"], 4);
        let kernels: Vec<_> = evs.iter().filter(|e| e["cat"] == "kernel").collect();
        assert!(kernels.iter().all(|k| k["args"]["stream"] == STREAM));
        assert!(kernels[0]["name"]
            .as_str()
            .unwrap()
            .starts_with("ncclDevKernel_AllGather"));
        // attention is cut around the all-gather; forward keeps only its time outside attention.
        let att: Vec<(f64, f64)> = kernels
            .iter()
            .filter(|k| k["name"] == "attention")
            .map(|k| span(k))
            .collect();
        assert_eq!(att, vec![(0.0, 4.0), (6.0, 10.0)]);
        let fwd: Vec<(f64, f64)> = kernels
            .iter()
            .filter(|k| k["name"] == "forward")
            .map(|k| span(k))
            .collect();
        assert_eq!(fwd, vec![(10.0, 20.0)]);
    }

    #[test]
    fn sub_microsecond_spans_become_whole_microseconds_that_never_overlap() {
        // HTA rounds a float ts up and its end down: 2.4..2.9 would become 3..2, a negative span.
        let evs = vec![
            json!({"name": "mlp", "cat": "compute", "ts": 2.4, "dur": 0.5, "args": {}}),
            json!({"name": "attention", "cat": "compute", "ts": 2.9, "dur": 3.3, "args": {}}),
            json!({"name": "all_reduce", "cat": "comm", "ts": 3.7, "dur": 1.2,
                   "args": {"bytes": 8, "dtype": "float", "wait_us": 0.0}}),
        ];
        let t = rank_trace(0, 2, &evs);
        let mut k: Vec<(i64, i64)> = t["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["cat"] == "kernel")
            .map(|e| (e["ts"].as_i64().unwrap(), e["dur"].as_i64().unwrap()))
            .collect();
        k.sort();
        // mlp 2.4..2.9 -> 2..3; attention 2.9..3.7 -> 3..4 and 4.9..6.2 -> 5..6; comm 4..5.
        assert_eq!(k, vec![(2, 1), (3, 1), (4, 1), (5, 1)]);
    }
}
