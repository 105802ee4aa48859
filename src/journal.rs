//! The audit journal: one JSON line per issued certificate, on disk before the answer leaves.
//!
//! Writes go to one writer thread that commits in groups: it takes every entry waiting, writes
//! them, calls `fdatasync` once, and only then releases the requests. Many concurrent
//! enrollments thus share one disk flush, and nothing blocks the async runtime. While other
//! issuances are under way ([`Journal::expect`]) or other connections are still on their way
//! to their first request ([`Journal::opening`]: a device's fresh connection spends most of an
//! enrollment in its TLS handshake), the writer waits up to [`GATHER_WINDOW`] for more entries
//! before flushing (PostgreSQL's `commit_delay`): under load, fewer flushes carry more entries;
//! a lone enrollment never waits. While it waits, entries are queued without waking it: it is
//! woken when the window ends or when nothing more is on its way (the last announced entry is
//! queued, or the last opening connection starts its request), once per flush rather than once
//! per entry. On shutdown, [`Journal::close`] lets the writer finish every entry queued,
//! `fsync` and stop.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::Thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// What the journal keeps of one issued certificate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JournalEntry {
    /// When it was issued (RFC 3339).
    pub time: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub subject: String,
    pub sans: Vec<String>,
    /// The EST label, `null` for the unlabeled path.
    pub label: Option<String>,
    pub operation: String,
    /// Who asked (the authenticated identity).
    pub identity: String,
    pub profile: String,
    pub not_before: String,
    pub not_after: String,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub sha256: String,
    /// The certificate, base64 DER.
    pub certificate: String,
    /// Who signed: `local` (this instance's issuer), or `upstream NAME` when forwarded.
    #[serde(default)]
    pub issued_by: String,
    /// The client authenticated with a certificate that had expired, accepted within its
    /// label's grace window to renew the same subject (`grace_expired_secs`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grace_renewal: bool,
    /// SHA-256 (lowercase hex) of the CA certificate that signed it, for a local issuance: an
    /// enrolled issuer's replaced CA stays trusted until the last certificate it signed
    /// expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ca: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open the journal {0}: {1}")]
    Open(PathBuf, String),
    #[error("the journal could not be written: {0}")]
    Write(String),
}

type Done = oneshot::Sender<Result<(), String>>;

/// What the writer thread is asked to do.
enum Message {
    /// Append a line (newline included) and flush it.
    Write(Vec<u8>, Done),
    /// Finish what was queued before, `fsync`, and stop.
    Close(Done),
}

/// Handle to the journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    path: PathBuf,
    queue: mpsc::Sender<Message>,
    on_way: OnWay,
    /// Disk flushes so far.
    flushes: Arc<AtomicU64>,
    /// The writer's wake-ups from a gathering wait so far.
    wakes: Arc<AtomicU64>,
}

/// What is on its way to the journal, shared with the writer, and how to end its wait.
#[derive(Clone)]
struct OnWay {
    /// Issuances under way whose entries are not queued yet.
    expected: Arc<AtomicUsize>,
    /// Connections admitted that have not started their first request yet.
    opening: Arc<AtomicUsize>,
    /// Set while the writer waits for more entries.
    gathering: Arc<AtomicBool>,
    /// The writer thread, parked while it gathers.
    writer: Thread,
}

impl OnWay {
    /// Whether anything is still on its way.
    fn coming(&self) -> bool {
        self.expected.load(Ordering::SeqCst) > 0 || self.opening.load(Ordering::SeqCst) > 0
    }

    /// Ends a waiting flush's wait once nothing more is on its way; called after a count went
    /// down or an entry was queued. The writer announces its wait before it reads the counts
    /// (both `SeqCst`), so either it sees them at zero or this sees it waiting. A writer that
    /// is not waiting is left alone: a wake-up for nothing costs a context switch.
    fn arrived(&self) {
        if self.gathering.load(Ordering::SeqCst) && !self.coming() {
            self.writer.unpark();
        }
    }
}

/// An issuance under way: its entry is on its way to the journal. Hand it to
/// [`Journal::record`]; dropping it (the request failed) says no entry will come.
pub struct Expected {
    on_way: OnWay,
    recorded: bool,
}

/// A connection on its way to its first request (see [`Journal::opening`]); dropped when the
/// request starts, or when the connection ends without one.
pub struct Opening {
    on_way: OnWay,
}

impl Drop for Opening {
    fn drop(&mut self) {
        self.on_way.opening.fetch_sub(1, Ordering::SeqCst);
        self.on_way.arrived();
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.on_way.expected.fetch_sub(1, Ordering::SeqCst);
        // A recorded entry ends the wait once it is queued (`Journal::record`).
        if !self.recorded {
            self.on_way.arrived();
        }
    }
}

/// Entries committed per flush at most, to bound the latency of the first in a burst.
const MAX_GROUP: usize = 256;

/// How long a flush may wait, from its first entry, for the entries of issuances under way
/// and of connections still in their handshake. A flush costs several disk round trips (on
/// ext4: the data, the inode, the cache flush, each a sleep and a wake-up of the writer) and,
/// measured on a 2-vCPU VM, 150–250 µs of CPU; under load a fresh connection's handshake takes
/// milliseconds of wall time. 2 ms (0.7 ms before) cut flushes at 16 devices on fresh
/// connections by a quarter (BENCHMARKS.md); a lone enrollment still never waits.
pub const GATHER_WINDOW: Duration = Duration::from_millis(2);

impl Journal {
    /// Opens (creating if needed) the journal and starts its writer thread.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        Self::open_with_gather_window(path, GATHER_WINDOW)
    }

    /// [`Journal::open`] with another gathering window than [`GATHER_WINDOW`].
    pub fn open_with_gather_window(path: &Path, window: Duration) -> Result<Journal, JournalError> {
        let fail = |e: std::io::Error| JournalError::Open(path.to_owned(), e.to_string());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(fail)?;
        // A device or pipe can neither be read back at start (`/dev/full` reads forever) nor
        // made durable with fdatasync: the journal is a regular file or nothing.
        let kind = file.metadata().map_err(fail)?.file_type();
        if !kind.is_file() {
            return Err(JournalError::Open(
                path.to_owned(),
                "not a regular file (the journal must be a file on a disk)".into(),
            ));
        }
        terminate_torn_line(&mut file).map_err(fail)?;
        let (queue, receiver) = mpsc::channel::<Message>();
        let expected = Arc::new(AtomicUsize::new(0));
        let opening = Arc::new(AtomicUsize::new(0));
        let waiting = Arc::new(AtomicBool::new(false));
        let flushes = Arc::new(AtomicU64::new(0));
        let wakes = Arc::new(AtomicU64::new(0));
        let gathering = Gathering {
            expected: expected.clone(),
            opening: opening.clone(),
            waiting: waiting.clone(),
            window,
            flushes: flushes.clone(),
            wakes: wakes.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("edge-est-journal".into())
            .spawn(move || writer(file, receiver, &gathering))
            .map_err(fail)?;
        Ok(Journal {
            path: path.to_owned(),
            queue,
            on_way: OnWay {
                expected,
                opening,
                gathering: waiting,
                writer: thread.thread().clone(),
            },
            flushes,
            wakes,
        })
    }

    /// Announces an issuance whose entry will follow soon (see the module docs).
    pub fn expect(&self) -> Expected {
        self.on_way.expected.fetch_add(1, Ordering::SeqCst);
        Expected {
            on_way: self.on_way.clone(),
            recorded: false,
        }
    }

    /// Announces a connection that has not sent its first request yet: a flush starting
    /// meanwhile may wait for the entry it will likely bring (see the module docs). Drop it
    /// when the request starts (its own announcement, [`Journal::expect`], takes over if it
    /// signs) or when the connection ends.
    pub fn opening(&self) -> Opening {
        self.on_way.opening.fetch_add(1, Ordering::SeqCst);
        Opening {
            on_way: self.on_way.clone(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How often the writer has woken from waiting for more entries: once a flush (the
    /// window's end, or the last entry on its way), never for each entry queued meanwhile.
    pub fn writer_wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// How many disk flushes the writer has made.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Appends an entry and returns once it is on disk. `expected`, if the issuance was
    /// announced, is given back here, just before the entry is queued.
    pub async fn record(
        &self,
        entry: &JournalEntry,
        expected: Option<Expected>,
    ) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(entry).map_err(|e| JournalError::Write(e.to_string()))?;
        line.push(b'\n');
        if let Some(mut expected) = expected {
            expected.recorded = true;
        }
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Message::Write(line, done))
            .map_err(|_| JournalError::Write("the journal writer has stopped".into()))?;
        self.on_way.arrived();
        wait.await
            .map_err(|_| JournalError::Write("the journal writer has stopped".into()))?
            .map_err(JournalError::Write)
    }

    /// Stops the journal: every entry queued before is written and flushed, the file is
    /// `fsync`ed, and the writer thread ends. Later `record`s (from any clone) fail, so no
    /// certificate is handed out unrecorded. Closing twice is harmless.
    pub async fn close(&self) -> Result<(), JournalError> {
        let (done, wait) = oneshot::channel();
        if self.queue.send(Message::Close(done)).is_err() {
            return Ok(()); // already stopped
        }
        // A writer gathering entries is parked, not reading its queue.
        self.on_way.writer.unpark();
        match wait.await {
            Ok(result) => result.map_err(JournalError::Write),
            Err(_) => Ok(()), // stopped by an earlier close
        }
    }

    /// Reads every entry of a journal file (for tests and tools). Torn lines are skipped.
    pub fn read_all(path: &Path) -> std::io::Result<Vec<JournalEntry>> {
        let mut entries = Vec::new();
        Self::scan(path, |entry| entries.push(entry))?;
        Ok(entries)
    }

    /// Hands every entry of a journal file to `each`, line by line: a journal of years of
    /// issuances is never held whole in memory. Torn lines are skipped.
    pub fn scan(path: &Path, mut each: impl FnMut(JournalEntry)) -> std::io::Result<()> {
        use std::io::BufRead;
        for line in std::io::BufReader::new(File::open(path)?).split(b'\n') {
            if let Ok(entry) = serde_json::from_slice(&line?) {
                each(entry);
            }
        }
        Ok(())
    }
}

/// A crash in the middle of a write can leave a last line without its newline; end it so
/// the next entry starts on a line of its own.
fn terminate_torn_line(file: &mut File) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
        file.sync_data()?;
    }
    Ok(())
}

/// What the writer needs to gather entries into one flush.
struct Gathering {
    expected: Arc<AtomicUsize>,
    opening: Arc<AtomicUsize>,
    /// Set while the writer waits for more entries.
    waiting: Arc<AtomicBool>,
    window: Duration,
    flushes: Arc<AtomicU64>,
    wakes: Arc<AtomicU64>,
}

fn writer(mut file: File, receiver: mpsc::Receiver<Message>, gathering: &Gathering) {
    // The length of what is on disk and answered for: a group that fails is cut off again.
    let mut committed = file.metadata().map(|m| m.len()).unwrap_or(0);
    while let Ok(first) = receiver.recv() {
        let first_at = Instant::now();
        let mut group = Vec::new();
        let mut close = None;
        let mut next = Some(first);
        let mut last_look = false;
        'gather: loop {
            // Take everything queued.
            while let Some(message) = next.take().or_else(|| receiver.try_recv().ok()) {
                match message {
                    Message::Write(line, done) => group.push((line, done)),
                    Message::Close(done) => {
                        close = Some(done);
                        break 'gather;
                    }
                }
                if group.len() >= MAX_GROUP {
                    break 'gather;
                }
            }
            if last_look {
                break;
            }
            // Announced before the counts are read, so that the last entry or connection
            // arriving meanwhile either sees it (and unparks this thread) or is seen here.
            gathering.waiting.store(true, Ordering::SeqCst);
            let left = gathering.window.saturating_sub(first_at.elapsed());
            let coming = gathering.expected.load(Ordering::SeqCst) > 0
                || gathering.opening.load(Ordering::SeqCst) > 0;
            if left.is_zero() || !coming {
                // One more look at the queue (an entry queued just now), then flush.
                last_look = true;
            } else {
                // Entries queued meanwhile do not wake this thread (they are not received
                // here): the window's end does, or the last of what was on its way.
                std::thread::park_timeout(left);
                gathering.wakes.fetch_add(1, Ordering::Relaxed);
            }
            gathering.waiting.store(false, Ordering::SeqCst);
        }
        if !group.is_empty() {
            let mut buffer = Vec::with_capacity(group.iter().map(|(l, _)| l.len()).sum());
            for (line, _) in &group {
                buffer.extend_from_slice(line);
            }
            let result = file
                .write_all(&buffer)
                .and_then(|()| file.sync_data())
                .map_err(|e| e.to_string());
            match result {
                Ok(()) => committed += buffer.len() as u64,
                // A full device takes part of a write: nothing half-written stays behind (the
                // next group would continue the torn line), nor an entry whose request fails.
                Err(_) => {
                    let _ = file.set_len(committed);
                }
            }
            gathering.flushes.fetch_add(1, Ordering::Relaxed);
            for (_, done) in group {
                let _ = done.send(result.clone());
            }
        }
        if let Some(done) = close {
            let _ = done.send(file.sync_all().map_err(|e| e.to_string()));
            // Dropping the receiver fails every later `record` and every message queued after
            // the close: nothing is accepted that will not be written.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(serial: &str) -> JournalEntry {
        JournalEntry {
            time: "2026-01-01T00:00:00Z".into(),
            serial: serial.into(),
            subject: "CN=x".into(),
            sans: vec![],
            label: None,
            operation: "simpleenroll".into(),
            identity: "user u".into(),
            profile: "identity".into(),
            not_before: "a".into(),
            not_after: "b".into(),
            sha256: "00".into(),
            certificate: "MA==".into(),
            issued_by: "local".into(),
            grace_renewal: false,
            issuer_ca: None,
        }
    }

    /// Records entries with serials 00.. from `n` tasks at once; all must succeed.
    async fn record_concurrently(journal: &Journal, n: usize) {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let j = journal.clone();
                tokio::spawn(async move { j.record(&entry(&format!("{i:02x}")), None).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn concurrent_records_all_land_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/journal.jsonl");
        let journal = Journal::open(&path).unwrap();
        record_concurrently(&journal, 50).await;
        drop(journal);
        let mut serials: Vec<_> = Journal::read_all(&path)
            .unwrap()
            .into_iter()
            .map(|e| e.serial)
            .collect();
        serials.sort();
        assert_eq!(
            serials,
            (0..50).map(|i| format!("{i:02x}")).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn close_flushes_what_was_queued_then_refuses_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let journal = Journal::open(&path).unwrap();
        record_concurrently(&journal, 20).await;
        let mut grace = entry("ff");
        grace.grace_renewal = true;
        let last = {
            let j = journal.clone();
            tokio::spawn(async move { j.record(&grace, None).await })
        };
        last.await.unwrap().unwrap();
        journal.close().await.unwrap();
        journal.close().await.unwrap();
        assert!(journal.record(&entry("00"), None).await.is_err());
        let entries = Journal::read_all(&path).unwrap();
        assert_eq!(entries.len(), 21);
        assert!(entries[20].grace_renewal);
        assert!(entries[..20].iter().all(|e| !e.grace_renewal));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.matches("grace_renewal").count(),
            1,
            "only written when true"
        );
    }

    /// Long enough that a test never sees the window run out.
    const LONG: Duration = Duration::from_secs(10);

    /// Announces two issuances, records the first in a task and checks that it waits; returns
    /// that task and the second announcement.
    async fn first_of_two_announced(
        journal: &Journal,
    ) -> (tokio::task::JoinHandle<Result<(), JournalError>>, Expected) {
        let (a, b) = (journal.expect(), journal.expect());
        let first = {
            let j = journal.clone();
            tokio::spawn(async move { j.record(&entry("0a"), Some(a)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished(), "the first entry waits for the second");
        (first, b)
    }

    #[tokio::test]
    async fn a_flush_waits_for_announced_entries_and_lone_ones_do_not_wait() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open_with_gather_window(&dir.path().join("j.jsonl"), LONG).unwrap();
        // Two issuances under way: the first entry waits for the second, one flush for both.
        let (first, b) = first_of_two_announced(&journal).await;
        journal.record(&entry("0b"), Some(b)).await.unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(journal.flushes(), 1);
        // Control: nothing announced, each entry is flushed at once, on its own.
        let started = Instant::now();
        journal.record(&entry("0c"), None).await.unwrap();
        journal.record(&entry("0d"), None).await.unwrap();
        assert_eq!(journal.flushes(), 3);
        assert!(started.elapsed() < LONG);
    }

    #[tokio::test]
    async fn an_entry_queued_while_another_is_on_its_way_joins_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open_with_gather_window(&dir.path().join("j.jsonl"), LONG).unwrap();
        let started = Instant::now();
        let third = journal.expect();
        let (first, b) = first_of_two_announced(&journal).await;
        // The second entry is queued while the third is still on its way: both wait.
        let second = {
            let j = journal.clone();
            tokio::spawn(async move { j.record(&entry("0b"), Some(b)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished() && !second.is_finished());
        assert_eq!(
            journal.writer_wakes(),
            0,
            "an entry queued meanwhile does not wake it"
        );
        // The last one on its way arrives: one flush for all three, at once.
        journal.record(&entry("0c"), Some(third)).await.unwrap();
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(journal.flushes(), 1);
        assert_eq!(journal.writer_wakes(), 1, "woken once, by the last");
        assert!(started.elapsed() < LONG / 2, "released at once");
    }

    #[tokio::test]
    async fn a_withdrawn_announcement_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open_with_gather_window(&dir.path().join("j.jsonl"), LONG).unwrap();
        let started = Instant::now();
        let (first, b) = first_of_two_announced(&journal).await;
        drop(b); // that request failed: no entry will come
        first.await.unwrap().unwrap();
        assert!(
            started.elapsed() < LONG / 2,
            "released at once, not by the window"
        );
        assert_eq!(journal.flushes(), 1);
        assert_eq!(Journal::read_all(&journal.path).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_flush_waits_for_an_opening_connection_until_its_request_starts() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open_with_gather_window(&dir.path().join("j.jsonl"), LONG).unwrap();
        let started = Instant::now();
        // A connection on its way to its first request: the entry waits for it.
        let opening = journal.opening();
        let first = {
            let j = journal.clone();
            tokio::spawn(async move { j.record(&entry("0a"), None).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !first.is_finished(),
            "the entry waits for the opening connection"
        );
        // Another entry queued meanwhile joins the wait without waking the writer.
        let second = {
            let j = journal.clone();
            tokio::spawn(async move { j.record(&entry("0c"), None).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished() && !second.is_finished());
        assert_eq!(
            journal.writer_wakes(),
            0,
            "an entry queued meanwhile does not wake it"
        );
        // Its request starts (and brings no entry): the flush goes at once, not at the window.
        drop(opening);
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert!(started.elapsed() < LONG / 2, "released at once");
        assert_eq!(journal.flushes(), 1);
        assert_eq!(journal.writer_wakes(), 1, "woken once, by the connection");
        // Control: an opening connection dropped while nothing is being gathered leaves no
        // message behind that would make a later flush wait or go early.
        drop(journal.opening());
        journal.record(&entry("0b"), None).await.unwrap();
        assert_eq!(journal.flushes(), 2);
        assert!(started.elapsed() < LONG / 2);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_terminated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        std::fs::write(&path, b"{\"torn\":").unwrap();
        let journal = Journal::open(&path).unwrap();
        journal.record(&entry("01"), None).await.unwrap();
        let entries = Journal::read_all(&path).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].serial, "01");
    }
}
