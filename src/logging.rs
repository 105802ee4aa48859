//! Log output: lines are formatted where they happen and reach stderr in batches.
//!
//! A busy server logs a line per request. Writing each one with a `write(2)` of its own costs a
//! system call per request on the thread that serves it. Here, info and debug lines go to a
//! shared buffer that a writer thread empties [`FLUSH_INTERVAL`] after its first line (or the
//! logger itself, once the buffer holds [`BATCH_BYTES`]). Warnings and errors are written at
//! once, after whatever is buffered, so the order of lines is kept and the lines an operator
//! needs most are out even if the process dies right after.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long an info line may wait in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// A buffer this full is written by the logger that filled it.
pub const BATCH_BYTES: usize = 32 * 1024;

/// A [`MakeWriter`] for `tracing_subscriber::fmt` that batches lines (see the module docs).
pub struct BatchedWriter<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
}

struct Shared<W> {
    buffer: Mutex<Vec<u8>>,
    /// Signalled when the buffer gets its first line.
    filled: Condvar,
    /// Taken before the buffer is emptied and held while writing: batches leave in the order
    /// they were taken.
    out: Mutex<W>,
}

/// Flushes what is buffered when dropped; keep it alive for as long as the program logs.
pub struct FlushGuard<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves bytes, not broken invariants.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<W: Write + Send + 'static> BatchedWriter<W> {
    /// Starts the writer thread for `out`, flushing [`FLUSH_INTERVAL`] after a first line.
    pub fn new(out: W) -> io::Result<(BatchedWriter<W>, FlushGuard<W>)> {
        Self::with_interval(out, FLUSH_INTERVAL)
    }

    pub fn with_interval(
        out: W,
        interval: Duration,
    ) -> io::Result<(BatchedWriter<W>, FlushGuard<W>)> {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Vec::with_capacity(BATCH_BYTES)),
            filled: Condvar::new(),
            out: Mutex::new(out),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("edge-est-log".into())
            .spawn(move || loop {
                let Some(shared) = weak.upgrade() else { return };
                {
                    let buffer = lock(&shared.buffer);
                    let buffer = shared
                        .filled
                        .wait_while(buffer, |b| b.is_empty())
                        .unwrap_or_else(PoisonError::into_inner);
                    drop(buffer);
                }
                drop(shared);
                std::thread::sleep(interval);
                let Some(shared) = weak.upgrade() else { return };
                shared.flush(None);
            })?;
        Ok((
            BatchedWriter {
                shared: shared.clone(),
            },
            FlushGuard { shared },
        ))
    }
}

impl<W: Write> Shared<W> {
    /// Writes what is buffered, then `line` if given.
    fn flush(&self, line: Option<&[u8]>) {
        let mut out = lock(&self.out);
        let batch = std::mem::replace(&mut *lock(&self.buffer), Vec::with_capacity(BATCH_BYTES));
        // Nowhere to report a failing stderr: the lines are dropped, the server goes on.
        let _ = out.write_all(&batch);
        if let Some(line) = line {
            let _ = out.write_all(line);
        }
        let _ = out.flush();
    }

    fn append(&self, line: &[u8]) {
        let mut buffer = lock(&self.buffer);
        let was_empty = buffer.is_empty();
        buffer.extend_from_slice(line);
        let full = buffer.len() >= BATCH_BYTES;
        drop(buffer);
        if full {
            self.flush(None);
        } else if was_empty {
            self.filled.notify_one();
        }
    }
}

impl<W: Write + Send + 'static> Drop for FlushGuard<W> {
    fn drop(&mut self) {
        self.shared.flush(None);
    }
}

/// One event's writer: `tracing_subscriber::fmt` writes each formatted line with one call.
pub struct EventWriter<'a, W: Write + Send + 'static> {
    shared: &'a Shared<W>,
    urgent: bool,
}

impl<W: Write + Send + 'static> Write for EventWriter<'_, W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if self.urgent {
            self.shared.flush(Some(line));
        } else {
            self.shared.append(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + Send + 'static> MakeWriter<'a> for BatchedWriter<W> {
    type Writer = EventWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter {
            shared: &self.shared,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        EventWriter {
            shared: &self.shared,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An `out` the test can read while the writer holds it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).clone()).unwrap()
        }
    }

    fn write(writer: &BatchedWriter<Sink>, urgent: bool, line: &str) {
        let mut event = EventWriter {
            shared: &writer.shared,
            urgent,
        };
        event.write_all(line.as_bytes()).unwrap();
    }

    /// Long enough that the writer thread never flushes during a test that says "not yet".
    const NEVER: Duration = Duration::from_secs(3600);

    #[test]
    fn info_lines_wait_warnings_go_out_at_once_in_order() {
        let sink = Sink::default();
        let (writer, _guard) = BatchedWriter::with_interval(sink.clone(), NEVER).unwrap();
        write(&writer, false, "info 1\n");
        write(&writer, false, "info 2\n");
        assert_eq!(sink.text(), "", "info lines are batched");
        write(&writer, true, "warn 3\n");
        assert_eq!(sink.text(), "info 1\ninfo 2\nwarn 3\n");
    }

    #[test]
    fn the_writer_thread_flushes_after_the_interval() {
        let sink = Sink::default();
        let (writer, _guard) =
            BatchedWriter::with_interval(sink.clone(), Duration::from_millis(10)).unwrap();
        write(&writer, false, "info 1\n");
        write(&writer, false, "info 2\n");
        write(&writer, true, "warn 3\n");
        write(&writer, false, "info 4\n");
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.text().len() < "info 1\ninfo 2\nwarn 3\ninfo 4\n".len() {
            assert!(Instant::now() < deadline, "the writer thread never flushed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.text(), "info 1\ninfo 2\nwarn 3\ninfo 4\n");
    }

    #[test]
    fn a_full_buffer_is_written_by_the_logger_and_the_guard_flushes_the_rest() {
        let sink = Sink::default();
        let (writer, guard) = BatchedWriter::with_interval(sink.clone(), NEVER).unwrap();
        let line = format!("{}\n", "x".repeat(1023));
        for _ in 0..BATCH_BYTES / line.len() {
            write(&writer, false, &line);
        }
        assert_eq!(sink.text().len(), BATCH_BYTES, "written when full");
        write(&writer, false, "last\n");
        drop(guard);
        assert!(sink.text().ends_with("x\nlast\n"));
        assert_eq!(sink.text().len(), BATCH_BYTES + 5);
    }

    #[test]
    fn through_tracing_warnings_flush_the_info_lines_before_them() {
        let sink = Sink::default();
        let (writer, _guard) = BatchedWriter::with_interval(sink.clone(), NEVER).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("first");
            assert_eq!(sink.text(), "");
            tracing::warn!("second");
        });
        let text = sink.text();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("INFO") && lines[0].ends_with("first"));
        assert!(lines[1].contains("WARN") && lines[1].ends_with("second"));
    }
}
