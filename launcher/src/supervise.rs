//! The monitor loop: start the ranks, watch them, tear the job down on the first failure, a
//! signal or the timeout, and report.

use std::cell::Cell;
use std::fmt::Write as _;
use std::io::Read as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::Context;
use collectives::shm::JobSegment;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::output::{self, Relay, STDERR, STDOUT};
use crate::signals::Handlers;
use crate::spawn::LaunchPlan;
use crate::{errors, reaper};
use crate::{LaunchArgs, LaunchError, Output};

/// How often the loop checks ranks, signals and deadlines (well under the 1 s reaction bound).
const TICK: Duration = Duration::from_millis(20);
/// How long to wait for ranks to be reaped after SIGKILL before giving up on them.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// How long to wait for output pipes to drain once every rank is gone.
const DRAIN_WAIT: Duration = Duration::from_secs(1);
/// tprun's exit code on `--timeout`, the same as timeout(1).
pub(crate) const TIMEOUT_EXIT: i32 = 124;
/// tprun's exit code when stopped processes held ranks that had ended (the job did not end by
/// itself, whatever the ended processes' own statuses).
const HELD_EXIT: i32 = 1;
/// Lines of a failing rank's stderr shown under the summary when it wrote no error file.
const TAIL_LINES: usize = 10;
/// How often the loop looks for ranks that ended under a stopped process (a scan of /proc).
const HELD_CHECK: Duration = Duration::from_millis(250);

struct Rank {
    rank: usize,
    /// The guard's pid, which is also the rank's process group (what tprun waits for and signals).
    pid: i32,
    /// The program's pid under the guard, once read from `pid_pipe` (shown in the summary).
    program_pid: Cell<Option<i32>>,
    pid_pipe: std::fs::File,
    child: Child,
    /// Exit status and seconds since the job started when it was reaped.
    exit: Option<(ExitStatus, f64)>,
    log_dir: Option<PathBuf>,
    /// Its TORCHELASTIC_ERROR_FILE.
    error_file: PathBuf,
}

/// How one attempt of the job ended.
pub(crate) struct End {
    /// tprun's exit code if the job ends here.
    pub code: i32,
    /// A rank failed (not a signal to tprun, nor the timeout): `--max-restarts` may start again.
    pub rank_failed: bool,
}

impl Rank {
    /// The program's pid as its guard reported it (the guard's own when it reported none: the
    /// program could not start). The pipe is non-blocking, so this never waits.
    fn shown_pid(&self) -> i32 {
        if let Some(p) = self.program_pid.get() {
            return p;
        }
        let mut b = [0u8; 4];
        match (&self.pid_pipe).read(&mut b) {
            Ok(4) => {
                let p = i32::from_ne_bytes(b);
                self.program_pid.set(Some(p));
                p
            }
            _ => self.pid,
        }
    }
}

/// Why the job is being torn down.
enum Cause {
    Failed(usize),
    Signal(Signal),
    Timeout,
    /// Every rank had ended, but stopped processes held them (one line per rank).
    Held(Vec<String>),
}

/// The monitor's state between ticks.
struct Monitor<'a> {
    launch: &'a LaunchArgs,
    segment: &'a JobSegment,
    relay: &'a Relay,
    ranks: Vec<Rank>,
    start: Instant,
    /// `--timeout`'s deadline, counted from the job's first start.
    deadline: Option<Instant>,
    cause: Option<Cause>,
    /// Set once ranks got their first stop signal: when to send SIGKILL.
    kill_at: Option<Instant>,
    killed_at: Option<Instant>,
    /// Where to write the flight records at teardown (`--trace`), and whether that was done.
    flight_out: Option<&'a Path>,
    flight_noted: bool,
    /// When to look for ranks held by a stopped process next.
    next_held_check: Instant,
}

pub(crate) fn run(
    mut plan: LaunchPlan,
    launch: &LaunchArgs,
    mode: Output,
    segment: &JobSegment,
    handlers: &mut Handlers,
    deadline: Option<Instant>,
    flight_out: Option<&Path>,
) -> anyhow::Result<End> {
    reaper::become_subreaper()?;
    let relay = Relay::start(plan.world_size, !launch.no_prefix, launch.only_rank, mode)
        .context("cannot start the output thread")?;
    let tails = relay.tails();
    let start = Instant::now();
    let ranks = match start_all(&mut plan, segment, &relay) {
        Ok(ranks) => ranks,
        Err(e) => {
            reaper::sweep(KILL_WAIT);
            relay.finish(DRAIN_WAIT);
            return Err(e);
        }
    };
    let mut m = Monitor {
        launch,
        segment,
        relay: &relay,
        ranks,
        start,
        deadline,
        cause: None,
        kill_at: None,
        killed_at: None,
        flight_out,
        flight_noted: false,
        next_held_check: start + HELD_CHECK,
    };
    let res = m.watch(handlers);
    let code = m.exit_code();
    let Monitor { ranks, cause, .. } = m;
    // Unreaped ranks' groups (only those: a reaped rank's pid may be reused), then whatever the
    // ranks left behind anywhere in the tree.
    signal_groups(running(&ranks), Signal::SIGKILL);
    let left = reaper::sweep(KILL_WAIT);
    if left > 0 {
        relay.note(format!(
            "tprun: killed {left} process(es) the ranks left behind"
        ));
    }
    let dropped = relay.finish(DRAIN_WAIT);
    res?;
    let mut report = String::new();
    if dropped > 0 {
        report = format!(
            "tprun: the console was not reading: dropped at least {dropped} bytes of output\n"
        );
    }
    if let Some(cause) = &cause {
        report.push_str(&summary(cause, &ranks, launch));
    }
    if let Some(Cause::Failed(i)) = &cause {
        report.push_str(&failure_detail(&ranks[*i], &tails));
    }
    output::write_stderr_bounded(report.as_bytes(), DRAIN_WAIT);
    Ok(End {
        code,
        rank_failed: matches!(cause, Some(Cause::Failed(_))),
    })
}

/// Why the failing rank failed: the message and frame of its error file (torch's `@record`),
/// else the last lines of its stderr.
fn failure_detail(rk: &Rank, tails: &output::Tails) -> String {
    let mut s = String::new();
    if let Some(e) = errors::read_error_file(&rk.error_file) {
        let _ = writeln!(s, "tprun: rank {} error: {}", rk.rank, e.message);
        if let Some(frame) = e.frame {
            let _ = writeln!(s, "tprun:   at {frame}");
        }
        return s;
    }
    let lines = output::last_lines(tails, rk.rank, TAIL_LINES);
    if !lines.is_empty() {
        let _ = writeln!(s, "tprun: last lines of rank {}'s stderr:", rk.rank);
        for l in lines {
            let _ = writeln!(s, "  {l}");
        }
    }
    s
}

/// Starts every rank; on an error kills the ones already started.
fn start_all(
    plan: &mut LaunchPlan,
    segment: &JobSegment,
    relay: &Relay,
) -> anyhow::Result<Vec<Rank>> {
    let mut ranks: Vec<Rank> = Vec::with_capacity(plan.world_size);
    for r in 0..plan.world_size {
        if let Err(e) = start_rank(plan, r, segment, relay, &mut ranks) {
            // None was reaped yet, so every pid here is still a rank's.
            signal_groups(&ranks, Signal::SIGKILL);
            for rk in &mut ranks {
                let _ = rk.child.wait();
            }
            return Err(e);
        }
    }
    Ok(ranks)
}

impl Monitor<'_> {
    /// Ticks until every rank is reaped, or they outlived SIGKILL by [`KILL_WAIT`]. Never blocks
    /// on output: notes to a stuck console are dropped, not waited for.
    fn watch(&mut self, handlers: &mut Handlers) -> anyhow::Result<()> {
        loop {
            let failed_now = self.reap()?;
            let newly_failed = self.on_failures(&failed_now);
            if self.ranks.iter().all(|rk| rk.exit.is_some()) {
                return Ok(());
            }
            if newly_failed {
                self.stop(Signal::SIGTERM);
            }
            for (sig, nth) in handlers.poll() {
                self.on_signal(sig, nth);
            }
            self.check_timeout();
            self.check_held();
            // Map groups as they appear, so their flight records outlive their members.
            self.segment.hold_groups();
            if self.escalate() {
                return Ok(());
            }
            std::thread::sleep(TICK);
        }
    }

    /// Collects the exit status of ranks that ended; returns the indices of those that failed.
    fn reap(&mut self) -> anyhow::Result<Vec<usize>> {
        let unreaped: Vec<i32> = running(&self.ranks).map(|rk| rk.pid).collect();
        reaper::reap_orphans(&unreaped);
        let mut failed_now = Vec::new();
        for (i, rk) in self.ranks.iter_mut().enumerate() {
            if rk.exit.is_some() {
                continue;
            }
            let status = rk
                .child
                .try_wait()
                .with_context(|| format!("cannot wait for rank {} (pid {})", rk.rank, rk.pid))?;
            if let Some(st) = status {
                rk.exit = Some((st, self.start.elapsed().as_secs_f64()));
                if !st.success() {
                    failed_now.push(i);
                }
            }
        }
        Ok(failed_now)
    }

    /// Records the job's first failure; true when this tick found it.
    fn on_failures(&mut self, failed_now: &[usize]) -> bool {
        // Of the ranks found dead in one tick, one killed by a signal is the likelier first
        // failure: the others may only have noticed it die (a collective reports a dead peer
        // within 0.1 s) and exited with an error of their own in the same tick.
        let ranks = &self.ranks;
        let first = failed_now
            .iter()
            .copied()
            .find(|&i| ranks[i].exit.is_some_and(|(st, _)| st.signal().is_some()))
            .or(failed_now.first().copied());
        let (Some(i), None) = (first, &self.cause) else {
            return false;
        };
        let (rank, st) = (ranks[i].rank, ranks[i].exit.map(|(st, _)| st));
        // Read where every rank is before the abort makes the others leave their calls.
        self.note_flight();
        // Wake ranks blocked in a collective first, then stop them.
        self.segment.abort(rank);
        self.cause = Some(Cause::Failed(i));
        if let Some(st) = st {
            self.relay.note(format!(
                "tprun: rank {rank} failed ({}); stopping the other ranks",
                describe(st)
            ));
        }
        true
    }

    /// Once per job, at teardown: says which rank is behind at which collective call (from the
    /// flight recorders in the segment) and writes the records to `flight_out`.
    fn note_flight(&mut self) {
        if std::mem::replace(&mut self.flight_noted, true) {
            return;
        }
        let flights = self.segment.flight_records();
        let alive: Vec<bool> = self.ranks.iter().map(|rk| rk.exit.is_none()).collect();
        let now = collectives::shm::flight::now_ns();
        if let Some(line) = collectives::shm::flight::behind_line(&flights, &alive, now) {
            self.relay.note(format!("tprun: {line}"));
        }
        // Groups made by `split` keep their own call numbers: one line per group that is behind.
        let groups = self.segment.group_flight_records();
        for g in &groups {
            if let Some(line) = collectives::shm::flight::behind_line(&g.ranks, &alive, now) {
                let members: Vec<String> = g.world_ranks.iter().map(|r| r.to_string()).collect();
                self.relay.note(format!(
                    "tprun: in group {} (world ranks {}): {line}",
                    g.name,
                    members.join(",")
                ));
            }
        }
        if let Some(out) = self.flight_out {
            let doc = serde_json::json!({ "now_ns": now, "ranks": flights, "groups": groups });
            let res = serde_json::to_vec_pretty(&doc)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(collectives::files::write_output(out, &b)?));
            if let Err(e) = res {
                self.relay.note(format!(
                    "tprun: cannot write the flight records to {}: {e:#}",
                    out.display()
                ));
            }
        }
    }

    /// Sends `sig` to the running ranks and starts the grace period if it has not started.
    fn stop(&mut self, sig: Signal) {
        signal_groups(running(&self.ranks), sig);
        let grace = self.launch.grace_period;
        self.kill_at
            .get_or_insert_with(|| Instant::now().checked_add(grace).unwrap_or_else(far_future));
    }

    fn on_signal(&mut self, sig: Signal, nth: usize) {
        if matches!(sig, Signal::SIGUSR1 | Signal::SIGUSR2) {
            // A warning for the program (Slurm: preemption is coming), not a stop.
            self.relay
                .note(format!("tprun: got {sig}: forwarding it to every rank"));
            signal_groups(running(&self.ranks), sig);
            return;
        }
        if sig == Signal::SIGINT && nth >= 2 {
            if self.killed_at.is_none() {
                self.relay
                    .note("tprun: second SIGINT: killing every rank".into());
                signal_groups(running(&self.ranks), Signal::SIGKILL);
                self.killed_at = Some(Instant::now());
            }
            return;
        }
        let again = if sig == Signal::SIGINT {
            "; Ctrl-C again to kill them now"
        } else {
            ""
        };
        self.relay.note(format!(
            "tprun: got {sig}: forwarding it to every rank (SIGKILL after {}s{again})",
            self.launch.grace_period.as_secs_f64()
        ));
        if self.cause.is_none() {
            self.note_flight();
        }
        self.cause.get_or_insert(Cause::Signal(sig));
        self.stop(sig);
    }

    fn check_timeout(&mut self) {
        let (Some(limit), Some(deadline)) = (self.launch.timeout, self.deadline) else {
            return;
        };
        if self.cause.is_none() && Instant::now() >= deadline {
            self.relay.note(format!(
                "tprun: timeout: the job was still running after --timeout {}s; stopping every rank",
                limit.as_secs_f64()
            ));
            self.note_flight();
            self.cause = Some(Cause::Timeout);
            self.stop(Signal::SIGTERM);
        }
    }

    /// A stopped process must not hold a job whose ranks have all ended until `--timeout`: a
    /// stopped guard above its ended program is resumed (it then reports the program's status),
    /// and when every running rank has ended under a stopped process (a wrapper between the
    /// guard and the real rank), the job ends here and what is left is killed.
    fn check_held(&mut self) {
        if self.cause.is_some() || self.killed_at.is_some() || Instant::now() < self.next_held_check
        {
            return;
        }
        self.next_held_check = Instant::now() + HELD_CHECK;
        let procs = reaper::processes();
        let mut lines = Vec::new();
        let mut all_held = true;
        for rk in running(&self.ranks) {
            match reaper::held(rk.pid, &procs) {
                Some(reaper::Held::Guard) => {
                    self.relay.note(format!(
                        "tprun: rank {}'s guard (pid {}) was stopped after its program ended; resuming it",
                        rk.rank, rk.pid
                    ));
                    // The guard is tprun's unreaped child, so its pid is its own. Only the guard
                    // resumes: anything else stopped under it stays stopped.
                    let _ = nix::sys::signal::kill(Pid::from_raw(rk.pid), Signal::SIGCONT);
                    all_held = false;
                }
                Some(reaper::Held::Stopped { stopped, ended }) => lines.push(format!(
                    "rank {}: pid {} ({}) is stopped and cannot reap pid {} ({}), which ended with {}",
                    rk.rank,
                    stopped.pid,
                    stopped.comm,
                    ended.pid,
                    ended.comm,
                    describe(ExitStatus::from_raw(ended.exit_status))
                )),
                None => all_held = false,
            }
        }
        if !all_held || lines.is_empty() {
            return;
        }
        self.relay.note(
            "tprun: every rank has ended, but stopped processes hold the job; killing what is left"
                .into(),
        );
        self.cause = Some(Cause::Held(lines));
        // A stopped process keeps SIGTERM pending until it is resumed: only SIGKILL ends it.
        signal_groups(running(&self.ranks), Signal::SIGKILL);
        self.killed_at = Some(Instant::now());
    }

    /// SIGKILL once the grace period is over; true when ranks outlived even that.
    fn escalate(&mut self) -> bool {
        if self.killed_at.is_none() && self.kill_at.is_some_and(|t| Instant::now() >= t) {
            self.relay.note(format!(
                "tprun: ranks still running {}s after SIGTERM: sending SIGKILL",
                self.launch.grace_period.as_secs_f64()
            ));
            signal_groups(running(&self.ranks), Signal::SIGKILL);
            self.killed_at = Some(Instant::now());
        }
        if self.killed_at.is_some_and(|t| t.elapsed() >= KILL_WAIT) {
            let stuck: Vec<String> = running(&self.ranks).map(|rk| rk.rank.to_string()).collect();
            self.relay.note(format!(
                "tprun: rank(s) {} did not die after SIGKILL (uninterruptible?); giving up on them",
                stuck.join(", ")
            ));
            return true;
        }
        false
    }

    fn exit_code(&self) -> i32 {
        match &self.cause {
            None => 0,
            Some(Cause::Failed(r)) => self.ranks[*r].exit.map_or(1, |(st, _)| exit_code(st)),
            Some(Cause::Signal(sig)) => 128 + *sig as i32,
            Some(Cause::Timeout) => TIMEOUT_EXIT,
            Some(Cause::Held(_)) => HELD_EXIT,
        }
    }
}

/// A deadline that never comes (for a grace period too long to add to the clock).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// Spawns rank `r` and hands its pipes to the relay; it joins `ranks` as soon as it runs.
fn start_rank(
    plan: &mut LaunchPlan,
    r: usize,
    segment: &JobSegment,
    relay: &Relay,
    ranks: &mut Vec<Rank>,
) -> anyhow::Result<()> {
    let (mut cmd, pid_pipe) = plan.command(r, &segment.env())?;
    let mut child = cmd.spawn().map_err(|e| spawn_error(plan, r, e))?;
    drop(cmd); // closes tprun's copy of the pid pipe's write end
    let pid = child.id() as i32;
    let (log_dir, out_log, err_log) = match plan.ranks[r].log.take() {
        Some((d, o, e)) => (Some(d), Some(o), Some(e)),
        None => (None, None, None),
    };
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    ranks.push(Rank {
        rank: r,
        pid,
        program_pid: Cell::new(None),
        pid_pipe,
        child,
        exit: None,
        log_dir,
        error_file: plan.errors.path(r),
    });
    let ctx = || format!("cannot start an output thread for rank {r}");
    if let Some(p) = stdout {
        relay.attach(r, STDOUT, p, out_log).with_context(ctx)?;
    }
    if let Some(p) = stderr {
        relay.attach(r, STDERR, p, err_log).with_context(ctx)?;
    }
    Ok(())
}

fn running(ranks: &[Rank]) -> impl Iterator<Item = &Rank> {
    ranks.iter().filter(|rk| rk.exit.is_none())
}

/// Sends `sig` to each rank's process group (the rank and its children). Only for unreaped
/// ranks: the zombie holds the pid, so the group id cannot belong to anyone else.
fn signal_groups<'a>(ranks: impl IntoIterator<Item = &'a Rank>, sig: Signal) {
    for rk in ranks {
        debug_assert!(rk.exit.is_none(), "signalling reaped rank {}", rk.rank);
        let _ = killpg(Pid::from_raw(rk.pid), sig);
    }
}

fn spawn_error(plan: &LaunchPlan, r: usize, e: std::io::Error) -> anyhow::Error {
    let program = plan.program.to_string_lossy().into_owned();
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR | libc::EISDIR) => {
            LaunchError::Program {
                program,
                reason: e.to_string(),
            }
            .into()
        }
        _ => anyhow::anyhow!("cannot start rank {r} ('{program}'): {e}"),
    }
}

/// tprun's exit code for a rank's status: its code, or 128+N for signal N (shell convention).
fn exit_code(st: ExitStatus) -> i32 {
    match (st.code(), st.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

fn signal_name(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())
}

/// "exit code 7" / "killed by SIGKILL".
fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by {}", signal_name(sig)),
        (None, None) => st.to_string(),
    }
}

/// The table tprun prints on stderr when the job did not succeed.
fn summary(cause: &Cause, ranks: &[Rank], launch: &LaunchArgs) -> String {
    let mut s = String::new();
    let _ = match cause {
        Cause::Failed(r) => {
            let how = ranks[*r]
                .exit
                .map_or("unknown".into(), |(st, _)| describe(st));
            writeln!(s, "tprun: rank {r} failed: {how}")
        }
        Cause::Signal(sig) => writeln!(s, "tprun: stopped by {sig}"),
        Cause::Timeout => writeln!(
            s,
            "tprun: timed out after {}s (exit code {TIMEOUT_EXIT})",
            launch.timeout.map_or(0.0, |t| t.as_secs_f64())
        ),
        Cause::Held(lines) => {
            let _ = writeln!(
                s,
                "tprun: every rank had ended, but stopped processes held the job (exit code {HELD_EXIT}):"
            );
            lines.iter().try_for_each(|l| writeln!(s, "tprun:   {l}"))
        }
    };
    let rows: Vec<[String; 5]> = ranks
        .iter()
        .map(|rk| {
            let (status, time) = match rk.exit {
                Some((st, t)) => (
                    match (st.code(), st.signal()) {
                        (Some(c), _) => format!("exit {c}"),
                        (None, Some(sig)) => signal_name(sig),
                        (None, None) => st.to_string(),
                    },
                    format!("{t:.2}"),
                ),
                None => ("running".into(), "-".into()),
            };
            let log = rk
                .log_dir
                .as_ref()
                .map_or("-".into(), |d| d.display().to_string());
            [
                rk.rank.to_string(),
                rk.shown_pid().to_string(),
                status,
                time,
                log,
            ]
        })
        .collect();
    let header = ["rank", "pid", "status", "time_s", "log"].map(String::from);
    let mut widths = [0usize; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            } else {
                line.push_str(cell);
            }
        }
        let _ = writeln!(s, "{line}");
    }
    s
}
