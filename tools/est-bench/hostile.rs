//! `est-bench hostile`: what refusing a hostile client certificate chain costs a server, and
//! what a legitimate client sees meanwhile (BENCHMARKS.md, "Hostile chains").
//!
//! Writes a small PKI and configuration into a directory, starts the given `edge-est` binary
//! on a loopback port, and measures:
//!
//! 1. a legitimate client alone: bootstrap enrollments (client certificate from the factory
//!    CA, a fresh TLS connection each), latency p50/p99;
//! 2. the server CPU per refused request of one connection pipelining empty POSTs with a
//!    hostile chain (a leaf and many small intermediates named like the label's trust anchors,
//!    as large as a TLS handshake message allows), and of fresh connections with one request
//!    each; the same with a hostile chain of only `--small-chain` certificates;
//! 3. the legitimate client while two connections keep sending hostile chains (large, then
//!    small), latency p50/p99/max.
//!
//! It prints figures; it asserts nothing. Only loopback is used, and the server started here
//! is stopped at the end.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::procfs;

#[derive(clap::Args)]
pub struct HostileArgs {
    /// The edge-est binary to measure (e.g. target/release/edge-est, or a build of another
    /// commit).
    #[arg(long)]
    server_bin: PathBuf,
    /// Where the PKI, configuration and server log go (default: a fresh temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Pipelined requests per hostile connection.
    #[arg(long, default_value_t = 200)]
    pipeline: usize,
    /// Fresh hostile connections (one request each) for the per-connection figure.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Legitimate enrollments per latency measurement.
    #[arg(long, default_value_t = 40)]
    enrollments: usize,
    /// Certificates of the small hostile chain (leaf included): one that fits within a cap.
    #[arg(long, default_value_t = 8)]
    small_chain: usize,
}

const BOOTSTRAP_CA: &str = "factory bootstrap CA";
const ISSUING_CA: &str = "hostile-bench issuing CA";

const CONFIG: &str = r#"# est-bench hostile: the default label trusts a factory CA and its own issuer
listen = "127.0.0.1:0"
journal = "journal.jsonl"

[tls]
certificate = "server.pem"
key = "server.key"

[trust.bootstrap]
certificates = ["bootstrap-ca.pem"]

[issuers.plant]
certificate = "issuing-ca.pem"
key = "issuing-ca.key"

[[labels]]
issuer = "plant"
client_trust = ["bootstrap", "issuer"]

[labels.authentication]
basic = false

[[labels.rules]]
match = ["certificate:bootstrap"]
common_names = ["{cn}"]

[[labels.rules]]
match = ["certificate:issuer"]
common_names = ["{cn}"]
"#;

/// A client credential: chain (leaf first) and key.
#[derive(Clone)]
struct Credential {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

struct Setup {
    root: CertificateDer<'static>,
    device: Credential,
    large: Credential,
    small: Credential,
}

fn ca(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn client(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

/// A hostile chain: a leaf and intermediates whose names are those of the label's trust
/// anchors (alternately), each with a key of its own, none issued by an anchor. The leaf is
/// issued by the first. At most `max_certs` certificates and `max_bytes` bytes.
fn hostile_chain(max_certs: usize, max_bytes: usize) -> anyhow::Result<Credential> {
    let names = [BOOTSTRAP_CA, ISSUING_CA];
    let first_key = KeyPair::generate()?;
    let first_params = ca(names[0]);
    let first = first_params.self_signed(&first_key)?;
    let leaf_key = KeyPair::generate()?;
    let leaf = client("hostile").signed_by(&leaf_key, &Issuer::new(first_params, first_key))?;
    let mut chain = vec![leaf.der().clone(), first.der().clone()];
    let mut bytes: usize = chain.iter().map(|c| c.len()).sum();
    let mut i = 1;
    while chain.len() < max_certs {
        let key = KeyPair::generate()?;
        let cert = ca(names[i % 2]).self_signed(&key)?;
        if bytes + cert.der().len() > max_bytes {
            break;
        }
        bytes += cert.der().len();
        chain.push(cert.der().clone());
        i += 1;
    }
    Ok(Credential {
        chain,
        key: leaf_key.serialize_der(),
    })
}

fn write_setup(dir: &Path, small_chain: usize) -> anyhow::Result<Setup> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, text: &str| -> anyhow::Result<()> {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
    };
    let root_key = KeyPair::generate()?;
    let root_params = ca("hostile-bench root");
    let root = root_params.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root_params, root_key);
    let issuing_key = KeyPair::generate()?;
    let mut issuing_params = ca(ISSUING_CA);
    issuing_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    issuing_params
        .key_usages
        .push(KeyUsagePurpose::DigitalSignature);
    let issuing = issuing_params.signed_by(&issuing_key, &root_issuer)?;
    write(
        "issuing-ca.pem",
        &format!("{}{}", issuing.pem(), root.pem()),
    )?;
    write("issuing-ca.key", &issuing_key.serialize_pem())?;
    let issuing_issuer = Issuer::new(issuing_params, issuing_key);
    write("root.pem", &root.pem())?;

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::default();
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.subject_alt_names = vec![SanType::DnsName("localhost".try_into()?)];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuing_issuer)?;
    write(
        "server.pem",
        &format!("{}{}", server_cert.pem(), issuing.pem()),
    )?;
    write("server.key", &server_key.serialize_pem())?;

    let bootstrap_key = KeyPair::generate()?;
    let bootstrap_params = ca(BOOTSTRAP_CA);
    let bootstrap = bootstrap_params.self_signed(&bootstrap_key)?;
    write("bootstrap-ca.pem", &bootstrap.pem())?;
    let device_key = KeyPair::generate()?;
    let device = client("bench-device")
        .signed_by(&device_key, &Issuer::new(bootstrap_params, bootstrap_key))?;
    write("hostile.toml", CONFIG)?;

    Ok(Setup {
        root: root.der().clone(),
        device: Credential {
            chain: vec![device.der().clone()],
            key: device_key.serialize_der(),
        },
        // A TLS handshake message holds at most 64 KiB.
        large: hostile_chain(usize::MAX, 63 * 1024)?,
        small: hostile_chain(small_chain, usize::MAX)?,
    })
}

fn tls_config(
    root: &CertificateDer<'static>,
    identity: &Credential,
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    roots.add(root.clone())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            identity.chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key.clone())),
        )?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server under measurement; stopped when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &Path, dir: &Path) -> anyhow::Result<Server> {
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--config",
            "hostile.toml",
            "--listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(at) = line.find("listen=127.0.0.1:") {
                    let port: String = line[at + 17..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    let _ = tx.send(port);
                    sent = true;
                }
            }
        }
    });
    let port: u16 = rx
        .recv_timeout(Duration::from_secs(30))
        .context("the server did not report its port")?
        .parse()?;
    Ok(Server {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    })
}

async fn tls_connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(ServerName::try_from("localhost").expect("a name"), tcp)
        .await
}

const EMPTY_POST: &[u8] = b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nhost: localhost\r\n\
content-type: application/pkcs10\r\ncontent-length: 0\r\n\r\n";

/// One hostile connection: `n` pipelined empty POSTs. The statuses received (empty when the
/// handshake or the connection was refused before an answer).
async fn hostile_connection(addr: SocketAddr, config: &Arc<ClientConfig>, n: usize) -> Vec<u16> {
    let Ok(mut tls) = tls_connect(addr, config).await else {
        return Vec::new();
    };
    let requests = EMPTY_POST.repeat(n);
    if tls.write_all(&requests).await.is_err() {
        return Vec::new();
    }
    let mut got = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut statuses = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while statuses.len() < n {
        match tokio::time::timeout_at(deadline, tls.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => got.extend_from_slice(&buffer[..k]),
        }
        statuses = status_lines(&got);
    }
    statuses
}

fn status_lines(bytes: &[u8]) -> Vec<u16> {
    let marker = b"HTTP/1.1 ";
    let mut out = Vec::new();
    let mut i = 0;
    while i + marker.len() + 3 <= bytes.len() {
        if bytes[i..].starts_with(marker) && (i == 0 || bytes[i - 1] == b'\n') {
            let code = &bytes[i + marker.len()..i + marker.len() + 3];
            out.push(
                std::str::from_utf8(code)
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0),
            );
            i += marker.len();
        } else {
            i += 1;
        }
    }
    out
}

/// One legitimate bootstrap enrollment on a fresh connection; its latency.
async fn enroll(addr: SocketAddr, config: &Arc<ClientConfig>, n: u64) -> anyhow::Result<Duration> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "bench-device");
    let csr = params.serialize_request(&key)?;
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(csr.der());
    let started = Instant::now();
    let tls = tls_connect(addr, config).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = http::Request::post("/.well-known/est/simpleenroll")
        .header("host", "localhost")
        .header("content-type", "application/pkcs10")
        .header("x-bench-request", n.to_string())
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let _ = response.into_body().collect().await?;
    if status != 200 {
        bail!("legitimate enrollment answered {status}");
    }
    Ok(started.elapsed())
}

struct Latencies {
    p50: f64,
    p99: f64,
    max: f64,
    failed: usize,
    /// Enrollments measured (finished or lost).
    count: usize,
    /// Enrollments that did not finish within [`ATTEMPT`].
    lost: usize,
}

/// Milliseconds, or "> 30 s" for an enrollment that did not finish in time.
fn ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1} ms")
    } else {
        format!("> {} s", ATTEMPT.as_secs())
    }
}

/// IoT Edge gives an enrollment attempt 30 s: one that takes longer counts as lost.
const ATTEMPT: Duration = Duration::from_secs(30);
/// A latency measurement stops after this long, however few enrollments it has.
const PHASE: Duration = Duration::from_secs(120);

async fn legitimate(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    n: usize,
    counter: &AtomicU64,
) -> Latencies {
    let mut ms = Vec::new();
    let mut failed = 0;
    let started = Instant::now();
    for _ in 0..n {
        if started.elapsed() > PHASE {
            break;
        }
        let i = counter.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(ATTEMPT, enroll(addr, config, i)).await {
            Ok(Ok(d)) => ms.push(d.as_secs_f64() * 1000.0),
            Ok(Err(e)) => {
                failed += 1;
                eprintln!("  legitimate enrollment failed: {e:#}");
            }
            // Lost: counted in the percentiles as taking forever.
            Err(_) => ms.push(f64::INFINITY),
        }
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if ms.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
        ms[rank - 1]
    };
    Latencies {
        p50: at(0.50),
        p99: at(0.99),
        max: ms.last().copied().unwrap_or(f64::NAN),
        failed,
        count: ms.len(),
        lost: ms.iter().filter(|v| v.is_infinite()).count(),
    }
}

fn summarize(statuses: &[u16]) -> String {
    let mut counts: std::collections::BTreeMap<u16, usize> = Default::default();
    for s in statuses {
        *counts.entry(*s).or_default() += 1;
    }
    if counts.is_empty() {
        return "no answer (refused at the handshake)".to_owned();
    }
    counts
        .iter()
        .map(|(s, n)| format!("{n}x {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits (at most a minute) until the server has worked off what the attackers left queued.
async fn settle(pid: u32) -> anyhow::Result<()> {
    for _ in 0..120 {
        let cpu0 = procfs::cpu_seconds(pid)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if procfs::cpu_seconds(pid)? - cpu0 < 0.05 {
            break;
        }
    }
    Ok(())
}

pub fn run(args: &HostileArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("est-bench-hostile-{}", std::process::id())),
    };
    let load_at_start = procfs::load_average().unwrap_or(f64::NAN);
    let setup = write_setup(&dir, args.small_chain)?;
    let server = start_server(&args.server_bin, &dir)?;
    let pid = server.child.id();
    let addr = server.addr;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let device = tls_config(&setup.root, &setup.device)?;
    let chain_bytes = |c: &Credential| c.chain.iter().map(|c| c.len()).sum::<usize>();
    println!(
        "est-bench hostile: {} (pid {pid}) on {addr}",
        args.server_bin.display()
    );
    println!(
        "  large hostile chain: {} certificates, {} bytes; small: {} certificates, {} bytes",
        setup.large.chain.len(),
        chain_bytes(&setup.large),
        setup.small.chain.len(),
        chain_bytes(&setup.small)
    );
    let counter = AtomicU64::new(0);
    runtime.block_on(async {
        // Warm up (first connection, lazily built state).
        let _ = legitimate(addr, &device, 3, &counter).await;
        let alone = legitimate(addr, &device, args.enrollments, &counter).await;
        println!(
            "legitimate client alone: p50 {}, p99 {}, max {} ({} enrollments, {} failed)",
            ms(alone.p50), ms(alone.p99), ms(alone.max), alone.count, alone.failed
        );
        for (name, chain) in [("large", &setup.large), ("small", &setup.small)] {
            let hostile = tls_config(&setup.root, chain)?;
            let cpu0 = procfs::cpu_seconds(pid)?;
            let statuses = hostile_connection(addr, &hostile, args.pipeline).await;
            let cpu = procfs::cpu_seconds(pid)? - cpu0;
            println!(
                "{name} hostile chain, one connection, {} pipelined empty POSTs: {}; server CPU {:.1} ms in all, {:.3} ms per request answered",
                args.pipeline,
                summarize(&statuses),
                cpu * 1000.0,
                cpu * 1000.0 / statuses.len().max(1) as f64
            );
            let cpu0 = procfs::cpu_seconds(pid)?;
            let mut all = Vec::new();
            for _ in 0..args.connections {
                all.extend(hostile_connection(addr, &hostile, 1).await);
            }
            let cpu = procfs::cpu_seconds(pid)? - cpu0;
            println!(
                "{name} hostile chain, {} fresh connections of one request: {}; server CPU {:.2} ms per connection (handshake included)",
                args.connections,
                summarize(&all),
                cpu * 1000.0 / args.connections as f64
            );
        }
        for (name, chain) in [("large", &setup.large), ("small", &setup.small)] {
            let hostile = tls_config(&setup.root, chain)?;
            let stop = Arc::new(AtomicBool::new(false));
            let sent = Arc::new(AtomicU64::new(0));
            let mut attackers = Vec::new();
            for _ in 0..2 {
                let (hostile, stop, sent) = (hostile.clone(), stop.clone(), sent.clone());
                let pipeline = args.pipeline;
                attackers.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let answered = hostile_connection(addr, &hostile, pipeline).await;
                        sent.fetch_add(answered.len().max(1) as u64, Ordering::Relaxed);
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let cpu0 = procfs::cpu_seconds(pid)?;
            let started = Instant::now();
            let under = legitimate(addr, &device, args.enrollments, &counter).await;
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = procfs::cpu_seconds(pid)? - cpu0;
            stop.store(true, Ordering::Relaxed);
            for a in attackers {
                a.abort();
            }
            settle(pid).await?;
            println!(
                "legitimate client while two connections send {name} hostile chains: p50 {}, p99 {}, max {} ({} enrollments, {} not done within {} s, {} failed); server busy {:.0} % of one core; {} hostile answers or refusals",
                ms(under.p50),
                ms(under.p99),
                ms(under.max),
                under.count,
                under.lost,
                ATTEMPT.as_secs(),
                under.failed,
                cpu / elapsed * 100.0,
                sent.load(Ordering::Relaxed)
            );
        }
        anyhow::Ok(())
    })?;
    println!(
        "  machine: {} CPUs, {}; load average {:.1} at the start, {:.1} at the end",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned()))
            .unwrap_or_default(),
        load_at_start,
        procfs::load_average().unwrap_or(f64::NAN)
    );
    drop(server);
    Ok(())
}
