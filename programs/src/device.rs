//! `--device` for the built-in programs. Only `cpu` computes today: the CUDA path (issue 8) is not
//! written, so `--device cuda` fails up front with one line saying what is missing on this
//! machine and build, in the order a user would fix it (build feature, driver, the code itself).
//!
//! The default stays `cpu` even where a GPU is usable (the contract says cuda then; see
//! docs/DESIGN.md, "Command line"): defaulting to a path that can only refuse would break every
//! plain `tprun generate` on a GPU machine.

/// The error for a build without the `cuda` feature.
pub const NO_CUDA_BUILD: &str =
    "tprun was built without CUDA support: rebuild with `cargo build --release --features cuda`";

/// The error for a build with the feature on a machine whose driver reports usable devices.
pub const NOT_IMPLEMENTED: &str = "--device cuda: the CUDA path is not implemented yet (issue 8)";

/// Why `--device cuda` cannot run here, as one line. Always an error until issue 8 lands.
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

    #[test]
    fn the_refusal_is_one_line_for_this_build() {
        let msg = cuda_unavailable().to_string();
        assert!(!msg.contains('\n'), "{msg:?}");
        if cfg!(feature = "cuda") {
            assert!(msg.starts_with("--device cuda: "), "{msg:?}");
        } else {
            assert_eq!(msg, NO_CUDA_BUILD);
        }
    }
}
