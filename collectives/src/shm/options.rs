//! [`CommOptions`]: how a rank waits and which algorithm it picks, with their defaults and the
//! `TPRUN_COMM_*` environment variables that override them.

use std::time::Duration;

use super::sys;
use crate::{CommError, Result};

/// Environment variables a rank reads (besides RANK / WORLD_SIZE and the segment's).
pub const ENV_TIMEOUT: &str = "TPRUN_COMM_TIMEOUT_S";
pub const ENV_SPIN: &str = "TPRUN_COMM_SPIN_US";
pub const ENV_YIELDS: &str = "TPRUN_COMM_YIELDS";
pub const ENV_ONE_SHOT: &str = "TPRUN_COMM_ONESHOT_MAX";
pub const ENV_CHUNK: &str = "TPRUN_COMM_CHUNK_BYTES";

/// Default deadline of one wait. Dead peers are noticed much sooner (abort flag, pid check); this
/// only bounds a peer that is alive but never arrives.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default busy-wait before sleeping, when every rank can have its own CPU. Long, because waking
/// a sleeping rank costs 5-20 us on an idle machine and milliseconds on a busy one, while ranks
/// doing equal work arrive within microseconds of each other. A waiter whose peer last ran on the
/// waiter's own CPU skips it: the peer cannot run while we spin.
pub const DEFAULT_SPIN: Duration = Duration::from_millis(1);

/// How a rank waits and which algorithm it picks. Must be the same on every rank
/// (`one_shot_max` decides the number of steps).
#[derive(Clone, Debug)]
pub struct CommOptions {
    /// Deadline of each wait for a peer.
    pub timeout: Duration,
    /// Busy-wait this long before sleeping (0 when ranks outnumber CPUs).
    pub spin: Duration,
    /// sched_yield this many times between spinning and sleeping.
    pub yields: u32,
    /// All-reduces up to this many bytes use the one-shot algorithm.
    pub one_shot_max: usize,
    /// All-reduces are pipelined in chunks of at most this many bytes (and at most one slot).
    /// Measured on Zen 4: 1 MiB beats 256 KiB (peers then read our lines from the L3 victim cache
    /// instead of snooping our L2) and per-step costs stay amortised.
    pub chunk_bytes: usize,
}

impl CommOptions {
    /// Defaults for `world` ranks on this host.
    pub fn for_world(world: usize) -> CommOptions {
        let oversubscribed = world > sys::online_cpus();
        CommOptions {
            timeout: DEFAULT_TIMEOUT,
            spin: if oversubscribed {
                Duration::ZERO
            } else {
                DEFAULT_SPIN
            },
            yields: 0,
            one_shot_max: if world <= 2 {
                1 << 20
            } else if world <= 4 {
                256 << 10
            } else {
                64 << 10
            },
            chunk_bytes: 1 << 20,
        }
    }

    /// Defaults overridden by `TPRUN_COMM_TIMEOUT_S`, `TPRUN_COMM_SPIN_US`, `TPRUN_COMM_YIELDS`
    /// and `TPRUN_COMM_ONESHOT_MAX`.
    pub fn from_env(world: usize) -> Result<CommOptions> {
        let mut o = CommOptions::for_world(world);
        let bad =
            |var: &str, v: &str, want: &str| CommError::Setup(format!("{var}={v} is not {want}"));
        if let Ok(v) = std::env::var(ENV_TIMEOUT) {
            let s: f64 = v
                .trim()
                .parse()
                .map_err(|_| bad(ENV_TIMEOUT, &v, "a number of seconds"))?;
            if !(s > 0.0 && s.is_finite()) {
                return Err(bad(ENV_TIMEOUT, &v, "a positive number of seconds"));
            }
            o.timeout = Duration::from_secs_f64(s);
        }
        if let Ok(v) = std::env::var(ENV_SPIN) {
            let us: u64 = v
                .trim()
                .parse()
                .map_err(|_| bad(ENV_SPIN, &v, "whole microseconds"))?;
            o.spin = Duration::from_micros(us);
        }
        if let Ok(v) = std::env::var(ENV_YIELDS) {
            o.yields = v
                .trim()
                .parse()
                .map_err(|_| bad(ENV_YIELDS, &v, "a count"))?;
        }
        if let Ok(v) = std::env::var(ENV_ONE_SHOT) {
            o.one_shot_max = crate::units::parse_size(&v)
                .map_err(|e| bad(ENV_ONE_SHOT, &v, &format!("a size ({e})")))?
                as usize;
        }
        if let Ok(v) = std::env::var(ENV_CHUNK) {
            o.chunk_bytes = crate::units::parse_size(&v)
                .map_err(|e| bad(ENV_CHUNK, &v, &format!("a size ({e})")))?
                as usize;
        }
        Ok(o)
    }
}
