//! `auto` through real outages, three layers on loopback: the top signs, the middle runs
//! `auto` (forward; sign with its own CA while the top is away), the bottom forwards. At the
//! bottom, clients shaped like IoT Edge's aziot-certd: `simpleenroll` and `cacerts` at once
//! on two connections, the chain stored as the issued leaf followed by every `cacerts`
//! certificate, and that stored chain verified with `openssl verify`.
//!
//! Phases: the top up; refusing connections; accepting TCP and never answering; the middle
//! restarted during that outage; the top back. In each phase a new device enrolls its
//! identity and its Edge CA, and every identity certificate issued in an earlier phase
//! renews, within the 30 s IoT Edge gives an attempt. Budgets are short by configuration
//! (the bottom's children wait 4 s), so the whole runs in seconds.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::{basic, certs_from_answer, iot_edge_body, to_pem, Answer, EstClient};
use common::openssl_verify;
use edge_est::config::{Config, FallbackConfig, IssuerConfig, Mode, PemSource};
use edge_est::demo::{self, Layer, CHILD_PASSWORD, CHILD_USER};
use edge_est::issue::health::State;
use edge_est::issue::Upstream;
use edge_est::journal::{Journal, JournalEntry};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::CertificateDer;

/// What IoT Edge gives one attempt.
const ATTEMPT: Duration = Duration::from_secs(30);

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn root(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("root.pem")).unwrap()
}

fn csr(cn: &str, key: &KeyPair, ca: bool) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    }
    params.serialize_request(key).unwrap().der().to_vec()
}

/// The top: its RA rule lets the middle (layer2-ra) ask for `l3-*` names only.
fn top_config() -> Config {
    let mut config = demo::top_config();
    let ra = &mut config.labels[0].rules[0];
    assert_eq!(ra.client_cn, ["layer2-ra"]);
    ra.common_names = vec!["l3-*".into()];
    ra.ca_common_names = vec!["aziot-edge CA l3-*".into()];
    config
}

/// The middle: `auto` with its own CA, bounded by what the top allows its RA.
fn middle_config(top_port: u16) -> Config {
    let mut config = demo::forward_config("middle", top_port, "layer2-ra", Some("layer3-ra"));
    config.issuers.insert(
        "own".into(),
        IssuerConfig {
            certificate: PemSource("auto-ca.pem".into()),
            key: "auto-ca.key".into(),
        },
    );
    let label = &mut config.labels[0];
    label.mode = Mode::Auto;
    label.issuer = Some("own".into());
    label.fallback = Some(FallbackConfig {
        common_names: vec!["l3-*".into()],
        ca_common_names: vec!["aziot-edge CA l3-*".into()],
        ..FallbackConfig::default()
    });
    let parent = config.upstreams.get_mut("parent").unwrap();
    parent.probe_max_secs = 1;
    parent.cacerts_ttl_secs = 1;
    // Below the bottom's 3.6 s budget, as the default 20 s is below IoT Edge's 30 s: checking
    // a certificate's chain asks the layer above within this layer's own timeout (whose
    // certificate it is, and so whether its budget holds, is not known yet).
    parent.request_timeout_secs = 3;
    config
}

/// The bottom: forwards; its children (devices) wait 4 s here instead of IoT Edge's 30 s.
fn bottom_config(middle_port: u16) -> Config {
    let mut config = demo::forward_config("bottom", middle_port, "layer3-ra", None);
    config.limits.client_timeout_secs = 4;
    config.upstreams.get_mut("parent").unwrap().cacerts_ttl_secs = 1;
    config
}

fn upstream_of(layer: &Layer) -> Arc<Upstream> {
    layer
        .app
        .runtime()
        .labels()
        .find_map(|l| l.upstream.clone())
        .unwrap()
}

async fn wait_for_state(layer: &Layer, state: State) {
    let started = Instant::now();
    while upstream_of(layer).health.state() != state {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{}'s upstream never became {state:?}",
            layer.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `upstreams.parent` of the layer's reported properties (as the module reports them).
fn reported_upstream(layer: &Layer, config: &Config) -> serde_json::Value {
    let runtime = layer.app.runtime();
    let document = edge_est::edge::reported::document(&edge_est::edge::reported::ReportInput {
        status: "running",
        config_version: None,
        config_source: None,
        rejection: None,
        config: Some(config),
        runtime: Some(&runtime),
        counters: None,
        pending_restart: &[],
    });
    document["upstreams"]["parent"].clone()
}

fn journal(layer: &Layer) -> Vec<JournalEntry> {
    Journal::read_all(layer.app.journal().path()).unwrap()
}

/// A port that accepts TCP and never answers (a hung top).
struct Hung(tokio::task::JoinHandle<()>);

impl Hung {
    async fn on(addr: SocketAddr) -> Hung {
        // The port was just given up by a stopped layer: its threads may hold it a moment.
        let started = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if started.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot bind {addr}: {e}"),
            }
        };
        Hung(tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        }))
    }

    async fn stop(self) {
        self.0.abort();
        let _ = self.0.await;
    }
}

/// A device at the bottom, as aziot-certd stores it: the certificate and key it holds.
struct Held {
    name: String,
    cert: Vec<u8>,
    key: KeyPair,
}

struct Bottom<'a> {
    dir: &'a Path,
    addr: SocketAddr,
}

impl Bottom<'_> {
    fn client(&self, identity: Option<&Held>) -> EstClient {
        let pem = identity.map(|h| (to_pem(&h.cert), h.key.serialize_pem()));
        EstClient::new(
            self.addr,
            &root(self.dir),
            pem.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
        )
    }

    /// One issuance as aziot-certd makes it: simpleenroll and cacerts at once, both 200
    /// within IoT Edge's 30 s; the stored chain (leaf + cacerts) verified by openssl against
    /// the root. Returns the leaf and how long it took.
    async fn issue(
        &self,
        what: &str,
        as_whom: Option<&Held>,
        cn: &str,
        key: &KeyPair,
        ca: bool,
    ) -> (Vec<u8>, Duration) {
        let client = self.client(as_whom);
        let auth: Vec<(&str, String)> = match as_whom {
            None => vec![basic(CHILD_USER, CHILD_PASSWORD)],
            Some(_) => Vec::new(),
        };
        let mut headers = vec![
            ("content-type", "application/pkcs10".to_owned()),
            ("content-transfer-encoding", "base64".to_owned()),
        ];
        headers.extend(auth.iter().cloned());
        let started = Instant::now();
        let both = async {
            tokio::join!(
                client.request(
                    "POST",
                    "simpleenroll",
                    &headers,
                    iot_edge_body(&csr(cn, key, ca))
                ),
                client.request("GET", "cacerts", &auth, Vec::new()),
            )
        };
        let (enroll, cacerts): (Answer, Answer) = tokio::time::timeout(ATTEMPT, both)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within IoT Edge's 30 s"));
        let took = started.elapsed();
        assert_eq!(enroll.status, 200, "{what}: {}", enroll.text());
        assert_eq!(cacerts.status, 200, "{what}: {}", cacerts.text());
        let leaf = certs_from_answer(&enroll.body).remove(0);
        let mut stored = to_pem(&leaf);
        for cert in certs_from_answer(&cacerts.body) {
            stored.push_str(&to_pem(&cert));
        }
        let file = format!("{}.pem", what.replace(' ', "-"));
        std::fs::write(self.dir.join(&file), stored).unwrap();
        assert!(
            openssl_verify(self.dir, "root.pem", &file, &file),
            "{what}: the stored chain must verify against the root"
        );
        eprintln!("{what}: {:.0} ms", took.as_secs_f64() * 1000.0);
        (leaf, took)
    }

    /// A new device: its identity (Basic), then its Edge CA (authenticated by the identity).
    async fn new_device(&self, phase: &str, name: &str) -> Held {
        let key = KeyPair::generate().unwrap();
        let (cert, _) = self
            .issue(&format!("{phase} {name} identity"), None, name, &key, false)
            .await;
        let held = Held {
            name: name.to_owned(),
            cert,
            key,
        };
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        self.issue(
            &format!("{phase} {name} edge-ca"),
            Some(&held),
            &format!("aziot-edge CA {name}"),
            &ca_key,
            true,
        )
        .await;
        held
    }

    /// Every device renews (simpleenroll with a new key, authenticated by its certificate).
    async fn renew_all(&self, phase: &str, devices: &mut [Held]) {
        for device in devices.iter_mut() {
            let key = KeyPair::generate().unwrap();
            let (cert, _) = self
                .issue(
                    &format!("{phase} {} renewal", device.name),
                    Some(device),
                    &device.name.clone(),
                    &key,
                    false,
                )
                .await;
            device.cert = cert;
            device.key = key;
        }
    }
}

fn issuer_cn(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.issuer().to_string()
}

#[tokio::test]
async fn enrollment_edge_ca_and_renewal_through_every_outage_shape() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    demo::write_pki(dir).unwrap();
    let top = Layer::start("top", dir, &top_config(), any_port())
        .await
        .unwrap();
    let top_addr = top.addr;
    let middle = Layer::start("middle", dir, &middle_config(top_addr.port()), any_port())
        .await
        .unwrap();
    let middle_addr = middle.addr;
    let bottom_layer = Layer::start(
        "bottom",
        dir,
        &bottom_config(middle_addr.port()),
        any_port(),
    )
    .await
    .unwrap();
    let bottom = Bottom {
        dir,
        addr: bottom_layer.addr,
    };
    // Reachability is not claimed before any contact; the middle learns the chain above at
    // once (its upstream serves an auto label).
    let reported = reported_upstream(&bottom_layer, &bottom_config(middle_addr.port()));
    assert_eq!(reported["state"], "unknown", "{reported}");
    assert_eq!(reported["reachable"], false, "{reported}");
    wait_for_state(&middle, State::Up).await;
    let reported = reported_upstream(&middle, &middle_config(top_addr.port()));
    assert_eq!(reported["state"], "up", "{reported}");
    assert_eq!(reported["reachable"], true, "{reported}");

    // 1. The top up: the top signs. Two devices keep their top-issued certificates until
    // the middle has restarted during the outage.
    let mut devices = vec![bottom.new_device("up", "l3-up").await];
    assert!(issuer_cn(&devices[0].cert).contains("top layer issuing CA"));
    let mut keepers = [
        bottom.new_device("up", "l3-keeper-1").await,
        bottom.new_device("up", "l3-keeper-2").await,
    ];
    bottom.renew_all("up", &mut devices).await;
    // A name the top refuses the middle's RA: relayed twice, with its status and one
    // neutral reason, naming no RA.
    let refused = enroll_at(bottom.addr, dir, "plc-07").await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(
        refused.text().matches("refused by the layer above").count(),
        1,
        "{}",
        refused.text()
    );
    for secret in ["layer2-ra", "layer3-ra", "ras"] {
        assert!(!refused.text().contains(secret), "{}", refused.text());
    }

    // 2. The top refuses connections: the middle signs with its own CA.
    top.stop().await;
    devices.push(bottom.new_device("refused", "l3-refused").await);
    assert!(issuer_cn(&devices[1].cert).contains("lower layer issuing CA"));
    assert_eq!(upstream_of(&middle).health.state(), State::Away);
    bottom.renew_all("refused", &mut devices).await;

    // Back briefly, so the middle sees the top up when it hangs.
    let top = Layer::start("top", dir, &top_config(), top_addr)
        .await
        .unwrap();
    wait_for_state(&middle, State::Up).await;
    top.stop().await;

    // 3. The top accepts TCP and never answers: the middle gives it less time than the
    // bottom's children wait, then signs itself; the bottom never answers 503.
    let hung = Hung::on(top_addr).await;
    let key = KeyPair::generate().unwrap();
    let (leaf, took) = bottom
        .issue("hung first", None, "l3-hung-first", &key, false)
        .await;
    assert!(issuer_cn(&leaf).contains("lower layer issuing CA"));
    assert!(
        took < Duration::from_secs(4),
        "answered before the bottom's children give up: {took:?}"
    );
    assert_eq!(upstream_of(&middle).health.state(), State::Away);
    devices.push(bottom.new_device("hung", "l3-hung").await);
    bottom.renew_all("hung", &mut devices).await;

    // 4. The middle restarted during the outage: it still knows the top's chain and that
    // the top is away (kept on disk), so it serves cacerts, authenticates certificates the
    // top issued and signs at once.
    middle.stop().await;
    // The stopped listener's sockets may take a moment to go (a loaded machine): bind again
    // until the address is free, within a bound.
    let mut attempts = 0;
    let middle = loop {
        match Layer::start("middle", dir, &middle_config(top_addr.port()), middle_addr).await {
            Ok(layer) => break layer,
            Err(e) if attempts < 50 => {
                attempts += 1;
                eprintln!("middle restart: {e}; again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the middle does not restart: {e}"),
        }
    };
    assert_eq!(upstream_of(&middle).health.state(), State::Away);
    let cacerts = EstClient::new(middle_addr, &root(dir), None)
        .request("GET", "cacerts", &[], Vec::new())
        .await;
    let subjects: Vec<String> = certs_from_answer(&cacerts.body)
        .iter()
        .map(|c| {
            x509_parser::parse_x509_certificate(c)
                .unwrap()
                .1
                .subject()
                .to_string()
        })
        .collect();
    assert!(
        subjects.iter().any(|s| s.contains("top layer issuing CA"))
            && subjects
                .iter()
                .any(|s| s.contains("lower layer issuing CA")),
        "{subjects:?}"
    );
    devices.push(bottom.new_device("restarted", "l3-restarted").await);
    bottom.renew_all("restarted", &mut devices).await;
    // Certificates the top issued before the outage still authenticate: at the restarted
    // middle itself, and at the bottom (which learns the chain from the middle).
    let at_middle = Bottom {
        dir,
        addr: middle_addr,
    };
    at_middle
        .renew_all("restarted at the middle", &mut keepers[..1])
        .await;
    bottom.renew_all("restarted", &mut keepers[1..]).await;
    // `issuer` is a label's own issuance: the keeper that renewed at the middle renews there
    // from now on (the bottom never saw its certificate).
    let [at_middle_keeper, at_bottom_keeper] = keepers;
    let mut middle_devices = vec![at_middle_keeper];
    devices.push(at_bottom_keeper);

    // 5. The top back: the middle's probe finds it, the top signs again, and renewals of
    // certificates the middle issued during the outage go through it.
    hung.stop().await;
    let top = Layer::start("top", dir, &top_config(), top_addr)
        .await
        .unwrap();
    wait_for_state(&middle, State::Up).await;
    devices.push(bottom.new_device("back", "l3-back").await);
    assert!(issuer_cn(&devices.last().unwrap().cert).contains("top layer issuing CA"));
    bottom.renew_all("back", &mut devices).await;
    at_middle
        .renew_all("back at the middle", &mut middle_devices)
        .await;
    assert!(devices
        .iter()
        .chain(&middle_devices)
        .all(|d| issuer_cn(&d.cert).contains("top layer issuing CA")));

    // Every certificate is in the bottom's journal, signed above it; the middle's journal
    // says which it signed itself.
    let bottom_journal = journal(&bottom_layer);
    assert!(bottom_journal
        .iter()
        .all(|e| e.issued_by == "upstream parent"));
    let local = journal(&middle)
        .iter()
        .filter(|e| e.issued_by == "local")
        .count();
    assert!(
        local >= 10,
        "{local} signed by the middle during the outage"
    );
    for layer in [bottom_layer, middle, top] {
        layer.stop().await;
    }
}

/// A child of the middle itself (Basic), enrolling `cn`.
async fn enroll_at(addr: SocketAddr, dir: &Path, cn: &str) -> Answer {
    let key = KeyPair::generate().unwrap();
    EstClient::new(addr, &root(dir), None)
        .request(
            "POST",
            "simpleenroll",
            &[
                ("content-type", "application/pkcs10".into()),
                basic(CHILD_USER, CHILD_PASSWORD),
            ],
            iot_edge_body(&csr(cn, &key, false)),
        )
        .await
}

fn metrics_line(layer: &Layer, starts: &str) -> Option<String> {
    layer
        .app
        .render_metrics()
        .lines()
        .find(|l| l.starts_with(starts) || l.contains(starts))
        .map(str::to_owned)
}

#[tokio::test]
async fn a_misconfigured_upstream_is_never_signed_for_locally() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    demo::write_pki(dir).unwrap();
    let top = Layer::start("top", dir, &top_config(), any_port())
        .await
        .unwrap();
    let port = top.addr.port();
    // Three ways to be wrong: the upstream's TLS certificate checked against the wrong
    // anchor (UnknownIssuer), a URL whose EST path answers 404, no RA credential (401).
    let mut wrong_anchor = middle_config(port);
    wrong_anchor.upstreams.get_mut("parent").unwrap().trust = vec![PemSource("ra-ca.pem".into())];
    let mut wrong_path = middle_config(port);
    wrong_path.upstreams.get_mut("parent").unwrap().url =
        format!("https://localhost:{port}/.well-known/est/nosuchlabel");
    let mut no_credential = middle_config(port);
    let parent = no_credential.upstreams.get_mut("parent").unwrap();
    parent.certificate = None;
    parent.key = None;
    for (case, config, says) in [
        (
            "wrong anchor",
            wrong_anchor,
            "TLS certificate is not trusted here",
        ),
        ("wrong path", wrong_path, "EST path answers 404"),
        (
            "no credential",
            no_credential,
            "does not accept this layer's RA credentials",
        ),
    ] {
        let middle = Layer::start("middle", dir, &config, any_port())
            .await
            .unwrap();
        for _ in 0..2 {
            let answer = enroll_at(middle.addr, dir, "l3-misconfigured").await;
            assert_eq!(answer.status, 502, "{case}: {}", answer.text());
            assert!(answer.text().contains(says), "{case}: {}", answer.text());
            assert!(
                answer.text().contains(&format!("localhost:{port}")),
                "{case}: names the upstream by host: {}",
                answer.text()
            );
        }
        assert!(
            journal(&middle).is_empty(),
            "{case}: nothing signed locally"
        );
        let reported = reported_upstream(&middle, &config);
        assert_eq!(reported["state"], "misconfigured", "{case}: {reported}");
        assert_eq!(reported["reachable"], false, "{case}: {reported}");
        let gauge = metrics_line(&middle, "upstream=\"parent\",state=\"misconfigured\"").unwrap();
        assert!(gauge.ends_with(" 1"), "{case}: {gauge}");
        middle.stop().await;
    }
    // Positive control: the same middle with the right configuration forwards.
    let middle = Layer::start("middle", dir, &middle_config(port), any_port())
        .await
        .unwrap();
    let answer = enroll_at(middle.addr, dir, "l3-configured").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(journal(&middle)[0].issued_by, "upstream parent");
    assert_eq!(upstream_of(&middle).health.state(), State::Up);
    middle.stop().await;
    top.stop().await;
}

#[tokio::test]
async fn the_fallback_grants_nothing_the_top_refuses_the_ra() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    demo::write_pki(dir).unwrap();
    let top = Layer::start("top", dir, &top_config(), any_port())
        .await
        .unwrap();
    let top_addr = top.addr;
    // The middle's own rules let its Basic user ask for any name; the top allows the
    // middle's RA l3-* only, and the middle's fallback says the same.
    let middle = Layer::start("middle", dir, &middle_config(top_addr.port()), any_port())
        .await
        .unwrap();
    let refused_above = enroll_at(middle.addr, dir, "plc-07").await;
    assert_eq!(refused_above.status, 403, "{}", refused_above.text());
    assert!(refused_above.text().contains("refused by the layer above"));
    top.stop().await;
    // The top away: the same name refused by the fallback, a name within it signed here.
    let refused_here = enroll_at(middle.addr, dir, "plc-07").await;
    assert_eq!(refused_here.status, 403, "{}", refused_here.text());
    assert!(
        refused_here.text().contains("fallback allowance"),
        "{}",
        refused_here.text()
    );
    let allowed = enroll_at(middle.addr, dir, "l3-plc-07").await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    let entries = journal(&middle);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].issued_by, "local");
    middle.stop().await;
}

#[tokio::test]
async fn a_request_the_client_abandons_is_logged_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    demo::write_pki(dir).unwrap();
    let listener = std::net::TcpListener::bind(any_port()).unwrap();
    let hung_addr = listener.local_addr().unwrap();
    drop(listener);
    let hung = Hung::on(hung_addr).await;
    let bottom = Layer::start("bottom", dir, &bottom_config(hung_addr.port()), any_port())
        .await
        .unwrap();
    let client = EstClient::new(bottom.addr, &root(dir), None);
    let key = KeyPair::generate().unwrap();
    let headers = [
        ("content-type", "application/pkcs10".to_owned()),
        basic(CHILD_USER, CHILD_PASSWORD),
    ];
    let body = iot_edge_body(&csr("l3-gone", &key, false));
    // The client gives up after half a second, well before the layer would answer.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        client.request("POST", "simpleenroll", &headers, body),
    )
    .await;
    assert!(gave_up.is_err());
    let started = Instant::now();
    loop {
        let counted = metrics_line(&bottom, "status=\"499\"");
        if let Some(line) = counted {
            assert!(line.contains("operation=\"simpleenroll\""), "{line}");
            assert!(line.ends_with(" 1"), "{line}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the abandoned request was never counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bottom.stop().await;
    hung.stop().await;
}

/// An upstream that answers every request with 200 and one certificate: not the one asked
/// for (the top's CA certificate, whose key is another).
async fn wrong_key_upstream(dir: &Path) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let top_ca = CertificateDer::pem_file_iter(dir.join("top-ca.pem"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let pkcs7 = edge_est::est::pkcs7::encode_certs_only(&[top_ca.as_ref()]).unwrap();
    let body = edge_est::est::body::encode_base64_lines(&pkcs7);
    let listener = tokio::net::TcpListener::bind(any_port()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut seen = Vec::new();
                let mut buffer = [0u8; 4096];
                // One request per connection: its headers, then any body (small), then answer.
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buffer[..n]),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/pkcs7-mime\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                    body.len(),
                    body
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_answer_for_another_key_is_a_bad_gateway_never_a_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    demo::write_pki(dir).unwrap();
    let (stub, task) = wrong_key_upstream(dir).await;
    let middle = Layer::start("middle", dir, &middle_config(stub.port()), any_port())
        .await
        .unwrap();
    let answer = enroll_at(middle.addr, dir, "l3-wrong-key").await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert!(
        answer.text().contains("not for the requested key"),
        "{}",
        answer.text()
    );
    assert!(
        journal(&middle).is_empty(),
        "nothing recorded, nothing signed here"
    );
    middle.stop().await;
    task.abort();
}
