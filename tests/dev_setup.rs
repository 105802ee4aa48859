//! `edge-est serve` without a configuration: the embedded development setup is generated on
//! first start, reused on the next, and the curl + openssl commands it prints really enroll.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{sh, stderr, stdout};

struct Running {
    child: Child,
    printed: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the binary in `dir` and reads its standard output up to the enrollment commands.
fn start(dir: &Path, port: u16, env_password: Option<&str>) -> Running {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-est"));
    command
        .args([
            "serve",
            "--data-dir",
            "data",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .current_dir(dir)
        .env_remove("EDGE_EST_DEV_PASSWORD")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(p) = env_password {
        command.env("EDGE_EST_DEV_PASSWORD", p);
    }
    let mut child = command.spawn().expect("start edge-est");
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut printed = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !printed.contains("openssl verify") {
        assert!(
            Instant::now() < deadline,
            "no enrollment instructions printed: {printed}"
        );
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("edge-est exited early; it printed: {printed}");
        }
        printed.push_str(&line);
    }
    Running { child, printed }
}

/// The shell commands the server printed (indented lines, with their continuations).
fn commands(printed: &str) -> String {
    printed
        .lines()
        .filter(|l| l.starts_with("  "))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ")
}

#[test]
fn first_start_generates_pki_and_printed_commands_enroll() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start(dir.path(), port, None);
    assert!(
        server
            .printed
            .contains("Development password for user estuser (shown once"),
        "{}",
        server.printed
    );
    for file in [
        "root.pem",
        "issuing-ca.pem",
        "issuing-ca.key",
        "server.pem",
        "server.key",
        "dev-password",
    ] {
        assert!(
            dir.path().join("data").join(file).exists(),
            "{file} generated"
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for secret in ["dev-password", "issuing-ca.key", "server.key"] {
            let mode = std::fs::metadata(dir.path().join("data").join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{secret} is private to its owner");
        }
    }

    // Run exactly what was printed.
    let script = commands(&server.printed);
    let out = sh(&script, dir.path());
    assert!(
        out.status.success(),
        "printed commands failed:\n{script}\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("device.pem: OK"), "{}", stdout(&out));
    let subject = sh("openssl x509 -in device.pem -noout -subject", dir.path());
    assert!(stdout(&subject).contains("CN = device1"));
    drop(server);

    // Second start: same root, no password shown again, the journal kept.
    let root_before = std::fs::read(dir.path().join("data/root.pem")).unwrap();
    let server = start(dir.path(), port, None);
    assert!(
        !server.printed.contains("shown once"),
        "the password is shown only on first start"
    );
    assert_eq!(
        std::fs::read(dir.path().join("data/root.pem")).unwrap(),
        root_before
    );
    let out = sh(&commands(&server.printed), dir.path());
    assert!(
        stdout(&out).contains("device.pem: OK"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let journal = std::fs::read_to_string(dir.path().join("data/journal.jsonl")).unwrap();
    assert_eq!(
        journal.lines().count(),
        2,
        "both enrollments journaled across the restart"
    );
}

#[test]
fn password_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start(dir.path(), port, Some("env-secret-1"));
    assert!(!server.printed.contains("shown once"));
    assert!(
        !dir.path().join("data/dev-password").exists(),
        "no password file when the environment gives one"
    );
    let enroll = |password: &str| {
        sh(
            &format!(
                "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout k.pem -subj /CN=envdev -out r.csr 2>/dev/null && \
                 curl -s -o /dev/null -w '%{{http_code}}' --cacert data/root.pem -u estuser:{password} \
                 -H 'Content-Type: application/pkcs10' --data-binary @r.csr https://localhost:{port}/.well-known/est/simpleenroll"
            ),
            dir.path(),
        )
    };
    assert_eq!(stdout(&enroll("env-secret-1")), "200");
    assert_eq!(stdout(&enroll("wrong")), "401");
}

#[test]
fn health_probe_answers_for_a_running_server_only() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let probe = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_edge-est"))
            .arg("health")
            .args(args)
            .current_dir(dir.path())
            .env_remove("EDGE_EST_DATA_DIR")
            .output()
            .unwrap()
    };
    let addr = format!("127.0.0.1:{port}");
    let down = probe(&["--addr", &addr]);
    assert!(!down.status.success(), "nothing listens yet");
    let server = start(dir.path(), port, Some("pw"));
    // By address, by host name, and through the record the server keeps in its data
    // directory (no --addr: the HEALTHCHECK's form).
    for args in [
        vec!["--addr", addr.as_str()],
        vec!["--addr", &format!("localhost:{port}")],
        vec!["--data-dir", "data"],
    ] {
        let up = probe(&args);
        assert!(up.status.success(), "{args:?}: {}", stderr(&up));
        assert!(
            stdout(&up).starts_with(&format!(
                "edge-est answers on 127.0.0.1:{port}: cacerts 200"
            )),
            "{args:?}: {}",
            stdout(&up)
        );
    }
    let recorded = std::fs::read_to_string(dir.path().join("data/edge-est.listen")).unwrap();
    assert_eq!(recorded.trim(), addr);
    drop(server);

    // Any other HTTPS server on the port is not edge-est: openssl's status page answers 200.
    let mut other = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
        .args(["-cert", "data/server.pem", "-key", "data/server.key"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let impostor = probe(&["--data-dir", "data"]);
    let _ = other.kill();
    let _ = other.wait();
    assert!(!impostor.status.success(), "{}", stdout(&impostor));
    assert!(
        stderr(&impostor).contains("not edge-est"),
        "{}",
        stderr(&impostor)
    );
}

#[test]
fn hash_password_prompts_without_echo_on_a_terminal_and_reads_a_pipe() {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    let verifies = |hash: &str, password: &str| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &PasswordHash::new(hash).unwrap())
            .is_ok()
    };
    let dir = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_edge-est");

    // A pipe: one line, no prompt.
    let piped = sh(
        &format!("printf 'pipe-secret\\n' | {binary} hash-password"),
        dir.path(),
    );
    assert!(piped.status.success(), "{}", stderr(&piped));
    assert!(verifies(stdout(&piped).trim(), "pipe-secret"));
    assert!(!stderr(&piped).contains("Password"));

    // A terminal (script(1) gives it a pseudo-terminal): prompted twice, nothing echoed.
    if Command::new("script").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "script(1) (util-linux) is missing in CI"
        );
        eprintln!("skipped: script(1) is missing");
        return;
    }
    let typed = sh(
        &format!(
            "(sleep 1; printf 'tty-secret\\n'; sleep 0.5; printf 'tty-secret\\n'; sleep 3) \
             | script -qec '{binary} hash-password' /dev/null"
        ),
        dir.path(),
    );
    let screen = stdout(&typed);
    assert!(
        screen.contains("Password: ") && screen.contains("Again: "),
        "{screen}"
    );
    assert!(
        !screen.contains("tty-secret"),
        "the password was echoed: {screen}"
    );
    let hash = screen
        .lines()
        .find(|l| l.starts_with("$argon2id$"))
        .unwrap_or_else(|| panic!("no hash in {screen}"))
        .trim();
    assert!(verifies(hash, "tty-secret"));
}
