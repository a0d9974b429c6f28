//! One C call as a checked operation ([`Op`]): its buffers as raw ranges, checked (NULL, count
//! overflow, root/peer range, overlaps other than NCCL's in-place forms) when the call is made,
//! and run on the communicator ([`run`]) then or at the group's end.

use collectives::{CommError, Communicator, DType, P2p, ReduceOp};

use crate::{Fail, Res};

/// A buffer the C caller passed: `len` bytes at `p` (NULL allowed when `len` is 0, or where the
/// call does not use the buffer on this rank).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buf {
    pub p: *mut u8,
    pub len: usize,
}

// SAFETY: a Buf is an address the C caller lent for the duration of the call (or until the end of
// its group); the group's end may run it on a helper thread while the caller waits.
unsafe impl Send for Buf {}

impl Buf {
    pub const NONE: Buf = Buf {
        p: std::ptr::null_mut(),
        len: 0,
    };

    fn addr(&self) -> usize {
        self.p as usize
    }

    /// Whether the two (non-empty) ranges share a byte.
    pub fn overlaps(&self, o: &Buf) -> bool {
        self.len > 0
            && o.len > 0
            && self.addr() < o.addr() + o.len
            && o.addr() < self.addr() + self.len
    }

    /// # Safety
    /// `len` bytes at `p` must be readable and not written through another reference meanwhile.
    pub unsafe fn bytes<'a>(&self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: non-NULL (checked when the Buf was made) and readable (the caller's contract).
        unsafe { std::slice::from_raw_parts(self.p, self.len) }
    }

    /// # Safety
    /// `len` bytes at `p` must be writable and not accessed through another reference meanwhile.
    pub unsafe fn bytes_mut<'a>(&self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as `bytes`, and exclusive (the caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.p, self.len) }
    }
}

/// A reduction operator as the call named it: fixed, or a pre-multiplied sum whose scalar is
/// read when the operation runs (tprunScalarDevice).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Redop {
    Fixed(ReduceOp),
    ScalarAt(Buf, DType),
}

impl Redop {
    fn resolve(self, name: &'static str) -> Res<ReduceOp> {
        match self {
            Redop::Fixed(op) => Ok(op),
            Redop::ScalarAt(b, dtype) => {
                // SAFETY: the scalar's pointer was checked non-NULL at creation and the caller
                // keeps it valid until tprunRedOpDestroy (tprun.h).
                let s = crate::read_scalar(unsafe { b.bytes() }, dtype);
                collectives::types::check_reducible(name, dtype, ReduceOp::PreMulSum(s))
                    .map_err(|e| Fail::invalid(format!("{name}: {e}")))?;
                Ok(ReduceOp::PreMulSum(s))
            }
        }
    }
}

/// One queued or immediate call.
#[derive(Debug)]
pub(crate) enum Op {
    AllReduce {
        send: Buf,
        recv: Buf,
        dtype: DType,
        op: Redop,
    },
    AllGather {
        send: Buf,
        recv: Buf,
        dtype: DType,
    },
    ReduceScatter {
        send: Buf,
        recv: Buf,
        dtype: DType,
        op: Redop,
    },
    Broadcast {
        send: Buf,
        recv: Buf,
        root: usize,
    },
    Reduce {
        send: Buf,
        recv: Buf,
        dtype: DType,
        op: Redop,
        root: usize,
    },
    AllToAll {
        send: Buf,
        recv: Buf,
        dtype: DType,
    },
    Gather {
        send: Buf,
        recv: Buf,
        dtype: DType,
        root: usize,
    },
    Scatter {
        send: Buf,
        recv: Buf,
        dtype: DType,
        root: usize,
    },
    Barrier,
    Send {
        buf: Buf,
        dtype: DType,
        peer: usize,
    },
    Recv {
        buf: Buf,
        dtype: DType,
        peer: usize,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::AllReduce { .. } => "tprunAllReduce",
            Op::AllGather { .. } => "tprunAllGather",
            Op::ReduceScatter { .. } => "tprunReduceScatter",
            Op::Broadcast { .. } => "tprunBroadcast",
            Op::Reduce { .. } => "tprunReduce",
            Op::AllToAll { .. } => "tprunAllToAll",
            Op::Gather { .. } => "tprunGather",
            Op::Scatter { .. } => "tprunScatter",
            Op::Barrier => "tprunBarrier",
            Op::Send { .. } => "tprunSend",
            Op::Recv { .. } => "tprunRecv",
        }
    }

    pub fn is_p2p(&self) -> bool {
        matches!(self, Op::Send { .. } | Op::Recv { .. })
    }
}

/// The checks of one call: its name and the communicator's shape.
pub(crate) struct Check {
    pub name: &'static str,
    pub rank: usize,
    pub world: usize,
}

impl Check {
    fn invalid(&self, msg: String) -> Fail {
        Fail::invalid(format!("{}: {msg}", self.name))
    }

    /// `count` elements of `dtype` (times `times`) at `p`, which may be NULL only when that is
    /// zero bytes.
    pub fn buf(
        &self,
        what: &str,
        p: *const std::ffi::c_void,
        count: usize,
        times: usize,
        dtype: DType,
    ) -> Res<Buf> {
        let len = count
            .checked_mul(times)
            .and_then(|n| n.checked_mul(dtype.size()))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(|| {
                self.invalid(format!(
                    "{what}: count {count}{} of {} ({} bytes each) overflows the address space",
                    if times > 1 {
                        format!(" x {times} ranks")
                    } else {
                        String::new()
                    },
                    dtype.name(),
                    dtype.size()
                ))
            })?;
        if len > 0 && p.is_null() {
            return Err(self.invalid(format!("{what} is NULL but holds {len} bytes")));
        }
        if len > 0 && (p as usize).checked_add(len).is_none() {
            return Err(self.invalid(format!(
                "{what} + {len} bytes wraps around the address space"
            )));
        }
        Ok(Buf {
            p: p as *mut u8,
            len,
        })
    }

    /// A root or peer of this communicator.
    pub fn rank_arg(&self, what: &str, r: i32) -> Res<usize> {
        match usize::try_from(r) {
            Ok(r) if r < self.world => Ok(r),
            _ => Err(self.invalid(format!(
                "{what} {r} out of range for a communicator of {} ranks (0..{})",
                self.world,
                self.world - 1
            ))),
        }
    }

    /// `send` and `recv` must not overlap unless `send` sits exactly at `recv` + `send_at` or
    /// `recv` at `send` + `recv_at` (the call's in-place form, described by `inplace`).
    pub fn overlap(
        &self,
        send: &Buf,
        recv: &Buf,
        inplace_at: Option<(bool, usize)>,
        inplace: &str,
    ) -> Res<()> {
        if !send.overlaps(recv) {
            return Ok(());
        }
        let ok = match inplace_at {
            Some((true, off)) => send.addr() == recv.addr().wrapping_add(off),
            Some((false, off)) => recv.addr() == send.addr().wrapping_add(off),
            None => false,
        };
        if ok {
            return Ok(());
        }
        Err(self.invalid(format!(
            "sendbuff and recvbuff overlap; in place means {inplace}"
        )))
    }
}

/// PreMulSum's local step done here for reduce, on the buffer about to be reduced (a copy of
/// the caller's input, or its in-place buffer, which the result overwrites), so the transport
/// only sums. Other operators pass through.
fn premultiply(dtype: DType, op: ReduceOp, buf: &mut [u8]) -> ReduceOp {
    match op {
        ReduceOp::PreMulSum(f) => {
            collectives::reduce::scale_in_place(dtype, buf, f);
            ReduceOp::Sum
        }
        op => op,
    }
}

fn root_only(me: usize, root: usize, b: Buf) -> Buf {
    if me == root {
        b
    } else {
        Buf::NONE
    }
}

/// Runs one collective on `c` (never a Send/Recv: those go through [`run_p2p`]).
///
/// # Safety
/// Every Buf of `op` must be valid as its call's documentation says (tprun.h), as the checks that
/// made `op` assume: only the in-place overlaps they let through.
pub(crate) unsafe fn run(c: &mut dyn Communicator, op: &Op) -> Res<(), Failure> {
    let (me, name) = (c.rank(), op.name());
    let redop = |r: &Redop| r.resolve(name).map_err(Failure::Fail);
    // SAFETY (every block below): the Bufs are valid (this function's contract); where send and
    // recv overlap (the in-place forms) only one reference to the shared bytes is alive at a
    // time, the others read from a copy.
    unsafe {
        match *op {
            Op::AllReduce {
                send,
                recv,
                dtype,
                op,
            } => {
                let op = redop(&op)?;
                if send.p != recv.p {
                    // The checks let only exact in-place overlap through: these are disjoint.
                    c.all_reduce_into_raw(send.bytes(), recv.bytes_mut(), dtype, op)?
                } else {
                    c.all_reduce_raw(recv.bytes_mut(), dtype, op)?
                }
            }
            Op::AllGather { send, recv, dtype } => {
                if send.overlaps(&recv) {
                    let own = send.bytes().to_vec();
                    c.all_gather_raw(&own, recv.bytes_mut(), dtype)?
                } else {
                    c.all_gather_raw(send.bytes(), recv.bytes_mut(), dtype)?
                }
            }
            Op::ReduceScatter {
                send,
                recv,
                dtype,
                op,
            } => {
                let (input, op) =
                    collectives::reduce::premul_input(dtype, redop(&op)?, send.bytes());
                if send.overlaps(&recv) {
                    let mut out = vec![0u8; recv.len];
                    c.reduce_scatter_raw(&input, &mut out, dtype, op)?;
                    drop(input);
                    recv.bytes_mut().copy_from_slice(&out);
                } else {
                    c.reduce_scatter_raw(&input, recv.bytes_mut(), dtype, op)?
                }
            }
            Op::Broadcast { send, recv, root } => {
                if me == root && send.p != recv.p {
                    recv.bytes_mut().copy_from_slice(send.bytes());
                }
                c.broadcast_raw(recv.bytes_mut(), root)?
            }
            Op::Reduce {
                send,
                recv,
                dtype,
                op,
                root,
            } => {
                let op = redop(&op)?;
                if me == root {
                    if send.p != recv.p {
                        recv.bytes_mut().copy_from_slice(send.bytes());
                    }
                    let op = premultiply(dtype, op, recv.bytes_mut());
                    c.reduce_raw(recv.bytes_mut(), dtype, op, root)?
                } else {
                    // The other ranks' buffer is const (NCCL reads sendbuff only there).
                    let mut mine = send.bytes().to_vec();
                    let op = premultiply(dtype, op, &mut mine);
                    c.reduce_raw(&mut mine, dtype, op, root)?
                }
            }
            Op::AllToAll { send, recv, dtype } => {
                if send.overlaps(&recv) {
                    let input = send.bytes().to_vec();
                    c.all_to_all_raw(&input, recv.bytes_mut(), dtype)?
                } else {
                    c.all_to_all_raw(send.bytes(), recv.bytes_mut(), dtype)?
                }
            }
            Op::Gather {
                send,
                recv,
                dtype,
                root,
            } => {
                let recv = root_only(me, root, recv);
                if send.overlaps(&recv) {
                    let own = send.bytes().to_vec();
                    c.gather_raw(&own, recv.bytes_mut(), dtype, root)?
                } else {
                    c.gather_raw(send.bytes(), recv.bytes_mut(), dtype, root)?
                }
            }
            Op::Scatter {
                send,
                recv,
                dtype,
                root,
            } => {
                let send = root_only(me, root, send);
                if send.overlaps(&recv) {
                    let mut out = vec![0u8; recv.len];
                    c.scatter_raw(send.bytes(), &mut out, dtype, root)?;
                    recv.bytes_mut().copy_from_slice(&out);
                } else {
                    c.scatter_raw(send.bytes(), recv.bytes_mut(), dtype, root)?
                }
            }
            Op::Barrier => c.barrier()?,
            Op::Send { .. } | Op::Recv { .. } => {
                return Err(Failure::Fail(Fail::internal(format!(
                    "{name} reached the collective path"
                ))))
            }
        }
    }
    Ok(())
}

/// Every Send and Recv of `ops` as one grouped exchange. A receive buffer may not overlap any
/// other buffer of the exchange (they are all in flight at once).
///
/// # Safety
/// As [`run`].
pub(crate) unsafe fn run_p2p(c: &mut dyn Communicator, ops: &[Op]) -> Res<(), Failure> {
    let bufs: Vec<(Buf, bool)> = ops
        .iter()
        .filter_map(|o| match *o {
            Op::Send { buf, .. } => Some((buf, false)),
            Op::Recv { buf, .. } => Some((buf, true)),
            _ => None,
        })
        .collect();
    for (i, (a, a_recv)) in bufs.iter().enumerate() {
        for (b, b_recv) in &bufs[i + 1..] {
            if (*a_recv || *b_recv) && a.overlaps(b) {
                return Err(Failure::Fail(Fail::invalid(
                    "tprunGroupEnd: a tprunRecv buffer overlaps another tprunSend/tprunRecv buffer of the same group".into(),
                )));
            }
        }
    }
    let mut dtypes = ops.iter().filter_map(|o| match *o {
        Op::Send { dtype, .. } | Op::Recv { dtype, .. } => Some(dtype),
        _ => None,
    });
    let first = dtypes.next().unwrap_or(DType::U8);
    // The tag only labels statistics and traces; a mixed group is counted as bytes.
    let dtype = if dtypes.all(|d| d == first) {
        first
    } else {
        DType::U8
    };
    // SAFETY: the Bufs are valid (this function's contract) and receive buffers overlap nothing
    // (checked above), so the shared and exclusive references below do not alias.
    let mut p2p: Vec<P2p> = unsafe {
        ops.iter()
            .filter_map(|o| match *o {
                Op::Send { buf, peer, .. } => Some(P2p::Send {
                    buf: buf.bytes(),
                    peer,
                }),
                Op::Recv { buf, peer, .. } => Some(P2p::Recv {
                    buf: buf.bytes_mut(),
                    peer,
                }),
                _ => None,
            })
            .collect()
    };
    c.send_recv_raw(&mut p2p, dtype)?;
    Ok(())
}

/// Why an operation failed: the collectives' error (which may leave the communicator unusable)
/// or one of the C layer's own.
#[derive(Debug)]
pub(crate) enum Failure {
    Comm(CommError),
    Fail(Fail),
}

impl From<CommError> for Failure {
    fn from(e: CommError) -> Self {
        Failure::Comm(e)
    }
}

/// Builds the [`Op`] of each C call, checking its arguments.
impl Check {
    pub fn all_reduce(
        &self,
        send: *const std::ffi::c_void,
        recv: *mut std::ffi::c_void,
        count: usize,
        dtype: DType,
        op: Redop,
    ) -> Res<Op> {
        let send = self.buf("sendbuff", send, count, 1, dtype)?;
        let recv = self.buf("recvbuff", recv, count, 1, dtype)?;
        self.overlap(&send, &recv, Some((true, 0)), "sendbuff == recvbuff")?;
        Ok(Op::AllReduce {
            send,
            recv,
            dtype,
            op,
        })
    }

    pub fn all_gather(
        &self,
        send: *const std::ffi::c_void,
        recv: *mut std::ffi::c_void,
        count: usize,
        dtype: DType,
    ) -> Res<Op> {
        let send = self.buf("sendbuff", send, count, 1, dtype)?;
        let recv = self.buf("recvbuff", recv, count, self.world, dtype)?;
        self.overlap(
            &send,
            &recv,
            Some((true, self.rank * send.len)),
            "sendbuff == recvbuff + rank * sendcount",
        )?;
        Ok(Op::AllGather { send, recv, dtype })
    }

    pub fn reduce_scatter(
        &self,
        send: *const std::ffi::c_void,
        recv: *mut std::ffi::c_void,
        count: usize,
        dtype: DType,
        op: Redop,
    ) -> Res<Op> {
        let send = self.buf("sendbuff", send, count, self.world, dtype)?;
        let recv = self.buf("recvbuff", recv, count, 1, dtype)?;
        self.overlap(
            &send,
            &recv,
            Some((false, self.rank * recv.len)),
            "recvbuff == sendbuff + rank * recvcount",
        )?;
        Ok(Op::ReduceScatter {
            send,
            recv,
            dtype,
            op,
        })
    }

    pub fn broadcast(
        &self,
        send: *const std::ffi::c_void,
        recv: *mut std::ffi::c_void,
        count: usize,
        dtype: DType,
        root: i32,
    ) -> Res<Op> {
        let root = self.rank_arg("root", root)?;
        let recv = self.buf("recvbuff", recv, count, 1, dtype)?;
        let send = if self.rank == root {
            self.buf("sendbuff (at the root)", send, count, 1, dtype)?
        } else {
            Buf::NONE
        };
        self.overlap(&send, &recv, Some((true, 0)), "sendbuff == recvbuff")?;
        Ok(Op::Broadcast { send, recv, root })
    }

    pub fn reduce(
        &self,
        send: *const std::ffi::c_void,
        recv: *mut std::ffi::c_void,
        count: usize,
        dtype: DType,
        op: Redop,
        root: i32,
    ) -> Res<Op> {
        let root = self.rank_arg("root", root)?;
        let send = self.buf("sendbuff", send, count, 1, dtype)?;
        let recv = if self.rank == root {
            self.buf("recvbuff (at the root)", recv, count, 1, dtype)?
        } else {
            Buf::NONE
        };
        self.overlap(&send, &recv, Some((true, 0)), "sendbuff == recvbuff")?;
        Ok(Op::Reduce {
            send,
            recv,
            dtype,
            op,
            root,
        })
    }

    pub fn all_to_all(
        &self,
        send: *const std::ffi::c_void,
        recv: *mut std::ffi::c_void,
        count: usize,
        dtype: DType,
    ) -> Res<Op> {
        let send = self.buf("sendbuff", send, count, self.world, dtype)?;
        let recv = self.buf("recvbuff", recv, count, self.world, dtype)?;
        self.overlap(&send, &recv, Some((true, 0)), "sendbuff == recvbuff")?;
        Ok(Op::AllToAll { send, recv, dtype })
    }

    pub fn gather(
        &self,
        send: *const std::ffi::c_void,
        recv: *mut std::ffi::c_void,
        count: usize,
        dtype: DType,
        root: i32,
    ) -> Res<Op> {
        let root = self.rank_arg("root", root)?;
        let send = self.buf("sendbuff", send, count, 1, dtype)?;
        let recv = if self.rank == root {
            self.buf("recvbuff (at the root)", recv, count, self.world, dtype)?
        } else {
            Buf::NONE
        };
        self.overlap(
            &send,
            &recv,
            Some((true, root * send.len)),
            "sendbuff == recvbuff + root * count at the root",
        )?;
        Ok(Op::Gather {
            send,
            recv,
            dtype,
            root,
        })
    }

    pub fn scatter(
        &self,
        send: *const std::ffi::c_void,
        recv: *mut std::ffi::c_void,
        count: usize,
        dtype: DType,
        root: i32,
    ) -> Res<Op> {
        let root = self.rank_arg("root", root)?;
        let recv = self.buf("recvbuff", recv, count, 1, dtype)?;
        let send = if self.rank == root {
            self.buf("sendbuff (at the root)", send, count, self.world, dtype)?
        } else {
            Buf::NONE
        };
        self.overlap(
            &send,
            &recv,
            Some((false, root * recv.len)),
            "recvbuff == sendbuff + root * count at the root",
        )?;
        Ok(Op::Scatter {
            send,
            recv,
            dtype,
            root,
        })
    }

    pub fn send(
        &self,
        buf: *const std::ffi::c_void,
        count: usize,
        dtype: DType,
        peer: i32,
    ) -> Res<Op> {
        let peer = self.rank_arg("peer", peer)?;
        let buf = self.buf("sendbuff", buf, count, 1, dtype)?;
        Ok(Op::Send { buf, dtype, peer })
    }

    pub fn recv(
        &self,
        buf: *mut std::ffi::c_void,
        count: usize,
        dtype: DType,
        peer: i32,
    ) -> Res<Op> {
        let peer = self.rank_arg("peer", peer)?;
        let buf = self.buf("recvbuff", buf, count, 1, dtype)?;
        Ok(Op::Recv { buf, dtype, peer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rank: usize, world: usize) -> Check {
        Check {
            name: "tprunTest",
            rank,
            world,
        }
    }

    #[test]
    fn in_place_forms_pass_and_other_overlaps_are_refused() {
        let mut v = vec![0u8; 64];
        let p = v.as_mut_ptr() as *mut std::ffi::c_void;
        let c = check(1, 4);
        // AllGather: rank 1's 4 floats sit 16 bytes into the 64-byte output.
        let at = p.wrapping_byte_add(16);
        assert!(c.all_gather(at, p, 4, DType::F32).is_ok());
        let e = c.all_gather(p, p, 4, DType::F32).unwrap_err();
        assert_eq!(e.code, crate::tprunInvalidArgument);
        assert!(
            e.msg.contains("sendbuff == recvbuff + rank * sendcount"),
            "{}",
            e.msg
        );
        // ReduceScatter: recvbuff at sendbuff + rank * recvcount.
        assert!(c
            .reduce_scatter(p, at, 4, DType::F32, Redop::Fixed(ReduceOp::Sum))
            .is_ok());
        assert!(c
            .reduce_scatter(
                p,
                p.wrapping_byte_add(4),
                4,
                DType::F32,
                Redop::Fixed(ReduceOp::Sum)
            )
            .is_err());
        // AllReduce: identical or disjoint.
        let sum = Redop::Fixed(ReduceOp::Sum);
        assert!(c.all_reduce(p, p, 16, DType::F32, sum).is_ok());
        assert!(c
            .all_reduce(p, p.wrapping_byte_add(32), 8, DType::F32, sum)
            .is_ok());
        assert!(c
            .all_reduce(p, p.wrapping_byte_add(4), 8, DType::F32, sum)
            .is_err());
    }

    #[test]
    fn null_overflow_and_range_are_refused_with_a_message() {
        let c = check(0, 3);
        let null = std::ptr::null_mut::<std::ffi::c_void>();
        let e = c
            .all_reduce(null, null, 3, DType::F64, Redop::Fixed(ReduceOp::Sum))
            .unwrap_err();
        assert!(
            e.msg.contains("sendbuff is NULL but holds 24 bytes"),
            "{}",
            e.msg
        );
        // Zero elements need no buffer.
        assert!(c
            .all_reduce(null, null, 0, DType::F64, Redop::Fixed(ReduceOp::Sum))
            .is_ok());
        let mut x = [0u8; 8];
        let p = x.as_mut_ptr() as *mut std::ffi::c_void;
        let e = c.all_gather(p, p, usize::MAX / 2, DType::I8).unwrap_err();
        assert!(e.msg.contains("overflows"), "{}", e.msg);
        let e = c.broadcast(p, p, 1, DType::U8, 3).unwrap_err();
        assert!(
            e.msg
                .contains("root 3 out of range for a communicator of 3 ranks"),
            "{}",
            e.msg
        );
        assert!(c
            .send(p, 1, DType::U8, -1)
            .unwrap_err()
            .msg
            .contains("peer -1"));
        // Off the root, the root-only buffers are not read.
        assert!(c.gather(p, null, 1, DType::U8, 2).is_ok());
        assert!(c.scatter(null, p, 1, DType::U8, 1).is_ok());
        assert!(c
            .reduce(p, null, 1, DType::U8, Redop::Fixed(ReduceOp::Max), 1)
            .is_ok());
        assert!(c
            .reduce(p, null, 1, DType::U8, Redop::Fixed(ReduceOp::Max), 0)
            .is_err());
    }
}
