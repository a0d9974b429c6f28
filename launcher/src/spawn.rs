//! Everything decided before the first rank starts (world size, program path, CPU shares, log
//! files, environment) and the per-rank `Command`, including the child-side setup between fork and
//! exec.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use nix::sched::CpuSet;
use nix::unistd::{access, AccessFlags};

use crate::errors::ErrorFiles;
use crate::{cpus, CpuBind, Device, Job, LaunchArgs, LaunchError, Nproc};

/// One rank's share of the machine and its log files.
pub(crate) struct RankSpec {
    /// CPUs the rank is pinned to; `None` = inherit tprun's mask.
    pub cpus: Option<Vec<usize>>,
    pub omp_threads: usize,
    /// DIR/rank{r} and its open stdout.log / stderr.log.
    pub log: Option<(PathBuf, File, File)>,
}

/// torchrun's elastic state of one attempt of the job, shared by its ranks.
pub(crate) struct Elastic {
    /// TORCHELASTIC_RUN_ID (and TPRUN_RUN_ID): the same across restarts.
    pub run_id: String,
    /// TORCHELASTIC_RESTART_COUNT: 0 for the first start.
    pub restart: u32,
    pub max_restarts: u32,
}

/// The resolved job: what to run, where, with which environment.
pub(crate) struct LaunchPlan {
    pub world_size: usize,
    /// The program as the user named it (argv[0] and error messages) and as resolved on PATH.
    pub program: OsString,
    pub program_path: PathBuf,
    pub args: Vec<OsString>,
    pub device: Device,
    pub job_env: Vec<(OsString, OsString)>,
    /// True when the user set OMP_NUM_THREADS (in tprun's env or the job's), which then stays.
    pub user_omp: bool,
    pub master_port: u16,
    pub elastic: Elastic,
    /// Each rank's TORCHELASTIC_ERROR_FILE, new for every attempt.
    pub errors: ErrorFiles,
    pub ranks: Vec<RankSpec>,
}

impl LaunchPlan {
    pub fn new(launch: &LaunchArgs, job: &Job, elastic: Elastic) -> anyhow::Result<Self> {
        let device = launch.device.unwrap_or(Device::Cpu);
        let allowed = cpus::allowed_cpus();
        let cores = cpus::physical_cores(&allowed);
        let world_size = world_size(launch, device, &cores)?;

        let path_var = job
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var_os("PATH"));
        let program_path = resolve_program(&job.program, path_var.as_deref())?;
        // A restart appends to the logs, so the failure that caused it stays readable.
        let ranks = rank_specs(launch, &cores, world_size, elastic.restart > 0)?;

        let user_omp = std::env::var_os("OMP_NUM_THREADS").is_some()
            || job.env.iter().any(|(k, _)| k == "OMP_NUM_THREADS");
        Ok(LaunchPlan {
            world_size,
            program: job.program.clone(),
            program_path,
            args: job.args.clone(),
            device,
            job_env: job.env.clone(),
            user_omp,
            master_port: free_port()?,
            elastic,
            errors: ErrorFiles::create(world_size)?,
            ranks,
        })
    }

    /// The command for rank `r`: torchrun environment, own process group, dies with tprun; and
    /// the (non-blocking) pipe where its guard writes the program's pid.
    pub fn command(
        &self,
        r: usize,
        extra_env: &[(String, String)],
    ) -> anyhow::Result<(Command, std::fs::File)> {
        let spec = &self.ranks[r];
        // The rank is this binary in guard mode (guard.rs), which runs the program under it.
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("tprun-guard")
            .arg(&self.program_path)
            .arg(&self.program)
            .args(&self.args);
        let flags = nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK;
        let (pid_read, pid_write) =
            nix::unistd::pipe2(flags).context("cannot create a pipe for a rank")?;
        let report_fd = pid_write.as_raw_fd();
        let guard_var = format!("{}:{report_fd}", std::process::id());
        cmd.env(crate::guard::GUARD_VAR, guard_var);
        self.set_env(&mut cmd, r, extra_env);
        let stdin = rank_stdin(&mut cmd, r)?;
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Own process group: terminal Ctrl-C reaches only tprun, and killpg reaches the rank's
        // children too.
        cmd.process_group(0);

        let cpuset = cpuset_of(spec)?;
        guard_pre_exec(&mut cmd, pid_write, cpuset);
        Ok((cmd, std::fs::File::from(pid_read)))
    }

    /// The torchrun environment of rank `r`, then the job's and the caller's variables.
    fn set_env(&self, cmd: &mut Command, r: usize, extra_env: &[(String, String)]) {
        let spec = &self.ranks[r];
        cmd.envs(self.job_env.iter().map(|(k, v)| (k, v)));
        let n = self.world_size.to_string();
        let r_s = r.to_string();
        let e = &self.elastic;
        cmd.env("TORCHELASTIC_ERROR_FILE", self.errors.path(r));
        let (restart, max) = (e.restart.to_string(), e.max_restarts.to_string());
        let vars: [(&str, &str); 16] = [
            ("RANK", &r_s),
            ("LOCAL_RANK", &r_s),
            ("WORLD_SIZE", &n),
            ("LOCAL_WORLD_SIZE", &n),
            ("GROUP_RANK", "0"),
            ("GROUP_WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &self.master_port.to_string()),
            ("TPRUN_RUN_ID", &e.run_id),
            ("TPRUN_DEVICE", self.device.as_str()),
            // What torchrun's single role ("default") gives scripts that read them.
            ("ROLE_NAME", "default"),
            ("ROLE_RANK", &r_s),
            ("ROLE_WORLD_SIZE", &n),
            ("TORCHELASTIC_RUN_ID", &e.run_id),
            ("TORCHELASTIC_RESTART_COUNT", &restart),
            ("TORCHELASTIC_MAX_RESTARTS", &max),
        ];
        cmd.envs(vars);
        if !self.user_omp {
            cmd.env("OMP_NUM_THREADS", spec.omp_threads.to_string());
        }
        cmd.envs(extra_env.iter().map(|(k, v)| (k, v)));
    }
}

/// The number of ranks `-n` asks for, checked against `--only-rank`.
/// Set to 1 in every rank when rank 0's stdin is the relayed terminal.
pub(crate) const STDIN_TERMINAL: &str = "TPRUN_STDIN_TERMINAL";

/// Whether tprun's process group owns its terminal (a background job must not read it).
fn foreground() -> bool {
    // SAFETY: plain syscalls without pointers.
    unsafe { libc::tcgetpgrp(0) == libc::getpgrp() }
}

/// Rank `r`'s stdin.
fn rank_stdin(cmd: &mut Command, r: usize) -> anyhow::Result<Stdio> {
    // Rank 0 gets tprun's stdin (like mpirun). A terminal is not handed over (a rank in its
    // own process group that read it would be stopped by SIGTTIN): while tprun is in the
    // foreground, tprun reads it and relays the lines to rank 0 through a pipe, and every
    // rank sees TPRUN_STDIN_TERMINAL=1 (interactive chat keys on it).
    let terminal = std::io::stdin().is_terminal() && foreground();
    if terminal {
        cmd.env(STDIN_TERMINAL, "1");
    }
    Ok(match (r, terminal) {
        (0, false) if !std::io::stdin().is_terminal() => Stdio::inherit(),
        (0, true) => terminal_relay()?,
        _ => Stdio::null(),
    })
}

/// The CPUs rank `spec` is pinned to, as the kernel's set.
fn cpuset_of(spec: &RankSpec) -> anyhow::Result<Option<CpuSet>> {
    Ok(match &spec.cpus {
        Some(list) => {
            let mut set = CpuSet::new();
            for &c in list {
                set.set(c)
                    .with_context(|| format!("CPU {c} is beyond what the kernel supports"))?;
            }
            Some(set)
        }
        None => None,
    })
}

/// What the rank's child does between fork and exec: hand the pid pipe to its guard only, die
/// with tprun, default SIGXFSZ, pin its CPUs.
fn guard_pre_exec(cmd: &mut Command, pid_write: std::os::fd::OwnedFd, cpuset: Option<CpuSet>) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes four raw syscalls (prctl, getppid,
    // signal, sched_setaffinity) on data prepared before the fork, and builds errors from raw errno
    // values without allocating.
    unsafe {
        cmd.pre_exec(move || {
            // Owned by the closure, so tprun's copy closes when the Command is dropped.
            let report = &pid_write;
            // Only this rank's guard inherits the write end.
            if libc::fcntl(report.as_raw_fd(), libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                crate::guard::DEATH_SIGNAL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // tprun may have died before the prctl took effect; then nobody would kill us.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            // tprun ignores SIGXFSZ for itself (signals.rs); the program gets the default.
            if libc::signal(libc::SIGXFSZ, libc::SIG_DFL) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(set) = &cpuset {
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set)
                    .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            }
            Ok(())
        });
    }
}

/// The write end of the newest rank 0's stdin pipe; the one relay thread feeds it.
static RELAY_TO: std::sync::Mutex<Option<File>> = std::sync::Mutex::new(None);

/// A pipe for rank 0's stdin, fed line by line from tprun's terminal by one thread (started
/// once; a restarted rank 0 gets the next lines). End of input closes the pipe.
fn terminal_relay() -> anyhow::Result<Stdio> {
    use std::io::{BufRead, Write};
    static STARTED: std::sync::Once = std::sync::Once::new();
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .context("cannot make a pipe for rank 0's stdin")?;
    *RELAY_TO.lock().unwrap_or_else(|e| e.into_inner()) = Some(File::from(write));
    STARTED.call_once(|| {
        std::thread::spawn(|| {
            let mut line = Vec::new();
            let mut input = std::io::stdin().lock();
            loop {
                line.clear();
                let n = input.read_until(b'\n', &mut line).unwrap_or(0);
                let mut to = RELAY_TO.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    to.take(); // EOF (Ctrl-D): rank 0 sees its stdin end.
                    return;
                }
                if let Some(f) = to.as_mut() {
                    if f.write_all(&line).is_err() {
                        to.take();
                    }
                }
            }
        });
    });
    Ok(Stdio::from(read))
}

fn world_size(launch: &LaunchArgs, device: Device, cores: &[Vec<usize>]) -> anyhow::Result<usize> {
    let world_size = match launch.nproc_per_node {
        Nproc::Count(n) => n,
        Nproc::Auto if device == Device::Cuda => match cpus::gpu_count() {
            0 => {
                return Err(LaunchError::Usage(
                    "-n auto with --device cuda: no GPU is visible".into(),
                )
                .into())
            }
            n => n,
        },
        Nproc::Auto => cores.len().max(1),
    };
    if let Some(r) = launch.only_rank {
        if r >= world_size {
            return Err(LaunchError::Usage(format!(
                "--only-rank {r} is out of range: the job has {world_size} rank(s), 0..={}",
                world_size - 1
            ))
            .into());
        }
    }
    Ok(world_size)
}

/// Each rank's CPUs, thread count and log files.
fn rank_specs(
    launch: &LaunchArgs,
    cores: &[Vec<usize>],
    world_size: usize,
    append_logs: bool,
) -> anyhow::Result<Vec<RankSpec>> {
    let bind = launch.cpu_bind.unwrap_or(if world_size <= cores.len() {
        CpuBind::Cores
    } else {
        CpuBind::None
    });
    if bind == CpuBind::Cores && world_size > cores.len() {
        eprintln!(
            "tprun: warning: {world_size} ranks share {} physical core(s) (--cpu-bind cores)",
            cores.len()
        );
    }
    let shares = cpus::shares(cores, world_size);
    let mut ranks = Vec::with_capacity(world_size);
    for (r, share) in shares.into_iter().enumerate() {
        let (cpus, omp_threads) = match bind {
            CpuBind::Cores if !share.is_empty() => {
                let n = share.len();
                (Some(share.into_iter().flatten().collect()), n)
            }
            _ => (None, (cores.len() / world_size).max(1)),
        };
        let log = match &launch.log_dir {
            Some(dir) => Some(open_logs(dir, r, append_logs)?),
            None => None,
        };
        ranks.push(RankSpec {
            cpus,
            omp_threads,
            log,
        });
    }
    Ok(ranks)
}

/// Finds `program` the way execvp would (a name with a `/` is a path, else searched on PATH) and
/// checks that it is an executable file, so a typo fails before any rank starts.
pub(crate) fn resolve_program(
    program: &OsStr,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, LaunchError> {
    let name = program.to_string_lossy().into_owned();
    let err = |reason: &str| LaunchError::Program {
        program: name.clone(),
        reason: reason.into(),
    };
    if program.is_empty() {
        return Err(err("empty program name"));
    }
    if program.as_bytes().contains(&b'/') {
        let path = Path::new(program);
        return match path.metadata() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(err("no such file")),
            Err(e) => Err(err(&e.to_string())),
            Ok(m) if m.is_dir() => Err(err("is a directory")),
            Ok(_) if access(path, AccessFlags::X_OK).is_err() => {
                Err(err("permission denied (not executable)"))
            }
            Ok(_) => Ok(path.to_path_buf()),
        };
    }
    let default_path = OsStr::new("/usr/local/bin:/usr/bin:/bin");
    let mut found_not_exec = false;
    for dir in std::env::split_paths(path_var.unwrap_or(default_path)) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let cand = dir.join(program);
        match cand.metadata() {
            Ok(m) if m.is_file() => {
                if access(&cand, AccessFlags::X_OK).is_ok() {
                    return Ok(cand);
                }
                found_not_exec = true;
            }
            _ => {}
        }
    }
    Err(err(if found_not_exec {
        "permission denied (not executable)"
    } else {
        "command not found on PATH"
    }))
}

/// Creates DIR/rank{r} and truncates its two logs (or appends to them, on a restart). Neither the rank directory nor a log may be a
/// symlink: a link planted there would make tprun overwrite whatever it points to.
fn open_logs(dir: &Path, r: usize, append: bool) -> anyhow::Result<(PathBuf, File, File)> {
    let rank_dir = dir.join(format!("rank{r}"));
    let fail = |p: &Path| format!("--log-dir {}: cannot create {}", dir.display(), p.display());
    std::fs::create_dir_all(&rank_dir).with_context(|| fail(&rank_dir))?;
    let is_link = std::fs::symlink_metadata(&rank_dir).is_ok_and(|m| m.is_symlink());
    if is_link {
        anyhow::bail!("{}: it is a symbolic link", fail(&rank_dir));
    }
    let open = |name: &str| {
        let p = rank_dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .append(append)
            .truncate(!append)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => anyhow::anyhow!("{}: it is a symbolic link", fail(&p)),
                _ => anyhow::Error::new(e).context(fail(&p)),
            })
    };
    let out = open("stdout.log")?;
    let err = open("stderr.log")?;
    Ok((rank_dir, out, err))
}

/// A TCP port that was free a moment ago, for MASTER_PORT (torchrun's `localhost:0` approach: the
/// kernel picks it, so two jobs on one host don't collide on a fixed default).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free TCP port for MASTER_PORT")?;
    Ok(l.local_addr()?.port())
}

/// Unique enough per host and time: tprun's pid and the start time in microseconds.
pub(crate) fn run_id() -> String {
    let us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("tprun-{}-{us:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_on_path_and_reports_missing_or_unexecutable() {
        let sh = resolve_program(
            OsStr::new("sh"),
            Some(OsStr::new("/nonexistent:/bin:/usr/bin")),
        )
        .unwrap();
        assert!(sh.ends_with("sh"));
        let e =
            resolve_program(OsStr::new("no-such-prog-xyz"), Some(OsStr::new("/bin"))).unwrap_err();
        assert_eq!(e.exit_code(), 127);
        assert!(e.to_string().contains("no-such-prog-xyz"), "{e}");
        let e = resolve_program(OsStr::new("/etc/hostname-not-here"), None).unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
        let e = resolve_program(OsStr::new("/"), None).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }
}
