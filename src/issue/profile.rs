//! Issuance profiles: what kind of certificate a grant becomes (validity, key usage,
//! extended key usage, basic constraints). The CSR's requested extensions never reach here.

use std::collections::BTreeMap;

use rcgen::ExtendedKeyUsagePurpose;

use crate::config::{ProfileConfig, ProfileKind};
use crate::policy::SubCa;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileClass {
    /// An end-entity certificate with these extended key usages.
    EndEntity {
        extended_key_usage: Vec<ExtendedKeyUsagePurpose>,
    },
    /// A CA certificate (IoT Edge's Edge CA: path length 0).
    Ca { path_len: u8 },
    /// A lower layer's issuing CA: its path length and name constraints (a rule's `sub_ca`).
    SubCa(SubCa),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub class: ProfileClass,
    pub validity: time::Duration,
}

impl Profile {
    pub fn is_ca(&self) -> bool {
        matches!(self.class, ProfileClass::Ca { .. } | ProfileClass::SubCa(_))
    }

    /// The profile of a granted sub-CA, journaled as `sub-ca`.
    pub fn sub_ca(granted: &SubCa) -> Profile {
        Profile {
            name: "sub-ca".to_owned(),
            class: ProfileClass::SubCa(granted.clone()),
            validity: granted.validity,
        }
    }
}

/// The built-in profiles, which configuration may override by name.
pub fn builtin() -> BTreeMap<String, ProfileConfig> {
    let mut profiles = BTreeMap::new();
    profiles.insert(
        "identity".to_owned(),
        ProfileConfig {
            kind: ProfileKind::EndEntity,
            validity_days: 365,
            validity_secs: None,
            path_len: None,
            extended_key_usage: vec!["clientAuth".to_owned()],
        },
    );
    profiles.insert(
        "server".to_owned(),
        ProfileConfig {
            kind: ProfileKind::EndEntity,
            validity_days: 365,
            validity_secs: None,
            path_len: None,
            extended_key_usage: vec!["serverAuth".to_owned(), "clientAuth".to_owned()],
        },
    );
    profiles.insert(
        "edge-ca".to_owned(),
        ProfileConfig {
            kind: ProfileKind::Ca,
            validity_days: 90,
            validity_secs: None,
            path_len: Some(0),
            extended_key_usage: Vec::new(),
        },
    );
    profiles
}

impl TryFrom<(&str, &ProfileConfig)> for Profile {
    type Error = String;

    fn try_from((name, config): (&str, &ProfileConfig)) -> Result<Profile, String> {
        if config.validity_days == 0 {
            return Err(format!("profiles.{name}.validity_days must be at least 1"));
        }
        let validity = match config.validity_secs {
            Some(0) => return Err(format!("profiles.{name}.validity_secs must be at least 1")),
            Some(secs) => time::Duration::seconds(secs.min(u64::from(u32::MAX)) as i64),
            None => time::Duration::days(i64::from(config.validity_days)),
        };
        let class = match config.kind {
            ProfileKind::Ca => {
                if !config.extended_key_usage.is_empty() {
                    return Err(format!(
                        "profiles.{name}: a CA profile takes no extended_key_usage"
                    ));
                }
                ProfileClass::Ca {
                    path_len: config.path_len.unwrap_or(0),
                }
            }
            ProfileKind::EndEntity => {
                if config.path_len.is_some() {
                    return Err(format!("profiles.{name}: path_len is for CA profiles"));
                }
                let extended_key_usage = config
                    .extended_key_usage
                    .iter()
                    .map(|e| {
                        eku(e).ok_or_else(|| {
                            format!("profiles.{name}.extended_key_usage: unknown {e:?}")
                        })
                    })
                    .collect::<Result<_, _>>()?;
                ProfileClass::EndEntity { extended_key_usage }
            }
        };
        Ok(Profile {
            name: name.to_owned(),
            class,
            validity,
        })
    }
}

fn eku(name: &str) -> Option<ExtendedKeyUsagePurpose> {
    Some(match name {
        "clientAuth" => ExtendedKeyUsagePurpose::ClientAuth,
        "serverAuth" => ExtendedKeyUsagePurpose::ServerAuth,
        "codeSigning" => ExtendedKeyUsagePurpose::CodeSigning,
        "emailProtection" => ExtendedKeyUsagePurpose::EmailProtection,
        "timeStamping" => ExtendedKeyUsagePurpose::TimeStamping,
        "ocspSigning" => ExtendedKeyUsagePurpose::OcspSigning,
        // id-kp-cmcRA (RFC 6402): marks a registration authority's certificate.
        "cmcRA" => ExtendedKeyUsagePurpose::Other(vec![1, 3, 6, 1, 5, 5, 7, 3, 28]),
        _ => return None,
    })
}
