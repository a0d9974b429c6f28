//! Byte layout of the job's shared-memory segment. Every offset is a function of
//! (world size, slot bytes) only, both stored in the header, so every rank computes the same one.
//!
//! ```text
//! offset 0            Header (one page): magic, version, world size, slot bytes, total bytes,
//!                     creator pid; `abort` (own 128-B line); named-path handshake words; the
//!                     registry of live groups (GroupSlot[32]: owner pid, fd, size, name).
//! PAGE                Ctl[world], 256 B each: line 0 = `seq` (the rank's published step count)
//!                     and the CPU it published from, written only by that rank; line 1 =
//!                     `waiters` (futex sleepers on `seq`, written by peers), pid, pid
//!                     namespace, `gone`, the point-to-point `bell`, where the rank mapped
//!                     the segment (`base`).
//! hdr_off (page)      SlotHdr[world][2], 128 B each: what the rank's data half holds (step, op,
//!                     dtype, reduce op, root, bytes), checked by readers to catch ranks that
//!                     called different collectives.
//! flight_off (page)   Flight[world]: each rank's flight recorder, a 128-B header (calls
//!                     entered) and the last FLIGHT_K collective records of 64 B (shm/flight.rs).
//! ring_off (page)     Ring[world]: per rank 2 x RING SlotHdrs, then RING data entries of
//!                     RING_BYTES, for steps small enough ([`Layout::place_for`]); step s uses
//!                     header s % (2 RING) and data s % RING, so a writer may run up to RING - 1
//!                     steps ahead of its readers (the halves allow one). Headers live twice as
//!                     long as data so a root that did not wait for its readers can still check
//!                     theirs RING steps later (shm/protocol.rs, `begin_step`). Steps of at
//!                     most INLINE_BYTES keep their data in the header's second cache line.
//! data_off (page)     Data[world][2], `slot` bytes each: rank r's two halves (double buffer);
//!                     step s uses half s % 2.
//! chan_off (page)     Chan[world][world - 1], 256 B each: the point-to-point channel from rank
//!                     s to each other rank d: line 0 written by the sender (`sent`, what each
//!                     half holds), line 1 by the receiver (`acked`, the receive it posted).
//! pdata_off (page)    PData[world][world - 1][2], `pslot` bytes each: the channel's two halves;
//!                     chunk c of the channel uses half c % 2.
//! ```
//! `pslot` = slot / (2 (world - 1)) rounded down to a page (at least one page), so the channels
//! take about half as much as the data halves: total = ~12 KiB + world x 21 KiB + world² x 256 B
//! + ~1.5 x world x 2 x slot: with the default 1 MiB slot, 6 MiB for 2 ranks, 24 MiB for 8.
//!
//! A step's place is `h`: 0 and 1 are the data halves, 2 + i is ring header i (data i % RING),
//! 2 + 2 RING + i is ring header i with its data inline.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8};

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"TPRUNSHM");
pub(crate) const VERSION: u32 = 5;
pub(crate) const PAGE: usize = 4096;
/// Value of `Header::ready` once the creator has filled the header (named path).
pub(crate) const READY: u32 = 0x5EAD_1E55;
/// Default bytes per data half.
pub const DEFAULT_SLOT_BYTES: usize = 1 << 20;
/// Entries of each rank's ring of small steps: a root of small broadcasts, scatters or reduces
/// may run RING - 1 calls ahead of its readers, as a message queue lets it (Open MPI's eager
/// FIFO), instead of paying one cache-line round trip per call. Eight, not more: a sweep that
/// comes back to small calls after large ones finds every entry cold, and with 16 the first
/// small size of each op took 1.3-1.5x as long (measured 2026-12-08; 8 run ahead as well).
pub(crate) const RING: usize = 8;
/// Data bytes of a ring entry.
pub(crate) const RING_BYTES: usize = 2048;
/// Headers of each rank's ring.
const RING_HDRS: usize = 2 * RING;
/// Bytes of one rank's ring: its headers, then its data entries.
const RING_RANK: usize = RING_HDRS * std::mem::size_of::<SlotHdr>() + RING * RING_BYTES;
/// Largest world the layout accepts (the header stores it as u32; this is a sanity bound).
pub const MAX_WORLD: usize = 4096;

#[repr(C, align(128))]
pub(crate) struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub world_size: AtomicU32,
    pub slot_bytes: AtomicU64,
    pub total_bytes: AtomicU64,
    pub creator_pid: AtomicU32,
    _r0: u32,
    pub creator_pidns: AtomicU64,
    _pad0: [u8; 80],
    /// 0 while the job runs; failed rank + 1 once the launcher aborted it.
    pub abort: AtomicU32,
    _pad1: [u8; 124],
    /// READY once the creator has initialised the segment (named path).
    pub ready: AtomicU32,
    /// Ranks that have mapped the segment (named path: the last one unlinks the name).
    pub attached: AtomicU32,
    /// Set by whoever unlinked the name (named path).
    pub unlinked: AtomicU32,
    /// Groups made by `split` in this job, so the launcher can read their flight recorders.
    pub groups: [GroupSlot; GROUP_SLOTS],
}

/// Groups the job segment's registry holds at once (more still work, unregistered).
pub const GROUP_SLOTS: usize = 32;
/// Bytes of a registered group's name (longer ones are cut).
pub const GROUP_NAME_BYTES: usize = 48;

/// One live group, registered by its rank 0: where its segment is (`/proc/<owner>/fd/<fd>`).
#[repr(C, align(64))]
pub(crate) struct GroupSlot {
    /// Pid of the group's rank 0 while registered, 0 when free.
    pub owner: AtomicU32,
    pub fd: AtomicU32,
    /// The group's size.
    pub world: AtomicU32,
    /// 1 once the fields above and the name are written.
    pub ready: AtomicU32,
    pub name: [AtomicU8; GROUP_NAME_BYTES],
}

#[repr(C, align(128))]
pub(crate) struct Ctl {
    /// Steps this rank has published (wrapping u32; also the futex word).
    pub seq: AtomicU32,
    /// The CPU this rank last published from (+1; 0 = unknown). A waiter on the same CPU does not
    /// spin: the peer cannot run until it stops.
    pub cpu: AtomicU32,
    _pad0: [u8; 120],
    /// Peers sleeping on `seq` (the publisher calls futex_wake only when non-zero).
    pub waiters: AtomicU32,
    pub pid: AtomicU32,
    /// 1 once the rank dropped its communicator.
    pub gone: AtomicU32,
    /// In a group's segment: the rank's world rank + 1 (0 in the world's own segment).
    pub world_rank: AtomicU32,
    pub pidns: AtomicU64,
    /// Rung (incremented) by a peer whenever it publishes something this rank may wait for on a
    /// point-to-point channel (a chunk sent to it, a chunk of its own acknowledged), so a rank
    /// waiting on several channels at once sleeps on one futex word.
    pub bell: AtomicU32,
    /// This rank's sleepers on `bell` (ringers call futex_wake only when non-zero).
    pub bell_waiters: AtomicU32,
    /// Where this rank mapped the segment (its own address space): peers read the header's magic
    /// there to learn whether they may copy from / to this process directly (single-copy path).
    pub base: AtomicU64,
    _pad1: [u8; 88],
}

/// The point-to-point channel from one rank to another (see the module docs).
#[repr(C, align(128))]
pub(crate) struct Chan {
    /// Chunks the sender has published (wrapping u32).
    pub sent: AtomicU32,
    _r0: u32,
    /// Per half: the number (1-based) of the message the chunk belongs to.
    pub msg: [AtomicU64; 2],
    /// Per half: the whole message's bytes, so the receiver can check it expects as many.
    pub total: [AtomicU64; 2],
    /// Per half: 1 when the sender wrote the whole message straight into the receiver's buffer
    /// (the half then carries no data), else 0.
    pub direct: [AtomicU32; 2],
    _pad0: [u8; 80],
    /// Chunks the receiver has copied out (wrapping u32).
    pub acked: AtomicU32,
    _r1: u32,
    /// The receive the receiver is waiting on, so the sender can write it directly: its message
    /// number on this channel (0 = none posted yet), its buffer's address in the receiver's
    /// address space and its bytes.
    pub posted_msg: AtomicU64,
    pub posted_addr: AtomicU64,
    pub posted_len: AtomicU64,
    _pad1: [u8; 96],
}

/// Describes what a data half holds; written by its owner before publishing the step.
#[repr(C, align(128))]
pub(crate) struct SlotHdr {
    pub step: AtomicU64,
    pub op_seq: AtomicU64,
    pub bytes: AtomicU64,
    /// kind | dtype << 8 | reduce op << 16.
    pub code: AtomicU32,
    pub root: AtomicU32,
    /// Single-copy steps: the address (in the owner's address space) of the buffer peers copy
    /// from or into; 0 otherwise.
    pub addr: AtomicU64,
    _pad: [u8; 24],
    /// A ring header's own data for the tiniest steps (at most INLINE_BYTES): on the header's
    /// second cache line, so such a step touches no data page (see [`Layout::place_for`]).
    pub inline: std::cell::UnsafeCell<[u8; INLINE_BYTES]>,
}

/// Bytes a step may keep inside its ring header.
pub(crate) const INLINE_BYTES: usize = 64;

/// Collective records each rank's flight recorder keeps.
pub const FLIGHT_K: usize = 32;

/// Head of one rank's flight recorder: the number of the last call it entered.
#[repr(C, align(128))]
pub(crate) struct FlightHdr {
    pub entered: AtomicU64,
}

/// One collective call in the flight recorder, written only by its rank.
#[repr(C, align(64))]
pub(crate) struct FlightRec {
    /// Call number (1-based; 0 = empty).
    pub seq: AtomicU64,
    /// kind | dtype << 8 (dtype 0xff = none).
    pub code: AtomicU32,
    _r0: u32,
    pub bytes: AtomicU64,
    /// CLOCK_MONOTONIC nanoseconds at entry and exit (0 = not yet left).
    pub enter_ns: AtomicU64,
    pub exit_ns: AtomicU64,
}

/// Bytes of one rank's flight recorder.
pub(crate) const FLIGHT_BYTES: usize =
    std::mem::size_of::<FlightHdr>() + FLIGHT_K * std::mem::size_of::<FlightRec>();

const _: () = assert!(std::mem::size_of::<Header>() <= PAGE);
const _: () = assert!(std::mem::size_of::<GroupSlot>() == 64);
const _: () = assert!(std::mem::size_of::<FlightHdr>() == 128);
const _: () = assert!(std::mem::size_of::<FlightRec>() == 64);
const _: () = assert!(std::mem::size_of::<Ctl>() == 256);
const _: () = assert!(std::mem::size_of::<SlotHdr>() == 128);
const _: () = assert!(std::mem::size_of::<Chan>() == 256);

/// Offsets of every region for one (world, slot) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub world: usize,
    pub slot: usize,
    pub ctl_off: usize,
    pub hdr_off: usize,
    pub flight_off: usize,
    pub ring_off: usize,
    pub data_off: usize,
    /// Bytes per half of a point-to-point channel.
    pub pslot: usize,
    pub chan_off: usize,
    pub pdata_off: usize,
    pub total: usize,
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

impl Layout {
    pub fn new(world: usize, slot: usize) -> Layout {
        let ctl_off = PAGE;
        let hdr_off = round_up(ctl_off + world * std::mem::size_of::<Ctl>(), PAGE);
        let flight_off = round_up(hdr_off + world * 2 * std::mem::size_of::<SlotHdr>(), PAGE);
        let ring_off = round_up(flight_off + world * FLIGHT_BYTES, PAGE);
        let data_off = round_up(ring_off + world * RING_RANK, PAGE);
        let chan_off = data_off + world * 2 * slot;
        let chans = world * (world - 1);
        let pslot = (slot / (2 * (world - 1)).max(1) / PAGE * PAGE).max(PAGE);
        let pdata_off = round_up(chan_off + chans * std::mem::size_of::<Chan>(), PAGE);
        let total = pdata_off + chans * 2 * pslot;
        Layout {
            world,
            slot,
            ctl_off,
            hdr_off,
            flight_off,
            ring_off,
            data_off,
            pslot,
            chan_off,
            pdata_off,
            total,
        }
    }
    /// Index of the channel from rank `s` to rank `d != s`.
    fn chan_index(&self, s: usize, d: usize) -> usize {
        debug_assert!(s != d);
        s * (self.world - 1) + if d < s { d } else { d - 1 }
    }
    /// The channel from rank `s` to rank `d != s`.
    pub fn chan(&self, s: usize, d: usize) -> usize {
        self.chan_off + self.chan_index(s, d) * std::mem::size_of::<Chan>()
    }
    /// Half `half` of the channel from rank `s` to rank `d != s`.
    pub fn pdata(&self, s: usize, d: usize, half: usize) -> usize {
        self.pdata_off + (self.chan_index(s, d) * 2 + half) * self.pslot
    }
    pub fn ctl(&self, r: usize) -> usize {
        self.ctl_off + r * std::mem::size_of::<Ctl>()
    }
    /// Where step `s` of an operation whose descriptor says `bytes` goes. Every operation
    /// writes at most world x `bytes` into its place per step (scatter, all-to-all and
    /// reduce-scatter write a piece per rank), and the ranks agree on `bytes`: up to
    /// INLINE_BYTES in ring header s % (2 RING) itself (`2 + 2 RING + i`), up to RING_BYTES in
    /// that header and ring data entry s % RING (`2 + i`), else in half s % 2.
    pub fn place_for(&self, s: u64, bytes: u64) -> usize {
        let most = bytes.saturating_mul(self.world as u64);
        let i = (s % RING_HDRS as u64) as usize;
        if most <= INLINE_BYTES as u64 {
            2 + RING_HDRS + i
        } else if most <= RING_BYTES as u64 {
            2 + i
        } else {
            (s % 2) as usize
        }
    }
    /// Where a peer that took the other kind of place for step `s` than `h` put it (to describe
    /// a mismatch): its half if `h` is in the ring, else its ring header.
    pub fn other_place(&self, s: u64, h: usize) -> usize {
        if h < 2 {
            2 + (s % RING_HDRS as u64) as usize
        } else {
            (s % 2) as usize
        }
    }
    /// The header of rank `r`'s place `h` (a half or a ring header).
    pub fn slot_hdr(&self, r: usize, h: usize) -> usize {
        if h < 2 {
            self.hdr_off + (r * 2 + h) * std::mem::size_of::<SlotHdr>()
        } else {
            let i = (h - 2) % RING_HDRS;
            self.ring_off + r * RING_RANK + i * std::mem::size_of::<SlotHdr>()
        }
    }
    pub fn flight(&self, r: usize) -> usize {
        self.flight_off + r * FLIGHT_BYTES
    }
    /// The data of rank `r`'s place `h`: `slot` bytes for a half, RING_BYTES for a ring entry.
    pub fn data(&self, r: usize, h: usize) -> usize {
        if h < 2 {
            self.data_off + (r * 2 + h) * self.slot
        } else if h >= 2 + RING_HDRS {
            self.slot_hdr(r, h) + std::mem::offset_of!(SlotHdr, inline)
        } else {
            let hdrs = RING_HDRS * std::mem::size_of::<SlotHdr>();
            self.ring_off + r * RING_RANK + hdrs + (h - 2) % RING * RING_BYTES
        }
    }
}
