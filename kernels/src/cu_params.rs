//! Reading a CUDA kernel's parameter list from its source: what the host's launches are checked
//! against. Plain text work, so it is here without the `cuda` feature (rank's launch-plan tests
//! run everywhere).

/// `(type, name)` of each parameter of `extern "C" __global__ void kernel(...)` in `src`, with
/// comm.cu's `SLABS_PARAMS` macro expanded; `None` if `src` has no such kernel. What the host's
/// launches are checked against (collectives::cuda at every launch, rank's launch plans in tests).
pub fn kernel_params(src: &str, kernel: &str) -> Option<Vec<(String, String)>> {
    let open = format!("void {kernel}(");
    let start = src.find(&open)? + open.len();
    let params = &src[start..start + src[start..].find(')')?];
    let slabs = "const u64 *slabs, u64 flags_off, u64 data_off, int rank, int world, int max_blocks, u64 seq, u64 timeout_ns";
    let params = params.replace("SLABS_PARAMS", slabs);
    Some(
        params
            .split(',')
            .map(|p| {
                let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
                let cut = p.rfind([' ', '*']).unwrap_or(0);
                (p[..=cut].trim().to_string(), p[cut + 1..].to_string())
            })
            .collect(),
    )
}
