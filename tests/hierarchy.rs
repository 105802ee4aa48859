//! Layered hierarchies with every layer a real TLS listener on loopback: the top signs, the
//! layers below forward as registration authorities with their own credentials.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::client::{basic, certs_from_answer, iot_edge_body, to_pem, Answer, EstClient};
use common::openssl_verify;
use edge_est::config::{Config, Mode};
use edge_est::demo::{self, Layer, CHILD_PASSWORD, CHILD_USER};
use edge_est::est::Operation;
use edge_est::journal::Journal;
use rcgen::{CertificateParams, DnType, KeyPair};

fn csr(cn: &str, key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.serialize_request(key).unwrap().der().to_vec()
}

fn root(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("root.pem")).unwrap()
}

async fn enroll(client: &EstClient, auth: &[(&str, String)], csr_der: &[u8]) -> Answer {
    let mut headers = vec![("content-type", "application/pkcs10".to_owned())];
    headers.extend(auth.iter().cloned());
    client
        .request("POST", "simpleenroll", &headers, iot_edge_body(csr_der))
        .await
}

/// Verifies an enrollment answer with openssl against the hierarchy root, using the layer's
/// own cacerts as the chain; returns the leaf DER.
async fn verified_leaf(dir: &Path, client: &EstClient, answer: &Answer, name: &str) -> Vec<u8> {
    assert_eq!(answer.status, 200, "{}", answer.text());
    let leaf = certs_from_answer(&answer.body).remove(0);
    let cacerts = client.request("GET", "cacerts", &[], Vec::new()).await;
    assert_eq!(cacerts.status, 200, "{}", cacerts.text());
    let chain: String = certs_from_answer(&cacerts.body)
        .iter()
        .map(|c| to_pem(c))
        .collect();
    std::fs::write(dir.join(format!("{name}.pem")), to_pem(&leaf)).unwrap();
    std::fs::write(dir.join(format!("{name}-chain.pem")), chain).unwrap();
    assert!(openssl_verify(
        dir,
        "root.pem",
        &format!("{name}-chain.pem"),
        &format!("{name}.pem")
    ));
    leaf
}

fn journal(layer: &Layer) -> Vec<edge_est::journal::JournalEntry> {
    Journal::read_all(layer.app.journal().path()).unwrap()
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[tokio::test]
async fn three_layers_enroll_and_renew_through_two_registration_authorities() {
    let dir = tempfile::tempdir().unwrap();
    demo::write_pki(dir.path()).unwrap();
    let [top, middle, bottom] = demo::start_hierarchy(dir.path()).await.unwrap();
    let child = EstClient::new(bottom.addr, &root(dir.path()), None);

    let key = KeyPair::generate().unwrap();
    let answer = enroll(
        &child,
        &[basic(CHILD_USER, CHILD_PASSWORD)],
        &csr("child-7", &key),
    )
    .await;
    let leaf = verified_leaf(dir.path(), &child, &answer, "child-7").await;

    // Renewal at the bottom, authenticated by the certificate the top issued: the bottom
    // knows the top's issuing CA from the cached upstream cacerts.
    let as_child = EstClient::new(
        bottom.addr,
        &root(dir.path()),
        Some((&to_pem(&leaf), &key.serialize_pem())),
    );
    let renewal_key = KeyPair::generate().unwrap();
    let answer = enroll(&as_child, &[], &csr("child-7", &renewal_key)).await;
    verified_leaf(dir.path(), &as_child, &answer, "child-7-renewed").await;

    // The top's journal names the middle layer as the requesting RA; the bottom's names the
    // child; the middle's names the bottom RA. All three hold the same two certificates.
    let (top_j, middle_j, bottom_j) = (journal(&top), journal(&middle), journal(&bottom));
    assert_eq!(top_j.len(), 2);
    assert!(
        top_j
            .iter()
            .all(|e| e.identity == "certificate \"CN=layer2-ra\" (ras)"),
        "{top_j:?}"
    );
    assert!(top_j.iter().all(|e| e.issued_by == "local"));
    assert!(middle_j
        .iter()
        .all(|e| e.identity == "certificate \"CN=layer3-ra\" (ras)"));
    assert_eq!(bottom_j[0].identity, "user estuser");
    assert_eq!(bottom_j[1].identity, "certificate \"CN=child-7\" (issuer)");
    assert!(bottom_j.iter().all(|e| e.issued_by == "upstream parent"));
    let serials = |j: &[edge_est::journal::JournalEntry]| {
        j.iter().map(|e| e.serial.clone()).collect::<Vec<_>>()
    };
    assert_eq!(serials(&top_j), serials(&bottom_j));
    assert_eq!(serials(&top_j), serials(&middle_j));
    for layer in [bottom, middle, top] {
        layer.stop().await;
    }
}

#[tokio::test]
async fn a_child_refused_below_never_reaches_the_layer_above() {
    let dir = tempfile::tempdir().unwrap();
    demo::write_pki(dir.path()).unwrap();
    let [top, middle, bottom] = demo::start_hierarchy(dir.path()).await.unwrap();
    let child = EstClient::new(bottom.addr, &root(dir.path()), None);
    let key = KeyPair::generate().unwrap();

    let wrong_password = enroll(&child, &[basic(CHILD_USER, "wrong")], &csr("c1", &key)).await;
    assert_eq!(wrong_password.status, 401, "{}", wrong_password.text());
    assert_eq!(
        middle.app.tls_handshakes(),
        0,
        "nothing at all reached the layer above"
    );
    let stranger_key = KeyPair::generate().unwrap();
    let stranger = CertificateParams::new(vec!["stranger".to_owned()])
        .unwrap()
        .self_signed(&stranger_key)
        .unwrap();
    let foreign = EstClient::new(
        bottom.addr,
        &root(dir.path()),
        Some((&stranger.pem(), &stranger_key.serialize_pem())),
    );
    let not_trusted_here = enroll(&foreign, &[], &csr("c1", &key)).await;
    assert_eq!(not_trusted_here.status, 401, "{}", not_trusted_here.text());
    // (Validating a certificate may fetch the upstream's cacerts; no enrollment went up.)
    for layer in [&middle, &top] {
        assert_eq!(
            layer.app.requests(Operation::SimpleEnroll),
            0,
            "{} saw no enrollment",
            layer.name
        );
        assert!(journal(layer).is_empty());
    }

    // Positive control: the same child with the right password is forwarded.
    let allowed = enroll(
        &child,
        &[basic(CHILD_USER, CHILD_PASSWORD)],
        &csr("c1", &key),
    )
    .await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    assert_eq!(middle.app.requests(Operation::SimpleEnroll), 1);
    assert_eq!(top.app.requests(Operation::SimpleEnroll), 1);
    assert_eq!(journal(&top).len(), 1);
    for layer in [bottom, middle, top] {
        layer.stop().await;
    }
}

#[tokio::test]
async fn the_upper_layer_bounds_what_a_lower_layer_may_request() {
    let dir = tempfile::tempdir().unwrap();
    demo::write_pki(dir.path()).unwrap();
    // The top lets layer2-ra ask only for plant-* names and no CA certificates.
    let mut top_config = demo::top_config();
    let rule = &mut top_config.labels[0].rules[0];
    rule.common_names = vec!["plant-*".into()];
    rule.ca_common_names.clear();
    let top = Layer::start("top", dir.path(), &top_config, any_port())
        .await
        .unwrap();
    let middle_config = demo::forward_config("middle", top.addr.port(), "layer2-ra", None);
    let middle = Layer::start("middle", dir.path(), &middle_config, any_port())
        .await
        .unwrap();
    let child = EstClient::new(middle.addr, &root(dir.path()), None);
    let password = [basic(CHILD_USER, CHILD_PASSWORD)];
    let key = KeyPair::generate().unwrap();

    // The middle layer allows the child any name, but the top refuses it for the RA. The
    // child gets the status and a neutral reason: nothing of the RA's credential (its CN,
    // the trust set that knows it); the middle's log has the top's reason.
    let refused = enroll(&child, &password, &csr("office-1", &key)).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(
        refused
            .text()
            .contains("refused by the layer above (403 Forbidden)"),
        "{}",
        refused.text()
    );
    for secret in ["layer2-ra", "ras", "CN="] {
        assert!(!refused.text().contains(secret), "{}", refused.text());
    }
    let allowed = enroll(&child, &password, &csr("plant-1", &key)).await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    assert_eq!(journal(&top).len(), 1);
    assert_eq!(
        journal(&middle).len(),
        1,
        "the refused request is not journaled below either"
    );
    middle.stop().await;
    top.stop().await;
}

/// The bottom forwards on its unlabeled path and runs label `auto` with its own intermediate.
fn bottom_with_auto_label(upstream_port: u16) -> Config {
    let mut config = demo::forward_config("bottom", upstream_port, "layer2-ra", None);
    config.issuers.insert(
        "own".into(),
        edge_est::config::IssuerConfig {
            certificate: edge_est::config::PemSource("auto-ca.pem".into()),
            key: "auto-ca.key".into(),
        },
    );
    let mut auto = config.labels[0].clone();
    auto.name = Some("auto".into());
    auto.mode = Mode::Auto;
    auto.issuer = Some("own".into());
    auto.fallback = Some(edge_est::config::FallbackConfig {
        common_names: vec!["*".into()],
        ..Default::default()
    });
    config.labels.push(auto);
    config
}

#[tokio::test]
async fn upstream_away_then_back() {
    let dir = tempfile::tempdir().unwrap();
    demo::write_pki(dir.path()).unwrap();
    let top = Layer::start("top", dir.path(), &demo::top_config(), any_port())
        .await
        .unwrap();
    let top_addr = top.addr;
    let bottom = Layer::start(
        "bottom",
        dir.path(),
        &bottom_with_auto_label(top_addr.port()),
        any_port(),
    )
    .await
    .unwrap();
    let child = EstClient::new(bottom.addr, &root(dir.path()), None);
    let password = [basic(CHILD_USER, CHILD_PASSWORD)];
    let key = KeyPair::generate().unwrap();

    let answer = enroll(&child, &password, &csr("before", &key)).await;
    verified_leaf(dir.path(), &child, &answer, "before").await; // also fills the cacerts cache
    top.stop().await;

    // Forward: 503 with Retry-After, well within the configured 5 s request timeout.
    let started = Instant::now();
    let away = enroll(&child, &password, &csr("during", &key)).await;
    assert_eq!(away.status, 503, "{}", away.text());
    assert_eq!(away.header("retry-after"), Some("10"));
    assert!(away.text().contains("cannot be reached"), "{}", away.text());
    assert!(started.elapsed() < Duration::from_secs(10));
    // cacerts still answered, from cache.
    let cacerts = child.request("GET", "cacerts", &[], Vec::new()).await;
    assert_eq!(cacerts.status, 200, "{}", cacerts.text());
    assert_eq!(certs_from_answer(&cacerts.body).len(), 2);
    // auto signs locally with the bottom's own intermediate; the chain it serves matches.
    let auto_answer = child
        .request(
            "POST",
            "auto/simpleenroll",
            &[
                ("content-type", "application/pkcs10".into()),
                basic(CHILD_USER, CHILD_PASSWORD),
            ],
            iot_edge_body(&csr("during-auto", &key)),
        )
        .await;
    assert_eq!(auto_answer.status, 200, "{}", auto_answer.text());
    let leaf = certs_from_answer(&auto_answer.body).remove(0);
    let auto_cacerts = child.request("GET", "auto/cacerts", &[], Vec::new()).await;
    // cacerts names every CA that may sign for the label: the top's (learned before the
    // outage) and the bottom's own, so either's certificates verify with it.
    let chain = certs_from_answer(&auto_cacerts.body);
    let subjects: Vec<String> = chain
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
        subjects
            .iter()
            .any(|s| s.contains("lower layer issuing CA"))
            && subjects.iter().any(|s| s.contains("top layer issuing CA")),
        "{subjects:?}"
    );
    std::fs::write(dir.path().join("auto.pem"), to_pem(&leaf)).unwrap();
    std::fs::write(
        dir.path().join("auto-chain.pem"),
        chain.iter().map(|c| to_pem(c)).collect::<String>(),
    )
    .unwrap();
    assert!(openssl_verify(
        dir.path(),
        "root.pem",
        "auto-chain.pem",
        "auto.pem"
    ));
    assert_eq!(journal(&bottom).last().unwrap().issued_by, "local");

    // The upstream comes back on the same address: forwarding resumes, no restart below.
    let top = Layer::start("top", dir.path(), &demo::top_config(), top_addr)
        .await
        .unwrap();
    // Meanwhile the bottom answered from what it knew (503 at once, local signing on
    // `auto`); its background probe finds the top back within `probe_max_secs`.
    let upstream = bottom
        .app
        .runtime()
        .labels()
        .find_map(|l| l.upstream.clone())
        .unwrap();
    let waited = Instant::now();
    while upstream.health.state() != edge_est::issue::health::State::Up {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "never probed back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = enroll(&child, &password, &csr("after", &key)).await;
    verified_leaf(dir.path(), &child, &back, "after").await;
    assert_eq!(
        journal(&top).len(),
        2,
        "before (journaled by the first top) + after"
    );
    bottom.stop().await;
    top.stop().await;
}

#[tokio::test]
async fn forwarded_requests_reuse_pooled_upstream_connections() {
    let dir = tempfile::tempdir().unwrap();
    demo::write_pki(dir.path()).unwrap();
    let top = Layer::start("top", dir.path(), &demo::top_config(), any_port())
        .await
        .unwrap();
    let bottom_config = demo::forward_config("bottom", top.addr.port(), "layer2-ra", None);
    let bottom = Layer::start("bottom", dir.path(), &bottom_config, any_port())
        .await
        .unwrap();
    let child = EstClient::new(bottom.addr, &root(dir.path()), None);
    let password = [basic(CHILD_USER, CHILD_PASSWORD)];
    let key = KeyPair::generate().unwrap();
    const REQUESTS: usize = 40;
    for i in 0..REQUESTS {
        let answer = enroll(&child, &password, &csr(&format!("pooled-{i}"), &key)).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(
        bottom.app.tls_handshakes(),
        REQUESTS as u64,
        "each child came on a fresh connection"
    );
    let upstream_handshakes = top.app.tls_handshakes();
    assert!(
        (1..=4).contains(&upstream_handshakes),
        "{upstream_handshakes} handshakes upstream for {REQUESTS} forwarded requests"
    );
    assert_eq!(journal(&top).len(), REQUESTS);
    bottom.stop().await;
    top.stop().await;
}
