//! A forwarding label in front of a misbehaving upstream (tests/common/upstream_stub.rs, a
//! real TLS listener): each kind of upstream answer reaches the child as the README says
//! ("Failures map to what a child can act on"), nothing unanswerable is journaled, and an
//! answer for another key than the child's is never handed out. Every refusal has its
//! positive control: the same stub signing properly.

mod common;

use std::time::{Duration, Instant};

use common::client::{basic, certs_from_answer, iot_edge_body, Answer, EstClient};
use common::upstream_stub::{Behaviour, UpstreamStub};
use common::{Pki, TestServer, PASSWORD, USER};
use edge_est::issue::health::State;
use edge_est::runtime::Runtime;
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};

/// A registration authority of the rig's labels (a lower layer; HTTP Basic, `PASSWORD`).
const LOWER: &str = "lower";

struct Rig {
    dir: tempfile::TempDir,
    stub: UpstreamStub,
    server: TestServer,
    root: String,
    config: edge_est::config::Config,
}

/// The stub (starting with `behaviour`), and an edge-est whose unlabeled path forwards to it
/// and whose label `auto` forwards, or signs here while the stub cannot be reached.
async fn rig(behaviour: Behaviour, request_timeout_secs: u64) -> Rig {
    rig_with(behaviour, request_timeout_secs, "").await
}

/// [`rig`], with more lines for the `[upstreams.parent]` table.
async fn rig_with(behaviour: Behaviour, request_timeout_secs: u64, upstream_extra: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let stub = UpstreamStub::start(dir.path(), behaviour).await;
    let text = format!(
        r#"
listen = "127.0.0.1:0"
journal = "journal.jsonl"

[tls]
certificate = "server.pem"
key = "server.key"

[users]
estuser = "{hash}"
lower = "{hash}"

[issuers.plant]
certificate = "issuing-ca.pem"
key = "issuing-ca.key"

{upstream}

[[labels]]
mode = "forward"
upstream = "parent"
client_trust = ["issuer"]

[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]

[[labels.rules]]
match = ["user:lower"]
common_names = ["*"]
registration_authority = true

[[labels]]
name = "auto"
mode = "auto"
issuer = "plant"
upstream = "parent"
client_trust = ["issuer"]

[labels.fallback]
common_names = ["device*"]

[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]

[[labels.rules]]
match = ["user:lower"]
common_names = ["*"]
registration_authority = true
"#,
        hash = pki.password_hash,
        upstream = stub.upstream_toml("parent", request_timeout_secs) + upstream_extra,
    );
    let config = toml::from_str(&text).unwrap();
    let server = TestServer::start(dir.path(), &config).await;
    let root = std::fs::read_to_string(dir.path().join("root.pem")).unwrap();
    Rig {
        dir,
        stub,
        server,
        root,
        config,
    }
}

impl Rig {
    async fn enroll_at(&self, path: &str, key: &KeyPair, cn: &str) -> Answer {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        let csr = params.serialize_request(key).unwrap().der().to_vec();
        EstClient::new(self.server.addr, &self.root, None)
            .request(
                "POST",
                path,
                &[
                    ("content-type", "application/pkcs10".to_owned()),
                    basic(USER, PASSWORD),
                ],
                iot_edge_body(&csr),
            )
            .await
    }

    async fn enroll(&self, cn: &str) -> Answer {
        self.enroll_at("simpleenroll", &KeyPair::generate().unwrap(), cn)
            .await
    }

    /// The positive control: the stub signs, the child gets its certificate for its key.
    async fn control(&self) {
        self.stub.set(Behaviour::Sign);
        let key = KeyPair::generate().unwrap();
        let answer = self.enroll_at("simpleenroll", &key, "control").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let leaf = certs_from_answer(&answer.body).remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        assert_eq!(cert.public_key().raw, key.subject_public_key_info());
        let journal = self.server.journal();
        assert_eq!(journal.last().unwrap().subject, "CN=control");
        assert_eq!(journal.last().unwrap().issued_by, "upstream parent");
    }

    fn journaled(&self) -> usize {
        self.server.journal().len()
    }

    /// An enrollment at `path` by `user` claiming `budget_ms` in the budget header (as a
    /// lower layer sends it; any client can): [`LOWER`] is a registration authority here,
    /// `USER` a device.
    async fn enroll_within(&self, user: &str, path: &str, budget_ms: &str, cn: &str) -> Answer {
        EstClient::new(self.server.addr, &self.root, None)
            .request(
                "POST",
                path,
                &[
                    ("content-type", "application/pkcs10".to_owned()),
                    ("edge-est-budget-ms", budget_ms.to_owned()),
                    basic(user, PASSWORD),
                ],
                iot_edge_body(&common::csr(cn)),
            )
            .await
    }

    /// The health of the upstream, as the running configuration holds it.
    fn upstream_state(&self) -> State {
        self.server
            .app
            .runtime()
            .labels()
            .find_map(|l| l.upstream.clone())
            .unwrap()
            .health
            .state()
    }
}

fn assert_text(answer: &Answer, status: u16, needle: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert!(
        answer.text().contains(needle),
        "{:?} lacks {needle:?}",
        answer.text()
    );
    assert!(
        answer
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        answer.header("content-type")
    );
}

#[tokio::test]
async fn an_answer_for_another_key_is_a_502_and_never_handed_out() {
    let rig = rig(Behaviour::AnotherKey, 10).await;
    let answer = rig.enroll("device1").await;
    assert_text(&answer, 502, "not for the requested key");
    assert!(!answer.text().contains("BEGIN CERTIFICATE"));
    assert_eq!(rig.stub.enrollments(), 1);
    assert_eq!(rig.journaled(), 0, "nothing journaled for a refused answer");
    rig.control().await;
    assert_eq!(rig.journaled(), 1);
}

#[tokio::test]
async fn pending_202_reaches_the_child_with_its_retry_after() {
    let rig = rig(Behaviour::Pending("42"), 10).await;
    let answer = rig.enroll("device1").await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    assert_eq!(answer.header("retry-after"), Some("42"));
    assert!(
        answer.text().contains("ask again later"),
        "{}",
        answer.text()
    );
    assert!(answer.text().contains("layer above"), "{}", answer.text());
    assert_eq!(rig.journaled(), 0);
    rig.control().await;
}

#[tokio::test]
async fn upstream_503_reaches_the_child_as_503_with_its_retry_after() {
    let rig = rig(Behaviour::Status(503, "busy up here", Some("33")), 10).await;
    let answer = rig.enroll("device1").await;
    assert_text(&answer, 503, "busy up here");
    assert_eq!(answer.header("retry-after"), Some("33"));
    assert_eq!(rig.journaled(), 0);
    rig.control().await;
}

#[tokio::test]
async fn upstream_502_and_500_are_a_502_naming_the_layer_above() {
    let rig = rig(
        Behaviour::Status(502, "the layer above is broken", None),
        10,
    )
    .await;
    let answer = rig.enroll("device1").await;
    assert_text(&answer, 502, "is unavailable (502 Bad Gateway)");
    assert!(
        answer.text().starts_with("the layer above (localhost:"),
        "{}",
        answer.text()
    );
    // The upper layer's own text stays in this layer's log.
    assert!(!answer.text().contains("broken"), "{}", answer.text());
    rig.stub.set(Behaviour::Status(500, "oops", None));
    let answer = rig.enroll("device2").await;
    assert_text(&answer, 502, "is unavailable (500 Internal Server Error)");
    assert!(!answer.text().contains("oops"), "{}", answer.text());
    assert_eq!(rig.journaled(), 0);
    rig.control().await;
}

#[tokio::test]
async fn an_upstream_refusal_keeps_its_status_with_a_neutral_reason() {
    let rig = rig(
        Behaviour::Status(403, "CN device1 is not allowed up here", None),
        10,
    )
    .await;
    let answer = rig.enroll("device1").await;
    assert_text(
        &answer,
        403,
        "refused by the layer above (403 Forbidden); this layer's log has its reason",
    );
    // The upper layer's reason names this layer's RA and its rules: never relayed.
    assert!(!answer.text().contains("not allowed"), "{}", answer.text());
    assert_eq!(rig.journaled(), 0);
    rig.control().await;
}

#[tokio::test]
async fn malformed_answers_are_502_and_say_what_was_wrong() {
    let rig = rig(Behaviour::Malformed("text/html", b"<html>hello</html>"), 10).await;
    let cases: [(Behaviour, &str); 4] = [
        (
            Behaviour::Malformed("text/html", b"<html>hello</html>"),
            "Content-Type",
        ),
        (
            Behaviour::Malformed("application/pkcs7-mime", b"!!! not base64 !!!"),
            "malformed",
        ),
        (
            Behaviour::Malformed("application/pkcs7-mime", b"aGVsbG8gd29ybGQ="),
            "malformed",
        ),
        (Behaviour::NoCertificate, "malformed"),
    ];
    for (i, (behaviour, needle)) in cases.into_iter().enumerate() {
        rig.stub.set(behaviour.clone());
        let answer = rig.enroll(&format!("device{i}")).await;
        assert_text(&answer, 502, needle);
        assert!(
            answer
                .text()
                .contains("the answer of the layer above is malformed"),
            "{behaviour:?}: {}",
            answer.text()
        );
    }
    assert_eq!(rig.journaled(), 0);
    rig.control().await;
}

#[tokio::test]
async fn a_slow_upstream_is_a_503_with_our_retry_after_within_the_request_timeout() {
    let rig = rig(Behaviour::Never, 2).await;
    let started = Instant::now();
    let answer = rig.enroll("device1").await;
    let took = started.elapsed();
    assert_text(&answer, 503, "did not answer within 2000 ms");
    assert_eq!(answer.header("retry-after"), Some("17"));
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    // Slow, but within the timeout: served once the background probe has found the layer
    // above back (until then it is away, and says so at once).
    rig.stub.set(Behaviour::Slow(Duration::from_millis(700)));
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = rig.enroll("device2").await;
        if answer.status == 200 {
            break;
        }
        assert_text(&answer, 503, "cannot be reached: away since");
        assert!(Instant::now() < until, "still away after 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rig.journaled(), 1);
    rig.control().await;
}

#[tokio::test]
async fn auto_never_overrides_an_upstream_refusal_with_a_local_signature() {
    let rig = rig(Behaviour::Status(403, "not up here", None), 10).await;
    let answer = rig
        .enroll_at(
            "auto/simpleenroll",
            &KeyPair::generate().unwrap(),
            "device1",
        )
        .await;
    assert_text(&answer, 403, "refused by the layer above (403 Forbidden)");
    assert_eq!(rig.journaled(), 0, "not signed locally");
    // Nor a malformed answer, nor one for another key.
    rig.stub.set(Behaviour::AnotherKey);
    let answer = rig
        .enroll_at(
            "auto/simpleenroll",
            &KeyPair::generate().unwrap(),
            "device2",
        )
        .await;
    assert_text(&answer, 502, "not for the requested key");
    assert_eq!(rig.journaled(), 0, "not signed locally");
    // Control: the upstream gone (its port closed), auto signs here.
    let addr = rig.stub.addr;
    drop(rig.stub);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let answer = EstClient::new(rig.server.addr, &rig.root, None)
        .request(
            "POST",
            "auto/simpleenroll",
            &[
                ("content-type", "application/pkcs10".to_owned()),
                basic(USER, PASSWORD),
            ],
            iot_edge_body(&common::csr("device3")),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let journal = rig.server.journal();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].issued_by, "local");
}

/// A budget too short to ask the layer above (a lower layer's `edge-est-budget-ms`): 503 at
/// once, the layer above neither asked nor taken for away. Were it
/// asked with no time, the timeout would mark it away, and one child could make this layer
/// answer everyone 503 (forward) or sign locally in its stead (auto) at will. Positive
/// control: a budget that leaves time to ask is served from above.
#[tokio::test]
async fn a_budget_too_short_to_ask_never_marks_the_layer_above_away() {
    let rig = rig(Behaviour::Sign, 10).await;
    rig.control().await;
    assert_eq!(rig.upstream_state(), State::Up);
    let asked = rig.stub.enrollments();
    for (i, budget) in ["0", "1", "200"].into_iter().enumerate() {
        let answer = rig
            .enroll_within(LOWER, "simpleenroll", budget, &format!("device{i}"))
            .await;
        assert_text(&answer, 503, "did not answer within 0 ms");
        assert_eq!(rig.stub.enrollments(), asked, "budget {budget}: asked");
        assert_eq!(rig.upstream_state(), State::Up, "budget {budget}");
    }
    assert_eq!(rig.journaled(), 1);
    let answer = rig
        .enroll_within(LOWER, "simpleenroll", "5000", "device9")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(rig.stub.enrollments(), asked + 1);
    assert_eq!(
        rig.server.journal().last().unwrap().issued_by,
        "upstream parent"
    );
}

/// A device cannot shorten its own deadline: its `edge-est-budget-ms` is ignored, only a
/// registration authority's (a lower layer's) is believed. Otherwise a device on an `auto`
/// label could claim a budget long enough to ask the layer above and too short for its
/// answer, and get a local signature for what the layer above may refuse. Positive control:
/// the same claim from a lower layer holds (the layer above is cut off at the budget and the
/// `auto` label signs locally, within its fallback allowance).
#[tokio::test]
async fn a_device_cannot_claim_a_budget_that_makes_auto_sign_locally() {
    let rig = rig(Behaviour::Slow(Duration::from_millis(700)), 10).await;
    for (path, cn) in [
        ("auto/simpleenroll", "device1"),
        ("simpleenroll", "device2"),
    ] {
        let answer = rig.enroll_within(USER, path, "600", cn).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        let journal = rig.server.journal();
        let last = journal.last().unwrap();
        assert_eq!(
            (last.subject.as_str(), last.issued_by.as_str()),
            (&*format!("CN={cn}"), "upstream parent"),
            "{path}"
        );
    }
    let answer = rig
        .enroll_within(LOWER, "auto/simpleenroll", "600", "device3")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let journal = rig.server.journal();
    let last = journal.last().unwrap();
    assert_eq!(
        (last.subject.as_str(), last.issued_by.as_str()),
        ("CN=device3", "local")
    );
}

/// A device's budget claim on an anonymous `/cacerts` is ignored too: claiming 600 ms before a
/// layer above that answers `/cacerts` in 700 ms, it would make this layer cut the refresh off
/// at 100 ms and take the layer above for away (and an `auto` label sign locally for everyone
/// until the next probe). Control: the layer above is up and was asked within the default.
#[tokio::test]
async fn a_device_cannot_claim_a_budget_that_takes_the_layer_above_for_away() {
    let rig = rig_with(
        Behaviour::SlowCacerts(Duration::from_millis(700)),
        10,
        "cacerts_ttl_secs = 0\n",
    )
    .await;
    let client = EstClient::new(rig.server.addr, &rig.root, None);
    for path in ["auto/cacerts", "cacerts"] {
        let answer = client
            .request(
                "GET",
                path,
                &[("edge-est-budget-ms", "600".to_owned())],
                Vec::new(),
            )
            .await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        assert_eq!(rig.upstream_state(), State::Up, "{path}");
    }
}

/// The health of `server`'s upstream (its only one).
fn state_of(server: &TestServer) -> State {
    server
        .app
        .runtime()
        .labels()
        .find_map(|l| l.upstream.clone())
        .unwrap()
        .health
        .state()
}

/// At start, an `auto` label asks the layer above for its chain at once (so that it knows
/// it before its first enrollment, and can sign in its stead if it goes away); a `forward`
/// label does not contact it before a request needs it (reachability is claimed only after
/// contact). Bounded: the `auto` layer must see the stub up within 15 s.
#[tokio::test]
async fn at_start_an_auto_label_learns_the_chain_above_and_a_forward_label_waits() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate_p256(dir.path());
    let stub = UpstreamStub::start(dir.path(), Behaviour::Sign).await;
    let config = |mode: &str| -> edge_est::config::Config {
        let text = format!(
            r#"
listen = "127.0.0.1:0"
journal = "{mode}/journal.jsonl"
[tls]
certificate = "server.pem"
key = "server.key"
[users]
estuser = "{hash}"
[issuers.plant]
certificate = "issuing-ca.pem"
key = "issuing-ca.key"
{upstream}
[[labels]]
name = "{mode}"
mode = "{mode}"
upstream = "parent"
{local}
[[labels.rules]]
match = ["user:estuser"]
common_names = ["*"]
"#,
            hash = pki.password_hash,
            upstream = stub.upstream_toml("parent", 10),
            local = if mode == "auto" {
                "issuer = \"plant\"\n[labels.fallback]\ncommon_names = [\"device*\"]"
            } else {
                ""
            },
        );
        toml::from_str(&text).unwrap()
    };
    let forward = TestServer::start(dir.path(), &config("forward")).await;
    let auto = TestServer::start(dir.path(), &config("auto")).await;
    let started = Instant::now();
    while state_of(&auto) != State::Up {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the auto label never asked the layer above"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time enough for a contact at start to have shown (the auto layer's took less).
    tokio::time::sleep(started.elapsed() + Duration::from_millis(500)).await;
    assert_eq!(state_of(&forward), State::Unknown);
    // Control: the forward label's first request contacts it.
    let answer = EstClient::new(
        forward.addr,
        &std::fs::read_to_string(dir.path().join("root.pem")).unwrap(),
        None,
    )
    .request(
        "POST",
        "forward/simpleenroll",
        &[
            ("content-type", "application/pkcs10".to_owned()),
            basic(USER, PASSWORD),
        ],
        iot_edge_body(&common::csr("device1")),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(state_of(&forward), State::Up);
}

/// A reconfiguration keeps what this layer knows of an upstream whose configuration did not
/// change (its state is not asked again: `up` stays `up`, an outage stays known), and
/// forgets it for one that changed.
#[tokio::test]
async fn a_reconfiguration_keeps_the_health_of_an_unchanged_upstream() {
    let rig = rig(Behaviour::Sign, 10).await;
    rig.control().await;
    assert_eq!(rig.upstream_state(), State::Up);
    let same = || Runtime::build(&rig.config, rig.dir.path()).unwrap();
    rig.server.app.swap(same());
    assert_eq!(rig.upstream_state(), State::Up, "after a reconfiguration");
    let current = rig.server.app.runtime();
    assert!(rig.server.app.swap_if(&current, same()));
    assert_eq!(rig.upstream_state(), State::Up, "after a conditional one");
    // Another upstream configuration: not the same upstream, nothing is carried over.
    let mut changed = rig.config.clone();
    changed
        .upstreams
        .get_mut("parent")
        .unwrap()
        .retry_after_secs = 18;
    rig.server
        .app
        .swap(Runtime::build(&changed, rig.dir.path()).unwrap());
    assert_eq!(rig.upstream_state(), State::Unknown);
}

/// Past the stale bound of its cached chain, a `forward` label does not vouch for the chain
/// above (its `/cacerts` is a 503 while the layer above is gone), where an `auto` label keeps
/// serving the chain it signs in the stead of, however old. Positive control: both served
/// while the layer above is up. (Both bounds 0 here: nothing is fresh, nothing stale is kept.)
#[tokio::test]
async fn past_its_stale_bound_only_an_auto_label_serves_the_chain_above() {
    let rig = rig_with(
        Behaviour::Sign,
        10,
        "cacerts_ttl_secs = 0\ncacerts_stale_secs = 0\n",
    )
    .await;
    let client = EstClient::new(rig.server.addr, &rig.root, None);
    for path in ["cacerts", "auto/cacerts"] {
        let answer = client.request("GET", path, &[], Vec::new()).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        assert!(!certs_from_answer(&answer.body).is_empty(), "{path}");
    }
    let addr = rig.stub.addr;
    drop(rig.stub);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let answer = client.request("GET", "cacerts", &[], Vec::new()).await;
    assert_text(&answer, 503, "cannot be reached");
    assert_eq!(answer.header("retry-after"), Some("17"));
    let answer = client.request("GET", "auto/cacerts", &[], Vec::new()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(!certs_from_answer(&answer.body).is_empty());
    // Still the same once the layer above is known to be away (answered at once).
    assert_eq!(state_of(&rig.server), State::Away);
    let answer = client.request("GET", "cacerts", &[], Vec::new()).await;
    assert_text(&answer, 503, "away since");
    let answer = client.request("GET", "auto/cacerts", &[], Vec::new()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}
