//! Groups: [`crate::Communicator::split`] on the shared-memory transport.
//!
//! A group gets a segment of its own, with the world's layout for its size, so its collectives
//! and channels never touch another group's (any number of groups run at once, each with its own
//! steps, statistics and flight recorder), and dropping every member's communicator frees it.
//! Making one takes three all-gathers on the parent:
//! 1. every rank's (color, key): each rank computes its group, ordered by key then parent rank;
//! 2. each group's rank 0 creates the segment (an unnamed memfd, or an O_TMPFILE in
//!    `TPRUN_SHM_DIR`) and shares (its pid, the fd number, whether that worked); the others open
//!    `/proc/<pid>/fd/<fd>`, so no name ever exists and nothing outlives the processes;
//! 3. every rank's success, so a group whose member failed to map the segment fails on every
//!    member with the same error, and rank 0 keeps the fd open until all have it.
//!
//! The launcher only knows the world: a group's waits also watch the world segment's abort flag,
//! and a group's errors name the group and give the peers' world ranks.

use std::sync::Arc;

use super::layout::Layout;
use super::segment::{self, Mapping};
use super::ShmComm;
use crate::{CommError, CommExt, Result};

/// What makes a communicator a group: its name and its members' world ranks.
#[derive(Clone, Debug)]
pub(super) struct Group {
    /// `world/<color>`, `world/<color>/<color>`, ... (the same on every member).
    pub(super) name: Arc<str>,
    /// World rank of each group rank.
    world_ranks: Arc<[usize]>,
}

impl Group {
    /// Says which group an error happened in, with the peer as a world rank.
    pub(super) fn name_error(&self, e: CommError) -> CommError {
        let world = |r: usize| self.world_ranks.get(r).copied().unwrap_or(r);
        let e = match e {
            CommError::Timeout {
                op,
                seq,
                missing,
                waited_s,
            } => CommError::Timeout {
                op,
                seq,
                missing: world(missing),
                waited_s,
            },
            CommError::PeerDied {
                op,
                seq,
                missing,
                how,
            } => CommError::PeerDied {
                op,
                seq,
                missing: world(missing),
                how,
            },
            CommError::Aborted {
                op,
                seq,
                failed,
                missing,
            } => CommError::Aborted {
                op,
                seq,
                failed,
                missing: world(missing),
            },
            other => other,
        };
        CommError::InGroup {
            group: format!("{} (world ranks {:?})", self.name, self.world_ranks),
            inner: Box::new(e),
        }
    }
}

/// No color: the rank opts out (MPI_UNDEFINED, NCCL_SPLIT_NOCOLOR).
const NONE: u64 = u64::MAX;

impl ShmComm {
    /// This communicator's name: `world` or the group's.
    pub fn group_name(&self) -> &str {
        self.group.as_ref().map_or("world", |g| &g.name)
    }

    /// World rank of each of this communicator's ranks.
    fn world_ranks(&self) -> Vec<usize> {
        match &self.group {
            Some(g) => g.world_ranks.to_vec(),
            None => (0..self.world).collect(),
        }
    }

    pub(super) fn split_impl(&mut self, color: Option<u32>, key: i64) -> Result<Option<ShmComm>> {
        let (me, w) = (self.rank, self.world);
        let mine = [color.map_or(NONE, u64::from), key as u64];
        let mut all = vec![0u64; 2 * w];
        self.all_gather(&mine, &mut all)?;
        let mut members: Vec<usize> = (0..w).filter(|&r| all[2 * r] == mine[0]).collect();
        members.sort_by_key(|&r| (all[2 * r + 1] as i64, r));
        let new_rank = members.iter().position(|&r| r == me).unwrap_or(0);
        let n = members.len();

        // 2. Rank 0 of each group creates its segment and says where it is.
        let leader = color.is_some() && new_rank == 0;
        let made = if leader {
            Some(segment::create_group(n, self.lay.slot))
        } else {
            None
        };
        let offer = match &made {
            Some(Ok((map, _))) => [1, std::process::id() as u64, map.raw_fd() as u64],
            Some(Err(_)) => [2, 0, 0],
            None => [0, 0, 0],
        };
        let mut offers = vec![0u64; 3 * w];
        self.all_gather(&offer, &mut offers)?;

        // 3. The others map it; everyone says whether that worked.
        let opened: Result<Option<(Arc<Mapping>, Layout)>> = match (color, made) {
            (None, _) => Ok(None),
            (Some(_), Some(made)) => made.map(Some),
            (Some(_), None) => {
                let l = members[0];
                let o = &offers[3 * l..3 * l + 3];
                if o[0] == 1 {
                    segment::open_group(o[1] as u32, o[2] as i32, n).map(Some)
                } else {
                    Err(CommError::Setup(format!(
                        "rank {l}, rank 0 of the new group, could not create its shared memory"
                    )))
                }
            }
        };
        let ok = [opened.is_ok() as u8];
        let mut oks = vec![0u8; w];
        self.all_gather(&ok, &mut oks)?;
        let Some((map, lay)) = opened? else {
            return Ok(None);
        };
        if let Some(&bad) = members.iter().find(|&&r| oks[r] == 0) {
            return Err(CommError::Setup(format!(
                "rank {bad} of this communicator could not map the new group's shared memory"
            )));
        }
        let mut c = ShmComm::attach(map, lay, new_rank, self.opts.clone())?;
        c.job = self.job.clone();
        let parent = self.world_ranks();
        let name = format!("{}/{}", self.group_name(), mine[0]);
        c.ctl(new_rank)
            .world_rank
            .store(parent[me] as u32 + 1, std::sync::atomic::Ordering::SeqCst);
        if new_rank == 0 {
            c.registered = super::flight::register_group(&c.job, &name, c.map.raw_fd(), n);
        }
        c.group = Some(Group {
            name: name.into(),
            world_ranks: members.iter().map(|&r| parent[r]).collect(),
        });
        Ok(Some(c))
    }
}
