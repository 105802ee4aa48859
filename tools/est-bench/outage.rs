//! `est-bench outage`: enrollment latency at the bottom of three layers (top `sign`, middle
//! `auto`, bottom `forward`) in each outage shape of the top: up, refusing connections,
//! accepting TCP and never answering, dropping SYNs (a listener whose accept queue is full).
//! Defaults as shipped (request_timeout_secs 20, connect_timeout_secs 3, devices waiting
//! 30 s). The layers run in this process (edge-est's library, `demo` configurations); the
//! device is aziot-shaped: `simpleenroll` and `cacerts` at once on two fresh TLS connections,
//! Basic. Prints figures for BENCHMARKS.md; asserts nothing about time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use clap::Args;
use edge_est::config::{Config, IssuerConfig, Mode, PemSource};
use edge_est::demo::{self, Layer, CHILD_PASSWORD, CHILD_USER};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

#[derive(Args, Debug)]
pub struct OutageArgs {
    /// Where the layers' PKI, configurations and journals go (default: a fresh directory
    /// under the system's temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Enrollments per shape after the change (the first is reported on its own).
    #[arg(long, default_value_t = 6)]
    enrollments: usize,
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn middle_config(top_port: u16) -> anyhow::Result<Config> {
    let mut config = demo::forward_config("middle", top_port, "layer2-ra", Some("layer3-ra"));
    config.issuers.insert(
        "own".into(),
        IssuerConfig {
            certificate: PemSource("auto-ca.pem".into()),
            key: "auto-ca.key".into(),
        },
    );
    let mut value = serde_json::to_value(&config)?;
    value["labels"][0]["mode"] = serde_json::json!("auto");
    value["labels"][0]["issuer"] = serde_json::json!("own");
    value["labels"][0]["fallback"] = serde_json::json!({ "common_names": ["*"] });
    value["upstreams"]["parent"]["request_timeout_secs"] = serde_json::json!(20);
    let config: Config = serde_json::from_value(value)?;
    anyhow::ensure!(config.labels[0].mode == Mode::Auto, "middle is not auto");
    Ok(config)
}

fn bottom_config(middle_port: u16) -> anyhow::Result<Config> {
    let mut config = demo::forward_config("bottom", middle_port, "layer3-ra", None);
    config
        .upstreams
        .get_mut("parent")
        .context("no upstream in the bottom's configuration")?
        .request_timeout_secs = 20;
    Ok(config)
}

/// A device at the bottom: trusts the root, authenticates with Basic.
struct Device {
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    authorization: String,
}

impl Device {
    fn new(addr: SocketAddr, root_pem: &str) -> anyhow::Result<Device> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.resumption = rustls::client::Resumption::disabled();
        Ok(Device {
            addr,
            tls: Arc::new(tls),
            authorization: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{CHILD_USER}:{CHILD_PASSWORD}"))
            ),
        })
    }

    /// One request on a fresh connection: its status (0 when no answer came).
    async fn request(&self, method: &str, op: &str, body: Vec<u8>) -> u16 {
        self.try_request(method, op, body).await.unwrap_or(0)
    }

    async fn try_request(&self, method: &str, op: &str, body: Vec<u8>) -> anyhow::Result<u16> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("/.well-known/est/{op}"))
            .header("host", format!("localhost:{}", self.addr.port()))
            .header("authorization", &self.authorization);
        if method == "POST" {
            request = request
                .header("content-type", "application/pkcs10")
                .header("content-transfer-encoding", "base64")
                .header("content-length", body.len().to_string());
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await?;
        Ok(status)
    }

    /// One aziot-shaped issuance: (status of simpleenroll, of cacerts, time).
    async fn issue(&self, cn: &str) -> anyhow::Result<(u16, u16, Duration)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        let csr = params.serialize_request(&key)?.der().to_vec();
        let body = edge_est::est::body::encode_base64_lines(&csr).into_bytes();
        let started = Instant::now();
        let (enroll, cacerts) = tokio::join!(
            self.request("POST", "simpleenroll", body),
            self.request("GET", "cacerts", Vec::new()),
        );
        Ok((enroll, cacerts, started.elapsed()))
    }
}

#[derive(Clone, Copy)]
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

async fn make(shape: Shape, addr: SocketAddr) -> anyhow::Result<Held> {
    Ok(match shape {
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
            let listener = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            listener.set_reuse_address(true)?;
            while listener.bind(&addr.into()).is_err() {
                std::thread::sleep(Duration::from_millis(20));
            }
            listener.listen(0)?;
            let mut held = vec![listener];
            for _ in 0..3 {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                s.set_nonblocking(true)?;
                let _ = s.connect(&addr.into());
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(200));
            Held::Sockets(held)
        }
    })
}

async fn measure(dir: &Path, name: &str, shape: Shape, enrollments: usize) -> anyhow::Result<()> {
    let dir = dir.join(name.replace(' ', "-"));
    std::fs::create_dir_all(&dir)?;
    demo::write_pki(&dir).map_err(|e| anyhow::anyhow!(e))?;
    let err = |e: String| anyhow::anyhow!(e);
    let top = Layer::start("top", &dir, &demo::top_config(), any_port())
        .await
        .map_err(err)?;
    let top_addr = top.addr;
    let middle = Layer::start("middle", &dir, &middle_config(top_addr.port())?, any_port())
        .await
        .map_err(err)?;
    let bottom = Layer::start(
        "bottom",
        &dir,
        &bottom_config(middle.addr.port())?,
        any_port(),
    )
    .await
    .map_err(err)?;
    let root = std::fs::read_to_string(dir.join("root.pem"))?;
    let device = Device::new(bottom.addr, &root)?;
    // Warm: the chain above cached everywhere, connections pooled.
    for i in 0..3 {
        device.issue(&format!("warm-{i}")).await?;
    }
    let top = match shape {
        Shape::Up => Some(top),
        _ => {
            top.stop().await;
            None
        }
    };
    let held = make(shape, top_addr).await?;
    let mut rows = Vec::new();
    for i in 0..enrollments.max(2) {
        rows.push(
            device
                .issue(&format!("{}-{i}", name.replace(' ', "-")))
                .await?,
        );
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
        rows[1..].iter().map(|r| (r.0, r.1)).collect::<Vec<_>>()
    );
    if let Held::Tokio(task) = &held {
        task.abort();
    }
    drop(held);
    for layer in [Some(bottom), Some(middle), top].into_iter().flatten() {
        layer.stop().await;
    }
    Ok(())
}

pub fn run(args: &OutageArgs) -> anyhow::Result<()> {
    let (dir, remove) = match &args.dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("est-bench-outage-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    println!(
        "enrollment latency at the bottom of three layers (top sign, middle auto, bottom \
         forward), by outage shape of the top; {}",
        crate::floor::cpu_model()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        for (name, shape) in [
            ("up", Shape::Up),
            ("refused", Shape::Refused),
            ("hung", Shape::Hung),
            ("dropped SYNs", Shape::DroppedSyns),
        ] {
            measure(&dir, name, shape, args.enrollments).await?;
        }
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
