//! The collectives from Rust, as a program any rank runs: `collectives::from_env()` gives this
//! rank's communicator (a world of one when started without tprun).
//!
//! ```sh
//! cargo build --example from_env
//! tprun -n 4 -- target/debug/examples/from_env
//! ```
//!
//! Splits the world into pairs, averages a gradient in each pair, passes a value around the
//! world's ring, and prints what it got (checked, so a wrong result exits non-zero).
//! tests/examples.rs runs it at 4 and 3 ranks; docs/collectives.md explains every call.

use collectives::{CommExt, Communicator, ReduceOp};

fn main() -> anyhow::Result<()> {
    let mut world = collectives::from_env()?;
    let (rank, n) = (world.rank(), world.world_size());
    let mut tp = world
        .split(Some((rank / 2) as u32), rank as i64)?
        .expect("every rank has a color");
    let mut grads = vec![rank as f32; 1024];
    tp.all_reduce(&mut grads, ReduceOp::Avg)?;
    let pair = (rank / 2 * 2) as f32;
    let want = if rank / 2 * 2 + 1 < n {
        pair + 0.5
    } else {
        pair
    };
    anyhow::ensure!(
        grads.iter().all(|&g| g == want),
        "rank {rank}: avg {}",
        grads[0]
    );
    let mut from_prev = [0i64; 4];
    world.send_recv(
        &[rank as i64; 4],
        (rank + 1) % n,
        &mut from_prev,
        (rank + n - 1) % n,
    )?;
    anyhow::ensure!(
        from_prev == [((rank + n - 1) % n) as i64; 4],
        "rank {rank}: {from_prev:?}"
    );
    println!(
        "rank {rank}: group {} of {}, avg {}, from rank {}",
        tp.rank(),
        tp.world_size(),
        grads[0],
        from_prev[0]
    );
    Ok(())
}
