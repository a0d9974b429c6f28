//! What the shared-memory transport adds for groups and point-to-point, beyond the per-op
//! results (tests/surface.rs): messages larger than a channel, rings and all-to-alls that would
//! deadlock as blocking calls, groups running at once, nested groups, opting out, the rooted
//! ops' two algorithms, and errors that name the group.

mod common;

use collectives::shm::{CommOptions, SegmentOptions};
use collectives::{CommExt, Communicator, P2p, ReduceOp, ShmComm};
use common::*;

fn small(n: usize) -> Vec<ShmComm> {
    let seg = SegmentOptions {
        dir: None,
        slot_bytes: 4096,
    };
    let mut opts = CommOptions::for_world(n);
    opts.one_shot_max = 1024;
    ShmComm::new_group_with(n, &seg, &opts).unwrap()
}

fn pattern(rank: usize, tag: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| splitmix((rank * 1_000_003 + tag * 7919 + i) as u64) as u8)
        .collect()
}

#[test]
fn a_ring_of_large_messages_does_not_deadlock_and_arrives_whole() {
    for n in [2, 3, 5] {
        // 4096-byte slots: a channel half is 4096 / (n - 1) rounded to a page = 4096, so 50 KB
        // goes as 13 chunks, and both directions are in flight at once.
        let len = 50_000;
        on_ranks(small(n), |mut c| {
            let (me, w) = (c.rank(), c.world_size());
            let send = pattern(me, 1, len);
            let mut recv = vec![0u8; len];
            let mut ops = [
                P2p::Send {
                    buf: &send,
                    peer: (me + 1) % w,
                },
                P2p::Recv {
                    buf: &mut recv,
                    peer: (me + w - 1) % w,
                },
            ];
            c.send_recv_raw(&mut ops, collectives::DType::U8).unwrap();
            assert_eq!(recv, pattern((me + w - 1) % w, 1, len), "rank {me} of {w}");
        });
    }
}

/// Messages from `direct_min` bytes are written straight into the receiver's buffer (when the
/// kernel allows; the halves otherwise): mixed with chunked ones they still arrive in order,
/// and a size mismatch on either side of the threshold is still an error naming both sizes.
#[test]
fn single_copy_messages_keep_their_order_and_size_checks() {
    for (send_len, recv_len) in [(8192, 100), (100, 8192), (8192, 8000)] {
        let mut opts = CommOptions::for_world(2);
        opts.direct_min = 4096;
        let comms = ShmComm::new_group_with(2, &SegmentOptions::default(), &opts).unwrap();
        on_ranks(comms, |mut c| {
            let me = c.rank();
            for (tag, len) in [
                (0, 4096),
                (1, 10),
                (2, 1 << 20),
                (3, 4095),
                (4, 5000),
                (5, 0),
            ] {
                if me == 0 {
                    c.send(&pattern(0, tag, len), 1).unwrap();
                } else {
                    let mut got = vec![0u8; len];
                    c.recv(&mut got, 0).unwrap();
                    assert_eq!(got, pattern(0, tag, len), "message {tag}");
                }
            }
            if me == 0 {
                // The sender cannot tell; the receiver reports it (and then leaves).
                let _ = c.send(&vec![1u8; send_len], 1);
            } else {
                let e = c.recv(&mut vec![0u8; recv_len], 0).unwrap_err().to_string();
                assert!(
                    e.contains(&format!("sends {send_len} bytes"))
                        && e.contains(&format!("receives {recv_len} bytes")),
                    "{e}"
                );
            }
        });
    }
}

#[test]
fn messages_between_a_pair_arrive_in_order_and_sizes_are_checked() {
    on_ranks(small(2), |mut c| {
        let me = c.rank();
        for (tag, len) in [(0, 0), (1, 1), (2, 4096), (3, 4097), (4, 20_000)] {
            if me == 0 {
                c.send(&pattern(0, tag, len), 1).unwrap();
            } else {
                let mut got = vec![0u8; len];
                c.recv(&mut got, 0).unwrap();
                assert_eq!(got, pattern(0, tag, len), "message {tag}");
            }
        }
        // A receive of the wrong size is an error naming both sizes.
        if me == 0 {
            c.send(&[1u8; 8], 1).unwrap();
        } else {
            let e = c.recv(&mut [0u8; 4], 0).unwrap_err().to_string();
            assert!(
                e.contains("sends 8 bytes") && e.contains("receives 4 bytes"),
                "{e}"
            );
        }
    });
}

#[test]
fn groups_run_at_once_nest_and_opt_out() {
    on_ranks(small(5), |mut c| {
        let me = c.rank();
        // Rank 4 opts out; the others form {0, 2} and {1, 3}, numbered by descending key.
        let color = (me < 4).then_some((me % 2) as u32);
        let g = c.split(color, -(me as i64)).unwrap();
        let Some(mut g) = g else {
            assert_eq!(me, 4);
            // The world still works while the groups run.
            c.barrier().unwrap();
            return;
        };
        assert_eq!(g.world_size(), 2);
        assert_eq!(g.rank(), if me >= 2 { 0 } else { 1 });
        // Both groups all-reduce a large buffer at the same time, several times.
        for round in 0..5 {
            let mut v: Vec<f32> = (0..10_000)
                .map(|i| (me * 10_000 + i + round) as f32)
                .collect();
            g.all_reduce(&mut v, ReduceOp::Sum).unwrap();
            let other = if me >= 2 { me - 2 } else { me + 2 };
            for (i, x) in v.iter().enumerate() {
                assert_eq!(
                    *x,
                    (me * 10_000 + i + round) as f32 + (other * 10_000 + i + round) as f32
                );
            }
        }
        // A group of the group: each is alone.
        let mut solo = g.split(Some(g.rank() as u32), 0).unwrap().unwrap();
        assert_eq!((solo.rank(), solo.world_size()), (0, 1));
        let mut one = [me as u64];
        solo.all_reduce(&mut one, ReduceOp::Sum).unwrap();
        assert_eq!(one, [me as u64]);
        drop(solo);
        drop(g);
        c.barrier().unwrap();
    });
}

#[test]
fn rooted_ops_take_both_algorithms() {
    // one_shot_max is 1 KiB here: 64 elements go one-shot, 5000 the two-step way, over chunks.
    for n in [2, 3, 4] {
        on_ranks(small(n), |mut c| {
            let (me, w) = (c.rank(), c.world_size());
            for count in [64usize, 5000] {
                for root in 0..w {
                    let mut v: Vec<i64> = (0..count).map(|i| (me * 31 + i) as i64).collect();
                    let before = v.clone();
                    c.reduce(&mut v, ReduceOp::Sum, root).unwrap();
                    if me == root {
                        for (i, x) in v.iter().enumerate() {
                            let want: i64 = (0..w).map(|r| (r * 31 + i) as i64).sum();
                            assert_eq!(*x, want, "reduce n={w} count={count} root={root} i={i}");
                        }
                    } else {
                        assert_eq!(v, before, "a non-root's buffer is left as it was");
                    }
                    let input: Vec<u32> = (0..count).map(|i| (me * count + i) as u32).collect();
                    let mut all = vec![0u32; if me == root { count * w } else { 0 }];
                    c.gather(&input, &mut all, root).unwrap();
                    if me == root {
                        assert!(all.iter().enumerate().all(|(i, &x)| x == i as u32));
                    }
                    let src: Vec<u32> = if me == root {
                        (0..(count * w) as u32).collect()
                    } else {
                        Vec::new()
                    };
                    let mut part = vec![0u32; count];
                    c.scatter(&src, &mut part, root).unwrap();
                    assert!(part
                        .iter()
                        .enumerate()
                        .all(|(i, &x)| x == (me * count + i) as u32));
                }
                let input: Vec<i32> = (0..count * w)
                    .map(|i| (me * 100 + i / count) as i32)
                    .collect();
                let mut out = vec![0i32; count * w];
                c.all_to_all(&input, &mut out).unwrap();
                for p in 0..w {
                    assert!(out[p * count..(p + 1) * count]
                        .iter()
                        .all(|&x| x == (p * 100 + me) as i32));
                }
            }
        });
    }
}

/// Small rooted calls go through the ring, where a root may run RING - 1 (7) calls ahead of its readers:
/// a long run of them, each with its own values, alone and mixed with calls on the halves (a
/// large broadcast every 37th call), must deliver every call's own data, whoever the root.
#[test]
fn small_rooted_calls_running_ahead_deliver_every_call() {
    for n in [2, 3, 5] {
        let comms = ShmComm::new_group(n).unwrap();
        on_ranks(comms, |mut c| {
            let (me, w) = (c.rank(), c.world_size());
            // A root that waits for nobody: readers that lag (a pause every 8 calls) must still
            // find each call's data, not one the root wrote RING calls later into the same entry.
            for i in 0..200usize {
                if me != 0 && i % 8 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(300));
                }
                let mut b = vec![(i * 7 + 1) as u32 * (me == 0) as u32; 1 + i % 5];
                c.broadcast(&mut b, 0).unwrap();
                assert!(
                    b.iter().all(|&x| x == (i * 7 + 1) as u32),
                    "broadcast run call {i}"
                );
                let src: Vec<u32> = (0..2 * w).map(|k| (i * 100 + k) as u32).collect();
                let mut part = [0u32; 2];
                c.scatter(if me == 0 { &src[..] } else { &[] }, &mut part, 0)
                    .unwrap();
                assert_eq!(part, [src[2 * me], src[2 * me + 1]], "scatter run call {i}");
            }
            for i in 0..400usize {
                let root = (i / 50) % w;
                let val = |r: usize, k: usize| (i * 1000 + r * 10 + k) as u32;
                let len = if i % 37 == 0 { 100_000 } else { 1 + i % 60 };
                let mut b: Vec<u32> = (0..len).map(|k| val(me, k) * (me == root) as u32).collect();
                c.broadcast(&mut b, root).unwrap();
                assert!(
                    b.iter().enumerate().all(|(k, &x)| x == val(root, k)),
                    "broadcast call {i}"
                );
                let count = 1 + i % 7;
                let src: Vec<u32> = (0..count * w).map(|k| val(me, k)).collect();
                let mut part = vec![0u32; count];
                c.scatter(if me == root { &src[..] } else { &[] }, &mut part, root)
                    .unwrap();
                assert!(
                    part.iter()
                        .enumerate()
                        .all(|(k, &x)| x == val(root, me * count + k)),
                    "scatter call {i}"
                );
                let mut r: Vec<u32> = (0..count).map(|k| val(me, k)).collect();
                c.reduce(&mut r, ReduceOp::Sum, root).unwrap();
                if me == root {
                    for (k, &x) in r.iter().enumerate() {
                        let want = (0..w).fold(0u32, |a, q| a.wrapping_add(val(q, k)));
                        assert_eq!(x, want, "reduce call {i} element {k}");
                    }
                }
                let mut all = vec![0u32; if me == root { count * w } else { 0 }];
                c.gather(&r[..count], &mut all, root).unwrap();
            }
        });
    }
}

#[test]
fn a_group_error_names_the_group_and_the_world_rank() {
    on_ranks(small(3), |mut c| {
        let me = c.rank();
        let color = (me != 0).then_some(0);
        let g = c.split(color, 0).unwrap();
        if let Some(mut g) = g {
            if me == 2 {
                // World rank 2 leaves the group; world rank 1 then waits for it in vain.
                drop(g);
            } else {
                let e = g.barrier().unwrap_err().to_string();
                assert!(e.contains("rank 2 left the job"), "{e}");
                assert!(e.contains("in group world/0 (world ranks [1, 2])"), "{e}");
            }
        }
    });
}

/// A group's rank 0 registers it in the job segment, so the launcher can read the group's own
/// flight recorder (its call numbers, its members as world ranks); dropping the group frees it.
#[test]
fn the_launcher_sees_each_live_groups_flight_recorder() {
    let seg = collectives::shm::JobSegment::create(4).unwrap();
    let comms = seg.communicators(&CommOptions::for_world(4)).unwrap();
    let barrier = std::sync::Barrier::new(4);
    let seen = std::sync::Mutex::new(Vec::new());
    on_ranks(comms, |mut c| {
        let me = c.rank();
        // Groups {1, 3} (ordered 3, 1 by key) and {0, 2}; rank 1's group makes 2 calls.
        let mut g = c
            .split(Some((me % 2) as u32), -(me as i64))
            .unwrap()
            .unwrap();
        let calls = if me % 2 == 1 { 2 } else { 1 };
        for _ in 0..calls {
            g.all_reduce(&mut [1.0f32; 4], ReduceOp::Sum).unwrap();
        }
        barrier.wait();
        if me == 0 {
            *seen.lock().unwrap() = seg.group_flight_records();
        }
        barrier.wait();
        drop(g);
        barrier.wait();
        if me == 0 {
            assert!(seg.group_flight_records().is_empty());
        }
    });
    let mut groups = seen.into_inner().unwrap();
    groups.sort_by(|a, b| a.name.cmp(&b.name));
    let summary: Vec<(String, Vec<usize>, Vec<u64>)> = groups
        .iter()
        .map(|g| {
            let entered = g.ranks.iter().map(|r| r.entered).collect();
            (g.name.clone(), g.world_ranks.clone(), entered)
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("world/0".to_string(), vec![2, 0], vec![1, 1]),
            ("world/1".to_string(), vec![3, 1], vec![2, 2]),
        ]
    );
    let last = groups[1].ranks[0].last().unwrap();
    assert_eq!((last.op, last.bytes), ("all_reduce", 16));
}
