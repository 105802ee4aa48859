//! Enrollment latency at the bottom of three layers (top `sign`, middle `auto`, bottom
//! `forward`) in each outage shape of the top: up, refusing connections, accepting TCP and
//! never answering, dropping SYNs (a listener whose accept queue is full). Defaults as
//! shipped (request_timeout_secs 20, connect_timeout_secs 3, devices waiting 30 s). Prints
//! figures for BENCHMARKS.md; asserts nothing about time. Run with
//! `cargo test --test outage_latency -- --ignored --nocapture`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::client::{basic, iot_edge_body, EstClient};
use edge_est::config::{Config, IssuerConfig, Mode, PemSource};
use edge_est::demo::{self, Layer, CHILD_PASSWORD, CHILD_USER};
use rcgen::{CertificateParams, DnType, KeyPair};

/// Whether this build has the fallback allowance (the code before it did not).
const FALLBACK_FIELD: bool = true;

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn middle_config(top_port: u16) -> Config {
    let mut config = demo::forward_config("middle", top_port, "layer2-ra", Some("layer3-ra"));
    config.issuers.insert(
        "own".into(),
        IssuerConfig {
            certificate: PemSource("auto-ca.pem".into()),
            key: "auto-ca.key".into(),
        },
    );
    let mut value = serde_json::to_value(&config).unwrap();
    value["labels"][0]["mode"] = serde_json::json!("auto");
    value["labels"][0]["issuer"] = serde_json::json!("own");
    if FALLBACK_FIELD {
        value["labels"][0]["fallback"] = serde_json::json!({ "common_names": ["*"] });
    }
    value["upstreams"]["parent"]["request_timeout_secs"] = serde_json::json!(20);
    let config: Config = serde_json::from_value(value).unwrap();
    assert_eq!(config.labels[0].mode, Mode::Auto);
    config
}

fn bottom_config(middle_port: u16) -> Config {
    let mut config = demo::forward_config("bottom", middle_port, "layer3-ra", None);
    config
        .upstreams
        .get_mut("parent")
        .unwrap()
        .request_timeout_secs = 20;
    config
}

/// One aziot-shaped issuance at the bottom: (status of simpleenroll, of cacerts, time).
async fn issue(client: &EstClient, cn: &str) -> (u16, u16, Duration) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let auth = [basic(CHILD_USER, CHILD_PASSWORD)];
    let headers = [
        ("content-type", "application/pkcs10".to_owned()),
        ("content-transfer-encoding", "base64".to_owned()),
        basic(CHILD_USER, CHILD_PASSWORD),
    ];
    let started = Instant::now();
    let (enroll, cacerts) = tokio::join!(
        client.request("POST", "simpleenroll", &headers, iot_edge_body(&csr)),
        client.request("GET", "cacerts", &auth, Vec::new()),
    );
    (enroll.status, cacerts.status, started.elapsed())
}

enum Shape {
    Up,
    Refused,
    Hung,
    DroppedSyns,
}

/// Holds what makes the shape (listener, held connections).
enum Held {
    None,
    Tokio(tokio::task::JoinHandle<()>),
    /// Kept open until dropped.
    Sockets(#[allow(dead_code)] Vec<socket2::Socket>),
}

async fn make(shape: &Shape, addr: SocketAddr) -> Held {
    match shape {
        Shape::Up | Shape::Refused => Held::None,
        Shape::Hung => {
            let listener = loop {
                if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
                    break l;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            Held::Tokio(tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((s, _)) = listener.accept().await {
                    held.push(s);
                }
            }))
        }
        Shape::DroppedSyns => {
            // A listener that never accepts, with an accept queue of one, filled: the kernel
            // drops further SYNs.
            use socket2::{Domain, Socket, Type};
            let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            listener.set_reuse_address(true).unwrap();
            while listener.bind(&addr.into()).is_err() {
                std::thread::sleep(Duration::from_millis(20));
            }
            listener.listen(0).unwrap();
            let mut held = vec![listener];
            for _ in 0..3 {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                s.set_nonblocking(true).unwrap();
                let _ = s.connect(&addr.into());
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(200));
            Held::Sockets(held)
        }
    }
}

async fn measure(name: &str, shape: Shape) {
    let dir = tempfile::tempdir().unwrap();
    let dir: &Path = dir.path();
    demo::write_pki(dir).unwrap();
    let top = Layer::start("top", dir, &demo::top_config(), any_port())
        .await
        .unwrap();
    let top_addr = top.addr;
    let middle = Layer::start("middle", dir, &middle_config(top_addr.port()), any_port())
        .await
        .unwrap();
    let bottom = Layer::start(
        "bottom",
        dir,
        &bottom_config(middle.addr.port()),
        any_port(),
    )
    .await
    .unwrap();
    let root = std::fs::read_to_string(dir.join("root.pem")).unwrap();
    let client = EstClient::new(bottom.addr, &root, None);
    // Warm: the chain above cached everywhere, connections pooled.
    for i in 0..3 {
        issue(&client, &format!("warm-{i}")).await;
    }
    let top = match shape {
        Shape::Up => Some(top),
        _ => {
            top.stop().await;
            None
        }
    };
    let held = make(&shape, top_addr).await;
    let mut rows = Vec::new();
    for i in 0..6 {
        rows.push(issue(&client, &format!("{name}-{i}")).await);
    }
    let first = rows[0];
    let mut rest: Vec<Duration> = rows[1..].iter().map(|r| r.2).collect();
    rest.sort();
    println!(
        "{name:>13}: first {:>8.1} ms ({}/{}), then median {:>8.1} ms, max {:>8.1} ms, statuses {:?}",
        first.2.as_secs_f64() * 1000.0,
        first.0,
        first.1,
        rest[rest.len() / 2].as_secs_f64() * 1000.0,
        rest[rest.len() - 1].as_secs_f64() * 1000.0,
        rows[1..].iter().map(|r| r.0).collect::<Vec<_>>()
    );
    if let Held::Tokio(task) = &held {
        task.abort();
    }
    drop(held);
    for layer in [Some(bottom), Some(middle), top].into_iter().flatten() {
        layer.stop().await;
    }
}

#[tokio::test]
#[ignore]
async fn enrollment_latency_at_the_bottom_by_outage_shape() {
    measure("up", Shape::Up).await;
    measure("refused", Shape::Refused).await;
    measure("hung", Shape::Hung).await;
    measure("dropped SYNs", Shape::DroppedSyns).await;
}
