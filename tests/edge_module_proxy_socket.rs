//! `proxy_socket` in the module twin: the module opens the API proxy's socket with its first
//! configuration, moves it when a desired patch moves it (the new one bound first), closes and
//! removes it when the twin drops it, and removes it on shutdown. Against the same peers as
//! `tests/edge_module.rs`: mosquitto with a twin responder, and a workload API stand-in.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::mqtt::{free_port, ConnectCapture, Mosquitto, SasCheck, TwinResponder};
use common::workload::WorkloadStandIn;
use common::{csr, Pki};
use edge_est::edge::{self, EdgeEnv, ModuleOptions};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const DEVICE: &str = "gw1";
const MODULE: &str = "edgeest";
const GATEWAY: &str = "localhost";

/// A device's first certificate, enrolled over the socket with the Basic user: `issuer`
/// accepts only certificates the label issued.
async fn enrolled_via(socket: &Path, cn: &str) -> String {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("the socket accepts");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let body = common::client::iot_edge_body(&csr(cn));
    let (name, value) = common::client::basic(common::USER, common::PASSWORD);
    let request = http::Request::post("/.well-known/est/simpleenroll")
        .header("host", GATEWAY)
        .header("content-type", "application/pkcs10")
        .header("content-length", body.len().to_string())
        .header(name, value)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    common::client::to_pem(&common::client::certs_from_answer(&body)[0])
}

/// A simpleenroll over the socket with the forwarded certificate `cert_pem`; the status.
async fn enroll_via(socket: &Path, cert_pem: &str, cn: &str) -> (u16, String) {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("the socket accepts");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let escaped =
        percent_encoding::utf8_percent_encode(cert_pem, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let body = common::client::iot_edge_body(&csr(cn));
    let request = http::Request::post("/.well-known/est/simpleenroll")
        .header("host", GATEWAY)
        .header("content-type", "application/pkcs10")
        .header("content-length", body.len().to_string())
        .header("x-ms-edge-clientcert", escaped)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_twin_opens_moves_and_closes_the_api_proxy_socket() {
    let Some(mosquitto) = common::mqtt::mosquitto() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let pki = Pki::generate_p256(path);
    let workload = WorkloadStandIn::start(path, MODULE, &pki.root).await;
    let broker_cert = workload.issue_server(GATEWAY, Duration::from_secs(86_400));
    let username = edge::sas::username(GATEWAY, DEVICE, MODULE, &edge::sas::product());
    let broker = Mosquitto::start(&mosquitto, path, free_port(), &broker_cert, &username);
    let sas = SasCheck {
        hub: "test-hub.example".into(),
        gateway: GATEWAY.into(),
        device: DEVICE.into(),
        module: MODULE.into(),
        key: workload.state.key.clone(),
    };
    let gate =
        ConnectCapture::start(broker.port, &broker_cert, &workload.state.trust_bundle, sas).await;

    // The volume shared with the API proxy, in two places (the second for the move).
    for d in ["run-a", "run-b"] {
        std::fs::create_dir_all(path.join(d)).unwrap();
    }
    let first = path.join("run-a/proxy.sock");
    let second = path.join("run-b/proxy.sock");
    let desired = json!({
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "proxy_socket": first,
        "issuers": { "plant": {
            "certificate": path.join("issuing-ca.pem"),
            "key": path.join("issuing-ca.key"),
        } },
        "users": { (common::USER): pki.password_hash },
        "labels": [ {
            "issuer": "plant",
            "client_trust": ["issuer"],
            "rules": [
                { "match": ["certificate:issuer"], "common_names": ["{cn}"] },
                { "match": [format!("user:{}", common::USER)], "common_names": ["device-*"] },
            ],
        } ],
    });
    let twin = TwinResponder::start(broker.port, &workload.state.trust_bundle, desired).await;

    let data = path.join("data");
    let vars: HashMap<&str, String> = HashMap::from([
        ("IOTEDGE_WORKLOADURI", workload.uri()),
        ("IOTEDGE_DEVICEID", DEVICE.into()),
        ("IOTEDGE_MODULEID", MODULE.into()),
        ("IOTEDGE_IOTHUBHOSTNAME", "test-hub.example".into()),
        ("IOTEDGE_AUTHSCHEME", "sasToken".into()),
        ("IOTEDGE_MODULEGENERATIONID", "gen-1".into()),
        ("IOTEDGE_GATEWAYHOSTNAME", GATEWAY.into()),
        ("EDGE_EST_MQTT_PORT", gate.port.to_string()),
        ("EDGE_EST_DATA_DIR", data.display().to_string()),
    ]);
    let env = EdgeEnv::from_vars(|k| vars.get(k).cloned()).unwrap();
    let options = ModuleOptions {
        report_interval: Duration::from_millis(500),
        backoff_max: Duration::from_secs(2),
        ..ModuleOptions::default()
    };
    let mut module = edge::start(env, options).await.expect("module starts");
    module
        .serving(Duration::from_secs(30))
        .await
        .expect("the module serves EST");
    twin.wait_reported("configVersion 1", |r: &Value| r["configVersion"] == 1)
        .await;

    assert!(is_socket(&first));
    let device = enrolled_via(&first, "device-1").await;
    let (status, text) = enroll_via(&first, &device, "device-1").await;
    assert_eq!(status, 200, "{text}");

    // A patch moves the socket: the new one serves, the old one is gone.
    let v2 = twin.patch_desired(json!({ "proxy_socket": second })).await;
    twin.wait_reported("configVersion 2", |r: &Value| r["configVersion"] == v2)
        .await;
    let (status, text) = enroll_via(&second, &device, "device-1").await;
    assert_eq!(status, 200, "{text}");
    for _ in 0..50 {
        if !first.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!first.exists(), "the old socket is removed");

    // A socket path that cannot be bound is refused whole; the running socket keeps serving.
    std::fs::write(path.join("run-a/file"), "not a socket").unwrap();
    let v3 = twin
        .patch_desired(json!({ "proxy_socket": path.join("run-a/file") }))
        .await;
    let reported = twin
        .wait_reported("the rejection of version 3", |r: &Value| {
            r["lastRejection"]["version"] == v3
        })
        .await;
    let reason = reported["lastRejection"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("proxy_socket: cannot listen") && reason.contains("not a socket"),
        "{reason}"
    );
    let (status, _) = enroll_via(&second, &device, "device-1").await;
    assert_eq!(status, 200);

    // The twin drops it: closed and removed.
    let v4 = twin.patch_desired(json!({ "proxy_socket": null })).await;
    twin.wait_reported("configVersion 4", |r: &Value| r["configVersion"] == v4)
        .await;
    for _ in 0..50 {
        if !second.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !second.exists(),
        "the socket is removed when the twin drops it"
    );

    // Back on, then shutdown removes it.
    let v5 = twin.patch_desired(json!({ "proxy_socket": first })).await;
    twin.wait_reported("configVersion 5", |r: &Value| r["configVersion"] == v5)
        .await;
    assert!(is_socket(&first));
    module.stop().await;
    assert!(!first.exists(), "shutdown removes the socket");
}
