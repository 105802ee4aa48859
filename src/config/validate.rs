//! Validation of a whole [`Config`] without touching any file: references between sections,
//! modes, patterns, limits, and the absence of secrets. The module validates a twin with it
//! before anything is loaded, and `check-manifest` validates deployment manifests with it on a
//! machine that has none of the gateway's files. Loading (`Runtime::build`) runs it first.

use std::collections::BTreeSet;

use super::{Config, ConfigError, Limits, Mode};
use crate::est::Label;
use crate::issue::profile::{self, Profile};
use crate::policy::Policy;

impl Config {
    /// Validates the whole configuration; the first problem found, in the order of
    /// [`Config::problems`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.problems().into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// Every problem the validation finds (none: valid), in the order of the file's sections:
    /// secrets, limits, trust and users, upstreams, profiles, then each label.
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut found = Vec::new();
        self.collect_problems(&mut found);
        found
    }

    fn collect_problems(&self, found: &mut Vec<ConfigError>) {
        if let Err(e) = self.check_no_secrets() {
            found.push(e);
        }
        check_limits(&self.limits, found);
        for set in &self.limits.unlimited_trust {
            if !self.trust.contains_key(set) {
                found.push(ConfigError::invalid(
                    "limits.unlimited_trust",
                    format!("no trust set named {set:?}"),
                ));
            }
        }
        if let Some(socket) = &self.proxy_socket {
            if let Err(e) = check_proxy_socket(socket) {
                found.push(e);
            }
        }
        if self.trust.contains_key("issuer") {
            found.push(ConfigError::invalid(
                "trust.issuer",
                "the name `issuer` is reserved",
            ));
        }
        for (name, set) in &self.trust {
            for (i, source) in set.certificates.iter().enumerate() {
                check_inline_pem(source, || format!("trust.{name}.certificates[{i}]"), found);
            }
        }
        if let Some(tls) = &self.tls {
            check_inline_pem(&tls.certificate, || "tls.certificate".to_owned(), found);
        }
        for (name, issuer) in &self.issuers {
            check_inline_pem(
                &issuer.certificate,
                || format!("issuers.{name}.certificate"),
                found,
            );
        }
        for (name, enrolled) in &self.enrolled_issuers {
            let field = |f: &str| format!("enrolled_issuers.{name}.{f}");
            if self.issuers.contains_key(name) {
                found.push(ConfigError::invalid(
                    format!("enrolled_issuers.{name}"),
                    "an issuer in issuers has the same name",
                ));
            }
            if !self.upstreams.contains_key(&enrolled.enroll) {
                found.push(ConfigError::invalid(
                    field("enroll"),
                    format!("no upstream named {:?}", enrolled.enroll),
                ));
            }
            if let Some(label) = &enrolled.label {
                if let Err(e) = Label::new(label) {
                    found.push(ConfigError::invalid(field("label"), e.to_string()));
                }
            }
            if enrolled.common_name.trim().is_empty() {
                found.push(ConfigError::invalid(field("common_name"), "is empty"));
            }
            if let Some(key) = &enrolled.key {
                // A token location: each renewal generates its key inside that token. Its URI
                // is written to current.json, so the PIN comes from a file, never the URI.
                if !crate::keys::is_pkcs11(key) {
                    found.push(ConfigError::invalid(
                        field("key"),
                        "only a pkcs11: token location (the key is generated inside the \
                         token); leave it out for a key file under the data directory",
                    ));
                } else {
                    // Checked as the URI of a generated key is (object= and id= set).
                    let (generated, _) = crate::issue::delegation::token_key_uri(key, name, 0);
                    match crate::keys::Pkcs11Uri::parse(&generated) {
                        Err(e) => found.push(ConfigError::invalid(field("key"), e)),
                        Ok(uri) => {
                            if matches!(uri.pin, Some(crate::keys::uri::PinSource::Value(_))) {
                                found.push(ConfigError::invalid(
                                    field("key"),
                                    "pin-value is refused here: the generated key's URI is \
                                     kept under the data directory; use pin-source=file:",
                                ));
                            }
                            let path = key[7..].split('?').next().unwrap_or("");
                            if path.split(';').any(|a| a.starts_with("id=")) {
                                found.push(ConfigError::invalid(
                                    field("key"),
                                    "id= is set per renewal; name the token and at most an \
                                     object= prefix",
                                ));
                            }
                            if uri.module_path.is_none() && self.pkcs11_module.is_none() {
                                found.push(ConfigError::invalid(
                                    field("key"),
                                    "no PKCS#11 module: set pkcs11_module (or module-path= in \
                                     the URI)",
                                ));
                            }
                        }
                    }
                }
            }
            if enrolled.retry_max_secs == 0 {
                found.push(ConfigError::invalid(
                    field("retry_max_secs"),
                    "must be at least 1",
                ));
            }
            check_inline_pem(&enrolled.root, || field("root"), found);
        }
        for (user, hash) in &self.users {
            if let Err(e) = argon2::password_hash::PasswordHash::new(hash) {
                found.push(ConfigError::invalid(
                    format!("users.{user}"),
                    format!("not an argon2 PHC hash: {e}"),
                ));
            }
        }
        for (name, upstream) in &self.upstreams {
            let field = |f: &str| format!("upstreams.{name}.{f}");
            match upstream.url.parse::<http::Uri>() {
                Err(e) => found.push(ConfigError::invalid(
                    field("url"),
                    format!("not a URL: {e}"),
                )),
                Ok(uri)
                    if uri.scheme_str() != Some("https")
                        || uri.host().is_none()
                        || uri.query().is_some() =>
                {
                    found.push(ConfigError::invalid(
                        field("url"),
                        "must be an https:// URL with a host and no query",
                    ))
                }
                Ok(_) => {}
            }
            if upstream.trust.is_empty() {
                found.push(ConfigError::invalid(
                    field("trust"),
                    "names no CA certificate",
                ));
            }
            for (i, source) in upstream.trust.iter().enumerate() {
                check_inline_pem(source, || field(&format!("trust[{i}]")), found);
            }
            if let Some(certificate) = &upstream.certificate {
                check_inline_pem(certificate, || field("certificate"), found);
            }
            if upstream.certificate.is_some() != upstream.key.is_some() {
                found.push(ConfigError::invalid(
                    field("key"),
                    "certificate and key go together",
                ));
            }
            if upstream.username.is_some() != upstream.password_file.is_some() {
                found.push(ConfigError::invalid(
                    field("password_file"),
                    "username and password_file go together",
                ));
            }
            if !(1..=120).contains(&upstream.request_timeout_secs)
                || !(1..=120).contains(&upstream.connect_timeout_secs)
            {
                found.push(ConfigError::invalid(
                    field("request_timeout_secs"),
                    "timeouts must be between 1 and 120 s",
                ));
            }
        }
        let mut profile_configs = profile::builtin();
        profile_configs.extend(self.profiles.clone());
        let mut profiles = std::collections::BTreeMap::new();
        for (name, p) in &profile_configs {
            match Profile::try_from((name.as_str(), p)) {
                Ok(built) => {
                    profiles.insert(name.clone(), built);
                }
                Err(e) => found.push(ConfigError::invalid("profiles", e)),
            }
        }
        // A profile that does not build is reported once, not again by each label naming it.
        let broken: BTreeSet<&String> = profile_configs
            .keys()
            .filter(|name| !profiles.contains_key(*name))
            .collect();

        if self.labels.is_empty() {
            found.push(ConfigError::invalid(
                "labels",
                "at least one label is needed",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, label) in self.labels.iter().enumerate() {
            let field = |f: &str| format!("labels[{i}].{f}");
            if let Some(name) = &label.name {
                if let Err(e) = Label::new(name) {
                    found.push(ConfigError::invalid(field("name"), e.to_string()));
                }
            }
            if !names.insert(label.name.clone()) {
                found.push(ConfigError::invalid(
                    field("name"),
                    "another label has the same name",
                ));
            }
            if let Some(enrolled) = label
                .issuer
                .as_ref()
                .and_then(|i| self.enrolled_issuers.get(i))
            {
                // Known before any CA is enrolled: a CA of pathlen 0 signs no Edge CA.
                if enrolled.path_len == 0
                    && label.rules.iter().any(|r| !r.ca_common_names.is_empty())
                {
                    found.push(ConfigError::invalid(
                        field("rules"),
                        "rules grant CA certificates, but the enrolled issuer asks for pathlen 0 \
                         (give it path_len = 1)",
                    ));
                }
            }
            if let Some(issuer) = &label.issuer {
                if !self.issuers.contains_key(issuer) && !self.enrolled_issuers.contains_key(issuer)
                {
                    found.push(ConfigError::invalid(
                        field("issuer"),
                        format!("no issuer named {issuer:?}"),
                    ));
                }
            }
            if let Some(upstream) = &label.upstream {
                if !self.upstreams.contains_key(upstream) {
                    found.push(ConfigError::invalid(
                        field("upstream"),
                        format!("no upstream named {upstream:?}"),
                    ));
                }
            }
            match (label.mode, label.issuer.is_some(), label.upstream.is_some()) {
                (Mode::Sign, true, false)
                | (Mode::Forward, false, true)
                | (Mode::Auto, true, true) => {}
                (Mode::Sign, _, _) => found.push(ConfigError::invalid(
                    field("mode"),
                    "sign needs an issuer and no upstream",
                )),
                (Mode::Forward, _, _) => found.push(ConfigError::invalid(
                    field("mode"),
                    "forward needs an upstream and no issuer",
                )),
                (Mode::Auto, _, _) => found.push(ConfigError::invalid(
                    field("mode"),
                    "auto needs both an upstream and an issuer",
                )),
            }
            if let Some(upstream_label) = &label.upstream_label {
                if let Err(e) = Label::new(upstream_label) {
                    found.push(ConfigError::invalid(field("upstream_label"), e.to_string()));
                }
                if label.upstream.is_none() {
                    found.push(ConfigError::invalid(
                        field("upstream_label"),
                        "needs an upstream",
                    ));
                }
            }
            if !broken.contains(&label.profile)
                && profiles.get(&label.profile).is_none_or(Profile::is_ca)
            {
                found.push(ConfigError::invalid(
                    field("profile"),
                    format!("{:?} is not an end-entity profile", label.profile),
                ));
            }
            if !broken.contains(&label.ca_profile)
                && !profiles.get(&label.ca_profile).is_some_and(Profile::is_ca)
            {
                found.push(ConfigError::invalid(
                    field("ca_profile"),
                    format!("{:?} is not a CA profile", label.ca_profile),
                ));
            }
            for set in &label.client_trust {
                if set != "issuer" && !self.trust.contains_key(set) {
                    found.push(ConfigError::invalid(
                        field("client_trust"),
                        format!("no trust set named {set:?}"),
                    ));
                }
            }
            if label.authentication.certificate && label.client_trust.is_empty() {
                found.push(ConfigError::invalid(
                    field("client_trust"),
                    "certificate authentication is on but no trust set is named",
                ));
            }
            if !label.authentication.certificate && !label.authentication.basic {
                found.push(ConfigError::invalid(
                    field("authentication"),
                    "turns off every method",
                ));
            }
            if let Err(e) = Policy::new(&label.rules, &label.deny, &label.client_trust) {
                found.push(ConfigError::invalid(field("rules"), e));
            }
            for other in &label.issuer_labels {
                let key = super::issuer_label_key(other);
                if !self.labels.iter().any(|l| l.name == key) || key == label.name {
                    found.push(ConfigError::invalid(
                        field("issuer_labels"),
                        format!(
                            "{other:?} is not another label of this configuration \
                             (\"{}\" names the unlabeled path)",
                            super::UNLABELED
                        ),
                    ));
                }
            }
            if label.grace_expired_secs > 366 * 86_400 {
                found.push(ConfigError::invalid(
                    field("grace_expired_secs"),
                    "must be at most a year (31622400 s)",
                ));
            }
            if label.grace_expired_secs > 0 && !label.authentication.certificate {
                found.push(ConfigError::invalid(
                    field("grace_expired_secs"),
                    "a grace window for expired client certificates needs certificate authentication",
                ));
            }
            for attribute in &label.csr_attributes {
                if let Err(e) = crate::est::csrattrs::parse_csr_attr(attribute) {
                    found.push(ConfigError::invalid(field("csr_attributes"), e));
                }
            }
        }
        if let Err(e) = crate::auth::ra::check_config(self) {
            found.push(e);
        }
    }

    /// What `check-config` and `check-manifest` warn about: the configuration loads, but a
    /// rule may accept more than it seems to (see `auth::ra::warnings`).
    pub fn warnings(&self) -> Vec<String> {
        crate::auth::ra::warnings(self)
    }
}

/// An inline PEM (a certificate given in the configuration itself) must hold certificates
/// that parse: a placeholder such as `MIIB...` is refused here, before any file is read, so
/// that `check-config`, `check-manifest` and the module agree.
fn check_inline_pem(
    source: &super::PemSource,
    field: impl FnOnce() -> String,
    found: &mut Vec<ConfigError>,
) {
    if !source.is_inline() {
        return;
    }
    use rustls::pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> =
        rustls::pki_types::CertificateDer::pem_slice_iter(source.0.as_bytes()).collect();
    let reason = match certs {
        Err(e) => format!("inline PEM that does not parse ({e:?})"),
        Ok(certs) if certs.is_empty() => "inline PEM without a certificate".to_owned(),
        Ok(certs) => match certs
            .iter()
            .position(|der| x509_parser::parse_x509_certificate(der).is_err())
        {
            Some(i) => format!("inline PEM whose certificate {i} is not X.509"),
            None => return,
        },
    };
    found.push(ConfigError::invalid(field(), reason));
}

/// Longest unix socket path the kernel takes (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

fn check_proxy_socket(socket: &std::path::Path) -> Result<(), ConfigError> {
    let bad = |r: &str| Err(ConfigError::invalid("proxy_socket", r));
    let text = socket.as_os_str().as_encoded_bytes();
    if !socket.is_absolute() {
        return bad("must be an absolute path (the API proxy's nginx names the same path)");
    }
    if text.len() > MAX_SOCKET_PATH {
        return bad("is longer than a unix socket path may be (107 bytes)");
    }
    if text.ends_with(b"/") || socket.file_name().is_none() {
        return bad("must name a socket file, not a directory");
    }
    if socket
        .parent()
        .is_none_or(|p| p == std::path::Path::new("/"))
    {
        return bad("must be in a directory of its own (the volume shared with the API proxy)");
    }
    Ok(())
}

fn check_limits(limits: &Limits, found: &mut Vec<ConfigError>) {
    let mut bad = |f: &str, r: &str| found.push(ConfigError::invalid(format!("limits.{f}"), r));
    if !(1024..=1024 * 1024).contains(&limits.max_body_bytes) {
        bad("max_body_bytes", "must be between 1024 and 1048576");
    }
    if limits.max_connections == 0 || limits.max_connections > 1_000_000 {
        bad("max_connections", "must be between 1 and 1000000");
    }
    for (f, v) in [
        ("handshake_timeout_secs", limits.handshake_timeout_secs),
        ("header_timeout_secs", limits.header_timeout_secs),
        ("body_timeout_secs", limits.body_timeout_secs),
    ] {
        if !(1..=300).contains(&v) {
            bad(f, "must be between 1 and 300 seconds");
        }
    }
    if limits.password_checks == 0 || limits.password_checks > 64 {
        bad("password_checks", "must be between 1 and 64");
    }
    if limits.max_connections_per_address > limits.max_connections {
        bad(
            "max_connections_per_address",
            "must be at most max_connections (0: no per-address cap)",
        );
    }
    for (rate, burst, rate_field, burst_field) in [
        (
            limits.failed_auth_per_address,
            limits.failed_auth_burst_per_address,
            "failed_auth_per_address",
            "failed_auth_burst_per_address",
        ),
        (
            limits.failed_auth_per_identity,
            limits.failed_auth_burst_per_identity,
            "failed_auth_per_identity",
            "failed_auth_burst_per_identity",
        ),
        (
            limits.enroll_per_name,
            limits.enroll_burst_per_name,
            "enroll_per_name",
            "enroll_burst_per_name",
        ),
        (
            limits.keygen_per_identity,
            limits.keygen_burst_per_identity,
            "keygen_per_identity",
            "keygen_burst_per_identity",
        ),
        (
            limits.rate_per_address,
            limits.burst_per_address,
            "rate_per_address",
            "burst_per_address",
        ),
        (
            limits.rate_per_identity,
            limits.burst_per_identity,
            "rate_per_identity",
            "burst_per_identity",
        ),
    ] {
        if !rate.is_finite() || !(0.0..=1_000_000.0).contains(&rate) {
            bad(rate_field, "must be between 0 (off) and 1000000 per second");
        }
        if rate > 0.0 && (!burst.is_finite() || !(1.0..=1_000_000.0).contains(&burst)) {
            bad(
                burst_field,
                "must be between 1 and 1000000 when the rate is on",
            );
        }
    }
}
