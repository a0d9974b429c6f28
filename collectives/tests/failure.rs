//! Failure handling with in-process groups: deadlines, the launcher's abort flag, a peer that
//! left, ranks that call different collectives, bad arguments, and set-up errors. Every case
//! must end in an error that names the operation, its call number and the rank concerned.

mod common;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::Duration;

use collectives::shm::{CommOptions, JobSegment, SegmentOptions};
use collectives::{CommError, CommExt, Communicator, DType, ReduceOp, ShmComm};
use common::on_ranks;

fn opts(n: usize, timeout: Duration) -> CommOptions {
    let mut o = CommOptions::for_world(n);
    o.timeout = timeout;
    o
}

fn group(n: usize, timeout: Duration) -> Vec<ShmComm> {
    ShmComm::new_group_with(n, &SegmentOptions::default(), &opts(n, timeout)).unwrap()
}

/// Rank 2 stays attached but never calls the all-reduce: the others hit the deadline and name it.
#[test]
fn deadline_names_the_missing_rank() {
    let done = Barrier::new(3);
    let errs = on_ranks(group(3, Duration::from_millis(300)), |mut c| {
        let res = if c.rank() == 2 {
            None
        } else {
            let mut v = vec![1f32; 8];
            Some(c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err())
        };
        // Rank 2 keeps its communicator (alive, not gone) until the others have given up.
        done.wait();
        res
    });
    for (r, e) in errs.into_iter().take(2).enumerate() {
        let e = e.unwrap();
        assert!(
            matches!(
                e,
                CommError::Timeout {
                    op: "all_reduce",
                    seq: 1,
                    missing: 2,
                    ..
                }
            ),
            "rank {r}: {e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("all_reduce #1") && msg.contains("rank 2"),
            "{msg}"
        );
    }
}

/// The launcher's abort ends the survivors' wait long before the deadline, naming the failed
/// rank; the communicator then refuses further calls.
#[test]
fn abort_wakes_waiters() {
    let seg = JobSegment::create_with(3, &SegmentOptions::default()).unwrap();
    let comms = seg
        .communicators(&opts(3, Duration::from_secs(600)))
        .unwrap();
    let done = Barrier::new(3);
    let errs = on_ranks(comms, |mut c| {
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(100));
            seg.abort(2);
            done.wait();
            return None;
        }
        let mut v = vec![1f32; 4096];
        let e = c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
        let again = c.barrier().unwrap_err();
        done.wait();
        Some((e, again))
    });
    assert_eq!(seg.aborted(), Some(2));
    for (r, res) in errs.into_iter().take(2).enumerate() {
        let (e, again) = res.unwrap();
        assert!(
            matches!(
                e,
                CommError::Aborted {
                    op: "all_reduce",
                    seq: 1,
                    failed: 2,
                    missing: 2
                }
            ),
            "rank {r}: {e}"
        );
        assert!(e.to_string().contains("rank 2 failed"), "{e}");
        assert!(
            again.to_string().contains("cannot be used again"),
            "{again}"
        );
    }
}

/// Abort while the survivors are already asleep in a wait.
#[test]
fn abort_reaches_sleeping_waiters() {
    let seg = JobSegment::create_with(3, &SegmentOptions::default()).unwrap();
    let mut o = opts(3, Duration::from_secs(600));
    o.spin = Duration::ZERO;
    let comms = seg.communicators(&o).unwrap();
    let done = Barrier::new(3);
    let errs = on_ranks(comms, |mut c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(200));
            seg.abort(1);
            done.wait();
            return None;
        }
        let mut v = vec![0u8; 64];
        let e = c.broadcast_raw(&mut v, 1).unwrap_err();
        done.wait();
        Some(e)
    });
    for r in [0, 2] {
        let e = errs[r].as_ref().unwrap();
        assert!(
            matches!(
                e,
                CommError::Aborted {
                    op: "broadcast",
                    seq: 1,
                    failed: 1,
                    missing: 1
                }
            ),
            "rank {r}: {e}"
        );
        assert!(e.to_string().contains("rank 1 failed"), "{e}");
    }
}

/// A rank that dropped its communicator is reported as gone, not waited for until the deadline.
#[test]
fn peer_that_left_is_reported() {
    let errs = on_ranks(group(3, Duration::from_secs(600)), |mut c| {
        if c.rank() == 0 {
            drop(c);
            return None;
        }
        let mut v = vec![1f32; 16];
        Some(c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err())
    });
    for r in [1, 2] {
        let e = errs[r].as_ref().unwrap();
        assert!(
            matches!(
                e,
                CommError::PeerDied {
                    op: "all_reduce",
                    seq: 1,
                    missing: 0,
                    ..
                }
            ),
            "rank {r}: {e}"
        );
        assert!(e.to_string().contains("rank 0 left the job"), "{e}");
    }
}

/// Different sizes in the same all-reduce: both ranks say so.
#[test]
fn size_mismatch_is_detected() {
    let errs = on_ranks(group(2, Duration::from_secs(600)), |mut c| {
        let mut v = vec![1f32; 4 * (c.rank() + 1)];
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err()
    });
    for e in &errs {
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                CommError::Mismatch {
                    op: "all_reduce",
                    seq: 1,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("all_reduce(16 bytes float sum)")
                && msg.contains("all_reduce(32 bytes float sum)"),
            "{msg}"
        );
    }
}

/// Rank 0 broadcasts (and, as root, returns at once) while rank 1 all-gathers: rank 1 notices in
/// that call, rank 0 at its next one.
#[test]
fn different_collectives_are_detected() {
    let errs = on_ranks(group(2, Duration::from_secs(600)), |mut c| {
        let mut buf = vec![7u8; 16];
        if c.rank() == 0 {
            c.broadcast_raw(&mut buf, 0).unwrap();
            c.barrier().unwrap_err()
        } else {
            let mut out = vec![0u8; 32];
            c.all_gather_raw(&buf, &mut out, DType::F32).unwrap_err()
        }
    });
    assert!(
        matches!(
            errs[0],
            CommError::Mismatch {
                op: "barrier",
                seq: 2,
                ..
            }
        ),
        "{}",
        errs[0]
    );
    assert!(
        errs[0].to_string().contains("all_gather(16 bytes float)"),
        "{}",
        errs[0]
    );
    assert!(
        matches!(
            errs[1],
            CommError::Mismatch {
                op: "all_gather",
                seq: 1,
                ..
            }
        ),
        "{}",
        errs[1]
    );
    assert!(
        errs[1].to_string().contains("broadcast(16 bytes root 0)"),
        "{}",
        errs[1]
    );
}

/// A root runs ahead through small broadcasts (the ring lets it) while rank 1 answers the fifth
/// with a reduce, which waits for nobody: rank 0 still reports the mismatch at its next wait
/// for rank 1 (the barrier), not some calls later.
#[test]
fn a_root_running_ahead_still_catches_a_different_call() {
    let errs = on_ranks(group(2, Duration::from_secs(600)), |mut c| {
        let mut buf = vec![7u8; 16];
        for _ in 0..4 {
            c.broadcast_raw(&mut buf, 0).unwrap();
        }
        if c.rank() == 0 {
            c.broadcast_raw(&mut buf, 0).unwrap();
        } else {
            let _ = c.reduce_raw(&mut buf, DType::F32, ReduceOp::Sum, 0);
        }
        c.barrier().err()
    });
    let e = errs[0].as_ref().expect("rank 0's barrier must fail");
    assert!(
        matches!(
            e,
            CommError::Mismatch {
                op: "barrier",
                seq: 6,
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("broadcast(16 bytes root 0)")
            && msg.contains("reduce(16 bytes float sum root 0)"),
        "{msg}"
    );
}

/// Bad arguments are rejected before any communication, and the communicator stays usable.
#[test]
fn invalid_arguments() {
    on_ranks(group(2, Duration::from_secs(600)), |mut c| {
        let mut odd = vec![0u8; 6];
        let e = c
            .all_reduce_raw(&mut odd, DType::F32, ReduceOp::Sum)
            .unwrap_err();
        assert!(
            matches!(
                e,
                CommError::Invalid {
                    op: "all_reduce",
                    ..
                }
            ),
            "{e}"
        );
        let mut out = vec![0f32; 3];
        let e = c.all_gather(&[1f32, 2.0], &mut out).unwrap_err();
        assert!(
            e.to_string()
                .contains("expected world size 2 x input 8 = 16"),
            "{e}"
        );
        let e = c
            .reduce_scatter(&[1f32; 3], &mut [0f32; 1], ReduceOp::Sum)
            .unwrap_err();
        assert!(
            matches!(
                e,
                CommError::Invalid {
                    op: "reduce_scatter",
                    ..
                }
            ),
            "{e}"
        );
        let e = c.broadcast(&mut [0f32; 2], 2).unwrap_err();
        assert!(e.to_string().contains("root 2 out of range"), "{e}");
        // Zero-sized calls are no-ops; the communicator still works.
        c.all_reduce::<f32>(&mut [], ReduceOp::Sum).unwrap();
        c.all_gather::<f32>(&[], &mut []).unwrap();
        c.barrier().unwrap();
        let mut v = [c.rank() as f32 + 1.0];
        c.all_reduce(&mut v, ReduceOp::Max).unwrap();
        assert_eq!(v, [2.0]);
        // Integers reduce in their own type; a bitwise operator on floats is refused.
        let e = c
            .all_reduce_raw(&mut [0u8; 8], DType::F32, ReduceOp::BAnd)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("band is a bitwise reduction and float"),
            "{e}"
        );
        let mut w = [u32::MAX - c.rank() as u32];
        c.all_reduce(&mut w, ReduceOp::Sum).unwrap();
        assert_eq!(w, [u32::MAX.wrapping_add(u32::MAX - 1)]);
        let mut ids = [0u64; 2];
        c.all_gather(&[u64::MAX - c.rank() as u64], &mut ids)
            .unwrap();
        assert_eq!(ids, [u64::MAX, u64::MAX - 1]);
        let mut tok = [if c.rank() == 1 { 151_643u32 } else { 0 }];
        c.broadcast(&mut tok, 1).unwrap();
        assert_eq!(tok, [151_643]);
    });
}

#[test]
fn setup_errors_are_clear() {
    let e = JobSegment::create_with(
        2,
        &SegmentOptions {
            dir: Some(PathBuf::from("/nonexistent-tprun-dir")),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("/nonexistent-tprun-dir"), "{e}");
    let e = JobSegment::create_with(
        2,
        &SegmentOptions {
            slot_bytes: 1000,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("multiple of 4096"), "{e}");
    assert!(JobSegment::create_with(0, &SegmentOptions::default()).is_err());
}

/// The launcher's contract: the fd is inheritable and named in env(); a directory segment leaves
/// no name behind.
#[test]
fn segment_contract() {
    let seg = JobSegment::create_with(4, &SegmentOptions::default()).unwrap();
    let env = seg.env();
    let fd: i32 = env
        .iter()
        .find(|(k, _)| k == "TPRUN_SHM_FD")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert_eq!(fd, seg.fd().as_raw_fd());
    let bytes: usize = env
        .iter()
        .find(|(k, _)| k == "TPRUN_SHM_BYTES")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert_eq!(bytes, seg.total_bytes());
    // 4 x 2 x 1 MiB of data halves, 12 channels x 2 x 128 KiB, headers.
    assert!(bytes < 15 << 20, "4 ranks reserve {bytes} bytes");
    // SAFETY: F_GETFD on a valid fd has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    assert_eq!(flags & libc::FD_CLOEXEC, 0, "the ranks must inherit the fd");

    let dir = std::env::temp_dir().join(format!("tprun-segtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let seg = JobSegment::create_with(
        2,
        &SegmentOptions {
            dir: Some(dir.clone()),
            slot_bytes: 8192,
        },
    )
    .unwrap();
    let comms = seg.communicators(&CommOptions::for_world(2)).unwrap();
    let sums = on_ranks(comms, |mut c| {
        let mut v = vec![c.rank() as f32; 5000];
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        v[4999]
    });
    assert_eq!(sums, vec![1.0, 1.0]);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "segment left a name in {dir:?}"
    );
    drop(seg);
    std::fs::remove_dir(&dir).unwrap();
}
