//! The host-side logic of the CUDA IPC transport, in plain Rust so it is unit-tested on machines
//! without a GPU: the slab layout the kernels in kernels/src/cuda/comm.cu index, flag and sequence
//! arithmetic, the choice of algorithm by message size, the launch grid, the handle-exchange
//! record each rank publishes through the job's shm segment, the IPC-or-host-staged decision from
//! every rank's peer-access probe, and the device error word turned into a [`CommError`].

use crate::{CommError, DType};

/// Bytes before the flags: the error word (offset 0) and room to grow; flags start aligned.
pub const HEADER_BYTES: u64 = 256;
/// Flag arrays per slab: staged (0), reduced (1), done (2), as in comm.cu's `PHASE_*`.
pub const PHASES: u64 = 3;
/// cuMemAlloc rounds to 2 MiB pages and an IPC handle maps whole allocations, so we do too.
pub const SLAB_ALIGN: u64 = 2 << 20;
/// Default staging capacity per rank: the perf sweep's largest message (64 MiB) in one piece.
pub const DEFAULT_DATA_BYTES: u64 = 64 << 20;
/// Threads per block of every collective kernel.
pub const THREADS: u32 = 512;

/// Where things are in one rank's device slab (every rank's slab has the same layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlabLayout {
    /// Ranks in the job (one flag per peer per block per phase).
    pub world: u32,
    /// Most thread blocks a kernel launches (each has its own flags).
    pub max_blocks: u32,
    /// Offset of the flag arrays ([`HEADER_BYTES`]).
    pub flags_off: u64,
    /// Offset of the staging data, 256-byte aligned.
    pub data_off: u64,
    /// Staging capacity, rounded up to 256 bytes.
    pub data_bytes: u64,
    /// The allocation's size, a multiple of [`SLAB_ALIGN`].
    pub total_bytes: u64,
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl SlabLayout {
    /// The layout for `world` ranks, `max_blocks` blocks and at least `data_bytes` of staging.
    pub fn new(world: u32, max_blocks: u32, data_bytes: u64) -> SlabLayout {
        let flags = PHASES * u64::from(world) * u64::from(max_blocks) * FLAG_BYTES;
        let data_off = round_up(HEADER_BYTES + flags, 256);
        let data_bytes = round_up(data_bytes, 256);
        SlabLayout {
            world,
            max_blocks,
            flags_off: HEADER_BYTES,
            data_off,
            data_bytes,
            total_bytes: round_up(data_off + data_bytes, SLAB_ALIGN),
        }
    }
}

/// Bytes of one flag: a u64, so the counter never wraps (a block that has not run for 2^31
/// operations would misread a wrapped u32 flag as arrived).
pub const FLAG_BYTES: u64 = 8;

/// The per-communicator operation counter every flag is compared with. Starts at 1 so the zeroed
/// slab (flags 0) never counts as arrived; 64 bits do not wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seq(pub u64);

impl Default for Seq {
    fn default() -> Seq {
        Seq(1)
    }
}

impl Seq {
    /// This operation's value; advances the counter. Every rank calls collectives in the same
    /// order, so every rank uses the same value for the same operation.
    pub fn take(&mut self) -> u64 {
        let v = self.0;
        self.0 += 1;
        v
    }
}

/// How one all-reduce runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// World size 1: nothing to exchange.
    Local,
    /// Every rank reads every peer's whole message (latency-bound sizes).
    OneShot,
    /// Reduce-scatter then all-gather (bandwidth-bound sizes): each rank reads 2/world of it.
    TwoShot,
}

impl Algo {
    /// The name the trace gives the algorithm (the shm transport's names for the same shapes).
    pub fn name(self) -> &'static str {
        match self {
            Algo::Local => "local",
            Algo::OneShot => "one_shot",
            Algo::TwoShot => "reduce_scatter+all_gather",
        }
    }
}

/// How one collective call ran, for the statistics and the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ran {
    /// comm.cu's kernels (or nothing, for one rank): the algorithm the trace names and the
    /// kernel launches it took.
    Device {
        /// The algorithm's name as the trace shows it.
        algorithm: &'static str,
        /// Kernel launches.
        steps: u64,
    },
    /// Through the shm communicator, which records the call in the trace itself.
    Host,
}

/// Largest all-reduce that runs one-shot. vLLM's custom all-reduce switches near 256-512 KiB;
/// `TPRUN_CUDA_ONESHOT_MAX` (bytes) overrides it until a GPU sweep measures ours.
pub const DEFAULT_ONESHOT_MAX: u64 = 512 << 10;

/// `TPRUN_CUDA_ONESHOT_MAX` (a size: `65536`, `256K`, `1M`), else [`DEFAULT_ONESHOT_MAX`]; a bad
/// value is an error naming the variable.
pub fn oneshot_max_from_env() -> std::result::Result<u64, String> {
    oneshot_max(crate::env::var(ONESHOT_VAR)?.as_deref())
}

const ONESHOT_VAR: &str = "TPRUN_CUDA_ONESHOT_MAX";

/// [`oneshot_max_from_env`] of the variable's value.
fn oneshot_max(value: Option<&str>) -> std::result::Result<u64, String> {
    value.map_or(Ok(DEFAULT_ONESHOT_MAX), |v| {
        crate::env::parse_bytes(ONESHOT_VAR, v, 0..=1 << 34)
    })
}

/// The algorithm for an all-reduce of `bytes` (of `elems` elements) over `world` ranks.
pub fn choose(world: u32, bytes: u64, elems: u64, oneshot_max: u64) -> Algo {
    if world <= 1 {
        Algo::Local
    } else if bytes <= oneshot_max || elems < u64::from(world) {
        Algo::OneShot
    } else {
        Algo::TwoShot
    }
}

/// Two-shot segment length in elements (rank r reduces [r*seg, (r+1)*seg)), a multiple of 64
/// elements so segments start on 128-byte lines for 2- and 4-byte types.
pub fn segment(elems: u64, world: u32) -> u64 {
    round_up(elems.div_ceil(u64::from(world.max(1))), 64)
}

/// Blocks to launch for `bytes`: one per 64 KiB, at least one, at most the layout's flag blocks.
pub fn blocks(bytes: u64, max_blocks: u32) -> u32 {
    bytes.div_ceil(64 << 10).clamp(1, u64::from(max_blocks)) as u32
}

/// Pieces of a `bytes`-long message that each fit `capacity` staging bytes, cut on element
/// boundaries: `(offset, len)` in bytes. An empty message is no piece.
pub fn pieces(bytes: u64, capacity: u64, dtype: DType) -> Vec<(u64, u64)> {
    let step = (capacity / dtype.size() as u64).max(1) * dtype.size() as u64;
    (0..bytes)
        .step_by(step as usize)
        .map(|o| (o, step.min(bytes - o)))
        .collect()
}

/// The record each rank publishes (all-gathered over the shm communicator) before any peer
/// opens its slab. Fixed 128 bytes, little-endian.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandleRecord {
    /// The publishing rank.
    pub rank: u32,
    /// CUDA device ordinal in this rank's process, and the GPU's UUID (ranks on one GPU share it).
    pub device: u32,
    /// The GPU's UUID, to tell ranks that share a GPU.
    pub uuid: [u8; 16],
    /// The slab's layout, which every peer must agree on.
    pub layout: SlabLayout,
    /// `cuIpcGetMemHandle` of the slab, or `None` when export failed (fallback).
    pub handle: Option<[u8; 64]>,
}

/// Size of an encoded [`HandleRecord`].
pub const RECORD_BYTES: usize = 128;
const MAGIC: &[u8; 4] = b"TPCU";
const RECORD_VERSION: u16 = 1;

impl HandleRecord {
    /// The record's bytes as published ([`HandleRecord::decode`] reads them back).
    pub fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        b[0..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&RECORD_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&u16::from(self.handle.is_some()).to_le_bytes());
        b[8..12].copy_from_slice(&self.rank.to_le_bytes());
        b[12..16].copy_from_slice(&self.device.to_le_bytes());
        b[16..20].copy_from_slice(&self.layout.world.to_le_bytes());
        b[20..24].copy_from_slice(&self.layout.max_blocks.to_le_bytes());
        b[24..32].copy_from_slice(&self.layout.data_bytes.to_le_bytes());
        b[32..48].copy_from_slice(&self.uuid);
        b[48..112].copy_from_slice(self.handle.as_ref().unwrap_or(&[0; 64]));
        b
    }

    /// Decodes the record found in rank `expect_rank`'s place; a stale, foreign or mismatched
    /// record is an error naming that rank.
    pub fn decode(b: &[u8], expect_rank: u32) -> Result<HandleRecord, String> {
        let bad = |what: &str| format!("rank {expect_rank}'s CUDA handle record: {what}");
        if b.len() != RECORD_BYTES || &b[0..4] != MAGIC {
            return Err(bad("not a tprun record"));
        }
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        if u16_at(4) != RECORD_VERSION {
            return Err(bad(&format!(
                "version {} (this build writes {RECORD_VERSION})",
                u16_at(4)
            )));
        }
        let rank = u32_at(8);
        if rank != expect_rank {
            return Err(bad(&format!("written by rank {rank}")));
        }
        let data = u64::from_le_bytes(b[24..32].try_into().unwrap());
        let handle = (u16_at(6) == 1).then(|| b[48..112].try_into().unwrap());
        Ok(HandleRecord {
            rank,
            device: u32_at(12),
            uuid: b[32..48].try_into().unwrap(),
            layout: SlabLayout::new(u32_at(16), u32_at(20), data),
            handle,
        })
    }
}

/// What rank `rank` found when it opened every peer's slab: for each peer, `Ok` if
/// `cuIpcOpenMemHandle` worked and a pattern the peer wrote was read back through the mapping
/// (drivers can report peer access that does not work), else why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The probing rank.
    pub rank: u32,
    /// One result per peer, in rank order (this rank's own entry included).
    pub peers: Vec<Result<(), String>>,
}

/// How the job's ranks move data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Kernels read and write peers' slabs directly.
    Ipc,
    /// Device → host, the shm transport, host → device; `reason` is printed once at start.
    HostStaged {
        /// Why IPC is not used (which rank could not map which peer, or the setting that chose it).
        reason: String,
    },
}

/// Most ranks the collective kernels serve: one thread per peer signals and waits, and the
/// error word keeps 8 bits of the peer that did not arrive.
pub const MAX_IPC_WORLD: usize = 256;

/// Two ranks whose records name the same GPU (an unknown, all-zero UUID matches nothing).
pub fn shared_gpu(records: &[HandleRecord]) -> Option<(u32, u32)> {
    records.iter().enumerate().find_map(|(i, a)| {
        records[i + 1..]
            .iter()
            .find(|b| a.uuid != [0; 16] && b.uuid == a.uuid)
            .map(|b| (a.rank, b.rank))
    })
}

/// One decision for the whole job from every rank's record and probe (each rank sees the same,
/// so each decides the same).
///
/// IPC needs every probe to pass and at most [`MAX_IPC_WORLD`] ranks. Ranks that share a GPU
/// use the host-staged transport too unless `TPRUN_CUDA_TRANSPORT=ipc`: without MPS the GPU
/// runs one process's kernels at a time, so every flag a kernel waits for on a peer costs a
/// time slice (milliseconds), and with MPS spinning blocks of several ranks must all fit at
/// once. `TPRUN_CUDA_TRANSPORT=host` forces the fallback; `ipc` turns a failure into an error.
pub fn decide(
    probes: &[Probe],
    records: &[HandleRecord],
    force: Option<&str>,
) -> Result<Transport, String> {
    let world = probes.len().max(records.len());
    let failure = probes
        .iter()
        .find_map(|p| {
            p.peers.iter().enumerate().find_map(|(q, r)| {
                r.as_ref().err().map(|why| {
                    format!(
                        "rank {} cannot use rank {q}'s memory over CUDA IPC: {why}",
                        p.rank
                    )
                })
            })
        })
        .or_else(|| {
            (world > MAX_IPC_WORLD).then(|| {
                format!("{world} ranks: the CUDA IPC kernels serve at most {MAX_IPC_WORLD}")
            })
        });
    let shared = shared_gpu(records).map(|(a, b)| {
        format!(
            "ranks {a} and {b} share one GPU, whose kernels take turns between processes              (TPRUN_CUDA_TRANSPORT=ipc uses IPC anyway)"
        )
    });
    match (force, failure, shared) {
        (Some("host"), _, _) => Ok(Transport::HostStaged {
            reason: "TPRUN_CUDA_TRANSPORT=host".into(),
        }),
        (Some("ipc"), Some(why), _) => Err(format!("TPRUN_CUDA_TRANSPORT=ipc, but {why}")),
        (Some(other), _, _) if other != "ipc" && other != "auto" => Err(format!(
            "TPRUN_CUDA_TRANSPORT={other}: expected auto, ipc or host"
        )),
        (_, Some(why), _) => Ok(Transport::HostStaged { reason: why }),
        (Some("ipc"), None, _) | (_, None, None) => Ok(Transport::Ipc),
        (_, None, Some(why)) => Ok(Transport::HostStaged { reason: why }),
    }
}

/// Bytes of the probe pattern each rank writes at the start of its slab's data area.
pub const PROBE_BYTES: usize = 256;
/// Bytes of the first failure's text in an exchanged probe.
const PROBE_TEXT: usize = 252;

/// The probe pattern rank `rank` writes (and its peers expect): different per rank and per byte,
/// never all zeros, so a zeroed or foreign mapping does not pass.
pub fn probe_pattern(rank: u32) -> Vec<u8> {
    (0..PROBE_BYTES as u32)
        .map(|i| (rank.wrapping_mul(31).wrapping_add(i.wrapping_mul(7)) % 251 + 1) as u8)
        .collect()
}

/// Length of one rank's exchanged probe in a world of `world`.
pub fn probe_len(world: u32) -> usize {
    world as usize + PROBE_TEXT
}

/// A probe as the bytes all-gathered over the shm communicator: one status byte per peer (1: the
/// pattern came back), then the first failure's text (cut to fit [`probe_len`]).
pub fn encode_probe(p: &Probe) -> Vec<u8> {
    let mut b = vec![0u8; probe_len(p.peers.len() as u32)];
    for (q, r) in p.peers.iter().enumerate() {
        b[q] = u8::from(r.is_ok());
    }
    if let Some(why) = p.peers.iter().find_map(|r| r.as_ref().err()) {
        let mut n = why.len().min(PROBE_TEXT);
        while !why.is_char_boundary(n) {
            n -= 1;
        }
        b[p.peers.len()..p.peers.len() + n].copy_from_slice(&why.as_bytes()[..n]);
    }
    b
}

/// The inverse of [`encode_probe`] for rank `rank`'s place in a world of `world`.
pub fn decode_probe(b: &[u8], rank: u32, world: u32) -> Probe {
    let w = world as usize;
    let text = b.get(w..).unwrap_or(&[]);
    let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
    let why = String::from_utf8_lossy(&text[..end]).into_owned();
    let peers = (0..w)
        .map(|q| match b.get(q) {
            Some(1) => Ok(()),
            _ => Err(if why.is_empty() {
                "failed".into()
            } else {
                why.clone()
            }),
        })
        .collect();
    Probe { rank, peers }
}

/// comm.cu's `ReduceOp` code: 0 sum, 1 product, 2 max, 3 min; `None` for the operators comm.cu
/// has no kernel for (avg, bitwise, premulsum): those are staged through the host.
pub fn op_code(op: crate::ReduceOp) -> Option<i32> {
    match op {
        crate::ReduceOp::Sum => Some(0),
        crate::ReduceOp::Product => Some(1),
        crate::ReduceOp::Max => Some(2),
        crate::ReduceOp::Min => Some(3),
        _ => None,
    }
}

/// The comm.cu kernel reducing `dtype` with `algo`, or `None` where the device has none (f16,
/// integer types, a world of one): that operation is staged through the host instead.
pub fn reduce_kernel(algo: Algo, dtype: DType) -> Option<&'static str> {
    match (algo, dtype) {
        (Algo::OneShot, DType::F32) => Some("all_reduce_oneshot_f32"),
        (Algo::OneShot, DType::BF16) => Some("all_reduce_oneshot_bf16"),
        (Algo::TwoShot, DType::F32) => Some("all_reduce_twoshot_f32"),
        (Algo::TwoShot, DType::BF16) => Some("all_reduce_twoshot_bf16"),
        _ => None,
    }
}

/// The reduce-scatter kernel for `dtype`, if any.
pub fn reduce_scatter_kernel(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("reduce_scatter_f32"),
        DType::BF16 => Some("reduce_scatter_bf16"),
        _ => None,
    }
}

/// The GPU a rank uses: its local rank modulo the devices it sees (`LOCAL_RANK % count`).
pub fn device_ordinal(local_rank: usize, count: usize) -> usize {
    local_rank % count.max(1)
}

/// comm.cu's op ids in the error word.
const OPS: [&str; 6] = [
    "?",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "barrier",
];

/// The error a device-side wait left in the slab's error word (0: none), as the shm
/// transport's timeout error: the op, this operation's sequence number and the missing rank.
pub fn device_error(word: u32, seq: u64, waited_s: f64) -> Option<CommError> {
    if word & 0x8000_0000 == 0 {
        return None;
    }
    let op = OPS
        .get(((word >> 16) & 0x7fff) as usize)
        .copied()
        .unwrap_or("?");
    Some(CommError::Timeout {
        op,
        seq,
        missing: (word & 0xff) as usize,
        waited_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oneshot_limit_is_a_size_and_a_bad_one_is_an_error_naming_the_variable() {
        assert_eq!(oneshot_max(None), Ok(DEFAULT_ONESHOT_MAX));
        assert_eq!(oneshot_max(Some("256K")), Ok(256 << 10));
        assert_eq!(oneshot_max(Some("0")), Ok(0));
        for bad in ["lots", "-1", "1T"] {
            let e = oneshot_max(Some(bad)).unwrap_err();
            assert!(
                e.contains("TPRUN_CUDA_ONESHOT_MAX") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn the_trace_names_the_algorithms_as_the_shm_transport_does() {
        let m = DEFAULT_ONESHOT_MAX;
        assert_eq!(choose(1, 8, 2, m).name(), "local");
        assert_eq!(choose(2, m, m / 4, m).name(), "one_shot");
        assert_eq!(
            choose(2, m + 4, m / 4 + 1, m).name(),
            "reduce_scatter+all_gather"
        );
    }

    #[test]
    fn layout_puts_flags_after_the_header_and_data_after_the_flags() {
        let l = SlabLayout::new(4, 64, DEFAULT_DATA_BYTES);
        assert_eq!(l.flags_off, 256);
        assert_eq!(l.data_off, 256 + 3 * 4 * 64 * 8);
        assert_eq!(l.data_off % 256, 0);
        assert_eq!(l.total_bytes % SLAB_ALIGN, 0);
        assert!(l.total_bytes >= l.data_off + l.data_bytes);
        // comm.cu's flag_at over these offsets (the last flag ends where the data starts, each
        // flag its own word) is run by collectives/tests/emulator.rs on the emulator.
        assert_eq!(l.flags_off + PHASES * 4 * 64 * FLAG_BYTES, l.data_off);
        assert_eq!(l.flags_off % 8, 0, "u64 flags are 8-byte aligned");
    }

    #[test]
    fn data_is_rounded_to_256_bytes() {
        assert_eq!(SlabLayout::new(3, 5, 1000).data_bytes, 1024);
    }

    #[test]
    fn the_sequence_counter_starts_at_1_and_goes_past_2_to_the_32() {
        // comm.cu's wait on these values (a zeroed slab, stale flags past 2^32) is tested on
        // the kernel itself: collectives/tests/emulator.rs.
        let mut s = Seq(u64::from(u32::MAX));
        assert_eq!((s.take(), s.take()), (u64::from(u32::MAX), 1 << 32));
        assert_eq!(Seq::default().take(), 1);
    }

    #[test]
    fn algorithm_by_size() {
        let m = DEFAULT_ONESHOT_MAX;
        assert_eq!(choose(1, 1 << 30, 1 << 28, m), Algo::Local);
        assert_eq!(choose(2, 8, 2, m), Algo::OneShot);
        assert_eq!(choose(2, m, m / 4, m), Algo::OneShot);
        assert_eq!(choose(2, m + 4, m / 4 + 1, m), Algo::TwoShot);
        assert_eq!(
            choose(8, 1 << 20, 4, 0),
            Algo::OneShot,
            "fewer elements than ranks"
        );
    }

    #[test]
    fn segments_cover_the_message_and_start_aligned() {
        for (n, w) in [(1u64, 2u32), (1000, 3), (1 << 20, 4), (65, 2)] {
            let s = segment(n, w);
            assert_eq!(s % 64, 0);
            assert!(s * u64::from(w) >= n && s * u64::from(w - 1) < n + 64 * u64::from(w));
        }
    }

    #[test]
    fn grid_and_pieces() {
        assert_eq!(blocks(0, 64), 1);
        assert_eq!(blocks(64 << 10, 64), 1);
        assert_eq!(blocks((64 << 10) + 1, 64), 2);
        assert_eq!(blocks(1 << 30, 64), 64);
        assert!(pieces(0, 1024, DType::F32).is_empty());
        assert_eq!(pieces(10, 4, DType::F32), [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(pieces(12, 7, DType::BF16), [(0, 6), (6, 6)]);
        let total: u64 = pieces(1 << 27, DEFAULT_DATA_BYTES, DType::F32)
            .iter()
            .map(|p| p.1)
            .sum();
        assert_eq!(total, 1 << 27);
    }

    fn record(rank: u32, handle: bool) -> HandleRecord {
        HandleRecord {
            rank,
            device: 0,
            uuid: [7; 16],
            layout: SlabLayout::new(2, 64, DEFAULT_DATA_BYTES),
            handle: handle.then_some([(rank as u8).wrapping_add(1); 64]),
        }
    }

    #[test]
    fn handle_records_round_trip_and_reject_strangers() {
        for h in [true, false] {
            let r = record(1, h);
            assert_eq!(HandleRecord::decode(&r.encode(), 1), Ok(r));
        }
        let b = record(1, true).encode();
        assert!(HandleRecord::decode(&b, 0)
            .unwrap_err()
            .contains("written by rank 1"));
        assert!(HandleRecord::decode(&[0; RECORD_BYTES], 0)
            .unwrap_err()
            .contains("not a tprun"));
        let mut v2 = b;
        v2[4] = 2;
        assert!(HandleRecord::decode(&v2, 1)
            .unwrap_err()
            .contains("version 2"));
        assert!(HandleRecord::decode(&b[..64], 1).is_err());
    }

    /// Rank `rank`'s record on GPU `gpu` (its UUID's bytes).
    fn on_gpu(rank: u32, gpu: u8) -> HandleRecord {
        HandleRecord {
            uuid: [gpu; 16],
            ..record(rank, true)
        }
    }

    #[test]
    fn ranks_sharing_a_gpu_stage_through_the_host_unless_ipc_is_forced() {
        let ok = |rank| Probe {
            rank,
            peers: vec![Ok(()); 3],
        };
        let probes = [ok(0), ok(1), ok(2)];
        let apart = [on_gpu(0, 1), on_gpu(1, 2), on_gpu(2, 3)];
        assert_eq!(decide(&probes, &apart, None), Ok(Transport::Ipc));
        let shared = [on_gpu(0, 1), on_gpu(1, 2), on_gpu(2, 1)];
        assert_eq!(shared_gpu(&shared), Some((0, 2)));
        match decide(&probes, &shared, None).unwrap() {
            Transport::HostStaged { reason } => {
                assert!(reason.contains("ranks 0 and 2 share one GPU"), "{reason}")
            }
            t => panic!("{t:?}"),
        }
        assert_eq!(decide(&probes, &shared, Some("ipc")), Ok(Transport::Ipc));
        // A GPU whose UUID could not be read shares with nobody.
        let unknown = [on_gpu(0, 0), on_gpu(1, 0), on_gpu(2, 0)];
        assert_eq!(decide(&probes, &unknown, None), Ok(Transport::Ipc));
    }

    #[test]
    fn more_ranks_than_the_kernels_serve_stage_through_the_host() {
        let n = MAX_IPC_WORLD as u32 + 1;
        let probes: Vec<Probe> = (0..n)
            .map(|rank| Probe {
                rank,
                peers: vec![Ok(()); n as usize],
            })
            .collect();
        let records: Vec<HandleRecord> = (0..n)
            .map(|r| {
                let mut uuid = [0; 16];
                uuid[..4].copy_from_slice(&(r + 1).to_le_bytes());
                HandleRecord {
                    uuid,
                    ..record(r, true)
                }
            })
            .collect();
        let d = decide(&probes, &records, None).unwrap();
        assert!(
            matches!(d, Transport::HostStaged { ref reason } if reason.contains("at most 256"))
        );
        assert!(decide(&probes, &records, Some("ipc")).is_err());
    }

    #[test]
    fn fallback_when_any_rank_cannot_reach_any_peer() {
        let ok = |rank| Probe {
            rank,
            peers: vec![Ok(()), Ok(())],
        };
        let two = [on_gpu(0, 1), on_gpu(1, 2)];
        let decide = |p: &[Probe], force| decide(p, &two, force);
        assert_eq!(decide(&[ok(0), ok(1)], None), Ok(Transport::Ipc));
        assert_eq!(decide(&[ok(0), ok(1)], Some("auto")), Ok(Transport::Ipc));
        let refused = Probe {
            rank: 1,
            peers: vec![Err("CUDA_ERROR_INVALID_VALUE".into()), Ok(())],
        };
        let d = decide(&[ok(0), refused.clone()], None).unwrap();
        assert_eq!(
            d,
            Transport::HostStaged {
                reason: "rank 1 cannot use rank 0's memory over CUDA IPC: CUDA_ERROR_INVALID_VALUE"
                    .into()
            }
        );
        assert!(decide(&[ok(0), refused], Some("ipc")).is_err());
        assert!(matches!(
            decide(&[ok(0), ok(1)], Some("host")),
            Ok(Transport::HostStaged { .. })
        ));
        assert!(decide(&[ok(0)], Some("nvlink")).is_err());
    }

    #[test]
    fn the_error_word_names_the_op_and_the_rank() {
        assert!(device_error(0, 1, 1.0).is_none());
        let word = 0x8000_0000 | (1 << 16) | (2 << 8) | 3;
        let e = device_error(word, 42, 30.0).unwrap().to_string();
        assert!(
            e.starts_with("all_reduce #42: rank 3 did not arrive"),
            "{e}"
        );
    }

    #[test]
    fn probes_round_trip_through_their_bytes() {
        let p = Probe {
            rank: 2,
            peers: vec![
                Ok(()),
                Err("CUDA_ERROR_PEER_ACCESS_UNSUPPORTED".into()),
                Ok(()),
            ],
        };
        let b = encode_probe(&p);
        assert_eq!(b.len(), probe_len(3));
        assert_eq!(decode_probe(&b, 2, 3), p);
        let ok = Probe {
            rank: 0,
            peers: vec![Ok(()); 4],
        };
        assert_eq!(decode_probe(&encode_probe(&ok), 0, 4), ok);
        let long = Probe {
            rank: 1,
            peers: vec![Err("é".repeat(300)), Ok(())],
        };
        let d = decode_probe(&encode_probe(&long), 1, 2);
        assert!(d.peers[0].as_ref().unwrap_err().len() <= 252 && d.peers[1].is_ok());
        let zeros = decode_probe(&vec![0; probe_len(2)], 1, 2);
        assert_eq!(zeros.peers[0], Err("failed".into()));
    }

    #[test]
    fn probe_patterns_differ_by_rank_and_are_never_zero() {
        let (a, b) = (probe_pattern(0), probe_pattern(1));
        assert_eq!(a.len(), PROBE_BYTES);
        assert_ne!(a, b);
        assert!(a.iter().chain(&b).all(|&x| x != 0));
    }

    #[test]
    fn kernels_by_op_type_and_device_by_local_rank() {
        assert_eq!(op_code(crate::ReduceOp::Min), Some(3));
        assert_eq!(op_code(crate::ReduceOp::Avg), None);
        assert_eq!(
            reduce_kernel(Algo::TwoShot, DType::BF16),
            Some("all_reduce_twoshot_bf16")
        );
        assert_eq!(reduce_kernel(Algo::OneShot, DType::F16), None);
        assert_eq!(reduce_kernel(Algo::Local, DType::F32), None);
        assert_eq!(reduce_scatter_kernel(DType::I32), None);
        assert_eq!(device_ordinal(5, 4), 1);
        assert_eq!(device_ordinal(3, 0), 0);
    }
}
