//! A world of one: every collective is the identity. This is the production path of a program
//! run without tprun ([`crate::from_env`] with WORLD_SIZE unset or 1): it needs no segment, no
//! threads and no waits, which [`crate::ShmComm`] (one per rank over shared memory) and
//! [`crate::thread::ThreadComm`] (test ranks as threads) would add for nothing.

use crate::{args, CommError, Communicator, DType, P2p, ReduceOp, Result};

/// The communicator of a world of one (see the module docs).
#[derive(Debug, Default)]
pub struct SoloComm;

impl Communicator for SoloComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        crate::types::check_reducible("all_reduce", dtype, op)?;
        args::elements("all_reduce", buf.len(), dtype, "the buffer")?;
        one_source(buf, dtype, op);
        Ok(())
    }
    fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], _dtype: DType) -> Result<()> {
        copy_same_len("all_gather", input, output)
    }
    fn reduce_scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        crate::types::check_reducible("reduce_scatter", dtype, op)?;
        args::elements("reduce_scatter", input.len(), dtype, "the input")?;
        copy_same_len("reduce_scatter", input, output)?;
        one_source(output, dtype, op);
        Ok(())
    }
    fn broadcast_raw(&mut self, _buf: &mut [u8], root: usize) -> Result<()> {
        if root != 0 {
            return Err(CommError::Invalid {
                op: "broadcast",
                msg: format!("root {root} out of range for world size 1"),
            });
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    /// Sends to and receives from this rank itself, matched in order (the only peer there is).
    fn send_recv_raw(&mut self, ops: &mut [P2p<'_>], _dtype: DType) -> Result<()> {
        for op in ops.iter() {
            args::peer("send_recv", op.peer(), 1)?;
        }
        let sends: Vec<&[u8]> = ops
            .iter()
            .filter_map(|o| match o {
                P2p::Send { buf, .. } => Some(*buf),
                P2p::Recv { .. } => None,
            })
            .collect();
        let mut recvs: Vec<&mut [u8]> = ops
            .iter_mut()
            .filter_map(|o| match o {
                P2p::Recv { buf, .. } => Some(&mut **buf),
                P2p::Send { .. } => None,
            })
            .collect();
        if sends.len() != recvs.len() {
            return Err(CommError::Invalid {
                op: "send_recv",
                msg: format!(
                    "{} sends to and {} receives from rank 0 in a world of one: they must pair up",
                    sends.len(),
                    recvs.len()
                ),
            });
        }
        for (k, (s, r)) in sends.iter().zip(recvs.iter_mut()).enumerate() {
            if s.len() != r.len() {
                return Err(CommError::Invalid {
                    op: "send_recv",
                    msg: format!(
                        "transfer {k} from rank 0 to itself sends {} bytes but receives {}",
                        s.len(),
                        r.len()
                    ),
                });
            }
            r.copy_from_slice(s);
        }
        Ok(())
    }
    fn split(&mut self, color: Option<u32>, _key: i64) -> Result<Option<Box<dyn Communicator>>> {
        Ok(color.map(|_| Box::new(SoloComm) as Box<dyn Communicator>))
    }
}

fn copy_same_len(op: &'static str, input: &[u8], output: &mut [u8]) -> Result<()> {
    if input.len() != output.len() {
        return Err(CommError::Invalid {
            op,
            msg: format!("output is {} bytes, expected {}", output.len(), input.len()),
        });
    }
    output.copy_from_slice(input);
    Ok(())
}

/// A reduction of this rank's buffer alone, by the rules of every other transport: PreMulSum
/// scales it, and a float NaN becomes the canonical NaN (integers are already their own
/// reduction).
fn one_source(buf: &mut [u8], dtype: DType, op: ReduceOp) {
    if let ReduceOp::PreMulSum(f) = op {
        crate::reduce::scale_in_place(dtype, buf, f);
    } else if dtype.is_float() {
        let p = buf.as_mut_ptr();
        let simd = crate::reduce::Simd::detect();
        // SAFETY: one source equal to the destination (allowed), buf.len() / size elements.
        unsafe { crate::reduce::reduce_raw(simd, dtype, op, p, &[p], buf.len() / dtype.size()) };
    }
}
