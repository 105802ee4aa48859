//! A client TLS credential whose key stays in a token: the upstream RA's certificate, sent to
//! the layer above, with every handshake signature made by the token.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use super::{PrivateKey, TokenKey};

/// Always offers one certificate chain, signed for by a token key.
#[derive(Debug)]
struct TokenClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for TokenClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Without a scheme the token can sign with, rustls would fail the handshake when it
        // asks the key; sending no certificate instead lets the server say why it refuses.
        self.0.key.choose_scheme(sigschemes)?;
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The client certificate resolver for `chain` with `key` in a token (checked against the
/// chain's first certificate when it was opened).
pub fn token_client_cert(
    chain: Vec<CertificateDer<'static>>,
    key: Arc<TokenKey>,
) -> Result<Arc<dyn ResolvesClientCert>, String> {
    let provider = crate::transport::tls::provider();
    let certified = super::tls_certified_key(chain, &PrivateKey::Token(key), &provider)?;
    Ok(Arc::new(TokenClientCert(Arc::new(certified))))
}
