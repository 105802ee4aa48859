//! Rate limits, token buckets all: failed authentication per address and per presented
//! identity (before any argon2 or chain check), certificates per requested name, server
//! generated keys per identity; and, off by default, requests per address and per identity.
//! A request over a limit is answered 429 with `Retry-After` and a text reason; after waiting
//! that long the client is served again. A lower layer passes an upper layer's 429 on to its
//! child with the same `Retry-After`. A fleet sharing one Basic user is served at full speed.

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
        answer.text().contains(&format!("too many {scope}")),
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
    let retry_after = limited(&answer, "requests from this address");
    // A wrong password is not even checked (429, not 401): the limit comes first.
    let started = Instant::now();
    let wrong = enroll(&client, &[basic(USER, "wrong")], "dev1").await;
    limited(&wrong, "requests from this address");
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
    let retry_after = limited(&answer, "requests from this identity");
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
    // The defaults protect what is expensive or abusable; the general per-address and
    // per-identity limits are off (a fleet sharing one Basic user is one identity).
    let defaults = edge_est::config::Limits::default();
    assert_eq!(
        (defaults.rate_per_address, defaults.rate_per_identity),
        (0.0, 0.0)
    );
    assert_eq!(
        (
            defaults.failed_auth_per_address,
            defaults.failed_auth_burst_per_address,
            defaults.failed_auth_per_identity,
            defaults.failed_auth_burst_per_identity,
        ),
        (1.0, 30.0, 1.0, 30.0)
    );
    assert_eq!(
        (defaults.enroll_per_name, defaults.enroll_burst_per_name),
        (1.0, 30.0)
    );
    assert_eq!(
        (
            defaults.keygen_per_identity,
            defaults.keygen_burst_per_identity
        ),
        (10.0, 50.0)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_sharing_one_basic_user_at_the_defaults_get_no_429() {
    // The IoT Edge tutorial's fleet: every device has the Basic user `estuser`; all of them
    // come from one address here. Default limits.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let config = standard_config(&pki);
    assert_eq!(config.limits, edge_est::config::Limits::default());
    let server = TestServer::start(dir.path(), &config).await;
    const CLIENTS: usize = 16;
    const EACH: usize = 25;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for i in 0..EACH {
                    let answer =
                        enroll(&client, &[basic(USER, PASSWORD)], &format!("fleet-{c}-{i}")).await;
                    statuses.push(answer.status);
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    assert_eq!(statuses.len(), CLIENTS * EACH);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    eprintln!(
        "{} enrollments by 16 clients sharing one Basic user in {:.2} s (debug build)",
        statuses.len(),
        elapsed.as_secs_f64()
    );
    let text = server.app.render_metrics();
    assert_eq!(
        metric(&text, "edgeest_requests_total", &["status=\"429\""]),
        0.0
    );
    server.stop().await;
}

/// A self-signed certificate nobody trusts, made on the spot.
fn throwaway_certificate(cn: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_behind_a_throwaway_certificate_is_limited_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.limits.failed_auth_per_address = 0.2;
    config.limits.failed_auth_burst_per_address = 3.0;
    // A label that takes Basic only: the certificate plays no part but to be "presented".
    let strict = common::label(&mut config, Some("strict"));
    strict.authentication.basic = true;
    strict.authentication.certificate = false;
    strict
        .rules
        .push(toml::from_str("match = [\"user:estuser\"]\ncommon_names = [\"*\"]").unwrap());
    let server = TestServer::start(dir.path(), &config).await;
    let honest = EstClient::new(server.addr, &pki.root.cert_pem, None);
    let (cert, key) = throwaway_certificate("anyone");
    let attacker = EstClient::new(server.addr, &pki.root.cert_pem, Some((&cert, &key)));
    let enroll_at = |client: &EstClient, auth: (&'static str, String), cn: &str| {
        let client = client.clone();
        let cn = cn.to_owned();
        async move {
            client
                .request(
                    "POST",
                    "strict/simpleenroll",
                    &[("content-type", "application/pkcs10".to_owned()), auth],
                    iot_edge_body(&csr(&cn)),
                )
                .await
        }
    };

    // Positive control before: the device's password works (and is now known good).
    let answer = enroll_at(&honest, basic(USER, PASSWORD), "dev-1").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    // Three guesses are verified and refused...
    for i in 0..3 {
        let answer = enroll_at(&attacker, basic(USER, &format!("guess-{i}")), "x").await;
        assert_eq!(answer.status, 401, "{}", answer.text());
    }
    // ...the fourth is not verified at all.
    let answer = enroll_at(&attacker, basic(USER, "guess-3"), "x").await;
    let retry_after = limited(&answer, "failed authentications from this address");
    assert!(retry_after >= 1);
    // Nor is a guess for another user from the same address, certificate or not.
    let answer = enroll_at(&honest, basic("other", "guess-4"), "x").await;
    limited(&answer, "failed authentications from this address");
    // Positive control after: the device whose password is known good is still served.
    let answer = enroll_at(&honest, basic(USER, PASSWORD), "dev-2").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let text = server.app.render_metrics();
    assert_eq!(
        metric(
            &text,
            "edgeest_rate_limited_total",
            &["scope=\"failed_auth_address\""]
        ),
        2.0,
        "{text}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_without_credentials_is_not_a_failed_authentication() {
    // libest sends Basic credentials only after a 401 challenge: that first 401 is part of
    // every enrollment and must not count.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.limits.failed_auth_per_address = 0.25;
    config.limits.failed_auth_burst_per_address = 1.0;
    let server = TestServer::start(dir.path(), &config).await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
    for i in 0..5 {
        let challenge = enroll(&client, &[], &format!("c-{i}")).await;
        assert_eq!(challenge.status, 401, "{}", challenge.text());
        assert!(challenge.header("www-authenticate").is_some());
        let answer = enroll(&client, &[basic(USER, PASSWORD)], &format!("c-{i}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    // One wrong password fills the bucket (burst 1); the next guess is 429.
    let wrong = enroll(&client, &[basic(USER, "wrong")], "c-x").await;
    assert_eq!(wrong.status, 401);
    let wrong = enroll(&client, &[basic(USER, "wrong-again")], "c-x").await;
    limited(&wrong, "failed authentications from this address");
    server.stop().await;
}

/// A malformed `Authorization` header costs no argon2, but it is a failed authentication all
/// the same: it takes a token of the address's bucket, so a client cannot probe the parser
/// (or the server's patience) for free between guesses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_basic_header_counts_as_a_failed_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.limits.failed_auth_per_address = 0.25;
    config.limits.failed_auth_burst_per_address = 1.0;
    let server = TestServer::start(dir.path(), &config).await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
    // Positive control: the right password enrolls, again and again.
    for i in 0..3 {
        let answer = enroll(&client, &[basic(USER, PASSWORD)], &format!("m-{i}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let malformed = enroll(
        &client,
        &[("authorization", "Basic !!not-base64!!".to_owned())],
        "m-x",
    )
    .await;
    assert_eq!(malformed.status, 401, "{}", malformed.text());
    assert!(
        malformed
            .text()
            .contains("malformed HTTP Basic credentials"),
        "{}",
        malformed.text()
    );
    // The bucket (burst 1) is empty: a guess is not checked, as after a wrong password.
    let guess = enroll(&client, &[basic(USER, "guess")], "m-y").await;
    let wait = limited(&guess, "failed authentications from this address");
    // The password verified before is still served (a known credential costs no argon2).
    let answer = enroll(&client, &[basic(USER, PASSWORD)], "m-y").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    // Once the bucket has refilled, a guess is checked again: a plain 401.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let guess = enroll(&client, &[basic(USER, "guess")], "m-z").await;
    assert_eq!(guess.status, 401, "{}", guess.text());
    assert!(
        guess.text().contains("wrong user name or password"),
        "{}",
        guess.text()
    );
    server.stop().await;
}

/// The server with its API-proxy socket, where `x-forwarded-for` gives each request the
/// address of a different child.
struct ViaProxy {
    app: std::sync::Arc<edge_est::server::App>,
    socket: std::path::PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl ViaProxy {
    async fn start(dir: &std::path::Path, mut config: edge_est::config::Config) -> ViaProxy {
        std::fs::create_dir_all(dir.join("run")).unwrap();
        let socket = dir.join("run/proxy.sock");
        config.proxy_socket = Some(socket.clone());
        let app = edge_est::app::build(&config, dir).unwrap();
        let listener = edge_est::app::bind_proxy_socket(&config).unwrap().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(edge_est::app::run_proxy_socket(
            listener,
            app.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        ViaProxy {
            app,
            socket,
            stop,
            task,
        }
    }

    /// An enrollment from `address`, with a forwarded certificate (PEM) if given.
    async fn enroll(
        &self,
        address: &str,
        cert: Option<&str>,
        auth: Option<(&'static str, String)>,
        cn: &str,
    ) -> Answer {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let body = iot_edge_body(&csr(cn));
        let mut request = http::Request::builder()
            .method("POST")
            .uri("/.well-known/est/simpleenroll")
            .header("host", "gw")
            .header("content-type", "application/pkcs10")
            .header("content-length", body.len().to_string())
            .header("x-forwarded-for", address);
        if let Some(pem) = cert {
            let escaped =
                percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC)
                    .to_string();
            request = request.header("x-ms-edge-clientcert", escaped);
        }
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        let response = sender
            .send_request(
                request
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        use http_body_util::BodyExt;
        let body = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_one_users_password_from_many_addresses_is_limited_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.limits.failed_auth_per_identity = 0.2;
    config.limits.failed_auth_burst_per_identity = 3.0;
    let server = ViaProxy::start(dir.path(), config).await;
    // Positive control: the fleet's password, verified once, is known good.
    let answer = server
        .enroll("10.0.0.1", None, Some(basic(USER, PASSWORD)), "dev-1")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    for i in 0..3 {
        let from = format!("10.1.0.{i}");
        let answer = server
            .enroll(&from, None, Some(basic(USER, &format!("guess-{i}"))), "x")
            .await;
        assert_eq!(answer.status, 401, "{}", answer.text());
    }
    let answer = server
        .enroll("10.1.0.9", None, Some(basic(USER, "guess-9")), "x")
        .await;
    limited(&answer, "failed authentications for this identity");
    // Another user is not held back, and the known-good password of this one still works.
    let answer = server
        .enroll("10.1.0.10", None, Some(basic("other", PASSWORD)), "x")
        .await;
    assert_eq!(
        answer.status,
        403,
        "authenticated, then denied: {}",
        answer.text()
    );
    let answer = server
        .enroll("10.1.0.11", None, Some(basic(USER, PASSWORD)), "dev-2")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let text = server.app.render_metrics();
    assert_eq!(
        metric(
            &text,
            "edgeest_rate_limited_total",
            &["scope=\"failed_auth_identity\""]
        ),
        1.0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_certificates_are_limited_per_address_and_per_subject() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.limits.failed_auth_per_address = 0.2;
    config.limits.failed_auth_burst_per_address = 2.0;
    config.limits.failed_auth_per_identity = 0.2;
    config.limits.failed_auth_burst_per_identity = 2.0;
    let server = ViaProxy::start(dir.path(), config).await;
    let device = pki.bootstrap.valid_client("dev-7");
    // Positive control: the device's certificate authenticates from 10.2.0.1.
    let answer = server
        .enroll("10.2.0.1", Some(&device.cert_pem), None, "dev-7")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    // Per address: throwaway certificates, each with a new subject, from 10.2.0.1.
    for i in 0..2 {
        let (cert, _) = throwaway_certificate(&format!("nobody-{i}"));
        let answer = server.enroll("10.2.0.1", Some(&cert), None, "x").await;
        assert_eq!(answer.status, 401, "{}", answer.text());
    }
    let (cert, _) = throwaway_certificate("nobody-3");
    let answer = server.enroll("10.2.0.1", Some(&cert), None, "x").await;
    limited(&answer, "failed authentications from this address");
    // The device's certificate, which authenticated before, is still served from there.
    let answer = server
        .enroll("10.2.0.1", Some(&device.cert_pem), None, "dev-7")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    // Per subject: forgeries of one name from many addresses.
    for i in 0..2 {
        let (cert, _) = throwaway_certificate("victim");
        let answer = server
            .enroll(&format!("10.3.0.{i}"), Some(&cert), None, "victim")
            .await;
        assert_eq!(answer.status, 401, "{}", answer.text());
    }
    let (cert, _) = throwaway_certificate("victim");
    let answer = server.enroll("10.3.0.9", Some(&cert), None, "victim").await;
    limited(&answer, "failed authentications for this identity");
    // Another device's first certificate, from a fresh address, is verified and served.
    let other = pki.bootstrap.valid_client("dev-8");
    let answer = server
        .enroll("10.3.0.10", Some(&other.cert_pem), None, "dev-8")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_name_enrolled_over_and_over_and_server_keys_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let mut config = standard_config(&pki);
    config.limits.enroll_per_name = 0.25;
    config.limits.enroll_burst_per_name = 2.0;
    config.limits.keygen_per_identity = 0.25;
    config.limits.keygen_burst_per_identity = 2.0;
    let server = TestServer::start(dir.path(), &config).await;
    let client = EstClient::new(server.addr, &pki.root.cert_pem, None);
    let password = [basic(USER, PASSWORD)];
    for _ in 0..2 {
        let answer = enroll(&client, &password, "same-name").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let answer = enroll(&client, &password, "same-name").await;
    limited(&answer, "certificates for this name");
    // Another name of the same identity: served.
    let answer = enroll(&client, &password, "other-name").await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let keygen = |cn: String| {
        let client = client.clone();
        async move {
            let mut headers = vec![("content-type", "application/pkcs10".to_owned())];
            headers.push(basic(USER, PASSWORD));
            client
                .request("POST", "serverkeygen", &headers, iot_edge_body(&csr(&cn)))
                .await
        }
    };
    for i in 0..2 {
        let answer = keygen(format!("k-{i}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let answer = keygen("k-2".to_owned()).await;
    limited(&answer, "server-generated keys for this identity");
    let answer = enroll(&client, &password, "k-2").await;
    assert_eq!(
        answer.status,
        200,
        "simpleenroll is not held back: {}",
        answer.text()
    );
    server.stop().await;
}
