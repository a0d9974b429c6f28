//! `perf --device cuda`: the collectives of [`collectives::cuda::CudaComm`] on device buffers.
//! The host buffers of each [`Case`] are filled as on the CPU, copied to the GPU before the
//! timed loop, and copied back for `--check`, so the check is the same bit-for-bit comparison.

use anyhow::Context;
use collectives::cuda::cudarc::driver::CudaSlice;
use collectives::cuda::CudaComm;
use collectives::CommError;

use super::{Case, PerfOp};

/// The CUDA communicator and the current case's device buffers.
pub(super) struct Device {
    pub comm: CudaComm,
    a: Option<CudaSlice<u8>>,
    b: Option<CudaSlice<u8>>,
}

impl Device {
    /// Sets up the CUDA transport (GPU `LOCAL_RANK % device count`).
    pub fn new() -> anyhow::Result<Device> {
        let comm = CudaComm::from_env()
            .context("perf --device cuda: cannot set up the CUDA collectives")?;
        Ok(Device {
            comm,
            a: None,
            b: None,
        })
    }

    /// Copies the case's input (and a zeroed output, where it has one) to the GPU.
    pub fn load(&mut self, case: &mut Case) -> anyhow::Result<()> {
        let stream = self.comm.stream().clone();
        let (a, b) = case.bufs.both();
        self.a = Some(stream.memcpy_stod(a)?);
        self.b = if b.is_empty() {
            None
        } else {
            Some(stream.alloc_zeros::<u8>(b.len())?)
        };
        stream.synchronize()?;
        Ok(())
    }

    /// One collective of the case on the device buffers (returns when the GPU is done).
    pub fn run(&mut self, case: &Case) -> collectives::Result<()> {
        let (dt, redop) = (case.s.dtype, case.redop);
        let a = self.a.as_mut().expect("load runs before run");
        match (case.op, self.b.as_mut()) {
            (PerfOp::AllReduce, _) => self.comm.all_reduce_dev(a, dt, redop),
            (PerfOp::Broadcast, _) => self.comm.broadcast_dev(a, case.s.root),
            (PerfOp::AllGather, Some(b)) => self.comm.all_gather_dev(a, b),
            (PerfOp::ReduceScatter, Some(b)) => self.comm.reduce_scatter_dev(a, b, dt, redop),
            // super::cuda_refuses turns the other ops away before a rank starts.
            (op, _) => Err(CommError::Invalid {
                op: op.name(),
                msg: "no device-buffer path in perf --device cuda".into(),
            }),
        }
    }

    /// Seconds of one device-to-device copy of `bytes` on this rank's stream, waited for as a
    /// collective is (the mean of `iters` after one warm-up): the floor of a collective of the
    /// same bytes.
    pub fn copy_seconds(&mut self, bytes: u64, iters: usize) -> anyhow::Result<f64> {
        let stream = self.comm.stream().clone();
        let n = (bytes as usize).max(1);
        let src = stream.alloc_zeros::<u8>(n)?;
        let mut dst = stream.alloc_zeros::<u8>(n)?;
        stream.memcpy_dtod(&src, &mut dst)?;
        stream.synchronize()?;
        let t0 = std::time::Instant::now();
        for _ in 0..iters.max(1) {
            stream.memcpy_dtod(&src, &mut dst)?;
            stream.synchronize()?;
        }
        Ok(t0.elapsed().as_secs_f64() / iters.max(1) as f64)
    }

    /// Copies the device buffers back into the case's host buffers (for `--check`).
    pub fn store(&mut self, case: &mut Case) -> anyhow::Result<()> {
        let stream = self.comm.stream().clone();
        let (a, b) = case.bufs.both();
        if let Some(d) = &self.a {
            stream.memcpy_dtoh(d, a)?;
        }
        if let Some(d) = &self.b {
            stream.memcpy_dtoh(d, b)?;
        }
        stream.synchronize()?;
        Ok(())
    }
}
