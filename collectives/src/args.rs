//! Argument checks every transport shares, so a bad call gets the same one-line message (naming
//! the operation, the value and what was expected) on every transport, before any data moves.

use crate::{CommError, DType, P2p, Result};

fn invalid(op: &'static str, msg: String) -> CommError {
    CommError::Invalid { op, msg }
}

/// `len` bytes must be whole `dtype` elements; returns the element count.
pub fn elements(op: &'static str, len: usize, dtype: DType, what: &str) -> Result<usize> {
    if !len.is_multiple_of(dtype.size()) {
        return Err(invalid(
            op,
            format!(
                "{what} is {len} bytes, not a whole number of {} elements",
                dtype.name()
            ),
        ));
    }
    Ok(len / dtype.size())
}

/// A root (or peer) must be a rank of the group.
pub fn root(op: &'static str, root: usize, world: usize) -> Result<()> {
    if root >= world {
        return Err(invalid(
            op,
            format!("root {root} out of range for world size {world}"),
        ));
    }
    Ok(())
}

/// A peer of a point-to-point transfer must be a rank of the group.
pub fn peer(op: &'static str, peer: usize, world: usize) -> Result<()> {
    if peer >= world {
        return Err(invalid(
            op,
            format!("peer {peer} out of range for world size {world}"),
        ));
    }
    Ok(())
}

/// The gathered/scattered side must be `world` times the per-rank side.
pub fn world_multiple(
    op: &'static str,
    big_len: usize,
    big: &str,
    small_len: usize,
    small: &str,
    world: usize,
) -> Result<()> {
    if Some(big_len) != small_len.checked_mul(world) {
        return Err(invalid(
            op,
            format!(
                "{big} is {big_len} bytes, expected world size {world} x {small} {small_len} = {}",
                small_len.saturating_mul(world)
            ),
        ));
    }
    Ok(())
}

/// Input and output of the same size.
pub fn same_len(op: &'static str, input: usize, output: usize) -> Result<()> {
    if input != output {
        return Err(invalid(
            op,
            format!("output is {output} bytes, expected the input's {input}"),
        ));
    }
    Ok(())
}

/// Per-peer counts (elements) of a packed buffer: one per rank, adding up to the buffer.
pub fn counts(
    op: &'static str,
    len: usize,
    counts: &[usize],
    buf: &str,
    which: &str,
    world: usize,
    dtype: DType,
) -> Result<()> {
    if counts.len() != world {
        return Err(invalid(
            op,
            format!(
                "{} {which} counts given, expected one per rank ({world})",
                counts.len()
            ),
        ));
    }
    let total = counts
        .iter()
        .try_fold(0usize, |a, &c| a.checked_add(c))
        .and_then(|t| t.checked_mul(dtype.size()));
    if total != Some(len) {
        return Err(invalid(
            op,
            format!(
                "the {which} counts add up to {} {} elements but the {buf} is {len} bytes",
                counts.iter().fold(0usize, |a, &c| a.saturating_add(c)),
                dtype.name()
            ),
        ));
    }
    Ok(())
}

/// All-to-allv as pairwise transfers (NCCL's way): checks the counts, copies this rank's own
/// chunk and returns the sends and receives for the others, to run as one grouped call.
pub fn all_to_allv_ops<'a>(
    input: &'a [u8],
    send_counts: &[usize],
    output: &'a mut [u8],
    recv_counts: &[usize],
    dtype: DType,
    me: usize,
    n: usize,
) -> Result<Vec<P2p<'a>>> {
    let e = dtype.size();
    counts(
        "all_to_all",
        input.len(),
        send_counts,
        "input",
        "send",
        n,
        dtype,
    )?;
    counts(
        "all_to_all",
        output.len(),
        recv_counts,
        "output",
        "receive",
        n,
        dtype,
    )?;
    if send_counts[me] != recv_counts[me] {
        return Err(invalid(
            "all_to_all",
            format!(
                "rank {me} sends itself {} elements but expects {}",
                send_counts[me], recv_counts[me]
            ),
        ));
    }
    let mut ops = Vec::with_capacity(2 * n);
    let mut rest: &mut [u8] = output;
    let mut own: &mut [u8] = &mut [];
    for (p, &c) in recv_counts.iter().enumerate() {
        let (buf, tail) = std::mem::take(&mut rest).split_at_mut(c * e);
        rest = tail;
        if p == me {
            own = buf;
        } else {
            ops.push(P2p::Recv { buf, peer: p });
        }
    }
    let mut off = 0;
    for (p, &c) in send_counts.iter().enumerate() {
        let buf = &input[off..off + c * e];
        off += c * e;
        if p == me {
            own.copy_from_slice(buf);
        } else {
            ops.push(P2p::Send { buf, peer: p });
        }
    }
    Ok(ops)
}
