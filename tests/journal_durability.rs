//! The journal's promise, on the shipped binary: no certificate leaves before its entry is on
//! disk, and a journal that cannot be written hands out nothing.
//!
//! - A full device: the journal on a tmpfs of 64 KiB mounted in the server's own mount
//!   namespace (`unshare -m`), filled by the test through `/proc/PID/root` so that the next
//!   entry is torn by the device: 500, no certificate, the file cut back to its last whole
//!   entry; space freed, the next enrollment succeeds and its entry is whole.
//! - A read-only device: the server refuses to start and says why.
//! - A device file (`/dev/full`, which reads as endless zeros) as the journal: refused at
//!   start with the reason, rather than read forever.
//! - `fdatasync` ordering: `strace -f` on the binary shows the journal's `fdatasync` return
//!   before the answer is written to the client's socket.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::bin::{free_port, Running, BIN};
use common::client::{basic, certs_from_answer, iot_edge_body, Answer, EstClient};
use common::{csr, standard_config_toml, Pki, PASSWORD, USER};
use edge_est::journal::Journal;

async fn enroll(addr: std::net::SocketAddr, root: &str, cn: &str) -> Answer {
    let client = EstClient::new(addr, root, None);
    client
        .request(
            "POST",
            "simpleenroll",
            &[
                ("content-type", "application/pkcs10".to_owned()),
                basic(USER, PASSWORD),
            ],
            iot_edge_body(&csr(cn)),
        )
        .await
}

/// The PKI and the standard configuration with its journal at `journal`, as a file.
fn setup(journal: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let text = standard_config_toml(&pki).replace(
        "journal = \"journal.jsonl\"",
        &format!("journal = \"{journal}\""),
    );
    assert!(text.contains(journal));
    std::fs::write(dir.path().join("edge-est.toml"), text).unwrap();
    let root = std::fs::read_to_string(dir.path().join("root.pem")).unwrap();
    (dir, root)
}

/// Whether this machine lets us make a mount namespace; `None` (skip) only with the opt-out.
fn mount_namespaces() -> Option<()> {
    common::tool("unshare", "util-linux")?;
    let ok = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(())
    } else {
        common::missing("mount namespaces are not permitted here (unshare -m needs CAP_SYS_ADMIN)")
    }
}

/// `edge-est serve` in a mount namespace of its own where `device` (a directory of `dir`) is
/// a tmpfs mounted with `options`.
fn serve_on_tmpfs(dir: &Path, device: &str, options: &str) -> Command {
    std::fs::create_dir_all(dir.join(device)).unwrap();
    let mut command = Command::new("unshare");
    command
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o "$1" edge-est-journal "$2" && exec "$3" serve --config edge-est.toml --listen "$4""#)
        .args(["sh", options, device, BIN])
        .current_dir(dir);
    command
}

fn whole_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the journal ends in a torn line"
    );
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for line in &lines {
        serde_json::from_str::<edge_est::journal::JournalEntry>(line)
            .unwrap_or_else(|e| panic!("not a whole entry ({e}): {line}"));
    }
    lines
}

#[tokio::test]
async fn a_full_device_hands_out_nothing_and_leaves_nothing_half_written() {
    if mount_namespaces().is_none() {
        return;
    }
    let (dir, root) = setup("device/journal.jsonl");
    let port = free_port();
    let mut command = serve_on_tmpfs(dir.path(), "device", "size=64k,mode=0700");
    command.arg(format!("127.0.0.1:{port}"));
    let server = Running::start(command, port, &dir.path().join("server.log"));
    // The device as the server sees it (the test's own view has the empty mount point).
    let device = PathBuf::from(format!(
        "/proc/{}/root{}",
        server.pid(),
        dir.path().join("device").display()
    ));
    let journal = device.join("journal.jsonl");
    assert!(
        !dir.path().join("device/journal.jsonl").exists(),
        "the tmpfs is the server's alone"
    );

    // Positive control, and entries until the next one cannot fit in the last page the
    // journal has: that one will be torn by the device.
    let mut issued = 0;
    loop {
        let answer = enroll(server.addr(), &root, &format!("before-{issued}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        issued += 1;
        let lines = whole_lines(&journal);
        assert_eq!(lines.len(), issued);
        let len = std::fs::metadata(&journal).unwrap().len() as usize;
        let room = 4096 - len % 4096;
        if room < lines[0].len() / 2 {
            break;
        }
        assert!(issued < 20, "journal entries of unexpected size");
    }
    let committed = std::fs::read(&journal).unwrap();

    // Fill the device.
    let filler = device.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        let full = loop {
            if let Err(e) = file.write_all(&block) {
                break e;
            }
        };
        assert_eq!(full.raw_os_error(), Some(28), "ENOSPC expected, got {full}");
    }

    // Two enrollments while full: 500, no certificate, the journal exactly as before.
    for attempt in 0..2 {
        let answer = enroll(server.addr(), &root, &format!("full-{attempt}")).await;
        assert_eq!(answer.status, 500, "{}", answer.text());
        assert!(answer.text().contains("journal"), "{}", answer.text());
        assert!(
            !answer.text().contains("CERTIFICATE")
                && answer
                    .header("content-type")
                    .is_some_and(|t| t.starts_with("text/plain")),
            "{:?}: {}",
            answer.header("content-type"),
            answer.text()
        );
        assert_eq!(
            std::fs::read(&journal).unwrap(),
            committed,
            "the journal holds exactly what was handed out, nothing half-written"
        );
    }

    // Space again: the server recovers, and the entry after the failure is whole.
    std::fs::remove_file(&filler).unwrap();
    let answer = enroll(server.addr(), &root, "after").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let leaf = certs_from_answer(&answer.body).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let lines = whole_lines(&journal);
    assert_eq!(lines.len(), issued + 1);
    let entries = Journal::read_all(&journal).unwrap();
    assert_eq!(
        entries.last().unwrap().serial,
        edge_est::auth::client_cert::hex(cert.raw_serial())
    );
    assert_eq!(entries.last().unwrap().subject, "CN=after");
    drop(server);
}

#[test]
fn a_read_only_device_is_refused_at_start_with_the_reason() {
    if mount_namespaces().is_none() {
        return;
    }
    let (dir, _) = setup("device/journal.jsonl");
    let port = free_port();
    let mut command = serve_on_tmpfs(dir.path(), "device", "ro,size=64k");
    command.arg(format!("127.0.0.1:{port}"));
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("cannot open the journal") && text.contains("Read-only file system"),
        "{text}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test]
async fn a_device_file_as_the_journal_is_refused_at_start() {
    let (dir, _) = setup("/dev/full");
    let port = free_port();
    let out = Command::new(BIN)
        .args(["serve", "--config", "edge-est.toml", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("cannot open the journal") && text.contains("not a regular file"),
        "{text}"
    );
    // Control: the same configuration with its journal in a file serves.
    let (dir, root) = setup("journal.jsonl");
    let server = Running::serve(dir.path(), "edge-est.toml");
    let answer = enroll(server.addr(), &root, "device1").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

/// One line of `strace -f -yy` output: (pid, syscall, first argument, return value), or
/// for a `<... NAME resumed>` line, the syscall's name and its return.
#[derive(Debug)]
struct Call {
    pid: String,
    name: String,
    fd: String,
    resumed: bool,
    unfinished: bool,
    ret: Option<i64>,
}

fn parse_strace(text: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    for line in text.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        // `) = 0`, or `)          = 0` on a resumed line (strace pads it).
        let ret = line
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().strip_prefix('='))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|r| r.parse().ok());
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let name = resumed.split_whitespace().next().unwrap_or("").to_owned();
            calls.push(Call {
                pid: pid.to_owned(),
                name,
                fd: String::new(),
                resumed: true,
                unfinished: false,
                ret,
            });
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        let fd = args.split(", ").next().unwrap_or("").to_owned();
        calls.push(Call {
            pid: pid.to_owned(),
            name: name.to_owned(),
            fd,
            resumed: false,
            unfinished: rest.contains("<unfinished ...>"),
            ret,
        });
    }
    calls
}

#[tokio::test]
async fn strace_shows_the_journal_fdatasync_before_the_answer_is_written() {
    if common::tool("strace", "strace").is_none() {
        return;
    }
    let (dir, root) = setup("journal.jsonl");
    let port = free_port();
    let trace = dir.path().join("trace.txt");
    let mut command = Command::new("strace");
    command
        .args(["-f", "-yy", "-qq", "-s", "0", "-o"])
        .arg(&trace)
        .args([
            "-e",
            "trace=read,readv,recvfrom,recvmsg,write,writev,sendto,sendmsg,fdatasync,fsync",
            BIN,
            "serve",
            "--config",
            "edge-est.toml",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(dir.path());
    let server = Running::start(command, port, &dir.path().join("server.log"));
    let answer = enroll(server.addr(), &root, "traced").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(server);

    let text = std::fs::read_to_string(&trace).unwrap();
    let calls = parse_strace(&text);
    let journal_fd = |c: &Call| c.fd.contains("journal.jsonl>");
    let client_fd = |c: &Call| c.fd.contains(&format!("TCP:[127.0.0.1:{port}->"));
    let is = |c: &Call, names: &[&str]| names.contains(&c.name.as_str());
    // The entry written to the journal.
    let write = calls
        .iter()
        .position(|c| !c.resumed && journal_fd(c) && is(c, &["write", "writev"]))
        .unwrap_or_else(|| panic!("no write to the journal:\n{text}"));
    // Its fdatasync, and where it returned.
    let sync = write
        + calls[write..]
            .iter()
            .position(|c| !c.resumed && journal_fd(c) && c.name == "fdatasync")
            .unwrap_or_else(|| panic!("no fdatasync of the journal after its write:\n{text}"));
    let synced = if calls[sync].unfinished {
        sync + calls[sync..]
            .iter()
            .position(|c| c.resumed && c.name == "fdatasync" && c.pid == calls[sync].pid)
            .unwrap()
    } else {
        sync
    };
    assert_eq!(calls[synced].ret, Some(0), "fdatasync failed:\n{text}");
    // The request: the last read from the client before the entry was written.
    let request = calls[..write]
        .iter()
        .rposition(|c| client_fd(c) && is(c, &["read", "readv", "recvfrom", "recvmsg"]))
        .unwrap_or_else(|| panic!("no read from the client before the journal write:\n{text}"));
    // The answer: the first write to the client after the request that is big enough to hold
    // a certificate (TLS 1.3 session tickets are a few hundred bytes).
    let answer_write = request
        + calls[request..]
            .iter()
            .position(|c| {
                !c.resumed
                    && client_fd(c)
                    && is(c, &["write", "writev", "sendto", "sendmsg"])
                    && (c.ret.unwrap_or(i64::MAX) >= 600 || c.unfinished)
            })
            .unwrap_or_else(|| panic!("no answer written to the client:\n{text}"));
    assert!(
        answer_write > synced,
        "the answer was written (line {answer_write}) before the journal's fdatasync returned \
         (line {synced}):\n{text}"
    );
}
