//! Log output of the shipped binary, read from its stderr through a pipe as `docker logs` and
//! edgeAgent's `GetModuleLogs` read it: no colour, edgeAgent's `<N>` severity prefix in module
//! mode, `RuntimeLogLevel` honoured (`RUST_LOG` wins), rounded figures, health probes kept
//! out of the info lines, and lines out while the server runs (the batched writer flushes).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{sh, stderr, stdout};

const PROBE_UA: &str = concat!("edge-est-health/", env!("CARGO_PKG_VERSION"));

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shipped binary, its stderr collected by a thread as it comes.
struct Server {
    child: Child,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn spawn(mut command: Command) -> Server {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("start edge-est");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Server {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    /// The development server on `port` with its setup in `dir/data`.
    fn dev(dir: &Path, port: u16, env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_edge-est"));
        command
            .args(["serve", "--data-dir", "data", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .env_remove("RuntimeLogLevel")
            .env_remove("NO_COLOR")
            .env("EDGE_EST_DEV_PASSWORD", "pw");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut server = Server::spawn(command);
        // Up when it has printed the enrollment commands.
        let mut out = BufReader::new(server.child.stdout.take().unwrap());
        let mut printed = String::new();
        while !printed.contains("openssl verify") {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("edge-est exited early: {printed}{}", server.text());
            }
            printed.push_str(&line);
        }
        server
    }

    fn text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr holds `needle` (while the process runs).
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.text();
            if text.contains(needle) {
                return text;
            }
            assert!(Instant::now() < deadline, "no {needle:?} in:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (a clean stop: what is buffered is written), then everything it wrote.
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.text()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn health(port: u16) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .args(["health", "--addr", &format!("localhost:{port}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

fn curl_cacerts(dir: &Path, port: u16, user_agent: Option<&str>) {
    let ua = user_agent.map_or(String::new(), |ua| format!("-A '{ua}'"));
    let out = sh(
        &format!("curl -sS --fail-with-body --cacert data/root.pem {ua} https://localhost:{port}/.well-known/est/cacerts -o /dev/null"),
        dir,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

fn request_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.contains("request served") || l.contains("request refused"))
        .collect()
}

#[test]
fn container_logs_carry_no_colour_rounded_figures_and_no_health_probes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::dev(dir.path(), port, &[]);
    health(port);
    health(port);
    curl_cacerts(dir.path(), port, None);
    // The request line is out while the server runs (the batched writer's thread flushes).
    server.wait_for("request served");
    // Attacker-shaped: the probe's user agent on an enrollment is logged as usual (a client
    // cannot hide its enrollments from the info lines by calling itself the probe).
    let enroll = sh(
        &format!(
            "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout k.pem -subj /CN=ua -out r.csr 2>/dev/null && \
             curl -s -o /dev/null -w '%{{http_code}}' -A '{PROBE_UA}' -u estuser:pw --cacert data/root.pem -H 'Content-Type: application/pkcs10' \
             --data-binary @r.csr https://localhost:{port}/.well-known/est/simpleenroll"
        ),
        dir.path(),
    );
    assert_eq!(stdout(&enroll), "200", "{}", stderr(&enroll));
    server.wait_for("simpleenroll");
    // Nor any other GET than cacerts.
    let csrattrs = sh(
        &format!("curl -s -o /dev/null -w '%{{http_code}}' -A '{PROBE_UA}' --cacert data/root.pem https://localhost:{port}/.well-known/est/csrattrs"),
        dir.path(),
    );
    assert!(stdout(&csrattrs).starts_with('2'), "{}", stdout(&csrattrs));
    server.wait_for("csrattrs");
    let text = server.stop();

    assert!(!text.contains('\x1b'), "ANSI codes in a pipe:\n{text:?}");
    let lines = request_lines(&text);
    assert_eq!(
        lines.len(),
        3,
        "the curl cacerts, the enrollment and csrattrs, not the probes:\n{text}"
    );
    assert!(
        lines[0].contains("path=/.well-known/est/cacerts"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("simpleenroll") && lines[1].contains("status=200"),
        "{}",
        lines[1]
    );
    for line in &lines {
        let ms = line
            .split("elapsed_ms=")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("no elapsed_ms in {line}"));
        let decimals = ms.split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 3, "{ms} has {decimals} decimals: {line}");
        ms.parse::<f64>().unwrap();
    }
    assert!(!text.contains("health probe served"), "debug is off");
    assert!(text.contains("edge-est stopped"), "{text}");
}

#[test]
fn runtime_log_level_sets_the_level_and_rust_log_wins() {
    let dir = tempfile::tempdir().unwrap();

    // edgeAgent's name for debug: the probes show, at debug.
    let port = free_port();
    let server = Server::dev(dir.path(), port, &[("RuntimeLogLevel", "Debug")]);
    health(port);
    let text = server.wait_for("health probe served");
    let probe = text
        .lines()
        .find(|l| l.contains("health probe served"))
        .unwrap();
    assert!(probe.contains("DEBUG"), "{probe}");
    drop(server);

    // Warning: no info line at all.
    let port = free_port();
    let server = Server::dev(dir.path(), port, &[("RuntimeLogLevel", "Warning")]);
    curl_cacerts(dir.path(), port, None);
    let text = server.stop();
    assert!(!text.contains(" INFO "), "{text}");
    assert!(request_lines(&text).is_empty(), "{text}");

    // RUST_LOG wins over RuntimeLogLevel.
    let port = free_port();
    let server = Server::dev(
        dir.path(),
        port,
        &[("RuntimeLogLevel", "Warning"), ("RUST_LOG", "info")],
    );
    curl_cacerts(dir.path(), port, None);
    server.wait_for("request served");
    drop(server);

    // An unknown name: information, as edgeAgent does, and a warning that says so.
    let port = free_port();
    let server = Server::dev(dir.path(), port, &[("RuntimeLogLevel", "loud")]);
    // The port opens a moment before the line that says so is written.
    server.wait_for("edge-est serving EST");
    let text = server.stop();
    assert!(
        text.contains("RuntimeLogLevel=\"loud\" is not one of"),
        "{text}"
    );
    assert!(text.contains("edge-est serving EST"), "{text}");
}

#[test]
fn json_lines_parse() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-est"));
    command
        .args([
            "--log-format",
            "json",
            "serve",
            "--data-dir",
            "data",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env("EDGE_EST_DEV_PASSWORD", "pw");
    let server = Server::spawn(command);
    server.wait_for("edge-est serving EST");
    let text = server.stop();
    for line in text.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(value["level"].is_string(), "{line}");
    }
}

/// A module's environment whose workload socket does not exist: the module starts, logs, and
/// keeps trying (no twin is needed to see its log format).
fn module(dir: &Path, env: &[(&str, &str)]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-est"));
    command
        .args(["serve", "--data-dir"])
        .arg(dir.join("module-data"))
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("RuntimeLogLevel")
        .env(
            "IOTEDGE_WORKLOADURI",
            format!("unix://{}", dir.join("absent.sock").display()),
        )
        .env("IOTEDGE_DEVICEID", "gw1")
        .env("IOTEDGE_MODULEID", "edgeest")
        .env("IOTEDGE_MODULEGENERATIONID", "gen")
        .env("IOTEDGE_IOTHUBHOSTNAME", "hub.azure-devices.net")
        .env("IOTEDGE_GATEWAYHOSTNAME", "127.0.0.1")
        .env("IOTEDGE_AUTHSCHEME", "sasToken")
        .env("EDGE_EST_MQTT_PORT", free_port().to_string());
    for (k, v) in env {
        command.env(k, v);
    }
    Server::spawn(command)
}

/// edgeAgent's `LogMessageParser`: `^(<(?<logLevel>\d)>)?\s*((?<timestamp>\d{4}-\d{2}-\d{2}
/// \s\d{2}:\d{2}:\d{2}.\d{3}\s[+-]\d{2}:\d{2})\s)?`; the level and the time of `line`.
fn edge_agent_parse(line: &str) -> Option<(u8, &str)> {
    let rest = line.strip_prefix('<')?;
    let level = rest.chars().next()?.to_digit(10)? as u8;
    let rest = rest[1..].strip_prefix('>')?.trim_start();
    let stamp = rest.get(..30)?;
    let shape = "dddd-dd-dd dd:dd:dd.ddd +dd:dd";
    let fits = stamp.chars().zip(shape.chars()).all(|(c, s)| match s {
        'd' => c.is_ascii_digit(),
        '+' => c == '+' || c == '-',
        other => c == other,
    });
    fits.then_some((level, stamp))
}

#[test]
fn module_mode_lines_carry_edge_agents_severity_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let server = module(dir.path(), &[]);
    let text = server.wait_for("workload API");
    drop(server);
    assert!(!text.contains('\x1b'), "{text:?}");
    let lines: Vec<&str> = text.lines().collect();
    let first = lines[0];
    let (level, _) = edge_agent_parse(first).unwrap_or_else(|| panic!("{first}"));
    assert_eq!(level, 6, "{first}");
    assert!(
        first.contains("[INF] - ") && first.contains("edge-est running as an IoT Edge module"),
        "{first}"
    );
    let warning = lines.iter().find(|l| l.contains("workload API")).unwrap();
    assert_eq!(edge_agent_parse(warning).map(|p| p.0), Some(4), "{warning}");
    assert!(warning.contains("[WRN] - "), "{warning}");
    for line in &lines {
        assert!(
            edge_agent_parse(line).is_some(),
            "not edgeAgent's format: {line}"
        );
    }
    // --data-dir is honoured in module mode.
    assert!(dir.path().join("module-data").is_dir());

    // RuntimeLogLevel=Warning: only <4> and worse.
    let server = module(dir.path(), &[("RuntimeLogLevel", "Warning")]);
    let text = server.wait_for("workload API");
    drop(server);
    for line in text.lines() {
        let level = edge_agent_parse(line).unwrap_or_else(|| panic!("{line}")).0;
        assert!(level <= 4, "{line}");
    }
}

#[test]
fn module_mode_refuses_listen_flags_the_twin_owns() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-est"));
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("IOTEDGE_WORKLOADURI", "unix:///nonexistent.sock")
        .env("EDGE_EST_DATA_DIR", dir.path().join("d"));
    let out = command.output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--listen and --metrics-listen do not apply to an IoT Edge module"),
        "{}",
        stderr(&out)
    );
}

/// The development server with its stderr (and stdout) on a terminal (`script` from
/// bsdutils gives it a pty) until a log line is out; what the terminal showed.
fn on_a_terminal(dir: &Path, env: &[(&str, &str)]) -> Option<String> {
    let script = common::tool("script", "bsdutils")?;
    let port = free_port();
    let typescript = dir.join(format!("typescript-{port}"));
    let mut command = Command::new(script);
    command
        .arg("-qefc")
        .arg(format!(
            "exec timeout -s TERM 60 {} serve --data-dir data --listen 127.0.0.1:{port}",
            env!("CARGO_BIN_EXE_edge-est")
        ))
        .arg(&typescript)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("RuntimeLogLevel")
        .env_remove("NO_COLOR")
        .env("EDGE_EST_DEV_PASSWORD", "pw")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start script");
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = std::fs::read_to_string(&typescript).unwrap_or_default();
        if text.contains("INFO") && text.contains("openssl verify") {
            break text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("edge-est under script exited ({status}): {text}");
        }
        assert!(
            Instant::now() < deadline,
            "no log line on the terminal: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // script passes SIGTERM on to the server (and `timeout` stops it in any case).
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    Some(text)
}

/// README: "No line carries colour codes unless stderr is a terminal (and `NO_COLOR` is
/// unset)". On a terminal the shipped binary colours its lines; with `NO_COLOR` set it does
/// not (the pipe case is `container_logs_carry_no_colour_…`).
#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let dir = tempfile::tempdir().unwrap();
    let Some(coloured) = on_a_terminal(dir.path(), &[]) else {
        return;
    };
    assert!(
        coloured.contains("\x1b["),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_a_terminal(dir.path(), &[("NO_COLOR", "1")]).unwrap();
    assert!(plain.contains("INFO"), "{plain:?}");
    assert!(!plain.contains('\x1b'), "colour with NO_COLOR: {plain:?}");
}
