//! `est-bench socket-floor`: the socket floor of one enrollment, a minimal responder on
//! edge-est's stack (tokio, rustls, aws-lc-rs; one `SO_REUSEPORT` socket and one
//! single-threaded runtime per CPU, as edge-est's listener), with the benchmark PKI's
//! certificates. Per connection: a TLS 1.3 (or 1.2) full handshake verifying the client's
//! certificate chain (`WebPkiClientVerifier`, the `devices` CA as the root), no session
//! tickets; one HTTP/1.1 request read (headers to the blank line, `content-length` body);
//! the base64 CSR decoded, parsed and its signature verified; a leaf signed with the P-256
//! issuing CA (random serial, key identifiers, key usage, EKU clientAuth, the client's CN);
//! the certs-only PKCS#7 answer in base64; close. No policy, no journal, no logging.
//!
//! What edge-est spends per enrollment above this floor is its own; what this floor spends
//! above the in-memory floor (`est-bench floor`) is the machine's sockets, syscalls and
//! wake-ups for the same work. Driven by the same load generator (`est-bench URL ...
//! --server-pid PID`), its CPU per request is read from `/proc` like edge-est's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use rcgen::{Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Args, Debug)]
pub struct SocketFloorArgs {
    /// The directory `est-bench pki` wrote (server.pem/.key, device-ca-p256.pem,
    /// issuing-p256.pem/.key are read from it).
    #[arg(long)]
    pub pki: PathBuf,
    /// Address to listen on (loopback only; port 0 picks one, printed as `listen=ADDR`).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Connection threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// What every connection needs.
struct Responder {
    tls: tokio_rustls::TlsAcceptor,
    issuer: Issuer<'static, KeyPair>,
    /// The issuing CA's certificate, sent after the leaf (as edge-est answers).
    issuer_der: Vec<u8>,
}

/// Requests larger than this are refused (a CSR is about 600 bytes of base64).
const MAX_REQUEST: usize = 64 * 1024;

pub fn run(args: &SocketFloorArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "the socket floor listens on loopback only"
    );
    let dir = &args.pki;
    let read = |name: &str| -> anyhow::Result<String> {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(read("device-ca-p256.pem")?.as_bytes()) {
        roots.add(cert?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("client verifier: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(read("server.pem")?.as_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(read("server.key")?.as_bytes())?;
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.send_tls13_tickets = 0;

    let issuer_pem = read("issuing-p256.pem")?;
    let issuer_der = CertificateDer::pem_slice_iter(issuer_pem.as_bytes())
        .next()
        .context("issuing-p256.pem holds no certificate")??
        .to_vec();
    let issuer_key = KeyPair::from_pem(&read("issuing-p256.key")?)?;
    let issuer = Issuer::from_ca_cert_pem(&issuer_pem, issuer_key)?;
    let responder = Arc::new(Responder {
        tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        issuer,
        issuer_der,
    });

    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let sockets = bind(args.listen, threads.max(1))?;
    eprintln!(
        "est-bench socket-floor listen={} threads={}",
        sockets[0].local_addr()?,
        sockets.len()
    );
    let handles: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            let responder = responder.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(serve(socket, responder))
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a connection thread panicked"))??;
    }
    Ok(())
}

/// One socket per thread on the same address (`SO_REUSEPORT`), as edge-est's listener.
fn bind(addr: SocketAddr, threads: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut sockets: Vec<std::net::TcpListener> = Vec::new();
    let mut addr = addr;
    for _ in 0..threads {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let socket: std::net::TcpListener = socket.into();
        addr = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(sockets)
}

async fn serve(socket: std::net::TcpListener, responder: Arc<Responder>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(socket)?;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let responder = responder.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let _ = connection(tcp, &responder).await;
        });
    }
}

async fn connection(tcp: tokio::net::TcpStream, responder: &Responder) -> anyhow::Result<()> {
    let mut tls = responder.tls.accept(tcp).await?;
    let mut buf = Vec::with_capacity(4096);
    let (head_end, length) = loop {
        let mut chunk = [0u8; 4096];
        let n = tls.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "closed before a whole request");
        buf.extend_from_slice(&chunk[..n]);
        anyhow::ensure!(buf.len() <= MAX_REQUEST, "request too large");
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break (end + 4, content_length(&buf[..end])?);
        }
    };
    anyhow::ensure!(head_end + length <= MAX_REQUEST, "request too large");
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = tls.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "closed within the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let cn = {
        let (_, conn) = tls.get_ref();
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .context("no client certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| anyhow::anyhow!("client certificate: {e}"))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("device")
            .to_owned();
        cn
    };
    let response = match enroll(&buf[head_end..head_end + length], &cn, responder) {
        Ok(body) => format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/pkcs7-mime; smime-type=certs-only\r\n\
             content-transfer-encoding: base64\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
        Err(e) => {
            let text = format!("{e}\n");
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
                text.len()
            )
        }
    };
    tls.write_all(response.as_bytes()).await?;
    tls.flush().await?;
    // Wait for the client to close (as a server keeping the connection for a next request).
    let mut rest = [0u8; 256];
    while tls.read(&mut rest).await.is_ok_and(|n| n > 0) {}
    Ok(())
}

fn content_length(head: &[u8]) -> anyhow::Result<usize> {
    let head = std::str::from_utf8(head).context("request head is not UTF-8")?;
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                return value.trim().parse().context("content-length");
            }
        }
    }
    Ok(0)
}

/// Decodes, parses and verifies the CSR, signs the leaf, and answers in base64.
fn enroll(body: &[u8], cn: &str, responder: &Responder) -> anyhow::Result<String> {
    let der = edge_est::est::body::decode_base64_body(body)
        .map_err(|_| anyhow::anyhow!("the body is not base64"))?;
    let spki = verify_csr(&der)?;
    let leaf = crate::floor::sign(&responder.issuer, &spki, cn)?;
    let pkcs7 = edge_est::est::pkcs7::encode_certs_only(&[&leaf, &responder.issuer_der])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(edge_est::est::body::encode_base64_lines(&pkcs7))
}

/// As `est-bench floor` checks a CSR (parse, verify its signature); returns its
/// SubjectPublicKeyInfo.
fn verify_csr(der: &[u8]) -> anyhow::Result<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| anyhow::anyhow!("CSR: {e}"))?;
    let key = &csr.certification_request_info.subject_pki;
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        &key.subject_public_key.data,
    )
    .verify(
        csr.certification_request_info.raw,
        &csr.signature_value.data,
    )
    .map_err(|_| anyhow::anyhow!("CSR signature does not verify"))?;
    Ok(key.raw.to_vec())
}
