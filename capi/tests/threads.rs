//! tprunCommInitRank between threads of one process, and one thread driving two ranks through a
//! group (NCCL's single-process, several-communicators pattern), through the C entry points.

use std::ffi::{c_void, CStr, CString};
use std::ptr::null_mut;

use tprun::*;

const INT32: i32 = 2;
const UINT8: i32 = 1;
const FLOAT64: i32 = 8;
const SUM: i32 = 0;

fn key(tag: &str) -> CString {
    CString::new(format!("capi-{tag}-{}", std::process::id())).unwrap()
}

fn last(comm: tprunComm_t) -> String {
    // SAFETY: tprunGetLastError returns a NUL-terminated string.
    unsafe { CStr::from_ptr(tprunGetLastError(comm)) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn ranks_on_threads_meet_by_their_job_key() {
    let k = key("threads");
    let hs: Vec<_> = (0..3)
        .map(|r| {
            let k = k.clone();
            std::thread::spawn(move || {
                let mut c = null_mut();
                assert_eq!(
                    tprunCommInitRank(&mut c, 3, k.as_ptr(), r),
                    tprunSuccess,
                    "{}",
                    last(null_mut())
                );
                let (mut n, mut me) = (0, 0);
                assert_eq!(tprunCommCount(c, &mut n), tprunSuccess);
                assert_eq!(tprunCommUserRank(c, &mut me), tprunSuccess);
                assert_eq!((n, me), (3, r));
                let mut x = [r as f64 + 1.0; 5];
                let p = x.as_mut_ptr() as *mut c_void;
                assert_eq!(
                    tprunAllReduce(p, p, 5, FLOAT64, SUM, c),
                    tprunSuccess,
                    "{}",
                    last(c)
                );
                assert_eq!(x, [6.0; 5]);
                assert_eq!(tprunCommDestroy(c), tprunSuccess);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

#[test]
fn one_thread_drives_two_ranks_through_a_group() {
    let k = key("one-thread");
    let (mut c0, mut c1) = (null_mut(), null_mut());
    assert_eq!(tprunCommInitRank(&mut c0, 2, k.as_ptr(), 0), tprunSuccess);
    assert_eq!(tprunCommInitRank(&mut c1, 2, k.as_ptr(), 1), tprunSuccess);
    let mut a = [1i32, 2, 3];
    let mut b = [10i32, 20, 30];
    let (s0, s1) = ([7u8; 4], [9u8; 4]);
    let (mut r0, mut r1) = ([0u8; 4], [0u8; 4]);
    let (pa, pb) = (a.as_mut_ptr() as *mut c_void, b.as_mut_ptr() as *mut c_void);
    assert_eq!(tprunGroupStart(), tprunSuccess);
    assert_eq!(tprunAllReduce(pa, pa, 3, INT32, SUM, c0), tprunSuccess);
    assert_eq!(tprunAllReduce(pb, pb, 3, INT32, SUM, c1), tprunSuccess);
    assert_eq!(tprunSend(s0.as_ptr() as _, 4, UINT8, 1, c0), tprunSuccess);
    assert_eq!(
        tprunRecv(r0.as_mut_ptr() as _, 4, UINT8, 1, c0),
        tprunSuccess
    );
    assert_eq!(
        tprunRecv(r1.as_mut_ptr() as _, 4, UINT8, 0, c1),
        tprunSuccess
    );
    assert_eq!(tprunSend(s1.as_ptr() as _, 4, UINT8, 0, c1), tprunSuccess);
    // Nothing has run yet.
    assert_eq!((a, r0), ([1, 2, 3], [0; 4]));
    assert_eq!(tprunGroupEnd(), tprunSuccess, "{}", last(null_mut()));
    assert_eq!((a, b), ([11, 22, 33], [11, 22, 33]));
    assert_eq!((r0, r1), ([9; 4], [7; 4]));
    assert_eq!(tprunCommDestroy(c0), tprunSuccess);
    assert_eq!(tprunCommDestroy(c1), tprunSuccess);
}
