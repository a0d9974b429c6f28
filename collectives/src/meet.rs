//! Communicators that meet by a key the caller agreed on some other way (a torch c10d Store,
//! a file, a command line), rather than through the launcher's environment ([`crate::from_env`]).
//!
//! torch.distributed hands its backends a Store and the group's ranks; processes started by
//! `torch.multiprocessing.spawn` have no tprun or torchrun environment at all. Rank 0 of the
//! group puts a fresh key in the store, every member calls [`shm_by_key`] with it, and the
//! members meet in a named segment that exists only during start-up. Any number of these may be
//! alive in one process (each group has its own segment), unlike `from_env`'s one per process.

use std::time::Duration;

use crate::shm::{segment, CommOptions, ShmComm};
use crate::{CommError, Communicator, Result};

/// Group rank `rank` of `world` ranks on this host, meeting in the named segment `key` (rank 0
/// creates it, the others wait for it up to `timeout`, the last to map it unlinks the name).
/// `timeout` also bounds every later wait for a peer (`TPRUN_COMM_TIMEOUT_S` when `None`).
/// A world of one needs no segment: it gets a [`crate::local::SoloComm`].
pub fn shm_by_key(
    key: &str,
    rank: usize,
    world: usize,
    timeout: Option<Duration>,
) -> Result<Box<dyn Communicator>> {
    if world == 0 || rank >= world {
        return Err(CommError::Setup(format!(
            "rank {rank} out of range for a group of {world} ranks"
        )));
    }
    if key.is_empty() || key.contains(['/', '\0']) {
        return Err(CommError::Setup(format!(
            "segment key {key:?}: expected a non-empty name without '/' or NUL"
        )));
    }
    if world == 1 {
        return Ok(Box::new(crate::local::SoloComm));
    }
    let mut opts = CommOptions::from_env(world)?;
    if let Some(t) = timeout {
        opts.timeout = t;
    }
    let (map, lay) = segment::attach_named(key, world, rank, opts.timeout)?;
    Ok(Box::new(ShmComm::attach(map, lay, rank, opts)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CommExt, ReduceOp};

    #[test]
    fn ranks_meet_by_key_and_reduce() {
        let key = format!("meet-test-{}", std::process::id());
        let ranks: Vec<_> = (0..3)
            .map(|r| {
                let key = key.clone();
                std::thread::spawn(move || {
                    let mut c = shm_by_key(&key, r, 3, Some(Duration::from_secs(30))).unwrap();
                    assert_eq!((c.rank(), c.world_size()), (r, 3));
                    let mut v = vec![r as i64 + 1; 5];
                    c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                    v
                })
            })
            .collect();
        for h in ranks {
            assert_eq!(h.join().unwrap(), vec![6i64; 5]);
        }
        // The last rank to map the segment unlinked its name.
        assert!(!segment::named_path(&key).exists());
    }

    #[test]
    fn bad_arguments_are_refused() {
        let e =
            |r: Result<Box<dyn Communicator>>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e(shm_by_key("k", 2, 2, None)).contains("rank 2 out of range for a group of 2"));
        assert!(e(shm_by_key("a/b", 0, 2, None)).contains("segment key \"a/b\""));
        assert_eq!(shm_by_key("k", 0, 1, None).unwrap().world_size(), 1);
    }
}
