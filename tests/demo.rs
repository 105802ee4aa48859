//! `edge-est demo` runs a three-layer hierarchy whose middle and bottom layers enroll their
//! issuing CAs from the layer above, and a child through it, and exits 0; the configurations
//! it leaves serve with `edge-est serve --config`.

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

/// The certificates of a PEM file: (subject, pathlen when a CA).
fn pem_certs(path: &Path) -> Vec<(String, Option<u32>)> {
    let text = std::fs::read(path).unwrap();
    x509_parser::pem::Pem::iter_from_buffer(&text)
        .map(|pem| {
            let pem = pem.unwrap();
            let cert = pem.parse_x509().unwrap();
            let path_len = cert
                .basic_constraints()
                .unwrap()
                .filter(|bc| bc.value.ca)
                .map(|bc| bc.value.path_len_constraint.unwrap_or(u32::MAX));
            (cert.subject().to_string(), path_len)
        })
        .collect()
}

/// The indented certificate subjects printed under the first line of `text` that contains
/// `heading`.
fn printed_chain(text: &str, heading: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.contains(heading))
        .skip(1)
        .take_while(|l| l.starts_with("    CN="))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// `line` with each number (ports, times, counts) replaced by `#`.
fn without_numbers(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            while chars
                .peek()
                .is_some_and(|d| d.is_ascii_digit() || *d == '.')
            {
                chars.next();
            }
            out.push('#');
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn the_middle_and_bottom_enroll_their_cas_and_a_child_enrolls_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = demo(dir.path(), &["--dir", dir.path().to_str().unwrap()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    for step in [
        "1. device identity (Basic at the bottom, signed there)",
        "2. Edge CA",
        "3. renewal",
        "demo passed",
    ] {
        assert!(text.contains(step), "{step} missing from:\n{text}");
    }
    assert_eq!(text.matches("verif").count(), 3, "{text}");

    // What the README shows of it, ports and times aside.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let shown: Vec<&str> = readme
        .split("## First thing to try")
        .nth(1)
        .and_then(|s| s.split("```text\n").nth(1))
        .and_then(|s| s.split("\n```").next())
        .unwrap()
        .lines()
        .collect();
    assert!(shown.len() > 10, "{shown:?}");
    let printed: Vec<String> = text.lines().map(without_numbers).collect();
    for line in shown {
        assert!(
            printed.contains(&without_numbers(line)),
            "the README shows a line the demo does not print:\n{line}\n{text}"
        );
    }

    // Provisioned: the root and the top's CA (with the TLS certificate it issued and the
    // children's password). The configurations give the middle and the bottom no CA files:
    // they enroll one from the layer above.
    let path = |name: &str| dir.path().join(name);
    assert_eq!(
        pem_certs(&path("top-ca.pem")),
        [
            ("CN=top layer issuing CA".to_owned(), Some(3)),
            ("CN=hierarchy root".to_owned(), Some(u32::MAX)),
        ]
    );
    let config = |name: &str| -> edge_est::config::Config {
        toml::from_str(&std::fs::read_to_string(path(name)).unwrap()).unwrap()
    };
    assert_eq!(
        config("top.toml").issuers["top"].certificate.0,
        "top-ca.pem"
    );
    for (layer, above, path_len) in [("middle", "top", 2), ("bottom", "middle", 1)] {
        let config = config(&format!("{layer}.toml"));
        assert!(config.issuers.is_empty(), "{layer}: no CA files");
        let enrolled = &config.enrolled_issuers[layer];
        assert_eq!(
            (enrolled.enroll.as_str(), enrolled.path_len),
            (above, path_len)
        );
    }
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("issuer-") && !n.starts_with("upstream-"))
        .collect();
    files.sort();
    let provisioned = [
        "root.pem",
        "top-ca.pem",
        "top-ca.key",
        "server.pem",
        "server.key",
        "child-password",
    ];
    // Obtained over EST: each gateway's identity and its module's RA credential, the enrolled
    // CAs' chains (their keys stay in issuer-*/), the child's certificate.
    let obtained = [
        "gw-middle.pem",
        "gw-middle.key",
        "middle-ra.pem",
        "middle-ra.key",
        "middle-ca.pem",
        "gw-bottom.pem",
        "gw-bottom.key",
        "bottom-ra.pem",
        "bottom-ra.key",
        "bottom-ca.pem",
        "child-device.pem",
        "child-device.key",
    ];
    let left = [
        "top.toml",
        "middle.toml",
        "bottom.toml",
        "journal-top.jsonl",
        "journal-middle.jsonl",
        "journal-bottom.jsonl",
    ];
    let mut expected: Vec<String> = provisioned
        .iter()
        .chain(&obtained)
        .chain(&left)
        .map(|s| s.to_string())
        .collect();
    expected.sort();
    assert_eq!(files, expected);

    // The two chains printed are the CAs the layers enrolled, and verify against the root.
    let middle_chain = [
        "CN=middle layer issuing CA",
        "CN=top layer issuing CA",
        "CN=hierarchy root",
    ];
    let bottom_chain = [
        "CN=bottom layer issuing CA",
        "CN=middle layer issuing CA",
        "CN=top layer issuing CA",
        "CN=hierarchy root",
    ];
    for (layer, heading, chain, path_len, dns) in [
        (
            "middle",
            "enrolled its CA from top (as module edgeest of gw-middle)",
            &middle_chain[..],
            2,
            "DNSName(.plant.local)",
        ),
        (
            "bottom",
            "enrolled its CA from middle (as module edgeest of gw-bottom)",
            &bottom_chain[..],
            1,
            "DNSName(.line3.plant.local)",
        ),
    ] {
        assert_eq!(printed_chain(&text, heading), chain, "{text}");
        let file = format!("{layer}-ca.pem");
        let certs = pem_certs(&path(&file));
        let subjects: Vec<&str> = certs.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(subjects, chain);
        assert_eq!(certs[0].1, Some(path_len), "{layer}");
        let pem = std::fs::read(path(&file)).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let ca = pem.parse_x509().unwrap();
        let permitted: Vec<String> = ca
            .name_constraints()
            .unwrap()
            .unwrap()
            .value
            .permitted_subtrees
            .as_ref()
            .unwrap()
            .iter()
            .map(|s| s.base.to_string())
            .collect();
        assert_eq!(permitted, [dns], "{layer}");
        let verify = sh(
            &format!("openssl verify -CAfile root.pem -untrusted {file} {file}"),
            dir.path(),
        );
        assert_eq!(
            stdout(&verify).trim(),
            format!("{file}: OK"),
            "{}",
            stderr(&verify)
        );
    }
    // The RA credentials are modules of the gateways, below Edge CAs the layer above issued.
    for (ra, chain) in [
        ("middle-ra.pem", "top-ca.pem"),
        ("bottom-ra.pem", "middle-ca.pem"),
    ] {
        let certs = pem_certs(&path(ra));
        assert_eq!(certs[0].0, "CN=edgeest");
        let device = if ra.starts_with("middle") {
            "gw-middle"
        } else {
            "gw-bottom"
        };
        assert_eq!(certs[1], (format!("CN=aziot-edge CA {device}"), Some(0)));
        let verify = sh(
            &format!("cat {ra} {chain} > {ra}.chain && openssl verify -CAfile root.pem -untrusted {ra}.chain {ra}"),
            dir.path(),
        );
        assert!(stdout(&verify).contains(": OK"), "{}", stderr(&verify));
    }

    // Who asked, as each layer authenticated it; each CA journaled at both layers.
    for line in [
        "top     3 entries: user estuser, certificate \"CN=gw-middle\" (issuer), \
         certificate \"CN=edgeest\" (module of device gw-middle, issuer) [sub-ca]",
        "middle  4 entries: this layer (enrolled issuer middle) [sub-ca], user estuser, \
         certificate \"CN=gw-bottom\" (issuer), \
         certificate \"CN=edgeest\" (module of device gw-bottom, issuer) [sub-ca]",
        "bottom  4 entries: this layer (enrolled issuer bottom) [sub-ca], user estuser, \
         certificate \"CN=child-device\" (issuer) ×2",
    ] {
        assert!(text.contains(line), "{line}\nmissing from:\n{text}");
    }
    let sub_cas = |layer: &str| -> Vec<(String, String)> {
        edge_est::journal::Journal::read_all(&path(&format!("journal-{layer}.jsonl")))
            .unwrap()
            .into_iter()
            .filter(|e| e.profile == "sub-ca")
            .map(|e| (e.subject, e.identity))
            .collect()
    };
    let granted = |subject: &str, device: &str| {
        (
            format!("CN={subject}"),
            format!("certificate \"CN=edgeest\" (module of device {device}, issuer)"),
        )
    };
    let own = |subject: &str, layer: &str| {
        (
            format!("CN={subject}"),
            format!("this layer (enrolled issuer {layer})"),
        )
    };
    assert_eq!(
        sub_cas("top"),
        [granted("middle layer issuing CA", "gw-middle")]
    );
    assert_eq!(
        sub_cas("middle"),
        [
            own("middle layer issuing CA", "middle"),
            granted("bottom layer issuing CA", "gw-bottom")
        ]
    );
    assert_eq!(
        sub_cas("bottom"),
        [own("bottom layer issuing CA", "bottom")]
    );
}

/// A loopback port free now with the two after it (the demo's configurations use all three),
/// below Linux's ephemeral range (32768 and up): no connection of a test running meanwhile
/// takes one of them as its local port before the layers bind them.
fn three_free_ports() -> u16 {
    let start = 20000 + (std::process::id() % 4000) as u16 * 3;
    (0..4000u16)
        .map(|i| 20000 + (start - 20000 + i * 3) % 12000)
        .find(|&port| {
            let held: Vec<_> = (0..3)
                .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", port + i)).ok())
                .collect();
            held.len() == 3
        })
        .expect("three free loopback ports")
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
    let port = three_free_ports();
    let out = demo(
        dir.path(),
        &["--dir", "./demo1", "--config-port", &port.to_string()],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let demo1 = dir.path().join("demo1");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let mut keys = 0;
        for entry in std::fs::read_dir(&demo1).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".key") || name == "child-password" {
                assert_eq!(mode(&path), 0o600, "{name}");
                keys += 1;
            }
            // The enrolled CAs' state: the directory the owner's, its files too.
            if name.starts_with("issuer-") {
                assert_eq!(mode(&path), 0o700, "{name}");
                for entry in std::fs::read_dir(&path).unwrap() {
                    let file = entry.unwrap().path();
                    assert_eq!(mode(&file), 0o600, "{}", file.display());
                    keys += usize::from(file.to_string_lossy().ends_with(".pem"));
                }
            }
        }
        assert_eq!(
            keys, 10,
            "every key (top CA, TLS, two gateways, two RAs, the child, two enrolled CAs) \
             and the password are private"
        );
    }
    // The configurations check without a warning.
    for layer in ["top", "middle", "bottom"] {
        let check = Command::new(env!("CARGO_BIN_EXE_edge-est"))
            .args(["check-config", &format!("./demo1/{layer}.toml")])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(check.status.success(), "{layer}: {}", stderr(&check));
        assert_eq!(stderr(&check), "", "{layer}");
    }

    // The configurations it wrote, served as the README shows.
    let mut serving = Serving(Vec::new());
    for layer in ["top", "middle", "bottom"] {
        serving.0.push(
            Command::new(env!("CARGO_BIN_EXE_edge-est"))
                .args(["serve", "--config", &format!("./demo1/{layer}.toml")])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(format!("{layer}.log"))).unwrap())
                .spawn()
                .unwrap(),
        );
    }
    let bottom = port + 2;
    let deadline = Instant::now() + Duration::from_secs(30);
    for p in [port, port + 1, bottom] {
        while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
            if Instant::now() > deadline {
                let logs: Vec<String> = ["top", "middle", "bottom"]
                    .iter()
                    .map(|l| std::fs::read_to_string(dir.path().join(format!("{l}.log"))).unwrap())
                    .collect();
                panic!("port {p} never opened: {logs:#?}");
            }
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
    // At the middle, only gw-bottom's edgeest module obtains the bottom's CA: not the
    // gateway's own certificate, not the Basic user, not the middle's own RA module, whose
    // Edge CA the top issued (attacker probes); the module does (positive control, same CSR).
    let middle = port + 1;
    let ask = |credential: &str| {
        let answer = sh(
            &format!(
                "curl -sS -w ' %{{http_code}}' --cacert ./demo1/root.pem {credential} \
                 -H 'Content-Type: application/pkcs10' --data-binary @sub.csr \
                 https://localhost:{middle}/.well-known/est/simpleenroll"
            ),
            dir.path(),
        );
        assert!(answer.status.success(), "{}", stderr(&answer));
        stdout(&answer)
    };
    let csr = sh(
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout sub.key \
         -subj '/CN=bottom layer issuing CA' -addext 'basicConstraints=critical,CA:TRUE,pathlen:1' \
         -addext 'keyUsage=critical,keyCertSign,cRLSign' -out sub.csr",
        dir.path(),
    );
    assert!(csr.status.success(), "{}", stderr(&csr));
    for (credential, refusal) in [
        (
            "--cert ./demo1/gw-bottom.pem --key ./demo1/gw-bottom.key",
            "subject CN=\"bottom layer issuing CA\" is not allowed for certificate \"CN=gw-bottom\" (issuer)\n 403",
        ),
        (
            "-u estuser:\"$(cat ./demo1/child-password)\"",
            "user estuser may not obtain a CA certificate on this label\n 403",
        ),
        (
            "--cert ./demo1/middle-ra.pem --key ./demo1/middle-ra.key",
            "not issued by a CA this label trusts\n 401",
        ),
    ] {
        let answer = ask(credential);
        assert!(answer.ends_with(refusal), "{credential}: {answer}");
    }
    let granted = ask("--cert ./demo1/bottom-ra.pem --key ./demo1/bottom-ra.key");
    assert!(granted.ends_with(" 200"), "{granted}");

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
    // The bottom signed with the CA it enrolled during the demo, kept across the restart.
    let issuer = sh("openssl x509 -in device.pem -noout -issuer", dir.path());
    assert_eq!(
        stdout(&issuer).trim(),
        "issuer=CN = bottom layer issuing CA",
        "{}",
        stderr(&issuer)
    );
    drop(serving);
    let lines = |layer: &str| {
        std::fs::read_to_string(demo1.join(format!("journal-{layer}.jsonl")))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(lines("top"), 3, "the demo's three: nothing asked the top");
    assert_eq!(
        lines("middle"),
        5,
        "the demo's four (no CA enrolled again), then the sub-CA of the positive control"
    );
    assert_eq!(
        lines("bottom"),
        5,
        "the demo's four, then device1 signed at the bottom"
    );
}
