//! An IP address as TLS SNI (libest sends one when pointed at an address; RFC 6066 forbids
//! it, rustls ignores it and logs) is normal client behaviour: the real binary logs it at
//! debug, never as a warning per connection. `openssl s_client -servername 127.0.0.1` sends
//! it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `edge-est serve` (development setup) with `RUST_LOG=level`, makes three TLS
/// connections with an IP address as SNI, stops it and returns its log.
fn log_of_ip_sni_connections(level: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .args([
            "serve",
            "--data-dir",
            "data",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .current_dir(dir.path())
        .env("EDGE_EST_DEV_PASSWORD", "sni-test-password")
        .env("RUST_LOG", level)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start edge-est");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut reader = BufReader::new(stdout);
    let mut printed = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !printed.contains("openssl verify") {
        assert!(Instant::now() < deadline, "not serving: {printed}");
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "exited: {printed}"
        );
        printed.push_str(&line);
    }
    for _ in 0..3 {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "127.0.0.1",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("openssl s_client");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE")
                || String::from_utf8_lossy(&out.stdout).contains("Server certificate"),
            "handshake: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(running);
    std::fs::read_to_string(dir.path().join("server.log")).unwrap()
}

#[test]
fn an_ip_address_as_sni_is_logged_at_debug_not_as_a_warning() {
    let info = log_of_ip_sni_connections("info");
    assert!(
        !info.contains("SNI"),
        "nothing about SNI at info level:\n{info}"
    );
    assert!(!info.contains("WARN"), "{info}");
    // The positive control: the event happens, and at debug it is there, as DEBUG.
    let debug = log_of_ip_sni_connections("debug");
    let lines: Vec<&str> = debug
        .lines()
        .filter(|l| l.contains("IP address presented as hostname"))
        .collect();
    assert_eq!(lines.len(), 3, "{debug}");
    assert!(lines.iter().all(|l| l.contains("DEBUG")), "{lines:?}");
}
