//! edge-est as an IoT Edge module against real protocol peers on loopback: mosquitto (TLS
//! from a test Edge CA) with a twin responder speaking edgeHub's twin topics, and a workload
//! API stand-in on a unix socket. The module is started in-process with an `IOTEDGE_*`
//! environment given as a map.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use common::client::{basic, certs_from_answer, iot_edge_body, Answer, EstClient};
use common::mqtt::{
    connack, free_port, served_certificate, ConnectCapture, Mosquitto, SasCheck, TwinResponder,
    CONNACK_NOT_AUTHORIZED, CONNACK_SERVER_UNAVAILABLE,
};
use common::workload::{raw_request, WorkloadStandIn};
use common::{csr, Pki, PASSWORD, USER};
use edge_est::edge::{self, EdgeEnv, ModuleHandle, ModuleOptions};
use rcgen::KeyPair;
use serde_json::{json, Value};

const DEVICE: &str = "gw1";
const MODULE: &str = "estmod";
const HUB: &str = "test-hub.example";
const GATEWAY: &str = "localhost";

/// The MQTT user name edgeHub expects, written out from its parser's rules
/// (`{host}/{device}/{module}/?api-version=…&DeviceClientType=<url-escaped product>`), not
/// computed by the code under test.
fn module_username() -> String {
    format!(
        "localhost/gw1/estmod/?api-version=2020-09-30&DeviceClientType=edge-est%2F{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// mosquitto (`port`: the twin responder connects there) behind the SAS gate (`module_port`:
/// the module's way in, checked as edgeHub checks it).
struct EdgeHub {
    port: u16,
    module_port: u16,
    mosquitto: Mosquitto,
    gate: ConnectCapture,
}

impl EdgeHub {
    fn log_text(&self) -> String {
        self.mosquitto.log_text()
    }
}

/// Everything a module test runs against.
struct Rig {
    dir: tempfile::TempDir,
    pki: Pki,
    workload: WorkloadStandIn,
    broker_cert: (String, String),
    mosquitto: std::path::PathBuf,
}

impl Rig {
    /// `None` when mosquitto is absent (and not in CI).
    async fn new() -> Option<Rig> {
        let mosquitto = common::mqtt::mosquitto()?;
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate_p256(dir.path());
        let workload = WorkloadStandIn::start(dir.path(), MODULE, &pki.root).await;
        let broker_cert = workload.issue_server(GATEWAY, Duration::from_secs(86_400));
        Some(Rig {
            dir,
            pki,
            workload,
            broker_cert,
            mosquitto,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// mosquitto alone on `port` (the twin responder's side; modules come in through a gate).
    fn mosquitto(&self, port: u16) -> Mosquitto {
        Mosquitto::start(
            &self.mosquitto,
            self.path(),
            port,
            &self.broker_cert,
            &module_username(),
        )
    }

    /// What edgeHub checks of this module's CONNECT.
    fn sas(&self) -> SasCheck {
        SasCheck {
            hub: HUB.into(),
            gateway: GATEWAY.into(),
            device: DEVICE.into(),
            module: MODULE.into(),
            key: self.workload.state.key.clone(),
        }
    }

    /// The SAS gate in front of the broker on `broker_port`.
    async fn gate(&self, broker_port: u16) -> ConnectCapture {
        ConnectCapture::start(
            broker_port,
            &self.broker_cert,
            &self.workload.state.trust_bundle,
            self.sas(),
        )
        .await
    }

    /// edgeHub's stand-in: mosquitto on `port`, modules through the SAS gate.
    async fn broker(&self, port: u16) -> EdgeHub {
        let mosquitto = self.mosquitto(port);
        let gate = self.gate(port).await;
        EdgeHub {
            port,
            module_port: gate.port,
            mosquitto,
            gate,
        }
    }

    async fn twin(&self, port: u16, desired: Value) -> TwinResponder {
        TwinResponder::start(port, &self.workload.state.trust_bundle, desired).await
    }

    fn env(&self, mqtt_port: u16) -> EdgeEnv {
        let data = self.path().join("data");
        let vars: HashMap<&str, String> = HashMap::from([
            ("IOTEDGE_WORKLOADURI", self.workload.uri()),
            ("IOTEDGE_DEVICEID", DEVICE.into()),
            ("IOTEDGE_MODULEID", MODULE.into()),
            ("IOTEDGE_IOTHUBHOSTNAME", HUB.into()),
            ("IOTEDGE_AUTHSCHEME", "sasToken".into()),
            ("IOTEDGE_MODULEGENERATIONID", "gen-1".into()),
            ("IOTEDGE_GATEWAYHOSTNAME", GATEWAY.into()),
            ("EDGE_EST_MQTT_PORT", mqtt_port.to_string()),
            ("EDGE_EST_DATA_DIR", data.display().to_string()),
        ]);
        EdgeEnv::from_vars(|k| vars.get(k).cloned()).unwrap()
    }

    /// A desired configuration: the test PKI's issuing CA (files on the "mounted volume")
    /// signs for the Basic user when the CN matches one of `allowed`.
    fn desired(&self, allowed: &[&str]) -> Value {
        json!({
            "listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "users": { USER: self.pki.password_hash },
            "issuers": { "plant": {
                "certificate": self.path().join("issuing-ca.pem"),
                "key": self.path().join("issuing-ca.key"),
            } },
            "labels": [ self.label(allowed) ],
        })
    }

    fn label(&self, allowed: &[&str]) -> Value {
        json!({
            "issuer": "plant",
            "client_trust": ["issuer"],
            "rules": [ { "match": [format!("user:{USER}")], "common_names": allowed } ],
        })
    }

    fn root(&self) -> String {
        std::fs::read_to_string(self.path().join("root.pem")).unwrap()
    }

    fn client(&self, addr: SocketAddr) -> EstClient {
        EstClient::new(addr, &self.root(), None)
    }
}

fn options() -> ModuleOptions {
    ModuleOptions {
        report_interval: Duration::from_millis(500),
        backoff_max: Duration::from_secs(2),
        ..ModuleOptions::default()
    }
}

fn enroll_headers() -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/pkcs10".to_owned()),
        basic(USER, PASSWORD),
    ]
}

async fn enroll(client: &EstClient, cn: &str) -> Answer {
    client
        .request(
            "POST",
            "simpleenroll",
            &enroll_headers(),
            iot_edge_body(&csr(cn)),
        )
        .await
}

async fn started(env: EdgeEnv) -> (ModuleHandle, SocketAddr) {
    let mut module = edge::start(env, options()).await.expect("module starts");
    let addr = module
        .serving(Duration::from_secs(30))
        .await
        .expect("the module serves EST");
    (module, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_twin_configures_the_module_live() {
    let Some(rig) = Rig::new().await else { return };
    let broker = rig.broker(free_port()).await;
    let twin = rig.twin(broker.port, rig.desired(&["allowed-*"])).await;
    // The module reaches the broker through the gate, which records its CONNECT.
    let capture = &broker.gate;
    let (module, addr) = started(rig.env(broker.module_port)).await;

    let reported = twin
        .wait_reported("configVersion 1", |r| r["configVersion"] == 1)
        .await;
    assert_eq!(reported["status"], "running", "{reported:#}");
    assert_eq!(reported["configSource"], "twin");
    let plant = &reported["labels"]["(unlabeled)"];
    assert_eq!(plant["mode"], "sign");
    assert_eq!(plant["issuer"]["subject"], "CN=edge-est test issuing CA");
    assert!(plant["issuer"]["notAfter"].is_string());
    assert!(reported["serverCertificate"]["notAfter"].is_string());

    // Enrollments follow the twin's policy.
    let child = rig.client(addr);
    let answer = enroll(&child, "allowed-1").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(enroll(&child, "later-1").await.status, 403);

    // A keep-alive connection opened before the patch.
    let mut kept = child.connect().await;
    let before = EstClient::send(
        &mut kept,
        addr,
        "POST",
        "simpleenroll",
        &enroll_headers(),
        iot_edge_body(&csr("later-2")),
    )
    .await;
    assert_eq!(before.status, 403, "{}", before.text());

    // A desired patch changes the policy live.
    let v2 = twin
        .patch_desired(json!({ "labels": [ rig.label(&["allowed-*", "later-*"]) ] }))
        .await;
    twin.wait_reported("configVersion 2", |r| r["configVersion"] == v2)
        .await;
    let after = EstClient::send(
        &mut kept,
        addr,
        "POST",
        "simpleenroll",
        &enroll_headers(),
        iot_edge_body(&csr("later-2")),
    )
    .await;
    assert_eq!(
        after.status,
        200,
        "the kept connection serves the new policy: {}",
        after.text()
    );
    assert_eq!(enroll(&child, "later-3").await.status, 200);
    assert_eq!(module.addr(), Some(addr), "no restart, same listener");

    // An invalid configuration is refused whole, with its reason; the old one keeps serving.
    let mut broken = rig.label(&["*"]);
    broken["issuer"] = json!("nope");
    let v3 = twin.patch_desired(json!({ "labels": [broken] })).await;
    let reported = twin
        .wait_reported("the rejection of version 3", |r| {
            r["lastRejection"]["version"] == v3
        })
        .await;
    let reason = reported["lastRejection"]["reason"].as_str().unwrap();
    assert!(reason.contains("no issuer named \"nope\""), "{reason}");
    assert_eq!(reported["status"], "running-previous-configuration");
    assert_eq!(reported["configVersion"], v2);
    assert_eq!(enroll(&child, "later-4").await.status, 200);
    assert_eq!(enroll(&child, "anything-else").await.status, 403);
    let kept_again = EstClient::send(
        &mut kept,
        addr,
        "POST",
        "simpleenroll",
        &enroll_headers(),
        iot_edge_body(&csr("later-5")),
    )
    .await;
    assert_eq!(kept_again.status, 200);

    // Secrets are refused: a plaintext password, then a private key.
    let v4 = twin
        .patch_desired(json!({ "labels": [ rig.label(&["allowed-*", "later-*", "v4-*"]) ],
            "upstreams": { "top": { "url": "https://top.example/.well-known/est", "trust": ["root.pem"], "username": "me", "password": "hunter2" } } }))
        .await;
    let reported = twin
        .wait_reported("the rejection of version 4", |r| {
            r["lastRejection"]["version"] == v4
        })
        .await;
    let reason = reported["lastRejection"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("upstreams.top.password:"), "{reason}");
    assert!(!reported.to_string().contains("hunter2"));
    let v5 = twin.patch_desired(json!({ "upstreams": null })).await;
    let reported = twin
        .wait_reported("configVersion 5", |r| r["configVersion"] == v5)
        .await;
    assert!(
        reported["lastRejection"].is_null(),
        "an accepted document clears the refusal of an earlier one: {reported:#}"
    );
    assert_eq!(reported["status"], "running");
    assert_eq!(enroll(&child, "v4-1").await.status, 200);

    let key = KeyPair::generate().unwrap().serialize_pem();
    let v6 = twin
        .patch_desired(
            json!({ "tls": { "certificate": rig.path().join("server.pem"), "key": key } }),
        )
        .await;
    let reported = twin
        .wait_reported("the rejection of version 6", |r| {
            r["lastRejection"]["version"] == v6
        })
        .await;
    let reason = reported["lastRejection"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("tls.key:") && reason.contains("private key"),
        "{reason}"
    );
    assert!(!reported.to_string().contains("PRIVATE KEY"));
    let v7 = twin.patch_desired(json!({ "tls": null })).await;
    let reported = twin
        .wait_reported("configVersion 7", |r| r["configVersion"] == v7)
        .await;
    assert_eq!(reported["status"], "running");

    // The listener moves with the twin: the new address serves, the old one is closed (its
    // connection threads have stopped accepting).
    let v8 = twin.patch_desired(json!({ "listen": "127.0.0.2:0" })).await;
    twin.wait_reported("configVersion 8", |r| r["configVersion"] == v8)
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let moved = loop {
        match module.addr() {
            Some(new) if new != addr => break new,
            _ if std::time::Instant::now() > deadline => panic!("the listener did not move"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert_eq!(moved.ip(), std::net::IpAddr::from([127, 0, 0, 2]));
    assert_eq!(enroll(&rig.client(moved), "v4-2").await.status, 200);
    let mut closed = false;
    while !closed && std::time::Instant::now() < deadline {
        closed = tokio::net::TcpStream::connect(addr).await.is_err();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the old address {addr} still accepts connections");
    // `edge-est health` (the container's HEALTHCHECK) follows the listener through the record
    // the module keeps on its data directory.
    let health = tokio::process::Command::new(env!("CARGO_BIN_EXE_edge-est"))
        .arg("health")
        .env("EDGE_EST_DATA_DIR", rig.path().join("data"))
        .output()
        .await
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    assert!(
        String::from_utf8_lossy(&health.stdout).contains(&moved.to_string()),
        "{}",
        String::from_utf8_lossy(&health.stdout)
    );

    // Counters arrive, throttled.
    let reported = twin
        .wait_reported("counters", |r| {
            r["counters"]["issued"].as_u64() >= Some(5)
                && r["counters"]["refused"].as_u64() >= Some(3)
        })
        .await;
    assert_eq!(reported["counters"]["forwarded"], 0);

    // The CONNECT: client id, user name and a SAS token whose HMAC verifies with the key the
    // workload API holds.
    let connects = capture.connects();
    assert!(!connects.is_empty());
    let connect = &connects[0];
    assert_eq!(connect.client_id, "gw1/estmod");
    assert_eq!(
        connect.username.as_deref(),
        Some(
            format!(
                "localhost/gw1/estmod/?api-version=2020-09-30&DeviceClientType=edge-est%2F{}",
                env!("CARGO_PKG_VERSION")
            )
            .as_str()
        )
    );
    let token = connect.password.as_deref().expect("a password");
    let parsed = edge::sas::parse_token(token).expect("SharedAccessSignature sr=…&sig=…&se=…");
    assert_eq!(
        parsed.sr,
        "test-hub.example%2Fdevices%2Fgw1%2Fmodules%2Festmod"
    );
    assert!(!token.contains("skn="));
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
    assert!(
        (now + 3000..=now + 3700).contains(&parsed.se),
        "se {} now {now}",
        parsed.se
    );
    let sig = percent_encoding::percent_decode_str(&parsed.sig)
        .decode_utf8()
        .unwrap();
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig.as_bytes())
        .unwrap();
    let expected = rig
        .workload
        .hmac(format!("{}\n{}", parsed.sr, parsed.se).as_bytes());
    assert_eq!(sig, expected, "the SAS signature verifies");

    // The broker saw the same identity, and let exactly that user name use the twin topics.
    let log = broker.log_text();
    assert!(log.contains("as gw1/estmod"), "{log}");
    assert!(log.contains(&format!("u'{}'", module_username())), "{log}");

    // What the workload API was asked: api-version everywhere, JSON bodies, the sign shape.
    let requests = rig.workload.requests();
    assert!(requests
        .iter()
        .all(|r| r.query.as_deref() == Some("api-version=2019-01-30")));
    assert!(requests.iter().all(|r| r.status < 300), "{requests:?}");
    let sign = requests
        .iter()
        .find(|r| r.path == "/modules/estmod/genid/gen-1/sign")
        .expect("a sign request");
    assert_eq!(sign.method, "POST");
    assert_eq!(sign.content_type.as_deref(), Some("application/json"));
    let body: Value = serde_json::from_slice(&sign.body).unwrap();
    assert_eq!(body["keyId"], "primary");
    assert_eq!(body["algo"], "HMACSHA256");
    let data = base64::engine::general_purpose::STANDARD
        .decode(body["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(data).unwrap(),
        format!("{}\n{}", parsed.sr, parsed.se)
    );
    let server = requests
        .iter()
        .find(|r| r.path == "/modules/estmod/genid/gen-1/certificate/server")
        .expect("a server certificate request");
    let body: Value = serde_json::from_slice(&server.body).unwrap();
    assert_eq!(body["commonName"], GATEWAY);
    assert!(requests
        .iter()
        .any(|r| r.method == "GET" && r.path == "/trust-bundle"));
    // The stand-in itself holds the daemon's api-version rule.
    let (status, text) = raw_request(&rig.workload.socket, "GET", "/trust-bundle").await;
    assert_eq!(
        (status, text.as_str()),
        (400, r#"{"message":"api-version not specified"}"#)
    );

    // Keys written for the TLS listener are private to the module.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = rig.path().join("data/workload/server.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    module.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expiring_server_certificate_is_renewed_and_served() {
    let Some(rig) = Rig::new().await else { return };
    // Ten-second certificates: renewed at 80 %, about every eight seconds.
    rig.workload.set_server_lifetime(Duration::from_secs(10));
    let broker = rig.broker(free_port()).await;
    let twin = rig.twin(broker.port, rig.desired(&["renew-*"])).await;
    let env = rig.env(broker.module_port);
    let mut module = edge::start(
        env,
        ModuleOptions {
            // Short SAS tokens too: the module reconnects before they expire, re-GETs the twin.
            sas_ttl: Duration::from_secs(6),
            ..options()
        },
    )
    .await
    .unwrap();
    let addr = module.serving(Duration::from_secs(30)).await.unwrap();
    twin.wait_reported("configVersion 1", |r| r["configVersion"] == 1)
        .await;
    let root = rig.root();
    let first = served_certificate(addr, GATEWAY, &root).await;
    let first_not_after = not_after(&first);
    let child = rig.client(addr);
    let mut kept = child.connect().await;
    let answer = EstClient::send(&mut kept, addr, "GET", "cacerts", &[], Vec::new()).await;
    assert_eq!(answer.status, 200);

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let renewed = loop {
        let served = served_certificate(addr, GATEWAY, &root).await;
        if served != first {
            break served;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server certificate was never renewed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(not_after(&renewed) > first_not_after);
    // Connections opened before the renewal are still served, and the new certificate works.
    let answer = EstClient::send(
        &mut kept,
        addr,
        "POST",
        "simpleenroll",
        &enroll_headers(),
        iot_edge_body(&csr("renew-1")),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let answer = enroll(&child, "renew-2").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(certs_from_answer(&answer.body).len(), 1);
    let server_requests = rig
        .workload
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/certificate/server"))
        .count();
    assert!(server_requests >= 2, "{server_requests}");
    let reported = twin
        .wait_reported("the renewed notAfter", |r| {
            r["serverCertificate"]["notAfter"].as_str().map(parse_time) >= Some(not_after(&renewed))
        })
        .await;
    assert_eq!(reported["status"], "running");

    // The token renewals reconnected (a new CONNECT each time) and got the twin again, each
    // time with a fresh token the SAS gate let in (expiry later than the last one's).
    assert!(twin.gets() >= 2, "twin GETs: {}", twin.gets());
    assert!(broker.log_text().matches("as gw1/estmod").count() >= 2);
    let connects = broker.gate.connects();
    assert!(connects.len() >= 2, "{connects:?}");
    assert!(connects.iter().all(|c| c.refused.is_none()), "{connects:?}");
    let expiries: Vec<u64> = connects
        .iter()
        .map(|c| {
            edge::sas::parse_token(c.password.as_deref().unwrap())
                .unwrap()
                .se
        })
        .collect();
    assert!(expiries.windows(2).all(|w| w[0] < w[1]), "{expiries:?}");
    module.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_with_the_broker_down_serves_the_last_known_good_configuration() {
    let Some(rig) = Rig::new().await else { return };
    let port = free_port();
    let broker = rig.mosquitto(port);
    // The gate stays; the broker behind it goes away and comes back.
    let gate = rig.gate(port).await;
    let twin = rig.twin(port, rig.desired(&["lkg-*"])).await;
    let (module, _) = started(rig.env(gate.port)).await;
    twin.wait_reported("configVersion 1", |r| r["configVersion"] == 1)
        .await;
    module.stop().await;
    drop(twin);
    drop(broker);

    // edgeHub is away: the module serves at once from what it accepted last.
    let started_at = std::time::Instant::now();
    let (module, addr) = started(rig.env(gate.port)).await;
    let child = rig.client(addr);
    let answer = enroll(&child, "lkg-1").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(started_at.elapsed() < Duration::from_secs(5));
    assert_eq!(enroll(&child, "caught-up-1").await.status, 403);
    let app = module.app().unwrap();
    assert_eq!(app.metrics().config_version(), 1);

    // edgeHub comes back with a newer desired configuration: the module catches up.
    let broker = rig.mosquitto(port);
    let mut desired = rig.desired(&["lkg-*", "caught-up-*"]);
    desired["$version"] = json!(2);
    let twin = rig.twin(port, desired).await;
    let reported = twin
        .wait_reported("configVersion 2", |r| r["configVersion"] == 2)
        .await;
    assert_eq!(reported["configSource"], "twin");
    // Same listen address in the new version: the same listener keeps serving.
    assert_eq!(module.addr(), Some(addr));
    assert_eq!(enroll(&child, "caught-up-1").await.status, 200);
    let saved: Value = serde_json::from_slice(
        &std::fs::read(rig.path().join("data").join(edge::lkg::FILE_NAME)).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["$version"], 2);
    module.stop().await;
    drop(broker);
}

fn not_after(der: &[u8]) -> time::OffsetDateTime {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.validity().not_after.to_datetime()
}

fn parse_time(text: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
}

/// The README's example of desired properties is a valid module configuration.
#[test]
fn the_readme_twin_example_is_valid() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```json\n\"estproxy\": {")
        .expect("the README shows the module's desired properties");
    let block = &readme[start + "```json\n\"estproxy\": ".len()..];
    let block = &block[..block.find("```").unwrap()];
    let manifest: Value = serde_json::from_str(block).expect("the example is JSON");
    // The placeholders stand for a real hash and a real certificate (a placeholder PEM is
    // refused, by the module as by check-config and check-manifest).
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::generate_p256(dir.path());
    let desired = manifest["properties.desired"]
        .to_string()
        .replace(
            "$argon2id$v=19$m=19456,t=2,p=1$...$...",
            &common::pki::password_hash(),
        )
        .replace(
            &serde_json::to_string(
                "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n",
            )
            .unwrap()[1..],
            &serde_json::to_string(&pki.bootstrap.cert_pem).unwrap()[1..],
        );
    assert!(!desired.contains("MIIB..."), "{desired}");
    let desired: Value = serde_json::from_str(&desired).unwrap();
    let config = edge::module_config(
        &desired,
        &edge::ModuleDefaults::placeholder(Some("gw0.contoso.local")),
    )
    .unwrap_or_else(|e| panic!("the README example is refused: {e}"));
    assert_eq!(config.labels.len(), 2);
    assert_eq!(
        config.upstreams["parent"].url,
        "https://gw0.contoso.local:8085/.well-known/est"
    );
}

/// On a nested device the module forwards to the parent's edge-est by default: on
/// `IOTEDGE_PARENTHOSTNAME` at `EDGE_EST_PARENT_PORT` (whatever our own listener), the trust
/// bundle as anchors, its workload identity certificate as its registration-authority
/// credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nested_module_forwards_to_its_parent_by_default() {
    let Some(rig) = Rig::new().await else { return };
    // The parent layer: a plain edge-est on 127.0.0.1 that accepts the module's identity
    // certificate (issued by the Edge CA) for `nested-*` names.
    std::fs::write(
        rig.path().join("edge-ca.pem"),
        &rig.workload.state.edge_ca.cert_pem,
    )
    .unwrap();
    let parent_config: edge_est::config::Config = toml::from_str(
        r#"
listen = "127.0.0.1:0"
journal = "parent-journal.jsonl"
[tls]
certificate = "server.pem"
key = "server.key"
[trust.edge]
certificates = ["edge-ca.pem"]
[issuers.plant]
certificate = "issuing-ca.pem"
key = "issuing-ca.key"
[[labels]]
issuer = "plant"
client_trust = ["edge"]
[labels.authentication]
basic = false
[[labels.rules]]
match = ["certificate:edge"]
client_cn = ["estmod"]
common_names = ["nested-*"]
"#,
    )
    .unwrap();
    let parent = common::TestServer::start(rig.path(), &parent_config).await;
    let port = parent.addr.port();

    let broker = rig.broker(free_port()).await;
    let desired = json!({
        "listen": "127.0.0.2:0",
        "metrics_listen": "127.0.0.2:0",
        "users": { USER: rig.pki.password_hash },
        "labels": [ {
            "mode": "forward",
            "upstream": "parent",
            "client_trust": ["issuer"],
            "rules": [ { "match": [format!("user:{USER}")], "common_names": ["nested-*", "other-*"] } ],
        } ],
    });
    let twin = rig.twin(broker.port, desired).await;
    let mut vars_env = rig.env(broker.module_port);
    vars_env.parent_hostname = Some("127.0.0.1".into());
    vars_env.parent_port = port;
    let (module, addr) = started(vars_env).await;
    assert_eq!(addr.ip(), std::net::IpAddr::from([127, 0, 0, 2]));
    twin.wait_reported("configVersion 1", |r| r["configVersion"] == 1)
        .await;

    let child = rig.client(addr);
    let answer = enroll(&child, "nested-1").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    // Refused by the parent's allowance for this RA (not by the module's own policy).
    let answer = enroll(&child, "other-1").await;
    assert_eq!(answer.status, 403, "{}", answer.text());

    let journal = parent.journal();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].identity, "certificate \"CN=estmod\" (edge)");
    let identity_requests = rig
        .workload
        .requests()
        .iter()
        .filter(|r| r.path == "/modules/estmod/certificate/identity")
        .count();
    assert_eq!(identity_requests, 1);
    let reported = twin
        .wait_reported("forwarded counter", |r| r["counters"]["forwarded"] == 1)
        .await;
    assert_eq!(reported["labels"]["(unlabeled)"]["mode"], "forward");
    assert_eq!(reported["upstreams"]["parent"]["reachable"], true);
    assert_eq!(reported["upstreams"]["parent"]["state"], "up");
    assert_eq!(
        reported["upstreams"]["parent"]["url"],
        format!("https://127.0.0.1:{port}/.well-known/est")
    );
    module.stop().await;
    parent.stop().await;
}

/// A SAS token for this rig's module as the IoT Edge SDKs make one, signed with the workload
/// stand-in's key (not by the code under test): `sr` module-scoped and URL-encoded, `sig`
/// the URL-encoded base64 HMAC over `sr`, a line feed and `se`.
fn sas_token(rig: &Rig, audience: &str, se: u64) -> String {
    let sr = percent_encoding::utf8_percent_encode(audience, percent_encoding::NON_ALPHANUMERIC)
        .to_string();
    let digest = rig.workload.hmac(format!("{sr}\n{se}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(digest);
    let sig = percent_encoding::utf8_percent_encode(&sig, percent_encoding::NON_ALPHANUMERIC);
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}")
}

/// The broker refuses what edgeHub refuses: a module's CONNECT is let in only with a SAS
/// token that verifies with the module's key, for its own audience, not expired (5 minutes of
/// skew), under its own client id and a user name with `api-version`; mosquitto itself takes
/// no anonymous client and no module that did not pass the gate. Positive control: the same
/// CONNECT with a fresh token is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_broker_refuses_what_edgehub_refuses() {
    let Some(rig) = Rig::new().await else { return };
    let broker = rig.broker(free_port()).await;
    let bundle = &rig.workload.state.trust_bundle;
    let now = common::mqtt::unix_now();
    let audience = format!("{HUB}/devices/{DEVICE}/modules/{MODULE}");
    let fresh = sas_token(&rig, &audience, now + 3600);
    let user = module_username();
    let client_id = format!("{DEVICE}/{MODULE}");
    let at_gate = |id: String, user: String, token: String| async move {
        connack(broker.module_port, bundle, &id, &user, &token).await
    };
    const NOT_AUTHORIZED: Result<(), u8> = Err(CONNACK_NOT_AUTHORIZED);

    assert_eq!(
        at_gate(client_id.clone(), user.clone(), fresh.clone()).await,
        Ok(()),
        "positive control: {:?}",
        broker.gate.connects()
    );
    // Expired more than the 5 minutes of skew ago; within them, accepted as edgeHub does.
    let expired = sas_token(&rig, &audience, now - 301);
    assert_eq!(
        at_gate(client_id.clone(), user.clone(), expired).await,
        NOT_AUTHORIZED
    );
    let skewed = sas_token(&rig, &audience, now - 200);
    assert_eq!(
        at_gate(client_id.clone(), user.clone(), skewed).await,
        Ok(())
    );
    // The right shape, another key.
    let forged = fresh.replace("&sig=", "&sig=AAAA");
    assert_eq!(
        at_gate(client_id.clone(), user.clone(), forged).await,
        NOT_AUTHORIZED
    );
    // A valid token of another module of the device.
    let other = sas_token(
        &rig,
        &format!("{HUB}/devices/{DEVICE}/modules/other"),
        now + 3600,
    );
    assert_eq!(
        at_gate(client_id.clone(), user.clone(), other).await,
        NOT_AUTHORIZED
    );
    // Another hub.
    let hub = sas_token(
        &rig,
        &format!("evil.example/devices/{DEVICE}/modules/{MODULE}"),
        now + 3600,
    );
    assert_eq!(
        at_gate(client_id.clone(), user.clone(), hub).await,
        NOT_AUTHORIZED
    );
    // The module's token under another client id.
    assert_eq!(
        at_gate(format!("{DEVICE}/other"), user.clone(), fresh.clone()).await,
        NOT_AUTHORIZED
    );
    // A user name without api-version: edgeHub's parser throws, return code 3.
    let no_version = user.replace("api-version=2020-09-30&", "");
    assert_eq!(
        at_gate(client_id.clone(), no_version, fresh.clone()).await,
        Err(CONNACK_SERVER_UNAVAILABLE)
    );
    let connects = broker.gate.connects();
    assert_eq!(
        connects.iter().filter(|c| c.refused.is_none()).count(),
        2,
        "{connects:?}"
    );

    // mosquitto on its own: the module's fresh token is not its password (only the gate's
    // is), and no anonymous client gets in.
    assert_eq!(
        connack(broker.port, bundle, &client_id, &user, &fresh).await,
        NOT_AUTHORIZED
    );
    assert_eq!(
        connack(broker.port, bundle, "anyone", "anyone", "").await,
        NOT_AUTHORIZED
    );
}
