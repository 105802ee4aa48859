//! The environment IoT Edge gives a module container (edgeAgent's `GetEnvVars`), plus the few
//! `EDGE_EST_*` settings of our own.

use std::path::PathBuf;

/// The variable whose presence makes `edge-est serve` (without `--config`) run as a module.
pub const WORKLOAD_URI: &str = "IOTEDGE_WORKLOADURI";

/// Variables the module needs (the C# SDK's list, plus the gateway host name: the module
/// serves children under that name and reaches edgeHub by it).
pub const REQUIRED: [&str; 7] = [
    WORKLOAD_URI,
    "IOTEDGE_DEVICEID",
    "IOTEDGE_MODULEID",
    "IOTEDGE_IOTHUBHOSTNAME",
    "IOTEDGE_AUTHSCHEME",
    "IOTEDGE_MODULEGENERATIONID",
    "IOTEDGE_GATEWAYHOSTNAME",
];

/// MQTT port of edgeHub; `EDGE_EST_MQTT_PORT` overrides it (tests, port-mapped setups).
pub const DEFAULT_MQTT_PORT: u16 = 8883;
pub const DEFAULT_DATA_DIR: &str = "/data";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeEnv {
    pub workload_uri: String,
    pub device_id: String,
    pub module_id: String,
    pub generation_id: String,
    pub iothub_hostname: String,
    /// The local device's host name: edgeHub's name, and the name children use as
    /// `parent_hostname` (so the common name of our TLS server certificate).
    pub gateway_hostname: String,
    /// The parent gateway of a nested device, if any.
    pub parent_hostname: Option<String>,
    pub mqtt_port: u16,
    /// The parent's EST port for the default upstream (`EDGE_EST_PARENT_PORT`, default 8085).
    pub parent_port: u16,
    /// Where the journal and the last-known-good configuration live (`EDGE_EST_DATA_DIR`,
    /// default `/data`); relative paths of the twin's configuration resolve against it.
    pub data_dir: PathBuf,
    /// Where the workload API's certificates and keys are written (`EDGE_EST_RUNTIME_DIR`,
    /// default `<data dir>/workload`).
    pub runtime_dir: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("{0} is not set: IoT Edge gives it to every module")]
    Missing(&'static str),
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

impl EdgeEnv {
    /// Whether the process looks like an IoT Edge module (the workload URI is set).
    pub fn present(get: impl Fn(&str) -> Option<String>) -> bool {
        get(WORKLOAD_URI).is_some_and(|v| !v.is_empty())
    }

    /// Reads the process environment.
    pub fn from_process() -> Result<EdgeEnv, EnvError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `get` (tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<EdgeEnv, EnvError> {
        let required = |name: &'static str| -> Result<String, EnvError> {
            get(name)
                .filter(|v| !v.trim().is_empty())
                .ok_or(EnvError::Missing(name))
        };
        for name in REQUIRED {
            required(name)?;
        }
        let scheme = required("IOTEDGE_AUTHSCHEME")?;
        if !scheme.eq_ignore_ascii_case("sasToken") {
            return Err(EnvError::Invalid {
                name: "IOTEDGE_AUTHSCHEME",
                reason: format!("{scheme:?} is not supported (only sasToken)"),
            });
        }
        let workload_uri = required(WORKLOAD_URI)?;
        socket_path(&workload_uri)?;
        let mqtt_port = match get("EDGE_EST_MQTT_PORT").filter(|v| !v.is_empty()) {
            Some(port) => port.parse().map_err(|_| EnvError::Invalid {
                name: "EDGE_EST_MQTT_PORT",
                reason: format!("{port:?} is not a port number"),
            })?,
            None => DEFAULT_MQTT_PORT,
        };
        let parent_port = match get("EDGE_EST_PARENT_PORT").filter(|v| !v.is_empty()) {
            Some(port) => port.parse().map_err(|_| EnvError::Invalid {
                name: "EDGE_EST_PARENT_PORT",
                reason: format!("{port:?} is not a port number"),
            })?,
            None => crate::edge::desired::DEFAULT_PARENT_PORT,
        };
        let data_dir = get("EDGE_EST_DATA_DIR")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), PathBuf::from);
        let runtime_dir = get("EDGE_EST_RUNTIME_DIR")
            .filter(|v| !v.is_empty())
            .map_or_else(|| data_dir.join("workload"), PathBuf::from);
        Ok(EdgeEnv {
            workload_uri,
            device_id: required("IOTEDGE_DEVICEID")?,
            module_id: required("IOTEDGE_MODULEID")?,
            generation_id: required("IOTEDGE_MODULEGENERATIONID")?,
            iothub_hostname: required("IOTEDGE_IOTHUBHOSTNAME")?,
            gateway_hostname: required("IOTEDGE_GATEWAYHOSTNAME")?,
            parent_hostname: get("IOTEDGE_PARENTHOSTNAME").filter(|v| !v.trim().is_empty()),
            mqtt_port,
            parent_port,
            data_dir,
            runtime_dir,
        })
    }

    /// The workload API's unix socket.
    pub fn workload_socket(&self) -> PathBuf {
        socket_path(&self.workload_uri).unwrap_or_default()
    }
}

/// `unix:///var/run/iotedge/workload.sock` → `/var/run/iotedge/workload.sock`.
fn socket_path(uri: &str) -> Result<PathBuf, EnvError> {
    match uri.strip_prefix("unix://") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(EnvError::Invalid {
            name: WORKLOAD_URI,
            reason: format!("{uri:?} is not a unix:///path URI"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            (
                "IOTEDGE_WORKLOADURI",
                "unix:///var/run/iotedge/workload.sock",
            ),
            ("IOTEDGE_DEVICEID", "gw1"),
            ("IOTEDGE_MODULEID", "estproxy"),
            ("IOTEDGE_IOTHUBHOSTNAME", "myhub.azure-devices.net"),
            ("IOTEDGE_AUTHSCHEME", "sasToken"),
            ("IOTEDGE_MODULEGENERATIONID", "638000000000000000"),
            ("IOTEDGE_GATEWAYHOSTNAME", "gw1.contoso.local"),
        ])
    }

    fn read(map: &HashMap<&'static str, &'static str>) -> Result<EdgeEnv, EnvError> {
        EdgeEnv::from_vars(|k| map.get(k).map(|v| v.to_string()))
    }

    #[test]
    fn reads_the_module_environment() {
        let env = read(&vars()).unwrap();
        assert_eq!(
            env.workload_socket(),
            PathBuf::from("/var/run/iotedge/workload.sock")
        );
        assert_eq!(env.mqtt_port, 8883);
        assert_eq!(env.data_dir, PathBuf::from("/data"));
        assert_eq!(env.runtime_dir, PathBuf::from("/data/workload"));
        assert_eq!(env.parent_hostname, None);
    }

    #[test]
    fn refuses_missing_or_unsupported_values() {
        let mut map = vars();
        map.remove("IOTEDGE_MODULEGENERATIONID");
        assert_eq!(
            read(&map),
            Err(EnvError::Missing("IOTEDGE_MODULEGENERATIONID"))
        );
        let mut map = vars();
        map.insert("IOTEDGE_AUTHSCHEME", "x509");
        assert!(read(&map).is_err());
        let mut map = vars();
        map.insert("IOTEDGE_WORKLOADURI", "http://localhost:15580");
        assert!(read(&map).is_err());
        let mut map = vars();
        map.insert("IOTEDGE_PARENTHOSTNAME", "parent.contoso.local");
        map.insert("EDGE_EST_MQTT_PORT", "18883");
        let env = read(&map).unwrap();
        assert_eq!(env.parent_hostname.as_deref(), Some("parent.contoso.local"));
        assert_eq!(env.mqtt_port, 18883);
        assert!(EdgeEnv::present(|k| map.get(k).map(|v| v.to_string())));
    }
}
