//! The workload API's certificates as files the configuration points at: the trust bundle,
//! the TLS server certificate (CN = the gateway host name) and the module's identity
//! certificate, each with its key (mode 0600, never logged), in the runtime directory.
//! Files are replaced atomically; the module renews at about 80 % of a certificate's life.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use super::lkg::write_atomically;
use super::workload::{IssuedCertificate, WorkloadClient};

/// Share of a certificate's lifetime after which it is renewed.
pub const RENEW_AT: f64 = 0.8;
/// The shortest wait before a renewal (a daemon handing out very short certificates must
/// not make the module spin).
pub const MIN_RENEW_DELAY: Duration = Duration::from_secs(1);

/// A certificate (leaf first, then its chain) and its key, as files, with its validity.
#[derive(Clone, Debug, PartialEq)]
pub struct CertFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertFiles {
    /// When to renew: at [`RENEW_AT`] of the lifetime, from now.
    pub fn renew_in(&self, now: OffsetDateTime) -> Duration {
        let life = (self.not_after - self.not_before).as_seconds_f64().max(0.0);
        let at = self.not_before + time::Duration::seconds_f64(life * RENEW_AT);
        let wait = (at - now).as_seconds_f64().max(0.0);
        Duration::from_secs_f64(wait).max(MIN_RENEW_DELAY)
    }

    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now + time::Duration::minutes(5) && now < self.not_after
    }
}

/// The runtime directory and what the workload API gave.
#[derive(Clone, Debug)]
pub struct Material {
    dir: PathBuf,
}

impl Material {
    /// Creates the directory (mode 0700).
    pub fn new(dir: &Path) -> std::io::Result<Material> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Material {
            dir: dir.to_owned(),
        })
    }

    pub fn trust_bundle_path(&self) -> PathBuf {
        self.dir.join("trust-bundle.pem")
    }

    fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        )
    }

    pub fn has_trust_bundle(&self) -> bool {
        self.trust_bundle_path().is_file()
    }

    /// Fetches the trust bundle and writes it.
    pub async fn fetch_trust_bundle(&self, workload: &WorkloadClient) -> Result<String, String> {
        let bundle = workload.trust_bundle().await.map_err(|e| e.to_string())?;
        write_atomically(&self.trust_bundle_path(), bundle.as_bytes(), 0o644)
            .map_err(|e| format!("cannot write the trust bundle: {e}"))?;
        Ok(bundle)
    }

    /// A new server certificate for `common_name`, written in place of the old one.
    pub async fn fetch_server(
        &self,
        workload: &WorkloadClient,
        common_name: &str,
    ) -> Result<CertFiles, String> {
        let asked = OffsetDateTime::now_utc() + time::Duration::days(30);
        let issued = workload
            .server_certificate(common_name, asked)
            .await
            .map_err(|e| e.to_string())?;
        self.write("server", &issued)
    }

    /// A new identity certificate, written in place of the old one.
    pub async fn fetch_identity(&self, workload: &WorkloadClient) -> Result<CertFiles, String> {
        let issued = workload
            .identity_certificate()
            .await
            .map_err(|e| e.to_string())?;
        self.write("identity", &issued)
    }

    /// The server certificate on disk from an earlier run, if still valid.
    pub fn existing_server(&self) -> Option<CertFiles> {
        self.existing("server")
    }

    pub fn existing_identity(&self) -> Option<CertFiles> {
        self.existing("identity")
    }

    fn existing(&self, name: &str) -> Option<CertFiles> {
        let (certificate, key) = self.pair(name);
        if !key.is_file() {
            return None;
        }
        let pem = std::fs::read_to_string(&certificate).ok()?;
        let (not_before, not_after) = validity(&pem).ok()?;
        let files = CertFiles {
            certificate,
            key,
            not_before,
            not_after,
        };
        files
            .is_valid_at(OffsetDateTime::now_utc())
            .then_some(files)
    }

    fn write(&self, name: &str, issued: &IssuedCertificate) -> Result<CertFiles, String> {
        let (not_before, not_after) = validity(&issued.certificate_pem)?;
        let (certificate, key) = self.pair(name);
        // Key first: a crash in between leaves a pair that does not fit, which the next start
        // replaces; never a new certificate served with an old key.
        write_atomically(&key, issued.private_key_pem.as_bytes(), 0o600)
            .map_err(|e| format!("cannot write {}: {e}", key.display()))?;
        write_atomically(&certificate, issued.certificate_pem.as_bytes(), 0o644)
            .map_err(|e| format!("cannot write {}: {e}", certificate.display()))?;
        Ok(CertFiles {
            certificate,
            key,
            not_before,
            not_after,
        })
    }
}

/// notBefore and notAfter of the first certificate of a PEM chain.
pub fn validity(pem: &str) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or("no certificate in the PEM text")?
        .map_err(|e| format!("not PEM: {e}"))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| format!("not X.509: {e}"))?;
    Ok((
        cert.validity().not_before.to_datetime(),
        cert.validity().not_after.to_datetime(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_eighty_percent_of_the_lifetime() {
        let start = OffsetDateTime::now_utc();
        let files = CertFiles {
            certificate: PathBuf::new(),
            key: PathBuf::new(),
            not_before: start,
            not_after: start + time::Duration::days(30),
        };
        let wait = files.renew_in(start);
        assert_eq!(wait.as_secs(), 24 * 86_400);
        assert_eq!(
            files.renew_in(start + time::Duration::days(29)),
            MIN_RENEW_DELAY
        );
        assert!(files.is_valid_at(start));
        assert!(!files.is_valid_at(start + time::Duration::days(31)));
    }
}
