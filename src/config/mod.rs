//! Configuration as data: one serde `Config` (from a TOML or JSON file, later from the module
//! twin), validated as a whole and turned into a [`crate::runtime::Runtime`] that is swapped in
//! atomically. Secrets never sit in a `Config`: private keys are file paths, passwords are
//! argon2 PHC hashes.

pub mod dev;
mod files;
mod validate;

pub use files::FileKind;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole configuration of one edge-est instance.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the EST listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Audit journal of issued certificates (JSON lines).
    #[serde(default = "default_journal")]
    pub journal: PathBuf,
    /// The TLS server certificate children see. As an IoT Edge module it may be left out:
    /// the module then gets one from the workload API.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub limits: Limits,
    /// Address of the Prometheus metrics listener (plain HTTP, `GET /metrics`); absent: no
    /// metrics listener. As an IoT Edge module the default is `0.0.0.0:9600`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// A unix socket (absolute path) for the IoT Edge API proxy: plain HTTP, on which the
    /// client certificate nginx forwards in `x-ms-edge-clientcert` authenticates. Only the API
    /// proxy may reach it (a volume shared by the two containers alone); on the TLS listener
    /// that header is ignored. Absent: no such listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_socket: Option<PathBuf>,
    /// Named sets of client trust anchors (bootstrap / factory CAs). The name `issuer` is
    /// reserved: it means "the CA this label issues from".
    #[serde(default)]
    pub trust: BTreeMap<String, TrustConfig>,
    /// HTTP Basic users: user name → argon2 PHC hash (`edge-est hash-password` makes one).
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    /// Issuing CAs this instance holds (delegated intermediates), by name.
    #[serde(default)]
    pub issuers: BTreeMap<String, IssuerConfig>,
    /// Issuing CAs this instance enrolls from the layer above and renews itself, by name;
    /// labels name them in `issuer` like the others (see `issue::delegation`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub enrolled_issuers: BTreeMap<String, EnrolledIssuerConfig>,
    /// EST servers of the layer above, by name, for labels that forward.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Issuance profiles, by name; they add to or override the built-in `identity`, `server`
    /// and `edge-ca` profiles.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// The EST labels served. A label without `name` serves the unlabeled path.
    pub labels: Vec<LabelConfig>,
    /// The PKCS#11 library (absolute path, or relative to the configuration file) for keys
    /// given as `pkcs11:` URIs (RFC 7512) instead of file paths. IoT Edge calls it `lib_path`.
    #[serde(default, alias = "lib_path", skip_serializing_if = "Option::is_none")]
    pub pkcs11_module: Option<PathBuf>,
}

fn default_journal() -> PathBuf {
    PathBuf::from("journal.jsonl")
}

pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8085))
}

/// A certificate (chain) given either as inline PEM or as the path of a PEM file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(transparent)]
pub struct PemSource(pub String);

impl PemSource {
    pub fn is_inline(&self) -> bool {
        self.0.trim_start().starts_with("-----BEGIN")
    }

    /// Reads the PEM text, relative paths resolved against `base`. `field` names the field
    /// in errors (which never echo a value that names no file: see [`shown_path`]).
    pub fn read(&self, base: &Path, field: &str) -> Result<String, ConfigError> {
        if self.is_inline() {
            return Ok(self.0.clone());
        }
        read_path(base, Path::new(&self.0), field)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate followed by its chain (PEM).
    pub certificate: PemSource,
    /// Path of the server's private key (PEM: PKCS#8, SEC1 or PKCS#1), or a `pkcs11:` URI.
    pub key: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Connections served at once; further ones are closed right after accept.
    pub max_connections: usize,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Time a client has to send a request's headers; also how long an idle keep-alive
    /// connection is kept.
    pub header_timeout_secs: u64,
    /// Time a client has to send a request's body.
    pub body_timeout_secs: u64,
    /// Password verification threads: argon2 verifications running at once. Each costs
    /// tens of ms of CPU and keeps one argon2 working area (~19 MiB with the default
    /// parameters) from its first verification on; only grows over reconfigurations.
    pub password_checks: usize,
    /// Connections served at once from one address (an IPv6 /64); further ones are closed
    /// right after accept. 0: no per-address cap.
    pub max_connections_per_address: usize,
    /// Failed authentications per second allowed from one address (an IPv6 /64): a wrong
    /// password or unknown user, a rejected client certificate, malformed credentials. Past
    /// the bucket, credentials not already known to be good are not verified (no argon2, no
    /// chain check) but answered 429 with `Retry-After`. 0: off.
    pub failed_auth_per_address: f64,
    pub failed_auth_burst_per_address: f64,
    /// The same, per presented identity: a Basic user name, a client certificate's subject.
    pub failed_auth_per_identity: f64,
    pub failed_auth_burst_per_identity: f64,
    /// Certificates per second issued for one requested subject on one label (one device
    /// enrolling over and over); 429 above. 0: off.
    pub enroll_per_name: f64,
    pub enroll_burst_per_name: f64,
    /// Server-generated keys (`serverkeygen`) per second for one identity; 429 above. An
    /// RSA key costs tens of milliseconds of CPU. 0: off.
    pub keygen_per_identity: f64,
    pub keygen_burst_per_identity: f64,
    /// Requests per second allowed from one address (an IPv6 /64) without a client
    /// certificate, checked before anything else is done for the request; 429 with
    /// `Retry-After` above. 0 (default): off; the limits above protect what is expensive.
    pub rate_per_address: f64,
    /// Requests one address may send at once after a quiet time (the token bucket's size).
    pub burst_per_address: f64,
    /// Requests per second allowed for one authenticated identity (a client certificate, or
    /// a Basic user); 429 with `Retry-After` above. 0 (default): off. A Basic user shared by a
    /// fleet (the IoT Edge tutorial's `estuser`) is one identity: leave it off for such fleets.
    pub rate_per_identity: f64,
    /// Requests one identity may send at once after a quiet time.
    pub burst_per_identity: f64,
    /// Trust sets whose client certificates are exempt from the per-identity limit: the
    /// registration authorities of the layers below, whose one identity carries a whole
    /// layer's enrollments.
    pub unlimited_trust: Vec<String>,
    /// How long a client waits for an answer when its request carries no budget header
    /// (`edge-est-budget-ms`, which a lower edge-est layer sends): IoT Edge gives each attempt
    /// 30 s. A forwarding layer gives the layer above less than what is left of it.
    pub client_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 * 1024,
            max_connections: 1024,
            handshake_timeout_secs: 10,
            header_timeout_secs: 15,
            body_timeout_secs: 20,
            password_checks: 1,
            max_connections_per_address: 256,
            failed_auth_per_address: 1.0,
            failed_auth_burst_per_address: 30.0,
            failed_auth_per_identity: 1.0,
            failed_auth_burst_per_identity: 30.0,
            enroll_per_name: 1.0,
            enroll_burst_per_name: 30.0,
            keygen_per_identity: 10.0,
            keygen_burst_per_identity: 50.0,
            rate_per_address: 0.0,
            burst_per_address: 500.0,
            rate_per_identity: 0.0,
            burst_per_identity: 200.0,
            unlimited_trust: Vec::new(),
            client_timeout_secs: 30,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// CA certificates whose issued certificates authenticate clients (PEM, inline or files).
    pub certificates: Vec<PemSource>,
    /// `direct` (default): only certificates these CAs issued directly authenticate. `any`:
    /// also certificates below further CAs, except through a device's own CA (see
    /// `auth::chain`).
    #[serde(default, skip_serializing_if = "crate::auth::chain::Depth::is_direct")]
    pub depth: crate::auth::chain::Depth,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The issuing CA certificate first, then its chain up to and including the root.
    pub certificate: PemSource,
    /// Path of the issuing CA's private key, or a `pkcs11:` URI of a key in a token.
    pub key: PathBuf,
}

/// An issuing CA without files: enrolled over EST from `enroll` (an `[upstreams.X]`) with
/// that upstream's RA credential, renewed at two thirds of its life, kept under the data
/// directory (next to the journal).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnrolledIssuerConfig {
    /// The upstream that grants the CA.
    pub enroll: String,
    /// The label to ask it under (default: its unlabeled path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The CA's CN, as the upper layer's `sub_ca.common_names` allows it.
    pub common_name: String,
    /// The pathlen asked for: 0 signs end entities only, 1 also IoT Edge's Edge CAs below.
    #[serde(default)]
    pub path_len: u8,
    /// The hierarchy root the granted CA must chain to.
    pub root: PemSource,
    /// Reserved for a `pkcs11:` token to generate keys in (refused for now): keys are made
    /// in a 0600 file under the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The longest pause between attempts after a failed enrollment (doubling from 1 s).
    #[serde(default = "default_retry_max_secs")]
    pub retry_max_secs: u64,
}

fn default_retry_max_secs() -> u64 {
    300
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileKind {
    EndEntity,
    Ca,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    pub kind: ProfileKind,
    /// Lifetime of issued certificates; always capped at the issuer's notAfter.
    pub validity_days: u32,
    /// Seconds instead of days (tests and demos of renewal and rollover); wins over
    /// `validity_days`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_secs: Option<u64>,
    /// For CA profiles: the path length constraint (IoT Edge's Edge CA needs 0).
    #[serde(default)]
    pub path_len: Option<u8>,
    /// Extended key usages of end-entity certificates: `clientAuth`, `serverAuth`,
    /// `codeSigning`, `emailProtection`, `timeStamping`, `ocspSigning`, `cmcRA`.
    #[serde(default)]
    pub extended_key_usage: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Sign locally with the label's issuer.
    #[default]
    Sign,
    /// Forward to the label's upstream, as a registration authority.
    Forward,
    /// Forward; sign locally with the label's issuer while the upstream cannot be reached.
    Auto,
}

/// The EST server of the layer above, and how this layer authenticates to it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL up to and including `/.well-known/est` (a label may follow).
    pub url: String,
    /// CA certificates that may issue the upstream's TLS certificate (PEM). The host name of
    /// `url` is checked against that certificate.
    pub trust: Vec<PemSource>,
    /// This layer's own client certificate chain (its RA credential), and its key's path.
    #[serde(default)]
    pub certificate: Option<PemSource>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Basic credentials for the upstream: the user, and a file holding the password.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Deadline of a whole forwarded request (IoT Edge gives each attempt 30 s).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// How long a `/cacerts` answer is served from cache before asking again.
    #[serde(default = "default_cacerts_ttl")]
    pub cacerts_ttl_secs: u64,
    /// How long past its TTL a cached `/cacerts` answer may serve while the upstream is away.
    #[serde(default = "default_cacerts_stale")]
    pub cacerts_stale_secs: u64,
    /// `Retry-After` sent to children while the upstream is away.
    #[serde(default = "default_retry_after")]
    pub retry_after_secs: u64,
    /// Longest pause between two background probes of an upstream that is away or
    /// misconfigured (the pauses start at half a second and double).
    #[serde(default = "default_probe_max")]
    pub probe_max_secs: u64,
}

fn default_connect_timeout() -> u64 {
    3
}
fn default_request_timeout() -> u64 {
    20
}
fn default_cacerts_ttl() -> u64 {
    300
}
fn default_cacerts_stale() -> u64 {
    86_400
}
fn default_retry_after() -> u64 {
    30
}
fn default_probe_max() -> u64 {
    5
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelConfig {
    /// The label's path segment; absent for the unlabeled `/.well-known/est/<operation>`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// Name of the issuer (in `issuers`) that signs for this label (modes `sign` and `auto`).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Name of the upstream (in `upstreams`) this label forwards to (modes `forward`, `auto`).
    #[serde(default)]
    pub upstream: Option<String>,
    /// The label to use upstream; by default the upstream URL's own (none).
    #[serde(default)]
    pub upstream_label: Option<String>,
    #[serde(default)]
    pub authentication: AuthConfig,
    /// Names of trust sets (in `trust`, or `issuer`) whose certificates authenticate clients.
    #[serde(default = "default_client_trust")]
    pub client_trust: Vec<String>,
    /// Profile for end-entity requests.
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Profile for requests that ask for a CA certificate (basicConstraints CA:TRUE).
    #[serde(default = "default_ca_profile")]
    pub ca_profile: String,
    /// Who may obtain what. A request is granted when one rule that matches the identity
    /// allows every name in it.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Identities refused whatever the rules say: `user:NAME`, `cn:NAME` or `serial:HEX`.
    #[serde(default)]
    pub deny: Vec<String>,
    /// What `/csrattrs` asks for: OIDs or attributes (see `est::csrattrs`); empty → 204.
    #[serde(default)]
    pub csr_attributes: Vec<String>,
    /// Whether `/serverkeygen` is offered, and which key it makes.
    #[serde(default)]
    pub serverkeygen: ServerKeygen,
    /// Grace window for expired client certificates: one that expired less than this long
    /// ago still authenticates, but only to renew its own subject and subjectAltNames. Every
    /// such renewal is logged as a warning and journaled as a grace renewal. 0 (default): off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub grace_expired_secs: u64,
    /// Other labels whose issuance counts as `issuer` here (`"(unlabeled)"` for the
    /// unlabeled path). By default `issuer` means certificates this label issued, nothing else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issuer_labels: Vec<String>,
    /// Mode `auto` only, and required there: what this label may sign locally while the
    /// layer above is away, on top of its rules. Never more than the layer above allows this
    /// layer's registration authority: copy the upper layer's RA rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackConfig>,
}

/// How `issuer_labels` names the unlabeled path.
pub const UNLABELED: &str = "(unlabeled)";

/// The label an `issuer_labels` entry names, as the journal records it (`None`: unlabeled).
pub fn issuer_label_key(name: &str) -> Option<String> {
    (name != UNLABELED).then(|| name.to_owned())
}

/// The names an `auto` label may issue locally (fixed patterns, `*` for any run of
/// characters; no placeholders): the bound the upper layer's RA rule sets.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    #[serde(default)]
    pub common_names: Vec<String>,
    /// Common names of CA certificates; empty: no CA certificates while the upstream is away.
    #[serde(default)]
    pub ca_common_names: Vec<String>,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub ip_addresses: Vec<String>,
    #[serde(default)]
    pub uris: Vec<String>,
    #[serde(default)]
    pub emails: Vec<String>,
    #[serde(default)]
    pub subject_attributes: BTreeMap<String, Vec<String>>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub fn default_client_trust() -> Vec<String> {
    vec!["issuer".to_owned()]
}
fn default_profile() -> String {
    "identity".to_owned()
}
fn default_ca_profile() -> String {
    "edge-ca".to_owned()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// TLS client certificates authenticate.
    pub certificate: bool,
    /// HTTP Basic authenticates.
    pub basic: bool,
    /// Both a certificate and a password are required.
    pub require_both: bool,
    /// `/cacerts` and `/csrattrs` are answered without authentication (RFC 7030 4.1.1).
    pub anonymous_cacerts: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            certificate: true,
            basic: true,
            require_both: false,
            anonymous_cacerts: true,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKeygen {
    #[default]
    Off,
    EcP256,
    EcP384,
    /// `rsa2048`; `rsa-2048` is read too.
    #[serde(alias = "rsa-2048")]
    Rsa2048,
}

/// One grant: which identities (`match`) may obtain which names.
///
/// Patterns: `*` matches any run of characters except an asterisk; `{*}` is a literal asterisk
/// (a wildcard DNS name: `{*}.plant.local`); `{cn}` is the client certificate's common name and
/// `{user}` the Basic user name (a pattern naming one the identity lacks never matches).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// `user:NAME`, `user:*`, `certificate:TRUSTSET`, `certificate:*` (optionally narrowed by
    /// `client_cn`), or `module:DEVICE/MODULE`: the IoT Edge module MODULE of device DEVICE, by
    /// its certificate from that device's Edge CA (see `auth::ra`).
    #[serde(rename = "match")]
    pub matches: Vec<String>,
    /// For `module:` matches: the trust set whose CAs issued the device's Edge CA directly
    /// (default `issuer`: this label's issuance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_ca_issuer: Option<String>,
    /// Patterns the client certificate's CN must match for the rule to apply.
    #[serde(default)]
    pub client_cn: Vec<String>,
    /// Common names an end-entity certificate may carry.
    #[serde(default)]
    pub common_names: Vec<String>,
    /// Common names a CA certificate may carry; empty → no CA certificates.
    #[serde(default)]
    pub ca_common_names: Vec<String>,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub ip_addresses: Vec<String>,
    #[serde(default)]
    pub uris: Vec<String>,
    #[serde(default)]
    pub emails: Vec<String>,
    /// Other subject attributes allowed, by short name (`O`, `OU`, `C`, `L`, `ST`, `DC`, ...),
    /// each with its value patterns. Any attribute not listed here (or CN) is refused.
    #[serde(default)]
    pub subject_attributes: BTreeMap<String, Vec<String>>,
    /// The identities this rule matches are registration authorities: lower layers that
    /// forward a whole subtree's requests under one identity. They are exempt from
    /// `limits.rate_per_identity` (each child is limited where it enrolls).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub registration_authority: bool,
    /// A delegated intermediate for the lower layer this rule names (`module:` matches only):
    /// a CA CSR whose CN matches `sub_ca.common_names` gets a CA within these bounds, name
    /// constrained to the rule's `dns_names` (see `policy::SubCa`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_ca: Option<SubCaConfig>,
}

/// The bounds of a lower layer's own issuing CA (a rule's `sub_ca`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubCaConfig {
    /// Common names the CA may carry.
    pub common_names: Vec<String>,
    /// The largest pathlen granted (also below the issuer's own).
    #[serde(default)]
    pub max_path_len: u8,
    /// The longest validity granted (also capped at the issuer's notAfter).
    #[serde(default = "default_sub_ca_days")]
    pub max_validity_days: u32,
    /// Seconds instead of days (tests and demos of renewal); wins over `max_validity_days`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_validity_secs: Option<u64>,
    /// A permitted directoryName subtree (`O=Contoso,OU=Line 3`): every certificate below the
    /// CA must have a subject starting with these RDNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory_name: Option<String>,
}

fn default_sub_ca_days() -> u32 {
    30
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file named on the command line (the configuration itself, a development setup's).
    #[error("cannot read {0}: {1}")]
    Io(PathBuf, String),
    /// A path field of the configuration that could not be read; `shown` is what
    /// [`shown_path`] lets through of its value.
    #[error("{field}: cannot read {shown}: {reason}")]
    Unreadable {
        field: String,
        shown: String,
        reason: String,
    },
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, String),
    #[error("cannot parse {0}: {1}")]
    Parse(PathBuf, String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// What a failed write says: the system's reason, and on a permission error who the process
/// runs as (a container's data volume must be writable by the image's user).
pub fn write_error_text(e: &std::io::Error) -> String {
    #[cfg(unix)]
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        return format!(
            "{e} (this process runs as uid {uid}, gid {gid}: the directory must be writable by it)"
        );
    }
    e.to_string()
}

impl ConfigError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Reads the file a path field names (relative to `base`); errors name `field`.
pub fn read_path(base: &Path, value: &Path, field: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(base.join(value)).map_err(|e| ConfigError::Unreadable {
        field: field.to_owned(),
        shown: shown_path(base, value),
        reason: e.to_string(),
    })
}

/// How an error shows the value of a path field. A key, password or token pasted into a path
/// field by mistake must not end up in logs or in the module twin's `lastRejection`: a value
/// that names an existing file is shown whole (it is a path, not a secret); otherwise only its
/// longest leading part that is an existing directory, and how long the rest is.
pub fn shown_path(base: &Path, value: &Path) -> String {
    let full = base.join(value);
    if full.symlink_metadata().is_ok() {
        return full.display().to_string();
    }
    let rest = value.as_os_str().len();
    match full.ancestors().skip(1).find(|a| a.is_dir()) {
        Some(dir) if !dir.as_os_str().is_empty() => {
            let dir = dir.display().to_string();
            let sep = if dir.ends_with('/') { "" } else { "/" };
            format!("{dir}{sep}... (a value of {rest} characters, not shown: it names no file)")
        }
        _ => format!("a value of {rest} characters (not shown: it names no file)"),
    }
}

impl Config {
    /// Reads a TOML (`.toml`) or JSON (anything else) configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Io(path.to_owned(), e.to_string()))?;
        let is_toml = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        if is_toml {
            toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e.to_string()))
        } else {
            serde_json::from_str(&text)
                .map_err(|e| ConfigError::Parse(path.to_owned(), e.to_string()))
        }
    }

    /// Checks for secrets that must never travel in a configuration document (the module
    /// twin is readable by anyone with IoT Hub read access): private keys and plaintext
    /// passwords. Runs before anything is loaded.
    pub fn check_no_secrets(&self) -> Result<(), ConfigError> {
        for (user, hash) in &self.users {
            if !hash.starts_with("$argon2") {
                return Err(ConfigError::invalid(
                    format!("users.{user}"),
                    "must be an argon2 PHC hash (make one with `edge-est hash-password`), \
                     never a plaintext password",
                ));
            }
        }
        let text = serde_json::to_string(self)
            .unwrap_or_default()
            .to_ascii_lowercase();
        if text.contains("private key-----") {
            return Err(ConfigError::invalid(
                "configuration",
                "contains a private key; private keys are given as file paths only",
            ));
        }
        Ok(())
    }
}
