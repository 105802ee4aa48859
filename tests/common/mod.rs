//! Shared harness of the integration tests: a PKI generated at run time, an edge-est server
//! on a loopback port, external clients (curl, openssl) and a small Rust EST client.
#![allow(dead_code)]

pub mod bin;
pub mod client;
pub mod mqtt;
pub mod pki;
pub mod softhsm;
pub mod upstream_stub;
pub mod workload;

/// Set to `1` to let the tests that need an absent external program skip (say so on stderr
/// and pass). Unset, a missing program fails the test that needs it: a green run means every
/// test ran. `.ci/run` never sets it.
pub const SKIP_MISSING_TOOLS: &str = "EDGE_EST_SKIP_MISSING_TOOLS";

/// The external program `name` (on `PATH` or in an sbin directory), or, when it is missing
/// and [`SKIP_MISSING_TOOLS`] is `1`, `None` (the caller returns: the test is skipped).
/// Missing without the opt-out, the test fails, naming the Debian package to install.
pub fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    for dir in ["/usr/sbin", "/usr/local/sbin", "/sbin"] {
        candidates.push(Path::new(dir).join(name));
    }
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return Some(found);
    }
    missing(&format!(
        "{name} is not installed (apt-get install {package})"
    ))
}

/// A precondition of a test that the machine lacks: fails the test, unless
/// [`SKIP_MISSING_TOOLS`] is `1`, in which case it says so and returns `None`.
pub fn missing<T>(what: &str) -> Option<T> {
    if std::env::var(SKIP_MISSING_TOOLS).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED ({SKIP_MISSING_TOOLS}=1): {what}");
        return None;
    }
    panic!("{what}; set {SKIP_MISSING_TOOLS}=1 to skip the tests that need it");
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use edge_est::config::{Config, LabelConfig};
use edge_est::server::App;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use pki::Pki;

/// A server configuration over [`Pki`]'s files in the test's directory: journal, TLS, the
/// Basic user `estuser` and the issuer `plant` (issuing-ca), then `body` (labels, trust
/// sets, ...).
pub fn plant_config(pki: &Pki, body: &str) -> Config {
    let text = format!(
        r#"
journal = "journal.jsonl"
[tls]
certificate = "server.pem"
key = "server.key"
[users]
estuser = "{hash}"
[issuers.plant]
certificate = "issuing-ca.pem"
key = "issuing-ca.key"
{body}
"#,
        hash = pki.password_hash
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A PKCS#10 CSR (DER) for the common name `cn`, with a fresh P-256 key and nothing else.
pub fn csr(cn: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.serialize_request(&key).unwrap().der().to_vec()
}

/// A fresh PKI in a temporary directory and a server on [`standard_config`].
pub async fn start_standard() -> (tempfile::TempDir, Pki, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let server = TestServer::start(dir.path(), &standard_config(&pki)).await;
    (dir, pki, server)
}

/// A running server on 127.0.0.1 with its files in a temporary directory.
pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server with `config` (paths relative to `dir`) on a fresh port.
    pub async fn start(dir: &Path, config: &Config) -> TestServer {
        Self::start_on(dir, config, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(dir: &Path, config: &Config, addr: SocketAddr) -> TestServer {
        let app = edge_est::app::build(config, dir).expect("configuration must load");
        let listener = edge_est::transport::Listener::bind(addr).expect("bind loopback");
        let addr = listener.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(edge_est::app::run(listener, app.clone(), async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            dir: dir.to_owned(),
            app,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server and waits until its connections are drained.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "https://localhost:{}/.well-known/est/{path}",
            self.addr.port()
        )
    }

    pub fn journal(&self) -> Vec<edge_est::journal::JournalEntry> {
        edge_est::journal::Journal::read_all(self.app.journal().path()).unwrap_or_default()
    }
}

/// The configuration most tests use: the PKI's issuing CA signs on the unlabeled path and on
/// label `strict`; Basic user `estuser` (password `estpass`) and bootstrap certificates may
/// enroll, certificates from the issuer may renew and get their Edge CA.
pub fn standard_config(pki: &Pki) -> Config {
    toml::from_str(&standard_config_toml(pki)).expect("standard config parses")
}

/// [`standard_config`] as the TOML file the shipped binary reads (paths relative to the
/// PKI's directory, `listen` to be given with `--listen`).
pub fn standard_config_toml(pki: &Pki) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
journal = "journal.jsonl"

[tls]
certificate = "server.pem"
key = "server.key"

[trust.bootstrap]
certificates = ["bootstrap-ca.pem"]

[users]
estuser = "{hash}"
other = "{hash}"

[issuers.plant]
certificate = "issuing-ca.pem"
key = "issuing-ca.key"

[[labels]]
issuer = "plant"
client_trust = ["bootstrap", "issuer"]
csr_attributes = ["ecdsa-with-SHA256", "ecPublicKey=secp256r1"]
serverkeygen = "ec-p256"
deny = ["user:other", "cn:revoked-device"]

[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]
ca_common_names = ["aziot-edge CA *"]
dns_names = ["*.plant.local"]
ip_addresses = ["*"]

[[labels.rules]]
match = ["certificate:bootstrap"]
common_names = ["{{cn}}"]

[[labels.rules]]
match = ["certificate:issuer"]
common_names = ["{{cn}}"]
ca_common_names = ["aziot-edge CA {{cn}}"]
dns_names = ["{{cn}}.plant.local"]

[[labels]]
name = "strict"
issuer = "plant"
client_trust = ["issuer"]
issuer_labels = ["(unlabeled)"]

[labels.authentication]
basic = false

[[labels.rules]]
match = ["certificate:issuer"]
common_names = ["{{cn}}"]
"#,
        hash = pki.password_hash,
    )
}

/// A certificate of this server's issuer obtained as a device obtains its first one: enrolled
/// on the unlabeled path by the Basic user (`issuer` on a label accepts only certificates it
/// issued, see `auth::chain`).
pub async fn enrolled(server: &TestServer, root_pem: &str, cn: &str) -> pki::Credential {
    enrolled_at(server.addr, root_pem, cn).await
}

/// [`enrolled`], from the server listening on `addr`.
pub async fn enrolled_at(addr: SocketAddr, root_pem: &str, cn: &str) -> pki::Credential {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let answer = client::EstClient::new(addr, root_pem, None)
        .request(
            "POST",
            "simpleenroll",
            &[
                ("content-type", "application/pkcs10".to_owned()),
                client::basic(USER, PASSWORD),
            ],
            client::iot_edge_body(&csr),
        )
        .await;
    assert_eq!(answer.status, 200, "enrolling {cn}: {}", answer.text());
    pki::Credential {
        cert_pem: client::to_pem(&client::certs_from_answer(&answer.body)[0]),
        key_pem: key.serialize_pem(),
    }
}

/// Appends `cert_pem` to the journal at `journal` as issued on `label`, as the server records
/// what it issues. For certificates a server cannot issue while the test runs (expired ones):
/// written before the server starts, they count as its own (it rebuilds which label issued
/// what from its journal at start).
pub fn record_issued(journal: &Path, cert_pem: &str, label: Option<&str>) {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let rfc3339 = |t: ::time::OffsetDateTime| {
        t.format(&::time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let hex = |b: &[u8]| edge_est::auth::client_cert::hex(b);
    let entry = edge_est::journal::JournalEntry {
        time: rfc3339(cert.validity().not_before.to_datetime()),
        serial: hex(cert.raw_serial()),
        subject: cert.subject().to_string(),
        sans: Vec::new(),
        label: label.map(str::to_owned),
        operation: "simpleenroll".into(),
        identity: "user estuser".into(),
        profile: "identity".into(),
        not_before: rfc3339(cert.validity().not_before.to_datetime()),
        not_after: rfc3339(cert.validity().not_after.to_datetime()),
        sha256: hex(edge_est::auth::chain::fingerprint(&der).as_ref()),
        certificate: {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(&der)
        },
        issued_by: "local".into(),
        grace_renewal: false,
        issuer_ca: None,
    };
    let mut line = serde_json::to_string(&entry).unwrap();
    line.push('\n');
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(journal)
        .unwrap()
        .write_all(line.as_bytes())
        .unwrap();
}

pub fn label<'a>(config: &'a mut Config, name: Option<&str>) -> &'a mut LabelConfig {
    config
        .labels
        .iter_mut()
        .find(|l| l.name.as_deref() == name)
        .expect("label exists")
}

pub const USER: &str = "estuser";
pub const PASSWORD: &str = "estpass";

/// Runs a command, panicking with its output if it cannot start.
pub fn run(program: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a shell pipeline in `dir`.
pub fn sh(script: &str, dir: &Path) -> Output {
    run("bash", &["-o", "pipefail", "-c", script], dir)
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `openssl verify` of `leaf` against `root` with `untrusted` intermediates; true if OK.
pub fn openssl_verify(dir: &Path, root: &str, untrusted: &str, leaf: &str) -> bool {
    let out = run(
        "openssl",
        &["verify", "-CAfile", root, "-untrusted", untrusted, leaf],
        dir,
    );
    let ok = out.status.success() && stdout(&out).contains(": OK");
    if !ok {
        eprintln!("openssl verify failed: {}{}", stdout(&out), stderr(&out));
    }
    ok
}

/// curl against the server, with the test root as trust anchor. Returns (status, body).
pub fn curl(server: &TestServer, args: &[&str]) -> (u16, String) {
    let port = server.addr.port().to_string();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let mut all = vec![
        "-s",
        "--cacert",
        "root.pem",
        "--resolve",
        &resolve,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    all.extend_from_slice(args);
    let out = run("curl", &all, &server.dir);
    let text = stdout(&out);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}
