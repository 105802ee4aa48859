//! The running form of a [`Config`]: everything loaded, parsed and checked, ready to serve.
//! A `Runtime` is built off to the side and swapped in whole; requests in flight finish on
//! the one they started with.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::ServerConfig;

use crate::auth::{AuthMethods, TrustSet, UserDb};
use crate::config::{Config, ConfigError, Limits, Mode, ServerKeygen};
use crate::est::{self, Label};
use crate::issue::profile::{self, ProfileClass};
use crate::issue::{LocalIssuer, Profile, Upstream};
use crate::policy::Policy;

pub struct Runtime {
    pub tls: Arc<ServerConfig>,
    pub limits: Limits,
    pub users: UserDb,
    labels: HashMap<Option<Label>, Arc<LabelRuntime>>,
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
    /// The local `/cacerts` answer, encoded once.
    pub cacerts_body: Option<Bytes>,
    /// The `/csrattrs` answer, encoded once; `None` answers 204.
    pub csrattrs_body: Option<Bytes>,
    pub serverkeygen: ServerKeygen,
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

    /// Loads and validates a whole configuration. Relative file paths are resolved against
    /// `base` (the configuration file's directory).
    pub fn build(config: &Config, base: &Path) -> Result<Runtime, ConfigError> {
        config.check_no_secrets()?;
        check_limits(&config.limits)?;

        let tls_chain = config.tls.certificate.read(base)?;
        let tls_key = read_file(base, &config.tls.key)?;
        let tls = crate::transport::tls::server_config(&tls_chain, &tls_key)
            .map_err(|e| ConfigError::invalid("tls", e))?;

        let mut trust_sets: BTreeMap<String, Arc<TrustSet>> = BTreeMap::new();
        for (name, set) in &config.trust {
            if name == "issuer" {
                return Err(ConfigError::invalid(
                    "trust.issuer",
                    "the name `issuer` is reserved",
                ));
            }
            let mut certs = Vec::new();
            for source in &set.certificates {
                let pem = source.read(base)?;
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
            let set = TrustSet::new(name, &certs)
                .map_err(|e| ConfigError::invalid(format!("trust.{name}"), e))?;
            trust_sets.insert(name.clone(), Arc::new(set));
        }

        let users = UserDb::new(&config.users, config.limits.password_checks)
            .map_err(|e| ConfigError::invalid("users", e))?;

        let mut issuers: BTreeMap<String, Arc<LocalIssuer>> = BTreeMap::new();
        for (name, issuer) in &config.issuers {
            let chain = issuer.certificate.read(base)?;
            let key = read_file(base, &issuer.key)?;
            let loaded = LocalIssuer::load(&chain, &key)
                .map_err(|e| ConfigError::invalid(format!("issuers.{name}"), e))?;
            issuers.insert(name.clone(), Arc::new(loaded));
        }

        let mut upstreams: BTreeMap<String, Arc<Upstream>> = BTreeMap::new();
        for (name, upstream) in &config.upstreams {
            upstreams.insert(name.clone(), Arc::new(Upstream::new(name, upstream, base)?));
        }

        let mut profile_configs = profile::builtin();
        profile_configs.extend(config.profiles.clone());
        let mut profiles: BTreeMap<String, Profile> = BTreeMap::new();
        for (name, p) in &profile_configs {
            let built = Profile::try_from((name.as_str(), p))
                .map_err(|e| ConfigError::invalid("profiles", e))?;
            profiles.insert(name.clone(), built);
        }

        if config.labels.is_empty() {
            return Err(ConfigError::invalid(
                "labels",
                "at least one label is needed",
            ));
        }
        let mut labels = HashMap::new();
        for (i, label) in config.labels.iter().enumerate() {
            let field = |f: &str| format!("labels[{i}].{f}");
            let name = match &label.name {
                None => None,
                Some(n) => Some(
                    Label::new(n)
                        .map_err(|e| ConfigError::invalid(field("name"), e.to_string()))?,
                ),
            };
            if labels.contains_key(&name) {
                return Err(ConfigError::invalid(
                    field("name"),
                    "another label has the same name",
                ));
            }
            let local = match &label.issuer {
                Some(name) => Some(
                    issuers
                        .get(name)
                        .ok_or_else(|| {
                            ConfigError::invalid(
                                field("issuer"),
                                format!("no issuer named {name:?}"),
                            )
                        })?
                        .clone(),
                ),
                None => None,
            };
            let upstream = match &label.upstream {
                Some(name) => Some(
                    upstreams
                        .get(name)
                        .ok_or_else(|| {
                            ConfigError::invalid(
                                field("upstream"),
                                format!("no upstream named {name:?}"),
                            )
                        })?
                        .clone(),
                ),
                None => None,
            };
            match (label.mode, local.is_some(), upstream.is_some()) {
                (Mode::Sign, true, false)
                | (Mode::Forward, false, true)
                | (Mode::Auto, true, true) => {}
                (Mode::Sign, _, _) => {
                    return Err(ConfigError::invalid(
                        field("mode"),
                        "sign needs an issuer and no upstream",
                    ))
                }
                (Mode::Forward, _, _) => {
                    return Err(ConfigError::invalid(
                        field("mode"),
                        "forward needs an upstream and no issuer",
                    ))
                }
                (Mode::Auto, _, _) => {
                    return Err(ConfigError::invalid(
                        field("mode"),
                        "auto needs both an upstream and an issuer",
                    ))
                }
            }
            if let Some(upstream_label) = &label.upstream_label {
                Label::new(upstream_label)
                    .map_err(|e| ConfigError::invalid(field("upstream_label"), e.to_string()))?;
                if upstream.is_none() {
                    return Err(ConfigError::invalid(
                        field("upstream_label"),
                        "needs an upstream",
                    ));
                }
            }
            let profile = profiles
                .get(&label.profile)
                .filter(|p| !p.is_ca())
                .ok_or_else(|| {
                    ConfigError::invalid(
                        field("profile"),
                        format!("{:?} is not an end-entity profile", label.profile),
                    )
                })?
                .clone();
            let ca_profile = profiles
                .get(&label.ca_profile)
                .filter(|p| p.is_ca())
                .ok_or_else(|| {
                    ConfigError::invalid(
                        field("ca_profile"),
                        format!("{:?} is not a CA profile", label.ca_profile),
                    )
                })?
                .clone();
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
                        let own = TrustSet::direct("issuer", &issuer.chain()[..1])
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
            if label.authentication.certificate && trust.is_empty() && !trust_upstream_issuer {
                return Err(ConfigError::invalid(
                    field("client_trust"),
                    "certificate authentication is on but no trust set is named",
                ));
            }
            if !label.authentication.certificate && !label.authentication.basic {
                return Err(ConfigError::invalid(
                    field("authentication"),
                    "turns off every method",
                ));
            }
            let policy = Policy::new(&label.rules, &label.deny, &label.client_trust)
                .map_err(|e| ConfigError::invalid(field("rules"), e))?;

            let cacerts_body = match &local {
                Some(issuer) => {
                    let chain: Vec<&[u8]> = issuer.chain().iter().map(|c| c.as_ref()).collect();
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
                    },
                    anonymous_cacerts: label.authentication.anonymous_cacerts,
                    trust,
                    known_intermediates: local
                        .as_ref()
                        .map(|i| i.chain().to_vec())
                        .unwrap_or_default(),
                    policy,
                    profile,
                    ca_profile,
                    mode: label.mode,
                    local,
                    upstream,
                    upstream_label: label.upstream_label.clone(),
                    trust_upstream_issuer,
                    cacerts_body,
                    csrattrs_body,
                    serverkeygen: label.serverkeygen,
                }),
            );
        }

        Ok(Runtime {
            tls: Arc::new(tls),
            limits: config.limits.clone(),
            users,
            labels,
        })
    }
}

fn read_file(base: &Path, path: &Path) -> Result<String, ConfigError> {
    let path = base.join(path);
    std::fs::read_to_string(&path).map_err(|e| ConfigError::Io(path, e.to_string()))
}

fn check_limits(limits: &Limits) -> Result<(), ConfigError> {
    let bad = |f: &str, r: &str| Err(ConfigError::invalid(format!("limits.{f}"), r));
    if !(1024..=1024 * 1024).contains(&limits.max_body_bytes) {
        return bad("max_body_bytes", "must be between 1024 and 1048576");
    }
    if limits.max_connections == 0 || limits.max_connections > 1_000_000 {
        return bad("max_connections", "must be between 1 and 1000000");
    }
    for (f, v) in [
        ("handshake_timeout_secs", limits.handshake_timeout_secs),
        ("header_timeout_secs", limits.header_timeout_secs),
        ("body_timeout_secs", limits.body_timeout_secs),
    ] {
        if !(1..=300).contains(&v) {
            return bad(f, "must be between 1 and 300 seconds");
        }
    }
    if limits.password_checks == 0 || limits.password_checks > 64 {
        return bad("password_checks", "must be between 1 and 64");
    }
    Ok(())
}
