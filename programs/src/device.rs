//! `--device` for the built-in programs. With the `cuda` build, `perf` runs its collectives on
//! the GPU, and `logits`, `generate` and `bench` the model's forward pass
//! (`rank::model::cuda::CudaQwen2`, issue 20) ([`CUDA_PROGRAMS`]; none has run on a GPU yet);
//! `--device cuda` with the other programs fails up front with one line saying what is missing on
//! this machine and build, in the order a user would fix it (build feature, driver, the code).

/// The error for a build without the `cuda` feature.
pub const NO_CUDA_BUILD: &str =
    "tprun was built without CUDA support: rebuild with `cargo build --release --features cuda`";

/// The error for a build with the feature on a machine whose driver reports usable devices.
pub const NOT_IMPLEMENTED: &str = "--device cuda: this program's CUDA path is not implemented yet \
     (issue 20: generate, logits, bench and perf have one)";

/// The built-in programs that run with `--device cuda` (in the `cuda` build).
pub const CUDA_PROGRAMS: [&str; 4] = ["perf", "logits", "generate", "bench"];

/// Whether this rank was started with `--device cuda` (the launcher's `TPRUN_DEVICE`).
pub fn cuda_requested() -> bool {
    std::env::var("TPRUN_DEVICE").is_ok_and(|d| d == "cuda")
}

/// `Ok` where `program` can run with `--device cuda` on this build and machine, else the one-line
/// refusal: [`cuda_unavailable`] for the programs without a device path.
pub fn check_cuda(program: &str) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if CUDA_PROGRAMS.contains(&program) {
        return kernels::cuda::cuda_available()
            .map(|_| ())
            .map_err(|why| anyhow::anyhow!("--device cuda: {why}"));
    }
    let _ = program;
    Err(cuda_unavailable())
}

/// Why `--device cuda` cannot run a program without a device path here, as one line.
pub fn cuda_unavailable() -> anyhow::Error {
    #[cfg(not(feature = "cuda"))]
    {
        anyhow::anyhow!(NO_CUDA_BUILD)
    }
    #[cfg(feature = "cuda")]
    {
        match kernels::cuda::cuda_available() {
            Err(why) => anyhow::anyhow!("--device cuda: {why}"),
            Ok(_) => anyhow::anyhow!(NOT_IMPLEMENTED),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal of a program without a device path, as a user reads it on this build.
    fn refusal_here() -> String {
        #[cfg(not(feature = "cuda"))]
        return "tprun was built without CUDA support: rebuild with `cargo build --release --features cuda`".into();
        #[cfg(feature = "cuda")]
        match kernels::cuda::cuda_available() {
            Ok(_) => "--device cuda: this program's CUDA path is not implemented yet (issue 20: generate, logits, bench and perf have one)".into(),
            Err(why) => format!("--device cuda: {why}"),
        }
    }

    #[test]
    fn the_refusal_is_one_line_for_this_build() {
        let msg = cuda_unavailable().to_string();
        assert!(!msg.contains('\n'), "{msg:?}");
        assert_eq!(msg, refusal_here());
    }

    #[test]
    fn only_the_cuda_programs_may_pass_and_only_with_a_usable_gpu() {
        assert_eq!(
            check_cuda("analyze").unwrap_err().to_string(),
            refusal_here()
        );
        for p in CUDA_PROGRAMS {
            let r = check_cuda(p);
            #[cfg(feature = "cuda")]
            match kernels::cuda::cuda_available() {
                Ok(_) => assert!(r.is_ok(), "{p}"),
                Err(why) => {
                    assert_eq!(r.unwrap_err().to_string(), format!("--device cuda: {why}"));
                    kernels::skips::no_hardware(&format!("programs --device cuda {p}"), &why);
                }
            }
            #[cfg(not(feature = "cuda"))]
            assert_eq!(
                r.unwrap_err().to_string(),
                "tprun was built without CUDA support: rebuild with `cargo build --release --features cuda`",
                "{p}"
            );
        }
    }
}
