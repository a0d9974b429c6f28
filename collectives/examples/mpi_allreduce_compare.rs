//! Side by side: the hierarchical all-reduce (`collectives::from_env`, feature `mpi`) against
//! Open MPI's own MPI_Allreduce (MPI_FLOAT, MPI_SUM) over the same ranks, 8 B to 32 MiB.
//! Run by tools/mpi_compare.sh (one command); rank 0 prints a markdown table.

use std::time::Instant;

use collectives::{CommExt, ReduceOp};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::CommunicatorCollectives;

/// Iterations for a size: enough to time small sizes, few for the large ones.
fn iters(bytes: usize) -> usize {
    ((64usize << 20) / bytes.max(1)).clamp(5, 200)
}

/// The slowest rank's mean seconds per call.
fn slowest(world: &SimpleCommunicator, secs: f64) -> f64 {
    let mut max = 0.0f64;
    world.all_reduce_into(&secs, &mut max, SystemOperation::max());
    max
}

fn main() -> anyhow::Result<()> {
    // The hierarchical communicator starts MPI; MPI_COMM_WORLD is then used directly.
    let mut comm = collectives::from_env()?;
    let world = SimpleCommunicator::world();
    let h = comm.hierarchy();
    if comm.rank() == 0 {
        println!("{} ranks, hierarchy {h:?}", comm.world_size());
        println!("| bytes | hierarchical (us) | MPI_Allreduce (us) | ratio |");
        println!("| ---: | ---: | ---: | ---: |");
    }
    let mut bytes = 8;
    while bytes <= 32 << 20 {
        let n = bytes / 4;
        let mut buf = vec![1.0f32; n];
        let mut out = vec![0.0f32; n];
        let it = iters(bytes);
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..it {
            comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        }
        let ours = slowest(&world, t.elapsed().as_secs_f64() / it as f64);
        world.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum());
        world.barrier();
        let t = Instant::now();
        for _ in 0..it {
            world.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum());
        }
        let theirs = slowest(&world, t.elapsed().as_secs_f64() / it as f64);
        if comm.rank() == 0 {
            let (a, b) = (ours * 1e6, theirs * 1e6);
            println!("| {bytes} | {a:.1} | {b:.1} | {:.2} |", a / b);
        }
        bytes *= 4;
    }
    drop(comm);
    collectives::end_job(true);
    Ok(())
}
