//! [`CommOptions`]: how a rank waits and which algorithm it picks, with their defaults and the
//! `TPRUN_COMM_*` environment variables that override them.

use std::time::Duration;

use super::sys;
use crate::{env, CommError, Result};

// Environment variables a rank reads (besides RANK / WORLD_SIZE and the segment's).
/// [`CommOptions::timeout`] in seconds.
pub const ENV_TIMEOUT: &str = "TPRUN_COMM_TIMEOUT_S";
/// [`CommOptions::spin`] in microseconds.
pub const ENV_SPIN: &str = "TPRUN_COMM_SPIN_US";
/// [`CommOptions::yields`].
pub const ENV_YIELDS: &str = "TPRUN_COMM_YIELDS";
/// [`CommOptions::one_shot_max`] in bytes.
pub const ENV_ONE_SHOT: &str = "TPRUN_COMM_ONESHOT_MAX";
/// [`CommOptions::chunk_bytes`].
pub const ENV_CHUNK: &str = "TPRUN_COMM_CHUNK_BYTES";
/// Smallest per-rank piece moved by single copy (bytes, or `off`): [`CommOptions::direct_min`].
pub const ENV_DIRECT_MIN: &str = "TPRUN_COMM_DIRECT_MIN";

/// Default of [`CommOptions::direct_min`]. Below it the two copies through the segment cost
/// less than the system call of one copy between the ranks: measured at 2 ranks (2026-12-08,
/// `TPRUN_COMM_DIRECT_MIN` 8K / 16K / 32K interleaved), single copy took 0.6-0.8x the time for
/// all-gather and all-to-all pieces and send/recv messages of 8-16 KiB.
pub const DEFAULT_DIRECT_MIN: usize = 8 << 10;
/// Default of [`CommOptions::direct_rooted_min`]: broadcast, gather and scatter pieces of 8 KiB
/// took 1.2-1.4x the two copies' time by single copy, those of 16 KiB 0.8x (same run).
pub const DEFAULT_DIRECT_ROOTED_MIN: usize = 16 << 10;

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
    /// Copy-only operations (all-gather, broadcast, gather, scatter, all-to-all, point-to-point)
    /// move a rank's piece of at least this many bytes with one copy straight between the ranks'
    /// buffers (Linux cross-memory attach) instead of two through the segment, where the kernel
    /// lets the ranks do that (checked on the first such call). `usize::MAX`: never.
    pub direct_min: usize,
    /// Broadcast, gather and scatter take the single-copy path only from this many bytes per
    /// rank (and `direct_min`): their root lends its buffer and waits while the others copy,
    /// where the two copies overlap, so the system call pays off later than for the others.
    pub direct_rooted_min: usize,
    /// Broadcast, gather and scatter take the single-copy path only up to this many bytes per
    /// rank: above it the two-copy pipeline wins, because the root and the others copy at once
    /// (one copy each, in parallel) where single copy leaves one side idle. Measured at 2 ranks:
    /// single copy 0.5-0.85x the two copies' time up to 1 MiB, 1.1-1.8x from 2 MiB.
    pub direct_rooted_max: usize,
    /// All-reduces take the single-copy path up to this many bytes (measured at 2 ranks: 0.6-0.9x
    /// the two-copy time from 256 KiB to 32 MiB, 1.2x at 64 MiB).
    pub direct_all_reduce_max: usize,
    /// Reduces from this many bytes (up to `direct_all_reduce_max`) take the single-copy path:
    /// every rank reduces a slice instead of the root reducing everything.
    pub direct_reduce_min: usize,
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
            direct_min: DEFAULT_DIRECT_MIN,
            direct_rooted_min: DEFAULT_DIRECT_ROOTED_MIN,
            direct_rooted_max: 1 << 20,
            direct_all_reduce_max: 32 << 20,
            direct_reduce_min: 256 << 10,
        }
    }

    /// Defaults overridden by `TPRUN_COMM_TIMEOUT_S`, `TPRUN_COMM_SPIN_US`, `TPRUN_COMM_YIELDS`,
    /// `TPRUN_COMM_ONESHOT_MAX`, `TPRUN_COMM_CHUNK_BYTES` and `TPRUN_COMM_DIRECT_MIN` (bytes, or
    /// `off`), each checked against its range.
    pub fn from_env(world: usize) -> Result<CommOptions> {
        let mut o = CommOptions::for_world(world);
        let get = |var| env::var(var).map_err(CommError::Setup);
        if let Some(v) = get(ENV_TIMEOUT)? {
            o.timeout =
                env::parse_secs(ENV_TIMEOUT, &v, TIMEOUT_RANGE_S).map_err(CommError::Setup)?;
        }
        if let Some(v) = get(ENV_SPIN)? {
            let us = env::parse_count(ENV_SPIN, &v, "whole microseconds", SPIN_RANGE_US)
                .map_err(CommError::Setup)?;
            o.spin = Duration::from_micros(us);
        }
        if let Some(v) = get(ENV_YIELDS)? {
            o.yields = env::parse_count(ENV_YIELDS, &v, "a count", YIELDS_RANGE)
                .map_err(CommError::Setup)? as u32;
        }
        if let Some(v) = get(ENV_ONE_SHOT)? {
            o.one_shot_max = env::parse_bytes(ENV_ONE_SHOT, &v, ONE_SHOT_RANGE)
                .map_err(CommError::Setup)? as usize;
        }
        if let Some(v) = get(ENV_CHUNK)? {
            o.chunk_bytes =
                env::parse_bytes(ENV_CHUNK, &v, CHUNK_RANGE).map_err(CommError::Setup)? as usize;
        }
        if let Some(v) = get(ENV_DIRECT_MIN)? {
            o.direct_min = if v.trim() == "off" {
                usize::MAX
            } else {
                env::parse_bytes(ENV_DIRECT_MIN, &v, DIRECT_RANGE).map_err(CommError::Setup)?
                    as usize
            };
        }
        Ok(o)
    }
}

/// Accepted `TPRUN_COMM_TIMEOUT_S`: a millisecond to a year (a deadline past `Instant`'s range
/// would panic).
const TIMEOUT_RANGE_S: std::ops::RangeInclusive<f64> = 0.001..=31_536_000.0;
/// Accepted `TPRUN_COMM_SPIN_US`: up to one second of busy-waiting.
const SPIN_RANGE_US: std::ops::RangeInclusive<u64> = 0..=1_000_000;
/// Accepted `TPRUN_COMM_YIELDS`.
const YIELDS_RANGE: std::ops::RangeInclusive<u64> = 0..=1_000_000;
/// Accepted `TPRUN_COMM_ONESHOT_MAX` (0: never one-shot).
const ONE_SHOT_RANGE: std::ops::RangeInclusive<u64> = 0..=1 << 30;
/// Accepted `TPRUN_COMM_DIRECT_MIN` (besides `off`).
const DIRECT_RANGE: std::ops::RangeInclusive<u64> = 0..=1 << 40;
/// Accepted `TPRUN_COMM_CHUNK_BYTES`.
const CHUNK_RANGE: std::ops::RangeInclusive<u64> = 1..=1 << 30;

#[cfg(test)]
mod tests {
    use super::*;

    /// The one test in this binary that sets these variables (the environment is per process).
    #[test]
    fn absurd_environment_values_are_setup_errors() {
        let cases = [
            (ENV_TIMEOUT, "1e20"),
            (ENV_TIMEOUT, "1e19"),
            (ENV_TIMEOUT, "inf"),
            (ENV_TIMEOUT, "nan"),
            (ENV_TIMEOUT, "-5"),
            (ENV_SPIN, "1e19"),
            (ENV_SPIN, "-1"),
            (ENV_YIELDS, "99999999999"),
            (ENV_ONE_SHOT, "1e19"),
            (ENV_CHUNK, "0"),
            (ENV_CHUNK, "garbage"),
            (ENV_DIRECT_MIN, "of"),
            (ENV_DIRECT_MIN, "-1"),
        ];
        for (var, value) in cases {
            std::env::set_var(var, value);
            let e = CommOptions::from_env(2).unwrap_err().to_string();
            std::env::remove_var(var);
            assert!(e.contains(&format!("{var}={value}")), "{e}");
            assert!(e.contains(" in "), "no accepted range in: {e}");
        }
        std::env::set_var(ENV_TIMEOUT, "2.5");
        let o = CommOptions::from_env(2).unwrap();
        std::env::remove_var(ENV_TIMEOUT);
        assert_eq!(o.timeout, Duration::from_millis(2500));
        std::env::set_var(ENV_DIRECT_MIN, "off");
        let o = CommOptions::from_env(2).unwrap();
        std::env::remove_var(ENV_DIRECT_MIN);
        assert_eq!(o.direct_min, usize::MAX);
    }
}
