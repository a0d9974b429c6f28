//! tprunGroupStart/End: a per-thread queue of checked operations, run at the outermost End.
//!
//! Per communicator the queued collectives run in the order issued, then every Send and Recv as
//! one `send_recv_raw` exchange (NCCL schedules a group's collectives before its point-to-point
//! transfers). Several communicators run on one scoped thread each, so one thread can drive
//! several ranks of a job, as with NCCL.

use std::cell::RefCell;

use crate::ops::Op;
use crate::{tprunComm, Fail, Res};

/// A communicator of a queued operation. Only dereferenced at the group's end, while the C caller
/// keeps it alive (tprunCommDestroy refuses one a group holds).
#[derive(Clone, Copy, PartialEq, Eq)]
struct CommRef(*const tprunComm);

// SAFETY: a tprunComm is Sync (its state is behind mutexes); the pointer is only shared with the
// scoped threads of `end`, which finish before it returns.
unsafe impl Send for CommRef {}

#[derive(Default)]
struct Group {
    depth: usize,
    ops: Vec<(CommRef, Op)>,
    /// The first call refused inside the group: the group's end then runs nothing.
    error: Option<Fail>,
}

thread_local! {
    static GROUP: RefCell<Group> = RefCell::new(Group::default());
}

pub(crate) fn start() {
    GROUP.with(|g| g.borrow_mut().depth += 1);
}

/// Queues `op` when this thread is inside a group; otherwise hands it back to run now.
pub(crate) fn enqueue(c: &tprunComm, op: Op) -> Option<Op> {
    GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.depth == 0 {
            return Some(op);
        }
        g.ops.push((CommRef(c), op));
        None
    })
}

/// Remembers the first failed call inside an open group (not the group calls themselves).
pub(crate) fn note_error(name: &str, f: &Fail) {
    if name == "tprunGroupEnd" || name == "tprunGroupStart" {
        return;
    }
    GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.depth > 0 && g.error.is_none() {
            g.error = Some(f.clone());
        }
    });
}

/// Whether this thread's open group holds operations on `c`.
pub(crate) fn holds(c: *const tprunComm) -> bool {
    GROUP.with(|g| g.borrow().ops.iter().any(|(r, _)| r.0 == c))
}

/// tprunGroupEnd.
pub(crate) fn end() -> Res {
    let taken = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.depth == 0 {
            return Err(Fail::usage(
                "tprunGroupEnd: no tprunGroupStart is open on this thread".into(),
            ));
        }
        g.depth -= 1;
        if g.depth > 0 {
            return Ok(None);
        }
        Ok(Some((std::mem::take(&mut g.ops), g.error.take())))
    })?;
    let Some((ops, error)) = taken else {
        return Ok(());
    };
    if let Some(f) = error {
        return Err(Fail {
            code: f.code,
            msg: format!(
                "tprunGroupEnd: ran none of the group's {} queued operations because a call in it failed: {}",
                ops.len(),
                f.msg
            ),
        });
    }
    // Per communicator, in order of first use: its collectives, then its transfers.
    let mut per: Vec<(CommRef, Vec<Op>, Vec<Op>)> = Vec::new();
    for (c, op) in ops {
        let i = match per.iter().position(|(r, ..)| *r == c) {
            Some(i) => i,
            None => {
                per.push((c, Vec::new(), Vec::new()));
                per.len() - 1
            }
        };
        if op.is_p2p() {
            per[i].2.push(op);
        } else {
            per[i].1.push(op);
        }
    }
    let run = |(c, colls, p2p): &(CommRef, Vec<Op>, Vec<Op>)| -> Res {
        // SAFETY: the communicator is alive until the group ends (see CommRef).
        let comm = unsafe { &*c.0 };
        comm.execute(colls, p2p)
            .inspect_err(|f| comm.set_last_error(&f.msg))
    };
    let results: Vec<Res> = if per.len() == 1 {
        vec![run(&per[0])]
    } else {
        std::thread::scope(|s| {
            let hs: Vec<_> = per.into_iter().map(|w| s.spawn(move || run(&w))).collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|p| {
                        Err(Fail::internal(format!(
                            "tprunGroupEnd: internal error (please report it): {}",
                            crate::panic_message(p.as_ref())
                        )))
                    })
                })
                .collect()
        })
    };
    results.into_iter().collect()
}
