//! Which CPUs the job may use, grouped into physical cores, and how they are shared out to ranks.

use std::collections::BTreeMap;
use std::path::Path;

use nix::sched::{sched_getaffinity, CpuSet};
use nix::unistd::Pid;

/// The CPUs tprun itself may run on (its affinity mask, which honours taskset and cgroup cpusets).
pub fn allowed_cpus() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        // Without a mask, fall back to what std sees; CPU numbers then start at 0.
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

/// Groups `cpus` into physical cores (hyperthread siblings together), ordered by their first CPU.
/// A CPU whose topology is unreadable counts as a core of its own.
pub fn physical_cores(cpus: &[usize]) -> Vec<Vec<usize>> {
    let read = |cpu: usize, file: &str| -> Option<i64> {
        let path = format!("/sys/devices/system/cpu/cpu{cpu}/topology/{file}");
        std::fs::read_to_string(Path::new(&path))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let mut by_core: BTreeMap<(i64, i64), Vec<usize>> = BTreeMap::new();
    for &cpu in cpus {
        let key = match (read(cpu, "physical_package_id"), read(cpu, "core_id")) {
            (Some(pkg), Some(core)) => (pkg, core),
            // Negative keys cannot collide with real ids.
            _ => (-1, -1 - cpu as i64),
        };
        by_core.entry(key).or_default().push(cpu);
    }
    let mut cores: Vec<Vec<usize>> = by_core.into_values().collect();
    cores.sort_by_key(|c| c[0]);
    cores
}

/// Rank r's share of `cores`: a contiguous, near-even run of whole cores when there are at least
/// as many cores as ranks; otherwise ranks share cores round-robin (one core each).
pub fn shares(cores: &[Vec<usize>], ranks: usize) -> Vec<Vec<Vec<usize>>> {
    let c = cores.len();
    (0..ranks)
        .map(|r| {
            if c == 0 {
                Vec::new()
            } else if ranks <= c {
                cores[r * c / ranks..(r + 1) * c / ranks].to_vec()
            } else {
                vec![cores[r % c].clone()]
            }
        })
        .collect()
}

/// Number of GPUs a `--device cuda` job can use: CUDA_VISIBLE_DEVICES when set, else the driver's
/// list in /proc. No CUDA library is loaded for this.
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda-emulator")]
    if let Some(n) = emulated_gpus() {
        return n;
    }
    if let Some(v) = std::env::var_os("CUDA_VISIBLE_DEVICES") {
        let v = v.to_string_lossy().into_owned();
        // CUDA stops at the first invalid entry (e.g. "-1"), so count up to it.
        return v
            .split(',')
            .map(str::trim)
            .take_while(|s| !s.is_empty() && !s.starts_with('-'))
            .count();
    }
    std::fs::read_dir("/proc/driver/nvidia/gpus").map_or(0, |d| d.count())
}

/// With `TPRUN_CUDA_EMULATE=1`, the emulated GPUs this process would see: the emulator's count
/// (`TPRUN_CUDA_EMULATE_GPUS`, default 2), cut at the first CUDA_VISIBLE_DEVICES entry that is not
/// one of them, as the emulator itself reads it.
#[cfg(feature = "cuda-emulator")]
fn emulated_gpus() -> Option<usize> {
    if std::env::var("TPRUN_CUDA_EMULATE").as_deref() != Ok("1") {
        return None;
    }
    let n: usize = std::env::var("TPRUN_CUDA_EMULATE_GPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    Some(match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse::<usize>())
            .take_while(|k| matches!(k, Ok(k) if *k < n))
            .count(),
        Err(_) => n,
    })
}

/// GPUs a job without `--device` counts as usable: the visible ones ([`gpu_count`]) where an
/// NVIDIA driver is loaded (as torchrun's `auto` asks CUDA, not the environment, whether there
/// are any: CUDA_VISIBLE_DEVICES alone on a machine without a GPU means none).
pub fn usable_gpus() -> usize {
    #[cfg(feature = "cuda-emulator")]
    if emulated_gpus().is_some() {
        return gpu_count();
    }
    match std::path::Path::new("/proc/driver/nvidia").exists() {
        true => gpu_count(),
        false => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cores(n: usize) -> Vec<Vec<usize>> {
        (0..n).map(|i| vec![i, i + n]).collect()
    }

    #[test]
    fn even_and_uneven_shares_cover_every_core_once() {
        for (ncores, ranks) in [(8, 2), (8, 3), (7, 7), (5, 1), (6, 4)] {
            let s = shares(&cores(ncores), ranks);
            assert_eq!(s.len(), ranks);
            let flat: Vec<usize> = s.iter().flatten().map(|c| c[0]).collect();
            assert_eq!(
                flat,
                (0..ncores).collect::<Vec<_>>(),
                "{ncores} cores, {ranks} ranks"
            );
            let sizes: Vec<usize> = s.iter().map(Vec::len).collect();
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 1, "{sizes:?}");
        }
    }

    #[test]
    fn more_ranks_than_cores_share_round_robin() {
        let s = shares(&cores(2), 5);
        let firsts: Vec<usize> = s.iter().map(|sh| sh[0][0]).collect();
        assert_eq!(firsts, vec![0, 1, 0, 1, 0]);
    }

    #[test]
    fn allowed_cpus_are_grouped_without_loss() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let mut flat: Vec<usize> = physical_cores(&cpus).into_iter().flatten().collect();
        flat.sort();
        assert_eq!(flat, cpus);
    }
}
