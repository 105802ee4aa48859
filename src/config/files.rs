//! The files a configuration names, checked one by one (`edge-est check-config`): each is
//! read and must hold what its field expects, so that one run reports every missing or
//! wrong file, not only the first that loading stops at.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{Config, ConfigError, PemSource};

/// What a named file must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Certificates,
    PrivateKey,
    Password,
}

impl Config {
    /// Every file the configuration names (inline PEM excepted): its field, what it must
    /// hold, and its path as written (relative paths resolve against the configuration's
    /// directory).
    pub fn named_files(&self) -> Vec<(String, FileKind, PathBuf)> {
        let mut files = Vec::new();
        let mut pem = |field: String, source: &PemSource| {
            if !source.is_inline() {
                files.push((field, FileKind::Certificates, PathBuf::from(&source.0)));
            }
        };
        if let Some(tls) = &self.tls {
            pem("tls.certificate".into(), &tls.certificate);
        }
        for (name, set) in &self.trust {
            for (i, source) in set.certificates.iter().enumerate() {
                pem(format!("trust.{name}.certificates[{i}]"), source);
            }
        }
        for (name, issuer) in &self.issuers {
            pem(format!("issuers.{name}.certificate"), &issuer.certificate);
        }
        for (name, enrolled) in &self.enrolled_issuers {
            pem(format!("enrolled_issuers.{name}.root"), &enrolled.root);
        }
        for (name, upstream) in &self.upstreams {
            for (i, source) in upstream.trust.iter().enumerate() {
                pem(format!("upstreams.{name}.trust[{i}]"), source);
            }
            if let Some(certificate) = &upstream.certificate {
                pem(format!("upstreams.{name}.certificate"), certificate);
            }
        }
        if let Some(tls) = &self.tls {
            files.push(("tls.key".into(), FileKind::PrivateKey, tls.key.clone()));
        }
        for (name, issuer) in &self.issuers {
            files.push((
                format!("issuers.{name}.key"),
                FileKind::PrivateKey,
                issuer.key.clone(),
            ));
        }
        for (name, upstream) in &self.upstreams {
            if let Some(key) = &upstream.key {
                files.push((
                    format!("upstreams.{name}.key"),
                    FileKind::PrivateKey,
                    key.clone(),
                ));
            }
            if let Some(password) = &upstream.password_file {
                files.push((
                    format!("upstreams.{name}.password_file"),
                    FileKind::Password,
                    password.clone(),
                ));
            }
        }
        files
    }

    /// Reads every named file (relative to `base`) and reports each one that cannot be read
    /// or does not hold what its field expects. The contents never appear in a problem.
    pub fn file_problems(&self, base: &Path) -> Vec<ConfigError> {
        let mut found = Vec::new();
        for (field, kind, path) in self.named_files() {
            // A key in a token is opened at load, never read as a file (its URI may hold a PIN).
            if matches!(kind, FileKind::PrivateKey)
                && path.to_str().is_some_and(crate::keys::is_pkcs11)
            {
                continue;
            }
            let full = base.join(&path);
            // A value that names no file is not echoed (it may be a pasted secret).
            let text = match super::read_path(base, &path, &field) {
                Ok(text) => text.into_bytes(),
                Err(e) => {
                    found.push(e);
                    continue;
                }
            };
            let wrong = match kind {
                FileKind::Certificates => {
                    match CertificateDer::pem_slice_iter(&text).collect::<Result<Vec<_>, _>>() {
                        Ok(certs) if !certs.is_empty() => None,
                        _ => Some("holds no PEM certificate"),
                    }
                }
                FileKind::PrivateKey => PrivateKeyDer::from_pem_slice(&text)
                    .is_err()
                    .then_some("holds no PEM private key"),
                FileKind::Password => text
                    .iter()
                    .all(u8::is_ascii_whitespace)
                    .then_some("is empty"),
            };
            if let Some(wrong) = wrong {
                found.push(ConfigError::invalid(
                    field,
                    format!("{} {wrong}", full.display()),
                ));
            }
        }
        let journal = base.join(&self.journal);
        if let Some(dir) = journal.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                found.push(ConfigError::invalid(
                    "journal",
                    format!("the directory {} does not exist", dir.display()),
                ));
            }
        }
        found
    }
}
