//! The CUDA transport (feature `cuda`): [`CudaComm`], a [`Communicator`] whose collectives run
//! comm.cu's kernels over every rank's device slab, mapped into each peer with CUDA IPC.
//!
//! At start every rank allocates one slab (cuMemAlloc, zeroed before its handle is exported),
//! publishes a [`cuda_plan::HandleRecord`](crate::cuda_plan::HandleRecord) through the job's shm
//! communicator, opens every peer's slab once, and proves the mapping works by reading back a
//! pattern each peer wrote. Any failure anywhere makes the whole job use the host-staged fallback
//! (device → host, the shm transport, host → device; the same rank-order bits), which rank 0
//! reports on stderr. Device buffers go through the `*_dev` methods; the trait's host-buffer
//! methods are staged through a device buffer so they run the same kernels.
//!
//! Nothing here has run on a GPU yet; the host-side logic is unit-tested in
//! [`crate::cuda_plan`].

mod ops;
mod setup;

use std::time::Duration;

pub use cudarc;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::cuda_plan::{self as plan, Ran, Seq, Transport};
use crate::{CommError, CommStats, Communicator, DType, OpKind, P2p, ReduceOp, Result};

/// A driver error as this crate's error, naming what failed.
fn drv(what: &str, e: cudarc::driver::DriverError) -> CommError {
    CommError::Setup(format!("{what}: CUDA {e:?}"))
}

/// One rank's CUDA collectives. Dropping it closes every peer mapping and frees the slab.
pub struct CudaComm {
    /// The shm communicator: the handle exchange, the probe's barriers, the fallback.
    host: Box<dyn Communicator>,
    dev: setup::Device,
    transport: Transport,
    seq: Seq,
    /// Public operations so far (the error's `#n`).
    ops: u64,
    oneshot_max: u64,
    timeout: Duration,
    /// Device copy of host buffers given to the trait's methods (IPC transport).
    staging: Option<CudaSlice<u8>>,
    /// Every public call's totals, device and host-staged alike (the set-up exchange is not one).
    stats: CommStats,
    /// The first error that left the peers' flags or this rank's error word in an unknown state:
    /// every later call is refused with it.
    failed: Option<String>,
}

impl CudaComm {
    /// This rank's communicator from the environment tprun sets: the shm communicator, then the
    /// GPU `LOCAL_RANK % device count`, then the slab exchange and probe (collective: every rank
    /// of the job must call it).
    pub fn from_env() -> anyhow::Result<CudaComm> {
        let count = kernels::cuda::cuda_available().map_err(|e| anyhow::anyhow!("{e}"))?;
        let host = crate::from_env()?;
        let local = crate::identity::from_env()
            .map_err(|e| anyhow::anyhow!(e))?
            .and_then(|id| id.local_rank)
            .unwrap_or(host.rank());
        Ok(CudaComm::new(host, plan::device_ordinal(local, count))?)
    }

    /// Sets up the transport on GPU `ordinal` over the already-connected `host` communicator.
    pub fn new(mut host: Box<dyn Communicator>, ordinal: usize) -> Result<CudaComm> {
        let world = host.world_size();
        let timeout = crate::shm::CommOptions::from_env(world)?.timeout;
        let data = crate::env::var("TPRUN_CUDA_SLAB_BYTES")
            .map_err(CommError::Setup)?
            .map(|v| crate::env::parse_bytes("TPRUN_CUDA_SLAB_BYTES", &v, 4096..=1 << 34))
            .transpose()
            .map_err(CommError::Setup)?
            .unwrap_or(plan::DEFAULT_DATA_BYTES);
        if host.rank() == 0 && kernels::cuda::emulated() {
            eprintln!(
                "tprun: the CUDA device is EMULATED (TPRUN_CUDA_EMULATE=1): the kernels and \
                 driver calls run on host threads; no GPU is used"
            );
        }
        let mut dev = setup::open_device(ordinal, world as u32, data)?;
        let transport = setup::connect(host.as_mut(), &mut dev)?;
        if let (0, Transport::HostStaged { reason }) = (host.rank(), &transport) {
            eprintln!("tprun: CUDA collectives staged through host memory: {reason}");
        }
        Ok(CudaComm {
            host,
            dev,
            transport,
            seq: Seq::default(),
            ops: 0,
            oneshot_max: plan::oneshot_max_from_env().map_err(CommError::Setup)?,
            timeout,
            staging: None,
            stats: CommStats::default(),
            failed: None,
        })
    }

    /// How this job's ranks move data (decided once at start, the same on every rank).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }
    /// The context of this rank's GPU.
    pub fn context(&self) -> &std::sync::Arc<CudaContext> {
        &self.dev.ctx
    }
    /// The stream every collective runs on; device buffers passed in should be written on it
    /// (each collective returns after the stream has finished it).
    pub fn stream(&self) -> &std::sync::Arc<CudaStream> {
        &self.dev.stream
    }

    fn check_buf<T>(&self, op: &'static str, buf: &CudaSlice<T>) -> Result<()> {
        if buf.ordinal() != self.dev.ctx.ordinal() {
            return Err(CommError::Invalid {
                op,
                msg: format!(
                    "buffer on GPU {} but the communicator on GPU {}",
                    buf.ordinal(),
                    self.dev.ctx.ordinal()
                ),
            });
        }
        Ok(())
    }

    /// In-place all-reduce of a device buffer holding `dtype` elements.
    pub fn all_reduce_dev<T>(
        &mut self,
        buf: &mut CudaSlice<T>,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.check_buf("all_reduce", buf)?;
        let stream = self.dev.stream.clone();
        let bytes = buf.num_bytes();
        let (ptr, _sync) = buf.device_ptr_mut(&stream);
        self.run_op(OpKind::AllReduce, bytes, Some(dtype), |c| {
            // SAFETY: `ptr` addresses `bytes` bytes of `buf`, borrowed mutably for the whole
            // call, on this communicator's GPU (checked above).
            unsafe { c.all_reduce_at(ptr, bytes, dtype, op) }
        })
    }

    /// `output` = every rank's `input` in rank order (`output` is world times `input`).
    pub fn all_gather_dev<T>(
        &mut self,
        input: &CudaSlice<T>,
        output: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.check_buf("all_gather", input)?;
        self.check_buf("all_gather", output)?;
        let stream = self.dev.stream.clone();
        let (n_in, n_out) = (input.num_bytes(), output.num_bytes());
        let (src, _a) = input.device_ptr(&stream);
        let (dst, _b) = output.device_ptr_mut(&stream);
        self.run_op(OpKind::AllGather, n_out, Some(DType::U8), |c| {
            // SAFETY: both pointers address their slices' bytes, borrowed for the call.
            unsafe { c.all_gather_at(src, n_in, dst, n_out) }
        })
    }

    /// `output` = this rank's chunk of the reduction of every rank's `input`.
    pub fn reduce_scatter_dev<T>(
        &mut self,
        input: &CudaSlice<T>,
        output: &mut CudaSlice<T>,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.check_buf("reduce_scatter", input)?;
        self.check_buf("reduce_scatter", output)?;
        let stream = self.dev.stream.clone();
        let (n_in, n_out) = (input.num_bytes(), output.num_bytes());
        let (src, _a) = input.device_ptr(&stream);
        let (dst, _b) = output.device_ptr_mut(&stream);
        self.run_op(OpKind::ReduceScatter, n_in, Some(dtype), |c| {
            // SAFETY: both pointers address their slices' bytes, borrowed for the call.
            unsafe { c.reduce_scatter_at(src, n_in, dst, n_out, dtype, op) }
        })
    }

    /// Copies `root`'s device buffer into every other rank's.
    pub fn broadcast_dev<T>(&mut self, buf: &mut CudaSlice<T>, root: usize) -> Result<()> {
        self.check_buf("broadcast", buf)?;
        let stream = self.dev.stream.clone();
        let bytes = buf.num_bytes();
        let (ptr, _sync) = buf.device_ptr_mut(&stream);
        self.run_op(OpKind::Broadcast, bytes, None, |c| {
            // SAFETY: `ptr` addresses `bytes` bytes of `buf`, borrowed mutably for the call.
            unsafe { c.broadcast_at(ptr, bytes, root) }
        })
    }

    /// A device buffer of at least `bytes` for staging host buffers; its address.
    fn staging(&mut self, bytes: usize) -> Result<u64> {
        if self.staging.as_ref().is_none_or(|s| s.len() < bytes) {
            self.staging = None;
            let s = self
                .dev
                .stream
                .alloc_zeros::<u8>(bytes.max(1))
                .map_err(|e| drv("staging buffer", e))?;
            self.staging = Some(s);
        }
        let s = self.staging.as_ref().expect("allocated above");
        Ok(s.device_ptr(&self.dev.stream).0)
    }

    fn ipc(&self) -> bool {
        self.transport == Transport::Ipc
    }

    /// Runs one public call `f` and counts it: the statistics always, the trace where it ran on
    /// the device (the shm communicator traces what it ran itself). Failed calls are not
    /// counted, as on the shm transport.
    fn run_op(
        &mut self,
        kind: OpKind,
        bytes: usize,
        dtype: Option<DType>,
        f: impl FnOnce(&mut CudaComm) -> Result<Ran>,
    ) -> Result<()> {
        if let Some(first) = &self.failed {
            return Err(CommError::Invalid {
                op: kind.name(),
                msg: format!("this communicator failed earlier ({first}) and cannot be used again"),
            });
        }
        let t0 = crate::trace::now_us();
        let ran = match f(self) {
            Ok(ran) => ran,
            // Bad arguments are caught before any launch, so the communicator stays usable.
            Err(e @ CommError::Invalid { .. }) => return Err(e),
            // With peers, the op number has moved on for them; a world of one has no flags to
            // fall out of step, so it stays usable.
            Err(e) => {
                if self.world_size() > 1 {
                    self.failed = Some(e.to_string());
                }
                return Err(e);
            }
        };
        let t1 = crate::trace::now_us();
        self.stats.record(kind, bytes, (t1 - t0) / 1e6, 0.0);
        if let (Ran::Device { algorithm, steps }, true) = (ran, crate::trace::enabled()) {
            let ev = crate::trace::CommEvent {
                op: kind,
                bytes: bytes as u64,
                dtype,
                algorithm,
                steps,
                wait_s: 0.0,
                group: None,
            };
            crate::trace::record_comm(t0, ev);
        }
        Ok(())
    }
}

impl Drop for CudaComm {
    /// Waits for this rank's work before the fields' drops close the peer mappings and free the
    /// slab. No barrier is needed: every comm.cu kernel ends with a DONE phase, so once this
    /// rank's last operation finished, every peer had stopped reading and signalling into its
    /// slab (and a rank leaving on an error must not wait for peers that wait for it).
    fn drop(&mut self) {
        let _ = self.dev.stream.synchronize();
    }
}

impl Communicator for CudaComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }

    fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.run_op(OpKind::AllReduce, buf.len(), Some(dtype), |c| {
            if !c.ipc() {
                return c.host.all_reduce_raw(buf, dtype, op).map(|_| Ran::Host);
            }
            let d = c.staging(buf.len())?;
            // SAFETY: the staging buffer holds at least the input bytes at its start.
            unsafe { c.upload(d, buf)? };
            // SAFETY: `d` is the staging buffer, at least `buf.len()` bytes.
            let ran = unsafe { c.all_reduce_at(d, buf.len(), dtype, op)? };
            // SAFETY: the staging buffer holds the result at this address.
            unsafe { c.download(buf, d)? };
            Ok(ran)
        })
    }

    fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        self.run_op(OpKind::AllGather, output.len(), Some(dtype), |c| {
            if !c.ipc() {
                return c
                    .host
                    .all_gather_raw(input, output, dtype)
                    .map(|_| Ran::Host);
            }
            let d = c.staging(input.len() + output.len())?;
            let out = d + input.len() as u64;
            // SAFETY: the staging buffer holds at least the input bytes at its start.
            unsafe { c.upload(d, input)? };
            // SAFETY: the staging buffer holds the input then the output.
            let ran = unsafe { c.all_gather_at(d, input.len(), out, output.len())? };
            // SAFETY: the staging buffer holds the result at this address.
            unsafe { c.download(output, out)? };
            Ok(ran)
        })
    }

    fn reduce_scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.run_op(OpKind::ReduceScatter, input.len(), Some(dtype), |c| {
            if !c.ipc() {
                let r = c.host.reduce_scatter_raw(input, output, dtype, op);
                return r.map(|_| Ran::Host);
            }
            let d = c.staging(input.len() + output.len())?;
            let out = d + input.len() as u64;
            // SAFETY: the staging buffer holds at least the input bytes at its start.
            unsafe { c.upload(d, input)? };
            // SAFETY: the staging buffer holds the input then the output.
            let ran = unsafe { c.reduce_scatter_at(d, input.len(), out, output.len(), dtype, op)? };
            // SAFETY: the staging buffer holds the result at this address.
            unsafe { c.download(output, out)? };
            Ok(ran)
        })
    }

    fn broadcast_raw(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.run_op(OpKind::Broadcast, buf.len(), None, |c| {
            if !c.ipc() {
                return c.host.broadcast_raw(buf, root).map(|_| Ran::Host);
            }
            let d = c.staging(buf.len())?;
            // SAFETY: the staging buffer holds at least the input bytes at its start.
            unsafe { c.upload(d, buf)? };
            // SAFETY: `d` is the staging buffer, at least `buf.len()` bytes.
            let ran = unsafe { c.broadcast_at(d, buf.len(), root)? };
            // SAFETY: the staging buffer holds the result at this address.
            unsafe { c.download(buf, d)? };
            Ok(ran)
        })
    }

    fn barrier(&mut self) -> Result<()> {
        self.run_op(OpKind::Barrier, 0, None, |c| {
            c.ops += 1;
            if !c.ipc() || c.world_size() == 1 {
                return c.host.barrier().map(|_| Ran::Host);
            }
            let seq = c.seq.take();
            c.launch_args("barrier", seq, 1, &[])?;
            c.finish("barrier")?;
            Ok(Ran::Device {
                algorithm: "flags",
                steps: 1,
            })
        })
    }

    // The operations below run host-staged: the buffers are host memory, moved by the shm
    // communicator underneath (recorded in this communicator's statistics all the same).
    fn reduce_raw(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.run_op(OpKind::Reduce, buf.len(), Some(dtype), |c| {
            c.host.reduce_raw(buf, dtype, op, root).map(|_| Ran::Host)
        })
    }
    fn gather_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        let n = input.len() * self.world_size();
        self.run_op(OpKind::Gather, n, Some(dtype), |c| {
            c.host
                .gather_raw(input, output, dtype, root)
                .map(|_| Ran::Host)
        })
    }
    fn scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        let n = output.len() * self.world_size();
        self.run_op(OpKind::Scatter, n, Some(dtype), |c| {
            c.host
                .scatter_raw(input, output, dtype, root)
                .map(|_| Ran::Host)
        })
    }
    fn all_to_all_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        self.run_op(OpKind::AllToAll, input.len(), Some(dtype), |c| {
            c.host
                .all_to_all_raw(input, output, dtype)
                .map(|_| Ran::Host)
        })
    }
    fn all_to_allv_raw(
        &mut self,
        input: &[u8],
        send_counts: &[usize],
        output: &mut [u8],
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<()> {
        self.run_op(OpKind::AllToAll, input.len(), Some(dtype), |c| {
            c.host
                .all_to_allv_raw(input, send_counts, output, recv_counts, dtype)
                .map(|_| Ran::Host)
        })
    }
    fn send_recv_raw(&mut self, ops: &mut [P2p<'_>], dtype: DType) -> Result<()> {
        let n = ops.iter().map(|o| o.len()).sum();
        self.run_op(OpKind::SendRecv, n, Some(dtype), |c| {
            c.host.send_recv_raw(ops, dtype).map(|_| Ran::Host)
        })
    }
    /// The group's communicator stages through the host (host buffers; device buffers go through
    /// the world's device entry points).
    fn split(&mut self, color: Option<u32>, key: i64) -> Result<Option<Box<dyn Communicator>>> {
        self.host.split(color, key)
    }

    /// Every call made on this communicator, on the device or staged through the host (the
    /// set-up exchange over the shm communicator is left out).
    fn stats(&self) -> CommStats {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CommExt;

    /// Whether a GPU is here; logs why the test does not run when not (kernels::skips).
    fn gpu(test: &str) -> bool {
        kernels::cuda::gpu_or_skip(&format!("collectives::cuda {test}"))
    }

    /// A world of one on GPU 0: every collective through host buffers and device buffers.
    #[test]
    fn a_world_of_one_runs_every_collective_on_the_gpu() {
        if !gpu("a_world_of_one_runs_every_collective_on_the_gpu") {
            return;
        }
        let mut c = CudaComm::new(Box::new(crate::local::SoloComm), 0).unwrap();
        let mut v = vec![1.5f32, -2.0, 3.25];
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        assert_eq!(v, [1.5, -2.0, 3.25]);
        let mut out = vec![0f32; 3];
        c.all_gather(&v, &mut out).unwrap();
        assert_eq!(out, v);
        let mut d = c.stream().memcpy_stod(&v).unwrap();
        c.all_reduce_dev(&mut d, DType::F32, ReduceOp::Max).unwrap();
        c.broadcast_dev(&mut d, 0).unwrap();
        assert_eq!(c.stream().memcpy_dtov(&d).unwrap(), v);
        c.barrier().unwrap();
    }

    /// Two ranks as threads of one process: CUDA IPC cannot open a slab of the same process, so
    /// the probe fails and both pick the host-staged transport, which still gives the shm bits.
    #[test]
    fn ranks_that_cannot_map_each_other_fall_back_to_host_staging() {
        if !gpu("ranks_that_cannot_map_each_other_fall_back_to_host_staging") {
            return;
        }
        let got: Vec<Vec<f32>> = std::thread::scope(|s| {
            let ranks: Vec<_> = crate::thread::ThreadComm::world(2)
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let r = comm.rank();
                        let mut c = CudaComm::new(Box::new(comm), 0).unwrap();
                        assert!(matches!(c.transport(), Transport::HostStaged { .. }));
                        let mut d = c.stream().memcpy_stod(&[r as f32 + 1.0; 5]).unwrap();
                        c.all_reduce_dev(&mut d, DType::F32, ReduceOp::Sum).unwrap();
                        c.stream().memcpy_dtov(&d).unwrap()
                    })
                })
                .collect();
            ranks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|v| v == &[3.0f32; 5]));
    }
}
