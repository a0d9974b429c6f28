//! Creating, reserving, mapping and finding the job's segment.
//!
//! Three ways to get one:
//! - **memfd** (the normal case): tprun calls [`JobSegment::create`] before it starts the ranks;
//!   the ranks inherit the fd (`TPRUN_SHM_FD`). No name exists, so a crash leaks nothing; the
//!   memory goes away with the last process that maps it. With `TPRUN_SHM_DIR` set, the segment
//!   is an `O_TMPFILE` (or immediately unlinked) file in that directory instead, so tests can use
//!   a small tmpfs.
//! - **named** (ranks started some other way, e.g. by torchrun or by hand): rank 0 creates
//!   `/dev/shm/tprun-<uid>/<run id>` with `O_EXCL`, the others wait for it (with the deadline),
//!   and the last rank to map it unlinks the name (and the directory once empty), so it exists
//!   only during start-up. The directory is this user's alone (mode 700, checked before use).
//! - **in-process** ([`JobSegment::create_with`] + [`JobSegment::communicators`], or
//!   `ShmComm::new_group`): one memfd, one communicator per thread, for tests.
//!
//! Space is reserved with posix_fallocate at creation, so a full tmpfs is an error at start-up
//! instead of a SIGBUS in the middle of a collective.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::mman::{MapFlags, ProtFlags};
use nix::sys::stat::Mode;

use super::layout::{
    Chan, Ctl, FlightHdr, FlightRec, Header, Layout, SlotHdr, DEFAULT_SLOT_BYTES, FLIGHT_K, MAGIC,
    MAX_WORLD, PAGE, READY, VERSION,
};
use super::sys;
use super::{CommOptions, ShmComm};
use crate::{CommError, Result};

// Environment variables of the contract between tprun and the ranks.
/// The inherited segment's file descriptor.
pub const ENV_FD: &str = "TPRUN_SHM_FD";
/// The segment's size, checked against the mapping.
pub const ENV_BYTES: &str = "TPRUN_SHM_BYTES";
/// A directory for the segment instead of a memfd (a tmpfs with room, where /dev/shm is small).
pub const ENV_DIR: &str = "TPRUN_SHM_DIR";
/// Bytes per data half of each rank's slot ([`SegmentOptions`]).
pub const ENV_SLOT: &str = "TPRUN_SHM_SLOT_BYTES";

fn setup(msg: impl Into<String>) -> CommError {
    CommError::Setup(msg.into())
}

/// One mapping of the segment (the launcher's, a rank's, or the shared one of an in-process
/// group).
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
    /// The name to unlink if start-up fails before every rank has attached (named path).
    name: Option<PathBuf>,
}

// SAFETY: the mapping is plain shared memory owned by this value until Drop; everything that
// several threads or processes write in it is either an atomic or handed over by the step
// protocol (a writer publishes with a release store, readers read after an acquire load).
unsafe impl Send for Mapping {}
// SAFETY: see Send; `&Mapping` only hands out raw pointers and atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(fd: OwnedFd, len: usize, what: &str) -> Result<Mapping> {
        let nz = std::num::NonZeroUsize::new(len).ok_or_else(|| setup("empty segment"))?;
        // SAFETY: a fresh shared mapping of `fd` at an address the kernel picks; nothing else
        // aliases it yet. MAP_POPULATE pre-faults the (already reserved) pages.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
                fd.as_fd(),
                0,
            )
        }
        .map_err(|e| {
            setup(format!(
                "cannot map {len} bytes of shared memory ({what}): {}",
                e.desc()
            ))
        })?;
        Ok(Mapping {
            ptr: p.cast(),
            len,
            fd,
            name: None,
        })
    }
    /// Write-faults `len` bytes from `off` (page-aligned) into this process's page tables, so
    /// the first calls do not pay a page fault per page they write (~0.5 µs each, as much as a
    /// whole small collective). MAP_POPULATE maps a shared segment for reading only. Best
    /// effort: a kernel before 5.14 or a sandbox without MADV_POPULATE_WRITE just faults later.
    pub fn populate_write(&self, off: usize, len: usize) {
        let len = len.min(self.len.saturating_sub(off));
        if len == 0 || !off.is_multiple_of(PAGE) {
            return;
        }
        // SAFETY: [off, off + len) is inside this mapping (clamped above) and page-aligned at
        // its start; MADV_POPULATE_WRITE only faults pages in, it changes no byte.
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(off).cast(),
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }
    /// Reads one byte per cache line of `len` bytes from `off`, bringing the rings into this
    /// CPU's caches before the first small call: each of its entries is touched once per RING
    /// steps, so a cold ring costs a memory access per entry over a program's first calls.
    pub fn warm(&self, off: usize, len: usize) {
        let end = (off + len).min(self.len);
        let mut sum = 0u8;
        for o in (off..end).step_by(64) {
            // SAFETY: o < self.len, inside the mapping; a volatile byte read of shared memory
            // that other ranks may be writing (a torn value is fine: it is thrown away).
            sum ^= unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(o)) };
        }
        std::hint::black_box(sum);
    }
    /// Where this process mapped the segment.
    pub fn base(&self) -> *const u8 {
        self.ptr.as_ptr() as *const u8
    }
    pub fn header(&self) -> &Header {
        // SAFETY: offset 0 is page-aligned and the mapping is at least one page (checked by
        // every constructor); Header is all atomics and padding.
        unsafe { &*(self.ptr.as_ptr() as *const Header) }
    }
    pub fn ctl(&self, lay: &Layout, r: usize) -> &Ctl {
        debug_assert!(r < lay.world);
        // SAFETY: `lay` was validated against this mapping's length; the offset is 256-aligned.
        unsafe { &*(self.ptr.as_ptr().add(lay.ctl(r)) as *const Ctl) }
    }
    pub fn slot_hdr(&self, lay: &Layout, r: usize, half: usize) -> &SlotHdr {
        // SAFETY: as for `ctl`; 128-aligned.
        unsafe { &*(self.ptr.as_ptr().add(lay.slot_hdr(r, half)) as *const SlotHdr) }
    }
    /// Rank `r`'s flight recorder: its header and its FLIGHT_K records.
    pub fn flight(&self, lay: &Layout, r: usize) -> (&FlightHdr, &[FlightRec]) {
        debug_assert!(r < lay.world);
        // SAFETY: in bounds (validated layout); the region is page-aligned and FLIGHT_BYTES (a
        // multiple of 128) apart, the header is 128 B so the records that follow are 64-aligned;
        // all are atomics and padding, zeroed when the segment was made.
        unsafe {
            let p = self.ptr.as_ptr().add(lay.flight(r));
            let recs = p.add(std::mem::size_of::<FlightHdr>()) as *const FlightRec;
            (
                &*(p as *const FlightHdr),
                std::slice::from_raw_parts(recs, FLIGHT_K),
            )
        }
    }
    pub fn data(&self, lay: &Layout, r: usize, half: usize) -> *mut u8 {
        // SAFETY: in bounds, see `ctl`.
        unsafe { self.ptr.as_ptr().add(lay.data(r, half)) }
    }
    /// The point-to-point channel from rank `s` to rank `d`.
    pub fn chan(&self, lay: &Layout, s: usize, d: usize) -> &Chan {
        debug_assert!(s < lay.world && d < lay.world);
        // SAFETY: as for `ctl`; 256-aligned (page-aligned region of 256-byte entries).
        unsafe { &*(self.ptr.as_ptr().add(lay.chan(s, d)) as *const Chan) }
    }
    /// Half `half` of the channel from rank `s` to rank `d` (`lay.pslot` bytes).
    pub fn pdata(&self, lay: &Layout, s: usize, d: usize, half: usize) -> *mut u8 {
        // SAFETY: in bounds, see `ctl`.
        unsafe { self.ptr.as_ptr().add(lay.pdata(s, d, half)) }
    }
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    /// Removes the segment's name if it still has one and not every rank mapped it yet (a rank
    /// failed during start-up), so nothing is left in /dev/shm.
    fn unlink_if_unattached(&self) {
        if let Some(name) = &self.name {
            let h = self.header();
            if h.attached.load(SeqCst) < h.world_size.load(SeqCst)
                && h.unlinked.compare_exchange(0, 1, SeqCst, SeqCst).is_ok()
            {
                unlink_named(name);
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.unlink_if_unattached();
        // SAFETY: unmaps exactly the region mapped in `map`; every reference into it borrows
        // this Mapping (or an Arc of it), so none outlives this call.
        unsafe {
            let _ = nix::sys::mman::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Where and how big to make the segment.
#[derive(Clone, Debug)]
pub struct SegmentOptions {
    /// Directory for a file-backed segment (`TPRUN_SHM_DIR`); `None` = memfd.
    pub dir: Option<PathBuf>,
    /// Bytes per data half (`TPRUN_SHM_SLOT_BYTES`); a multiple of 4096.
    pub slot_bytes: usize,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            dir: None,
            slot_bytes: DEFAULT_SLOT_BYTES,
        }
    }
}

/// Largest accepted `TPRUN_SHM_SLOT_BYTES` (each rank maps two halves of it per peer).
const MAX_SLOT_BYTES: u64 = 1 << 30;

impl SegmentOptions {
    /// Defaults overridden by `TPRUN_SHM_DIR` and `TPRUN_SHM_SLOT_BYTES`.
    pub fn from_env() -> Result<SegmentOptions> {
        let mut o = SegmentOptions::default();
        if let Some(d) = std::env::var_os(ENV_DIR).filter(|d| !d.is_empty()) {
            o.dir = Some(PathBuf::from(d));
        }
        if let Some(s) = crate::env::var(ENV_SLOT).map_err(setup)? {
            o.slot_bytes = crate::env::parse_bytes(ENV_SLOT, &s, PAGE as u64..=MAX_SLOT_BYTES)
                .map_err(setup)? as usize;
            if o.slot_bytes == 0 || !o.slot_bytes.is_multiple_of(PAGE) {
                return Err(setup(format!(
                    "{ENV_SLOT}={s}: must be a positive multiple of {PAGE} bytes"
                )));
            }
        }
        Ok(o)
    }
    fn check(&self, world: usize) -> Result<()> {
        if world == 0 || world > MAX_WORLD {
            return Err(setup(format!(
                "world size {world} out of range 1..={MAX_WORLD}"
            )));
        }
        if self.slot_bytes == 0 || !self.slot_bytes.is_multiple_of(PAGE) {
            return Err(setup(format!(
                "slot size {} bytes must be a positive multiple of {PAGE}",
                self.slot_bytes
            )));
        }
        Ok(())
    }
}

fn mib(bytes: usize) -> String {
    let m = bytes as f64 / (1024.0 * 1024.0);
    if m >= 10.0 {
        format!("{m:.0}")
    } else {
        format!("{m:.1}")
    }
}

/// Reserves `len` bytes of `fd` up front, with a clear error when the filesystem is full.
fn reserve(fd: BorrowedFd<'_>, len: usize, where_: &str, dir: Option<&Path>) -> Result<()> {
    match nix::fcntl::posix_fallocate(fd.as_raw_fd(), 0, len as libc::off_t) {
        Ok(()) => Ok(()),
        Err(e) => {
            let free = dir
                .and_then(|d| nix::sys::statvfs::statvfs(d).ok())
                .map(|s| {
                    format!(
                        " ({} MiB free)",
                        mib(s.blocks_available() as usize * s.fragment_size() as usize)
                    )
                })
                .unwrap_or_default();
            Err(setup(format!(
                "cannot reserve {} MiB of shared memory in {where_}{free}: {}",
                mib(len),
                e.desc()
            )))
        }
    }
}

/// An inheritable (no CLOEXEC) memfd called `name` (shown in /proc/PID/fd only): it has no path,
/// so nothing is left on disk however its holders die.
pub(crate) fn inheritable_memfd(name: &str) -> Result<OwnedFd> {
    let cname = CString::new(name).map_err(|_| setup(format!("memfd name {name:?} has a NUL")))?;
    nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::empty())
        .map_err(|e| setup(format!("memfd_create failed: {}", e.desc())))
}

/// An unnamed, inheritable (no CLOEXEC) file: a memfd, or an O_TMPFILE in `dir`.
fn create_unnamed(dir: Option<&Path>) -> Result<OwnedFd> {
    match dir {
        None => inheritable_memfd("tprun-shm"),
        Some(d) => {
            let mode = Mode::from_bits_truncate(0o600);
            match nix::fcntl::open(d, OFlag::O_TMPFILE | OFlag::O_RDWR, mode) {
                // SAFETY: `open` returned a fresh fd that nothing else owns.
                Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {
                    // No O_TMPFILE here: create a unique name and unlink it at once.
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |t| t.as_nanos());
                    let p = d.join(format!(".tprun-{}-{nanos}", std::process::id()));
                    let fd =
                        nix::fcntl::open(&p, OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR, mode)
                            .map_err(|e| {
                                setup(format!("cannot create {}: {}", p.display(), e.desc()))
                            })?;
                    let _ = nix::unistd::unlink(&p);
                    // SAFETY: fresh fd from `open`.
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                }
                Err(e) => Err(setup(format!(
                    "cannot create shared memory in {}: {}",
                    d.display(),
                    e.desc()
                ))),
            }
        }
    }
}

/// Fills the header of a freshly reserved (zeroed) segment; `ready` is released last.
fn init_header(map: &Mapping, lay: &Layout) {
    let h = map.header();
    h.magic.store(MAGIC, Relaxed);
    h.version.store(VERSION, Relaxed);
    h.world_size.store(lay.world as u32, Relaxed);
    h.slot_bytes.store(lay.slot as u64, Relaxed);
    h.total_bytes.store(lay.total as u64, Relaxed);
    h.creator_pid.store(std::process::id(), Relaxed);
    h.creator_pidns.store(sys::pid_namespace(), Relaxed);
    h.ready.store(READY, Release);
}

/// Checks the header against what this rank expects and returns the layout.
fn validate(map: &Mapping, world: usize, what: &str) -> Result<Layout> {
    let h = map.header();
    if h.magic.load(Relaxed) != MAGIC || h.version.load(Relaxed) != VERSION {
        return Err(setup(format!(
            "{what} is not a tprun shared-memory segment of version {VERSION}"
        )));
    }
    let w = h.world_size.load(Relaxed) as usize;
    if w != world {
        return Err(setup(format!(
            "{what} was made for {w} ranks but WORLD_SIZE is {world}"
        )));
    }
    let lay = Layout::new(w, h.slot_bytes.load(Relaxed) as usize);
    if lay.total as u64 != h.total_bytes.load(Relaxed) || lay.total > map.len {
        return Err(setup(format!("{what} has an inconsistent size")));
    }
    Ok(lay)
}

/// The launcher's handle on the job's shared memory. Keep it alive for the whole job.
pub struct JobSegment {
    map: Arc<Mapping>,
    lay: Layout,
    /// Group segments opened by [`JobSegment::hold_groups`] while their rank 0 lived, kept so
    /// their flight recorders can be read after every member has gone.
    held: std::sync::Mutex<Vec<HeldGroup>>,
}

/// A registered group's segment, mapped by the launcher: (name, owner pid, fd) and the mapping.
type HeldGroup = ((String, u32, i32), Arc<Mapping>, Layout);

impl JobSegment {
    /// Creates the segment for `world_size` ranks (memfd, or a file in `TPRUN_SHM_DIR`), with its
    /// space reserved. Call before starting the ranks.
    pub fn create(world_size: usize) -> Result<JobSegment> {
        JobSegment::create_with(world_size, &SegmentOptions::from_env()?)
    }

    /// [`JobSegment::create`] with explicit options instead of the environment's (tests, tools).
    pub fn create_with(world_size: usize, opts: &SegmentOptions) -> Result<JobSegment> {
        opts.check(world_size)?;
        let lay = Layout::new(world_size, opts.slot_bytes);
        let fd = create_unnamed(opts.dir.as_deref())?;
        let where_ = match &opts.dir {
            Some(d) => d.display().to_string(),
            None => "memfd".to_string(),
        };
        reserve(fd.as_fd(), lay.total, &where_, opts.dir.as_deref())?;
        let map = Mapping::map(fd, lay.total, &where_)?;
        init_header(&map, &lay);
        Ok(JobSegment {
            held: Default::default(),
            map: Arc::new(map),
            lay,
        })
    }

    /// Variables every rank needs (on top of RANK/WORLD_SIZE). The fd is inheritable.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (ENV_FD.to_string(), self.map.raw_fd().to_string()),
            (ENV_BYTES.to_string(), self.lay.total.to_string()),
        ]
    }

    /// The segment's fd (inheritable), e.g. to keep it open across a fork.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.map.fd.as_fd()
    }

    /// The segment's size (header, control blocks and every rank's slot).
    pub fn total_bytes(&self) -> usize {
        self.lay.total
    }

    /// Ranks the segment was made for.
    pub fn world_size(&self) -> usize {
        self.lay.world
    }

    /// Marks the job failed because `failed_rank` died, and wakes every waiting rank; their
    /// pending and future collectives return [`CommError::Aborted`].
    pub fn abort(&self, failed_rank: usize) {
        let h = self.map.header();
        let _ = h
            .abort
            .compare_exchange(0, failed_rank as u32 + 1, SeqCst, SeqCst);
        for r in 0..self.lay.world {
            let c = self.map.ctl(&self.lay, r);
            sys::futex_wake_all(&c.seq);
            c.bell.fetch_add(1, SeqCst);
            sys::futex_wake_all(&c.bell);
        }
    }

    /// The rank that `abort` named, if the job was aborted.
    pub fn aborted(&self) -> Option<usize> {
        match self.map.header().abort.load(SeqCst) {
            0 => None,
            v => Some(v as usize - 1),
        }
    }

    /// Every rank's flight recorder as it is now (see [`super::flight`]).
    pub fn flight_records(&self) -> Vec<super::flight::RankFlight> {
        (0..self.lay.world)
            .map(|r| super::flight::read(&self.map, &self.lay, r))
            .collect()
    }

    /// Maps every group newly registered in the job segment (by its rank 0, through
    /// `/proc/<pid>/fd`) and drops those no longer registered (dropped normally). The launcher
    /// calls it every tick, so a group whose members all died is still readable.
    pub fn hold_groups(&self) {
        let live = super::flight::registered_groups(&self.map);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|(key, ..)| {
            live.iter()
                .any(|(n, p, f, _)| (n, *p, *f) == (&key.0, key.1, key.2))
        });
        for (name, pid, fd, n) in live {
            if held
                .iter()
                .any(|(k, ..)| (k.0.as_str(), k.1, k.2) == (name.as_str(), pid, fd))
            {
                continue;
            }
            if let Ok((map, lay)) = open_group(pid, fd, n) {
                held.push(((name, pid, fd), map, lay));
            }
        }
    }

    /// The flight recorders of every group that `split` made in this job and that is still
    /// registered (see [`JobSegment::hold_groups`]); ranks as world ranks.
    pub fn group_flight_records(&self) -> Vec<super::flight::GroupFlight> {
        self.hold_groups();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .map(|((name, ..), map, lay)| {
                let ranks: Vec<_> = (0..lay.world)
                    .map(|r| {
                        let mut f = super::flight::read(map, lay, r);
                        let w = map.ctl(lay, r).world_rank.load(SeqCst) as usize;
                        f.rank = w.checked_sub(1).unwrap_or(usize::MAX);
                        f
                    })
                    .collect();
                super::flight::GroupFlight {
                    name: name.clone(),
                    world_ranks: ranks.iter().map(|f| f.rank).collect(),
                    ranks,
                }
            })
            .collect()
    }

    /// One communicator per rank, sharing this process's mapping (ranks as threads).
    pub fn communicators(&self, opts: &CommOptions) -> Result<Vec<ShmComm>> {
        (0..self.lay.world)
            .map(|r| ShmComm::attach(self.map.clone(), self.lay, r, opts.clone()))
            .collect()
    }
}

/// A group's segment (see [`super::split`]): like the job's, for `world` ranks with `slot`-byte
/// halves, in a memfd (or an O_TMPFILE in `TPRUN_SHM_DIR`) that this process's children do not
/// inherit; the other members open it through this process's /proc.
pub(crate) fn create_group(world: usize, slot: usize) -> Result<(Arc<Mapping>, Layout)> {
    let mut opts = SegmentOptions::from_env()?;
    opts.slot_bytes = slot;
    let seg = JobSegment::create_with(world, &opts)?;
    nix::fcntl::fcntl(
        seg.map.raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| {
        setup(format!(
            "cannot mark the group's segment close-on-exec: {}",
            e.desc()
        ))
    })?;
    Ok((seg.map, seg.lay))
}

/// Maps the group segment that process `pid` holds as fd `fd` (its /proc entry).
pub(crate) fn open_group(pid: u32, fd: i32, world: usize) -> Result<(Arc<Mapping>, Layout)> {
    let path = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
    let what = format!("the group's segment ({})", path.display());
    let raw = nix::fcntl::open(&path, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| setup(format!("cannot open {what}: {} (the group's rank 0 must be a process of this user in this pid namespace)", e.desc())))?;
    // SAFETY: fresh fd from `open`.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = nix::sys::stat::fstat(owned.as_raw_fd())
        .map_err(|e| setup(format!("cannot stat {what}: {}", e.desc())))?
        .st_size as usize;
    if len < PAGE {
        return Err(setup(format!("{what} is too small ({len} bytes)")));
    }
    let map = Mapping::map(owned, len, &what)?;
    let lay = validate(&map, world, &what)?;
    Ok((Arc::new(map), lay))
}

/// Takes the fd that tprun passed in environment variable `var` = `fd_s`: checks it is open,
/// marks it CLOEXEC (nothing this rank starts inherits it) and returns a dup of it (dropping that
/// never closes the inherited number itself) with its fstat.
pub(crate) fn claim_inherited_fd(var: &str, fd_s: &str) -> Result<(OwnedFd, libc::stat)> {
    let fd: RawFd = fd_s
        .trim()
        .parse()
        .ok()
        .filter(|&f| f >= 0)
        .ok_or_else(|| setup(format!("{var}={fd_s} is not a file descriptor number")))?;
    let what = format!("{var}={fd}");
    let st = nix::sys::stat::fstat(fd).map_err(|e| {
        setup(format!(
            "{what}: not an open file ({}); was this rank started by tprun?",
            e.desc()
        ))
    })?;
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| setup(format!("{what}: {}", e.desc())))?;
    // SAFETY: the launcher handed this fd to the rank for exactly this purpose and fstat just
    // showed it open; the caller makes sure only one owner per process takes it.
    let owned = unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .map_err(|e| setup(format!("{what}: cannot dup: {e}")))?;
    Ok((owned, st))
}

/// Maps the segment tprun passed in `TPRUN_SHM_FD`.
pub(crate) fn attach_fd(fd_s: &str, world: usize) -> Result<(Arc<Mapping>, Layout)> {
    // `from_env` makes sure only one live communicator per process takes it (see `TAKEN` in
    // shm/mod.rs).
    let (owned, st) = claim_inherited_fd(ENV_FD, fd_s)?;
    let what = format!("{ENV_FD}={}", fd_s.trim());
    let len = st.st_size as usize;
    if let Ok(b) = std::env::var(ENV_BYTES) {
        if b.trim().parse::<usize>().ok() != Some(len) {
            return Err(setup(format!(
                "{what} is {len} bytes but {ENV_BYTES}={b}: the fd number does not name the job's segment"
            )));
        }
    }
    if len < PAGE {
        return Err(setup(format!(
            "{what} is too small ({len} bytes) to be a tprun segment"
        )));
    }
    let map = Mapping::map(owned, len, &what)?;
    let lay = validate(&map, world, &what)?;
    Ok((Arc::new(map), lay))
}

/// The directory of named segments: `tprun-<uid>` under `TPRUN_SHM_DIR`, else under
/// `XDG_RUNTIME_DIR`, else under /dev/shm.
///
/// Why a directory of our own: in a directory every user can write (/dev/shm), another local
/// user could create a job's name first and so block, read or forge that job (its key, a port or
/// a Slurm job id, is easy to guess). Only we can create names in a directory that is ours with
/// mode 700, so the file names in it need no secret. The directory itself must be checked (see
/// [`private_dir`]): someone else may have made it first.
pub(crate) fn named_dir() -> PathBuf {
    let base = [ENV_DIR, "XDG_RUNTIME_DIR"]
        .iter()
        .find_map(|v| std::env::var_os(v).filter(|d| !d.is_empty()))
        .map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from);
    // SAFETY: getuid cannot fail and touches no memory of ours.
    let uid = unsafe { libc::getuid() };
    base.join(format!("tprun-{uid}"))
}

/// The path of the named segment for `key` (run id or master port) in [`named_dir`].
pub(crate) fn named_path(key: &str) -> PathBuf {
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    named_dir().join(safe)
}

/// Checks that `dir` is a directory (not a link) of this user that nobody else can use (mode
/// 700), creating it first when `create`. `Ok(false)`: it does not exist (and `!create`).
fn private_dir(dir: &Path, create: bool) -> Result<bool> {
    if create {
        match nix::unistd::mkdir(dir, Mode::S_IRWXU) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(setup(format!(
                    "cannot create the directory {} for the job's shared memory: {}",
                    dir.display(),
                    e.desc()
                )))
            }
        }
    }
    let st = match nix::sys::stat::lstat(dir) {
        Ok(st) => st,
        Err(Errno::ENOENT) if !create => return Ok(false),
        Err(e) => {
            return Err(setup(format!(
                "cannot stat {}: {}",
                dir.display(),
                e.desc()
            )))
        }
    };
    // SAFETY: getuid cannot fail and touches no memory of ours.
    let me = unsafe { libc::getuid() };
    dir_ok(dir, st.st_uid, st.st_mode, me).map(|()| true)
}

/// The test of [`private_dir`], apart from the lstat.
fn dir_ok(dir: &Path, uid: u32, mode: u32, me: u32) -> Result<()> {
    let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
    if is_dir && uid == me && mode & 0o077 == 0 {
        return Ok(());
    }
    Err(setup(format!(
        "{} is {} owned by uid {uid} with mode {:03o}, but the job's shared memory needs a directory of this user (uid {me}) with mode 700 that nobody else can use: remove it, or set {ENV_DIR} to a directory of yours",
        dir.display(),
        if is_dir { "a directory" } else { "not a directory" },
        mode & 0o777
    )))
}

/// Removes a named segment's name, then its directory if that is now empty (another job's
/// segment in it keeps it; a rank 0 that loses its directory this way makes it again).
fn unlink_named(path: &Path) {
    let _ = nix::unistd::unlink(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

fn open_existing(path: &Path) -> std::result::Result<OwnedFd, Errno> {
    let flags = OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let fd = nix::fcntl::open(path, flags, Mode::empty())?;
    // SAFETY: fresh fd from `open`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Refuses a named segment that another user could have made or can read: in a shared
/// directory (`TPRUN_SHM_DIR`) anyone may create our name first and then see or forge every
/// rank's tensors.
fn check_private(fd: &OwnedFd, path: &Path) -> Result<()> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| setup(format!("cannot stat {}: {}", path.display(), e.desc())))?;
    // SAFETY: getuid cannot fail and touches no memory of ours.
    let me = unsafe { libc::getuid() };
    owner_and_mode_ok(path, st.st_uid, st.st_mode, me)
}

/// The test of [`check_private`], apart from the fstat.
fn owner_and_mode_ok(path: &Path, uid: u32, mode: u32, me: u32) -> Result<()> {
    if uid == me && mode & 0o077 == 0 {
        return Ok(());
    }
    Err(setup(format!(
        "{} is owned by uid {uid} with mode {:03o}, but a named segment must belong to this user (uid {me}) with mode 600: remove it, or give this job another TPRUN_RUN_ID / MASTER_PORT",
        path.display(),
        mode & 0o777
    )))
}

/// Is the segment at `fd` left over from a dead job (creator gone)?
fn stale(fd: &OwnedFd) -> bool {
    let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) else {
        return false;
    };
    if (st.st_size as usize) < PAGE {
        return false;
    }
    let Ok(dup) = fd.try_clone() else {
        return false;
    };
    let Ok(m) = Mapping::map(dup, PAGE, "existing segment") else {
        return false;
    };
    let h = m.header();
    h.ready.load(Acquire) == READY
        && h.creator_pidns.load(Relaxed) == sys::pid_namespace()
        && !sys::pid_alive(h.creator_pid.load(Relaxed))
}

/// Rank 0 of the named path: create with O_EXCL (replacing a stale one once), reserve, init.
fn create_named(path: &Path, lay: &Layout) -> Result<Mapping> {
    let mode = Mode::from_bits_truncate(0o600);
    let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut replaced = false;
    // Another job's last rank may remove the (empty) directory between our check and our
    // create: then make it again, a bounded number of times.
    let mut lost_dir = 0;
    let fd = loop {
        private_dir(dir, true)?;
        match nix::fcntl::open(path, flags, mode) {
            // SAFETY: fresh fd from `open`.
            Ok(fd) => break unsafe { OwnedFd::from_raw_fd(fd) },
            Err(Errno::ENOENT) if lost_dir < 100 => lost_dir += 1,
            Err(Errno::EEXIST) if !replaced => {
                replaced = true;
                if let Ok(old) = open_existing(path) {
                    check_private(&old, path)?;
                    if stale(&old) {
                        let _ = nix::unistd::unlink(path);
                        continue;
                    }
                }
                return Err(setup(format!(
                    "{} already exists and belongs to a live job: give this job another TPRUN_RUN_ID / MASTER_PORT",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(setup(format!(
                    "cannot create {}: {}",
                    path.display(),
                    e.desc()
                )))
            }
        }
    };
    let res = reserve(fd.as_fd(), lay.total, &dir.display().to_string(), Some(dir))
        .and_then(|()| Mapping::map(fd, lay.total, &path.display().to_string()));
    match res {
        Ok(mut m) => {
            m.name = Some(path.to_path_buf());
            init_header(&m, lay);
            Ok(m)
        }
        Err(e) => {
            unlink_named(path);
            Err(e)
        }
    }
}

/// Ranks > 0 of the named path: wait (until `deadline`) for rank 0's segment to appear and be
/// initialised by a live creator.
fn open_named(path: &Path, world: usize, deadline: Instant) -> Result<Mapping> {
    let mut sleep = Duration::from_millis(1);
    let mut last = String::from("it does not exist");
    let dir = path.parent().unwrap_or(Path::new("/"));
    loop {
        // Fails at once on a directory someone else made, rather than at the deadline.
        if !private_dir(dir, false)? {
            last = format!("its directory {} does not exist", dir.display());
        }
        match open_existing(path) {
            Ok(fd) => {
                check_private(&fd, path)?;
                let size = nix::sys::stat::fstat(fd.as_raw_fd()).map_or(0, |s| s.st_size as usize);
                if size >= PAGE {
                    let mut m = Mapping::map(fd, size, &path.display().to_string())?;
                    let h = m.header();
                    if h.ready.load(Acquire) == READY {
                        let ns_ok = h.creator_pidns.load(Relaxed) == sys::pid_namespace();
                        if ns_ok && !sys::pid_alive(h.creator_pid.load(Relaxed)) {
                            last = "it is left over from a dead job".into();
                        } else {
                            validate(&m, world, &path.display().to_string())?;
                            m.name = Some(path.to_path_buf());
                            return Ok(m);
                        }
                    } else {
                        last = "rank 0 has not initialised it".into();
                    }
                } else {
                    last = "rank 0 has not reserved it".into();
                }
            }
            Err(Errno::ENOENT) => {}
            Err(e) => {
                return Err(setup(format!(
                    "cannot open {}: {}",
                    path.display(),
                    e.desc()
                )))
            }
        }
        if Instant::now() >= deadline {
            return Err(setup(format!(
                "timed out waiting for rank 0 to create {} ({last})",
                path.display()
            )));
        }
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(20));
    }
}

/// Named rendezvous: rank 0 creates, the others open; the last rank to map unlinks the name.
pub(crate) fn attach_named(
    key: &str,
    world: usize,
    rank: usize,
    timeout: Duration,
) -> Result<(Arc<Mapping>, Layout)> {
    let path = named_path(key);
    let opts = SegmentOptions::from_env()?;
    opts.check(world)?;
    let map = if rank == 0 {
        create_named(&path, &Layout::new(world, opts.slot_bytes))?
    } else {
        open_named(&path, world, Instant::now() + timeout)?
    };
    let lay = validate(&map, world, &path.display().to_string())?;
    let h = map.header();
    if h.attached.fetch_add(1, SeqCst) as usize + 1 == world
        && h.unlinked.compare_exchange(0, 1, SeqCst, SeqCst).is_ok()
    {
        unlink_named(&path);
    }
    Ok((Arc::new(map), lay))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_named_segment_others_can_read_is_refused() {
        let dir = std::env::temp_dir().join(format!("tprun-seg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.join("tprun-0-shared");
        std::fs::write(&path, [0u8; PAGE]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let deadline = Instant::now() + Duration::from_millis(200);
        let e = open_named(&path, 2, deadline)
            .err()
            .expect("opened")
            .to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("mode 644") && e.contains("owned by uid"), "{e}");
    }

    #[test]
    fn a_named_segment_of_another_user_is_refused() {
        let p = Path::new("/dev/shm/tprun-1000-x");
        let e = owner_and_mode_ok(p, 1001, 0o100600, 1000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/shm/tprun-1000-x is owned by uid 1001 with mode 600"),
            "{e}"
        );
        assert!(e.contains("this user (uid 1000)"), "{e}");
        assert!(owner_and_mode_ok(p, 1000, 0o100600, 1000).is_ok());
        assert!(owner_and_mode_ok(p, 1000, 0o100660, 1000).is_err());
    }

    #[test]
    fn a_segment_directory_others_can_use_is_refused() {
        let d = Path::new("/dev/shm/tprun-1000");
        let e = dir_ok(d, 1001, libc::S_IFDIR | 0o700, 1000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/shm/tprun-1000 is a directory owned by uid 1001 with mode 700"),
            "{e}"
        );
        assert!(
            e.contains("this user (uid 1000)") && e.contains(ENV_DIR),
            "{e}"
        );
        let e = dir_ok(d, 1000, libc::S_IFDIR | 0o777, 1000).unwrap_err();
        assert!(e.to_string().contains("mode 777"), "{e}");
        let e = dir_ok(d, 1000, libc::S_IFREG | 0o700, 1000).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        assert!(dir_ok(d, 1000, libc::S_IFDIR | 0o700, 1000).is_ok());
    }

    #[test]
    fn the_segment_directory_is_made_private_and_checked() {
        let base = std::env::temp_dir().join(format!("tprun-seg-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join("tprun-x");
        assert!(!private_dir(&dir, false).unwrap());
        assert!(private_dir(&dir, true).unwrap());
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Opened up afterwards (or made so by someone else): refused, by creator and openers.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for create in [true, false] {
            let e = private_dir(&dir, create).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{} is a directory", dir.display())),
                "{e}"
            );
        }
        // A link to a private directory is not one.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = base.join("tprun-link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = private_dir(&link, true).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&base);
        assert!(e.contains("is not a directory"), "{e}");
    }
}
