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
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};

struct Rig {
    _dir: tempfile::TempDir,
    stub: UpstreamStub,
    server: TestServer,
    root: String,
}

/// The stub (starting with `behaviour`), and an edge-est whose unlabeled path forwards to it
/// and whose label `auto` forwards, or signs here while the stub cannot be reached.
async fn rig(behaviour: Behaviour, request_timeout_secs: u64) -> Rig {
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
"#,
        hash = pki.password_hash,
        upstream = stub.upstream_toml("parent", request_timeout_secs),
    );
    let config = toml::from_str(&text).unwrap();
    let server = TestServer::start(dir.path(), &config).await;
    let root = std::fs::read_to_string(dir.path().join("root.pem")).unwrap();
    Rig {
        _dir: dir,
        stub,
        server,
        root,
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
