//! Relays rank output to tprun's console, line-whole and prefixed, and copies it raw to log files.
//!
//! One reader thread per rank pipe copies bytes to the rank's log file and sends them to a single
//! writer thread, which owns the console. A console stream (stdout or stderr) is "open" while a
//! rank's unfinished line is on it: that rank's next bytes continue the line, while complete lines
//! from other ranks are parked until the line ends. So lines never mix, and a rank that streams
//! tokens without newlines still shows them as they come. If parked output waits longer than
//! [`HOLD_LIMIT`], the open line is ended with a newline and continues later under a new prefix.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Output;

/// Longest time complete lines wait behind another rank's unfinished line.
const HOLD_LIMIT: Duration = Duration::from_millis(500);
/// Most bytes parked behind an unfinished line before it is ended anyway.
const HOLD_BYTES: usize = 1 << 20;
/// Writer wake-up period, for [`HOLD_LIMIT`].
const TICK: Duration = Duration::from_millis(50);

pub(crate) const STDOUT: usize = 0;
pub(crate) const STDERR: usize = 1;

enum Msg {
    /// A reader thread is about to start for this (rank, stream).
    Opened,
    Data {
        rank: usize,
        stream: usize,
        bytes: Vec<u8>,
    },
    Eof {
        rank: usize,
        stream: usize,
    },
    /// tprun's own message, one line on stderr.
    Note(String),
    /// No more readers will be opened: exit once every open one reached EOF.
    Close,
    /// Exit now (pipes still held open by descendants that escaped the rank's process group).
    Abandon,
}

/// Console bytes counted on both sides of the channel, to tell how many never reached it.
#[derive(Default)]
struct Counts {
    /// Bytes readers took from the ranks for the console, and tprun notes offered.
    offered: AtomicU64,
    /// Of those, bytes the writer took off the channel.
    taken: AtomicU64,
    /// Tells the writer to stop at its next wake-up (set when tprun stops waiting on it).
    abandon: AtomicBool,
}

/// Most bytes of each rank's stderr kept for the failure summary.
const TAIL_BYTES: usize = 4096;

/// The last [`TAIL_BYTES`] of each rank's stderr.
pub(crate) type Tails = Arc<Vec<Mutex<VecDeque<u8>>>>;

/// The running relay: hand it each rank's pipes with [`Relay::attach`].
pub(crate) struct Relay {
    tx: SyncSender<Msg>,
    show_rank: Option<usize>,
    mode: Output,
    writer: JoinHandle<()>,
    counts: Arc<Counts>,
    tails: Tails,
}

impl Relay {
    pub fn start(
        world_size: usize,
        prefix: bool,
        show_rank: Option<usize>,
        mode: Output,
    ) -> io::Result<Relay> {
        // Bounded, so a slow console slows the ranks down instead of growing tprun's memory.
        let (tx, rx) = sync_channel(256);
        let counts = Arc::new(Counts::default());
        let c = Arc::clone(&counts);
        let prefixes = match mode {
            Output::Relay => [prefix; 2],
            Output::Results => [false, prefix && world_size > 1],
        };
        let writer = std::thread::Builder::new()
            .name("tprun-output".into())
            .spawn(move || Writer::new(world_size, prefixes).run(rx, &c))?;
        Ok(Relay {
            tx,
            show_rank,
            mode,
            writer,
            counts,
            tails: Arc::new((0..world_size).map(|_| Mutex::default()).collect()),
        })
    }

    /// The ranks' stderr tails, readable after [`Relay::finish`].
    pub fn tails(&self) -> Tails {
        Arc::clone(&self.tails)
    }

    /// Starts a reader for one pipe of `rank`; `log` gets every byte, unprefixed.
    pub fn attach(
        &self,
        rank: usize,
        stream: usize,
        input: impl Read + Send + 'static,
        log: Option<File>,
    ) -> io::Result<()> {
        let mut show = self.show_rank.unwrap_or(rank) == rank;
        // Where this pipe goes on the console.
        let mut console = stream;
        if self.mode == Output::Results && stream == STDOUT {
            // The result is always shown; any other rank's stdout is a log line like stderr.
            show |= rank == 0;
            if rank != 0 {
                console = STDERR;
            }
        }
        let _ = self.tx.send(Msg::Opened);
        let tx = self.tx.clone();
        let counts = Arc::clone(&self.counts);
        let tails = Arc::clone(&self.tails);
        let pipe = Pipe {
            rank,
            stream,
            console,
            show,
        };
        let started = std::thread::Builder::new()
            .name(format!("tprun-rank{rank}-{stream}"))
            .spawn(move || read_pipe(pipe, input, log, tx, &counts, &tails));
        if started.is_err() {
            let _ = self.tx.send(Msg::Eof {
                rank,
                stream: console,
            });
        }
        started.map(drop)
    }

    /// Prints one line of tprun's own on stderr, in order with the ranks' output. Never blocks:
    /// the supervisor calls it, and a console nobody reads must not stop the job's teardown.
    pub fn note(&self, line: String) {
        self.counts
            .offered
            .fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
        let _ = self.tx.try_send(Msg::Note(line));
    }

    /// Waits (at most `drain` plus a second) until every pipe is drained and printed; never
    /// blocks longer, even on a stuck console. Returns how many console bytes were not printed
    /// (at least; bytes still in a rank's pipe are not counted).
    pub fn finish(self, drain: Duration) -> u64 {
        let closed = self.tx.try_send(Msg::Close).is_ok();
        if !closed || !wait_finished(&self.writer, drain) {
            // The console itself is stuck (or the pipes are held by escaped descendants).
            self.counts.abandon.store(true, Ordering::SeqCst);
            let _ = self.tx.try_send(Msg::Abandon);
            wait_finished(&self.writer, Duration::from_secs(1));
        }
        let c = &self.counts;
        let dropped =
            (c.offered.load(Ordering::SeqCst)).saturating_sub(c.taken.load(Ordering::SeqCst));
        if self.writer.is_finished() {
            let _ = self.writer.join();
        }
        // A writer still blocked in write(2) is left behind: tprun exits without joining it.
        dropped
    }
}

/// Writes tprun's final report to stderr, giving up after `limit` when stderr is stuck (a pipe
/// nobody reads): the job's end must not wait on the console.
pub(crate) fn write_stderr_bounded(bytes: &[u8], limit: Duration) {
    if bytes.is_empty() {
        return;
    }
    let bytes = bytes.to_vec();
    let done = std::thread::Builder::new()
        .name("tprun-report".into())
        .spawn(move || {
            let _ = io::stderr().lock().write_all(&bytes);
        });
    if let Ok(h) = done {
        if wait_finished(&h, limit) {
            let _ = h.join();
        }
    }
}

fn wait_finished(h: &JoinHandle<()>, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while !h.is_finished() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// One rank pipe: whose, which stream, where it goes on the console, and whether it is shown.
struct Pipe {
    rank: usize,
    stream: usize,
    console: usize,
    show: bool,
}

fn read_pipe(
    p: Pipe,
    mut input: impl Read,
    mut log: Option<File>,
    tx: SyncSender<Msg>,
    counts: &Counts,
    tails: &Tails,
) {
    let Pipe {
        rank,
        stream,
        console,
        show,
    } = p;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if stream == STDERR {
            keep_tail(&tails[rank], &buf[..n]);
        }
        if let Some(f) = &mut log {
            if let Err(e) = f.write_all(&buf[..n]) {
                let name = if stream == STDOUT { "stdout" } else { "stderr" };
                let line = format!(
                    "tprun: warning: cannot write rank {rank}'s {name}.log ({e}); it stops here"
                );
                counts
                    .offered
                    .fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
                let _ = tx.send(Msg::Note(line));
                log = None;
            }
        }
        if show {
            counts.offered.fetch_add(n as u64, Ordering::Relaxed);
        }
        if show
            && tx
                .send(Msg::Data {
                    rank,
                    stream: console,
                    bytes: buf[..n].to_vec(),
                })
                .is_err()
        {
            break;
        }
    }
    let _ = tx.send(Msg::Eof {
        rank,
        stream: console,
    });
}

fn keep_tail(tail: &Mutex<VecDeque<u8>>, bytes: &[u8]) {
    let Ok(mut t) = tail.lock() else { return };
    let bytes = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
    let over = (t.len() + bytes.len()).saturating_sub(TAIL_BYTES);
    t.drain(..over);
    t.extend(bytes);
}

/// The last `n` lines of a rank's stderr tail (the first, possibly cut, line of a full tail
/// dropped).
pub(crate) fn last_lines(tails: &Tails, rank: usize, n: usize) -> Vec<String> {
    let Some(Ok(t)) = tails.get(rank).map(|t| t.lock()) else {
        return Vec::new();
    };
    let bytes: Vec<u8> = t.iter().copied().collect();
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if bytes.len() >= TAIL_BYTES && lines.len() > 1 {
        lines.remove(0);
    }
    let from = lines.len().saturating_sub(n);
    lines[from..].iter().map(|l| l.to_string()).collect()
}

/// One console stream.
struct Sink {
    out: Box<dyn Write + Send>,
    /// False after a write error (e.g. `tprun ... | head` closed the pipe): output is dropped.
    ok: bool,
    /// The rank whose unfinished line is on the console.
    open: Option<usize>,
    /// Complete lines of other ranks waiting for `open`'s line to end, in arrival order.
    held: VecDeque<(usize, Vec<u8>)>,
    /// When output first had to wait behind `open`.
    waiting_since: Option<Instant>,
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) {
        if self.ok && !bytes.is_empty() {
            self.ok = self
                .out
                .write_all(bytes)
                .and_then(|_| self.out.flush())
                .is_ok();
        }
    }
}

struct Writer {
    sinks: [Sink; 2],
    /// Per rank and stream: bytes not yet on the console (a partial line waiting for its turn).
    pending: Vec<[Vec<u8>; 2]>,
    /// Per rank and stream: its last line on the console was ended by [`Writer::break_line`].
    broken: Vec<[bool; 2]>,
    /// Per console stream: whether lines get the `[rank{r}]: ` prefix.
    prefix: [bool; 2],
}

impl Writer {
    fn new(world_size: usize, prefix: [bool; 2]) -> Writer {
        let sink = |out: Box<dyn Write + Send>| Sink {
            out,
            ok: true,
            open: None,
            held: VecDeque::new(),
            waiting_since: None,
        };
        Writer {
            sinks: [
                sink(Box::new(std::io::stdout())),
                sink(Box::new(std::io::stderr())),
            ],
            pending: (0..world_size).map(|_| Default::default()).collect(),
            broken: vec![[false; 2]; world_size],
            prefix,
        }
    }

    fn run(mut self, rx: Receiver<Msg>, counts: &Counts) {
        let (mut readers, mut closed) = (0usize, false);
        loop {
            if counts.abandon.load(Ordering::SeqCst) {
                break;
            }
            match rx.recv_timeout(TICK) {
                Ok(Msg::Opened) => readers += 1,
                Ok(Msg::Data {
                    rank,
                    stream,
                    bytes,
                }) => {
                    counts
                        .taken
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    self.on_data(rank, stream, &bytes)
                }
                Ok(Msg::Eof { rank, stream }) => {
                    readers -= 1;
                    // A last line without newline is ended here.
                    if self.sinks[stream].open == Some(rank)
                        || !self.pending[rank][stream].is_empty()
                    {
                        self.pending[rank][stream].push(b'\n');
                        self.pump(rank, stream);
                    }
                }
                Ok(Msg::Note(line)) => {
                    counts
                        .taken
                        .fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
                    self.on_note(&line);
                }
                Ok(Msg::Close) => closed = true,
                Ok(Msg::Abandon) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.enforce_hold_limits();
            if closed && readers == 0 {
                break;
            }
        }
        for s in [STDOUT, STDERR] {
            self.break_line(s);
            for r in 0..self.pending.len() {
                let mut rest = std::mem::take(&mut self.pending[r][s]);
                if !rest.is_empty() {
                    rest.push(b'\n');
                    self.emit(s, r, &rest);
                }
            }
        }
    }

    fn on_data(&mut self, rank: usize, stream: usize, mut bytes: &[u8]) {
        // The line was already ended by a break: don't print an empty line for its real end.
        if std::mem::take(&mut self.broken[rank][stream]) && self.pending[rank][stream].is_empty() {
            bytes = bytes.strip_prefix(b"\n").unwrap_or(bytes);
        }
        self.pending[rank][stream].extend_from_slice(bytes);
        self.pump(rank, stream);
    }

    /// One of tprun's own lines, on stderr between the ranks' lines: an open line is ended first,
    /// and no rank's partial line may start before the note is out (it would run into the note,
    /// and the rest of it be taken for the note's line).
    fn on_note(&mut self, line: &str) {
        if let Some(rank) = self.sinks[STDERR].open.take() {
            self.broken[rank][STDERR] = true;
            self.sinks[STDERR].write(b"\n");
        }
        self.sinks[STDERR].write(format!("{line}\n").as_bytes());
        self.release(STDERR);
    }

    /// Puts rank `rank`'s pending bytes on stream `s`, or parks them while another rank's line is
    /// open there.
    fn pump(&mut self, rank: usize, s: usize) {
        let pend = std::mem::take(&mut self.pending[rank][s]);
        if pend.is_empty() {
            return;
        }
        match self.sinks[s].open {
            Some(owner) if owner != rank => {
                let sink = &mut self.sinks[s];
                match pend.iter().rposition(|&b| b == b'\n') {
                    Some(end) => {
                        sink.held.push_back((rank, pend[..=end].to_vec()));
                        self.pending[rank][s] = pend[end + 1..].to_vec();
                    }
                    None => self.pending[rank][s] = pend,
                }
                sink.waiting_since.get_or_insert_with(Instant::now);
            }
            _ => {
                self.emit(s, rank, &pend);
                if self.sinks[s].open.is_none() {
                    self.release(s);
                }
            }
        }
    }

    /// Writes `bytes` of `rank` to stream `s`, prefixing every line that starts on the console.
    /// The stream must be free or open by `rank`.
    fn emit(&mut self, s: usize, rank: usize, bytes: &[u8]) {
        let sink = &mut self.sinks[s];
        debug_assert!(!matches!(sink.open, Some(o) if o != rank));
        let mut buf = Vec::with_capacity(bytes.len() + 16);
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            if sink.open != Some(rank) && self.prefix[s] {
                buf.extend_from_slice(format!("[rank{rank}]: ").as_bytes());
            }
            buf.extend_from_slice(piece);
            sink.open = if piece.ends_with(b"\n") {
                None
            } else {
                Some(rank)
            };
        }
        sink.write(&buf);
    }

    /// The stream just became free: print what was parked, then let a waiting partial line in.
    fn release(&mut self, s: usize) {
        while let Some((rank, lines)) = self.sinks[s].held.pop_front() {
            self.emit(s, rank, &lines);
        }
        self.sinks[s].waiting_since = None;
        if let Some(rank) = (0..self.pending.len()).find(|&r| !self.pending[r][s].is_empty()) {
            let part = std::mem::take(&mut self.pending[rank][s]);
            self.emit(s, rank, &part);
        }
    }

    /// Ends the open line on stream `s` (its rank continues later under a new prefix).
    fn break_line(&mut self, s: usize) {
        if let Some(rank) = self.sinks[s].open.take() {
            self.broken[rank][s] = true;
            self.sinks[s].write(b"\n");
            self.release(s);
        }
    }

    fn enforce_hold_limits(&mut self) {
        for s in [STDOUT, STDERR] {
            let Some(since) = self.sinks[s].waiting_since else {
                continue;
            };
            let parked: usize = self.sinks[s]
                .held
                .iter()
                .map(|(_, l)| l.len())
                .sum::<usize>()
                + self.pending.iter().map(|p| p[s].len()).sum::<usize>();
            if since.elapsed() >= HOLD_LIMIT || parked >= HOLD_BYTES {
                self.break_line(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn writer(n: usize) -> (Writer, Shared) {
        let mut w = Writer::new(n, [true; 2]);
        let out = Shared::default();
        w.sinks[STDOUT].out = Box::new(out.clone());
        (w, out)
    }

    fn data(w: &mut Writer, rank: usize, bytes: &[u8]) {
        w.on_data(rank, STDOUT, bytes);
    }

    fn text(out: &Shared) -> String {
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn partial_line_keeps_the_console_until_it_ends() {
        let (mut w, out) = writer(2);
        data(&mut w, 0, b"tok1 ");
        data(&mut w, 1, b"one\ntwo\nthr");
        data(&mut w, 0, b"tok2\nnext\n");
        assert_eq!(
            text(&out),
            "[rank0]: tok1 tok2\n[rank0]: next\n[rank1]: one\n[rank1]: two\n[rank1]: thr"
        );
        w.sinks[STDOUT].open = None; // what Eof's newline would do
    }

    #[test]
    fn a_line_held_too_long_is_broken_not_mixed() {
        let (mut w, out) = writer(2);
        data(&mut w, 0, b"slow");
        data(&mut w, 1, b"fast\n");
        w.sinks[STDOUT].waiting_since = Some(Instant::now() - HOLD_LIMIT);
        w.enforce_hold_limits();
        data(&mut w, 0, b" end\n");
        assert_eq!(text(&out), "[rank0]: slow\n[rank1]: fast\n[rank0]:  end\n");
    }

    #[test]
    fn a_broken_line_that_then_just_ends_adds_no_empty_line() {
        let (mut w, out) = writer(2);
        data(&mut w, 0, b"tok");
        data(&mut w, 1, b"x");
        w.sinks[STDOUT].waiting_since = Some(Instant::now() - HOLD_LIMIT);
        w.enforce_hold_limits();
        data(&mut w, 0, b"\n");
        assert!(
            w.sinks[STDOUT].waiting_since.is_none(),
            "nothing is waiting"
        );
        data(&mut w, 1, b"y\n");
        assert_eq!(text(&out), "[rank0]: tok\n[rank1]: xy\n");
    }

    #[test]
    fn a_note_never_lands_inside_a_waiting_partial_line() {
        let (mut w, _) = writer(3);
        let err = Shared::default();
        w.sinks[STDERR].out = Box::new(err.clone());
        w.on_data(2, STDERR, b"rank 2: error: all_to_all");
        w.on_data(0, STDERR, b"rank ");
        w.on_note("tprun: rank 1 failed");
        w.on_data(0, STDERR, b"0: error: all_to_all #11\n");
        w.on_data(2, STDERR, b" #11\n");
        assert_eq!(
            text(&err),
            "[rank2]: rank 2: error: all_to_all\ntprun: rank 1 failed\n\
             [rank0]: rank 0: error: all_to_all #11\n[rank2]:  #11\n"
        );
    }
}
