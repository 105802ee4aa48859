//! The shipped binary (`edge-est serve ...`) as a child process: started, waited for until
//! its EST port accepts, killed on drop. Its stderr goes to a log file the test can read.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_edge-est");

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `edge-est` (or a wrapper that execs it, such as `unshare` or `strace`).
pub struct Running {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Running {
    /// Spawns `command` (stdout and stderr to `log`) and waits up to 60 s until `port`
    /// accepts; panics with the log if the process exits first.
    pub fn start(mut command: Command, port: u16, log: &Path) -> Running {
        let file = std::fs::File::create(log).unwrap();
        let child = command
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let mut running = Running {
            child,
            port,
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!("exited ({status}) before serving:\n{}", running.log_text());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return running;
            }
            assert!(
                Instant::now() < deadline,
                "not serving after 60 s:\n{}",
                running.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `edge-est serve --config CONFIG --listen 127.0.0.1:PORT` in `dir`.
    pub fn serve(dir: &Path, config: &str) -> Running {
        let port = free_port();
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--config", config, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(dir);
        Running::start(command, port, &dir.join("server.log"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process's resident memory (`VmRSS` of /proc/PID/status), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Sends SIGTERM and waits up to `within` for the exit; returns its code and how long.
    pub fn terminate(&mut self, within: Duration) -> (Option<i32>, Duration) {
        let sent = Instant::now();
        let kill = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), sent.elapsed());
            }
            assert!(
                sent.elapsed() < within,
                "did not exit within {within:?} of SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
