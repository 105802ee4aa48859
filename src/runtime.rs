//! The running form of a [`Config`]: everything loaded, parsed and checked, ready to serve.
//! A `Runtime` is built off to the side and swapped in whole; requests in flight finish on
//! the one they started with.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::ServerConfig;

use crate::auth::chain::CaKey;
use crate::auth::{AuthMethods, TrustSet, UserDb};
use crate::config::{read_path, Config, ConfigError, Limits, Mode, ServerKeygen};
use crate::est::{self, Label};
use crate::issue::delegation::{self, Enrolled};
use crate::issue::fallback::Fallback;
use crate::issue::profile::{self, ProfileClass};
use crate::issue::{LocalIssuer, Profile, Upstream};
use crate::keys::{IssuerKey, PrivateKey, TokenKey};
use crate::policy::Policy;

pub struct Runtime {
    pub tls: Arc<ServerConfig>,
    /// When the TLS server certificate expires (for the metrics).
    pub tls_not_after: Option<time::OffsetDateTime>,
    pub limits: Limits,
    pub users: UserDb,
    labels: HashMap<Option<Label>, Arc<LabelRuntime>>,
    /// The CAs of every local issuer: a CA they issued is a device's own (`auth::chain`).
    pub issuing_cas: Vec<CaKey>,
    /// The issuers this layer enrolls from the layer above, as loaded.
    enrolled: Vec<Enrolled>,
    /// What this runtime was built from: an enrolled CA renewed rebuilds it.
    config: Config,
    base: PathBuf,
}

/// One label: how clients authenticate, what they may get, and who signs.
pub struct LabelRuntime {
    pub name: Option<Label>,
    pub auth: AuthMethods,
    pub anonymous_cacerts: bool,
    pub trust: Vec<Arc<TrustSet>>,
    /// Certificates that may complete a client's chain when it presents its leaf alone.
    pub known_intermediates: Vec<CertificateDer<'static>>,
    pub policy: Policy,
    pub profile: Profile,
    pub ca_profile: Profile,
    pub mode: Mode,
    /// This instance's issuer for the label (modes `sign` and `auto`).
    pub local: Option<Arc<LocalIssuer>>,
    /// The layer above (modes `forward` and `auto`), and the label to ask it under.
    pub upstream: Option<Arc<Upstream>>,
    pub upstream_label: Option<String>,
    /// Whether `client_trust` names `issuer` and the issuer is upstream's: then the upstream's
    /// issuing CA (from its cached `/cacerts`) authenticates clients too.
    pub trust_upstream_issuer: bool,
    /// The labels whose issuance (in the journal) counts as `issuer` here: this label, then
    /// its `issuer_labels`.
    pub issuer_labels: Vec<Option<String>>,
    /// The trust sets against which a client certificate is looked at as a module of a
    /// device (the label's `module:` rules); empty: never.
    pub module_sets: Vec<String>,
    /// The local `/cacerts` answer, encoded once.
    pub cacerts_body: Option<Bytes>,
    /// The `/csrattrs` answer, encoded once; `None` answers 204.
    pub csrattrs_body: Option<Bytes>,
    pub serverkeygen: ServerKeygen,
    /// Mode `auto`: what may be signed locally while the upstream is away.
    pub fallback: Option<Fallback>,
}

impl LabelRuntime {
    /// The label as it appears in logs and the journal.
    pub fn display_name(&self) -> &str {
        self.name.as_ref().map_or("(unlabeled)", Label::as_str)
    }
}

impl Runtime {
    pub fn label(&self, label: &Option<Label>) -> Option<&Arc<LabelRuntime>> {
        self.labels.get(label)
    }

    /// The enrolled issuers and their CAs.
    pub fn enrolled(&self) -> &[Enrolled] {
        &self.enrolled
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The directory relative paths of the configuration resolve against.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Every label served, in no particular order.
    pub fn labels(&self) -> impl Iterator<Item = &Arc<LabelRuntime>> {
        self.labels.values()
    }

    /// Loads and validates a whole configuration. Relative file paths are resolved against
    /// `base` (the configuration file's directory).
    pub fn build(config: &Config, base: &Path) -> Result<Runtime, ConfigError> {
        config.validate()?;

        let tls_config = config.tls.as_ref().ok_or_else(|| {
            ConfigError::invalid(
                "tls",
                "no server certificate: give tls.certificate and tls.key",
            )
        })?;
        let tls_chain = tls_config.certificate.read(base, "tls.certificate")?;
        let tls_key = load_key(config, base, &tls_config.key, &tls_chain, "tls.key")?;
        let tls = crate::transport::tls::server_config(&tls_chain, &tls_key)
            .map_err(|e| ConfigError::invalid("tls", e))?;
        let tls_not_after = CertificateDer::pem_slice_iter(tls_chain.as_bytes())
            .next()
            .and_then(Result::ok)
            .and_then(|der| {
                x509_parser::parse_x509_certificate(&der)
                    .ok()
                    .map(|(_, c)| c.validity().not_after.to_datetime())
            });

        let mut trust_sets: BTreeMap<String, Arc<TrustSet>> = BTreeMap::new();
        for (name, set) in &config.trust {
            let mut certs = Vec::new();
            for (i, source) in set.certificates.iter().enumerate() {
                let pem = source.read(base, &format!("trust.{name}.certificates[{i}]"))?;
                let found = CertificateDer::pem_slice_iter(pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        ConfigError::invalid(
                            format!("trust.{name}"),
                            format!("not PEM certificates: {e}"),
                        )
                    })?;
                certs.extend(found);
            }
            let set = TrustSet::with_depth(name, &certs, set.depth)
                .map_err(|e| ConfigError::invalid(format!("trust.{name}"), e))?;
            trust_sets.insert(name.clone(), Arc::new(set));
        }

        let users = UserDb::new(&config.users, config.limits.password_checks)
            .map_err(|e| ConfigError::invalid("users", e))?;

        let mut issuers: BTreeMap<String, Arc<LocalIssuer>> = BTreeMap::new();
        for (name, issuer) in &config.issuers {
            let chain = issuer
                .certificate
                .read(base, &format!("issuers.{name}.certificate"))?;
            let field = format!("issuers.{name}");
            let loaded =
                match load_key(config, base, &issuer.key, &chain, &format!("{field}.key"))? {
                    PrivateKey::Pem(key) => LocalIssuer::load(&chain, &key),
                    PrivateKey::Token(key) => LocalIssuer::load_with(&chain, IssuerKey::Token(key)),
                }
                .map_err(|e| ConfigError::invalid(field, e))?;
            issuers.insert(name.clone(), Arc::new(loaded));
        }

        let mut upstreams: BTreeMap<String, Arc<Upstream>> = BTreeMap::new();
        let module = config.pkcs11_module.as_ref().map(|m| base.join(m));
        for (name, upstream) in &config.upstreams {
            let loaded = Upstream::with_module(name, upstream, base, module.as_deref())?;
            upstreams.insert(name.clone(), loaded.shared());
        }

        // Enrolled issuers: the CA kept on disk, if it still serves, signs like a configured
        // one; without one their labels forward to the upstream that grants it.
        let data_dir = base
            .join(&config.journal)
            .parent()
            .map_or_else(|| base.to_owned(), Path::to_path_buf);
        let mut enrolled = Vec::new();
        let mut previous_cas: BTreeMap<String, Vec<CertificateDer<'static>>> = BTreeMap::new();
        for (name, e) in &config.enrolled_issuers {
            let field = format!("enrolled_issuers.{name}");
            let upstream = required(&upstreams, &e.enroll, || format!("{field}.enroll"))?;
            let root = e.root.read(base, &format!("{field}.root"))?;
            let dir = delegation::state_dir(&data_dir, name);
            let module = config.pkcs11_module.as_ref().map(|m| base.join(m));
            let loaded = delegation::load(&dir, &root, |uri, chain| {
                TokenKey::open(uri, module.as_deref(), chain)
                    .map(IssuerKey::Token)
                    .map_err(|e| e.to_string())
            });
            let (issuer, previous) = (loaded.issuer, loaded.previous);
            let current = issuer.as_ref().and_then(|i| {
                let der = i.chain().first()?;
                let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
                let not_before = c.validity().not_before.to_datetime();
                Some((
                    loaded.obtained.map_or(not_before, |t| t.max(not_before)),
                    c.validity().not_after.to_datetime(),
                ))
            });
            let fingerprint = issuer
                .as_ref()
                .and_then(|i| i.chain().first())
                .map(|c| crate::auth::chain::fingerprint(c));
            match issuer {
                Some(issuer) => {
                    issuers.insert(name.clone(), Arc::new(issuer));
                }
                None => tracing::warn!(
                    issuer = %name, upstream = %e.enroll,
                    "enrolled issuer has no valid CA yet: its labels forward to the layer above until it has one"
                ),
            }
            previous_cas.insert(name.clone(), previous.clone());
            enrolled.push(Enrolled {
                name: name.clone(),
                config: e.clone(),
                dir,
                upstream,
                current,
                fingerprint,
                previous,
                obtained: loaded.obtained,
                pkcs11_module: module,
            });
        }

        let mut profile_configs = profile::builtin();
        profile_configs.extend(config.profiles.clone());
        let mut profiles: BTreeMap<String, Profile> = BTreeMap::new();
        for (name, p) in &profile_configs {
            let built = Profile::try_from((name.as_str(), p))
                .map_err(|e| ConfigError::invalid("profiles", e))?;
            profiles.insert(name.clone(), built);
        }

        let mut labels = HashMap::new();
        for (i, label) in config.labels.iter().enumerate() {
            let field = |f: &str| format!("labels[{i}].{f}");
            // References and modes were checked by `validate`; only loaded things remain.
            let name = label
                .name
                .as_deref()
                .map(Label::new)
                .transpose()
                .map_err(|e| ConfigError::invalid(field("name"), e.to_string()))?;
            // An enrolled issuer without a CA: the label forwards to where the CA comes from.
            let waiting = label
                .issuer
                .as_ref()
                .filter(|i| !issuers.contains_key(*i))
                .and_then(|i| config.enrolled_issuers.get(i));
            let (mode, upstream_name, upstream_label) = match waiting {
                Some(e) => (
                    Mode::Forward,
                    label.upstream.clone().or_else(|| Some(e.enroll.clone())),
                    label.upstream_label.clone().or_else(|| e.label.clone()),
                ),
                None => (
                    label.mode,
                    label.upstream.clone(),
                    label.upstream_label.clone(),
                ),
            };
            let local = match waiting {
                Some(_) => None,
                None => lookup(&issuers, label.issuer.as_ref(), || field("issuer"))?,
            };
            let previous = label
                .issuer
                .as_ref()
                .and_then(|i| previous_cas.get(i))
                .filter(|_| local.is_some())
                .cloned()
                .unwrap_or_default();
            let upstream = lookup(&upstreams, upstream_name.as_ref(), || field("upstream"))?;
            let profile = required(&profiles, &label.profile, || field("profile"))?;
            let ca_profile = required(&profiles, &label.ca_profile, || field("ca_profile"))?;
            let grants_ca = label.rules.iter().any(|r| !r.ca_common_names.is_empty());
            if let (ProfileClass::Ca { path_len }, Some(issuer)) = (&ca_profile.class, &local) {
                if grants_ca && !issuer.can_issue_ca(*path_len) {
                    return Err(ConfigError::invalid(
                        field("ca_profile"),
                        format!(
                            "rules grant CA certificates, but the issuer's path length does not allow a CA \
                             below it with pathlen {path_len}"
                        ),
                    ));
                }
            }

            let mut trust = Vec::new();
            let mut trust_upstream_issuer = false;
            for set in &label.client_trust {
                if set == "issuer" {
                    if let Some(issuer) = &local {
                        // The CAs it replaced still vouch for what they issued.
                        let cas: Vec<CertificateDer<'static>> = issuer.chain()[..1]
                            .iter()
                            .chain(&previous)
                            .cloned()
                            .collect();
                        let own = TrustSet::direct("issuer", &cas)
                            .map_err(|e| ConfigError::invalid(field("client_trust"), e))?;
                        trust.push(Arc::new(own));
                    }
                    trust_upstream_issuer = upstream.is_some();
                } else {
                    let found = trust_sets.get(set).ok_or_else(|| {
                        ConfigError::invalid(
                            field("client_trust"),
                            format!("no trust set named {set:?}"),
                        )
                    })?;
                    trust.push(found.clone());
                }
            }
            let policy = Policy::new(&label.rules, &label.deny, &label.client_trust)
                .map_err(|e| ConfigError::invalid(field("rules"), e))?;
            let module_sets = policy.module_sets();
            let issuer_labels = std::iter::once(label.name.clone())
                .chain(
                    label
                        .issuer_labels
                        .iter()
                        .map(|l| crate::config::issuer_label_key(l)),
                )
                .collect();
            let fallback =
                match (mode, label.fallback.as_ref().filter(|_| waiting.is_none())) {
                    (Mode::Auto, Some(allowance)) => Some(
                        Fallback::new(allowance)
                            .map_err(|e| ConfigError::invalid(field("fallback"), e))?,
                    ),
                    (Mode::Auto, None) => return Err(ConfigError::invalid(
                        field("fallback"),
                        "an auto label signs locally only within a fallback allowance: the names \
                         the layer above allows this layer's RA (copy its RA rule's common_names, \
                         ca_common_names, ...)",
                    )),
                    (_, Some(_)) => {
                        return Err(ConfigError::invalid(
                            field("fallback"),
                            "only an auto label signs in its upstream's stead",
                        ))
                    }
                    (_, None) => None,
                };

            let cacerts_body = match &local {
                Some(issuer) => {
                    // The CA, the CAs it replaced, then the chain above.
                    let chain: Vec<&[u8]> = issuer.chain()[..1]
                        .iter()
                        .chain(&previous)
                        .chain(&issuer.chain()[1..])
                        .map(|c| c.as_ref())
                        .collect();
                    let cacerts = est::pkcs7::encode_certs_only(&chain)
                        .map_err(|e| ConfigError::invalid(field("issuer"), e.to_string()))?;
                    Some(Bytes::from(est::body::encode_base64_lines(&cacerts)))
                }
                None => None,
            };
            let attributes = label
                .csr_attributes
                .iter()
                .map(|a| est::csrattrs::parse_csr_attr(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ConfigError::invalid(field("csr_attributes"), e))?;
            let csrattrs_body = (!attributes.is_empty()).then(|| {
                Bytes::from(est::body::encode_base64_lines(
                    &est::csrattrs::encode_csrattrs(&attributes),
                ))
            });

            labels.insert(
                name.clone(),
                Arc::new(LabelRuntime {
                    name,
                    auth: AuthMethods {
                        certificate: label.authentication.certificate,
                        basic: label.authentication.basic,
                        require_both: label.authentication.require_both,
                        grace_expired: std::time::Duration::from_secs(label.grace_expired_secs),
                    },
                    anonymous_cacerts: label.authentication.anonymous_cacerts,
                    trust,
                    known_intermediates: local
                        .as_ref()
                        .map(|i| i.chain().iter().chain(&previous).cloned().collect())
                        .unwrap_or_default(),
                    policy,
                    profile,
                    ca_profile,
                    mode,
                    local,
                    upstream,
                    upstream_label,
                    trust_upstream_issuer,
                    issuer_labels,
                    module_sets,
                    cacerts_body,
                    csrattrs_body,
                    serverkeygen: label.serverkeygen,
                    fallback,
                }),
            );
        }

        let issuing_cas = issuers
            .values()
            .filter_map(|i| i.chain().first())
            .chain(previous_cas.values().flatten())
            .filter_map(CaKey::of)
            .collect();
        for warning in crate::auth::ra::warnings(config) {
            tracing::warn!("configuration: {warning}");
        }
        Ok(Runtime {
            tls: Arc::new(tls),
            tls_not_after,
            limits: config.limits.clone(),
            users,
            labels,
            issuing_cas,
            enrolled,
            config: config.clone(),
            base: base.to_owned(),
        })
    }
}

/// Looks up a named, loaded item that `validate` has checked exists.
fn required<T: Clone>(
    items: &BTreeMap<String, T>,
    name: &str,
    field: impl Fn() -> String,
) -> Result<T, ConfigError> {
    items
        .get(name)
        .cloned()
        .ok_or_else(|| ConfigError::invalid(field(), format!("no such name {name:?}")))
}

fn lookup<T: Clone>(
    items: &BTreeMap<String, T>,
    name: Option<&String>,
    field: impl Fn() -> String,
) -> Result<Option<T>, ConfigError> {
    name.map(|name| required(items, name, field)).transpose()
}

/// Reads a configured private key: a PEM file, or (a `pkcs11:` URI) a key in a token, opened
/// and checked against the first certificate of `chain_pem`. Errors name the URI with its PIN
/// redacted.
fn load_key(
    config: &Config,
    base: &Path,
    path: &Path,
    chain_pem: &str,
    field: &str,
) -> Result<PrivateKey, ConfigError> {
    match path.to_str().filter(|p| crate::keys::is_pkcs11(p)) {
        Some(uri) => {
            let module = config.pkcs11_module.as_ref().map(|m| base.join(m));
            TokenKey::open(uri, module.as_deref(), chain_pem)
                .map(PrivateKey::Token)
                .map_err(|e| ConfigError::invalid(field, e.to_string()))
        }
        None => read_path(base, path, field).map(PrivateKey::Pem),
    }
}
