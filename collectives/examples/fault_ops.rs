//! A rank program for fault tests (tests/faults_p2p.rs): `tprun -n N -- fault_ops MODE DIR`
//! loops one operation forever and, once every rank is inside the loop, creates `DIR/ready.RANK`
//! so the test knows when to kill a rank. MODE:
//! - `send`: rank 0 sends 4 MiB messages (several shared-memory slots each) to rank 1, which
//!   receives them; other ranks idle;
//! - `all-to-all`: every rank runs an all-to-all of 1 MiB per peer;
//! - `group`: the ranks split into groups of 2 (0-1, 2-3, ...) and all-reduce 1 MiB in their group.
//!
//! An error is printed as `fault_ops: rank R: error: ...` and the program exits 1. SIGTERM is
//! ignored, so a surviving rank's report never races tprun's teardown (SIGKILL after the grace
//! period still ends it).

use collectives::{CommExt, Communicator, ReduceOp};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(dir)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: fault_ops send|all-to-all|group DIR");
        std::process::exit(2);
    };
    // SAFETY: sets a signal disposition to "ignore"; no handler code runs.
    unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    let mut comm = match collectives::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fault_ops: error: {e:#}");
            std::process::exit(1);
        }
    };
    let rank = comm.rank();
    if let Err(e) = run(&mut *comm, mode, std::path::Path::new(dir)) {
        // One write, so the line reaches tprun whole (eprintln! writes it in pieces).
        let line = format!("fault_ops: rank {rank}: error: {e:#}\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        std::process::exit(1);
    }
}

/// Loops `mode`'s operation; returns only on an error.
fn run(comm: &mut dyn Communicator, mode: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let (me, n) = (comm.rank(), comm.world_size());
    anyhow::ensure!(n >= 2, "fault_ops needs 2 or more ranks");
    let ready = |k: u64| -> anyhow::Result<()> {
        if k == 1 {
            std::fs::write(dir.join(format!("ready.{me}")), b"")?;
        }
        Ok(())
    };
    const MIB: usize = 1 << 20;
    match mode {
        "send" => {
            let mut buf = vec![me as u8; 4 * MIB];
            for k in 0.. {
                match me {
                    0 => comm.send(&buf, 1)?,
                    1 => comm.recv(&mut buf, 0)?,
                    _ => std::thread::sleep(std::time::Duration::from_millis(100)),
                }
                ready(k)?;
            }
        }
        "all-to-all" => {
            // 1 MiB to each peer.
            let input = vec![me as f32; n * MIB / 4];
            let mut output = vec![0f32; n * MIB / 4];
            for k in 0.. {
                comm.all_to_all(&input, &mut output)?;
                ready(k)?;
            }
        }
        "group" => {
            let mut g = comm
                .split(Some((me / 2) as u32), me as i64)?
                .ok_or_else(|| anyhow::anyhow!("split gave no group"))?;
            let mut buf = vec![1f32; MIB / 4];
            for k in 0.. {
                g.all_reduce(&mut buf, ReduceOp::Sum)?;
                buf.fill(1.0);
                ready(k)?;
            }
        }
        _ => anyhow::bail!("unknown mode {mode}: send, all-to-all or group"),
    }
    Ok(())
}
