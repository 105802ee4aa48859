//! What an `auto` label may sign locally while the layer above is away: never more than the
//! layer above allows this layer's registration authority. The label's `fallback` allowance
//! states that bound (the upper layer's RA rule, copied); every locally signed request must
//! fit both the label's own rules and it. `check-manifest`, given both layers' manifests,
//! checks the allowance against the upper layer's RA rule with [`within_upper_allowance`].

use std::collections::BTreeMap;

use crate::config::{Config, FallbackConfig, LabelConfig, Mode, RuleConfig};
use crate::est::name::AttributeType;
use crate::est::SanEntry;
use crate::policy::{Grant, Pattern, Vars};

/// A parsed `fallback` allowance.
#[derive(Clone, Debug)]
pub struct Fallback {
    common_names: Vec<Pattern>,
    ca_common_names: Vec<Pattern>,
    dns_names: Vec<Pattern>,
    ip_addresses: Vec<Pattern>,
    uris: Vec<Pattern>,
    emails: Vec<Pattern>,
    attributes: Vec<(String, Vec<Pattern>)>,
}

/// Why a request falls outside the fallback allowance (a 403 while the upstream is away).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what} is not within what this layer may issue while the layer above is away (its fallback allowance)")]
pub struct OutsideFallback {
    pub what: String,
}

fn parse(field: &str, sources: &[String]) -> Result<Vec<Pattern>, String> {
    sources
        .iter()
        .map(|s| {
            if s.contains("{cn}") || s.contains("{user}") {
                return Err(format!(
                    "{field}: {s:?}: a fallback allowance bounds this layer's RA, whose names do \
                     not depend on the client: use fixed patterns (as the upper layer's RA rule does)"
                ));
            }
            Pattern::parse(s).map_err(|e| format!("{field}: {e}"))
        })
        .collect()
}

impl Fallback {
    pub fn new(config: &FallbackConfig) -> Result<Fallback, String> {
        let mut attributes = Vec::new();
        for (name, values) in &config.subject_attributes {
            if name.eq_ignore_ascii_case("CN") {
                return Err("subject_attributes: CN is governed by common_names".into());
            }
            attributes.push((name.clone(), parse("subject_attributes", values)?));
        }
        Ok(Fallback {
            common_names: parse("common_names", &config.common_names)?,
            ca_common_names: parse("ca_common_names", &config.ca_common_names)?,
            dns_names: parse("dns_names", &config.dns_names)?,
            ip_addresses: parse("ip_addresses", &config.ip_addresses)?,
            uris: parse("uris", &config.uris)?,
            emails: parse("emails", &config.emails)?,
            attributes,
        })
    }

    /// Whether every name of `grant` is within the allowance.
    pub fn check(&self, grant: &Grant) -> Result<(), OutsideFallback> {
        let any = |ps: &[Pattern], v: &str, fold: bool| {
            ps.iter().any(|p| p.matches(v, Vars::default(), fold))
        };
        let outside = |what: String| Err(OutsideFallback { what });
        // A lower layer's own CA is the upper layer's decision, never a stand-in's.
        if grant.sub_ca.is_some() {
            return outside("a lower layer's issuing CA".into());
        }
        if grant.ca && self.ca_common_names.is_empty() {
            return outside("a CA certificate".into());
        }
        for (kind, value) in grant.subject.attributes() {
            let allowed = match kind {
                AttributeType::CommonName if grant.ca => any(&self.ca_common_names, value, false),
                AttributeType::CommonName => any(&self.common_names, value, false),
                _ => self
                    .attributes
                    .iter()
                    .find(|(name, _)| {
                        name.eq_ignore_ascii_case(kind.short_name()) || *name == kind.oid()
                    })
                    .is_some_and(|(_, ps)| any(ps, value, false)),
            };
            if !allowed {
                return outside(format!("subject {}={value:?}", kind.short_name()));
            }
        }
        for san in &grant.sans {
            let allowed = match san {
                SanEntry::Dns(name) => any(&self.dns_names, name, true),
                SanEntry::Ip(ip) => any(&self.ip_addresses, &ip.to_string(), false),
                SanEntry::Uri(uri) => any(&self.uris, uri, false),
                SanEntry::Email(email) => any(&self.emails, email, true),
                SanEntry::Other(_) => false,
            };
            if !allowed {
                return outside(format!("subjectAltName {san}"));
            }
        }
        Ok(())
    }
}

/// The rules of `upper` (the label a lower layer forwards to) that give the RA whose client
/// certificate has the common name `ra_cn` its allowance: those marked
/// `registration_authority` whose `client_cn` (if any) matches it.
pub fn ra_rules<'a>(upper: &'a LabelConfig, ra_cn: &str) -> Vec<&'a RuleConfig> {
    upper
        .rules
        .iter()
        .filter(|r| r.registration_authority)
        .filter(|r| {
            // `module:DEVICE/MODULE` names the RA by its module (`auth::ra`); a dedicated RA
            // certificate by `client_cn`.
            let modules: Vec<&str> = r
                .matches
                .iter()
                .filter_map(|m| m.strip_prefix("module:"))
                .filter_map(|pin| pin.split_once('/').map(|(_, module)| module))
                .collect();
            if !modules.is_empty() {
                return modules.contains(&ra_cn);
            }
            r.client_cn.is_empty()
                || r.client_cn.iter().any(|p| {
                    Pattern::parse(p).is_ok_and(|p| p.matches(ra_cn, Vars::default(), false))
                })
        })
        .collect()
}

/// Checks that `fallback` grants nothing the upper layer's `ra_rules` would not grant the
/// RA: every fallback pattern lies within one of the upper patterns for the same field.
/// Returns one message per pattern that does not.
pub fn within_upper_allowance(fallback: &FallbackConfig, ra_rules: &[&RuleConfig]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut field = |name: &str, mine: &[String], theirs: &dyn Fn(&RuleConfig) -> &[String]| {
        let upper: Vec<&String> = ra_rules.iter().flat_map(|r| theirs(r).iter()).collect();
        for pattern in mine {
            if !upper.iter().any(|u| pattern_within(pattern, u)) {
                problems.push(format!(
                    "fallback.{name}: {pattern:?} is wider than what the upper layer allows this \
                     RA ({})",
                    if upper.is_empty() {
                        "nothing".to_owned()
                    } else {
                        upper
                            .iter()
                            .map(|u| format!("{u:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ));
            }
        }
    };
    field("common_names", &fallback.common_names, &|r| &r.common_names);
    field("ca_common_names", &fallback.ca_common_names, &|r| {
        &r.ca_common_names
    });
    field("dns_names", &fallback.dns_names, &|r| &r.dns_names);
    field("ip_addresses", &fallback.ip_addresses, &|r| &r.ip_addresses);
    field("uris", &fallback.uris, &|r| &r.uris);
    field("emails", &fallback.emails, &|r| &r.emails);
    let empty = Vec::new();
    let upper_attributes: BTreeMap<&str, Vec<&String>> = ra_rules
        .iter()
        .flat_map(|r| r.subject_attributes.iter())
        .fold(BTreeMap::new(), |mut map, (k, v)| {
            map.entry(k.as_str()).or_insert_with(Vec::new).extend(v);
            map
        });
    for (name, mine) in &fallback.subject_attributes {
        let upper = upper_attributes.get(name.as_str()).unwrap_or(&empty);
        for pattern in mine {
            if !upper.iter().any(|u| pattern_within(pattern, u)) {
                problems.push(format!(
                    "fallback.subject_attributes.{name}: {pattern:?} is wider than what the upper \
                     layer allows this RA"
                ));
            }
        }
    }
    problems
}

/// One edge-est of a deployment, for [`across_layers`].
pub struct LayerConfig<'a> {
    /// Where it comes from (a manifest file), for messages.
    pub source: &'a str,
    /// The name of its RA credential's common name above: the module name, when it forwards
    /// with its workload identity certificate (the module default).
    pub ra_cn: &'a str,
    pub config: &'a Config,
    /// Whether it has a layer above (it may forward).
    pub nested: bool,
}

/// Checks, for every pair of layers where one may forward to the other, that each `auto`
/// label's fallback allowance is within the upper layer's RA rule for it. A pair where the
/// upper configuration has no RA rule for that RA (a sibling, not a parent) is skipped:
/// only a relation both sides show is checked. Returns (source of the lower layer, message).
pub fn across_layers<'a>(layers: &[LayerConfig<'a>]) -> Vec<(&'a str, String)> {
    let mut problems = Vec::new();
    for lower in layers.iter().filter(|l| l.nested) {
        for upper in layers {
            if std::ptr::eq(upper, lower) {
                continue;
            }
            for (i, label) in lower.config.labels.iter().enumerate() {
                let (Mode::Auto, Some(fallback), Some(upstream)) =
                    (label.mode, &label.fallback, &label.upstream)
                else {
                    continue;
                };
                // The upper label: the configured one, or the one the upstream URL names.
                let url_label = lower.config.upstreams.get(upstream).and_then(|u| {
                    u.url
                        .trim_end_matches('/')
                        .split_once("/.well-known/est/")
                        .map(|(_, l)| l.to_owned())
                });
                let wanted = label.upstream_label.clone().or(url_label);
                let Some(upper_label) = upper.config.labels.iter().find(|l| l.name == wanted)
                else {
                    continue;
                };
                let rules = ra_rules(upper_label, lower.ra_cn);
                if rules.is_empty() {
                    continue;
                }
                for problem in within_upper_allowance(fallback, &rules) {
                    problems.push((
                        lower.source,
                        format!(
                            "labels[{i}].{problem}, whose RA rule for {:?} is in {}",
                            lower.ra_cn, upper.source
                        ),
                    ));
                }
            }
        }
    }
    problems
}

/// Whether every name `narrow` matches is matched by `wide` (both with `*` as "any run of
/// characters"). Sound, not complete: `narrow`'s stars are treated as a symbol only a star of
/// `wide` can match, so `l3-*` is within `l3-*`, `l*` and `*`, but never within `l3-a*`.
/// An upper pattern with a placeholder matches only itself.
pub fn pattern_within(narrow: &str, wide: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum T {
        C(char),
        Star,
    }
    let tokens = |s: &str| -> Vec<T> {
        let mut out: Vec<T> = Vec::new();
        for c in s.chars() {
            let t = if c == '*' { T::Star } else { T::C(c) };
            if !(t == T::Star && out.last() == Some(&T::Star)) {
                out.push(t);
            }
        }
        out
    };
    if wide.contains('{') {
        return narrow == wide;
    }
    let (n, w) = (tokens(narrow), tokens(wide));
    // matched[i][j]: w[..i] matches n[..j].
    let mut matched = vec![vec![false; n.len() + 1]; w.len() + 1];
    matched[0][0] = true;
    for i in 1..=w.len() {
        for j in 0..=n.len() {
            matched[i][j] = match w[i - 1] {
                T::Star => matched[i - 1][j] || (j > 0 && matched[i][j - 1]),
                T::C(c) => j > 0 && n[j - 1] == T::C(c) && matched[i - 1][j - 1],
            };
        }
    }
    matched[w.len()][n.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lower layer's own CA is never granted by a stand-in: an `auto` layer signing while
    /// its upstream is away refuses a sub-CA even under an allowance for every CA name
    /// (positive control: the same names as an Edge CA pass).
    #[test]
    fn a_sub_ca_is_outside_every_fallback() {
        let allowance: FallbackConfig =
            toml::from_str("common_names = [\"*\"]\nca_common_names = [\"*\"]").unwrap();
        let fallback = Fallback::new(&allowance).unwrap();
        let subject = crate::est::Subject::from_attributes(vec![(
            crate::est::name::AttributeType::CommonName,
            "L2 CA".into(),
        )]);
        let mut grant = Grant {
            ca: true,
            subject,
            sans: Vec::new(),
            sub_ca: None,
        };
        fallback.check(&grant).unwrap();
        grant.sub_ca = Some(crate::policy::SubCa {
            path_len: 0,
            validity: ::time::Duration::days(1),
            dns: vec![".l3.plant.local".into()],
            directory_name: None,
        });
        let refused = fallback.check(&grant).unwrap_err().to_string();
        assert!(refused.contains("issuing CA"), "{refused}");
    }

    #[test]
    fn pattern_inclusion_is_sound() {
        assert!(pattern_within("l3-*", "l3-*"));
        assert!(pattern_within("l3-dev-*", "l3-*"));
        assert!(pattern_within("l3-*", "*"));
        assert!(pattern_within("l3-01", "l3-*"));
        assert!(pattern_within("aziot-edge CA l3-*", "aziot-edge CA *"));
        assert!(!pattern_within("*", "l3-*"));
        assert!(!pattern_within("l3-*", "l3-a*"));
        assert!(!pattern_within("plc-*", "l3-*"));
        assert!(!pattern_within("l3-*", "l3-"));
        assert!(!pattern_within("{cn}", "l3-*"));
        assert!(pattern_within("{cn}", "{cn}"));
    }
}
