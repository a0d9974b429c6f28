//! The flight recorder: each rank keeps its last [`FLIGHT_K`] collective calls (number, op,
//! bytes, dtype, entry and exit times) in the job's shared segment, so that when a job hangs or is
//! torn down the launcher can say which rank stopped at which call, even if that rank is stopped
//! or dead. Writing costs a few relaxed stores per call into the rank's own cache lines; the
//! launcher reads racily, which is fine for a diagnosis (a record being rewritten shows its new
//! `seq` with `exit_ns` 0 or the old one's times, never garbage that matters).

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use super::layout::{FlightHdr, FlightRec, Layout, FLIGHT_K};
use super::segment::Mapping;
use crate::stats::OpKind;
use crate::DType;

const DTYPES: [DType; 10] = DType::ALL;
const NO_DTYPE: u32 = 0xFF;

/// `CLOCK_MONOTONIC` in nanoseconds (the clock [`crate::trace::now_us`] reads).
pub fn now_ns() -> u64 {
    (crate::trace::now_us() * 1e3) as u64
}

/// Marks call `seq` entered: fills its ring slot, then publishes `entered`.
#[inline]
pub(crate) fn enter(
    f: (&FlightHdr, &[FlightRec]),
    seq: u64,
    kind: OpKind,
    dtype: Option<DType>,
    bytes: usize,
    now_ns: u64,
) {
    let (hdr, recs) = f;
    let r = &recs[seq as usize % FLIGHT_K];
    let d = dtype.map_or(NO_DTYPE, |d| d as u32);
    r.exit_ns.store(0, Relaxed);
    r.seq.store(seq, Relaxed);
    r.code.store(kind.index() as u32 | d << 8, Relaxed);
    r.bytes.store(bytes as u64, Relaxed);
    r.enter_ns.store(now_ns, Relaxed);
    hdr.entered.store(seq, Release);
}

/// Marks call `seq` left.
#[inline]
pub(crate) fn exit(f: (&FlightHdr, &[FlightRec]), seq: u64, now_ns: u64) {
    f.1[seq as usize % FLIGHT_K].exit_ns.store(now_ns, Relaxed);
}

/// One call as the flight recorder kept it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FlightRecord {
    pub seq: u64,
    pub op: &'static str,
    pub dtype: Option<&'static str>,
    pub bytes: u64,
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub enter_ns: u64,
    /// `None` while the rank is still inside the call.
    pub exit_ns: Option<u64>,
}

/// One rank's flight recorder: the last call it entered and its kept records, oldest first.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RankFlight {
    pub rank: usize,
    pub entered: u64,
    pub records: Vec<FlightRecord>,
}

impl RankFlight {
    /// The record of the last call entered, if kept.
    pub fn last(&self) -> Option<&FlightRecord> {
        self.records.iter().rev().find(|r| r.seq == self.entered)
    }
}

pub(crate) fn read(map: &Mapping, lay: &Layout, rank: usize) -> RankFlight {
    let (hdr, recs) = map.flight(lay, rank);
    let mut records: Vec<FlightRecord> = recs
        .iter()
        .filter_map(|r| {
            let seq = r.seq.load(Relaxed);
            let code = r.code.load(Relaxed);
            let op = OpKind::ALL.get((code & 0xFF) as usize)?;
            (seq != 0).then(|| FlightRecord {
                seq,
                op: op.name(),
                dtype: DTYPES.get((code >> 8) as usize).map(|d| d.name()),
                bytes: r.bytes.load(Relaxed),
                enter_ns: r.enter_ns.load(Relaxed),
                exit_ns: Some(r.exit_ns.load(Relaxed)).filter(|&t| t != 0),
            })
        })
        .collect();
    records.sort_by_key(|r| r.seq);
    RankFlight {
        rank,
        entered: hdr.entered.load(Relaxed),
        records,
    }
}

/// Registers a group (its name, size and the fd this process holds its segment as) in the job
/// segment's registry, so the launcher can read its flight recorders; returns the slot, or None
/// when every slot is taken by a live process.
pub(crate) fn register_group(job: &Mapping, name: &str, fd: i32, n: usize) -> Option<usize> {
    let me = std::process::id();
    for (i, g) in job.header().groups.iter().enumerate() {
        let owner = g.owner.load(SeqCst);
        let free = owner == 0 || (owner != me && !super::sys::pid_alive(owner));
        if free && g.owner.compare_exchange(owner, me, SeqCst, SeqCst).is_ok() {
            g.ready.store(0, SeqCst);
            g.fd.store(fd as u32, Relaxed);
            g.world.store(n as u32, Relaxed);
            let bytes = name.as_bytes();
            for (k, b) in g.name.iter().enumerate() {
                b.store(bytes.get(k).copied().unwrap_or(0), Relaxed);
            }
            g.ready.store(1, Release);
            return Some(i);
        }
    }
    None
}

/// Frees the registry slot of a group whose rank 0 drops it.
pub(crate) fn unregister_group(job: &Mapping, slot: usize) {
    let g = &job.header().groups[slot];
    g.ready.store(0, SeqCst);
    g.owner.store(0, SeqCst);
}

/// A registered group's entry: (name, owner pid, fd, size), if ready.
pub(crate) fn registered_groups(job: &Mapping) -> Vec<(String, u32, i32, usize)> {
    job.header()
        .groups
        .iter()
        .filter(|g| g.ready.load(Acquire) == 1)
        .map(|g| {
            let name: Vec<u8> = g
                .name
                .iter()
                .map(|b| b.load(Relaxed))
                .take_while(|&b| b != 0)
                .collect();
            (
                String::from_utf8_lossy(&name).into_owned(),
                g.owner.load(Relaxed),
                g.fd.load(Relaxed) as i32,
                g.world.load(Relaxed) as usize,
            )
        })
        .collect()
}

/// One group's flight recorders, its ranks numbered as world ranks.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GroupFlight {
    /// `world/<color>`, ... as its errors name it.
    pub name: String,
    /// World rank of each group rank.
    pub world_ranks: Vec<usize>,
    /// Per group rank, `rank` being its world rank.
    pub ranks: Vec<RankFlight>,
}

/// The line that says who is behind, e.g. `rank 2 is at all_reduce #1234 (entered 12.3 s ago);
/// ranks 0,1,3 wait at #1235`, or `None` when no rank entered a collective or all are at the same
/// call and none is still inside it. `alive[r]` says whether rank r still runs: of the ranks at the
/// lowest call, a live one is named first (the others may have left on an error).
pub fn behind_line(ranks: &[RankFlight], alive: &[bool], now_ns: u64) -> Option<String> {
    let min = ranks.iter().map(|r| r.entered).min()?;
    let max = ranks.iter().map(|r| r.entered).max()?;
    let stuck_inside = |r: &RankFlight| r.last().is_some_and(|l| l.exit_ns.is_none());
    if max == 0 || (min == max && !ranks.iter().any(stuck_inside)) {
        return None;
    }
    let behind = ranks
        .iter()
        .filter(|r| r.entered == min)
        .max_by_key(|r| (alive.get(r.rank).copied().unwrap_or(false), stuck_inside(r)))?;
    let at = match behind.last() {
        Some(l) => format!(
            "{} #{} (entered {:.1} s ago{})",
            l.op,
            l.seq,
            now_ns.saturating_sub(l.enter_ns) as f64 / 1e9,
            if l.exit_ns.is_some() { ", left it" } else { "" }
        ),
        None if min == 0 => "no collective yet".to_string(),
        None => format!("#{min}"),
    };
    let mut others: Vec<(u64, usize)> = ranks
        .iter()
        .filter(|r| r.rank != behind.rank)
        .map(|r| (r.entered, r.rank))
        .collect();
    others.sort();
    let mut parts = Vec::new();
    for (seq, group) in others.chunk_by(|a, b| a.0 == b.0).map(|g| (g[0].0, g)) {
        let names: Vec<String> = group.iter().map(|(_, r)| r.to_string()).collect();
        let one = names.len() == 1;
        let verb = match (seq == min, one) {
            (true, true) => "is also at",
            (true, false) => "are also at",
            (false, true) => "waits at",
            (false, false) => "wait at",
        };
        let who = if one { "rank" } else { "ranks" };
        parts.push(format!("{who} {} {verb} #{seq}", names.join(",")));
    }
    let mut line = format!("rank {} is at {at}", behind.rank);
    if !parts.is_empty() {
        line.push_str("; ");
        line.push_str(&parts.join("; "));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(rank: usize, entered: u64, left: bool) -> RankFlight {
        RankFlight {
            rank,
            entered,
            records: vec![FlightRecord {
                seq: entered,
                op: "all_reduce",
                dtype: Some("float"),
                bytes: 4,
                enter_ns: 1_000_000_000,
                exit_ns: left.then_some(1_000_001_000),
            }],
        }
    }

    #[test]
    fn names_the_rank_behind_and_where_the_others_wait() {
        let rs = [
            rank(0, 1235, false),
            rank(1, 1235, false),
            rank(2, 1234, true),
            rank(3, 1235, false),
        ];
        let line = behind_line(&rs, &[true; 4], 13_300_000_000).unwrap();
        assert_eq!(
            line,
            "rank 2 is at all_reduce #1234 (entered 12.3 s ago, left it); ranks 0,1,3 wait at #1235"
        );
        // Everyone left the same call: nobody is behind.
        let done = [rank(0, 7, true), rank(1, 7, true)];
        assert_eq!(behind_line(&done, &[true; 2], 0), None);
        // All inside the same call: the live one is named.
        let inside = [rank(0, 7, false), rank(1, 7, false)];
        let line = behind_line(&inside, &[false, true], 2_000_000_000).unwrap();
        assert!(
            line.starts_with("rank 1 is at all_reduce #7 (entered 1.0 s ago)"),
            "{line}"
        );
        assert!(line.ends_with("rank 0 is also at #7"), "{line}");
    }
}
