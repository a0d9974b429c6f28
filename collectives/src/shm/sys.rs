//! Thin OS helpers: shared (cross-process) futex, peer liveness, the CPU count.

use std::sync::atomic::AtomicU32;
use std::sync::OnceLock;
use std::time::Duration;

/// Sleeps while `*word == expected`, at most `timeout`. Spurious returns are fine: callers loop.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, 4-byte-aligned u32 (inside a MAP_SHARED mapping that outlives the
    // call); `ts` lives on the stack for the call. FUTEX_WAIT without FUTEX_PRIVATE_FLAG keys the
    // wait on the underlying shared page, so a wake from another process that maps the same
    // segment reaches it. The kernel only reads the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every sleeper on `word` (in any process mapping it).
pub(crate) fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: as in `futex_wait`; FUTEX_WAKE only uses the address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Inode of this process's pid namespace (0 if unknown): pids are only comparable within one.
pub(crate) fn pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// False when `pid` has certainly exited (no such process, or a zombie waiting to be reaped).
pub(crate) fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return true;
    }
    if let Err(nix::errno::Errno::ESRCH) =
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None)
    {
        return false;
    }
    // A killed child stays a zombie until its parent reaps it; it is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next()),
            Some("Z" | "X" | "x")
        ),
        Err(_) => true,
    }
}

/// Online CPUs on the host (not the affinity mask: the launcher may pin each rank to one core,
/// which does not mean the ranks share it).
pub(crate) fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The CPU this thread runs on, + 1 (0 if unknown). A vDSO/rseq read, ~20 ns.
pub(crate) fn current_cpu() -> u32 {
    // SAFETY: sched_getcpu has no preconditions and touches no memory of ours.
    let c = unsafe { libc::sched_getcpu() };
    if c >= 0 {
        c as u32 + 1
    } else {
        0
    }
}

/// Copies `dst.len()` bytes from address `remote` of process `pid` into `dst` (Linux
/// cross-memory attach: one copy, no shared staging). Fails as the kernel does: EPERM where
/// ptrace rules forbid it, ENOSYS/EPERM under sandboxes that filter the call, ESRCH once the
/// process is gone.
pub(crate) fn peer_read(pid: u32, remote: u64, dst: &mut [u8]) -> std::io::Result<()> {
    // SAFETY: `dst` is borrowed mutably for the call, so the kernel may write all of it.
    unsafe { peer_copy(pid, remote, dst.as_mut_ptr(), dst.len(), false) }
}

/// Copies `src` to address `remote` of process `pid` (see [`peer_read`]).
pub(crate) fn peer_write(pid: u32, remote: u64, src: &[u8]) -> std::io::Result<()> {
    // SAFETY: the kernel only reads `src` when writing to the peer.
    unsafe { peer_copy(pid, remote, src.as_ptr() as *mut u8, src.len(), true) }
}

/// `process_vm_readv` (or `_writev` with `write`) of `len` bytes at `local`, one call per piece
/// the kernel accepts.
///
/// # Safety
/// `local` must be valid for `len` bytes of writes (reads only, with `write`).
unsafe fn peer_copy(
    pid: u32,
    remote: u64,
    local: *mut u8,
    len: usize,
    write: bool,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        let l = libc::iovec {
            // SAFETY: done < len, inside the caller's buffer.
            iov_base: unsafe { local.add(done) }.cast(),
            iov_len: len - done,
        };
        let r = libc::iovec {
            iov_base: (remote as usize + done) as *mut libc::c_void,
            iov_len: len - done,
        };
        let pid = pid as libc::pid_t;
        // SAFETY: `l` is inside the caller's buffer (this function's contract); the kernel checks
        // `r` against the other process's mappings (EFAULT, never our memory).
        let n = unsafe {
            if write {
                libc::process_vm_writev(pid, &l, 1, &r, 1, 0)
            } else {
                libc::process_vm_readv(pid, &l, 1, &r, 1, 0)
            }
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
        }
        done += n as usize;
    }
    Ok(())
}

/// Under Yama's ptrace_scope 1 (Ubuntu's default) a process may only read the memory of its own
/// descendants, and ranks are siblings: let any process of this user attach, as Open MPI's
/// shared-memory transport does. Scopes 2 and 3 stay refused (the ranks then copy through the
/// segment). Without Yama there is nothing to do.
pub(crate) fn allow_peer_access() {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope");
    if scope.map(|s| s.trim() == "1").unwrap_or(false) {
        // SAFETY: prctl(PR_SET_PTRACER) takes integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
    }
}

// membarrier(2) commands (linux/membarrier.h).
const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_GLOBAL_EXPEDITED: libc::c_int = 1 << 1;
const MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED: libc::c_int = 1 << 2;

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes integer arguments only and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) }
}

/// Whether this process may publish a step with a plain (release) store and a plain load of the
/// sleeper count, without the full fence that a store followed by a load otherwise needs
/// (~35% of a small broadcast's time: the fence waits for every earlier store's cache line).
/// True once the process is registered for `MEMBARRIER_CMD_GLOBAL_EXPEDITED`: a peer about to
/// sleep then calls [`fence_peers`], which runs that fence on our CPU for us (the asymmetric
/// Dekker pattern). Where the kernel or a sandbox lacks it, publishing keeps the full fence.
pub(crate) fn light_publish() -> bool {
    static LIGHT: OnceLock<bool> = OnceLock::new();
    *LIGHT.get_or_init(|| {
        let q = membarrier(MEMBARRIER_CMD_QUERY);
        q >= 0
            && q & MEMBARRIER_CMD_GLOBAL_EXPEDITED as libc::c_long != 0
            && membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) == 0
    })
}

/// Called by a waiter after it announced itself as a sleeper and before it re-checks the word it
/// sleeps on: every running thread of a process registered by [`light_publish`] executes a full
/// memory barrier, so either that publisher's store is visible to our re-check or its later
/// load of the sleeper count sees us. Called only by communicators that publish light, so the
/// command is there.
pub(crate) fn fence_peers() {
    membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED);
}
