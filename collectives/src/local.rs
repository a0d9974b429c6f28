//! A world of one: every collective is the identity. This is the production path of a program
//! run without tprun ([`crate::from_env`] with WORLD_SIZE unset or 1): it needs no segment, no
//! threads and no waits, which [`crate::ShmComm`] (one per rank over shared memory) and
//! [`crate::thread::ThreadComm`] (test ranks as threads) would add for nothing.

use crate::{CommError, Communicator, DType, ReduceOp, Result};

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
    fn all_reduce_raw(&mut self, _buf: &mut [u8], _dtype: DType, _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], _dtype: DType) -> Result<()> {
        copy_same_len("all_gather", input, output)
    }
    fn reduce_scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        _dtype: DType,
        _op: ReduceOp,
    ) -> Result<()> {
        copy_same_len("reduce_scatter", input, output)
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
