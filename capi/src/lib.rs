//! libtprun: tprun's collectives behind a C API in NCCL's shape (`include/tprun.h`, which
//! documents every call; README.md, "From C and C++").
//!
//! Each `extern "C"` function checks its arguments into an `ops::Op`, then runs it on the
//! communicator at once or, inside a group (`group`), at the outermost `tprunGroupEnd`. Nothing
//! unwinds into C: every entry point runs under `entry`, which turns a panic into
//! `tprunInternalError` with its message. Errors are a code plus a message kept per communicator
//! (`tprunGetLastError(comm)`) and per thread (`tprunGetLastError(NULL)`).

#![warn(missing_docs)]
#![allow(non_camel_case_types, non_upper_case_globals)]
// The entry points are C's: their pointer contract is tprun.h's, checked where it can be (NULL,
// sizes, overlaps); `unsafe fn` would change nothing for a C caller.
#![allow(clippy::not_unsafe_ptr_arg_deref)]
#![deny(unsafe_op_in_unsafe_fn)]

mod group;
mod ops;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use collectives::{CommError, Communicator, DType, ReduceOp};

use ops::{Check, Failure, Op, Redop};

/// `tprunResult_t` (an `int` in C; the values are NCCL's).
pub type tprunResult_t = c_int;
/// The call succeeded.
pub const tprunSuccess: c_int = 0;
/// The system refused something (shared memory, a file, a thread).
pub const tprunSystemError: c_int = 2;
/// A bug in tprun (a caught panic among them); the message says where.
pub const tprunInternalError: c_int = 3;
/// A bad argument (NULL pointer, count, root, peer, datatype, operator); nothing ran.
pub const tprunInvalidArgument: c_int = 4;
/// A call out of order (e.g. tprunGroupEnd without tprunGroupStart) or a misconfigured environment.
pub const tprunInvalidUsage: c_int = 5;
/// A peer died, left or did not arrive within the deadline; the message names it.
pub const tprunRemoteError: c_int = 6;

/// The first operator id `tprunRedOpCreatePreMulSum` hands out (`tprunNumOps`).
const NUM_OPS: c_int = 8;
const SCALAR_DEVICE: c_int = 0;
const SCALAR_HOST_IMMEDIATE: c_int = 1;

/// A failed call: its `tprunResult_t` and the message `tprunGetLastError` returns.
#[derive(Clone, Debug)]
pub(crate) struct Fail {
    pub code: c_int,
    pub msg: String,
}

impl Fail {
    pub fn invalid(msg: String) -> Fail {
        Fail {
            code: tprunInvalidArgument,
            msg,
        }
    }
    pub fn usage(msg: String) -> Fail {
        Fail {
            code: tprunInvalidUsage,
            msg,
        }
    }
    pub fn internal(msg: String) -> Fail {
        Fail {
            code: tprunInternalError,
            msg,
        }
    }
}

pub(crate) type Res<T = (), E = Fail> = Result<T, E>;

/// The result code of a collectives error: a dead, hung or aborted peer is remote; ranks that
/// disagree on a call are its (mismatched) arguments; set-up failures are the system's.
fn code_of(e: &CommError) -> c_int {
    match innermost(e) {
        CommError::Timeout { .. } | CommError::PeerDied { .. } | CommError::Aborted { .. } => {
            tprunRemoteError
        }
        CommError::Mismatch { .. } | CommError::Invalid { .. } => tprunInvalidArgument,
        CommError::Setup(_) => tprunSystemError,
        CommError::InGroup { .. } => tprunInternalError,
    }
}

/// The error under the group wrappers of a split communicator's errors.
fn innermost(mut e: &CommError) -> &CommError {
    while let CommError::InGroup { inner, .. } = e {
        e = inner;
    }
    e
}

/// The NCCL value of a `tprunDataType_t`.
fn dtype_of(name: &str, v: c_int) -> Res<DType> {
    Ok(match v {
        0 => DType::I8,
        1 => DType::U8,
        2 => DType::I32,
        3 => DType::U32,
        4 => DType::I64,
        5 => DType::U64,
        6 => DType::F16,
        7 => DType::F32,
        8 => DType::F64,
        9 => DType::BF16,
        _ => {
            return Err(Fail::invalid(format!(
                "{name}: datatype {v} is not a tprunDataType_t (0..9)"
            )))
        }
    })
}

/// A float scalar of `dtype` as f64 (`bytes` holds one element).
pub(crate) fn read_scalar(bytes: &[u8], dtype: DType) -> f64 {
    let two = || [bytes[0], bytes[1]];
    match dtype {
        DType::F64 => f64::from_ne_bytes(bytes[..8].try_into().unwrap_or([0; 8])),
        DType::F32 => f32::from_ne_bytes(bytes[..4].try_into().unwrap_or([0; 4])) as f64,
        DType::F16 => half::f16::from_ne_bytes(two()).to_f64(),
        DType::BF16 => half::bf16::from_ne_bytes(two()).to_f64(),
        // PreMulSum operators are only made for float types.
        _ => f64::NAN,
    }
}

/// A pre-multiplied sum made by `tprunRedOpCreatePreMulSum`.
#[derive(Clone, Copy, Debug)]
enum PreMul {
    Value(f64, DType),
    At(ops::Buf, DType),
}

/// What `tprunComm_t` points to.
pub struct tprunComm {
    rank: usize,
    world: usize,
    state: Mutex<State>,
    /// Slot `i` is operator `tprunNumOps + i`.
    premul: Mutex<Vec<Option<PreMul>>>,
    last_error: Mutex<CString>,
}

struct State {
    comm: Box<dyn Communicator>,
    /// Set when an operation left the communicator unusable (a dead or hung peer, ranks that
    /// disagreed): later calls return the same code at once.
    failed: Option<Fail>,
}

impl tprunComm {
    fn new(comm: Box<dyn Communicator>) -> *mut tprunComm {
        Box::into_raw(Box::new(tprunComm {
            rank: comm.rank(),
            world: comm.world_size(),
            state: Mutex::new(State { comm, failed: None }),
            premul: Mutex::new(Vec::new()),
            last_error: Mutex::new(CString::default()),
        }))
    }

    fn check(&self, name: &'static str) -> Check {
        Check {
            name,
            rank: self.rank,
            world: self.world,
        }
    }

    fn set_last_error(&self, msg: &str) {
        if let Ok(mut l) = self.last_error.lock() {
            *l = c_string(msg);
        }
    }

    /// The operator `op` names for `dtype` on this communicator.
    fn redop(&self, name: &'static str, op: c_int, dtype: DType) -> Res<Redop> {
        let fixed = match op {
            0 => ReduceOp::Sum,
            1 => ReduceOp::Product,
            2 => ReduceOp::Max,
            3 => ReduceOp::Min,
            4 => ReduceOp::Avg,
            5 => ReduceOp::BAnd,
            6 => ReduceOp::BOr,
            7 => ReduceOp::BXor,
            _ => {
                let pm = usize::try_from(op - NUM_OPS).ok().and_then(|i| {
                    self.premul
                        .lock()
                        .ok()
                        .and_then(|v| v.get(i).copied().flatten())
                });
                let Some(pm) = pm else {
                    return Err(Fail::invalid(format!(
                        "{name}: op {op} is not a tprunRedOp_t (tprunSum..tprunBxor, or one tprunRedOpCreatePreMulSum made on this communicator and not destroyed)"
                    )));
                };
                let (made_for, r) = match pm {
                    PreMul::Value(s, d) => (d, Redop::Fixed(ReduceOp::PreMulSum(s))),
                    PreMul::At(b, d) => (d, Redop::ScalarAt(b, d)),
                };
                if made_for != dtype {
                    return Err(Fail::invalid(format!(
                        "{name}: op {op} was made for {} and the data is {}",
                        made_for.name(),
                        dtype.name()
                    )));
                }
                return Ok(r);
            }
        };
        collectives::types::check_reducible(name, dtype, fixed)
            .map_err(|e| Fail::invalid(format!("{name}: {e}")))?;
        Ok(Redop::Fixed(fixed))
    }

    /// Runs `colls` in order, then `p2p` as one exchange, holding the communicator.
    fn execute(&self, colls: &[Op], p2p: &[Op]) -> Res {
        let mut st = self.state.lock().map_err(|_| {
            Fail::internal(
                "this communicator is unusable after an internal error in an earlier call".into(),
            )
        })?;
        if let Some(f) = &st.failed {
            return Err(Fail {
                code: f.code,
                msg: format!(
                    "this communicator failed earlier and cannot be used again (destroy it): {}",
                    f.msg
                ),
            });
        }
        let runs = colls
            .iter()
            .map(|o| (o.name(), std::slice::from_ref(o), false))
            .chain((!p2p.is_empty()).then(|| {
                let name = match p2p {
                    [one] => one.name(),
                    _ => "tprunSend/tprunRecv (grouped)",
                };
                (name, p2p, true)
            }));
        for (name, ops, is_p2p) in runs {
            // SAFETY: every Op was checked when its C call was made, and the C caller keeps its
            // buffers valid until this call (or its group) returns (tprun.h).
            let res = unsafe {
                if is_p2p {
                    ops::run_p2p(st.comm.as_mut(), ops)
                } else {
                    ops::run(st.comm.as_mut(), &ops[0])
                }
            };
            match res {
                Ok(()) => {}
                Err(Failure::Fail(f)) => return Err(f),
                Err(Failure::Comm(e)) => {
                    let f = Fail {
                        code: code_of(&e),
                        msg: format!("{name} on rank {} of {}: {e}", self.rank, self.world),
                    };
                    // Bad arguments are refused before any data moves; anything else leaves the
                    // ranks out of step.
                    if !matches!(innermost(&e), CommError::Invalid { .. }) {
                        st.failed = Some(f.clone());
                    }
                    return Err(f);
                }
            }
        }
        Ok(())
    }
}

fn c_string(msg: &str) -> CString {
    CString::new(msg.replace('\0', " ")).unwrap_or_default()
}

thread_local! {
    /// The last failure on this thread (`tprunGetLastError(NULL)`).
    static LAST: RefCell<CString> = RefCell::new(CString::default());
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs the body of entry point `name` on `comm` (may be NULL): catches panics, records a
/// failure on the thread and on `comm`, and inside a group makes `tprunGroupEnd` refuse to run.
fn entry(name: &'static str, comm: *const tprunComm, f: impl FnOnce() -> Res) -> tprunResult_t {
    let res = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(Fail::internal(format!(
            "{name}: internal error (please report it): {}",
            panic_message(p.as_ref())
        )))
    });
    match res {
        Ok(()) => tprunSuccess,
        Err(f) => {
            LAST.with(|l| *l.borrow_mut() = c_string(&f.msg));
            if !comm.is_null() {
                // SAFETY: a non-NULL comm is a live tprunComm_t (the caller's contract).
                unsafe { &*comm }.set_last_error(&f.msg);
            }
            group::note_error(name, &f);
            f.code
        }
    }
}

/// `comm` as a reference, refusing NULL.
///
/// # Safety
/// A non-NULL `comm` must come from tprunCommInit*/tprunCommSplit and not be destroyed.
unsafe fn comm_ref<'a>(name: &str, comm: *const tprunComm) -> Res<&'a tprunComm> {
    // SAFETY: the caller's contract.
    unsafe { comm.as_ref() }.ok_or_else(|| Fail::invalid(format!("{name}: comm is NULL")))
}

fn out_ptr<T>(name: &str, what: &str, p: *mut T) -> Res<&'static mut T> {
    // SAFETY: a non-NULL output pointer points to writable memory (the caller's contract).
    unsafe { p.as_mut() }.ok_or_else(|| Fail::invalid(format!("{name}: {what} is NULL")))
}

/// Runs `op` now, or queues it when this thread is inside a group.
fn submit(c: &tprunComm, op: Op) -> Res {
    match group::enqueue(c, op) {
        None => Ok(()),
        Some(op) if op.is_p2p() => c.execute(&[], std::slice::from_ref(&op)),
        Some(op) => c.execute(std::slice::from_ref(&op), &[]),
    }
}

fn init_fail(name: &str, e: &anyhow::Error) -> Fail {
    let code = e
        .downcast_ref::<CommError>()
        .map_or(tprunInvalidUsage, code_of);
    Fail {
        code,
        msg: format!("{name}: {e:#}"),
    }
}

/// Writes the library version (major * 10000 + minor * 100 + patch).
#[no_mangle]
pub extern "C" fn tprunGetVersion(version: *mut c_int) -> tprunResult_t {
    entry("tprunGetVersion", std::ptr::null(), || {
        *out_ptr("tprunGetVersion", "version", version)? = version_code();
        Ok(())
    })
}

/// TPRUN_VERSION_CODE of this build (the crate's version).
fn version_code() -> c_int {
    let part = |s: &str| s.parse::<c_int>().unwrap_or(0);
    part(env!("CARGO_PKG_VERSION_MAJOR")) * 10000
        + part(env!("CARGO_PKG_VERSION_MINOR")) * 100
        + part(env!("CARGO_PKG_VERSION_PATCH"))
}

/// A static description of a result code.
#[no_mangle]
pub extern "C" fn tprunGetErrorString(result: tprunResult_t) -> *const c_char {
    let s: &'static CStr = match result {
        tprunSuccess => c"no error",
        tprunSystemError => c"system error (the operating system refused: shared memory, files)",
        tprunInternalError => c"internal error (a bug in tprun; tprunGetLastError says where)",
        tprunInvalidArgument => c"invalid argument",
        tprunInvalidUsage => c"invalid usage",
        tprunRemoteError => c"remote error (a peer died, timed out, or the job was aborted)",
        _ => c"unknown result code",
    };
    s.as_ptr()
}

/// The last error message of `comm` (or of this thread, with NULL): op, rank and peer.
#[no_mangle]
pub extern "C" fn tprunGetLastError(comm: tprunComm_t) -> *const c_char {
    let r = catch_unwind(AssertUnwindSafe(|| {
        if comm.is_null() {
            return LAST.with(|l| l.borrow().as_ptr());
        }
        // SAFETY: a non-NULL comm is live (the caller's contract).
        let c = unsafe { &*comm };
        match c.last_error.lock() {
            // The CString lives in the communicator until the next failure replaces it.
            Ok(l) => l.as_ptr(),
            Err(_) => c"".as_ptr(),
        }
    }));
    r.unwrap_or(c"".as_ptr())
}

/// `tprunComm_t`.
pub type tprunComm_t = *mut tprunComm;

/// A communicator over every rank of the job, from the launcher's environment (tprun, torchrun, Open MPI, Slurm).
#[no_mangle]
pub extern "C" fn tprunCommInitFromEnv(comm: *mut tprunComm_t) -> tprunResult_t {
    const N: &str = "tprunCommInitFromEnv";
    entry(N, std::ptr::null(), || {
        let out = out_ptr(N, "comm", comm)?;
        let c = collectives::from_env().map_err(|e| init_fail(N, &e))?;
        *out = tprunComm::new(c);
        Ok(())
    })
}

/// A communicator for programs that rendezvous themselves: `nranks` ranks meeting by `job_key`.
#[no_mangle]
pub extern "C" fn tprunCommInitRank(
    comm: *mut tprunComm_t,
    nranks: c_int,
    job_key: *const c_char,
    rank: c_int,
) -> tprunResult_t {
    const N: &str = "tprunCommInitRank";
    entry(N, std::ptr::null(), || {
        let out = out_ptr(N, "comm", comm)?;
        if job_key.is_null() {
            return Err(Fail::invalid(format!("{N}: job_key is NULL")));
        }
        // SAFETY: a non-NULL job_key is a NUL-terminated string (the caller's contract).
        let key = unsafe { CStr::from_ptr(job_key) }
            .to_str()
            .map_err(|_| Fail::invalid(format!("{N}: job_key is not UTF-8")))?;
        let (Ok(world), Ok(me)) = (usize::try_from(nranks), usize::try_from(rank)) else {
            return Err(Fail::invalid(format!(
                "{N}: nranks {nranks} and rank {rank} must be 0 <= rank < nranks"
            )));
        };
        let c = collectives::join(key, world, me).map_err(|e| Fail {
            code: code_of(&e),
            msg: format!("{N} (rank {rank} of {nranks}, job key {key:?}): {e}"),
        })?;
        *out = tprunComm::new(c);
        Ok(())
    })
}

/// MPI_Comm_split / ncclCommSplit: ranks of one `color` form a group ordered by `key`, then rank.
#[no_mangle]
pub extern "C" fn tprunCommSplit(
    comm: tprunComm_t,
    color: c_int,
    key: c_int,
    newcomm: *mut tprunComm_t,
    _config: *mut c_void,
) -> tprunResult_t {
    const N: &str = "tprunCommSplit";
    entry(N, comm, || {
        // SAFETY: comm is NULL or live (the caller's contract).
        let c = unsafe { comm_ref(N, comm) }?;
        let out = out_ptr(N, "newcomm", newcomm)?;
        let color = match color {
            -1 => None,
            c if c >= 0 => Some(c as u32),
            _ => {
                return Err(Fail::invalid(format!(
                    "{N}: color {color} is negative (TPRUN_SPLIT_NOCOLOR is -1)"
                )))
            }
        };
        let mut st = c
            .state
            .lock()
            .map_err(|_| Fail::internal(format!("{N}: the communicator is unusable")))?;
        if let Some(f) = &st.failed {
            return Err(Fail {
                code: f.code,
                msg: format!("{N}: this communicator failed earlier: {}", f.msg),
            });
        }
        let new = st.comm.split(color, key as i64).map_err(|e| Fail {
            code: code_of(&e),
            msg: format!("{N} on rank {} of {}: {e}", c.rank, c.world),
        })?;
        *out = new.map_or(std::ptr::null_mut(), tprunComm::new);
        Ok(())
    })
}

/// Frees a communicator (a group's memory goes with its last member).
#[no_mangle]
pub extern "C" fn tprunCommDestroy(comm: tprunComm_t) -> tprunResult_t {
    const N: &str = "tprunCommDestroy";
    entry(N, std::ptr::null(), || {
        if comm.is_null() {
            return Ok(());
        }
        if group::holds(comm) {
            return Err(Fail::usage(format!(
                "{N}: this thread's open group holds operations on the communicator (call tprunGroupEnd first)"
            )));
        }
        // SAFETY: comm came from tprunComm::new (Box::into_raw) and is destroyed once (the
        // caller's contract).
        drop(unsafe { Box::from_raw(comm) });
        Ok(())
    })
}

/// Writes the number of ranks of `comm`.
#[no_mangle]
pub extern "C" fn tprunCommCount(comm: tprunComm_t, count: *mut c_int) -> tprunResult_t {
    const N: &str = "tprunCommCount";
    entry(N, comm, || {
        // SAFETY: comm is NULL or live (the caller's contract).
        let c = unsafe { comm_ref(N, comm) }?;
        *out_ptr(N, "count", count)? = c.world as c_int;
        Ok(())
    })
}

/// Writes this process's rank in `comm`.
#[no_mangle]
pub extern "C" fn tprunCommUserRank(comm: tprunComm_t, rank: *mut c_int) -> tprunResult_t {
    const N: &str = "tprunCommUserRank";
    entry(N, comm, || {
        // SAFETY: comm is NULL or live (the caller's contract).
        let c = unsafe { comm_ref(N, comm) }?;
        *out_ptr(N, "rank", rank)? = c.rank as c_int;
        Ok(())
    })
}

/// Creates a pre-multiplied-sum operator (each rank's input scaled by its `scalar`, then summed).
#[no_mangle]
pub extern "C" fn tprunRedOpCreatePreMulSum(
    op: *mut c_int,
    scalar: *mut c_void,
    datatype: c_int,
    residence: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    const N: &str = "tprunRedOpCreatePreMulSum";
    entry(N, comm, || {
        // SAFETY: comm is NULL or live (the caller's contract).
        let c = unsafe { comm_ref(N, comm) }?;
        let out = out_ptr(N, "op", op)?;
        let dtype = dtype_of(N, datatype)?;
        collectives::types::check_reducible(N, dtype, ReduceOp::PreMulSum(1.0))
            .map_err(|e| Fail::invalid(e.to_string()))?;
        let at = c.check(N).buf("scalar", scalar, 1, 1, dtype)?;
        let pm = match residence {
            SCALAR_HOST_IMMEDIATE => {
                // SAFETY: one element at a non-NULL scalar (the caller's contract).
                let s = read_scalar(unsafe { at.bytes() }, dtype);
                collectives::types::check_reducible(N, dtype, ReduceOp::PreMulSum(s))
                    .map_err(|e| Fail::invalid(e.to_string()))?;
                PreMul::Value(s, dtype)
            }
            SCALAR_DEVICE => PreMul::At(at, dtype),
            _ => {
                return Err(Fail::invalid(format!(
                    "{N}: residence {residence} is not a tprunScalarResidence_t (0 or 1)"
                )))
            }
        };
        let mut v = c
            .premul
            .lock()
            .map_err(|_| Fail::internal(format!("{N}: operator table poisoned")))?;
        let i = match v.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                v.push(None);
                v.len() - 1
            }
        };
        let id = c_int::try_from(i)
            .ok()
            .and_then(|i| i.checked_add(NUM_OPS))
            .ok_or_else(|| Fail::usage(format!("{N}: too many operators alive")))?;
        v[i] = Some(pm);
        *out = id;
        Ok(())
    })
}

/// Frees an operator made by tprunRedOpCreatePreMulSum.
#[no_mangle]
pub extern "C" fn tprunRedOpDestroy(op: c_int, comm: tprunComm_t) -> tprunResult_t {
    const N: &str = "tprunRedOpDestroy";
    entry(N, comm, || {
        // SAFETY: comm is NULL or live (the caller's contract).
        let c = unsafe { comm_ref(N, comm) }?;
        let mut v = c
            .premul
            .lock()
            .map_err(|_| Fail::internal(format!("{N}: operator table poisoned")))?;
        let slot = usize::try_from(op - NUM_OPS)
            .ok()
            .and_then(|i| v.get_mut(i));
        match slot {
            Some(s @ Some(_)) => {
                *s = None;
                Ok(())
            }
            _ => Err(Fail::invalid(format!(
                "{N}: op {op} was not made by tprunRedOpCreatePreMulSum on this communicator (or was destroyed already)"
            ))),
        }
    })
}

/// The body of every data call: `comm`, its datatype, then `make` builds the checked Op.
fn data_call(
    name: &'static str,
    comm: tprunComm_t,
    datatype: c_int,
    make: impl FnOnce(&tprunComm, Check, DType) -> Res<Op>,
) -> tprunResult_t {
    entry(name, comm, || {
        // SAFETY: comm is NULL or live (the caller's contract).
        let c = unsafe { comm_ref(name, comm) }?;
        let dtype = dtype_of(name, datatype)?;
        let op = make(c, c.check(name), dtype)?;
        submit(c, op)
    })
}

/// ncclAllReduce on host buffers (in place when sendbuff == recvbuff).
#[no_mangle]
pub extern "C" fn tprunAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    const N: &str = "tprunAllReduce";
    data_call(N, comm, datatype, |c, k, d| {
        k.all_reduce(sendbuff, recvbuff, count, d, c.redop(N, op, d)?)
    })
}

/// ncclAllGather on host buffers: recvbuff gets every rank's sendcount elements in rank order.
#[no_mangle]
pub extern "C" fn tprunAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    data_call("tprunAllGather", comm, datatype, |_, k, d| {
        k.all_gather(sendbuff, recvbuff, sendcount, d)
    })
}

/// ncclReduceScatter on host buffers: rank r gets chunk r of the reduction.
#[no_mangle]
pub extern "C" fn tprunReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: c_int,
    op: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    const N: &str = "tprunReduceScatter";
    data_call(N, comm, datatype, |c, k, d| {
        k.reduce_scatter(sendbuff, recvbuff, recvcount, d, c.redop(N, op, d)?)
    })
}

/// ncclBroadcast on host buffers: every recvbuff gets root's sendbuff.
#[no_mangle]
pub extern "C" fn tprunBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    data_call("tprunBroadcast", comm, datatype, |_, k, d| {
        k.broadcast(sendbuff, recvbuff, count, d, root)
    })
}

/// ncclReduce on host buffers: root's recvbuff gets the reduction.
#[no_mangle]
pub extern "C" fn tprunReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    root: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    const N: &str = "tprunReduce";
    data_call(N, comm, datatype, |c, k, d| {
        k.reduce(sendbuff, recvbuff, count, d, c.redop(N, op, d)?, root)
    })
}

/// All-to-all with equal chunks: chunk p of sendbuff goes to rank p.
#[no_mangle]
pub extern "C" fn tprunAllToAll(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    data_call("tprunAllToAll", comm, datatype, |_, k, d| {
        k.all_to_all(sendbuff, recvbuff, count, d)
    })
}

/// Gather to root: root's recvbuff gets every rank's chunk in rank order.
#[no_mangle]
pub extern "C" fn tprunGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    data_call("tprunGather", comm, datatype, |_, k, d| {
        k.gather(sendbuff, recvbuff, count, d, root)
    })
}

/// Scatter from root: rank r gets chunk r of root's sendbuff.
#[no_mangle]
pub extern "C" fn tprunScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    data_call("tprunScatter", comm, datatype, |_, k, d| {
        k.scatter(sendbuff, recvbuff, count, d, root)
    })
}

/// Returns once every rank of `comm` has called it.
#[no_mangle]
pub extern "C" fn tprunBarrier(comm: tprunComm_t) -> tprunResult_t {
    const N: &str = "tprunBarrier";
    entry(N, comm, || {
        // SAFETY: comm is NULL or live (the caller's contract).
        let c = unsafe { comm_ref(N, comm) }?;
        submit(c, Op::Barrier)
    })
}

/// ncclSend: blocking, or queued inside tprunGroupStart/End.
#[no_mangle]
pub extern "C" fn tprunSend(
    sendbuff: *const c_void,
    count: usize,
    datatype: c_int,
    peer: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    data_call("tprunSend", comm, datatype, |_, k, d| {
        k.send(sendbuff, count, d, peer)
    })
}

/// ncclRecv: blocking, or queued inside tprunGroupStart/End.
#[no_mangle]
pub extern "C" fn tprunRecv(
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    peer: c_int,
    comm: tprunComm_t,
) -> tprunResult_t {
    data_call("tprunRecv", comm, datatype, |_, k, d| {
        k.recv(recvbuff, count, d, peer)
    })
}

/// Starts queueing calls (nestable), as ncclGroupStart.
#[no_mangle]
pub extern "C" fn tprunGroupStart() -> tprunResult_t {
    entry("tprunGroupStart", std::ptr::null(), || {
        group::start();
        Ok(())
    })
}

/// Runs the queued calls together at the outermost end (a send/recv ring cannot deadlock).
#[no_mangle]
pub extern "C" fn tprunGroupEnd() -> tprunResult_t {
    entry("tprunGroupEnd", std::ptr::null(), group::end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error_with_its_message() {
        let code = entry("tprunTest", std::ptr::null(), || panic!("boom {}", 42));
        assert_eq!(code, tprunInternalError);
        let msg = unsafe { CStr::from_ptr(tprunGetLastError(std::ptr::null_mut())) };
        let msg = msg.to_str().unwrap();
        assert!(
            msg.contains("tprunTest") && msg.contains("boom 42"),
            "{msg}"
        );
    }

    #[test]
    fn header_names_the_codes_types_and_version_of_the_library() {
        let h = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../include/tprun.h"))
            .unwrap();
        let value = |name: &str| -> i64 {
            let at = h
                .find(&format!("  {name} = "))
                .unwrap_or_else(|| panic!("{name} missing"));
            let rest = &h[at + name.len() + 5..];
            let end = rest.find([',', '\n', ' ']).unwrap();
            let v = &rest[..end];
            v.strip_prefix("0x").map_or_else(
                || v.parse().unwrap(),
                |x| i64::from_str_radix(x, 16).unwrap(),
            )
        };
        for (name, code) in [
            ("tprunSuccess", tprunSuccess),
            ("tprunSystemError", tprunSystemError),
            ("tprunInternalError", tprunInternalError),
            ("tprunInvalidArgument", tprunInvalidArgument),
            ("tprunInvalidUsage", tprunInvalidUsage),
            ("tprunRemoteError", tprunRemoteError),
        ] {
            assert_eq!(value(name), code as i64, "{name}");
        }
        for (name, d) in [
            ("tprunInt8", DType::I8),
            ("tprunUint8", DType::U8),
            ("tprunInt32", DType::I32),
            ("tprunUint32", DType::U32),
            ("tprunInt64", DType::I64),
            ("tprunUint64", DType::U64),
            ("tprunFloat16", DType::F16),
            ("tprunFloat32", DType::F32),
            ("tprunFloat64", DType::F64),
            ("tprunBfloat16", DType::BF16),
        ] {
            assert_eq!(dtype_of("t", value(name) as c_int).unwrap(), d, "{name}");
        }
        assert_eq!(value("tprunNumOps"), NUM_OPS as i64);
        assert_eq!(value("tprunScalarDevice"), SCALAR_DEVICE as i64);
        assert_eq!(
            value("tprunScalarHostImmediate"),
            SCALAR_HOST_IMMEDIATE as i64
        );
        let def = |m: &str| -> c_int {
            let line = h
                .lines()
                .find(|l| l.starts_with(&format!("#define {m} ")))
                .unwrap();
            line.split_whitespace().nth(2).unwrap().parse().unwrap()
        };
        let code = def("TPRUN_MAJOR") * 10000 + def("TPRUN_MINOR") * 100 + def("TPRUN_PATCH");
        let mut v = 0;
        assert_eq!(tprunGetVersion(&mut v), tprunSuccess);
        assert_eq!(
            v, code,
            "tprun.h's TPRUN_VERSION_CODE and the crate version differ"
        );
    }

    #[test]
    fn every_result_code_has_a_distinct_string() {
        let all = [0, 2, 3, 4, 5, 6, 99].map(|c| {
            unsafe { CStr::from_ptr(tprunGetErrorString(c)) }
                .to_str()
                .unwrap()
                .to_string()
        });
        let mut uniq = all.to_vec();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), all.len(), "{all:?}");
    }

    #[test]
    fn a_world_of_one_runs_every_call_and_refuses_bad_ones() {
        let mut comm: tprunComm_t = std::ptr::null_mut();
        let key = c"capi-unit-solo";
        assert_eq!(
            tprunCommInitRank(&mut comm, 1, key.as_ptr(), 0),
            tprunSuccess
        );
        let mut x = [1.5f32, -2.0, 3.0];
        let p = x.as_mut_ptr() as *mut c_void;
        assert_eq!(tprunAllReduce(p, p, 3, 7, 0, comm), tprunSuccess);
        assert_eq!(x, [1.5, -2.0, 3.0]);
        let s: *mut f32 = Box::into_raw(Box::new(2.0f32));
        let mut op = 0;
        assert_eq!(
            tprunRedOpCreatePreMulSum(&mut op, s as *mut c_void, 7, 0, comm),
            tprunSuccess
        );
        // tprunScalarDevice: read when the operation runs, not at creation.
        unsafe { *s = 4.0 };
        assert_eq!(tprunAllReduce(p, p, 3, 7, op, comm), tprunSuccess);
        assert_eq!(x, [6.0, -8.0, 12.0]);
        assert_eq!(tprunAllReduce(p, p, 3, 9, op, comm), tprunInvalidArgument);
        let msg = unsafe { CStr::from_ptr(tprunGetLastError(comm)) }
            .to_str()
            .unwrap();
        assert!(
            msg.contains("was made for float and the data is bfloat16"),
            "{msg}"
        );
        assert_eq!(tprunRedOpDestroy(op, comm), tprunSuccess);
        assert_eq!(tprunRedOpDestroy(op, comm), tprunInvalidArgument);
        drop(unsafe { Box::from_raw(s) });
        assert_eq!(tprunAllReduce(p, p, 3, 7, 5, comm), tprunInvalidArgument);
        let msg = unsafe { CStr::from_ptr(tprunGetLastError(comm)) }
            .to_str()
            .unwrap();
        assert!(
            msg.contains("bitwise") && msg.contains("tprunAllReduce"),
            "{msg}"
        );
        assert_eq!(tprunAllReduce(p, p, 3, 10, 0, comm), tprunInvalidArgument);
        assert_eq!(tprunGroupEnd(), tprunInvalidUsage);
        assert_eq!(tprunCommDestroy(comm), tprunSuccess);
        assert_eq!(tprunCommDestroy(std::ptr::null_mut()), tprunSuccess);
    }
}
