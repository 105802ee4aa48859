//! The load generator: workers that enroll (or fetch `cacerts`, ...) against an EST server as
//! fast as the server answers, each request checked, latencies kept and sorted at the end.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};

use crate::procfs;

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// EST base URL up to `/.well-known/est` (a label may follow), e.g.
    /// https://localhost:8085/.well-known/est
    #[arg(value_name = "URL")]
    pub url: Option<String>,
    /// CA certificates (PEM) trusted for the server's TLS certificate.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// HTTP Basic user, sent up front with every request.
    #[arg(long)]
    pub user: Option<String>,
    /// HTTP Basic password.
    #[arg(long, conflicts_with = "password_file")]
    pub password: Option<String>,
    /// File holding the HTTP Basic password (first line).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Client certificate chain (PEM, leaf first) presented in every TLS handshake.
    #[arg(long, requires = "cert_key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    pub cert_key: Option<PathBuf>,
    /// Distinct devices: mint this many client certificates (P-256, CN from --client-cn)
    /// from --client-ca before the clock; request (or issuance) n presents device n mod N's
    /// certificate and asks for its CN, with a CSR key of its own. A fleet re-enrolling.
    #[arg(long, requires_all = ["client_ca", "client_ca_key"], conflicts_with_all = ["cert", "keep_alive", "distinct_keys", "cn"])]
    pub clients: Option<usize>,
    /// CA certificate (PEM, first certificate) that issues the --clients certificates.
    #[arg(long, requires = "clients")]
    pub client_ca: Option<PathBuf>,
    /// Private key (PEM) of --client-ca.
    #[arg(long, requires = "clients")]
    pub client_ca_key: Option<PathBuf>,
    /// CN of the --clients certificates; `{i}` becomes the device's index.
    #[arg(long, default_value = "storm-device-{i}")]
    pub client_cn: String,
    /// Requests (or IoT Edge issuances) in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Stop after this many seconds of measurement.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop after this many requests (issuances with --shape iot-edge).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Request shape: `iot-edge` is POST simpleenroll and GET cacerts at the same time, each
    /// on its own connection, like aziot-certd for every issuance.
    #[arg(long, value_enum, conflicts_with = "op")]
    pub shape: Option<Shape>,
    /// The single operation to send (default simpleenroll).
    #[arg(long, value_enum)]
    pub op: Option<Op>,
    /// Reuse connections (one per worker, two with --shape iot-edge). Default: a fresh TLS
    /// connection per request, as a fleet of devices enrolling once each.
    #[arg(long)]
    pub keep_alive: bool,
    /// Key of the CSRs, generated before the clock starts.
    #[arg(long, value_enum, default_value_t = KeyType::EcP256)]
    pub key: KeyType,
    /// Distinct CSR keys generated, reused round-robin (default 1024 EC, 200 RSA).
    #[arg(long)]
    pub distinct_keys: Option<usize>,
    /// Common name of the CSRs; `{i}` becomes the key's index. Default: the client
    /// certificate's CN (what a device renewing asks for), else `bench-{i}`.
    #[arg(long)]
    pub cn: Option<String>,
    /// The server's process id: report its CPU seconds per request and its RSS. Repeat (or
    /// separate with commas) for a chain of servers: their CPU is added up.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// With --server-pid: sample the (first) server's RSS every this many completed requests.
    #[arg(long)]
    pub rss_every: Option<u64>,
    /// Requests sent (and not counted) before the clock starts: warm caches and pools.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Per-request deadline, seconds (connection, handshake and answer).
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Allow TLS session resumption between fresh connections (default: full handshakes).
    #[arg(long)]
    pub tls_resume: bool,
    /// Client runtime threads (default: the number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Allow a target that is not on the loopback interface.
    #[arg(long)]
    pub allow_remote: bool,
    /// A name for this run, carried into the JSON output.
    #[arg(long)]
    pub name: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON object into this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    IotEdge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Simpleenroll,
    Simplereenroll,
    Cacerts,
    Csrattrs,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Simpleenroll => "simpleenroll",
            Op::Simplereenroll => "simplereenroll",
            Op::Cacerts => "cacerts",
            Op::Csrattrs => "csrattrs",
        }
    }

    fn posts_csr(self) -> bool {
        matches!(self, Op::Simpleenroll | Op::Simplereenroll)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KeyType {
    EcP256,
    #[value(name = "rsa-2048")]
    Rsa2048,
}

/// A CSR made before the clock starts: the request body as IoT Edge sends it, and the key it
/// asks a certificate for (the answer's first certificate must carry it).
struct PreparedCsr {
    body: Bytes,
    spki: Vec<u8>,
}

/// Everything a worker needs, shared.
struct Ctx {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    host_header: String,
    base_path: String,
    /// One per device (--clients), else one.
    connectors: Vec<tokio_rustls::TlsConnector>,
    authorization: Option<String>,
    keep_alive: bool,
    timeout: Duration,
    csrs: Vec<PreparedCsr>,
}

/// How many requests may still start, and until when.
struct Plan {
    limit: Option<u64>,
    deadline: Option<Instant>,
    next: AtomicU64,
    completed: AtomicU64,
}

impl Plan {
    fn new(limit: Option<u64>, duration: Option<Duration>) -> Plan {
        Plan {
            limit,
            deadline: duration.map(|d| Instant::now() + d),
            next: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        }
    }

    fn ticket(&self) -> Option<u64> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        match self.limit {
            Some(limit) if n >= limit => None,
            _ => Some(n),
        }
    }
}

/// Why a request did not get a right answer.
enum Failure {
    /// The server answered with another status than expected.
    Status(u16),
    /// The server answered, wrongly (media type, encoding, certificate).
    Answer(&'static str),
    /// No answer: connect, TLS, HTTP or timeout, with the kind.
    Transport(&'static str, String),
}

impl Failure {
    fn key(&self, op: Op) -> String {
        match self {
            Failure::Status(s) => format!("{}: status {s}", op.as_str()),
            Failure::Answer(what) => format!("{}: wrong answer: {what}", op.as_str()),
            Failure::Transport(stage, kind) => {
                format!("{}: transport {stage}: {kind}", op.as_str())
            }
        }
    }
}

fn io_kind(e: &std::io::Error) -> String {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return format!("{tls:?}");
    }
    format!("{:?}", e.kind())
}

fn hyper_kind(e: &hyper::Error) -> String {
    let kind = if e.is_canceled() {
        "canceled"
    } else if e.is_closed() {
        "closed"
    } else if e.is_incomplete_message() {
        "incomplete message"
    } else if e.is_parse() {
        "parse"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_body_write_aborted() {
        "body write aborted"
    } else {
        "other"
    };
    kind.to_owned()
}

/// Per-worker tallies, merged at the end.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    ok: u64,
    failed: u64,
    http_requests: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.ok += other.ok;
        self.failed += other.failed;
        self.http_requests += other.http_requests;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    fn note(&mut self, op: Op, result: &Result<(), Failure>) -> bool {
        self.http_requests += 1;
        match result {
            Ok(()) => true,
            Err(f) => {
                *self.errors.entry(f.key(op)).or_default() += 1;
                false
            }
        }
    }
}

/// The JSON result of one run (also read back by `est-bench summary`).
#[derive(Debug, Serialize, Deserialize)]
pub struct LoadReport {
    pub name: Option<String>,
    pub target: String,
    /// `simpleenroll`, `cacerts`, ... or `iot-edge` (simpleenroll + cacerts per unit).
    pub operation: String,
    /// `fresh` (a TLS connection per request) or `keep-alive`.
    pub connection: String,
    pub concurrency: usize,
    /// What the CSRs were: key type and how many distinct keys.
    pub csr_key: String,
    pub distinct_keys: usize,
    pub duration_s: f64,
    /// Units completed (requests, or issuances for iot-edge), right and wrong.
    pub completed: u64,
    pub ok: u64,
    pub failed: u64,
    pub http_requests: u64,
    /// Right answers per second.
    pub rate: f64,
    pub latency_ms: Latency,
    pub errors: BTreeMap<String, u64>,
    /// Server CPU per completed unit, all `--server-pid` processes together, µs.
    pub server_cpu_us_per_unit: Option<f64>,
    /// 1 / server CPU per unit: what one core of server CPU sustains.
    pub units_per_core_s: Option<f64>,
    pub servers: Vec<ServerReport>,
    /// This process's CPU per completed unit, µs.
    pub client_cpu_us_per_unit: f64,
    /// The machine's 1-minute load average at the end of the run.
    pub load_average: Option<f64>,
    /// CPU used during the run by other processes than this one and the `--server-pid`
    /// ones, as a share of all the machine's CPUs: how disturbed the measurement was.
    pub other_cpu_share: Option<f64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServerReport {
    pub pid: u32,
    pub cpu_s: f64,
    pub cpu_us_per_unit: f64,
    pub memory_before: procfs::Memory,
    pub memory_after: procfs::Memory,
    /// (completed units, VmRSS KiB) samples, with --rss-every.
    pub rss_samples: Vec<(u64, u64)>,
    /// Voluntary context switches of the server's threads per completed unit (wake-ups).
    #[serde(default)]
    pub voluntary_switches_per_unit: Option<f64>,
    /// Involuntary context switches per completed unit (preemptions).
    #[serde(default)]
    pub involuntary_switches_per_unit: Option<f64>,
}

pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    let url = args.url.as_deref().context(
        "no target: give the EST base URL (https://localhost:PORT/.well-known/est[/label]) or a \
         subcommand (floor, pki, summary); see --help",
    )?;
    if args.duration.is_none() && args.requests.is_none() {
        bail!("refusing an unbounded run: give --duration SECONDS and/or --requests N");
    }
    if args.duration.is_some_and(|d| !(d > 0.0 && d.is_finite())) {
        bail!("--duration must be a positive number of seconds");
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let uri: http::Uri = url.parse().with_context(|| format!("{url} is not a URL"))?;
    if uri.scheme_str() != Some("https") {
        bail!("{url}: EST is served over https://");
    }
    let host = uri
        .host()
        .context("the URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let addr = resolve(&host, port, args.allow_remote)?;
    let server_name = ServerName::try_from(host.clone())
        .with_context(|| format!("{host} is not a valid TLS server name"))?;
    let host_header = match uri.port_u16() {
        Some(p) if host.contains(':') => format!("[{host}]:{p}"),
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let base_path = uri.path().trim_end_matches('/').to_owned();

    let tls = client_config(&args)?;
    let authorization = match (&args.user, password(&args)?) {
        (Some(user), Some(password)) => Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )),
        (None, None) => None,
        _ => bail!("--user and --password (or --password-file) go together"),
    };

    let (op, iot_edge) = match args.shape {
        Some(Shape::IotEdge) => (Op::Simpleenroll, true),
        None => (args.op.unwrap_or(Op::Simpleenroll), false),
    };
    let needs_csr = iot_edge || op.posts_csr();
    let distinct = args
        .clients
        .or(args.distinct_keys)
        .unwrap_or(match args.key {
            KeyType::EcP256 => 1024,
            KeyType::Rsa2048 => 200,
        });
    let client_cn = match &args.cert {
        Some(path) => client_cn(path)?,
        None => None,
    };
    let cn_template = args
        .cn
        .clone()
        .or(client_cn)
        .or(args.clients.map(|_| args.client_cn.clone()))
        .unwrap_or_else(|| "bench-{i}".to_owned());
    let csrs = if needs_csr {
        let started = Instant::now();
        let csrs = prepare_csrs(args.key, distinct.max(1), &cn_template)?;
        if !args.json {
            eprintln!(
                "prepared {} CSRs ({}) in {:.1} s before the clock; they are reused round-robin",
                csrs.len(),
                key_name(args.key),
                started.elapsed().as_secs_f64()
            );
        }
        csrs
    } else {
        Vec::new()
    };

    let connectors = match args.clients {
        Some(n) => {
            let started = Instant::now();
            let configs = device_configs(&args, &tls, n)?;
            if !args.json {
                eprintln!(
                    "minted {n} device certificates in {:.1} s before the clock",
                    started.elapsed().as_secs_f64()
                );
            }
            configs
        }
        None => vec![Arc::new(tls)],
    };
    let ctx = Arc::new(Ctx {
        addr,
        server_name,
        host_header,
        base_path,
        connectors: connectors
            .into_iter()
            .map(tokio_rustls::TlsConnector::from)
            .collect(),
        authorization,
        keep_alive: args.keep_alive,
        timeout: Duration::from_secs_f64(args.timeout),
        csrs,
    });

    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;

    if args.warmup > 0 {
        let plan = Arc::new(Plan::new(Some(args.warmup), None));
        let tally = runtime.block_on(drive(ctx.clone(), plan, args.concurrency, op, iot_edge));
        if !args.json {
            eprintln!("warm-up: {} of {} right", tally.ok, tally.ok + tally.failed);
        }
    }

    if args.rss_every.is_some() && args.server_pid.is_empty() {
        bail!("--rss-every needs --server-pid");
    }
    let servers_before = args
        .server_pid
        .iter()
        .map(|&pid| -> anyhow::Result<ServerBefore> {
            Ok((
                pid,
                procfs::cpu_seconds(pid).with_context(|| format!("reading /proc/{pid}/stat"))?,
                procfs::memory(pid)?,
                procfs::context_switches(pid),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client_cpu_before = procfs::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let machine_before = procfs::machine_busy_seconds();
    let plan = Arc::new(Plan::new(
        args.requests,
        args.duration.map(Duration::from_secs_f64),
    ));
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = match (args.server_pid.first().copied(), args.rss_every) {
        (Some(pid), Some(every)) if every > 0 => {
            let plan = plan.clone();
            let done = done.clone();
            Some(runtime.spawn(sample_rss(pid, every, plan, done)))
        }
        _ => None,
    };
    let mut tally = runtime.block_on(drive(
        ctx.clone(),
        plan.clone(),
        args.concurrency,
        op,
        iot_edge,
    ));
    let elapsed = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let mut rss_samples = match sampler {
        Some(handle) => runtime.block_on(handle).unwrap_or_default(),
        None => Vec::new(),
    };
    let client_cpu = procfs::cpu_seconds(std::process::id()).unwrap_or(0.0) - client_cpu_before;
    let machine = match (machine_before, procfs::machine_busy_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };

    let completed = tally.ok + tally.failed;
    let mut servers = Vec::new();
    for (i, (pid, cpu_before, memory_before, switches_before)) in
        servers_before.into_iter().enumerate()
    {
        let cpu_s = procfs::cpu_seconds(pid)? - cpu_before;
        let switches = match (switches_before, procfs::context_switches(pid)) {
            (Some((v0, i0)), Some((v1, i1))) => Some((
                v1.saturating_sub(v0) as f64 / completed.max(1) as f64,
                i1.saturating_sub(i0) as f64 / completed.max(1) as f64,
            )),
            _ => None,
        };
        let memory_after = procfs::memory(pid)?;
        let samples = if i == 0 && args.rss_every.is_some() {
            let mut samples = std::mem::take(&mut rss_samples);
            if samples.last().is_none_or(|(n, _)| *n < completed) {
                samples.push((completed, memory_after.rss_kib));
            }
            samples
        } else {
            Vec::new()
        };
        servers.push(ServerReport {
            pid,
            cpu_s,
            cpu_us_per_unit: cpu_s / completed.max(1) as f64 * 1e6,
            memory_before,
            memory_after,
            rss_samples: samples,
            voluntary_switches_per_unit: switches.map(|s| s.0),
            involuntary_switches_per_unit: switches.map(|s| s.1),
        });
    }
    let server_cpu_us_per_unit =
        (!servers.is_empty()).then(|| servers.iter().map(|s| s.cpu_us_per_unit).sum::<f64>());
    let units_per_core_s = server_cpu_us_per_unit
        .filter(|&us| us > 0.0)
        .map(|us| 1e6 / us);

    let servers_cpu: f64 = servers.iter().map(|s| s.cpu_s).sum();
    tally.latencies_us.sort_unstable();
    let latency = latency(&tally.latencies_us);
    let report = LoadReport {
        name: args.name.clone(),
        target: url.to_owned(),
        operation: if iot_edge {
            "iot-edge".to_owned()
        } else {
            op.as_str().to_owned()
        },
        connection: if args.keep_alive {
            "keep-alive".to_owned()
        } else {
            "fresh".to_owned()
        },
        concurrency: args.concurrency,
        csr_key: if needs_csr {
            key_name(args.key).to_owned()
        } else {
            "-".to_owned()
        },
        distinct_keys: ctx.csrs.len(),
        duration_s: elapsed,
        completed,
        ok: tally.ok,
        failed: tally.failed,
        http_requests: tally.http_requests,
        rate: tally.ok as f64 / elapsed,
        latency_ms: latency,
        errors: std::mem::take(&mut tally.errors),
        server_cpu_us_per_unit,
        units_per_core_s,
        servers,
        client_cpu_us_per_unit: client_cpu / completed.max(1) as f64 * 1e6,
        load_average: procfs::load_average(),
        other_cpu_share: machine.map(|busy| {
            let ours = client_cpu + servers_cpu;
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            ((busy - ours) / (elapsed * cpus as f64)).max(0.0)
        }),
    };
    crate::emit(&report, args.json_out.as_deref(), args.json, print_report)?;
    runtime.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}

/// A server's pid, CPU seconds, memory and context switches when the clock starts.
type ServerBefore = (u32, f64, procfs::Memory, Option<(u64, u64)>);

/// Resolves the target and refuses anything but loopback unless allowed; of the addresses,
/// takes the first that accepts a connection (localhost may resolve to ::1 first while the
/// server listens on 127.0.0.1 only).
fn resolve(host: &str, port: u16, allow_remote: bool) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}"))?
        .collect();
    if addrs.is_empty() {
        bail!("{host} resolves to no address");
    }
    if !allow_remote {
        if let Some(remote) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            bail!(
                "{host} resolves to {}, which is not a loopback address; est-bench only loads \
                 loopback targets unless --allow-remote is given",
                remote.ip()
            );
        }
    }
    let mut last = None;
    for addr in &addrs {
        match std::net::TcpStream::connect_timeout(addr, Duration::from_secs(2)) {
            Ok(_) => return Ok(*addr),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(anyhow::anyhow!("cannot connect to {host}:{port}: {e}")),
        None => bail!("cannot connect to {host}:{port}"),
    }
}

fn password(args: &LoadArgs) -> anyhow::Result<Option<String>> {
    if let Some(p) = &args.password {
        return Ok(Some(p.clone()));
    }
    match &args.password_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(text.lines().next().unwrap_or_default().to_owned()))
        }
        None => Ok(None),
    }
}

fn client_config(args: &LoadArgs) -> anyhow::Result<ClientConfig> {
    let roots = server_roots(args)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    let mut config = match (&args.cert, &args.cert_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    if !args.tls_resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(config)
}

/// The CAs trusted for the server's TLS certificate (--cacert).
fn server_roots(args: &LoadArgs) -> anyhow::Result<Arc<RootCertStore>> {
    let cacert = args
        .cacert
        .as_ref()
        .context("--cacert is required: the CA that issued the server's TLS certificate")?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cacert)
        .with_context(|| format!("reading {}", cacert.display()))?
    {
        roots.add(cert?)?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate", cacert.display());
    }
    Ok(Arc::new(roots))
}

/// `n` client configurations as `base` (roots, resumption), each with a client certificate
/// of its own: a P-256 key and a certificate from --client-ca, CN --client-cn with `{i}`
/// replaced, clientAuth, valid from an hour ago for a year.
fn device_configs(
    args: &LoadArgs,
    base: &ClientConfig,
    n: usize,
) -> anyhow::Result<Vec<Arc<ClientConfig>>> {
    let (Some(ca), Some(ca_key)) = (&args.client_ca, &args.client_ca_key) else {
        bail!("--clients needs --client-ca and --client-ca-key");
    };
    if n == 0 {
        bail!("--clients must be at least 1");
    }
    let ca_pem =
        std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
    let ca_key =
        std::fs::read_to_string(ca_key).with_context(|| format!("reading {}", ca_key.display()))?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key)?)
        .with_context(|| format!("{}: not a CA certificate for that key", ca.display()))?;
    let roots = server_roots(args)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let now = time::OffsetDateTime::now_utc();
    (0..n)
        .map(|i| -> anyhow::Result<Arc<ClientConfig>> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(
                DnType::CommonName,
                args.client_cn.replace("{i}", &i.to_string()),
            );
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + time::Duration::days(365);
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &issuer)?;
            let mut config = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(
                    vec![cert.der().clone()],
                    PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| anyhow::anyhow!(e))?,
                )?;
            config.resumption = base.resumption.clone();
            Ok(Arc::new(config))
        })
        .collect()
}

/// The CN of a client certificate file's first certificate.
fn client_cn(path: &PathBuf) -> anyhow::Result<Option<String>> {
    let first = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .next()
        .context("no certificate in --cert")??;
    let (_, cert) = x509_parser::parse_x509_certificate(&first)
        .map_err(|e| anyhow::anyhow!("--cert: unparseable certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Ok(cn)
}

fn key_name(key: KeyType) -> &'static str {
    match key {
        KeyType::EcP256 => "EC P-256",
        KeyType::Rsa2048 => "RSA-2048",
    }
}

/// Generates `n` CSRs on every core (RSA key generation takes tens of milliseconds each).
fn prepare_csrs(key: KeyType, n: usize, cn_template: &str) -> anyhow::Result<Vec<PreparedCsr>> {
    let alg = match key {
        KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(n);
    let make = |i: usize| -> anyhow::Result<PreparedCsr> {
        let key = KeyPair::generate_for(alg)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            cn_template.replace("{i}", &i.to_string()),
        );
        let der = params.serialize_request(&key)?.der().to_vec();
        Ok(PreparedCsr {
            body: Bytes::from(iot_edge_body(&der)),
            spki: rcgen::PublicKeyData::subject_public_key_info(&key),
        })
    };
    let mut out: Vec<Option<PreparedCsr>> = (0..n).map(|_| None).collect();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let chunk = n.div_ceil(threads);
        let handles: Vec<_> = out
            .chunks_mut(chunk)
            .enumerate()
            .map(|(c, slots)| {
                let make = &make;
                scope.spawn(move || -> anyhow::Result<()> {
                    for (j, slot) in slots.iter_mut().enumerate() {
                        *slot = Some(make(c * chunk + j)?);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("CSR generation panicked"))??;
        }
        Ok(())
    })?;
    Ok(out.into_iter().flatten().collect())
}

/// Base64 of the DER in 64-column lines, each ending in LF: what aziot-certd sends.
fn iot_edge_body(der: &[u8]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = Vec::with_capacity(b64.len() + b64.len() / 64 + 1);
    for line in b64.as_bytes().chunks(64) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out
}

async fn drive(
    ctx: Arc<Ctx>,
    plan: Arc<Plan>,
    concurrency: usize,
    op: Op,
    iot_edge: bool,
) -> Tally {
    let workers: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(worker(ctx.clone(), plan.clone(), op, iot_edge)))
        .collect();
    let mut tally = Tally::default();
    for w in workers {
        if let Ok(t) = w.await {
            tally.merge(t);
        }
    }
    tally
}

async fn worker(ctx: Arc<Ctx>, plan: Arc<Plan>, op: Op, iot_edge: bool) -> Tally {
    let mut tally = Tally::default();
    let mut first: Option<SendRequest<Full<Bytes>>> = None;
    let mut second: Option<SendRequest<Full<Bytes>>> = None;
    while let Some(n) = plan.ticket() {
        let started = Instant::now();
        let right = if iot_edge {
            let (enroll, cacerts) = tokio::join!(
                one(&ctx, Op::Simpleenroll, n, &mut first),
                one(&ctx, Op::Cacerts, n, &mut second)
            );
            let a = tally.note(Op::Simpleenroll, &enroll);
            let b = tally.note(Op::Cacerts, &cacerts);
            a && b
        } else {
            let result = one(&ctx, op, n, &mut first).await;
            tally.note(op, &result)
        };
        let us = started.elapsed().as_micros();
        tally
            .latencies_us
            .push(u32::try_from(us).unwrap_or(u32::MAX));
        if right {
            tally.ok += 1;
        } else {
            tally.failed += 1;
        }
        plan.completed.fetch_add(1, Ordering::Relaxed);
    }
    tally
}

/// One request of `op` with CSR number `n`, on the kept connection or a fresh one.
async fn one(
    ctx: &Ctx,
    op: Op,
    n: u64,
    kept: &mut Option<SendRequest<Full<Bytes>>>,
) -> Result<(), Failure> {
    let exchange = async {
        let mut sender = match kept.take() {
            Some(mut s) if ctx.keep_alive => match s.ready().await {
                Ok(()) => s,
                // The server closed the idle connection: not a failure, reconnect.
                Err(_) => connect(ctx, n).await?,
            },
            _ => connect(ctx, n).await?,
        };
        let csr = if op.posts_csr() {
            Some(&ctx.csrs[(n % ctx.csrs.len() as u64) as usize])
        } else {
            None
        };
        let request = request(ctx, op, csr);
        sender
            .ready()
            .await
            .map_err(|e| Failure::Transport("http", hyper_kind(&e)))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Failure::Transport("http", hyper_kind(&e)))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes().to_vec());
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure::Transport("body", hyper_kind(&e)))?
            .to_bytes();
        if ctx.keep_alive {
            *kept = Some(sender);
        }
        check(op, status, content_type.as_deref(), &body, csr)
    };
    match tokio::time::timeout(ctx.timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Transport("timeout", "deadline".to_owned())),
    }
}

/// A fresh connection presenting the client certificate of request `n`'s device.
async fn connect(ctx: &Ctx, n: u64) -> Result<SendRequest<Full<Bytes>>, Failure> {
    let tcp = tokio::net::TcpStream::connect(ctx.addr)
        .await
        .map_err(|e| Failure::Transport("connect", io_kind(&e)))?;
    let _ = tcp.set_nodelay(true);
    let tls = ctx.connectors[(n % ctx.connectors.len() as u64) as usize]
        .connect(ctx.server_name.clone(), tcp)
        .await
        .map_err(|e| Failure::Transport("tls", io_kind(&e)))?;
    let (sender, connection) = http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| Failure::Transport("http", hyper_kind(&e)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

fn request(ctx: &Ctx, op: Op, csr: Option<&PreparedCsr>) -> http::Request<Full<Bytes>> {
    let method = if op.posts_csr() { "POST" } else { "GET" };
    let mut builder = http::Request::builder()
        .method(method)
        .uri(format!("{}/{}", ctx.base_path, op.as_str()))
        .header("host", &ctx.host_header);
    if let Some(auth) = &ctx.authorization {
        builder = builder.header("authorization", auth);
    }
    let body = match csr {
        Some(csr) => {
            builder = builder
                .header("content-type", "application/pkcs10")
                .header("content-transfer-encoding", "base64")
                .header("content-length", csr.body.len());
            csr.body.clone()
        }
        None => Bytes::new(),
    };
    builder
        .body(Full::new(body))
        .unwrap_or_else(|_| http::Request::new(Full::new(Bytes::new())))
}

/// Whether an answer is right: the status, the media type, a base64 certs-only PKCS#7 whose
/// first certificate is for the CSR's key.
fn check(
    op: Op,
    status: u16,
    content_type: Option<&[u8]>,
    body: &[u8],
    csr: Option<&PreparedCsr>,
) -> Result<(), Failure> {
    if op == Op::Csrattrs {
        return match status {
            204 => Ok(()),
            200 if content_type.is_some_and(|c| c.starts_with(b"application/csrattrs")) => {
                edge_est::est::body::decode_base64_body(body)
                    .map(|_| ())
                    .map_err(|_| Failure::Answer("not base64"))
            }
            200 => Err(Failure::Answer("media type")),
            s => Err(Failure::Status(s)),
        };
    }
    if status != 200 {
        return Err(Failure::Status(status));
    }
    let pkcs7 = content_type.is_some_and(|c| {
        c == b"application/pkcs7-mime" || c.starts_with(b"application/pkcs7-mime;")
    });
    if !pkcs7 {
        return Err(Failure::Answer("media type"));
    }
    let der =
        edge_est::est::body::decode_base64_body(body).map_err(|_| Failure::Answer("not base64"))?;
    let certs = edge_est::est::pkcs7::decode_certs_only(&der)
        .map_err(|_| Failure::Answer("not certs-only PKCS#7"))?;
    let first = certs.first().ok_or(Failure::Answer("no certificate"))?;
    if let Some(csr) = csr {
        if !first
            .windows(csr.spki.len())
            .any(|w| w == csr.spki.as_slice())
        {
            return Err(Failure::Answer(
                "first certificate is not for the CSR's key",
            ));
        }
    }
    Ok(())
}

async fn sample_rss(
    pid: u32,
    every: u64,
    plan: Arc<Plan>,
    done: Arc<AtomicBool>,
) -> Vec<(u64, u64)> {
    let mut samples = Vec::new();
    let mut mark = every;
    loop {
        let completed = plan.completed.load(Ordering::Relaxed);
        if completed >= mark {
            if let Ok(m) = procfs::memory(pid) {
                samples.push((completed, m.rss_kib));
            }
            while mark <= completed {
                mark += every;
            }
        }
        if done.load(Ordering::Relaxed) {
            return samples;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn latency(sorted_us: &[u32]) -> Latency {
    if sorted_us.is_empty() {
        return Latency::default();
    }
    let at = |q: f64| -> f64 {
        let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
        f64::from(sorted_us[rank - 1]) / 1000.0
    };
    let sum: u64 = sorted_us.iter().map(|&v| u64::from(v)).sum();
    Latency {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: f64::from(sorted_us[sorted_us.len() - 1]) / 1000.0,
        mean: sum as f64 / sorted_us.len() as f64 / 1000.0,
    }
}

fn print_report(r: &LoadReport) {
    let unit = if r.operation == "iot-edge" {
        "issuances"
    } else {
        "requests"
    };
    println!(
        "est-bench: {}  {}  {} connection{}  concurrency {}",
        r.target,
        r.operation,
        r.connection,
        if r.connection == "fresh" {
            " per request"
        } else {
            "s"
        },
        r.concurrency
    );
    if r.distinct_keys > 0 {
        println!(
            "  CSRs: {} distinct {} keys, generated before the clock, reused round-robin",
            r.distinct_keys, r.csr_key
        );
    }
    println!(
        "  {} {unit} in {:.2} s: {} right, {} wrong  ->  {:.1} {unit}/s ({} HTTP requests)",
        r.completed, r.duration_s, r.ok, r.failed, r.rate, r.http_requests
    );
    println!(
        "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  (mean {:.2})",
        r.latency_ms.p50, r.latency_ms.p90, r.latency_ms.p99, r.latency_ms.max, r.latency_ms.mean
    );
    if r.errors.is_empty() {
        println!("  errors: none");
    } else {
        println!("  errors:");
        let mut errors: Vec<_> = r.errors.iter().collect();
        errors.sort_by(|a, b| b.1.cmp(a.1));
        for (what, n) in errors {
            println!("    {n:>8}  {what}");
        }
    }
    let one = unit.trim_end_matches('s');
    for s in &r.servers {
        println!(
            "  server pid {}: {:.2} CPU s = {:.0} µs per {one}; VmRSS {:.1} MiB before, {:.1} MiB \
             after, VmHWM {:.1} MiB",
            s.pid,
            s.cpu_s,
            s.cpu_us_per_unit,
            s.memory_before.rss_kib as f64 / 1024.0,
            s.memory_after.rss_kib as f64 / 1024.0,
            s.memory_after.hwm_kib as f64 / 1024.0
        );
        if let (Some(v), Some(i)) = (
            s.voluntary_switches_per_unit,
            s.involuntary_switches_per_unit,
        ) {
            println!(
                "    context switches per {one}: {v:.2} voluntary (wake-ups), {i:.2} involuntary"
            );
        }
        if !s.rss_samples.is_empty() {
            let samples: Vec<String> = s
                .rss_samples
                .iter()
                .map(|(n, kib)| format!("{n}: {:.1}", *kib as f64 / 1024.0))
                .collect();
            println!("    VmRSS MiB by completed {unit}: {}", samples.join(", "));
        }
    }
    if let (Some(us), Some(per_core)) = (r.server_cpu_us_per_unit, r.units_per_core_s) {
        println!(
            "  server CPU: {us:.0} µs per {one} -> {per_core:.0} {unit}/s per core of server CPU"
        );
    }
    println!(
        "  client (this process): {:.0} µs CPU per {}; other processes used {} of the \
         machine's CPU",
        r.client_cpu_us_per_unit,
        unit.trim_end_matches('s'),
        r.other_cpu_share
            .map_or_else(|| "unknown".to_owned(), |l| format!("{:.0} %", l * 100.0))
    );
}
