//! One chain story for a layered hierarchy: every layer knows the set of CAs that may
//! legitimately sign for its subtree, and derives both its `/cacerts` answer and what
//! `issuer` trusts from that one set.
//!
//! - a `sign` label: its issuer's chain;
//! - a `forward` label: the upstream's `/cacerts`, which names every CA that may sign above;
//! - an `auto` label: the upstream's set plus its own issuer's chain, whether the upstream
//!   is up or away (learned from above, kept on disk).
//!
//! So whichever layer ends up signing, a client that fetches `/cacerts` in parallel with its
//! enrollment (as IoT Edge does) stores a chain that holds the issuing CA and the root:
//! path builders (OpenSSL's `verify -untrusted`, webpki, aziot's own TLS stacks) pick the
//! certificates they need and ignore the others.

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::*;

use crate::auth::TrustSet;

/// Whether a certificate is self-signed (a root), by its names.
fn self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw()
}

/// The CAs of `chain` that may sign end-entity and Edge CA certificates for the subtree:
/// every CA certificate except the self-signed roots (which sign only the intermediates
/// below them); a chain of roots alone stands for itself (a layer signing with a root).
pub fn signing_cas(chain: &[CertificateDer<'static>]) -> Vec<CertificateDer<'static>> {
    let parsed: Vec<(&CertificateDer<'static>, bool)> = chain
        .iter()
        .filter_map(|der| {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            cert.is_ca().then(|| (der, self_signed(&cert)))
        })
        .collect();
    let issuing: Vec<CertificateDer<'static>> = parsed
        .iter()
        .filter(|(_, root)| !root)
        .map(|(der, _)| (*der).clone())
        .collect();
    if issuing.is_empty() {
        parsed.into_iter().map(|(der, _)| der.clone()).collect()
    } else {
        issuing
    }
}

/// `issuer` on a label that forwards: certificates issued directly by one of the CAs that
/// may sign for this subtree, as the upstream's `chain` (its `/cacerts`) names them. (An
/// `auto` label adds its own issuer's CA, as a `sign` label does.)
pub fn issuer_trust(chain: &[CertificateDer<'static>]) -> Result<TrustSet, String> {
    let cas = signing_cas(chain);
    if cas.is_empty() {
        return Err("holds no CA certificate".into());
    }
    TrustSet::direct("issuer", &cas)
}

/// The `/cacerts` set of an `auto` label: the upstream's chain and this layer's own, each
/// certificate once; the CAs that sign first (the upstream's, then this layer's), the roots
/// last.
pub fn merged(
    upstream: &[CertificateDer<'static>],
    own: &[CertificateDer<'static>],
) -> Vec<CertificateDer<'static>> {
    let mut cas = Vec::new();
    let mut roots = Vec::new();
    for der in upstream.iter().chain(own) {
        let root = X509Certificate::from_der(der).is_ok_and(|(_, c)| self_signed(&c));
        let list = if root { &mut roots } else { &mut cas };
        if !list.contains(der) {
            list.push(der.clone());
        }
    }
    cas.extend(roots);
    cas
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(
        cn: &str,
        parent: Option<&rcgen::Issuer<'_, rcgen::KeyPair>>,
    ) -> (
        CertificateDer<'static>,
        rcgen::Issuer<'static, rcgen::KeyPair>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = crate::pki::ca_params(cn, None, ::time::Duration::days(30));
        let cert = match parent {
            Some(p) => params.signed_by(&key, p).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (cert.der().clone(), rcgen::Issuer::new(params, key))
    }

    /// An `auto` label's cacerts: the CAs that sign, the upstream's first, then the roots,
    /// each certificate once (a root both chains share is listed once).
    #[test]
    fn merged_lists_signing_cas_first_and_each_certificate_once() {
        let (root, root_issuer) = ca("root", None);
        let (upper, _) = ca("upper issuing CA", Some(&root_issuer));
        let (own, _) = ca("own issuing CA", Some(&root_issuer));
        let all = merged(
            &[upper.clone(), root.clone()],
            &[own.clone(), root.clone(), upper.clone()],
        );
        assert_eq!(all, vec![upper, own, root]);
    }
}
