//! A rank program for `tprun -n N [--trace DIR/] -- straggler CALLS [DELAY_MS] [STOP_AT]`: CALLS
//! all-reduces of 1024 floats; rank 1 sleeps DELAY_MS before every 5th one (a straggler on
//! purpose, for `tprun analyze`), and, if STOP_AT is given, the last rank stops itself (SIGSTOP)
//! after call STOP_AT (a hung rank, for the flight recorder).

use collectives::{CommExt, ReduceOp};

fn main() -> anyhow::Result<()> {
    let arg = |i: usize| std::env::args().nth(i).and_then(|s| s.parse::<u64>().ok());
    let calls = arg(1).unwrap_or(50);
    let delay = std::time::Duration::from_millis(arg(2).unwrap_or(0));
    let stop_at = arg(3);
    let mut comm = collectives::from_env()?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut buf = vec![1.0f32; 1024];
    for k in 1..=calls {
        if rank == 1 && k % 5 == 0 {
            std::thread::sleep(delay);
        }
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        buf.fill(1.0);
        if stop_at == Some(k) && rank == world - 1 {
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP)?;
        }
    }
    Ok(())
}
