//! The collectives on device addresses: comm.cu's kernels over the IPC-mapped slabs, cut into
//! pieces that fit the slab, or staged through host memory and the shm communicator where the
//! transport is host-staged, the type has no device reduction (f16, integers), or an all-gather or
//! reduce-scatter does not fit the slab in one piece.

use cudarc::driver::{result, DevicePtr, LaunchConfig, PushKernelArg};

use super::{drv, CudaComm};
use crate::cuda_plan::{self as plan, Algo, Ran};
use crate::{CommError, Communicator, DType, ReduceOp, Result};

/// A kernel argument after the slab arguments.
#[derive(Clone, Copy)]
pub(super) enum Arg {
    I(i32),
    U(u64),
}

/// Checks a launch's arguments after the slab ones against comm.cu's parameters of `name`, in
/// count and kind (`int` for [`Arg::I`], `u64` or a pointer for [`Arg::U`]): the driver takes a
/// bare pointer array, so a mismatch would otherwise be read as garbage by the kernel.
pub(super) fn check_args(name: &str, extra: &[Arg]) -> Result<()> {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static SIGS: OnceLock<HashMap<&'static str, Vec<(String, String)>>> = OnceLock::new();
    let sigs = SIGS.get_or_init(|| {
        let m = &kernels::cuda::sources::COMM;
        m.entries
            .iter()
            .filter_map(|&k| Some((k, kernels::cuda::sources::kernel_params(m.body, k)?)))
            .collect()
    });
    let bad = |msg: String| {
        Err(CommError::Setup(format!(
            "launch of comm.cu's {name}: {msg}"
        )))
    };
    let Some(sig) = sigs.get(name) else {
        return bad("no such kernel in comm.cu".into());
    };
    let own = &sig[sig.len().min(8)..];
    if own.len() != extra.len() {
        return bad(format!(
            "{} arguments after the slab ones, the kernel takes {}",
            extra.len(),
            own.len()
        ));
    }
    for (k, ((ty, pname), a)) in own.iter().zip(extra).enumerate() {
        let ok = match a {
            Arg::I(_) => ty == "int",
            Arg::U(_) => ty == "u64" || ty.ends_with('*'),
        };
        if !ok {
            let kind = match a {
                Arg::I(_) => "a 4-byte int",
                Arg::U(_) => "an 8-byte value",
            };
            return bad(format!(
                "argument {k} is {kind} but parameter {pname} is {ty}"
            ));
        }
    }
    Ok(())
}

/// A call of one rank: nothing moves.
fn local() -> Ran {
    Ran::Device {
        algorithm: "local",
        steps: 0,
    }
}

fn invalid(op: &'static str, msg: String) -> CommError {
    CommError::Invalid { op, msg }
}

impl CudaComm {
    /// In-place all-reduce of `bytes` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr` must address `bytes` bytes of device memory in this communicator's context that
    /// nothing else uses until the call returns.
    pub(super) unsafe fn all_reduce_at(
        &mut self,
        ptr: u64,
        bytes: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Ran> {
        if !bytes.is_multiple_of(dtype.size()) {
            return Err(invalid("all_reduce", format!("{bytes} bytes of {dtype:?}")));
        }
        self.ops += 1;
        let world = self.world_size() as u32;
        let kernel_for = |len: u64| {
            let algo = plan::choose(world, len, len / dtype.size() as u64, self.oneshot_max);
            (algo, plan::reduce_kernel(algo, dtype))
        };
        if world == 1 {
            return Ok(local());
        }
        let Some(code) =
            plan::op_code(op).filter(|_| self.ipc() && kernel_for(bytes as u64).1.is_some())
        else {
            // SAFETY: forwarded from this function's contract.
            return unsafe { self.staged(ptr, bytes, |h, v| h.all_reduce_raw(v, dtype, op)) };
        };
        let cap = self.dev.layout.data_bytes;
        let pieces = plan::pieces(bytes as u64, cap, dtype);
        let ran = Ran::Device {
            algorithm: kernel_for((bytes as u64).min(cap)).0.name(),
            steps: pieces.len() as u64,
        };
        for (off, len) in pieces {
            let (algo, name) = kernel_for(len);
            let n = len / dtype.size() as u64;
            let at = ptr + off;
            let mut args = vec![Arg::I(code), Arg::U(at), Arg::U(at), Arg::U(n)];
            if algo == Algo::TwoShot {
                args.push(Arg::U(plan::segment(n, world)));
            }
            let seq = self.seq.take();
            let grid = plan::blocks(len, self.dev.layout.max_blocks);
            self.launch_args(name.expect("checked above"), seq, grid, &args)?;
            self.finish("all_reduce")?;
        }
        Ok(ran)
    }

    /// `out` (`out_bytes` = world × `in_bytes`) = every rank's `in_bytes` at `src`.
    ///
    /// # Safety
    /// `src` and `dst` must address `in_bytes` and `out_bytes` bytes of device memory in this
    /// context, not overlapping, unused by anything else until the call returns.
    pub(super) unsafe fn all_gather_at(
        &mut self,
        src: u64,
        in_bytes: usize,
        dst: u64,
        out_bytes: usize,
    ) -> Result<Ran> {
        let world = self.world_size();
        if out_bytes != world * in_bytes {
            let msg = format!("output {out_bytes} bytes != {world} x input {in_bytes} bytes");
            return Err(invalid("all_gather", msg));
        }
        self.ops += 1;
        if !self.ipc() || in_bytes as u64 > self.dev.layout.data_bytes {
            // SAFETY: this function's contract.
            let input = unsafe { self.download_vec(src, in_bytes)? };
            let mut out = vec![0u8; out_bytes];
            self.host.all_gather_raw(&input, &mut out, DType::U8)?;
            // SAFETY: as above.
            unsafe { self.upload(dst, &out)? };
            return Ok(Ran::Host);
        }
        let seq = self.seq.take();
        let grid = plan::blocks(in_bytes as u64, self.dev.layout.max_blocks);
        let args = [Arg::U(src), Arg::U(dst), Arg::U(in_bytes as u64)];
        self.launch_args("all_gather", seq, grid, &args)?;
        self.finish("all_gather")?;
        Ok(Ran::Device {
            algorithm: "copy_out",
            steps: 1,
        })
    }

    /// `dst` (`out_bytes`) = this rank's chunk of the reduction of every rank's `src`.
    ///
    /// # Safety
    /// As [`CudaComm::all_gather_at`], with `in_bytes` = world × `out_bytes`.
    pub(super) unsafe fn reduce_scatter_at(
        &mut self,
        src: u64,
        in_bytes: usize,
        dst: u64,
        out_bytes: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Ran> {
        let world = self.world_size();
        if in_bytes != world * out_bytes || !out_bytes.is_multiple_of(dtype.size()) {
            let msg = format!("input {in_bytes} bytes, output {out_bytes} bytes of {dtype:?}");
            return Err(invalid("reduce_scatter", msg));
        }
        self.ops += 1;
        let kernel = plan::reduce_scatter_kernel(dtype);
        let fits = in_bytes as u64 <= self.dev.layout.data_bytes;
        let (Some(name), Some(code), true, true) = (kernel, plan::op_code(op), fits, self.ipc())
        else {
            // SAFETY: this function's contract.
            let input = unsafe { self.download_vec(src, in_bytes)? };
            let mut out = vec![0u8; out_bytes];
            self.host.reduce_scatter_raw(&input, &mut out, dtype, op)?;
            // SAFETY: as above.
            unsafe { self.upload(dst, &out)? };
            return Ok(Ran::Host);
        };
        let (n, seg) = (
            (in_bytes / dtype.size()) as u64,
            (out_bytes / dtype.size()) as u64,
        );
        let seq = self.seq.take();
        let grid = plan::blocks(in_bytes as u64, self.dev.layout.max_blocks);
        let args = [
            Arg::I(code),
            Arg::U(src),
            Arg::U(dst),
            Arg::U(n),
            Arg::U(seg),
        ];
        self.launch_args(name, seq, grid, &args)?;
        self.finish("reduce_scatter")?;
        Ok(Ran::Device {
            algorithm: "direct",
            steps: 1,
        })
    }

    /// Copies `root`'s `bytes` at `ptr` into every other rank's.
    ///
    /// # Safety
    /// As [`CudaComm::all_reduce_at`].
    pub(super) unsafe fn broadcast_at(
        &mut self,
        ptr: u64,
        bytes: usize,
        root: usize,
    ) -> Result<Ran> {
        let world = self.world_size();
        if root >= world {
            return Err(invalid(
                "broadcast",
                format!("root {root} of {world} ranks"),
            ));
        }
        self.ops += 1;
        if world == 1 {
            return Ok(local());
        }
        if !self.ipc() {
            // SAFETY: forwarded from this function's contract.
            return unsafe { self.staged(ptr, bytes, |h, v| h.broadcast_raw(v, root)) };
        }
        let pieces = plan::pieces(bytes as u64, self.dev.layout.data_bytes, DType::U8);
        let ran = Ran::Device {
            algorithm: "copy_out",
            steps: pieces.len() as u64,
        };
        for (off, len) in pieces {
            let seq = self.seq.take();
            let grid = plan::blocks(len, self.dev.layout.max_blocks);
            let args = [Arg::U(ptr + off), Arg::U(len), Arg::I(root as i32)];
            self.launch_args("broadcast", seq, grid, &args)?;
            self.finish("broadcast")?;
        }
        Ok(ran)
    }

    /// Device → host, `f` on the shm communicator, host → device, in place.
    ///
    /// # Safety
    /// As [`CudaComm::all_reduce_at`].
    unsafe fn staged(
        &mut self,
        ptr: u64,
        bytes: usize,
        f: impl FnOnce(&mut dyn crate::Communicator, &mut [u8]) -> Result<()>,
    ) -> Result<Ran> {
        // SAFETY: this function's contract.
        let mut v = unsafe { self.download_vec(ptr, bytes)? };
        f(self.host.as_mut(), &mut v)?;
        // SAFETY: as above.
        unsafe { self.upload(ptr, &v)? };
        Ok(Ran::Host)
    }

    /// Launches comm.cu's `name` with the slab arguments (this op's `seq`) then `extra`.
    pub(super) fn launch_args(&self, name: &str, seq: u64, grid: u32, extra: &[Arg]) -> Result<()> {
        let (Some(kernels), Some(bases)) = (&self.dev.kernels, &self.dev.bases) else {
            return Err(CommError::Setup(format!("{name}: no CUDA kernels loaded")));
        };
        let func = kernels
            .get(name)
            .ok_or_else(|| CommError::Setup(format!("comm.cu has no kernel {name}")))?;
        check_args(name, extra)?;
        let l = &self.dev.layout;
        let slabs = bases.device_ptr(&self.dev.stream).0;
        let (flags_off, data_off) = (l.flags_off, l.data_off);
        let (rank, world, max_blocks) = (self.rank() as i32, l.world as i32, l.max_blocks as i32);
        let timeout_ns = self.timeout.as_nanos().min(u128::from(u64::MAX)) as u64;
        let mut b = self.dev.stream.launch_builder(func);
        b.arg(&slabs).arg(&flags_off).arg(&data_off);
        b.arg(&rank)
            .arg(&world)
            .arg(&max_blocks)
            .arg(&seq)
            .arg(&timeout_ns);
        for a in extra {
            match a {
                Arg::I(v) => b.arg(v),
                Arg::U(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (plan::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match comm.cu's SLABS_PARAMS and the kernel's own parameters in
        // order and width (pointers and u64 as 8 bytes, int and u32 as 4); every address is a
        // live slab mapping or a buffer the caller's contract keeps alive until `finish`.
        unsafe { b.launch(cfg) }.map_err(|e| drv(name, e))?;
        Ok(())
    }

    /// Waits for the stream, then turns a device-side timeout in the error word into an error.
    pub(super) fn finish(&self, op: &'static str) -> Result<()> {
        self.dev.stream.synchronize().map_err(|e| drv(op, e))?;
        let mut word = [0u32; 1];
        // SAFETY: the error word is the first 4 bytes of this rank's live slab.
        unsafe { result::memcpy_dtoh_sync(&mut word, self.dev.own) }.map_err(|e| drv(op, e))?;
        match plan::device_error(word[0], self.ops, self.timeout.as_secs_f64()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Copies `src` (host) to device address `dst` and waits.
    ///
    /// # Safety
    /// `dst` must address at least `src.len()` bytes of device memory in this context.
    pub(super) unsafe fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: this function's contract.
        unsafe { self.dev.put(dst, src) }
    }

    /// Copies `dst.len()` bytes at device address `src` into `dst` and waits.
    ///
    /// # Safety
    /// `src` must address at least `dst.len()` bytes of device memory in this context.
    pub(super) unsafe fn download(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.dev
            .stream
            .synchronize()
            .map_err(|e| drv("download", e))?;
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| drv("download", e))?;
        // SAFETY: this function's contract.
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| drv("download", e))
    }

    /// # Safety
    /// `src` must address at least `n` bytes of device memory in this context.
    unsafe fn download_vec(&self, src: u64, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        // SAFETY: this function's contract.
        unsafe { self.download(&mut v, src)? };
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::{check_args, Arg};

    #[test]
    fn launch_arguments_are_checked_against_comm_cu() {
        // What the launch sites pass (ops.rs): op code, in, out, n [, seg]; in, out, bytes;
        // buf, bytes, root; nothing.
        let ok: [(&str, Vec<Arg>); 5] = [
            (
                "all_reduce_oneshot_f32",
                vec![Arg::I(0), Arg::U(1), Arg::U(2), Arg::U(3)],
            ),
            (
                "all_reduce_twoshot_bf16",
                vec![Arg::I(0), Arg::U(1), Arg::U(2), Arg::U(3), Arg::U(4)],
            ),
            ("all_gather", vec![Arg::U(1), Arg::U(2), Arg::U(3)]),
            ("broadcast", vec![Arg::U(1), Arg::U(2), Arg::I(0)]),
            ("barrier", vec![]),
        ];
        for (k, a) in &ok {
            check_args(k, a).unwrap_or_else(|e| panic!("{k}: {e}"));
        }
        let e = check_args("broadcast", &[Arg::U(1), Arg::U(2), Arg::U(0)]).unwrap_err();
        assert!(
            e.to_string()
                .contains("argument 2 is an 8-byte value but parameter root is int"),
            "{e}"
        );
        let e = check_args("all_gather", &[Arg::U(1), Arg::U(2)]).unwrap_err();
        assert!(
            e.to_string()
                .contains("2 arguments after the slab ones, the kernel takes 3"),
            "{e}"
        );
        assert!(check_args("all_reduce", &[]).is_err());
    }
}
