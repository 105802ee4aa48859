//! `edge-est demo` runs a three-layer hierarchy and a child through it, and exits 0; the
//! configurations it leaves serve with `edge-est serve --config`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{sh, stderr, stdout};

fn demo(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .arg("demo")
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[test]
fn demo_enrolls_through_three_layers_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = demo(dir.path(), &["--dir", dir.path().to_str().unwrap()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    for step in [
        "1. device identity",
        "2. Edge CA",
        "3. renewal",
        "demo passed",
    ] {
        assert!(text.contains(step), "{step} missing from:\n{text}");
    }
    assert_eq!(text.matches("verif").count(), 3, "{text}");
    // Who asked, as each layer authenticated it: the bottom saw the Basic user once, then
    // the device's certificate; the top saw the middle's RA credential.
    assert!(
        text.contains(
            "bottom  3 entries: user estuser, certificate \"CN=child-device\" (issuer) ×2"
        ),
        "{text}"
    );
    assert!(
        text.contains("top     3 entries: certificate \"CN=layer2-ra\" (ras) ×3"),
        "{text}"
    );
    // The PKI and journals are left for inspection.
    let top = std::fs::read_to_string(dir.path().join("journal-top.jsonl")).unwrap();
    assert_eq!(top.lines().count(), 3);
}

struct Serving(Vec<Child>);

impl Drop for Serving {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn a_relative_dir_keeps_private_keys_and_configurations_that_serve() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .min(u16::MAX - 2);
    let out = demo(
        dir.path(),
        &["--dir", "./demo1", "--config-port", &port.to_string()],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let demo1 = dir.path().join("demo1");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut keys = 0;
        for entry in std::fs::read_dir(&demo1).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".key") || name == "child-password" {
                let mode = std::fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{name}");
                keys += 1;
            }
        }
        assert_eq!(keys, 7, "every key and the password are private");
    }

    // The configurations it wrote, served as the README shows.
    let mut serving = Serving(Vec::new());
    for layer in ["top", "middle", "bottom"] {
        serving.0.push(
            Command::new(env!("CARGO_BIN_EXE_edge-est"))
                .args(["serve", "--config", &format!("./demo1/{layer}.toml")])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let bottom = port + 2;
    let deadline = Instant::now() + Duration::from_secs(30);
    for p in [port, port + 1, bottom] {
        while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
            assert!(Instant::now() < deadline, "port {p} never opened");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let enroll = sh(
        &format!(
            "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout device.key -subj /CN=device1 -out device.csr 2>/dev/null && \
             curl -sS --fail-with-body --cacert ./demo1/root.pem -u estuser:\"$(cat ./demo1/child-password)\" \
             -H 'Content-Type: application/pkcs10' --data-binary @device.csr \
             https://localhost:{bottom}/.well-known/est/simpleenroll \
             | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out device.pem && \
             curl -sS --fail-with-body --cacert ./demo1/root.pem https://localhost:{bottom}/.well-known/est/cacerts \
             | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out chain.pem && \
             openssl verify -CAfile ./demo1/root.pem -untrusted chain.pem device.pem"
        ),
        dir.path(),
    );
    assert!(
        stdout(&enroll).contains("device.pem: OK"),
        "{}{}",
        stdout(&enroll),
        stderr(&enroll)
    );
    // `edge-est health --config` probes a configuration's listener.
    let health = Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .args(["health", "--config", "./demo1/bottom.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(health.status.success(), "{}", stderr(&health));
    assert!(
        stdout(&health).contains(&format!("127.0.0.1:{bottom}")),
        "{}",
        stdout(&health)
    );
    drop(serving);
    let top = std::fs::read_to_string(demo1.join("journal-top.jsonl")).unwrap();
    assert_eq!(
        top.lines().count(),
        4,
        "the demo's three, then device1 signed at the top"
    );
}
