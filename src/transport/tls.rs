//! rustls server configuration: TLS 1.2 and 1.3 only (RFC 8996), client certificates
//! requested in the first handshake but optional.
//!
//! The client certificate verifier here checks only that the client holds the key of the
//! certificate it presents (the handshake signature), and refuses a chain over the caps of
//! `auth::caps`. Which chains are trusted depends on the
//! label a request is for, so chain validation happens per request in `auth::client_cert`.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the server configuration from a PEM chain (leaf first) and its private key (PEM, or
/// a key in a PKCS#11 token).
pub fn server_config(
    chain_pem: &str,
    key: &crate::keys::PrivateKey,
) -> Result<ServerConfig, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.certificate: not PEM certificates: {e}"))?;
    if chain.is_empty() {
        return Err("tls.certificate: holds no certificate".into());
    }
    let provider = provider();
    let certified = crate::keys::tls_certified_key(chain, key, &provider)?;
    let verifier = Arc::new(PossessionOnlyVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("tls: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    // IoT Edge's client offers no ALPN; curl offers h2 and http/1.1. We speak HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // TLS 1.3 tickets are not sent: a device enrolls and goes, and two tickets per handshake
    // (with the client certificate inside) cost measurable CPU and bytes for nothing. TLS 1.2
    // clients still resume through the server-side session cache.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A presented chain over `auth::caps`.
#[derive(Debug)]
struct ChainTooLarge(String);

impl std::fmt::Display for ChainTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChainTooLarge {}

/// The bridge from the `log` records of rustls (and other libraries) into `tracing`, as
/// `tracing_log::LogTracer`, except that rustls' warning for an IP address sent as TLS SNI
/// goes out at debug: RFC 6066 forbids it, but libest and other clients send one on every
/// connection to an address, and a warning per connection would bury the log.
pub struct LogBridge(tracing_log::LogTracer);

/// Whether `record` is rustls' warning about an IP address in the SNI extension.
fn is_ip_address_sni(record: &log::Record<'_>) -> bool {
    record.level() == log::Level::Warn
        && record.target().starts_with("rustls")
        && record
            .args()
            .to_string()
            .contains("IP address presented as hostname")
}

impl LogBridge {
    /// Installs the bridge as the `log` logger; call once, after the tracing subscriber is
    /// set. Records up to the subscriber's level pass.
    pub fn install() -> Result<(), log::SetLoggerError> {
        log::set_boxed_logger(Box::new(LogBridge(tracing_log::LogTracer::new())))?;
        log::set_max_level(tracing_log::AsLog::as_log(
            &tracing::level_filters::LevelFilter::current(),
        ));
        Ok(())
    }
}

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !is_ip_address_sni(record) {
            return self.0.log(record);
        }
        let args = *record.args();
        let demoted = log::Record::builder()
            .args(args)
            .level(log::Level::Debug)
            .target(record.target())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .build();
        self.0.log(&demoted);
    }

    fn flush(&self) {}
}

/// Accepts any client certificate whose key the client proves to hold; see the module docs.
#[derive(Debug)]
struct PossessionOnlyVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PossessionOnlyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients (OpenSSL, aziot-certd) then send whatever certificate they hold.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // A chain over the caps is refused here, before anything is kept or verified.
        crate::auth::caps::check_chain_size(
            1 + intermediates.len(),
            end_entity.len() + intermediates.iter().map(|c| c.len()).sum::<usize>(),
        )
        .map_err(|reason| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(ChainTooLarge(reason)),
            )))
        })?;
        webpki::EndEntityCert::try_from(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
