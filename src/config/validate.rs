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
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_no_secrets()?;
        check_limits(&self.limits)?;
        for set in &self.limits.unlimited_trust {
            if !self.trust.contains_key(set) {
                return Err(ConfigError::invalid(
                    "limits.unlimited_trust",
                    format!("no trust set named {set:?}"),
                ));
            }
        }
        if let Some(socket) = &self.proxy_socket {
            check_proxy_socket(socket)?;
        }
        if self.trust.contains_key("issuer") {
            return Err(ConfigError::invalid(
                "trust.issuer",
                "the name `issuer` is reserved",
            ));
        }
        for (user, hash) in &self.users {
            argon2::password_hash::PasswordHash::new(hash).map_err(|e| {
                ConfigError::invalid(
                    format!("users.{user}"),
                    format!("not an argon2 PHC hash: {e}"),
                )
            })?;
        }
        for (name, upstream) in &self.upstreams {
            let field = |f: &str| format!("upstreams.{name}.{f}");
            let uri: http::Uri = upstream
                .url
                .parse()
                .map_err(|e| ConfigError::invalid(field("url"), format!("not a URL: {e}")))?;
            if uri.scheme_str() != Some("https") || uri.host().is_none() || uri.query().is_some() {
                return Err(ConfigError::invalid(
                    field("url"),
                    "must be an https:// URL with a host and no query",
                ));
            }
            if upstream.trust.is_empty() {
                return Err(ConfigError::invalid(
                    field("trust"),
                    "names no CA certificate",
                ));
            }
            if upstream.certificate.is_some() != upstream.key.is_some() {
                return Err(ConfigError::invalid(
                    field("key"),
                    "certificate and key go together",
                ));
            }
            if upstream.username.is_some() != upstream.password_file.is_some() {
                return Err(ConfigError::invalid(
                    field("password_file"),
                    "username and password_file go together",
                ));
            }
            if !(1..=120).contains(&upstream.request_timeout_secs)
                || !(1..=120).contains(&upstream.connect_timeout_secs)
            {
                return Err(ConfigError::invalid(
                    field("request_timeout_secs"),
                    "timeouts must be between 1 and 120 s",
                ));
            }
        }
        let mut profiles = profile::builtin();
        profiles.extend(self.profiles.clone());
        let profiles = profiles
            .iter()
            .map(|(name, p)| {
                Profile::try_from((name.as_str(), p)).map(|built| (name.clone(), built))
            })
            .collect::<Result<std::collections::BTreeMap<_, _>, _>>()
            .map_err(|e| ConfigError::invalid("profiles", e))?;

        if self.labels.is_empty() {
            return Err(ConfigError::invalid(
                "labels",
                "at least one label is needed",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, label) in self.labels.iter().enumerate() {
            let field = |f: &str| format!("labels[{i}].{f}");
            if let Some(name) = &label.name {
                Label::new(name).map_err(|e| ConfigError::invalid(field("name"), e.to_string()))?;
            }
            if !names.insert(label.name.clone()) {
                return Err(ConfigError::invalid(
                    field("name"),
                    "another label has the same name",
                ));
            }
            if let Some(issuer) = &label.issuer {
                if !self.issuers.contains_key(issuer) {
                    return Err(ConfigError::invalid(
                        field("issuer"),
                        format!("no issuer named {issuer:?}"),
                    ));
                }
            }
            if let Some(upstream) = &label.upstream {
                if !self.upstreams.contains_key(upstream) {
                    return Err(ConfigError::invalid(
                        field("upstream"),
                        format!("no upstream named {upstream:?}"),
                    ));
                }
            }
            match (label.mode, label.issuer.is_some(), label.upstream.is_some()) {
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
                if label.upstream.is_none() {
                    return Err(ConfigError::invalid(
                        field("upstream_label"),
                        "needs an upstream",
                    ));
                }
            }
            if profiles.get(&label.profile).is_none_or(Profile::is_ca) {
                return Err(ConfigError::invalid(
                    field("profile"),
                    format!("{:?} is not an end-entity profile", label.profile),
                ));
            }
            if !profiles.get(&label.ca_profile).is_some_and(Profile::is_ca) {
                return Err(ConfigError::invalid(
                    field("ca_profile"),
                    format!("{:?} is not a CA profile", label.ca_profile),
                ));
            }
            for set in &label.client_trust {
                if set != "issuer" && !self.trust.contains_key(set) {
                    return Err(ConfigError::invalid(
                        field("client_trust"),
                        format!("no trust set named {set:?}"),
                    ));
                }
            }
            if label.authentication.certificate && label.client_trust.is_empty() {
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
            Policy::new(&label.rules, &label.deny, &label.client_trust)
                .map_err(|e| ConfigError::invalid(field("rules"), e))?;
            for other in &label.issuer_labels {
                let key = super::issuer_label_key(other);
                if !self.labels.iter().any(|l| l.name == key) || key == label.name {
                    return Err(ConfigError::invalid(
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
                return Err(ConfigError::invalid(
                    field("grace_expired_secs"),
                    "must be at most a year (31622400 s)",
                ));
            }
            if label.grace_expired_secs > 0 && !label.authentication.certificate {
                return Err(ConfigError::invalid(
                    field("grace_expired_secs"),
                    "a grace window for expired client certificates needs certificate authentication",
                ));
            }
            for attribute in &label.csr_attributes {
                crate::est::csrattrs::parse_csr_attr(attribute)
                    .map_err(|e| ConfigError::invalid(field("csr_attributes"), e))?;
            }
        }
        crate::auth::ra::check_config(self)?;
        Ok(())
    }

    /// What `check-config` and `check-manifest` warn about: the configuration loads, but a
    /// rule may accept more than it seems to (see `auth::ra::warnings`).
    pub fn warnings(&self) -> Vec<String> {
        crate::auth::ra::warnings(self)
    }
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
    if limits.max_connections_per_address > limits.max_connections {
        return bad(
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
            return bad(rate_field, "must be between 0 (off) and 1000000 per second");
        }
        if rate > 0.0 && (!burst.is_finite() || !(1.0..=1_000_000.0).contains(&burst)) {
            return bad(
                burst_field,
                "must be between 1 and 1000000 when the rate is on",
            );
        }
    }
    Ok(())
}
