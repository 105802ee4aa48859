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

    fn grant(ca: bool, subject: &[(AttributeType, &str)], sans: Vec<SanEntry>) -> Grant {
        Grant {
            ca,
            subject: crate::est::Subject::from_attributes(
                subject
                    .iter()
                    .map(|(k, v)| (k.clone(), (*v).to_owned()))
                    .collect(),
            ),
            sans,
            sub_ca: None,
        }
    }

    fn allowance(toml_text: &str) -> Fallback {
        Fallback::new(&toml::from_str(toml_text).unwrap()).unwrap()
    }

    /// Each name of a locally signed request must be within the allowance, by its own
    /// field: the end-entity CN by `common_names`, a CA's by `ca_common_names`, each other
    /// attribute by its own list (short name or OID), each subjectAltName by its kind.
    /// Every refusal has its positive control: the same shape within the allowance passes.
    #[test]
    fn every_name_of_a_local_signature_is_checked_by_its_own_field() {
        use AttributeType::*;
        let fallback = allowance(
            r#"
            common_names = ["dev-*"]
            ca_common_names = ["aziot-edge CA *"]
            dns_names = ["*.l3.plant.local"]
            ip_addresses = ["10.3.*"]
            uris = ["urn:l3:*"]
            emails = ["ops@l3.plant.local"]
            [subject_attributes]
            o = ["Contoso"]
            "2.5.4.11" = ["Plant 3"]
            "#,
        );
        let ok = |g: &Grant| fallback.check(g).unwrap();
        let refused = |g: &Grant| fallback.check(g).unwrap_err().what;

        // A device with every kind of name, all within: signed.
        ok(&grant(
            false,
            &[
                (CommonName, "dev-1"),
                (Organization, "Contoso"),
                (OrganizationalUnit, "Plant 3"),
            ],
            vec![
                SanEntry::Dns("Dev-1.L3.plant.local".into()),
                SanEntry::Ip("10.3.0.7".parse().unwrap()),
                SanEntry::Uri("urn:l3:dev-1".into()),
                SanEntry::Email("OPS@l3.plant.local".into()),
            ],
        ));
        // An Edge CA by its CA name, no SAN: signed.
        ok(&grant(true, &[(CommonName, "aziot-edge CA gw-3")], vec![]));

        // An end-entity CN is held to `common_names`, a CA's to `ca_common_names`.
        let what = refused(&grant(false, &[(CommonName, "aziot-edge CA gw-3")], vec![]));
        assert_eq!(what, "subject CN=\"aziot-edge CA gw-3\"");
        let what = refused(&grant(true, &[(CommonName, "dev-1")], vec![]));
        assert_eq!(what, "subject CN=\"dev-1\"");
        // Other attributes by their own list, never another's: OU is not within O's.
        let what = refused(&grant(
            false,
            &[(CommonName, "dev-1"), (OrganizationalUnit, "Contoso")],
            vec![],
        ));
        assert_eq!(what, "subject OU=\"Contoso\"");
        let what = refused(&grant(
            false,
            &[(CommonName, "dev-1"), (Organization, "Plant 3")],
            vec![],
        ));
        assert_eq!(what, "subject O=\"Plant 3\"");
        let what = refused(&grant(
            false,
            &[(CommonName, "dev-1"), (Locality, "Anywhere")],
            vec![],
        ));
        assert_eq!(what, "subject L=\"Anywhere\"");
        // Each subjectAltName by its kind; an unknown kind never.
        for (san, text) in [
            (SanEntry::Dns("dev-1.l4.plant.local".into()), "DNS"),
            (SanEntry::Ip("10.4.0.7".parse().unwrap()), "IP"),
            (SanEntry::Uri("urn:l4:dev-1".into()), "URI"),
            (SanEntry::Email("ops@l4.plant.local".into()), "email"),
            (SanEntry::Other("otherName 1.2.3".into()), "otherName"),
            // A DNS pattern does not admit an IP address's text, nor the reverse.
            (SanEntry::Uri("10.3.0.7".into()), "URI"),
        ] {
            let what = refused(&grant(false, &[(CommonName, "dev-1")], vec![san]));
            assert!(
                what.starts_with("subjectAltName") && what.contains(text),
                "{what}"
            );
        }
    }

    /// Without `ca_common_names` no CA is signed locally, whatever its name; an end-entity
    /// certificate still is.
    #[test]
    fn an_allowance_without_ca_names_signs_no_ca() {
        use AttributeType::*;
        let fallback = allowance(r#"common_names = ["*"]"#);
        fallback
            .check(&grant(false, &[(CommonName, "dev-1")], vec![]))
            .unwrap();
        let what = fallback
            .check(&grant(true, &[(CommonName, "dev-1")], vec![]))
            .unwrap_err()
            .what;
        assert_eq!(what, "a CA certificate");
    }

    #[test]
    fn placeholders_are_refused_in_an_allowance() {
        for field in ["common_names", "dns_names"] {
            for pattern in ["{cn}", "dev-{user}", "fixed-*"] {
                let config: FallbackConfig =
                    toml::from_str(&format!("{field} = [{pattern:?}]")).unwrap();
                let parsed = Fallback::new(&config);
                if pattern.contains('{') {
                    let error = parsed.unwrap_err();
                    assert!(
                        error.starts_with(&format!("{field}: {pattern:?}: a fallback allowance")),
                        "{error}"
                    );
                } else {
                    parsed.unwrap();
                }
            }
        }
        let config: FallbackConfig = toml::from_str("[subject_attributes]\nCN = [\"x\"]").unwrap();
        assert!(Fallback::new(&config)
            .unwrap_err()
            .contains("CN is governed"));
    }

    fn rules(toml_text: &str) -> LabelConfig {
        toml::from_str(toml_text).unwrap()
    }

    /// The RA rules of the upper label for an RA: those marked `registration_authority`,
    /// by module name for `module:` matches, else by `client_cn` (none: any RA).
    #[test]
    fn the_ra_rules_are_those_naming_this_ra() {
        let upper = rules(
            r#"
            [[rules]]
            match = ["module:gw-2/edgeest"]
            registration_authority = true
            common_names = ["by-module"]
            [[rules]]
            match = ["module:gw-2/other"]
            registration_authority = true
            common_names = ["other-module"]
            [[rules]]
            match = ["certificate:*"]
            client_cn = ["ra-*"]
            registration_authority = true
            common_names = ["by-cn"]
            [[rules]]
            match = ["certificate:*"]
            registration_authority = true
            common_names = ["any-ra"]
            [[rules]]
            match = ["certificate:*"]
            client_cn = ["edgeest", "ra-*"]
            common_names = ["not-an-ra"]
            "#,
        );
        let names = |cn: &str| -> Vec<&str> {
            ra_rules(&upper, cn)
                .iter()
                .map(|r| r.common_names[0].as_str())
                .collect()
        };
        assert_eq!(names("edgeest"), ["by-module", "any-ra"]);
        assert_eq!(names("ra-1"), ["by-cn", "any-ra"]);
        assert_eq!(names("someone"), ["any-ra"]);
    }

    #[test]
    fn a_fallback_wider_than_the_upper_ra_rule_is_named_pattern_by_pattern() {
        let upper = rules(
            r#"
            [[rules]]
            match = ["certificate:*"]
            registration_authority = true
            common_names = ["l3-*"]
            dns_names = ["*.l3.plant.local"]
            [rules.subject_attributes]
            O = ["Contoso"]
            "#,
        );
        let ra = ra_rules(&upper, "edgeest");
        let within: FallbackConfig = toml::from_str(
            r#"
            common_names = ["l3-dev-*"]
            dns_names = ["a.l3.plant.local"]
            [subject_attributes]
            O = ["Contoso"]
            "#,
        )
        .unwrap();
        assert_eq!(within_upper_allowance(&within, &ra), Vec::<String>::new());
        let wider: FallbackConfig = toml::from_str(
            r#"
            common_names = ["l3-dev-*", "*"]
            emails = ["a@b"]
            [subject_attributes]
            O = ["Contoso", "*"]
            "#,
        )
        .unwrap();
        assert_eq!(
            within_upper_allowance(&wider, &ra),
            [
                "fallback.common_names: \"*\" is wider than what the upper layer allows this RA (\"l3-*\")",
                "fallback.emails: \"a@b\" is wider than what the upper layer allows this RA (nothing)",
                "fallback.subject_attributes.O: \"*\" is wider than what the upper layer allows this RA",
            ]
        );
    }

    fn config(toml_text: &str) -> Config {
        toml::from_str(toml_text).unwrap()
    }

    /// Each `auto` label of a nested layer is checked against the upper label it forwards to
    /// (its `upstream_label`, else the one its upstream's URL names), and only where the upper
    /// layer has an RA rule for it.
    #[test]
    fn across_layers_each_auto_label_meets_the_upper_label_it_forwards_to() {
        let top = config(
            r#"
            [[labels]]
            name = "wide"
            [[labels.rules]]
            match = ["certificate:*"]
            registration_authority = true
            common_names = ["*"]
            [[labels]]
            name = "narrow"
            [[labels.rules]]
            match = ["certificate:*"]
            registration_authority = true
            common_names = ["l3-*"]
            [[labels]]
            name = "no-ra"
            [[labels.rules]]
            match = ["certificate:*"]
            common_names = ["l3-*"]
            "#,
        );
        let lower = |label: &str, by_url: bool| {
            let (url, upstream_label) = if by_url {
                (format!("/.well-known/est/{label}"), String::new())
            } else {
                (
                    "/.well-known/est".to_owned(),
                    format!("upstream_label = {label:?}"),
                )
            };
            config(&format!(
                r#"
                [upstreams.top]
                url = "https://top:8085{url}"
                trust = []
                [[labels]]
                name = "l3"
                mode = "auto"
                upstream = "top"
                {upstream_label}
                [labels.fallback]
                common_names = ["dev-*"]
                "#
            ))
        };
        let check = |lower: &Config, nested: bool| -> Vec<(String, String)> {
            across_layers(&[
                LayerConfig {
                    source: "top.json",
                    ra_cn: "edgeest",
                    config: &top,
                    nested: false,
                },
                LayerConfig {
                    source: "l3.json",
                    ra_cn: "edgeest",
                    config: lower,
                    nested,
                },
            ])
            .into_iter()
            .map(|(source, text)| (source.to_owned(), text))
            .collect()
        };
        for by_url in [false, true] {
            let narrow = check(&lower("narrow", by_url), true);
            assert_eq!(narrow.len(), 1, "{narrow:?}");
            assert_eq!(narrow[0].0, "l3.json");
            assert_eq!(
                narrow[0].1,
                "labels[0].fallback.common_names: \"dev-*\" is wider than what the upper layer \
                 allows this RA (\"l3-*\"), whose RA rule for \"edgeest\" is in top.json"
            );
            let none = Vec::<(String, String)>::new();
            assert_eq!(check(&lower("wide", by_url), true), none);
            assert_eq!(check(&lower("no-ra", by_url), true), none, "a sibling");
            assert_eq!(check(&lower("narrow", by_url), false), none, "not nested");
        }
    }

    /// Characters after a star still count: `l3-*-a` is not within `l3-*-b`. Consecutive
    /// stars are one.
    #[test]
    fn pattern_inclusion_looks_past_stars() {
        assert!(!pattern_within("l3-*-a", "l3-*-b"));
        assert!(pattern_within("l3-*-a", "l3-*-*"));
        assert!(pattern_within("l3-**", "l3-*"));
        assert!(pattern_within("l3-*", "l3-**"));
        assert!(!pattern_within("a*b", "a*c"));
        assert!(pattern_within("ab", "a*b"));
        assert!(!pattern_within("ab", "a*bc"));
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
