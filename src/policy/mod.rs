//! What an authenticated identity may obtain on a label: rules turn an [`Identity`] and a
//! [`Csr`] into a [`Grant`] (the exact subject, names and kind of certificate to issue) or a
//! [`Refusal`] that says which part of the request was not allowed.

pub mod pattern;

use std::net::IpAddr;

use crate::auth::Identity;
use crate::config::RuleConfig;
use crate::est::name::AttributeType;
use crate::est::{Csr, SanEntry, Subject};

pub use pattern::{Pattern, Vars};

/// What the issuer is told to issue. Every field comes from the policy's checks; the CSR
/// contributes only what a rule allowed.
#[derive(Clone, Debug)]
pub struct Grant {
    pub ca: bool,
    pub subject: Subject,
    pub sans: Vec<SanEntry>,
    /// A lower layer's own issuing CA (a rule's `sub_ca`) rather than an Edge CA.
    pub sub_ca: Option<SubCa>,
}

/// A lower layer's issuing CA as granted: its path length, the longest it may live, and the
/// name constraints that keep what it signs inside the RA's allowance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubCa {
    pub path_len: u8,
    pub validity: time::Duration,
    /// Permitted DNS subtrees: `.l3.plant.local` (below it) or an exact name.
    pub dns: Vec<String>,
    /// A permitted directoryName subtree.
    pub directory_name: Option<Subject>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{0} is denied on this label")]
    Denied(String),
    #[error("no rule on this label grants anything to {0}")]
    NoRule(String),
    #[error("subject {attribute}={value:?} is not allowed for {identity}")]
    SubjectNotAllowed {
        attribute: String,
        value: String,
        identity: String,
    },
    #[error("subjectAltName {san} is not allowed for {identity}")]
    SanNotAllowed { san: String, identity: String },
    #[error("{identity} may not obtain a CA certificate on this label")]
    CaNotAllowed { identity: String },
    #[error("the CSR's subject has no common name (CN)")]
    NoCommonName,
    #[error("the CSR's subject {0}; edge-est issues subjects with one value per RDN and each attribute type once")]
    UnsupportedSubject(String),
    #[error("simplereenroll needs the certificate being renewed as the TLS client certificate")]
    ReenrollWithoutCertificate,
    #[error("simplereenroll must keep the subject: the CSR asks for \"{requested}\", the certificate has \"{current}\"")]
    ReenrollSubjectChanged { requested: String, current: String },
    #[error("simplereenroll must keep the subjectAltNames: the CSR asks for [{requested}], the certificate has [{current}]")]
    ReenrollSansChanged { requested: String, current: String },
    #[error("{identity} has expired and is accepted within this label's grace window only to renew itself: {reason}")]
    GraceRenewalOnly { identity: String, reason: String },
    #[error("the CSR asks for a CA with pathlen {requested}; {identity} may obtain pathlen {allowed} at most")]
    SubCaPathLen {
        requested: u32,
        allowed: u8,
        identity: String,
    },
    #[error("the CSR asks for a CA with pathlen {requested}, which this layer's issuing CA (pathlen {issuer}) cannot sign: a CA below it has a smaller pathlen")]
    SubCaBeyondIssuer { requested: u8, issuer: u32 },
}

#[derive(Clone, Debug)]
enum Who {
    AnyUser,
    User(String),
    AnyCertificate,
    CertificateFrom(String),
    /// `module:DEVICE/MODULE`, its device's Edge CA vouched for by trust set `via`.
    Module {
        module: crate::auth::ra::ModuleOf,
        via: String,
    },
}

#[derive(Clone, Debug)]
struct Rule {
    who: Vec<Who>,
    client_cn: Vec<Pattern>,
    common_names: Vec<Pattern>,
    ca_common_names: Vec<Pattern>,
    dns_names: Vec<Pattern>,
    ip_addresses: Vec<Pattern>,
    uris: Vec<Pattern>,
    emails: Vec<Pattern>,
    attributes: Vec<(String, Vec<Pattern>)>,
    registration_authority: bool,
    sub_ca: Option<SubCaRule>,
}

/// A rule's `sub_ca`, parsed: which CNs ask for it, and its bounds.
#[derive(Clone, Debug)]
struct SubCaRule {
    common_names: Vec<Pattern>,
    max_path_len: u8,
    validity: time::Duration,
    dns: Vec<String>,
    directory_name: Option<Subject>,
}

#[derive(Clone, Debug)]
enum Deny {
    User(String),
    Cn(String),
    Serial(String),
}

/// The issuing policy of one label.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    deny: Vec<Deny>,
}

fn patterns(field: &str, sources: &[String]) -> Result<Vec<Pattern>, String> {
    sources
        .iter()
        .map(|s| Pattern::parse(s).map_err(|e| format!("{field}: {e}")))
        .collect()
}

impl Policy {
    /// Builds the policy from configuration; `trust_sets` are the names a `certificate:`
    /// match may refer to.
    pub fn new(
        rules: &[RuleConfig],
        deny: &[String],
        trust_sets: &[String],
    ) -> Result<Policy, String> {
        let mut built = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let field = |name: &str| format!("rules[{i}].{name}");
            let mut who = Vec::new();
            for m in &rule.matches {
                who.push(match m.split_once(':') {
                    Some(("user", "*")) => Who::AnyUser,
                    Some(("user", name)) if !name.is_empty() => Who::User(name.to_owned()),
                    Some(("certificate", "*")) => Who::AnyCertificate,
                    Some(("certificate", set)) if trust_sets.iter().any(|t| t == set) => {
                        Who::CertificateFrom(set.to_owned())
                    }
                    Some(("certificate", set)) => {
                        return Err(format!(
                            "{}: {set:?} is not one of this label's client_trust sets",
                            field("match")
                        ))
                    }
                    Some(("module", pin)) => {
                        let module = crate::auth::ra::ModuleOf::parse(pin)
                            .map_err(|e| format!("{}: {e}", field("match")))?;
                        let via = crate::auth::ra::edge_ca_issuer(rule).to_owned();
                        if !trust_sets.contains(&via) {
                            return Err(format!(
                                "{}: a module's device Edge CA is checked against trust set \
                                 {via:?}, which is not in this label's client_trust",
                                field("match")
                            ));
                        }
                        if !rule.client_cn.is_empty() {
                            return Err(format!(
                                "{}: a module match names its module already; drop client_cn",
                                field("client_cn")
                            ));
                        }
                        Who::Module { module, via }
                    }
                    _ => {
                        return Err(format!(
                            "{}: {m:?} must be user:NAME, user:*, certificate:TRUSTSET, \
                             certificate:* or module:DEVICE/MODULE",
                            field("match")
                        ))
                    }
                });
            }
            if who.is_empty() {
                return Err(format!("{}: names no identity", field("match")));
            }
            let mut attributes = Vec::new();
            for (name, values) in &rule.subject_attributes {
                if name.eq_ignore_ascii_case("CN") {
                    return Err(format!(
                        "{}: CN is governed by common_names",
                        field("subject_attributes")
                    ));
                }
                attributes.push((
                    name.clone(),
                    patterns(&field("subject_attributes"), values)?,
                ));
            }
            // `client_cn` holds common names, not distinguished names: `CN=bottom-ra` would
            // never match a certificate's CN and the rule would silently never apply.
            if let Some(dn) = rule.client_cn.iter().find(|p| {
                p.get(..3)
                    .is_some_and(|prefix| prefix.eq_ignore_ascii_case("CN="))
            }) {
                return Err(format!(
                    "{}: {dn:?} is written as a distinguished name; give the common name alone ({:?})",
                    field("client_cn"),
                    &dn[3..]
                ));
            }
            let sub_ca = rule
                .sub_ca
                .as_ref()
                .map(|sub| sub_ca_rule(rule, sub, &who))
                .transpose()
                .map_err(|e| format!("{}: {e}", field("sub_ca")))?;
            built.push(Rule {
                who,
                client_cn: patterns(&field("client_cn"), &rule.client_cn)?,
                common_names: patterns(&field("common_names"), &rule.common_names)?,
                ca_common_names: patterns(&field("ca_common_names"), &rule.ca_common_names)?,
                dns_names: patterns(&field("dns_names"), &rule.dns_names)?,
                ip_addresses: patterns(&field("ip_addresses"), &rule.ip_addresses)?,
                uris: patterns(&field("uris"), &rule.uris)?,
                emails: patterns(&field("emails"), &rule.emails)?,
                attributes,
                registration_authority: rule.registration_authority,
                sub_ca,
            });
        }
        let deny = deny
            .iter()
            .map(|d| match d.split_once(':') {
                Some(("user", u)) => Ok(Deny::User(u.to_owned())),
                Some(("cn", cn)) => Ok(Deny::Cn(cn.to_owned())),
                Some(("serial", s)) => Ok(Deny::Serial(
                    s.trim_start_matches("0x")
                        .to_ascii_lowercase()
                        .replace(':', ""),
                )),
                _ => Err(format!(
                    "deny: {d:?} must be user:NAME, cn:NAME or serial:HEX"
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok(Policy { rules: built, deny })
    }

    /// Decides a request. `reenroll` applies RFC 7030 4.2.2: the subject and subjectAltNames
    /// must equal those of the certificate that authenticated, unless a rule marked
    /// `registration_authority` applies to the identity (an RA forwarding its client's
    /// renewal, RFC 7030 2.5.3: judged by the rules like an enrollment).
    pub fn authorize(
        &self,
        identity: &Identity,
        csr: &Csr,
        reenroll: bool,
    ) -> Result<Grant, Refusal> {
        let who = identity.to_string();
        if self.is_denied(identity) {
            return Err(Refusal::Denied(who));
        }
        let subject = csr.subject();
        let mut sans: Vec<SanEntry> = csr.sans().to_vec();
        sans.sort();
        sans.dedup();
        // RFC 7030 2.5.3: a registration authority forwards its clients' simplereenroll as
        // simplereenroll, authenticated by its own certificate. The RA vouches for the
        // renewal, so it is judged under the RA's allowance like an enrollment; the
        // subject-equality check below is for end clients renewing themselves.
        let forwarded_by_ra = reenroll && self.is_registration_authority(identity);
        if reenroll && !forwarded_by_ra {
            let cert = identity
                .certificate
                .as_ref()
                .ok_or(Refusal::ReenrollWithoutCertificate)?;
            if subject != &cert.subject {
                return Err(Refusal::ReenrollSubjectChanged {
                    requested: subject.to_string(),
                    current: cert.subject.to_string(),
                });
            }
            let mut current = cert.sans.clone();
            current.sort();
            current.dedup();
            if sans != current {
                return Err(Refusal::ReenrollSansChanged {
                    requested: join(&sans),
                    current: join(&current),
                });
            }
        }
        let ca = csr.requested_ca().is_some_and(|bc| bc.ca);
        // An expired certificate accepted within the grace window renews itself, nothing else:
        // the same subject, the same subjectAltNames, the same kind of certificate.
        if let Some(cert) = identity.certificate.as_ref().filter(|c| c.grace) {
            let mut current = cert.sans.clone();
            current.sort();
            current.dedup();
            let reason = if subject != &cert.subject {
                Some(format!(
                    "the CSR asks for subject \"{subject}\", the certificate has \"{}\"",
                    cert.subject
                ))
            } else if sans != current {
                Some(format!(
                    "the CSR asks for subjectAltNames [{}], the certificate has [{}]",
                    join(&sans),
                    join(&current)
                ))
            } else if ca != cert.ca {
                Some(if ca {
                    "the CSR asks for a CA certificate".to_owned()
                } else {
                    "the CSR asks for an end-entity certificate".to_owned()
                })
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(Refusal::GraceRenewalOnly {
                    identity: who,
                    reason,
                });
            }
        }
        if subject.is_multi_valued() {
            return Err(Refusal::UnsupportedSubject(
                "has a multi-valued RDN".to_owned(),
            ));
        }
        if subject.has_repeated_types() {
            return Err(Refusal::UnsupportedSubject(
                "repeats an attribute type".to_owned(),
            ));
        }
        let cn = subject.common_name().ok_or(Refusal::NoCommonName)?;

        let vars = Vars {
            cn: identity.cn(),
            user: identity.user.as_deref(),
        };
        let applicable: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.applies_to(identity, vars))
            .collect();
        let path_len = csr.requested_ca().and_then(|bc| bc.path_len);
        let mut first_refusal = None;
        for rule in &applicable {
            match rule.check(cn, subject, &sans, (ca, path_len), vars, &who) {
                Ok(sub_ca) => {
                    return Ok(Grant {
                        ca,
                        subject: subject.clone(),
                        sans,
                        sub_ca,
                    })
                }
                Err(refusal) => {
                    first_refusal.get_or_insert(refusal);
                }
            }
        }
        Err(first_refusal.unwrap_or(Refusal::NoRule(who)))
    }

    /// The trust sets whose CAs issue the Edge CAs of the devices `module:` rules name: a
    /// client certificate is looked at as a module's only against these.
    pub fn module_sets(&self) -> Vec<String> {
        let mut sets: Vec<String> = Vec::new();
        for rule in &self.rules {
            for who in &rule.who {
                if let Who::Module { via, .. } = who {
                    if !sets.contains(via) {
                        sets.push(via.clone());
                    }
                }
            }
        }
        sets
    }

    /// Whether a rule marked `registration_authority` applies to `identity` (and the deny
    /// list does not name it, and it is not an expired certificate in its grace window).
    /// Decided before the CSR is read: a rule applies by identity alone.
    pub fn is_registration_authority(&self, identity: &Identity) -> bool {
        if self.is_denied(identity) || identity.certificate.as_ref().is_some_and(|c| c.grace) {
            return false;
        }
        let vars = Vars {
            cn: identity.cn(),
            user: identity.user.as_deref(),
        };
        self.rules
            .iter()
            .any(|r| r.registration_authority && r.applies_to(identity, vars))
    }

    fn is_denied(&self, identity: &Identity) -> bool {
        self.deny.iter().any(|d| match d {
            Deny::User(u) => identity.user.as_deref() == Some(u.as_str()),
            Deny::Cn(cn) => identity.cn() == Some(cn.as_str()),
            Deny::Serial(s) => identity
                .certificate
                .as_ref()
                .is_some_and(|c| c.serial.trim_start_matches('0') == s.trim_start_matches('0')),
        })
    }
}

fn join(sans: &[SanEntry]) -> String {
    sans.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Rule {
    fn applies_to(&self, identity: &Identity, vars: Vars<'_>) -> bool {
        // A certificate from a device's Edge CA is a module of that device: it matches a
        // `module:` rule naming both, never a `certificate:` one.
        let client = identity.certificate.as_ref().filter(|c| c.device.is_none());
        let module_of = identity.certificate.as_ref().filter(|c| c.device.is_some());
        let who_matches = self.who.iter().any(|w| match w {
            Who::AnyUser => identity.user.is_some(),
            Who::User(u) => identity.user.as_deref() == Some(u.as_str()),
            Who::AnyCertificate => client.is_some(),
            Who::CertificateFrom(set) => client.is_some_and(|c| &c.trust == set),
            Who::Module { module, via } => module_of.is_some_and(|c| {
                c.device.as_deref() == Some(module.device.as_str())
                    && c.subject.common_name() == Some(module.module.as_str())
                    && &c.trust == via
            }),
        });
        let cn_matches = self.client_cn.is_empty()
            || identity
                .cn()
                .is_some_and(|cn| self.client_cn.iter().any(|p| p.matches(cn, vars, false)));
        who_matches && cn_matches
    }

    /// Checks the request against this rule; a sub-CA when the CSR asks for a CA named as the
    /// rule's `sub_ca` (`ca` is CA:TRUE and the requested pathlen).
    fn check(
        &self,
        cn: &str,
        subject: &Subject,
        sans: &[SanEntry],
        (ca, requested_path_len): (bool, Option<u32>),
        vars: Vars<'_>,
        who: &str,
    ) -> Result<Option<SubCa>, Refusal> {
        let any = |ps: &[Pattern], v: &str, fold: bool| ps.iter().any(|p| p.matches(v, vars, fold));
        let sub_ca = self
            .sub_ca
            .as_ref()
            .filter(|sub| ca && any(&sub.common_names, cn, false));
        let granted = match sub_ca {
            Some(sub) => {
                // Without a pathlen the CSR gets the most the rule allows.
                let path_len = requested_path_len.unwrap_or(u32::from(sub.max_path_len));
                if path_len > u32::from(sub.max_path_len) {
                    return Err(Refusal::SubCaPathLen {
                        requested: path_len,
                        allowed: sub.max_path_len,
                        identity: who.to_owned(),
                    });
                }
                Some(SubCa {
                    path_len: u8::try_from(path_len).unwrap_or(sub.max_path_len),
                    validity: sub.validity,
                    dns: sub.dns.clone(),
                    directory_name: sub.directory_name.clone(),
                })
            }
            None => None,
        };
        if ca && granted.is_none() && self.ca_common_names.is_empty() {
            return Err(Refusal::CaNotAllowed {
                identity: who.to_owned(),
            });
        }
        let cn_patterns = if ca {
            &self.ca_common_names
        } else {
            &self.common_names
        };
        if granted.is_none() && !any(cn_patterns, cn, false) {
            return Err(Refusal::SubjectNotAllowed {
                attribute: "CN".to_owned(),
                value: cn.to_owned(),
                identity: who.to_owned(),
            });
        }
        for (kind, value) in subject.attributes() {
            if matches!(kind, AttributeType::CommonName) {
                continue;
            }
            let allowed = self
                .attributes
                .iter()
                .find(|(name, _)| {
                    name.eq_ignore_ascii_case(kind.short_name()) || *name == kind.oid()
                })
                .is_some_and(|(_, ps)| any(ps, value, false));
            if !allowed {
                return Err(Refusal::SubjectNotAllowed {
                    attribute: kind.short_name().to_owned(),
                    value: value.clone(),
                    identity: who.to_owned(),
                });
            }
        }
        for san in sans {
            let allowed = match san {
                SanEntry::Dns(name) => any(&self.dns_names, name, true),
                SanEntry::Ip(ip) => any(&self.ip_addresses, &ip_text(ip), false),
                SanEntry::Uri(uri) => any(&self.uris, uri, false),
                SanEntry::Email(email) => any(&self.emails, email, true),
                SanEntry::Other(_) => false,
            };
            if !allowed {
                return Err(Refusal::SanNotAllowed {
                    san: san.to_string(),
                    identity: who.to_owned(),
                });
            }
        }
        Ok(granted)
    }
}

fn ip_text(ip: &IpAddr) -> String {
    ip.to_string()
}

/// Parses a rule's `sub_ca`. Only a named RA (`module:DEVICE/MODULE`) may get a CA, and only
/// names a name constraint can hold: its DNS patterns become permitted subtrees, and names of
/// other kinds, which it could not bound, are refused.
fn sub_ca_rule(
    rule: &RuleConfig,
    sub: &crate::config::SubCaConfig,
    who: &[Who],
) -> Result<SubCaRule, String> {
    if !who.iter().all(|w| matches!(w, Who::Module { .. })) {
        return Err(
            "a CA is granted to a lower layer named as module:DEVICE/MODULE only (its match \
             names something else)"
                .to_owned(),
        );
    }
    if sub.common_names.is_empty() {
        return Err("common_names: names no CA".to_owned());
    }
    for (kind, names) in [
        ("ip_addresses", &rule.ip_addresses),
        ("uris", &rule.uris),
        ("emails", &rule.emails),
    ] {
        if !names.is_empty() {
            return Err(format!(
                "the rule's {kind} cannot bound a CA's name constraints here; give them on \
                 another rule for the same module"
            ));
        }
    }
    if rule.dns_names.is_empty() {
        return Err(
            "the rule has no dns_names: the CA's permitted DNS subtrees come from them \
             (*.l3.plant.local), without them it could mint any host name"
                .to_owned(),
        );
    }
    let dns = rule
        .dns_names
        .iter()
        .map(|p| dns_subtree(p))
        .collect::<Result<Vec<_>, _>>()?;
    let validity = match sub.max_validity_secs {
        Some(0) => return Err("max_validity_secs must be at least 1".to_owned()),
        Some(secs) => time::Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX)),
        None if sub.max_validity_days == 0 => {
            return Err("max_validity_days must be at least 1".to_owned())
        }
        None => time::Duration::days(i64::from(sub.max_validity_days)),
    };
    let directory_name = sub
        .directory_name
        .as_deref()
        .map(parse_directory_name)
        .transpose()
        .map_err(|e| format!("directory_name: {e}"))?;
    Ok(SubCaRule {
        common_names: patterns("common_names", &sub.common_names)?,
        max_path_len: sub.max_path_len,
        validity,
        dns,
        directory_name,
    })
}

/// `*.l3.plant.local` → `.l3.plant.local` (every name below), `gw.plant.local` → itself (it and
/// the names below, RFC 5280 4.2.1.10). Other patterns have no name-constraint form.
fn dns_subtree(pattern: &str) -> Result<String, String> {
    let fixed = |s: &str| !s.is_empty() && !s.contains(['*', '{', '}']);
    match pattern.strip_prefix("*.") {
        Some(rest) if fixed(rest) && rest.contains('.') => {
            Ok(format!(".{}", rest.to_ascii_lowercase()))
        }
        None if fixed(pattern) => Ok(pattern.to_ascii_lowercase()),
        _ => Err(format!(
            "dns_names {pattern:?} has no name-constraint form: give *.DOMAIN or an exact name"
        )),
    }
}

/// `O=Contoso,OU=Line 3`: short attribute names, one value each, no escaped commas.
fn parse_directory_name(text: &str) -> Result<Subject, String> {
    let mut attributes = Vec::new();
    for part in text.split(',') {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not NAME=VALUE"))?;
        let kind = match name.trim() {
            "CN" => AttributeType::CommonName,
            "O" => AttributeType::Organization,
            "OU" => AttributeType::OrganizationalUnit,
            "C" => AttributeType::Country,
            "ST" => AttributeType::State,
            "L" => AttributeType::Locality,
            "DC" => AttributeType::DomainComponent,
            other => {
                return Err(format!(
                    "unknown attribute {other:?} (CN, O, OU, C, ST, L, DC)"
                ))
            }
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("{} has no value", kind.short_name()));
        }
        attributes.push((kind, value.to_owned()));
    }
    Ok(Subject::from_attributes(attributes))
}
