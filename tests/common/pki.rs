//! A test PKI made at run time: hierarchy root → issuing CA (the server's delegated
//! intermediate) → server certificate; plus a bootstrap CA and a foreign CA for clients.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::OnceLock;

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SignatureAlgorithm,
};
use time::{Duration, OffsetDateTime};

/// A CA whose key the test holds.
pub struct TestCa {
    pub cert_pem: String,
    pub issuer: Issuer<'static, KeyPair>,
}

/// A certificate and key in PEM.
pub struct Credential {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Pki {
    pub root: TestCa,
    pub issuing: TestCa,
    pub bootstrap: TestCa,
    pub foreign: TestCa,
    pub server: Credential,
    pub password_hash: String,
}

fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
    edge_est::pki::ca_params(cn, path_len, Duration::days(3650))
}

fn self_signed_ca(cn: &str) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(cn, None);
    let cert = params.self_signed(&key).unwrap();
    TestCa {
        cert_pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// The argon2 hash of the harness password, computed once per test binary.
pub fn password_hash() -> String {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| edge_est::auth::basic::hash_password(super::PASSWORD).unwrap())
        .clone()
}

impl TestCa {
    /// A subordinate CA with its own key of `alg`.
    pub fn sub_ca(
        &self,
        cn: &str,
        path_len: Option<u8>,
        alg: &'static SignatureAlgorithm,
    ) -> (TestCa, String) {
        let key = KeyPair::generate_for(alg).unwrap();
        let key_pem = key.serialize_pem();
        let params = ca_params(cn, path_len);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            TestCa {
                cert_pem: cert.pem(),
                issuer: Issuer::new(params, key),
            },
            key_pem,
        )
    }

    /// A client certificate (EKU clientAuth) valid from `not_before` to `not_after`.
    pub fn client_cert(
        &self,
        cn: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Credential {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Credential {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A client certificate valid now for a year.
    pub fn valid_client(&self, cn: &str) -> Credential {
        let now = OffsetDateTime::now_utc();
        self.client_cert(cn, now - Duration::hours(1), now + Duration::days(365))
    }
}

impl Pki {
    /// Generates the PKI with an issuing CA key of `alg` and writes it into `dir`:
    /// root.pem, issuing-ca.pem (issuing CA + root), issuing-ca.key, server.pem (+ chain),
    /// server.key, bootstrap-ca.pem, foreign-ca.pem.
    pub fn generate(dir: &Path, alg: &'static SignatureAlgorithm) -> Pki {
        let root = self_signed_ca("edge-est test root");
        let (issuing, issuing_key) = root.sub_ca("edge-est test issuing CA", Some(1), alg);
        let bootstrap = self_signed_ca("factory bootstrap CA");
        let foreign = self_signed_ca("foreign CA");

        let server_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let server_cert = params.signed_by(&server_key, &issuing.issuer).unwrap();
        let server = Credential {
            cert_pem: format!("{}{}", server_cert.pem(), issuing.cert_pem),
            key_pem: server_key.serialize_pem(),
        };

        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write("root.pem", &root.cert_pem);
        write(
            "issuing-ca.pem",
            &format!("{}{}", issuing.cert_pem, root.cert_pem),
        );
        write("issuing-ca.key", &issuing_key);
        write("server.pem", &server.cert_pem);
        write("server.key", &server.key_pem);
        write("bootstrap-ca.pem", &bootstrap.cert_pem);
        write("foreign-ca.pem", &foreign.cert_pem);
        Pki {
            root,
            issuing,
            bootstrap,
            foreign,
            server,
            password_hash: password_hash(),
        }
    }

    pub fn generate_p256(dir: &Path) -> Pki {
        Self::generate(dir, &rcgen::PKCS_ECDSA_P256_SHA256)
    }
}
