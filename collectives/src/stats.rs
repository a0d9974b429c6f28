//! Per-operation counters every communicator keeps (count, bytes, seconds, seconds spent waiting
//! for peers). Two clock reads per call, so they stay on even in the hot decode loop.

use std::fmt;

/// The collective operations, in a fixed order (the index into [`CommStats::ops`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    AllReduce,
    AllGather,
    ReduceScatter,
    Broadcast,
    Barrier,
}

impl OpKind {
    pub const ALL: [OpKind; 5] = [
        OpKind::AllReduce,
        OpKind::AllGather,
        OpKind::ReduceScatter,
        OpKind::Broadcast,
        OpKind::Barrier,
    ];
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::AllGather => "all_gather",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::Broadcast => "broadcast",
            OpKind::Barrier => "barrier",
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
    pub ops: [OpStats; 5],
}

impl CommStats {
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
