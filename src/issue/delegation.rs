//! A layer's own issuing CA, enrolled from the layer above (`[enrolled_issuers.NAME]`):
//! at start and at two thirds of its life a new key is made, a CA CSR goes upstream with the
//! layer's RA credential, the answer is checked (our key, CA:TRUE, pathlen, keyCertSign, a
//! chain to the configured root), kept on disk and swapped in by rebuilding the runtime (as a
//! configuration change is: connections stay, requests in flight finish on the old one).
//!
//! On disk, under `<data directory>/issuer-<name>/`: key files (0600), written and synced
//! first, and `current.json` naming the chain, its key and the CAs before it, replaced
//! atomically (temporary file, fsync, rename, fsync of the directory). `current.json` is the
//! commit point: a key it does not name is an orphan of an interrupted renewal, never used
//! and removed by the next one; a CA is never half written.
//!
//! With a PKCS#11 token location in `key`, the key pair is generated inside the token instead
//! (never extractable), named in `current.json` by URI, and orphan token keys of the issuer's
//! label prefix are destroyed at the next commit, as orphan files are.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::time::OffsetDateTime;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

use super::upstream::{Upstream, UpstreamError};
use super::LocalIssuer;
use crate::config::EnrolledIssuerConfig;
use crate::keys::IssuerKey;

const STATE_FILE: &str = "current.json";

/// How far into its life the CA is renewed.
const RENEW_AT: f64 = 2.0 / 3.0;
/// How far into its life a CA not yet renewed is warned about.
const WARN_AT: f64 = 0.9;
/// How often the manager looks again when nothing is due (configuration changes).
const TICK: Duration = Duration::from_secs(5);
/// How long a replaced CA stays at least: a request that signed with it as the new one was
/// swapped in is journaled within that.
const SETTLE: ::time::Duration = ::time::Duration::seconds(5);

#[derive(Debug, thiserror::Error)]
pub enum DelegationError {
    #[error("the layer above did not grant the CA: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("the granted CA is not usable: {0}")]
    Answer(String),
    #[error("cannot make a key: {0}")]
    Key(String),
    #[error("cannot keep the CA on disk: {0}")]
    Store(String),
}

/// What `current.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kept {
    /// The CA's chain in PEM, CA first, root last.
    pub chain: String,
    /// Its key: a file name in the issuer's directory (a `pkcs11:` URI for a token key).
    pub key: String,
    /// Earlier CAs (PEM), kept in `issuer` trust and `/cacerts` until the last certificate
    /// each signed here has expired (the journal says which, see [`retire_at`]).
    #[serde(default)]
    pub previous: Vec<String>,
    /// When it was obtained (Unix seconds): its life for renewal starts then, not at a
    /// notBefore the layer above set back for lagging clocks.
    #[serde(default)]
    pub obtained: Option<i64>,
}

/// A kept CA as loaded.
pub struct Loaded {
    /// None when there is none or it no longer serves.
    pub issuer: Option<LocalIssuer>,
    /// Earlier CAs still valid.
    pub previous: Vec<CertificateDer<'static>>,
    pub obtained: Option<OffsetDateTime>,
}

/// The directory of an enrolled issuer's state.
pub fn state_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(format!("issuer-{}", super::store::file_key(name)))
}

/// Reads what was kept; `None` when nothing was (or it is unreadable, with a warning).
pub fn read_kept(dir: &Path) -> Option<Kept> {
    let path = dir.join(STATE_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the enrolled CA's state is unreadable; enrolling a new one");
            return None;
        }
    };
    match serde_json::from_slice(&text) {
        Ok(kept) => Some(kept),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the enrolled CA's state is malformed; enrolling a new one");
            None
        }
    }
}

/// An enrolled issuer as the runtime loaded it.
pub struct Enrolled {
    pub name: String,
    pub config: EnrolledIssuerConfig,
    pub dir: PathBuf,
    pub upstream: Arc<Upstream>,
    /// The CA in force, if any: (notBefore, notAfter).
    pub current: Option<(OffsetDateTime, OffsetDateTime)>,
    /// SHA-256 of the CA in force.
    pub fingerprint: Option<[u8; 32]>,
    /// Earlier CAs still valid.
    pub previous: Vec<CertificateDer<'static>>,
    /// When the CA in force was obtained (the earlier ones replaced).
    pub obtained: Option<OffsetDateTime>,
    /// The PKCS#11 library for a key generated in a token (`pkcs11_module`).
    pub pkcs11_module: Option<PathBuf>,
}

/// Loads the kept CA of `name`: the issuer, and the earlier CAs still valid. `None` as the
/// issuer when there is none, or it no longer serves (expired, damaged): the labels then
/// forward, which the caller reports.
pub fn load(
    dir: &Path,
    root_pem: &str,
    open_token_key: impl Fn(&str, &str) -> Result<IssuerKey, String>,
) -> Loaded {
    let Some(kept) = read_kept(dir) else {
        return Loaded {
            issuer: None,
            previous: Vec::new(),
            obtained: None,
        };
    };
    let obtained = kept
        .obtained
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
    let now = OffsetDateTime::now_utc();
    let previous = kept
        .previous
        .iter()
        .filter_map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).ok())
        .filter(|der| not_after(der).is_some_and(|t| t > now))
        .collect();
    let key = if crate::keys::is_pkcs11(&kept.key) {
        open_token_key(&kept.key, &kept.chain)
    } else {
        read_key_file(&dir.join(&kept.key))
    };
    let loaded = key
        .and_then(|key| LocalIssuer::load_with(&kept.chain, key))
        .and_then(|issuer| {
            let root = CertificateDer::from_pem_slice(root_pem.as_bytes())
                .map_err(|e| format!("root: {e}"))?;
            if issuer.chain().last().map(|c| c.as_ref()) != Some(root.as_ref()) {
                return Err("it does not end with the configured root".into());
            }
            Ok(issuer)
        });
    let issuer = match loaded {
        Ok(issuer) => Some(issuer),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "the kept enrolled CA cannot serve; enrolling a new one");
            None
        }
    };
    Loaded {
        issuer,
        previous,
        obtained,
    }
}

fn read_key_file(path: &Path) -> Result<IssuerKey, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("key: {e}"))?;
    rcgen::KeyPair::from_pem(&pem)
        .map(IssuerKey::File)
        .map_err(|e| format!("key: {e}"))
}

pub fn not_after(der: &[u8]) -> Option<OffsetDateTime> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| c.validity().not_after.to_datetime())
}

fn validity(der: &[u8]) -> Option<(OffsetDateTime, OffsetDateTime)> {
    X509Certificate::from_der(der).ok().map(|(_, c)| {
        (
            c.validity().not_before.to_datetime(),
            c.validity().not_after.to_datetime(),
        )
    })
}

/// When the replaced CA `der` leaves `issuer` trust and `/cacerts`: once the last certificate
/// it signed here has expired (the journal records the signing CA of each local issuance),
/// not before [`SETTLE`] after it was `replaced`, and at the latest when it expires itself
/// (nothing it signed outlives it). While local issuances journaled without their signing CA
/// are still valid, it stays until its own notAfter.
pub fn retire_at(
    index: &crate::auth::IssuanceIndex,
    der: &[u8],
    replaced: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Option<OffsetDateTime> {
    let own = not_after(der)?;
    let (last, unattributed) = index.last_signed_by(&crate::auth::chain::fingerprint(der));
    if unattributed > now.unix_timestamp() {
        return Some(own);
    }
    let last = last
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let settled = replaced.map_or(now, |t| t + SETTLE);
    Some(last.max(settled).min(own))
}

/// Removes the earlier CAs of SHA-256 in `gone` from what is kept; whether any was.
fn drop_previous(dir: &Path, gone: &[[u8; 32]]) -> std::io::Result<bool> {
    let Some(mut kept) = read_kept(dir) else {
        return Ok(false);
    };
    let before = kept.previous.len();
    kept.previous.retain(|pem| {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .is_ok_and(|der| !gone.contains(&crate::auth::chain::fingerprint(&der)))
    });
    if kept.previous.len() == before {
        return Ok(false);
    }
    commit(dir, &kept)?;
    Ok(true)
}

/// When a CA living from `not_before` to `not_after` is renewed.
pub fn renew_point(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    not_before + (not_after - not_before) * RENEW_AT
}

fn warn_point(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    not_before + (not_after - not_before) * WARN_AT
}

/// Checks the layer above's answer and builds the chain to keep: our key, CA:TRUE with at
/// least the pathlen asked for, keyCertSign, each certificate signed by the next, ending with
/// the configured root.
pub fn check_answer(
    answer: &[Vec<u8>],
    cacerts: &[CertificateDer<'static>],
    root: &CertificateDer<'static>,
    spki: &[u8],
    path_len: u8,
) -> Result<Vec<CertificateDer<'static>>, DelegationError> {
    let bad = |s: String| DelegationError::Answer(s);
    let first = answer.first().ok_or_else(|| bad("no certificate".into()))?;
    let (_, ca) = X509Certificate::from_der(first).map_err(|e| bad(format!("unparseable: {e}")))?;
    if ca.public_key().raw != spki {
        return Err(bad("it certifies another key than the one asked for".into()));
    }
    match ca.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            if bc
                .value
                .path_len_constraint
                .is_some_and(|n| n < u32::from(path_len))
            {
                return Err(bad(format!(
                    "pathlen {:?} is below the {path_len} asked for",
                    bc.value.path_len_constraint
                )));
            }
        }
        _ => return Err(bad("it is not a CA (basicConstraints CA:TRUE)".into())),
    }
    match ca.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => {}
        _ => return Err(bad("its keyUsage lacks keyCertSign".into())),
    }
    // The chain: each next certificate is the one whose subject issued the last, from the
    // answer, the upstream's /cacerts and the root.
    let pool: Vec<CertificateDer<'static>> = answer[1..]
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .chain(cacerts.iter().cloned())
        .chain(std::iter::once(root.clone()))
        .collect();
    let mut chain = vec![CertificateDer::from(first.clone())];
    loop {
        let last = chain
            .last()
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default();
        if last == root.as_ref() {
            break;
        }
        if chain.len() > 8 {
            return Err(bad("no chain to the configured root".into()));
        }
        let (_, child) =
            X509Certificate::from_der(&last).map_err(|e| bad(format!("unparseable: {e}")))?;
        let parent = pool.iter().find(|p| {
            X509Certificate::from_der(p).is_ok_and(|(_, p)| {
                p.subject().as_raw() == child.issuer().as_raw()
                    && child.verify_signature(Some(p.public_key())).is_ok()
            })
        });
        match parent {
            Some(p) => chain.push(p.clone()),
            None => {
                return Err(bad(format!(
                    "no chain to the configured root: nothing here signed \"{}\"",
                    child.issuer()
                )))
            }
        }
    }
    Ok(chain)
}

/// Certificates in PEM, in order.
pub fn pem_of(chain: &[CertificateDer<'_>]) -> String {
    use base64::Engine;
    let mut text = String::new();
    for der in chain {
        text.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        for line in b64.as_bytes().chunks(64) {
            text.push_str(&String::from_utf8_lossy(line));
            text.push('\n');
        }
        text.push_str("-----END CERTIFICATE-----\n");
    }
    text
}

fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Replaces `current.json` atomically.
fn commit(dir: &Path, kept: &Kept) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(kept).map_err(std::io::Error::other)?;
    let temporary = dir.join(format!("{STATE_FILE}.tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    write_synced(&temporary, &text, 0o600)?;
    std::fs::rename(&temporary, dir.join(STATE_FILE))?;
    sync_dir(dir)
}

/// Removes key files `current.json` does not name: orphans of interrupted renewals and keys
/// of CAs replaced.
fn remove_orphan_keys(dir: &Path, kept: &Kept) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("key-") && name != kept.key {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The URI of a key generated in the token at `location` for the renewal `stamp`, and its
/// label prefix: `object=` of the location (default `edge-est-<issuer>`) followed by
/// `-<stamp>`, as CKA_LABEL, and the stamp as CKA_ID. The query (`pin-source`, `module-path`)
/// is kept as written.
pub fn token_key_uri(location: &str, issuer: &str, stamp: i128) -> (String, String) {
    let body = &location[7..];
    let (path, query) = match body.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (body, None),
    };
    let mut object = None;
    let mut attributes: Vec<&str> = Vec::new();
    for attr in path.split(';').filter(|a| !a.is_empty()) {
        match attr.split_once('=') {
            Some(("object", value)) => object = Some(value.to_owned()),
            Some(("id", _)) => {}
            _ => attributes.push(attr),
        }
    }
    let prefix = object.unwrap_or_else(|| format!("edge-est-{issuer}"));
    let object = format!("object={prefix}-{stamp}");
    let id = format!("id={stamp}");
    attributes.push(&object);
    attributes.push(&id);
    let mut uri = format!("pkcs11:{}", attributes.join(";"));
    if let Some(query) = query {
        uri.push('?');
        uri.push_str(query);
    }
    (uri, format!("{prefix}-"))
}

/// Destroys the token keys of this issuer that `current.json` does not name: orphans of
/// interrupted renewals and keys of CAs replaced before the last one. The key of the CA just
/// replaced stays: the runtime still in force signs with it until the new one is swapped in.
async fn remove_orphan_token_keys(
    enrolled: &Enrolled,
    location: &str,
    kept: &Kept,
    old_key: Option<&str>,
) {
    let (token_uri, prefix) = token_key_uri(location, &enrolled.name, 0);
    let label_of = |uri: &str| {
        crate::keys::Pkcs11Uri::parse(uri)
            .ok()
            .and_then(|u| u.object)
    };
    let keep: Vec<String> = [Some(kept.key.as_str()), old_key]
        .into_iter()
        .flatten()
        .filter(|k| crate::keys::is_pkcs11(k))
        .filter_map(label_of)
        .collect();
    let uri = match crate::keys::Pkcs11Uri::parse(&token_uri) {
        Ok(uri) => uri,
        Err(e) => {
            tracing::warn!(issuer = %enrolled.name, error = %e, "cannot remove orphan token keys");
            return;
        }
    };
    let Some(module) = uri
        .module_path
        .clone()
        .or_else(|| enrolled.pkcs11_module.clone())
    else {
        return;
    };
    let result = tokio::task::spawn_blocking(move || {
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        crate::keys::pkcs11::destroy_keys(&module, &uri, &prefix, &keep)
    })
    .await;
    match result {
        Ok(Ok(destroyed)) if !destroyed.is_empty() => {
            tracing::info!(issuer = %enrolled.name, keys = ?destroyed, "orphan token keys removed");
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(issuer = %enrolled.name, error = %e, "cannot remove orphan token keys")
        }
        Err(e) => {
            tracing::warn!(issuer = %enrolled.name, error = %e, "cannot remove orphan token keys")
        }
    }
}

/// What an enrollment produced: kept on disk, to be journaled.
pub struct Renewed {
    pub chain: Vec<CertificateDer<'static>>,
}

/// Enrolls a new CA for `enrolled` and commits it to disk. The runtime is not touched.
pub async fn renew(enrolled: &Enrolled, root_pem: &str) -> Result<Renewed, DelegationError> {
    let root = CertificateDer::from_pem_slice(root_pem.as_bytes())
        .map_err(|e| DelegationError::Answer(format!("root: {e}")))?;
    let store = |e: std::io::Error| DelegationError::Store(e.to_string());
    std::fs::create_dir_all(&enrolled.dir).map_err(store)?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&enrolled.dir, std::fs::Permissions::from_mode(0o700));
    }
    // The key is on disk (or in the token) before anything is asked: a CA is never granted
    // for a key lost.
    let stamp = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let old = read_kept(&enrolled.dir);
    let (key, key_name) = match enrolled.config.key.as_deref() {
        Some(location) if crate::keys::is_pkcs11(location) => {
            let (uri, _) = token_key_uri(location, &enrolled.name, stamp);
            let module = enrolled.pkcs11_module.clone();
            let generated = {
                let uri = uri.clone();
                tokio::task::spawn_blocking(move || {
                    crate::keys::TokenKey::generate(&uri, module.as_deref())
                })
                .await
                .map_err(|e| DelegationError::Key(e.to_string()))?
            };
            let key = generated.map_err(|e| DelegationError::Key(e.to_string()))?;
            (IssuerKey::Token(key), uri)
        }
        _ => {
            let key =
                rcgen::KeyPair::generate().map_err(|e| DelegationError::Key(e.to_string()))?;
            let key_file = format!("key-{stamp}.pem");
            write_synced(
                &enrolled.dir.join(&key_file),
                key.serialize_pem().as_bytes(),
                0o600,
            )
            .map_err(store)?;
            sync_dir(&enrolled.dir).map_err(store)?;
            (IssuerKey::File(key), key_file)
        }
    };

    let csr = ca_request(&enrolled.config, &key)?;
    let label = enrolled.config.label.as_deref();
    let answer = enrolled.upstream.enroll(label, &csr).await?;
    let cacerts = enrolled.upstream.cacerts(label).await.unwrap_or_default();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let chain = check_answer(&answer, &cacerts, &root, &spki, enrolled.config.path_len)?;

    let old_key = old.as_ref().map(|o| o.key.clone());
    let mut previous: Vec<String> = old
        .map(|old| {
            let now = OffsetDateTime::now_utc();
            let mut previous: Vec<String> = old
                .previous
                .into_iter()
                .filter(|pem| {
                    CertificateDer::from_pem_slice(pem.as_bytes())
                        .ok()
                        .and_then(|d| not_after(&d))
                        .is_some_and(|t| t > now)
                })
                .collect();
            if let Some(ca) = CertificateDer::pem_slice_iter(old.chain.as_bytes())
                .next()
                .and_then(Result::ok)
            {
                previous.push(pem_of(&[ca]));
            }
            previous
        })
        .unwrap_or_default();
    previous.dedup();
    let kept = Kept {
        chain: pem_of(&chain),
        key: key_name,
        previous,
        obtained: Some(OffsetDateTime::now_utc().unix_timestamp()),
    };
    commit(&enrolled.dir, &kept).map_err(store)?;
    remove_orphan_keys(&enrolled.dir, &kept);
    if let Some(location) = enrolled.config.key.as_deref() {
        if crate::keys::is_pkcs11(location) {
            remove_orphan_token_keys(enrolled, location, &kept, old_key.as_deref()).await;
        }
    }
    Ok(Renewed { chain })
}

/// The CA CSR: CN as configured, CA:TRUE with the pathlen asked for, keyCertSign + cRLSign.
fn ca_request(config: &EnrolledIssuerConfig, key: &IssuerKey) -> Result<Vec<u8>, DelegationError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, config.common_name.as_str());
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(config.path_len));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params
        .serialize_request(key)
        .map(|csr| csr.der().to_vec())
        .map_err(|e| DelegationError::Key(e.to_string()))
}

/// Where the manager stands with one enrolled issuer.
#[derive(Clone, Debug, Default)]
struct Attempts {
    failures: u32,
    next_try: Option<std::time::Instant>,
    warned_for: Option<[u8; 32]>,
}

/// The manager of every enrolled issuer of `app`: renews what is due, retries failures with
/// back-off, warns at 90 % of a CA's life. Runs until the process ends; follows
/// configuration changes (it reads the runtime in force on every round).
/// Holds the application weakly: it ends with it.
pub async fn manage(app: std::sync::Weak<crate::server::App>) {
    let mut attempts: std::collections::HashMap<String, Attempts> = Default::default();
    loop {
        let Some(app) = app.upgrade() else {
            return;
        };
        let runtime = app.runtime();
        let mut sleep = TICK;
        for enrolled in runtime.enrolled() {
            let state = attempts.entry(enrolled.name.clone()).or_default();
            let now = OffsetDateTime::now_utc();
            let due_at = enrolled
                .current
                .map(|(nb, na)| renew_point(nb, na))
                .unwrap_or(now);
            if let Some((nb, na)) = enrolled.current {
                if now >= warn_point(nb, na) && state.warned_for != enrolled.fingerprint {
                    state.warned_for = enrolled.fingerprint;
                    tracing::warn!(issuer = %enrolled.name, not_after = %na,
                        seconds_left = (na - now).as_seconds_f64().max(0.0), failures = state.failures,
                        "the enrolled CA is past 90 % of its life and not renewed yet");
                }
            }
            // An earlier CA leaves trust and /cacerts once the last certificate it signed has
            // expired: it is dropped from what is kept, and the rebuilt runtime no longer
            // loads it.
            let retiring: Vec<([u8; 32], OffsetDateTime)> = enrolled
                .previous
                .iter()
                .filter_map(|c| {
                    retire_at(app.issuance(), c, enrolled.obtained, now)
                        .map(|t| (crate::auth::chain::fingerprint(c), t))
                })
                .collect();
            let gone: Vec<[u8; 32]> = retiring
                .iter()
                .filter(|(_, t)| *t <= now)
                .map(|(f, _)| *f)
                .collect();
            if !gone.is_empty() {
                match drop_previous(&enrolled.dir, &gone) {
                    Ok(_) => {
                        for f in &gone {
                            tracing::info!(issuer = %enrolled.name, ca_sha256 = %crate::auth::client_cert::hex(f),
                                "the last certificate an earlier CA signed has expired; it leaves issuer trust and /cacerts");
                        }
                        swap_in(&app).await;
                        sleep = Duration::ZERO;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(issuer = %enrolled.name, error = %e, "cannot drop an earlier CA from what is kept");
                    }
                }
            }
            if let Some(next) = retiring.iter().map(|(_, t)| *t).filter(|t| *t > now).min() {
                sleep = sleep.min((next - now).try_into().unwrap_or(TICK));
            }
            // A CA that expired unrenewed no longer signs: the rebuilt runtime forwards.
            if let Some((_, not_after)) = enrolled.current {
                if not_after <= now {
                    tracing::warn!(issuer = %enrolled.name, expired = %not_after, "the enrolled CA expired before it was renewed; its labels forward to the layer above");
                    swap_in(&app).await;
                    sleep = Duration::ZERO;
                    continue;
                }
                sleep = sleep.min((not_after - now).try_into().unwrap_or(TICK));
            }
            if now < due_at {
                let wait = (due_at - now).try_into().unwrap_or(TICK);
                sleep = sleep.min(wait);
                continue;
            }
            if state
                .next_try
                .is_some_and(|t| t > std::time::Instant::now())
            {
                continue;
            }
            let root = match enrolled.config.root.read(runtime.base(), "root") {
                Ok(root) => root,
                Err(e) => {
                    tracing::error!(issuer = %enrolled.name, error = %e, "cannot read the root of an enrolled issuer");
                    continue;
                }
            };
            match renew(enrolled, &root).await {
                Ok(renewed) => {
                    state.failures = 0;
                    state.next_try = None;
                    app.metrics().enrolled_issuer_renewal(&enrolled.name, true);
                    let (nb, na) = renewed
                        .chain
                        .first()
                        .and_then(|c| validity(c))
                        .unwrap_or((now, now));
                    tracing::info!(issuer = %enrolled.name, not_before = %nb, not_after = %na,
                        renew_at = %renew_point(nb, na), "enrolled a new issuing CA from the layer above");
                    record(&app, enrolled, &renewed).await;
                    swap_in(&app).await;
                }
                Err(e) => {
                    state.failures += 1;
                    let backoff = Duration::from_secs(1u64 << state.failures.min(16))
                        .min(Duration::from_secs(enrolled.config.retry_max_secs));
                    state.next_try = Some(std::time::Instant::now() + backoff);
                    app.metrics().enrolled_issuer_renewal(&enrolled.name, false);
                    tracing::warn!(issuer = %enrolled.name, error = %e, retry_in_secs = backoff.as_secs(),
                        failures = state.failures, "enrolling the issuing CA failed");
                    sleep = sleep.min(backoff);
                }
            }
        }
        drop((runtime, app));
        tokio::time::sleep(sleep.max(Duration::from_millis(50))).await;
    }
}

/// The CA obtained, in this layer's journal too.
async fn record(app: &crate::server::App, enrolled: &Enrolled, renewed: &Renewed) {
    let Some(der) = renewed.chain.first() else {
        return;
    };
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return;
    };
    let rfc3339 = |t: OffsetDateTime| {
        t.format(&::time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    use base64::Engine;
    let entry = crate::journal::JournalEntry {
        time: rfc3339(OffsetDateTime::now_utc()),
        serial: crate::auth::client_cert::hex(cert.raw_serial()),
        subject: cert.subject().to_string(),
        sans: Vec::new(),
        label: None,
        operation: "simpleenroll".to_owned(),
        identity: format!("this layer (enrolled issuer {})", enrolled.name),
        profile: "sub-ca".to_owned(),
        not_before: rfc3339(cert.validity().not_before.to_datetime()),
        not_after: rfc3339(cert.validity().not_after.to_datetime()),
        sha256: crate::auth::client_cert::hex(crate::auth::chain::fingerprint(der).as_ref()),
        certificate: base64::engine::general_purpose::STANDARD.encode(der),
        issued_by: format!("upstream {}", enrolled.upstream.name),
        grace_renewal: false,
        issuer_ca: None,
    };
    if let Err(e) = app.journal().record(&entry, None).await {
        tracing::error!(issuer = %enrolled.name, error = %e, "the enrolled CA could not be journaled");
    }
}

/// Rebuilds the runtime in force (which reads the new CA from disk) and swaps it in; again
/// if the configuration changed meanwhile, so the newer one also holds the CA.
async fn swap_in(app: &Arc<crate::server::App>) {
    for _ in 0..5 {
        let current = app.runtime();
        let (config, base) = (current.config().clone(), current.base().to_owned());
        let built =
            tokio::task::spawn_blocking(move || crate::runtime::Runtime::build(&config, &base))
                .await;
        match built {
            Ok(Ok(runtime)) => {
                if app.swap_if(&current, runtime) {
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the configuration with the new CA does not load; the running one keeps serving");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "rebuilding the runtime failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, IsCa, Issuer, KeyPair, KeyUsagePurpose};

    fn ca(
        cn: &str,
        path_len: Option<u8>,
        key_usages: Vec<KeyUsagePurpose>,
        key: &KeyPair,
        parent: Option<&Issuer<'_, KeyPair>>,
    ) -> Vec<u8> {
        let mut params = crate::pki::ca_params(cn, path_len, ::time::Duration::days(1));
        if path_len.is_none() && cn.starts_with("leaf") {
            params.is_ca = IsCa::ExplicitNoCa;
        } else if let Some(n) = path_len {
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(n));
        }
        params.key_usages = key_usages;
        match parent {
            Some(parent) => params.signed_by(key, parent).unwrap().der().to_vec(),
            None => params.self_signed(key).unwrap().der().to_vec(),
        }
    }

    /// The answer of the layer above is checked: our key, CA:TRUE, pathlen, keyCertSign, a
    /// chain to the configured root. Each probe with its positive control.
    #[test]
    fn an_answer_beyond_what_was_asked_is_refused() {
        let usages = || vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root_key = KeyPair::generate().unwrap();
        let root_params = crate::pki::ca_params("root", None, ::time::Duration::days(2));
        let root = CertificateDer::from(root_params.self_signed(&root_key).unwrap().der().to_vec());
        let root_issuer = Issuer::new(root_params, root_key);
        let other_key = KeyPair::generate().unwrap();
        let other_root = CertificateDer::from(ca("other root", None, usages(), &other_key, None));
        let ours = KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&ours);
        let check = |der: Vec<u8>, root: &CertificateDer<'static>, path_len: u8| {
            check_answer(&[der], &[], root, &spki, path_len).map(|c| c.len())
        };

        // Positive control: our key, CA pathlen 1, keyCertSign, signed by the root.
        let good = ca("L3", Some(1), usages(), &ours, Some(&root_issuer));
        assert_eq!(check(good.clone(), &root, 1).unwrap(), 2);
        // Another root configured: no chain.
        let e = check(good.clone(), &other_root, 1).unwrap_err().to_string();
        assert!(e.contains("no chain to the configured root"), "{e}");
        // A pathlen below the one asked for.
        let e = check(good, &root, 2).unwrap_err().to_string();
        assert!(e.contains("below the 2 asked for"), "{e}");
        // Another key certified.
        let stranger = KeyPair::generate().unwrap();
        let e = check(
            ca("L3", Some(1), usages(), &stranger, Some(&root_issuer)),
            &root,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("another key"), "{e}");
        // Not a CA.
        let e = check(
            ca("leaf", None, usages(), &ours, Some(&root_issuer)),
            &root,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a CA"), "{e}");
        // No keyCertSign.
        let e = check(
            ca(
                "L3",
                Some(0),
                vec![KeyUsagePurpose::DigitalSignature],
                &ours,
                Some(&root_issuer),
            ),
            &root,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("keyCertSign"), "{e}");
        // Signed by a CA named like the root but with another key: no chain.
        let impostor_key = KeyPair::generate().unwrap();
        let impostor = Issuer::new(
            crate::pki::ca_params("root", None, ::time::Duration::days(2)),
            impostor_key,
        );
        let e = check(
            ca("L3", Some(0), usages(), &ours, Some(&impostor)),
            &root,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no chain"), "{e}");
    }

    /// A replaced CA leaves once the last certificate it signed here (the journal's record)
    /// has expired, not before it settled, at the latest at its own notAfter; while a local
    /// issuance journaled without its signing CA lives, it stays to its notAfter.
    #[test]
    fn a_replaced_ca_retires_after_the_last_certificate_it_signed() {
        use crate::auth::IssuanceIndex;
        let key = KeyPair::generate().unwrap();
        let params = crate::pki::ca_params("old", Some(0), ::time::Duration::days(1));
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let own = not_after(&der).unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let hour = ::time::Duration::hours(1);
        let fp = crate::auth::client_cert::hex(&crate::auth::chain::fingerprint(&der));
        let other = "ab".repeat(32);
        let entry =
            |ca: Option<&str>, by: &str, until: OffsetDateTime| crate::journal::JournalEntry {
                time: String::new(),
                serial: "01".into(),
                subject: "CN=x".into(),
                sans: Vec::new(),
                label: None,
                operation: "simpleenroll".into(),
                identity: "user u".into(),
                profile: "identity".into(),
                not_before: String::new(),
                not_after: until
                    .format(&::time::format_description::well_known::Rfc3339)
                    .unwrap(),
                sha256: "cd".repeat(32),
                certificate: String::new(),
                issued_by: by.into(),
                grace_renewal: false,
                issuer_ca: ca.map(str::to_owned),
            };
        let replaced = Some(now - hour);
        let index = IssuanceIndex::new();
        // It signed nothing: it leaves once settled.
        assert_eq!(
            retire_at(&index, &der, replaced, now),
            Some(now - hour + SETTLE)
        );
        assert_eq!(retire_at(&index, &der, Some(now), now), Some(now + SETTLE));
        // What another CA signed, or the layer above, does not keep it.
        index.record_issued(&entry(Some(&other), "local", now + hour));
        index.record_issued(&entry(None, "upstream top", now + hour));
        assert_eq!(
            retire_at(&index, &der, replaced, now),
            Some(now - hour + SETTLE)
        );
        // Its last certificate lives one more hour (an earlier one less).
        index.record_issued(&entry(Some(&fp), "local", now + hour));
        index.record_issued(&entry(Some(&fp), "local", now - hour));
        assert_eq!(retire_at(&index, &der, replaced, now), Some(now + hour));
        // Never beyond its own notAfter.
        index.record_issued(&entry(Some(&fp), "local", own + hour));
        assert_eq!(retire_at(&index, &der, replaced, now), Some(own));
        // A journal from before signing CAs were recorded: its own notAfter, until those
        // certificates have expired.
        let index = IssuanceIndex::new();
        index.record_entry(&entry(None, "local", now + hour), now.unix_timestamp());
        assert_eq!(retire_at(&index, &der, replaced, now), Some(own));
        assert_eq!(
            retire_at(&index, &der, replaced, now + hour),
            Some(now - hour + SETTLE)
        );
    }

    #[test]
    fn renewal_starts_at_two_thirds() {
        let nb = OffsetDateTime::from_unix_timestamp(0).unwrap();
        let na = nb + ::time::Duration::seconds(90);
        assert_eq!(renew_point(nb, na), nb + ::time::Duration::seconds(60));
        // Not counted from the epoch: a CA of today is renewed two thirds into its own life.
        let nb = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let na = nb + ::time::Duration::seconds(300);
        assert_eq!(renew_point(nb, na), nb + ::time::Duration::seconds(200));
    }

    #[test]
    fn the_warning_comes_at_nine_tenths() {
        let nb = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let na = nb + ::time::Duration::seconds(100);
        assert_eq!(warn_point(nb, na), nb + ::time::Duration::seconds(90));
    }

    /// A CA without a pathlen signed by `parent` (self-signed without), valid from `from` to
    /// `until` after now.
    fn dated_ca(
        cn: &str,
        key: &KeyPair,
        parent: Option<&Issuer<'_, KeyPair>>,
        from: ::time::Duration,
        until: ::time::Duration,
    ) -> (Vec<u8>, rcgen::CertificateParams) {
        let mut params = crate::pki::ca_params(cn, None, ::time::Duration::days(1));
        let now = OffsetDateTime::now_utc();
        params.not_before = now + from;
        params.not_after = now + until;
        let der = match parent {
            Some(parent) => params.signed_by(key, parent).unwrap().der().to_vec(),
            None => params.self_signed(key).unwrap().der().to_vec(),
        };
        (der, params)
    }

    /// The loop that looks for the next certificate of the chain stops at nine (the CA, seven
    /// CAs between, the root): a chain that long is built, a longer one is refused, and a
    /// pool whose CAs sign each other in a circle ends in a refusal, not a hang.
    #[test]
    fn the_chain_to_the_root_is_looked_for_nine_certificates_deep() {
        let day = ::time::Duration::days(1);
        let ours = KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&ours);
        // Fresh chains of a chosen length: root, `n` CAs, ours.
        let chain_of = |n: usize| {
            let root_key = KeyPair::generate().unwrap();
            let (root, root_params) = dated_ca("root", &root_key, None, -day, day);
            let mut parent = Issuer::new(root_params, root_key);
            let mut pool = Vec::new();
            for i in 0..n {
                let key = KeyPair::generate().unwrap();
                let (der, params) = dated_ca(&format!("ca {i}"), &key, Some(&parent), -day, day);
                pool.push(CertificateDer::from(der));
                parent = Issuer::new(params, key);
            }
            let mut params = crate::pki::ca_params("L3", Some(0), day);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let ours_der = params.signed_by(&ours, &parent).unwrap().der().to_vec();
            (ours_der, pool, CertificateDer::from(root))
        };
        let (der, pool, root7) = chain_of(7);
        let chain = check_answer(&[der], &pool, &root7, &spki, 0).unwrap();
        assert_eq!(chain.len(), 9);
        assert_eq!(chain.last(), Some(&root7));
        let (der, pool, root8) = chain_of(8);
        let e = check_answer(&[der], &pool, &root8, &spki, 0).unwrap_err();
        assert!(
            e.to_string().contains("no chain to the configured root"),
            "{e}"
        );
        // The CAs between may come in the answer too, in any order.
        let (der, mut pool, root7) = chain_of(7);
        pool.reverse();
        let answer: Vec<Vec<u8>> = std::iter::once(der)
            .chain(pool.iter().map(|c| c.to_vec()))
            .collect();
        assert_eq!(
            check_answer(&answer, &[], &root7, &spki, 0).unwrap().len(),
            9
        );
        // Two CAs that sign each other: never the root.
        let copy = |k: &KeyPair| KeyPair::from_pem(&k.serialize_pem()).unwrap();
        let (a_key, b_key) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let a_params = crate::pki::ca_params("A", None, day);
        let b_params = crate::pki::ca_params("B", None, day);
        let a_by_b = a_params
            .signed_by(&a_key, &Issuer::new(b_params.clone(), copy(&b_key)))
            .unwrap();
        let b_by_a = b_params
            .signed_by(&b_key, &Issuer::new(a_params.clone(), copy(&a_key)))
            .unwrap();
        let mut params = crate::pki::ca_params("L3", Some(0), day);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ours_der = params
            .signed_by(&ours, &Issuer::new(a_params, a_key))
            .unwrap()
            .der()
            .to_vec();
        let circle = [
            CertificateDer::from(a_by_b.der().to_vec()),
            CertificateDer::from(b_by_a.der().to_vec()),
        ];
        let e = check_answer(&[ours_der], &circle, &root7, &spki, 0).unwrap_err();
        assert!(
            e.to_string().contains("no chain to the configured root"),
            "{e}"
        );
    }
    /// The log lines written while `f` runs (WARN and above, no ANSI, no time).
    fn warnings(f: impl FnOnce()) -> String {
        crate::logging::tests::captured(tracing::Level::WARN, f)
    }

    fn kept_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// `current.json` is written whole (0600, no temporary left) and read back as written;
    /// nothing kept is no state, silently (a first start); an unreadable or malformed one is
    /// no state either, with a warning. Earlier CAs are dropped by SHA-256, and only a change
    /// is written.
    #[test]
    fn what_is_kept_is_replaced_whole_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let day = ::time::Duration::days(1);
        let (a, _) = dated_ca("old a", &KeyPair::generate().unwrap(), None, -day, day);
        let (b, _) = dated_ca("old b", &KeyPair::generate().unwrap(), None, -day, day);
        let (a, b) = (CertificateDer::from(a), CertificateDer::from(b));

        let quiet = warnings(|| assert!(read_kept(dir).is_none()));
        assert_eq!(quiet, "", "a first start is no news");
        assert!(!drop_previous(dir, &[crate::auth::chain::fingerprint(&a)]).unwrap());
        assert!(kept_files(dir).is_empty(), "nothing kept: nothing written");

        let kept = Kept {
            chain: "chain".into(),
            key: "key-2.pem".into(),
            previous: vec![
                pem_of(std::slice::from_ref(&a)),
                pem_of(std::slice::from_ref(&b)),
            ],
            obtained: Some(1_700_000_000),
        };
        commit(dir, &kept).unwrap();
        assert_eq!(kept_files(dir), [STATE_FILE]);
        let mode = std::fs::metadata(dir.join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = read_kept(dir).unwrap();
        assert_eq!(
            (read.chain.as_str(), read.key.as_str(), read.obtained),
            ("chain", "key-2.pem", Some(1_700_000_000))
        );
        assert_eq!(read.previous, kept.previous);
        assert!(pem_of(std::slice::from_ref(&a)).starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(
            CertificateDer::from_pem_slice(pem_of(std::slice::from_ref(&a)).as_bytes()).unwrap(),
            a
        );

        // A CA not kept: no change, nothing written.
        let (c, _) = dated_ca("other", &KeyPair::generate().unwrap(), None, -day, day);
        let before = std::fs::metadata(dir.join(STATE_FILE))
            .unwrap()
            .modified()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!drop_previous(dir, &[crate::auth::chain::fingerprint(&c)]).unwrap());
        let after = std::fs::metadata(dir.join(STATE_FILE))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);
        // The first one dropped: the other stays, the rest as it was.
        assert!(drop_previous(dir, &[crate::auth::chain::fingerprint(&a)]).unwrap());
        let read = read_kept(dir).unwrap();
        assert_eq!(read.previous, [pem_of(std::slice::from_ref(&b))]);
        assert_eq!(
            (read.chain.as_str(), read.key.as_str()),
            ("chain", "key-2.pem")
        );
        assert_eq!(kept_files(dir), [STATE_FILE]);

        // Malformed, unreadable: no state, said so.
        std::fs::write(dir.join(STATE_FILE), "{ not json").unwrap();
        let said = warnings(|| assert!(read_kept(dir).is_none()));
        assert!(said.contains("malformed"), "{said}");
        std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
        std::fs::create_dir(dir.join(STATE_FILE)).unwrap();
        let said = warnings(|| assert!(read_kept(dir).is_none()));
        assert!(said.contains("unreadable"), "{said}");
    }

    /// Key files `current.json` does not name go (orphans of an interrupted renewal, keys of
    /// CAs replaced); its key, `current.json` and anything not named like a key stay.
    #[test]
    fn only_the_key_in_force_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        for name in [
            "key-1.pem",
            "key-2.pem",
            "key-3.pem",
            "notes.txt",
            STATE_FILE,
        ] {
            std::fs::write(dir.join(name), name).unwrap();
        }
        let kept = Kept {
            chain: String::new(),
            key: "key-2.pem".into(),
            previous: Vec::new(),
            obtained: None,
        };
        remove_orphan_keys(dir, &kept);
        assert_eq!(kept_files(dir), [STATE_FILE, "key-2.pem", "notes.txt"]);
    }

    /// What `load` makes of what was kept: the CA serves only if its chain ends with the
    /// configured root (a root replaced in the configuration is a new enrollment), with the
    /// key it names; earlier CAs only while they are valid.
    #[test]
    fn a_kept_ca_serves_only_below_the_configured_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let day = ::time::Duration::days(1);
        let root_key = KeyPair::generate().unwrap();
        let (root, root_params) = dated_ca("root", &root_key, None, -day, 2 * day);
        let root_issuer = Issuer::new(root_params, root_key);
        let ca_key = KeyPair::generate().unwrap();
        let (ca, _) = dated_ca("L3", &ca_key, Some(&root_issuer), -day, day);
        let (expired, _) = dated_ca("old", &KeyPair::generate().unwrap(), None, -2 * day, -day);
        let (valid, _) = dated_ca("older", &KeyPair::generate().unwrap(), None, -day, day);
        let (root, ca) = (CertificateDer::from(root), CertificateDer::from(ca));
        let (expired, valid) = (CertificateDer::from(expired), CertificateDer::from(valid));
        std::fs::write(dir.join("key-1.pem"), ca_key.serialize_pem()).unwrap();
        let kept = Kept {
            chain: pem_of(&[ca.clone(), root.clone()]),
            key: "key-1.pem".into(),
            previous: vec![pem_of(&[expired]), pem_of(std::slice::from_ref(&valid))],
            obtained: Some(1_700_000_000),
        };
        commit(dir, &kept).unwrap();
        let no_token = |_: &str, _: &str| -> Result<IssuerKey, String> { panic!("no token here") };

        let loaded = load(dir, &pem_of(std::slice::from_ref(&root)), no_token);
        let issuer = loaded.issuer.expect("the kept CA serves");
        assert_eq!(issuer.chain(), [ca.clone(), root.clone()]);
        assert_eq!(
            loaded.previous,
            std::slice::from_ref(&valid),
            "the expired one is gone"
        );
        assert_eq!(
            loaded.obtained,
            Some(OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap())
        );

        // Another root configured: it does not serve (the earlier CAs still load).
        let (other, _) = dated_ca("root", &KeyPair::generate().unwrap(), None, -day, day);
        let loaded = load(dir, &pem_of(&[CertificateDer::from(other)]), no_token);
        assert!(loaded.issuer.is_none());
        assert_eq!(loaded.previous, [valid]);
        // A key that is not the CA's: it does not serve.
        std::fs::write(
            dir.join("key-1.pem"),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        assert!(load(dir, &pem_of(std::slice::from_ref(&root)), no_token)
            .issuer
            .is_none());
        // Nothing kept: nothing loaded.
        let empty = tempfile::tempdir().unwrap();
        let loaded = load(empty.path(), &pem_of(&[root]), no_token);
        assert!(loaded.issuer.is_none() && loaded.previous.is_empty() && loaded.obtained.is_none());
    }
    /// Run by [`strace_shows_the_state_synced_before_and_the_directory_after_the_rename`]
    /// in a child process under strace: one commit into `EDGE_EST_COMMIT_DIR`.
    #[test]
    #[ignore = "a helper: run under strace by strace_shows_the_state_synced_…"]
    fn commit_into_the_directory_of_the_environment() {
        let dir = std::env::var_os("EDGE_EST_COMMIT_DIR").expect("EDGE_EST_COMMIT_DIR");
        let kept = Kept {
            chain: "chain".into(),
            key: "key-1.pem".into(),
            previous: Vec::new(),
            obtained: None,
        };
        commit(Path::new(&dir), &kept).unwrap();
    }

    /// `current.json` is the commit point, so the order on disk is the contract: the new
    /// state is written to a temporary file and `fsync`ed, renamed over `current.json`, and the
    /// directory is `fsync`ed after the rename (else a power cut can bring back the old
    /// name). Observed with strace on a child (this test binary, running the helper above), so
    /// that it also works where only descendants may be traced.
    #[test]
    fn strace_shows_the_state_synced_before_and_the_directory_after_the_rename() {
        use std::process::Command;
        if Command::new("strace").arg("-V").output().is_err() {
            assert!(
                std::env::var("EDGE_EST_SKIP_MISSING_TOOLS").is_ok_and(|v| v == "1"),
                "strace is not installed (apt-get install strace); set \
                 EDGE_EST_SKIP_MISSING_TOOLS=1 to skip"
            );
            eprintln!("SKIPPED (EDGE_EST_SKIP_MISSING_TOOLS=1): strace of the commit");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let trace = tmp.path().join("trace.txt");
        let out = Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-y",
                "-e",
                "trace=fsync,fdatasync,rename,renameat,renameat2",
            ])
            .arg("-o")
            .arg(&trace)
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "issue::delegation::tests::commit_into_the_directory_of_the_environment",
                "--ignored",
                "--test-threads=1",
            ])
            .env("EDGE_EST_COMMIT_DIR", &dir)
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "the traced commit failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&trace).unwrap();
        let state = dir.join(STATE_FILE).display().to_string();
        let dir_text = dir.display().to_string();
        let lines: Vec<&str> = text.lines().collect();
        let at = |what: &dyn Fn(&str) -> bool| lines.iter().position(|l| what(l));
        let synced_temporary = at(&|l: &str| {
            l.contains(" fsync(") && l.contains(&format!("<{state}.tmp")) && l.ends_with("= 0")
        });
        let renamed = at(&|l: &str| {
            l.contains(" rename") && l.contains(&format!("\"{state}\"")) && l.ends_with("= 0")
        });
        let synced_dir = at(&|l: &str| {
            l.contains(" fsync(") && l.contains(&format!("<{dir_text}>)")) && l.ends_with("= 0")
        });
        match (synced_temporary, renamed, synced_dir) {
            (Some(a), Some(b), Some(c)) if a < b && b < c => {}
            _ => panic!("expected fsync of the temporary, the rename, fsync of the directory, in that order:\n{text}"),
        }
    }
    /// A key generated in a token gets the location's `object=` (or `edge-est-<issuer>`)
    /// with the renewal's stamp as its label and the stamp as its id; every other attribute
    /// and the query (PIN source, module) are kept as written; an `id=` written is replaced.
    #[test]
    fn a_token_key_is_named_from_the_location_and_the_stamp() {
        assert_eq!(
            token_key_uri(
                "pkcs11:token=edge;object=plant-ca;id=%01?pin-source=file:/run/pin&module-path=/lib/p11.so",
                "mid",
                42,
            ),
            (
                "pkcs11:token=edge;object=plant-ca-42;id=42?pin-source=file:/run/pin&module-path=/lib/p11.so"
                    .to_owned(),
                "plant-ca-".to_owned()
            )
        );
        assert_eq!(
            token_key_uri("pkcs11:;token=edge;;slot-id=3", "mid", 7),
            (
                "pkcs11:token=edge;slot-id=3;object=edge-est-mid-7;id=7".to_owned(),
                "edge-est-mid-".to_owned()
            )
        );
    }

    #[test]
    fn state_and_dates_of_a_ca() {
        // Under the data directory, one directory an issuer, named after it.
        let base = Path::new("/var/lib/edge-est");
        let dir = state_dir(base, "mid");
        assert_eq!(dir.parent(), Some(base));
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("issuer-mid"), "{name}");
        assert_ne!(dir, state_dir(base, "top"));
        let day = ::time::Duration::days(1);
        let (der, params) = dated_ca("ca", &KeyPair::generate().unwrap(), None, -day, day);
        let second = |t: OffsetDateTime| t.replace_nanosecond(0).unwrap();
        assert_eq!(
            validity(&der),
            Some((second(params.not_before), second(params.not_after)))
        );
        assert_eq!(not_after(&der), Some(second(params.not_after)));
        assert_eq!(validity(b"not a certificate"), None);
        assert_eq!(not_after(b"not a certificate"), None);
    }
}
