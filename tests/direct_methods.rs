//! Direct methods of the shipped binary running as an IoT Edge module: `edge-est serve` with
//! an `IOTEDGE_*` environment, against mosquitto (TLS from the test Edge CA) with a twin
//! responder speaking edgeHub's twin topics and a caller publishing on edgeHub's method topics
//! (`$iothub/methods/POST/{method}/?$rid=`, answers on `$iothub/methods/res/{status}/?$rid=`),
//! and the workload API stand-in. `getStatus`, `queryJournal` (filters, pages, bounds),
//! `reloadFiles` after rotating the issuing CA's files (a bad key refused, the old one keeps
//! serving) and SIGHUP; hostile payloads answered with a status and a reason.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::client::{basic, certs_from_answer, iot_edge_body, EstClient};
use common::mqtt::{
    free_port, ConnectCapture, Mosquitto, SasCheck, TwinResponder, RESPONDER_PASSWORD,
    RESPONDER_USER,
};
use common::workload::WorkloadStandIn;
use common::{csr, Pki, PASSWORD, USER};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const DEVICE: &str = "gw1";
const MODULE: &str = "edgeest";
const HUB: &str = "test-hub.example";
const GATEWAY: &str = "localhost";

/// The shipped binary, killed on drop.
struct Module {
    child: Child,
    log: PathBuf,
}

impl Module {
    /// What it wrote (stdout and stderr).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Answers by `$rid`: status and payload.
type Answers = Arc<Mutex<HashMap<String, (u16, Vec<u8>)>>>;

/// Publishes direct-method calls as edgeHub does and collects the answers by `$rid`.
struct MethodCaller {
    client: AsyncClient,
    answers: Answers,
    next: u64,
    _task: tokio::task::JoinHandle<()>,
}

impl MethodCaller {
    async fn start(port: u16, trust_bundle: &str) -> MethodCaller {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(trust_bundle.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut options = MqttOptions::new("method-caller", "localhost", port);
        options
            .set_credentials(RESPONDER_USER, RESPONDER_PASSWORD)
            .set_max_packet_size(512 * 1024, 512 * 1024)
            .set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(tls))));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        client
            .subscribe("$iothub/methods/res/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        let answers: Answers = Arc::new(Mutex::new(HashMap::new()));
        let (ready_tx, mut ready) = mpsc::channel(1);
        let collected = answers.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.try_send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // $iothub/methods/res/{status}/?$rid={rid}
                        let rest = p.topic.trim_start_matches("$iothub/methods/res/");
                        let status = rest.split('/').next().unwrap().parse().unwrap();
                        let rid = rest.split_once("?$rid=").unwrap().1.to_owned();
                        collected
                            .lock()
                            .unwrap()
                            .insert(rid, (status, p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("method caller: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready.recv())
            .await
            .expect("the caller subscribed in time");
        MethodCaller {
            client,
            answers,
            next: 100,
            _task: task,
        }
    }

    async fn publish(&mut self, topic: String, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Calls `method` and waits for its answer: (status, JSON payload).
    async fn call_raw(&mut self, method: &str, payload: Vec<u8>) -> (u16, Value) {
        self.next += 1;
        let rid = format!("{:x}", self.next);
        self.publish(
            format!("$iothub/methods/POST/{method}/?$rid={rid}"),
            payload,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((status, body)) = self.answers.lock().unwrap().remove(&rid) {
                let value = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("{method}: answer is not JSON ({e}): {body:?}"));
                return (status, value);
            }
            assert!(Instant::now() < deadline, "no answer to {method}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn call(&mut self, method: &str, payload: Value) -> (u16, Value) {
        self.call_raw(method, payload.to_string().into_bytes())
            .await
    }

    fn answered(&self) -> usize {
        self.answers.lock().unwrap().len()
    }
}

/// Everything the module runs against, and the files an operator would mount.
struct Rig {
    dir: tempfile::TempDir,
    pki: Pki,
    workload: WorkloadStandIn,
    broker: Mosquitto,
    /// The SAS gate the module connects through (edgeHub's checks).
    gate: ConnectCapture,
    twin: TwinResponder,
    est_port: u16,
}

impl Rig {
    async fn new() -> Option<Rig> {
        let mosquitto = common::mqtt::mosquitto()?;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate_p256(dir.path());
        // The "mounted" issuing CA, rotated in place by the tests.
        let mounted = dir.path().join("etc");
        std::fs::create_dir_all(&mounted).unwrap();
        std::fs::copy(
            dir.path().join("issuing-ca.pem"),
            mounted.join("issuing-ca.pem"),
        )
        .unwrap();
        std::fs::copy(
            dir.path().join("issuing-ca.key"),
            mounted.join("issuing-ca.key"),
        )
        .unwrap();
        let workload = WorkloadStandIn::start(dir.path(), MODULE, &pki.root).await;
        let broker_cert = workload.issue_server(GATEWAY, Duration::from_secs(86_400));
        let username =
            edge_est::edge::sas::username(GATEWAY, DEVICE, MODULE, &edge_est::edge::sas::product());
        let broker = Mosquitto::start(&mosquitto, dir.path(), free_port(), &broker_cert, &username);
        let sas = SasCheck {
            hub: HUB.into(),
            gateway: GATEWAY.into(),
            device: DEVICE.into(),
            module: MODULE.into(),
            key: workload.state.key.clone(),
        };
        let gate =
            ConnectCapture::start(broker.port, &broker_cert, &workload.state.trust_bundle, sas)
                .await;
        let est_port = free_port();
        let desired = json!({
            "listen": format!("127.0.0.1:{est_port}"),
            "metrics_listen": format!("127.0.0.1:{}", free_port()),
            "users": { USER: pki.password_hash },
            "issuers": { "plant": {
                "certificate": mounted.join("issuing-ca.pem"),
                "key": mounted.join("issuing-ca.key"),
            } },
            "labels": [ {
                "issuer": "plant",
                "client_trust": ["issuer"],
                "rules": [ { "match": [format!("user:{USER}")], "common_names": ["dev-*"] } ],
            } ],
        });
        let twin = TwinResponder::start(broker.port, &workload.state.trust_bundle, desired).await;
        Some(Rig {
            dir,
            pki,
            workload,
            broker,
            gate,
            twin,
            est_port,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn start_module(&self) -> Module {
        let log = self.path().join("module.log");
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edge-est"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("IOTEDGE_WORKLOADURI", self.workload.uri())
            .env("IOTEDGE_DEVICEID", DEVICE)
            .env("IOTEDGE_MODULEID", MODULE)
            .env("IOTEDGE_IOTHUBHOSTNAME", HUB)
            .env("IOTEDGE_AUTHSCHEME", "sasToken")
            .env("IOTEDGE_MODULEGENERATIONID", "gen-1")
            .env("IOTEDGE_GATEWAYHOSTNAME", GATEWAY)
            .env("EDGE_EST_MQTT_PORT", self.gate.port.to_string())
            .env("EDGE_EST_DATA_DIR", self.path().join("data"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start edge-est");
        Module { child, log }
    }

    fn client(&self) -> EstClient {
        let root = std::fs::read_to_string(self.path().join("root.pem")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", self.est_port).parse().unwrap();
        EstClient::new(addr, &root, None)
    }

    /// A new issuing CA under the same root written over the mounted files (as an operator
    /// rotating it would); returns its subject CN.
    fn rotate_issuer(&self, cn: &str) -> String {
        let (ca, key) = self
            .pki
            .root
            .sub_ca(cn, Some(1), &rcgen::PKCS_ECDSA_P256_SHA256);
        let etc = self.path().join("etc");
        std::fs::write(
            etc.join("issuing-ca.pem"),
            format!("{}{}", ca.cert_pem, self.pki.root.cert_pem),
        )
        .unwrap();
        std::fs::write(etc.join("issuing-ca.key"), key).unwrap();
        cn.to_owned()
    }
}

/// Enrolls `cn` with Basic credentials; the issuer's CN of the certificate obtained.
async fn enroll(client: &EstClient, cn: &str) -> String {
    let answer = client
        .request(
            "POST",
            "simpleenroll",
            &[
                ("content-type", "application/pkcs10".to_owned()),
                basic(USER, PASSWORD),
            ],
            iot_edge_body(&csr(cn)),
        )
        .await;
    assert_eq!(answer.status, 200, "{cn}: {}", answer.text());
    let certs = certs_from_answer(&answer.body);
    let (_, cert) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
    let issuer = cert
        .issuer()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    issuer
}

async fn wait_running(rig: &Rig, module: &mut Module) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(module.running(), "edge-est exited: {}", module.log());
        let reported = rig.twin.reported();
        if reported["configVersion"] == 1 && reported["status"] == "running" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the module never reported running: {reported:#}\n{}",
            module.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_module_answers_direct_methods_over_edgehub() {
    let Some(rig) = Rig::new().await else { return };
    let mut module = rig.start_module();
    wait_running(&rig, &mut module).await;
    let mut caller = MethodCaller::start(rig.broker.port, &rig.workload.state.trust_bundle).await;
    let client = rig.client();
    for cn in ["dev-1", "dev-2", "dev-3"] {
        assert_eq!(enroll(&client, cn).await, "edge-est test issuing CA");
    }

    // getStatus: the reported document, issuer and server certificate expiries, upstreams.
    let (status, body) = caller.call_raw("getStatus", Vec::new()).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["reported"]["status"], "running", "{body:#}");
    assert_eq!(body["reported"]["configVersion"], 1);
    let plant = &body["issuers"]["plant"];
    assert_eq!(plant["subject"], "CN=edge-est test issuing CA", "{body:#}");
    assert!(
        plant["expiresInSecs"].as_i64().unwrap() > 86_400,
        "{body:#}"
    );
    assert!(plant["chain"]["notAfter"].is_string(), "{body:#}");
    assert_eq!(plant["labels"], json!(["(unlabeled)"]));
    assert!(body["serverCertificate"]["expiresInSecs"].as_i64().unwrap() > 0);
    assert_eq!(body["upstreams"], json!({}));
    assert_eq!(body["lastReload"], Value::Null);

    // queryJournal: newest first, by CN (exact or prefix), serial, fingerprint, time range.
    let (status, all) = caller.call("queryJournal", json!({})).await;
    assert_eq!(status, 200, "{all:#}");
    assert_eq!(all["matched"], 3);
    assert_eq!(all["next"], Value::Null);
    let entries = all["entries"].as_array().unwrap();
    let subjects: Vec<&str> = entries
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["CN=dev-3", "CN=dev-2", "CN=dev-1"]);
    assert!(entries[0].get("certificate").is_none());
    let dev2 = &entries[1];
    let (_, by_cn) = caller.call("queryJournal", json!({"cn": "dev-2"})).await;
    assert_eq!(by_cn["entries"], json!([dev2]));
    let (_, by_prefix) = caller.call("queryJournal", json!({"cn": "dev-*"})).await;
    assert_eq!(by_prefix["matched"], 3);
    let (_, nothing) = caller.call("queryJournal", json!({"cn": "dev"})).await;
    assert_eq!(nothing["matched"], 0);
    let serial = dev2["serial"].as_str().unwrap().to_uppercase();
    let (_, by_serial) = caller.call("queryJournal", json!({"serial": serial})).await;
    assert_eq!(by_serial["entries"], json!([dev2]));
    let fingerprint = dev2["sha256"].as_str().unwrap();
    let (_, by_fingerprint) = caller
        .call(
            "queryJournal",
            json!({"fingerprint": fingerprint, "certificates": true}),
        )
        .await;
    assert_eq!(by_fingerprint["matched"], 1);
    assert!(by_fingerprint["entries"][0]["certificate"].is_string());
    let (_, in_range) = caller
        .call(
            "queryJournal",
            json!({"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(in_range["matched"], 3);
    let (_, before_range) = caller
        .call("queryJournal", json!({"to": "2000-01-01T00:00:00Z"}))
        .await;
    assert_eq!(before_range["matched"], 0);
    // Pages: two, then the rest.
    let (_, page1) = caller.call("queryJournal", json!({"limit": 2})).await;
    assert_eq!(page1["entries"].as_array().unwrap().len(), 2);
    let next = page1["next"].clone();
    assert!(next.is_u64(), "{page1:#}");
    let (_, page2) = caller
        .call("queryJournal", json!({"limit": 2, "before": next}))
        .await;
    assert_eq!(page2["entries"].as_array().unwrap().len(), 1);
    assert_eq!(page2["entries"][0]["subject"], "CN=dev-1");
    assert_eq!(page2["next"], Value::Null);

    // Hostile or mistaken calls: a status and a reason, and the module goes on.
    for (method, payload, want, says) in [
        (
            "rotateKeys",
            b"{}".to_vec(),
            404,
            "unknown method \"rotateKeys\"",
        ),
        (
            "queryJournal",
            br#"{"limit": 1000}"#.to_vec(),
            400,
            "must be 1 to 100",
        ),
        (
            "queryJournal",
            br#"{"limit": 0}"#.to_vec(),
            400,
            "must be 1 to 100",
        ),
        (
            "queryJournal",
            br#"{"serial": "zz"}"#.to_vec(),
            400,
            "not hexadecimal",
        ),
        (
            "queryJournal",
            br#"{"fingerprint": "ab"}"#.to_vec(),
            400,
            "SHA-256",
        ),
        (
            "queryJournal",
            br#"{"from": "last week"}"#.to_vec(),
            400,
            "RFC 3339",
        ),
        (
            "queryJournal",
            br#"{"commonName": "x"}"#.to_vec(),
            400,
            "unknown field",
        ),
        (
            "queryJournal",
            b"[1, 2]".to_vec(),
            400,
            "must be a JSON object",
        ),
        ("getStatus", b"{not json".to_vec(), 400, "not JSON"),
        (
            "getStatus",
            br#"{"verbose": true}"#.to_vec(),
            400,
            "takes no parameters",
        ),
        (
            "reloadFiles",
            br#"{"path": "/etc/shadow"}"#.to_vec(),
            400,
            "takes no parameters",
        ),
        (
            "queryJournal",
            format!("{{\"cn\": \"{}\"}}", "x".repeat(140 * 1024)).into_bytes(),
            400,
            "direct method payloads are at most 131072",
        ),
    ] {
        let (status, body) = caller.call_raw(method, payload).await;
        assert_eq!(status, want, "{method}: {body:#}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{method}: {error:?} lacks {says:?}");
    }
    // A call without a $rid cannot be answered; it is dropped, not fatal.
    let answered = caller.answered();
    caller
        .publish("$iothub/methods/POST/getStatus/".into(), b"{}".to_vec())
        .await;
    caller
        .publish(
            format!("$iothub/methods/POST/getStatus/?$rid={}", "9".repeat(100)),
            b"{}".to_vec(),
        )
        .await;
    let (status, _) = caller.call("getStatus", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(caller.answered(), answered);
    assert!(module.running());

    // reloadFiles: the operator rotated the issuing CA's files in place.
    let new_cn = rig.rotate_issuer("Plant issuing CA 2");
    let (status, body) = caller.call("reloadFiles", json!({})).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["reloaded"], true);
    assert_eq!(body["issuers"]["plant"]["subject"], format!("CN={new_cn}"));
    assert_eq!(enroll(&client, "dev-4").await, new_cn);

    // A rotation gone wrong (the key does not belong to the certificate) is refused with the
    // reason; the CA read before keeps signing.
    let (_, stray_key) = rig
        .pki
        .root
        .sub_ca("stray", Some(1), &rcgen::PKCS_ECDSA_P256_SHA256);
    std::fs::write(rig.path().join("etc/issuing-ca.key"), stray_key).unwrap();
    let (status, body) = caller.call("reloadFiles", json!({})).await;
    assert_eq!(status, 400, "{body:#}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("issuers.plant"), "{error}");
    assert!(error.contains("keep serving"), "{error}");
    assert!(!error.contains("PRIVATE KEY"), "{error}");
    assert_eq!(enroll(&client, "dev-5").await, new_cn);
    let (_, status_now) = caller.call("getStatus", json!({})).await;
    assert_eq!(status_now["lastReload"]["ok"], false, "{status_now:#}");
    assert_eq!(status_now["lastReload"]["trigger"], "reloadFiles");
    assert_eq!(
        status_now["issuers"]["plant"]["subject"],
        format!("CN={new_cn}")
    );

    // SIGHUP does the same: a third CA, in force without a restart.
    let third = rig.rotate_issuer("Plant issuing CA 3");
    module.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, s) = caller.call("getStatus", json!({})).await;
        if s["lastReload"]["trigger"] == "SIGHUP" {
            assert_eq!(s["lastReload"]["ok"], true, "{s:#}");
            assert_eq!(s["issuers"]["plant"]["subject"], format!("CN={third}"));
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP had no effect: {s:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(module.running(), "SIGHUP must not stop the module");
    assert_eq!(enroll(&client, "dev-6").await, third);
    let log = module.log();
    assert!(log.contains("direct method answered"), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

/// A page never exceeds the 128 KB answer limit: with certificates, fewer entries than asked
/// come back, and `next` continues where the page stopped.
#[test]
fn journal_pages_stay_under_the_payload_limit() {
    use edge_est::edge::methods::{query_journal, JournalQuery, MAX_PAYLOAD};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.jsonl");
    let big = "A".repeat(4000);
    let mut text = String::new();
    for i in 0..100 {
        let entry = json!({
            "time": format!("2026-01-01T00:00:{:02}Z", i % 60),
            "serial": format!("{i:04x}"),
            "subject": format!("CN=dev-{i}"),
            "sans": [],
            "label": null,
            "operation": "simpleenroll",
            "identity": "user estuser",
            "profile": "identity",
            "not_before": "2026-01-01T00:00:00Z",
            "not_after": "2027-01-01T00:00:00Z",
            "sha256": "00".repeat(32),
            "certificate": big,
            "issued_by": "local",
        });
        text.push_str(&entry.to_string());
        text.push('\n');
    }
    text.push_str("{\"torn\n");
    std::fs::write(&path, text).unwrap();
    let query = |v: Value| JournalQuery::parse(v.as_object().unwrap().clone()).unwrap();

    let answer = query_journal(&path, &query(json!({"limit": 100, "certificates": true}))).unwrap();
    assert!(answer.to_string().len() <= MAX_PAYLOAD);
    let n = answer["entries"].as_array().unwrap().len();
    assert!(n > 10 && n < 100, "{n}");
    assert_eq!(answer["matched"], 100);
    assert_eq!(answer["entries"][0]["serial"], "0063");
    let next = answer["next"].as_u64().unwrap();
    assert_eq!(next, 100 - n as u64);
    let rest = query_journal(
        &path,
        &query(json!({"limit": 100, "certificates": true, "before": next})),
    )
    .unwrap();
    assert_eq!(rest["entries"][0]["serial"], format!("{:04x}", 100 - n - 1));
    // Without certificates all 100 fit.
    let slim = query_journal(&path, &query(json!({"limit": 100}))).unwrap();
    assert_eq!(slim["entries"].as_array().unwrap().len(), 100);
    assert_eq!(slim["next"], Value::Null);
    // A missing journal is an empty one.
    let none = query_journal(&dir.path().join("absent"), &query(json!({}))).unwrap();
    assert_eq!(none["matched"], 0);
}
