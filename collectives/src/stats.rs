//! Per-operation counters every communicator keeps (count, bytes, seconds, seconds spent waiting
//! for peers). Two clock reads per call, so they stay on even in the hot decode loop.

use std::fmt;

/// The collective operations, in a fixed order (the index into [`CommStats::ops`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// [`crate::Communicator::all_reduce_raw`].
    AllReduce,
    /// [`crate::Communicator::all_gather_raw`].
    AllGather,
    /// [`crate::Communicator::reduce_scatter_raw`].
    ReduceScatter,
    /// [`crate::Communicator::broadcast_raw`].
    Broadcast,
    /// [`crate::Communicator::barrier`].
    Barrier,
    /// [`crate::Communicator::reduce_raw`].
    Reduce,
    /// [`crate::Communicator::gather_raw`].
    Gather,
    /// [`crate::Communicator::scatter_raw`].
    Scatter,
    /// [`crate::Communicator::all_to_all_raw`] and [`crate::Communicator::all_to_allv_raw`].
    AllToAll,
    /// [`crate::Communicator::send_recv_raw`] (sends, receives and grouped calls).
    SendRecv,
}

impl OpKind {
    /// Every kind, in index order (reports list them in this order).
    pub const ALL: [OpKind; 10] = [
        OpKind::AllReduce,
        OpKind::AllGather,
        OpKind::ReduceScatter,
        OpKind::Broadcast,
        OpKind::Barrier,
        OpKind::Reduce,
        OpKind::Gather,
        OpKind::Scatter,
        OpKind::AllToAll,
        OpKind::SendRecv,
    ];
    /// The snake-case name reports, traces and `perf` use.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::AllGather => "all_gather",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::Broadcast => "broadcast",
            OpKind::Barrier => "barrier",
            OpKind::Reduce => "reduce",
            OpKind::Gather => "gather",
            OpKind::Scatter => "scatter",
            OpKind::AllToAll => "all_to_all",
            OpKind::SendRecv => "send_recv",
        }
    }
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Totals for one operation kind on one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct OpStats {
    /// Calls made.
    pub count: u64,
    /// The operation's size as nccl-tests counts it: the all-reduce/broadcast buffer, the
    /// all-gather output, the reduce-scatter input.
    pub bytes: u64,
    /// Wall time inside the calls.
    pub seconds: f64,
    /// The part of `seconds` spent waiting for slower peers.
    pub wait_seconds: f64,
}

/// One rank's totals for every operation kind since the communicator was made.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommStats {
    /// Totals indexed by [`OpKind`]'s order ([`CommStats::get`] looks one up).
    pub ops: [OpStats; OpKind::ALL.len()],
}

impl CommStats {
    /// The totals of one kind.
    pub fn get(&self, kind: OpKind) -> &OpStats {
        &self.ops[kind.index()]
    }
    /// Adds one finished call.
    pub fn record(&mut self, kind: OpKind, bytes: usize, seconds: f64, wait_seconds: f64) {
        let s = &mut self.ops[kind.index()];
        s.count += 1;
        s.bytes += bytes as u64;
        s.seconds += seconds;
        s.wait_seconds += wait_seconds;
    }
    /// The kinds that were called at least once, with their totals.
    pub fn iter(&self) -> impl Iterator<Item = (OpKind, &OpStats)> {
        OpKind::ALL
            .into_iter()
            .map(|k| (k, &self.ops[k.index()]))
            .filter(|(_, s)| s.count > 0)
    }
    /// Seconds spent in all collectives.
    pub fn total_seconds(&self) -> f64 {
        self.ops.iter().map(|s| s.seconds).sum()
    }
}

impl CommStats {
    /// The per-operation table printed at the end of generate and bench: count, bytes, seconds,
    /// share of `wall_s`, and the mean time a call waited for its slowest peer.
    pub fn summary(&self, wall_s: f64) -> String {
        let mut out = format!(
            "{:<15} {:>8} {:>12} {:>10} {:>7} {:>14}\n",
            "collective", "count", "bytes", "seconds", "share", "mean wait (us)"
        );
        for (k, s) in self.iter() {
            out += &format!(
                "{:<15} {:>8} {:>12} {:>10.6} {:>6.1}% {:>14.2}\n",
                k.name(),
                s.count,
                s.bytes,
                s.seconds,
                100.0 * s.seconds / wall_s.max(1e-12),
                1e6 * s.wait_seconds / s.count.max(1) as f64
            );
        }
        let total = self.total_seconds();
        out += &format!(
            "{:<15} {:>8} {:>12} {:>10.6} {:>6.1}%  of {wall_s:.6} s wall\n",
            "total",
            self.ops.iter().map(|s| s.count).sum::<u64>(),
            self.ops.iter().map(|s| s.bytes).sum::<u64>(),
            total,
            100.0 * total / wall_s.max(1e-12)
        );
        out
    }
}

/// Serialises as `{"all_reduce": {"count":..,"bytes":..,"seconds":..,"wait_seconds":..}, ...}`
/// with only the kinds that were called (the `comm` object of `generate --json`).
impl serde::Serialize for CommStats {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = ser.serialize_map(None)?;
        for (k, s) in self.iter() {
            m.serialize_entry(k.name(), s)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lists_called_ops_with_share_and_mean_wait() {
        let mut st = CommStats::default();
        st.record(OpKind::AllReduce, 256, 0.5, 0.25);
        st.record(OpKind::AllReduce, 256, 0.5, 0.25);
        st.record(OpKind::Broadcast, 4, 0.1, 0.0);
        let t = st.summary(10.0);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        let ar: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            ar,
            ["all_reduce", "2", "512", "1.000000", "10.0%", "250000.00"]
        );
        assert!(lines[2].starts_with("broadcast"));
        assert!(lines[3].starts_with("total"));
        let j = serde_json::to_value(&st).unwrap();
        assert_eq!(j["all_reduce"]["count"], 2);
        assert_eq!(j["all_reduce"]["wait_seconds"], 0.5);
        assert!(j.get("all_gather").is_none());
    }
}
