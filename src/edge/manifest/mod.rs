//! `edge-est check-manifest`: validates an IoT Hub deployment manifest (or an iotedgedev
//! `deployment.template.json`) before it reaches a gateway.
//!
//! - **Shape**, with the rules edgeAgent and edgeHub apply: `$edgeAgent` (schema 1.0/1.1,
//!   runtime, system modules, modules: `type`, `status`, `restartPolicy`, `imagePullPolicy`,
//!   `startupOrder` only with schema 1.1, `env`, image references), `$edgeHub` (schema, routes,
//!   store and forward), and every module section's `properties.desired`.
//! - **Twin limits** of IoT Hub on every desired section: keys without `.`, `$`, spaces or
//!   control characters and at most 1 KB, depth at most 10, strings at most 4 KB, a section at
//!   most 32 KB (createOptions counted in their deployed, chunked form).
//! - **createOptions**: a string that parses as JSON or an object (template form); the chunks
//!   `createOptions`, `createOptions01`, … contiguous; the whole at most
//!   [`CREATE_OPTIONS_MAX`] characters, the limit of iotedgedev and the VS Code tooling
//!   (8 chunks of 512). edgeAgent itself reads up to 100 chunks, but the tools that turn a
//!   template into a deployment refuse more than 8, so a manifest above that cannot be
//!   produced or round-tripped by them; we enforce the practical limit. Port bindings
//!   (`HostPort` a string, as Docker wants), binds and mounts are checked, and two modules may
//!   not publish the same host port.
//! - **edge-est modules** (see [`is_edge_est`]): their desired properties go through
//!   [`module_config`] with [`ModuleDefaults::placeholder`], the very function the module runs
//!   on every twin change; then what the container needs: a volume on the data directory,
//!   every file the configuration names on a mounted volume, published ports that edge-est
//!   listens on.
//! - **The API proxy**: its `proxy_config` (base64) must decode; a `proxy_pass` to a unix
//!   socket must reach an edge-est module's `proxy_socket` through one volume mounted by both
//!   containers, and by no other module.
//!
//! Every error names the JSON path of the field it is about.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Map, Value};

use crate::config::{Config, ConfigError};
use crate::edge::desired::{module_config, ModuleDefaults};

mod agent;
mod api_proxy;
mod checker;
mod edge_est;
mod hub;
#[cfg(test)]
mod tests;
mod twin;

pub use api_proxy::unix_sockets;
use checker::{desired_of, Binding, Checker, Kind, ModuleInfo, Mount};

/// Characters per `createOptions` chunk (edgeAgent's `TwinValueMaxSize`).
pub const CREATE_OPTIONS_CHUNK: usize = 512;
/// Chunks iotedgedev and the VS Code extension write at most.
pub const CREATE_OPTIONS_MAX_CHUNKS: usize = 8;
/// The largest createOptions enforced: 8 chunks of 512 characters.
pub const CREATE_OPTIONS_MAX: usize = CREATE_OPTIONS_CHUNK * CREATE_OPTIONS_MAX_CHUNKS;
/// Chunks edgeAgent reads at most (`createOptions`, `createOptions01` … `createOptions99`).
pub const EDGE_AGENT_MAX_CHUNKS: usize = 100;
/// IoT Hub's twin limits.
pub const TWIN_MAX_STRING: usize = 4096;
pub const TWIN_MAX_KEY: usize = 1024;
pub const TWIN_MAX_DEPTH: usize = 10;
pub const TWIN_MAX_DESIRED: usize = 32 * 1024;

/// Module names taken as edge-est whatever their image.
pub const EDGE_EST_NAMES: [&str; 3] = ["edge-est", "edgeest", "estproxy"];
/// The image repository (last path component) of edge-est, as `module/module.json` builds it.
pub const EDGE_EST_REPOSITORY: &str = "edge-est";
/// The image repository of the IoT Edge API proxy.
pub const API_PROXY_REPOSITORY: &str = "azureiotedge-api-proxy";
/// Where edge-est keeps its journal and last-known-good configuration (`EDGE_EST_DATA_DIR`).
pub const DEFAULT_DATA_DIR: &str = "/data";
/// The EST path prefix every endpoint serves.
pub const EST_PATH: &str = "/.well-known/est";
/// The host name the parent placeholder uses when the manifest is for a nested device.
const PLACEHOLDER_PARENT: &str = "parent.invalid";

/// Whether the device the manifest is for has a parent (`IOTEDGE_PARENTHOSTNAME`), which
/// gives edge-est its default `upstreams.parent`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Parent {
    /// Nested if any image is pulled through `$upstream` (how lower layers pull).
    #[default]
    Infer,
    Hostname(String),
    None,
}

#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Modules to validate as edge-est whatever their image or name.
    pub modules: Vec<String>,
    pub parent: Parent,
}

/// One finding: the JSON path of the field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// How children reach an EST endpoint of the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// A host port published by the edge-est module itself (TLS by edge-est).
    Direct,
    /// The IoT Edge API proxy module of this name (TLS by nginx, then the unix socket).
    ApiProxy(String),
}

/// An EST endpoint the device serves: `https://<device hostname>:<host_port>/.well-known/est`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host_port: u16,
    /// The edge-est module that answers.
    pub module: String,
    pub via: Via,
    /// The label path segments served (`None`: the unlabeled path).
    pub labels: Vec<Option<String>>,
}

/// An edge-est module of the manifest, with the configuration its twin gives it.
#[derive(Debug)]
pub struct EdgeEstModule {
    pub name: String,
    pub config: Option<Config>,
}

/// The outcome of checking one manifest.
#[derive(Debug, Default)]
pub struct Report {
    /// Every module the manifest runs, system modules first.
    pub modules: Vec<String>,
    pub edge_est: Vec<EdgeEstModule>,
    /// The parent host name edge-est was validated with (`None`: a top-layer device).
    pub parent: Option<String>,
    /// Whether that was inferred from `$upstream` images.
    pub parent_inferred: bool,
    pub endpoints: Vec<Endpoint>,
    pub errors: Vec<ManifestError>,
    /// Findings that do not fail the check (a key on a read-write mount, no edge-est module,
    /// the README's example password).
    pub warnings: Vec<ManifestError>,
    /// A layered deployment (`properties.desired.<path>` sections): checked in parts.
    pub layered: bool,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// One line about what was checked.
    pub fn summary(&self) -> String {
        let layer = match (&self.parent, self.parent_inferred) {
            (None, _) => "top-layer device".to_owned(),
            (Some(_), true) => "nested device (images via $upstream)".to_owned(),
            (Some(p), false) => format!("nested device, parent {p}"),
        };
        let est: Vec<String> = self
            .edge_est
            .iter()
            .map(|m| match &m.config {
                Some(c) => format!("{} ({} label(s))", m.name, c.labels.len()),
                None => m.name.clone(),
            })
            .collect();
        let endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| match &e.via {
                Via::Direct => format!("{} by {}", e.host_port, e.module),
                Via::ApiProxy(p) => format!("{} via {p} to {}", e.host_port, e.module),
            })
            .collect();
        let mut status = if self.is_ok() {
            "ok".to_owned()
        } else {
            format!("{} error(s)", self.errors.len())
        };
        if !self.warnings.is_empty() {
            status.push_str(&format!(", {} warning(s)", self.warnings.len()));
        }
        let layer = if self.layered {
            format!("layered deployment; {layer}")
        } else {
            layer
        };
        format!(
            "{status}: {} module(s); {layer}; edge-est: {}; EST on host port {}",
            self.modules.len(),
            if est.is_empty() {
                "none".to_owned()
            } else {
                est.join(", ")
            },
            if endpoints.is_empty() {
                "none".to_owned()
            } else {
                endpoints.join(", ")
            },
        )
    }
}

/// Reads and checks a manifest file.
pub fn check_file(path: &Path, options: &CheckOptions) -> Report {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => return failed(format!("cannot read {}: {e}", path.display())),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(manifest) => check(&manifest, options),
        Err(e) => failed(format!("not JSON: {e}")),
    }
}

fn failed(message: String) -> Report {
    Report {
        errors: vec![ManifestError {
            path: String::new(),
            message,
        }],
        ..Report::default()
    }
}

/// Checks a parsed manifest.
pub fn check(manifest: &Value, options: &CheckOptions) -> Report {
    let mut checker = Checker::default();
    let report = checker.run(manifest, options);
    Report {
        errors: checker.errors,
        warnings: checker.warnings,
        ..report
    }
}

/// Whether a module is edge-est: its image repository is `edge-est` (`…/edge-est:tag`,
/// `$upstream:443/edge-est:tag`, iotedgedev's `${MODULES.edge-est}` or
/// `${MODULES.edge-est.<platform>}`), or its name is one of [`EDGE_EST_NAMES`].
pub fn is_edge_est(name: &str, image: Option<&str>) -> bool {
    if EDGE_EST_NAMES.iter().any(|n| n.eq_ignore_ascii_case(name)) {
        return true;
    }
    let Some(image) = image.map(str::trim) else {
        return false;
    };
    if let Some(rest) = image.strip_prefix("${MODULES.") {
        let module = rest.trim_end_matches('}');
        return module == EDGE_EST_REPOSITORY
            || module.starts_with(&format!("{EDGE_EST_REPOSITORY}."));
    }
    if let Some(dir) = image
        .strip_prefix("${MODULEDIR<")
        .and_then(|r| r.split('>').next())
    {
        return dir.trim_end_matches('/').rsplit('/').next() == Some(EDGE_EST_REPOSITORY);
    }
    repository_name(image).as_deref() == Some(EDGE_EST_REPOSITORY)
}

/// The last path component of an image's repository (no registry, tag or digest).
fn repository_name(image: &str) -> Option<String> {
    let without_digest = image.split('@').next()?;
    let last = without_digest.rsplit('/').next()?;
    let name = last.split(':').next()?;
    (!name.is_empty()).then(|| name.to_owned())
}
