//! Who may act as a registration authority: "module M of device D", an identity no other
//! device can forge, and the configuration checks that keep RA rules from naming forgeable
//! identities.
//!
//! A lower layer's edge-est forwards with its module's workload identity certificate: CN = the
//! module's name, issued by its device's Edge CA (`aziot-edge CA <device>`, CA:TRUE, pathlen
//! 0), which an issuing CA of the hierarchy issued to that device. Every device holds such an
//! Edge CA and can mint any CN below it, so a CN under a trust set that reaches Edge CAs
//! proves nothing. What does: the module's certificate issued by an Edge CA named for the
//! device, which in turn was issued **directly** by this label's issuing CA and is recorded
//! under this label (a device obtains `aziot-edge CA {cn}` only in its own name). That holds
//! across the device's Edge CA renewal (new key, same name) and the module certificate's
//! monthly renewal: nothing is pinned by key.

use rustls::pki_types::{CertificateDer, TrustAnchor};

use super::chain::{self, CaFacts, Hierarchy, TrustSet, EDGE_CA_PREFIX};
use crate::config::{Config, ConfigError, RuleConfig};
use crate::policy::{Pattern, Vars};

/// The `match` prefix naming a module of a device.
pub const MODULE_MATCH: &str = "module:";

/// "Module `module` of device `device`", as a rule names it: `module:DEVICE/MODULE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleOf {
    pub device: String,
    pub module: String,
}

impl std::fmt::Display for ModuleOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "module {} of device {}", self.module, self.device)
    }
}

/// IoT Hub device and module IDs: at most 128 characters, no `/`, no space or control
/// character. A pin names one device and one module: no `*` either.
fn check_id(kind: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("the {kind} is empty"));
    }
    if id.len() > 128 {
        return Err(format!("the {kind} is longer than 128 characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '/' | '*' | '{' | '}'))
    {
        return Err(format!(
            "the {kind} {id:?} holds {c:?}: name one device and one module, without patterns"
        ));
    }
    Ok(())
}

impl ModuleOf {
    /// Parses what follows `module:` in a rule's `match`: `DEVICE/MODULE`.
    pub fn parse(text: &str) -> Result<ModuleOf, String> {
        let (device, module) = text.split_once('/').ok_or_else(|| {
            format!("module:{text:?} must be module:DEVICE/MODULE (e.g. module:gw-middle/edgeest)")
        })?;
        check_id("device", device)?;
        check_id("module", module)?;
        Ok(ModuleOf {
            device: device.to_owned(),
            module: module.to_owned(),
        })
    }

    /// The Edge CA name this device obtains for itself.
    pub fn edge_ca_name(&self) -> String {
        format!("{EDGE_CA_PREFIX}{}", self.device)
    }
}

/// Why a path is not accepted as a module's: `is_module` when it has a module's shape (an
/// Edge CA of a device) and something else is wrong with it.
pub(crate) struct ModulePathError {
    pub is_module: bool,
    pub reason: String,
}

fn not_a_module(reason: String) -> ModulePathError {
    ModulePathError {
        is_module: false,
        reason,
    }
}

fn refused(reason: String) -> ModulePathError {
    ModulePathError {
        is_module: true,
        reason,
    }
}

/// Checks a path webpki verified against `set` for a module identity: the client's
/// certificate issued by exactly one CA, the device's Edge CA (CA:TRUE, pathlen 0, CN
/// `aziot-edge CA <device>`), itself issued directly by an anchor of `set` and, when `set` is
/// the label's `issuer`, recorded under this label. Every CA valid `now`. Returns the device.
pub(crate) fn check_module_path(
    set: &TrustSet,
    intermediates: &[CertificateDer<'_>],
    anchor: &TrustAnchor<'_>,
    hierarchy: &Hierarchy<'_>,
    now: i64,
) -> Result<String, ModulePathError> {
    let [edge_ca] = intermediates else {
        return Err(not_a_module(format!(
            "not a module certificate: a module's certificate comes from its device's Edge CA, \
             issued directly by a CA of trust set {}",
            set.name
        )));
    };
    let facts = CaFacts::of(edge_ca).map_err(not_a_module)?;
    let device = facts
        .cn
        .as_deref()
        .and_then(|cn| cn.strip_prefix(EDGE_CA_PREFIX))
        .filter(|d| check_id("device", d).is_ok());
    let device = match device {
        Some(d) if facts.ca && facts.path_len == Some(0) => d.to_owned(),
        _ => {
            return Err(not_a_module(format!(
                "not a module certificate: its issuer \"{}\" is not a device's Edge CA \
                 (CA, pathlen 0, named \"{EDGE_CA_PREFIX}<device>\")",
                facts.cn.as_deref().unwrap_or("(no CN)")
            )))
        }
    };
    set.check_anchor(anchor, now).map_err(refused)?;
    facts.check_valid_at(now).map_err(refused)?;
    if set.is_issuer() {
        chain::check_issued_here(edge_ca, hierarchy).map_err(|_| {
            refused(format!(
                "a module of {device}, whose Edge CA was not issued on this label"
            ))
        })?;
    }
    Ok(device)
}

/// The trust set a `module:` rule checks the device's Edge CA against: the rule's
/// `edge_ca_issuer`, by default the label's `issuer`.
pub fn edge_ca_issuer(rule: &RuleConfig) -> &str {
    rule.edge_ca_issuer.as_deref().unwrap_or(chain::ISSUER_SET)
}

/// The module trust set of IoT Edge: the workload API's trust bundle (the device's own Edge CA
/// and the hierarchy root). Every device of the hierarchy holds an Edge CA below that root.
const TRUST_BUNDLE_SET: &str = crate::edge::desired::TRUST_BUNDLE_SET;

/// Refuses rules that name a registration authority (or any identity) in a way any device
/// of the hierarchy could forge: `client_cn` over a trust set that reaches devices' own CAs.
pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    for (i, label) in config.labels.iter().enumerate() {
        for (j, rule) in label.rules.iter().enumerate() {
            let field = format!("labels[{i}].rules[{j}]");
            if rule.client_cn.is_empty() {
                continue;
            }
            for set in certificate_sets(rule, &label.client_trust) {
                let deep = config.trust.get(set).is_some_and(|t| !t.depth.is_direct());
                if set == TRUST_BUNDLE_SET || deep {
                    return Err(ConfigError::invalid(
                        format!("{field}.client_cn"),
                        format!(
                            "narrows trust set {set:?}, which reaches the Edge CAs of devices \
                             ({}): any device can mint a certificate with that CN below its own \
                             Edge CA. Name a lower layer's edge-est as \
                             \"module:DEVICE/MODULE\" (its module of that device), or give RAs \
                             a CA of their own (a trust set with depth \"direct\")",
                            if set == TRUST_BUNDLE_SET {
                                "the trust bundle holds the hierarchy's root"
                            } else {
                                "its depth is \"any\""
                            }
                        ),
                    ));
                }
            }
        }
        for (j, rule) in label.rules.iter().enumerate() {
            let field = format!("labels[{i}].rules[{j}]");
            let has_module = rule.matches.iter().any(|m| m.starts_with(MODULE_MATCH));
            match (&rule.edge_ca_issuer, has_module) {
                (Some(_), false) => {
                    return Err(ConfigError::invalid(
                        format!("{field}.edge_ca_issuer"),
                        "applies to module:DEVICE/MODULE matches only",
                    ))
                }
                (_, true) => {
                    let set = edge_ca_issuer(rule);
                    if !label.client_trust.iter().any(|t| t == set) {
                        return Err(ConfigError::invalid(
                            format!("{field}.match"),
                            format!(
                                "a module's device Edge CA is checked against trust set {set:?}, \
                                 which is not in this label's client_trust"
                            ),
                        ));
                    }
                    if let Some(t) = config.trust.get(set).filter(|t| !t.depth.is_direct()) {
                        let _ = t;
                        return Err(ConfigError::invalid(
                            format!("{field}.edge_ca_issuer"),
                            format!(
                                "trust set {set:?} has depth \"any\": the Edge CA must be issued \
                                 directly by one of its CAs, so list the issuing CAs with depth \
                                 \"direct\""
                            ),
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The trust sets a rule's `certificate:` matches name (`*`: all of the label's).
fn certificate_sets<'a>(rule: &'a RuleConfig, client_trust: &'a [String]) -> Vec<&'a str> {
    let mut sets = Vec::new();
    for m in &rule.matches {
        match m.strip_prefix("certificate:") {
            Some("*") => sets.extend(client_trust.iter().map(String::as_str)),
            Some(set) => sets.push(set),
            None => {}
        }
    }
    sets
}

/// What `check-config` and `check-manifest` warn about (the configuration still loads):
/// - a rule whose certificates come from a trust set of depth `any`: it accepts certificates
///   from any CA below the set's anchors; paths through the device CAs edge-est recognises are
///   refused, but not through one it cannot;
/// - a `module:DEVICE/MODULE` rule while another rule of the label could grant someone else
///   the Edge CA `aziot-edge CA DEVICE`: who obtains it can mint that module.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (i, label) in config.labels.iter().enumerate() {
        for (j, rule) in label.rules.iter().enumerate() {
            for set in certificate_sets(rule, &label.client_trust) {
                if config.trust.get(set).is_some_and(|t| !t.depth.is_direct()) {
                    out.push(format!(
                        "labels[{i}].rules[{j}]: trust set {set:?} has depth \"any\": it accepts \
                         certificates from any CA below its anchors. Paths through a device's \
                         own CA are refused where edge-est recognises one (issued by this \
                         layer's issuing CAs, recorded in its journal, or named \
                         \"{EDGE_CA_PREFIX}…\"), but a device CA issued elsewhere under these \
                         anchors would pass: prefer depth \"direct\", listing the CAs that issue \
                         client certificates"
                    ));
                }
            }
            for m in &rule.matches {
                let Some(Ok(module)) = m.strip_prefix(MODULE_MATCH).map(ModuleOf::parse) else {
                    continue;
                };
                let edge_ca = module.edge_ca_name();
                for (k, other) in label.rules.iter().enumerate() {
                    let grants = other
                        .ca_common_names
                        .iter()
                        .filter_map(|p| Pattern::parse(p).ok())
                        .any(|p| p.matches(&edge_ca, Vars::default(), false));
                    if grants {
                        out.push(format!(
                            "labels[{i}].rules[{k}].ca_common_names: lets {} obtain the Edge CA \
                             \"{edge_ca}\" of {}, which is a registration authority here \
                             (rules[{j}]): whoever obtains it can mint that module. Keep Edge CA \
                             names to \"{EDGE_CA_PREFIX}{{cn}}\" or patterns that exclude \
                             {}",
                            other.matches.join(", "),
                            module.device,
                            module.device
                        ));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_match_names_one_device_and_one_module() {
        let m = ModuleOf::parse("gw-middle/edgeest").unwrap();
        assert_eq!(m.device, "gw-middle");
        assert_eq!(m.module, "edgeest");
        assert_eq!(m.edge_ca_name(), "aziot-edge CA gw-middle");
        assert_eq!(m.to_string(), "module edgeest of device gw-middle");
        for bad in [
            "edgeest",
            "/edgeest",
            "gw-middle/",
            "gw-*/edgeest",
            "gw-middle/edge est",
            "gw/middle/edgeest",
            "{cn}/edgeest",
        ] {
            assert!(ModuleOf::parse(bad).is_err(), "{bad}");
        }
        // IoT Hub's length limit, 128 characters, on both.
        let long = "d".repeat(128);
        assert!(ModuleOf::parse(&format!("{long}/edgeest")).is_ok());
        assert!(ModuleOf::parse(&format!("gw/{long}")).is_ok());
        let too_long = "d".repeat(129);
        let e = ModuleOf::parse(&format!("{too_long}/edgeest")).unwrap_err();
        assert!(e.contains("device is longer than 128"), "{e}");
        let e = ModuleOf::parse(&format!("gw/{too_long}")).unwrap_err();
        assert!(e.contains("module is longer than 128"), "{e}");
    }

    fn config(depth: &str, rule: &str) -> Config {
        toml::from_str(&format!(
            r#"
[trust.factory]
certificates = ["/x/factory.pem"]
depth = "{depth}"

[[labels]]
client_trust = ["issuer", "factory"]
rules = [ {rule} ]
"#
        ))
        .unwrap()
    }

    /// `edge_ca_issuer`: only on `module:` rules, naming a set of the label, of depth
    /// `direct` (an Edge CA issued directly by one of its CAs). Positive control: a module
    /// rule whose Edge CA comes from a direct set of the label.
    #[test]
    fn edge_ca_issuer_names_a_direct_set_of_the_label_on_module_rules_only() {
        let module = r#"{ match = ["module:gw-1/edgeest"], edge_ca_issuer = "factory" }"#;
        check_config(&config("direct", module)).unwrap();
        let e = check_config(&config("any", module))
            .unwrap_err()
            .to_string();
        assert!(e.contains("labels[0].rules[0].edge_ca_issuer"), "{e}");
        assert!(e.contains("has depth \"any\""), "{e}");
        let elsewhere = r#"{ match = ["module:gw-1/edgeest"], edge_ca_issuer = "other" }"#;
        let e = check_config(&config("direct", elsewhere))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in this label's client_trust"), "{e}");
        let user = r#"{ match = ["user:installer"], edge_ca_issuer = "factory" }"#;
        let e = check_config(&config("direct", user))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("labels[0].rules[0].edge_ca_issuer")
                && e.contains("module:DEVICE/MODULE matches only"),
            "{e}"
        );
    }
}
