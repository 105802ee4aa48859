//! Rate limits: per client address (before any password check or CSR parsing) and per
//! authenticated identity, both token buckets. A request over a limit is answered 429 with
//! `Retry-After` and a text reason; after waiting that long the client is served again. A
//! lower layer passes an upper layer's 429 on to its child with the same `Retry-After`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::client::{basic, certs_from_answer, iot_edge_body, Answer, EstClient};
use common::{standard_config, Pki, TestServer, PASSWORD, USER};
use edge_est::demo::{self, Layer, CHILD_PASSWORD, CHILD_USER};
use rcgen::{CertificateParams, DnType, KeyPair};

fn csr(cn: &str) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.serialize_request(&key).unwrap().der().to_vec()
}

async fn enroll(client: &EstClient, auth: &[(&'static str, String)], cn: &str) -> Answer {
    let mut headers = vec![("content-type", "application/pkcs10".to_owned())];
    headers.extend(auth.iter().cloned());
    client
        .request("POST", "simpleenroll", &headers, iot_edge_body(&csr(cn)))
        .await
}

/// A 429 with a whole number of seconds in `Retry-After` and a text reason naming `scope`.
fn limited(answer: &Answer, scope: &str) -> u64 {
    assert_eq!(answer.status, 429, "{}", answer.text());
    assert!(
        answer
            .header("content-type")
            .unwrap_or_default()
            .starts_with("text/plain"),
        "{:?}",
        answer.headers
    );
    assert!(
        answer
            .text()
            .contains(&format!("too many requests from {scope}")),
        "{}",
        answer.text()
    );
    let retry_after: u64 = answer
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=5).contains(&retry_after), "{retry_after}");
    retry_after
}

/// The value of the series of `name` whose line contains every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limit_answers_429_before_any_password_check_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.limits.rate_per_address = 2.0;
    config.limits.burst_per_address = 4.0;
    config.limits.rate_per_identity = 0.0;
    let server = TestServer::start(dir.path(), &config).await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);

    for _ in 0..4 {
        let answer = client.request("GET", "cacerts", &[], Vec::new()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let answer = client.request("GET", "cacerts", &[], Vec::new()).await;
    let retry_after = limited(&answer, "this address");
    // A wrong password is not even checked (429, not 401): the limit comes first.
    let started = Instant::now();
    let wrong = enroll(&client, &[basic(USER, "wrong")], "dev1").await;
    limited(&wrong, "this address");
    assert!(started.elapsed() < Duration::from_secs(1));

    // After Retry-After, served again: the bucket refilled.
    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    let answer = enroll(&client, &[basic(USER, PASSWORD)], "dev1").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(certs_from_answer(&answer.body).len(), 1);

    let text = server.app.render_metrics();
    assert_eq!(
        metric(&text, "edgeest_rate_limited_total", &["scope=\"address\""]),
        2.0
    );
    assert_eq!(
        metric(&text, "edgeest_requests_total", &["status=\"429\""]),
        1.0,
        "{text}"
    );
    assert_eq!(server.journal().len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_identity_limit_holds_back_one_identity_not_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.limits.rate_per_address = 0.0;
    config.limits.rate_per_identity = 1.0;
    config.limits.burst_per_identity = 2.0;
    let server = TestServer::start(dir.path(), &config).await;
    let by_password = EstClient::new(server.addr, &pki.root.cert_pem, None);
    let bootstrap = pki.bootstrap.valid_client("dev9");
    let by_certificate = EstClient::new(
        server.addr,
        &pki.root.cert_pem,
        Some((&bootstrap.cert_pem, &bootstrap.key_pem)),
    );

    for i in 0..2 {
        let answer = enroll(&by_password, &[basic(USER, PASSWORD)], &format!("p{i}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let answer = enroll(&by_password, &[basic(USER, PASSWORD)], "p2").await;
    let retry_after = limited(&answer, "this identity");
    // Another identity from the same address is not held back.
    let answer = enroll(&by_certificate, &[], "dev9").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    // Anonymous cacerts are not counted against anyone.
    let answer = by_password.request("GET", "cacerts", &[], Vec::new()).await;
    assert_eq!(answer.status, 200);

    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    let answer = enroll(&by_password, &[basic(USER, PASSWORD)], "p3").await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let text = server.app.render_metrics();
    assert_eq!(
        metric(&text, "edgeest_rate_limited_total", &["scope=\"identity\""]),
        1.0
    );
    let (addresses, identities) = server.app.rate_limit_buckets();
    assert_eq!(
        (addresses, identities),
        (0, 2),
        "one bucket per identity seen"
    );
    assert_eq!(server.journal().len(), 4, "nothing journaled for the 429");
    server.stop().await;
}

/// The demo's top with `top_config`, a bottom layer forwarding to it, and a child client of
/// the bottom layer.
async fn two_layers(
    dir: &std::path::Path,
    top_config: &edge_est::config::Config,
) -> (Layer, Layer, EstClient) {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let top = Layer::start("top", dir, top_config, any).await.unwrap();
    let bottom_config = demo::forward_config("bottom", top.addr.port(), "layer2-ra", None);
    let bottom = Layer::start("bottom", dir, &bottom_config, any)
        .await
        .unwrap();
    let root = std::fs::read_to_string(dir.join("root.pem")).unwrap();
    let child = EstClient::new(bottom.addr, &root, None);
    (top, bottom, child)
}

/// The demo's top with an identity limit a test reaches at once (burst 1, 0.5/s) and no trust
/// set exempt from it.
fn top_config_with_tight_identity_limit() -> edge_est::config::Config {
    let mut config = demo::top_config();
    config.limits.rate_per_identity = 0.5;
    config.limits.burst_per_identity = 1.0;
    config.limits.unlimited_trust.clear();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upper_layers_429_reaches_the_child_with_its_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    demo::write_pki(dir.path()).unwrap();
    let top_config = top_config_with_tight_identity_limit();
    let (top, bottom, child) = two_layers(dir.path(), &top_config).await;
    let password = [basic(CHILD_USER, CHILD_PASSWORD)];

    let first = enroll(&child, &password, "child-1").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = enroll(&child, &password, "child-2").await;
    assert_eq!(second.status, 429, "{}", second.text());
    assert!(
        second
            .text()
            .contains("too many requests from this identity"),
        "the upper layer's reason is passed on: {}",
        second.text()
    );
    let retry_after: u64 = second.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry_after, 2, "1 token at 0.5/s");
    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    let third = enroll(&child, &password, "child-3").await;
    assert_eq!(third.status, 200, "{}", third.text());
    let bottom_metrics = bottom.app.render_metrics();
    assert_eq!(
        metric(
            &bottom_metrics,
            "edgeest_upstream_failures_total",
            &["upstream=\"parent\"", "reason=\"unavailable\""]
        ),
        1.0,
        "{bottom_metrics}"
    );
    bottom.stop().await;
    top.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_authority_in_unlimited_trust_is_not_held_back() {
    let dir = tempfile::tempdir().unwrap();
    demo::write_pki(dir.path()).unwrap();
    // The same tight limits as above, but the RAs' trust set is exempt (the demo's default).
    let mut top_config = demo::top_config();
    top_config.limits.rate_per_identity = 0.5;
    top_config.limits.burst_per_identity = 1.0;
    top_config.limits.rate_per_address = 0.5;
    top_config.limits.burst_per_address = 1.0;
    assert_eq!(top_config.limits.unlimited_trust, ["ras"]);
    six_enrollments_through_the_ra_all_pass(dir.path(), &top_config).await;
}

/// Six children enroll through the bottom layer's RA, above the top's identity limit of the
/// tests (burst 1, 0.5/s): every one is served, none is limited at the top.
async fn six_enrollments_through_the_ra_all_pass(
    dir: &std::path::Path,
    top_config: &edge_est::config::Config,
) {
    let (top, bottom, child) = two_layers(dir, top_config).await;
    let password = [basic(CHILD_USER, CHILD_PASSWORD)];
    for i in 0..6 {
        let answer = enroll(&child, &password, &format!("child-{i}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(
        metric(
            &top.app.render_metrics(),
            "edgeest_rate_limited_total",
            &["scope=\"identity\""]
        ),
        0.0
    );
    bottom.stop().await;
    top.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_marked_registration_authority_exempts_the_ra_from_the_identity_limit() {
    let dir = tempfile::tempdir().unwrap();
    demo::write_pki(dir.path()).unwrap();
    // As in the 429 test above (tight identity limit, no trust set exempt), but the rule that
    // matches the RA says what it is. Deployments whose RAs have no trust set of their own
    // (IoT Edge modules, `module:DEVICE/MODULE`) cannot use unlimited_trust.
    let mut top_config = top_config_with_tight_identity_limit();
    let ra_rule = &mut top_config.labels[0].rules[0];
    assert_eq!(ra_rule.matches, ["certificate:ras"]);
    assert!(!ra_rule.client_cn.is_empty(), "the RA rule names its RA");
    ra_rule.registration_authority = true;
    six_enrollments_through_the_ra_all_pass(dir.path(), &top_config).await;
}

#[test]
fn registration_authority_reads_from_a_rule_and_is_off_by_default() {
    let rule: edge_est::config::RuleConfig = toml::from_str(
        "match = [\"certificate:ras\"]\nclient_cn = [\"edgeest\"]\nregistration_authority = true\n",
    )
    .unwrap();
    assert!(rule.registration_authority);
    let rule: edge_est::config::RuleConfig =
        toml::from_str("match = [\"certificate:ras\"]\n").unwrap();
    assert!(!rule.registration_authority);
}

#[test]
fn limits_read_from_toml_with_whole_numbers_and_zero_turns_them_off() {
    let limits: edge_est::config::Limits = toml::from_str(
        "rate_per_address = 0\nrate_per_identity = 5\nburst_per_identity = 10\nmax_connections_per_address = 0\n",
    )
    .unwrap();
    assert_eq!(limits.rate_per_address, 0.0);
    assert_eq!(limits.rate_per_identity, 5.0);
    assert_eq!(limits.max_connections_per_address, 0);
    let defaults = edge_est::config::Limits::default();
    assert_eq!(
        (defaults.rate_per_address, defaults.burst_per_address),
        (50.0, 500.0)
    );
    // A rate without a bucket to draw from is refused by validation.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.limits.rate_per_identity = 1.0;
    config.limits.burst_per_identity = 0.0;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("limits.burst_per_identity"), "{error}");
    config.limits.rate_per_identity = 0.0;
    config.validate().unwrap();
}
