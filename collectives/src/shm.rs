//! The shared-memory transport. (Skeleton: the collectives issue fills this in.)
//!
//! Contract with the launcher:
//! - `JobSegment::create(world_size)` is called by tprun before any rank starts. It makes one
//!   memfd (or, when `TPRUN_SHM_DIR` is set, an immediately-unlinked file in that directory),
//!   reserves its space with posix_fallocate, and initialises the header.
//! - `JobSegment::env()` lists the variables (TPRUN_SHM_FD, ...) each rank needs; the fd is
//!   inheritable (no CLOEXEC).
//! - `JobSegment::abort(failed_rank)` sets the abort flag and wakes every waiter; the launcher
//!   calls it as soon as it sees a rank fail.
//! - `ShmComm::from_env()` maps the segment inside a rank.

use crate::Result;

/// The launcher's handle on the job's shared memory.
pub struct JobSegment {
    _private: (),
}

impl JobSegment {
    pub fn create(_world_size: usize) -> Result<JobSegment> {
        // Placeholder until the shm transport lands, so the launcher can run jobs meanwhile.
        Ok(JobSegment { _private: () })
    }
    pub fn env(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    pub fn abort(&self, _failed_rank: usize) {}
}

/// This rank's communicator from the environment tprun sets; a [`crate::local::SoloComm`] when
/// WORLD_SIZE is unset or 1.
pub fn from_env() -> anyhow::Result<Box<dyn crate::Communicator>> {
    Ok(Box::new(crate::local::SoloComm))
}
