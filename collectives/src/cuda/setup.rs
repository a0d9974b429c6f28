//! Start-up of the CUDA transport: the slab (cuMemAlloc, zeroed, exported with
//! cuIpcGetMemHandle), the handle exchange over the shm communicator, opening every peer's slab,
//! the peer-access probe and the job-wide IPC-or-host-staged decision (cuda_plan::decide).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaSlice, CudaStream};
use kernels::cuda::sources;

use super::drv;
use crate::cuda_plan::{self as plan, HandleRecord, Probe, SlabLayout, Transport};
use crate::{CommError, Communicator, DType, Result};

/// Flag blocks per phase in the slab: the most blocks a collective launches.
pub(super) const MAX_BLOCKS: u32 = 64;

/// This rank's device state: the context, the stream every collective runs on, its own slab
/// (owned: freed at drop) and every peer's slab as mapped here (closed at drop).
pub(super) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub own: sys::CUdeviceptr,
    pub layout: SlabLayout,
    /// Peer slabs opened with cuIpcOpenMemHandle, by rank (`None` for this rank and for peers
    /// that could not be opened).
    pub peers: Vec<Option<sys::CUdeviceptr>>,
    /// Device array of every rank's slab address as this process maps it (IPC transport only).
    pub bases: Option<CudaSlice<u64>>,
    pub kernels: Option<HashMap<&'static str, CudaFunction>>,
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        let _ = self.stream.synchronize();
        for p in self.peers.iter().flatten() {
            // SAFETY: `p` came from cuIpcOpenMemHandle in this context and is closed once; no
            // kernel uses it any more (the stream was synchronized above).
            let _ = unsafe { sys::cuIpcCloseMemHandle(*p) }.result();
        }
        // SAFETY: `own` came from cuMemAlloc in this context, is freed once, and nothing runs.
        let _ = unsafe { result::free_sync(self.own) };
    }
}

/// Allocates and zeroes this rank's slab on `ordinal`, before anything exports it.
pub(super) fn open_device(ordinal: usize, world: u32, data_bytes: u64) -> Result<Device> {
    let ctx = CudaContext::new(ordinal).map_err(|e| drv("CUDA context", e))?;
    let stream = ctx.new_stream().map_err(|e| drv("CUDA stream", e))?;
    let layout = SlabLayout::new(world, MAX_BLOCKS, data_bytes);
    let bytes = layout.total_bytes as usize;
    // SAFETY: the context is current (bound by new_stream); the allocation is owned by Device.
    let own = unsafe { result::malloc_sync(bytes) }.map_err(|e| drv("cuMemAlloc (slab)", e))?;
    let dev = Device {
        ctx,
        stream,
        own,
        layout,
        peers: vec![None; world as usize],
        bases: None,
        kernels: None,
    };
    dev.zero()?;
    Ok(dev)
}

impl Device {
    /// Zeroes the whole own slab on the communicator's stream and waits for it. (The legacy
    /// stream's cuMemsetD8 would return before it is done, and cudarc's streams do not wait
    /// for the legacy stream.)
    pub fn zero(&self) -> Result<()> {
        let what = "cuMemsetD8 (slab)";
        self.ctx.bind_to_thread().map_err(|e| drv("bind", e))?;
        let (n, s) = (self.layout.total_bytes as usize, self.stream.cu_stream());
        // SAFETY: `own` is a live allocation of `total_bytes`; the stream is this context's.
        unsafe { result::memset_d8_async(self.own, 0, n, s) }.map_err(|e| drv(what, e))?;
        self.stream.synchronize().map_err(|e| drv(what, e))
    }

    /// Copies `src` to device address `dst` on the communicator's stream and waits: ordered
    /// after the stream's earlier work and finished before the next kernel or barrier.
    ///
    /// # Safety
    /// `dst` must address at least `src.len()` bytes of device memory in this context.
    pub unsafe fn put(&self, dst: sys::CUdeviceptr, src: &[u8]) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| drv("bind", e))?;
        self.stream.synchronize().map_err(|e| drv("upload", e))?;
        // SAFETY: this function's contract; `src` outlives the copy (we wait for it below).
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| drv("upload", e))?;
        self.stream.synchronize().map_err(|e| drv("upload", e))
    }

    fn export(&self) -> std::result::Result<[u8; 64], String> {
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: `own` is a cuMemAlloc allocation of this context; `h` is writable.
        unsafe { sys::cuIpcGetMemHandle(&mut h, self.own) }
            .result()
            .map_err(|e| format!("{e:?}"))?;
        Ok(h.reserved.map(|c| c as u8))
    }

    /// Whether kernels on this rank's GPU can load and store into the memory of GPU `uuid`, where
    /// this process sees that GPU (the copy-engine probe alone passes where peer access does
    /// not work, and a kernel touching such a mapping would fault and poison the context instead
    /// of falling back).
    fn peer_access(&self, uuid: [u8; 16]) -> std::result::Result<(), String> {
        let bytes = |u: sys::CUuuid| u.bytes.map(|c| c as u8);
        let own = self.ctx.uuid().map(bytes).map_err(|e| format!("{e:?}"))?;
        if uuid == own || uuid == [0; 16] {
            return Ok(());
        }
        let n = CudaContext::device_count().map_err(|e| format!("{e:?}"))?;
        for ordinal in 0..n {
            let d = result::device::get(ordinal).map_err(|e| format!("{e:?}"))?;
            if result::device::get_uuid(d).map(bytes) != Ok(uuid) {
                continue;
            }
            let mut can = 0;
            // SAFETY: both are valid device handles of this process; `can` is writable.
            unsafe { sys::cuDeviceCanAccessPeer(&mut can, self.ctx.cu_device(), d) }
                .result()
                .map_err(|e| format!("cuDeviceCanAccessPeer: {e:?}"))?;
            return match can {
                1 => Ok(()),
                _ => Err(format!(
                    "GPU {} has no peer access to GPU {ordinal}",
                    self.ctx.ordinal()
                )),
            };
        }
        // cuIpcOpenMemHandle can map memory of a GPU this process does not see (per-rank
        // CUDA_VISIBLE_DEVICES); the pattern probe then decides.
        Ok(())
    }

    /// Opens peer `q`'s slab from its record.
    fn open_peer(&self, rec: &HandleRecord) -> std::result::Result<sys::CUdeviceptr, String> {
        let bytes = rec.handle.ok_or("it could not export its slab")?;
        let h = sys::CUipcMemHandle_st {
            reserved: bytes.map(|b| b as std::ffi::c_char),
        };
        let mut p: sys::CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: `h` is a handle another process exported for a live allocation (it keeps it
        // until its communicator drops, after the closing barrier); `p` is writable.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut p, h, flags) }
            .result()
            .map_err(|e| format!("cuIpcOpenMemHandle: {e:?}"))?;
        Ok(p)
    }

    /// Reads `n` bytes at device address `src` (own or a peer's mapping) into a vector.
    fn read(&self, src: sys::CUdeviceptr, n: usize) -> std::result::Result<Vec<u8>, String> {
        let mut out = vec![0u8; n];
        // SAFETY: `src` addresses at least `n` bytes of a live allocation or mapping.
        unsafe { result::memcpy_dtoh_sync(&mut out, src) }.map_err(|e| format!("{e:?}"))?;
        Ok(out)
    }
}

/// Exchanges handle records, opens every peer, probes, and decides the transport for the job.
pub(super) fn connect(host: &mut dyn Communicator, dev: &mut Device) -> Result<Transport> {
    let (rank, world) = (host.rank() as u32, host.world_size() as u32);
    let records = exchange_records(host, dev)?;
    let kernels = load_kernels(&dev.ctx);
    let mut probe: Vec<std::result::Result<(), String>> = vec![Ok(()); world as usize];
    for (q, rec) in records.iter().enumerate() {
        if q as u32 == rank {
            continue;
        }
        match dev.peer_access(rec.uuid).and_then(|()| dev.open_peer(rec)) {
            Ok(p) => dev.peers[q] = Some(p),
            Err(why) => probe[q] = Err(why),
        }
        if let Err(why) = &kernels {
            probe[q] = Err(format!("the collective kernels did not load: {why}"));
        }
    }
    check_patterns(host, dev, &mut probe)?;
    let probes = exchange_probes(host, Probe { rank, peers: probe })?;
    let force = crate::env::var("TPRUN_CUDA_TRANSPORT").map_err(CommError::Setup)?;
    let mut transport =
        plan::decide(&probes, &records, force.as_deref()).map_err(CommError::Setup)?;
    if let (Transport::Ipc, Err(why)) = (&transport, &kernels) {
        // Only a world of one gets here (peers would have failed their probe).
        transport = Transport::HostStaged {
            reason: format!("the collective kernels did not load: {why}"),
        };
    }
    if transport == Transport::Ipc {
        let addrs: Vec<u64> = (0..world as usize)
            .map(|q| dev.peers[q].unwrap_or(dev.own))
            .collect();
        let bases = dev
            .stream
            .memcpy_stod(&addrs)
            .map_err(|e| drv("slab table", e))?;
        dev.bases = Some(bases);
        dev.kernels = kernels.ok();
    }
    Ok(transport)
}

fn exchange_records(host: &mut dyn Communicator, dev: &Device) -> Result<Vec<HandleRecord>> {
    let (rank, world) = (host.rank() as u32, host.world_size() as u32);
    let uuid = dev
        .ctx
        .uuid()
        .map(|u| u.bytes.map(|c| c as u8))
        .unwrap_or([0; 16]);
    let mine = HandleRecord {
        rank,
        device: dev.ctx.ordinal() as u32,
        uuid,
        layout: dev.layout,
        // A world of one has no peer to export to.
        handle: (world > 1).then(|| dev.export().ok()).flatten(),
    };
    let mut all = vec![0u8; plan::RECORD_BYTES * world as usize];
    host.all_gather_raw(&mine.encode(), &mut all, DType::U8)?;
    let records = all
        .chunks(plan::RECORD_BYTES)
        .enumerate()
        .map(|(q, b)| HandleRecord::decode(b, q as u32))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(CommError::Setup)?;
    if let Some(r) = records.iter().find(|r| r.layout != dev.layout) {
        return Err(CommError::Setup(format!(
            "rank {}'s CUDA slab layout {:?} differs from this rank's {:?}",
            r.rank, r.layout, dev.layout
        )));
    }
    Ok(records)
}

/// Every rank writes its pattern into its own slab; after a barrier each reads every opened
/// peer's back through its mapping; after a second barrier every slab is zeroed again, and a
/// third barrier keeps any rank from signalling into a slab that is still being zeroed.
fn check_patterns(
    host: &mut dyn Communicator,
    dev: &Device,
    probe: &mut [std::result::Result<(), String>],
) -> Result<()> {
    let data = dev.own + dev.layout.data_off;
    let mine = plan::probe_pattern(host.rank() as u32);
    // SAFETY: the data area holds at least PROBE_BYTES (256-byte rounded, > 0).
    unsafe { dev.put(data, &mine)? };
    host.barrier()?;
    for (q, slot) in probe.iter_mut().enumerate() {
        let (Some(p), Ok(())) = (dev.peers[q], &*slot) else {
            continue;
        };
        let want = plan::probe_pattern(q as u32);
        *slot = match dev.read(p + dev.layout.data_off, want.len()) {
            Ok(got) if got == want => Ok(()),
            Ok(_) => Err("the pattern read through the mapping differs".into()),
            Err(e) => Err(format!("reading through the mapping: {e}")),
        };
    }
    host.barrier()?;
    dev.zero()?;
    host.barrier()
}

fn exchange_probes(host: &mut dyn Communicator, mine: Probe) -> Result<Vec<Probe>> {
    let world = host.world_size() as u32;
    let len = plan::probe_len(world);
    let mut all = vec![0u8; len * world as usize];
    host.all_gather_raw(&plan::encode_probe(&mine), &mut all, DType::U8)?;
    Ok(all
        .chunks(len)
        .enumerate()
        .map(|(q, b)| plan::decode_probe(b, q as u32, world))
        .collect())
}

/// Compiles comm.cu for this GPU (NVRTC, cached per process) and loads every kernel.
fn load_kernels(
    ctx: &Arc<CudaContext>,
) -> std::result::Result<HashMap<&'static str, CudaFunction>, String> {
    kernels::cuda::module::load(ctx, &sources::COMM)
}
