//! `est-bench token`: what a key in a PKCS#11 token (SoftHSM2 by default) costs edge-est, next
//! to the same kind of key in a file, in this process and without sockets: the issuing
//! signature (edge-est's `IssuerKey`, as the local issuer signs a certificate) and the TLS 1.3
//! full handshake with edge-est's own server configuration (`transport::tls::server_config`,
//! the token key signing the CertificateVerify). Each on one thread (µs per operation, wall and
//! this thread's CPU, SoftHSM included: it runs in this thread) and on `--threads` threads at
//! once (operations per second: the session pool at work).
//!
//! The token is made here (a SoftHSM2 token directory in a temporary directory, the key pair
//! generated inside the token, EC P-256), so the run needs nothing but the library.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use edge_est::keys::{IssuerKey, PrivateKey, TokenKey};
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};

#[derive(clap::Args)]
pub struct TokenArgs {
    /// The PKCS#11 library: SoftHSM2 (its token directory is made here).
    #[arg(long, default_value = "/usr/lib/softhsm/libsofthsm2.so")]
    module: PathBuf,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Threads for the concurrent measurements.
    #[arg(long, default_value_t = 16)]
    threads: usize,
}

const PIN: &str = "bench-1234";

/// A P-256 public key read from the token.
struct TokenPublic(Vec<u8>);

impl PublicKeyData for TokenPublic {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A fresh SoftHSM2 token `bench` with an EC P-256 key pair `server` generated in it.
fn token(module: &Path, dir: &Path) -> anyhow::Result<TokenPublic> {
    std::fs::create_dir_all(dir.join("tokens"))?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        ),
    )?;
    // Before the library is loaded, while this is the only thread.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let ctx = edge_est::keys::pkcs11::module(module).map_err(|e| anyhow::anyhow!("{e}"))?;
    let slot = ctx
        .get_all_slots()?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|t| !t.token_initialized()))
        .context("no free slot")?;
    ctx.init_token(slot, &AuthPin::from("bench-so"), "bench")?;
    let slot = ctx
        .get_slots_with_initialized_token()?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|t| t.label() == "bench"))
        .context("the new token")?;
    let session = ctx.open_rw_session(slot)?;
    session.login(UserType::So, Some(&AuthPin::from("bench-so")))?;
    session.init_pin(&AuthPin::from(PIN))?;
    session.logout()?;
    session.login(UserType::User, Some(&AuthPin::from(PIN)))?;
    let label = Attribute::Label(b"server".to_vec());
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let (public, _) = session.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::Token(true),
            Attribute::Verify(true),
            Attribute::EcParams(p256),
            label.clone(),
        ],
        &[
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            label,
        ],
    )?;
    let point = match session
        .get_attributes(public, &[AttributeType::EcPoint])?
        .first()
    {
        Some(Attribute::EcPoint(p)) if p.len() > 2 => p[2..].to_vec(),
        other => bail!("no EC point: {other:?}"),
    };
    session.logout()?;
    Ok(TokenPublic(point))
}

/// A localhost server certificate for `key` from `ca`, with the CA: PEM chain.
fn server_chain(
    key: &impl PublicKeyData,
    ca: &rcgen::Issuer<'_, KeyPair>,
    ca_pem: &str,
) -> anyhow::Result<String> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.subject_alt_names = vec![SanType::DnsName("localhost".try_into()?)];
    let cert = params.signed_by(key, ca)?;
    Ok(format!("{}{ca_pem}", cert.pem()))
}

/// One full TLS 1.3 handshake in memory.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<rustls::ServerConfig>) -> anyhow::Result<()> {
    let mut c = ClientConnection::new(client.clone(), ServerName::try_from("localhost")?)?;
    let mut s = ServerConnection::new(server.clone())?;
    let mut wire = Vec::with_capacity(16 * 1024);
    for _ in 0..20 {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire)?;
        }
        let mut input = wire.as_slice();
        while !input.is_empty() {
            s.read_tls(&mut input)?;
            s.process_new_packets()?;
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire)?;
        }
        let mut input = wire.as_slice();
        while !input.is_empty() {
            c.read_tls(&mut input)?;
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            return Ok(());
        }
    }
    bail!("the in-memory handshake did not complete")
}

/// (wall µs, CPU µs of this thread) per call of `f`, over about `seconds`.
fn one_thread(
    seconds: f64,
    f: &(dyn Fn() -> anyhow::Result<()> + Sync),
) -> anyhow::Result<(f64, f64)> {
    for _ in 0..5 {
        f()?;
    }
    let wall = Instant::now();
    let cpu = crate::procfs::thread_cpu_ns();
    let mut n = 0u64;
    while n < 20 || wall.elapsed().as_secs_f64() < seconds {
        f()?;
        n += 1;
    }
    let wall = wall.elapsed().as_secs_f64();
    let cpu = match (cpu, crate::procfs::thread_cpu_ns()) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e9,
        _ => wall,
    };
    Ok((wall * 1e6 / n as f64, cpu * 1e6 / n as f64))
}

/// Calls of `f` per second on `threads` threads at once, over about `seconds`.
fn concurrent(
    seconds: f64,
    threads: usize,
    f: &(dyn Fn() -> anyhow::Result<()> + Sync),
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let total: anyhow::Result<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<u64> {
                    let mut n = 0;
                    while Instant::now() < until {
                        f()?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?)
            .sum()
    });
    Ok(total? as f64 / start.elapsed().as_secs_f64())
}

pub fn run(args: &TokenArgs) -> anyhow::Result<()> {
    if !args.module.exists() {
        bail!(
            "{}: no such PKCS#11 library (apt-get install softhsm2)",
            args.module.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("est-bench-token-{}", std::process::id()));
    let public = token(&args.module, &dir)?;

    let ca_key = KeyPair::generate()?;
    let ca_params = edge_est::pki::ca_params("bench CA", Some(0), time::Duration::days(30));
    let ca_pem = ca_params.self_signed(&ca_key)?.pem();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let file_key = KeyPair::generate()?;
    let file_chain = server_chain(&file_key, &ca, &ca_pem)?;
    let token_chain = server_chain(&public, &ca, &ca_pem)?;
    let uri = format!("pkcs11:token=bench;object=server?pin-value={PIN}");
    let token_key = TokenKey::open(&uri, Some(&args.module), &token_chain)
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let issuers = [
        (
            "file",
            IssuerKey::File(KeyPair::from_pem(&file_key.serialize_pem())?),
        ),
        ("token", IssuerKey::Token(token_key.clone())),
    ];
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let client = Arc::new(
        ClientConfig::builder_with_provider(edge_est::transport::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let servers = [
        (
            "file",
            edge_est::transport::tls::server_config(
                &file_chain,
                &PrivateKey::Pem(file_key.serialize_pem()),
            )
            .map_err(anyhow::Error::msg)?,
        ),
        (
            "token",
            edge_est::transport::tls::server_config(&token_chain, &PrivateKey::Token(token_key))
                .map_err(anyhow::Error::msg)?,
        ),
    ];

    println!(
        "PKCS#11 key costs, in process ({}; {} CPUs; load average {}; module {})",
        crate::floor::cpu_model(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        args.module.display()
    );
    println!(
        "{:<34} {:>6} {:>12} {:>12} {:>16}",
        "operation",
        "key",
        "wall µs/op",
        "CPU µs/op",
        format!("ops/s, {} threads", args.threads)
    );
    let tbs = vec![0x5au8; 400];
    for (name, key) in &issuers {
        let sign = || -> anyhow::Result<()> {
            rcgen::SigningKey::sign(key, &tbs).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(())
        };
        let (wall, cpu) = one_thread(args.seconds, &sign)?;
        let rate = concurrent(args.seconds, args.threads, &sign)?;
        println!(
            "{:<34} {:>6} {:>12.0} {:>12.0} {:>16.0}",
            "issuing signature (ECDSA P-256)", name, wall, cpu, rate
        );
    }
    for (name, server) in &servers {
        let server = Arc::new(server.clone());
        let once = || handshake(&client, &server);
        let (wall, cpu) = one_thread(args.seconds, &once)?;
        let rate = concurrent(args.seconds, args.threads, &once)?;
        println!(
            "{:<34} {:>6} {:>12.0} {:>12.0} {:>16.0}",
            "TLS 1.3 handshake (both sides)", name, wall, cpu, rate
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
