//! Log output: the filter (`RUST_LOG`, else IoT Edge's `RuntimeLogLevel`), the line format
//! (human, JSON, or IoT Edge's `<N>` syslog-severity prefix) and the writer.
//!
//! Lines are formatted where they happen and reach stderr in batches. A busy server logs a
//! line per request. Writing each one with a `write(2)` of its own costs a system call per
//! request on the thread that serves it. Here, info and debug lines go to a shared buffer that
//! a writer thread empties [`FLUSH_INTERVAL`] after its first line (or the logger itself, once
//! the buffer holds [`BATCH_BYTES`]). Warnings and errors are written at once, after whatever
//! is buffered, so the order of lines is kept and the lines an operator needs most are out even
//! if the process dies right after.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// The environment variable edgeAgent gives every module: its own log level, by .NET name.
pub const RUNTIME_LOG_LEVEL: &str = "RuntimeLogLevel";

/// How lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// tracing's default line; coloured on a terminal only.
    Human,
    /// One JSON object per line.
    Json,
    /// IoT Edge's own format, which edgeAgent's log parser reads for `GetModuleLogs` and
    /// `UploadModuleLogs`: `<6> 2025-01-31 12:00:00.123 +00:00 [INF] - target: message k=v`
    /// (syslog severity, UTC time with milliseconds, level). Never coloured.
    IotEdge,
}

/// edgeAgent's level names (`RuntimeLogLevel`; Serilog's, compared without case) as a level
/// for edge-est's own lines: verbose → trace, debug, info/information, warning, error, fatal →
/// error. Rust's `trace` and `warn` are taken too. `None`: not a level name.
pub fn runtime_level(name: &str) -> Option<Level> {
    match name.trim().to_ascii_lowercase().as_str() {
        "verbose" | "trace" => Some(Level::TRACE),
        "debug" => Some(Level::DEBUG),
        "info" | "information" => Some(Level::INFO),
        "warning" | "warn" => Some(Level::WARN),
        "error" | "fatal" => Some(Level::ERROR),
        _ => None,
    }
}

/// The filter: `RUST_LOG` if set (it wins), else `RuntimeLogLevel` (edge-est's lines at that
/// level, other crates' at most at info), else info. The second value is a warning to log
/// once the subscriber is up (an unknown `RuntimeLogLevel` or a malformed `RUST_LOG`).
pub fn filter(
    rust_log: Option<&str>,
    runtime_log_level: Option<&str>,
) -> (EnvFilter, Option<String>) {
    if let Some(directives) = rust_log.filter(|d| !d.trim().is_empty()) {
        return match EnvFilter::try_new(directives) {
            Ok(filter) => (filter, None),
            Err(e) => (
                EnvFilter::new("info"),
                Some(format!(
                    "RUST_LOG={directives:?} is not a filter ({e}); logging at info"
                )),
            ),
        };
    }
    let Some(name) = runtime_log_level.filter(|n| !n.trim().is_empty()) else {
        return (EnvFilter::new("info"), None);
    };
    match runtime_level(name) {
        Some(level) => {
            let others = if level > Level::INFO {
                Level::INFO
            } else {
                level
            };
            let own = level.as_str().to_ascii_lowercase();
            let others = others.as_str().to_ascii_lowercase();
            (EnvFilter::new(format!("{others},edge_est={own}")), None)
        }
        None => (
            EnvFilter::new("info"),
            Some(format!(
                "{RUNTIME_LOG_LEVEL}={name:?} is not one of verbose, debug, information, warning, \
                 error, fatal; logging at information (as edgeAgent does)"
            )),
        ),
    }
}

/// Syslog severity and IoT Edge's three-letter level (edgeAgent's own mapping).
fn severity(level: &Level) -> (u8, &'static str) {
    match *level {
        Level::ERROR => (3, "ERR"),
        Level::WARN => (4, "WRN"),
        Level::INFO => (6, "INF"),
        Level::DEBUG => (7, "DBG"),
        Level::TRACE => (7, "VRB"),
    }
}

/// The [`Style::IotEdge`] line.
pub struct IotEdgeFormat;

const IOT_EDGE_TIME: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3] +00:00"
);

impl<S, N> FormatEvent<S, N> for IotEdgeFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let (severity, level) = severity(meta.level());
        let now = time::OffsetDateTime::now_utc()
            .format(IOT_EDGE_TIME)
            .unwrap_or_default();
        write!(writer, "<{severity}> {now} [{level}] - {}: ", meta.target())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// A duration in milliseconds for a log field, to the microsecond (`102.519`, not
/// `102.51900499999999`).
pub fn millis(elapsed: Duration) -> f64 {
    (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Whether stderr is a terminal that takes colour (`NO_COLOR` unset).
pub fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber: [`filter`] from the environment, `style`, colour only on a
/// terminal, lines through a [`BatchedWriter`] on stderr. Keep the guard until the program
/// ends (dropping it writes what is buffered).
pub fn init(style: Style) -> io::Result<FlushGuard<io::Stderr>> {
    let (filter, warning) = filter(
        std::env::var("RUST_LOG").ok().as_deref(),
        std::env::var(RUNTIME_LOG_LEVEL).ok().as_deref(),
    );
    let (writer, guard) = BatchedWriter::new(io::stderr())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // `log` records (rustls) are bridged by the caller (`transport::tls::LogBridge`), which
    // demotes rustls' IP-address-as-SNI warning; `init()` would install a plain bridge.
    let set = match style {
        Style::Human => {
            tracing::subscriber::set_global_default(builder.with_ansi(colour_on_stderr()).finish())
        }
        Style::Json => {
            tracing::subscriber::set_global_default(builder.json().with_ansi(false).finish())
        }
        Style::IotEdge => tracing::subscriber::set_global_default(
            builder
                .with_ansi(false)
                .event_format(IotEdgeFormat)
                .finish(),
        ),
    };
    set.map_err(io::Error::other)?;
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    Ok(guard)
}

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
pub(crate) mod tests {
    use super::*;
    use std::time::Instant;

    /// An `out` the test can read while the writer holds it.
    #[derive(Clone, Default)]
    pub(crate) struct Sink(Arc<Mutex<Vec<u8>>>);

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

    /// The log lines written while `f` runs on this thread, at `level` and above (no ANSI, no
    /// time): for other modules' tests of what they log.
    pub(crate) fn captured(level: Level, f: impl FnOnce()) -> String {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(level)
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        sink.text()
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

    #[test]
    fn edge_agent_level_names() {
        for (name, level) in [
            ("Verbose", Level::TRACE),
            ("debug", Level::DEBUG),
            ("Information", Level::INFO),
            ("info", Level::INFO),
            ("Warning", Level::WARN),
            ("ERROR", Level::ERROR),
            ("Fatal", Level::ERROR),
        ] {
            assert_eq!(runtime_level(name), Some(level), "{name}");
        }
        assert_eq!(runtime_level("loud"), None);
    }

    #[test]
    fn rust_log_wins_over_the_runtime_level() {
        let (f, warning) = filter(Some("warn"), Some("Debug"));
        assert_eq!(f.to_string(), "warn");
        assert!(warning.is_none());
        let (f, _) = filter(None, Some("Debug"));
        assert_eq!(f.to_string(), "edge_est=debug,info");
        let (f, _) = filter(None, Some("Warning"));
        assert_eq!(f.to_string(), "edge_est=warn,warn");
        let (f, warning) = filter(None, Some("loud"));
        assert_eq!(f.to_string(), "info");
        assert!(warning.unwrap().contains("\"loud\""));
        assert_eq!(filter(None, None).0.to_string(), "info");
    }

    #[test]
    fn milliseconds_are_rounded_to_the_microsecond() {
        assert_eq!(millis(Duration::from_nanos(102_519_004)), 102.519);
        assert_eq!(
            format!("{:?}", millis(Duration::from_nanos(102_519_004))),
            "102.519"
        );
    }

    #[test]
    fn iot_edge_lines_carry_the_syslog_severity() {
        let sink = Sink::default();
        let (writer, guard) = BatchedWriter::with_interval(sink.clone(), NEVER).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .with_max_level(Level::TRACE)
            .event_format(IotEdgeFormat)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(code = 5, "e");
            tracing::warn!("w");
            tracing::info!(elapsed_ms = millis(Duration::from_micros(1500)), "i");
            tracing::debug!("d");
            tracing::trace!("t");
        });
        drop(guard);
        let text = sink.text();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        for (line, prefix) in lines.iter().zip(["<3>", "<4>", "<6>", "<7>", "<7>"]) {
            assert!(line.starts_with(prefix), "{line}");
        }
        // edgeAgent's LogMessageParser: `^(<(?<logLevel>\d)>)?\s*((?<timestamp>\d{4}-\d{2}-\d{2}
        // \s\d{2}:\d{2}:\d{2}.\d{3}\s[+-]\d{2}:\d{2})\s)?`
        let line = lines[0];
        let stamp = &line[4..34];
        assert!(
            time::PrimitiveDateTime::parse(
                &stamp[..23],
                time::macros::format_description!(
                    "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
                )
            )
            .is_ok(),
            "{stamp}"
        );
        assert_eq!(&stamp[23..], " +00:00");
        assert!(
            line.ends_with("[ERR] - edge_est::logging::tests: e code=5"),
            "{line}"
        );
        assert!(
            lines[2].ends_with("[INF] - edge_est::logging::tests: i elapsed_ms=1.5"),
            "{}",
            lines[2]
        );
        assert!(!text.contains('\x1b'), "no colour: {text:?}");
    }
}
