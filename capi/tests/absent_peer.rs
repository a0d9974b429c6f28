//! A rank that never joins: its peer's first call times out with tprunRemoteError. Its own test
//! binary, because it shortens the communicator timeout for the whole process.

use std::ffi::{c_void, CStr, CString};
use std::ptr::null_mut;

use tprun::*;

const FLOAT64: i32 = 8;
const SUM: i32 = 0;

fn last(comm: tprunComm_t) -> String {
    // SAFETY: tprunGetLastError returns a NUL-terminated string.
    unsafe { CStr::from_ptr(tprunGetLastError(comm)) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_rank_that_never_comes_is_a_remote_error_naming_it() {
    std::env::set_var("TPRUN_COMM_TIMEOUT_S", "1");
    // Rank 0's named segment stays until every rank has attached: keep it out of /dev/shm.
    let dir = std::env::temp_dir().join(format!("tprun-capi-absent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::env::set_var("TPRUN_SHM_DIR", &dir);
    let k = CString::new(format!("capi-absent-{}", std::process::id())).unwrap();
    let mut c = null_mut();
    assert_eq!(tprunCommInitRank(&mut c, 2, k.as_ptr(), 0), tprunSuccess);
    let mut x = [1.0f64];
    let p = x.as_mut_ptr() as *mut c_void;
    assert_eq!(tprunAllReduce(p, p, 1, FLOAT64, SUM, c), tprunRemoteError);
    let msg = last(c);
    assert!(
        msg.contains("tprunAllReduce on rank 0 of 2") && msg.contains("rank 1"),
        "{msg}"
    );
    assert_eq!(tprunBarrier(c), tprunRemoteError);
    assert!(last(c).contains("failed earlier"), "{}", last(c));
    assert_eq!(tprunCommDestroy(c), tprunSuccess);
    std::fs::remove_dir_all(&dir).unwrap();
}
