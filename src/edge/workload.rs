//! Client of IoT Edge's workload API on its unix socket: `sign` (the SAS HMAC),
//! `trust-bundle`, `certificate/server` and `certificate/identity`. HTTP/1.1 over a
//! `UnixStream`, one connection per call, `api-version` on every call, JSON bodies with
//! `Content-Type: application/json`, errors as `{"message": ...}`.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::json;

/// The api-version sent on every call (what Microsoft's Rust clients use; every workload
/// route accepts 2018-06-28 and later).
pub const API_VERSION: &str = "2019-01-30";

/// A path segment: everything but RFC 3986 unreserved characters is encoded (`$` → `%24`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Largest answer read (a certificate chain and an RSA key are a few KB).
const MAX_ANSWER: usize = 256 * 1024;
/// Deadline of one call (the daemon generates an RSA key for server certificates).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Pauses before retrying a call that failed at the connection level or with a 5xx (the
/// workload socket drops connections past 10 concurrent requests, without an answer).
const RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1600),
];

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("workload API at {0} cannot be reached: {1}")]
    Unreachable(String, String),
    #[error("workload API answered {status} to {what}: {message}")]
    Status {
        what: &'static str,
        status: StatusCode,
        message: String,
    },
    #[error("workload API answer to {what} is malformed: {reason}")]
    Malformed { what: &'static str, reason: String },
}

impl WorkloadError {
    fn retryable(&self) -> bool {
        match self {
            WorkloadError::Unreachable(..) => true,
            WorkloadError::Status { status, .. } => status.is_server_error(),
            WorkloadError::Malformed { .. } => false,
        }
    }
}

/// A certificate the workload API issued, with its private key (PKCS#8 PEM). Never logged.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// The leaf followed by the Edge CA chain (PEM).
    pub certificate_pem: String,
    pub private_key_pem: String,
    /// RFC 3339, as the daemon says it.
    pub expiration: String,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct CertificateResponse {
    #[serde(rename = "privateKey")]
    private_key: PrivateKey,
    certificate: String,
    #[serde(default)]
    expiration: String,
}

#[derive(Deserialize)]
struct PrivateKey {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    bytes: Option<String>,
}

#[derive(Clone, Debug)]
pub struct WorkloadClient {
    socket: PathBuf,
    module_id: String,
    generation_id: String,
}

impl WorkloadClient {
    pub fn new(socket: PathBuf, module_id: &str, generation_id: &str) -> WorkloadClient {
        WorkloadClient {
            socket,
            module_id: module_id.to_owned(),
            generation_id: generation_id.to_owned(),
        }
    }

    fn module_path(&self, tail: &str) -> String {
        format!(
            "/modules/{}/genid/{}/{tail}",
            utf8_percent_encode(&self.module_id, SEGMENT),
            utf8_percent_encode(&self.generation_id, SEGMENT)
        )
    }

    /// HMAC-SHA256 of `data` with the module's identity key.
    pub async fn sign(&self, data: &[u8]) -> Result<Vec<u8>, WorkloadError> {
        const WHAT: &str = "sign";
        let body = json!({
            "keyId": "primary",
            "algo": "HMACSHA256",
            "data": base64::engine::general_purpose::STANDARD.encode(data),
        });
        let answer = self
            .call(WHAT, Method::POST, &self.module_path("sign"), Some(body))
            .await?;
        #[derive(Deserialize)]
        struct Digest {
            digest: String,
        }
        let digest: Digest = parse(WHAT, &answer)?;
        base64::engine::general_purpose::STANDARD
            .decode(digest.digest.trim())
            .map_err(|e| WorkloadError::Malformed {
                what: WHAT,
                reason: format!("digest is not base64: {e}"),
            })
    }

    /// The trust bundle: concatenated PEM certificates (the Edge CA and `trust_bundle_cert`).
    pub async fn trust_bundle(&self) -> Result<String, WorkloadError> {
        const WHAT: &str = "trust-bundle";
        let answer = self.call(WHAT, Method::GET, "/trust-bundle", None).await?;
        #[derive(Deserialize)]
        struct Bundle {
            certificate: String,
        }
        let bundle: Bundle = parse(WHAT, &answer)?;
        if !bundle.certificate.contains("-----BEGIN CERTIFICATE-----") {
            return Err(WorkloadError::Malformed {
                what: WHAT,
                reason: "holds no PEM certificate".into(),
            });
        }
        Ok(bundle.certificate)
    }

    /// A TLS server certificate for `common_name` (the daemon ignores `expiration`; older
    /// daemons read it, so it is sent).
    pub async fn server_certificate(
        &self,
        common_name: &str,
        expiration: time::OffsetDateTime,
    ) -> Result<IssuedCertificate, WorkloadError> {
        const WHAT: &str = "certificate/server";
        let expiration = expiration
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let body = json!({ "commonName": common_name, "expiration": expiration });
        let answer = self
            .call(
                WHAT,
                Method::POST,
                &self.module_path("certificate/server"),
                Some(body),
            )
            .await?;
        certificate(WHAT, &answer)
    }

    /// The module's identity (client) certificate, CN = the module id.
    pub async fn identity_certificate(&self) -> Result<IssuedCertificate, WorkloadError> {
        const WHAT: &str = "certificate/identity";
        let path = format!(
            "/modules/{}/certificate/identity",
            utf8_percent_encode(&self.module_id, SEGMENT)
        );
        let answer = self
            .call(WHAT, Method::POST, &path, Some(json!({})))
            .await?;
        certificate(WHAT, &answer)
    }

    async fn call(
        &self,
        what: &'static str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, WorkloadError> {
        let uri = format!("{path}?api-version={API_VERSION}");
        let body = body.map(|b| Bytes::from(b.to_string()));
        let mut attempt = 0;
        loop {
            let result = tokio::time::timeout(
                CALL_TIMEOUT,
                self.call_once(what, &method, &uri, body.clone()),
            )
            .await
            .unwrap_or_else(|_| {
                Err(WorkloadError::Unreachable(
                    self.socket.display().to_string(),
                    format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
                ))
            });
            match result {
                Err(e) if e.retryable() && attempt < RETRIES.len() => {
                    tracing::debug!(what, error = %e, "workload API call failed, retrying");
                    tokio::time::sleep(RETRIES[attempt]).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn call_once(
        &self,
        what: &'static str,
        method: &Method,
        uri: &str,
        body: Option<Bytes>,
    ) -> Result<Bytes, WorkloadError> {
        let unreachable = |e: &dyn std::fmt::Display| {
            WorkloadError::Unreachable(self.socket.display().to_string(), e.to_string())
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(HOST, "localhost");
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| unreachable(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        if !status.is_success() {
            #[derive(Deserialize)]
            struct Message {
                message: String,
            }
            let message = serde_json::from_slice::<Message>(&bytes)
                .map(|m| m.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(300).collect());
            return Err(WorkloadError::Status {
                what,
                status,
                message,
            });
        }
        Ok(bytes)
    }
}

fn parse<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    body: &[u8],
) -> Result<T, WorkloadError> {
    serde_json::from_slice(body).map_err(|e| WorkloadError::Malformed {
        what,
        reason: e.to_string(),
    })
}

fn certificate(what: &'static str, body: &[u8]) -> Result<IssuedCertificate, WorkloadError> {
    let answer: CertificateResponse = parse(what, body)?;
    let key = match (answer.private_key.kind.as_str(), answer.private_key.bytes) {
        ("key", Some(bytes)) if bytes.contains("PRIVATE KEY-----") => bytes,
        (kind, _) => {
            return Err(WorkloadError::Malformed {
                what,
                reason: format!("private key of type {kind:?} without PEM bytes (keys held in an HSM are not supported)"),
            })
        }
    };
    if !answer.certificate.contains("-----BEGIN CERTIFICATE-----") {
        return Err(WorkloadError::Malformed {
            what,
            reason: "holds no PEM certificate".into(),
        });
    }
    Ok(IssuedCertificate {
        certificate_pem: answer.certificate,
        private_key_pem: key,
        expiration: answer.expiration,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_are_percent_encoded() {
        let client = WorkloadClient::new(PathBuf::from("/x"), "$edgeHub", "gen/1");
        assert_eq!(
            client.module_path("sign"),
            "/modules/%24edgeHub/genid/gen%2F1/sign"
        );
    }

    #[test]
    fn certificate_answers_are_checked() {
        let good = br#"{"privateKey":{"type":"key","bytes":"-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n"},"certificate":"-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n","expiration":"2026-11-05T10:00:00+00:00"}"#;
        let cert = certificate("t", good).unwrap();
        assert_eq!(cert.expiration, "2026-11-05T10:00:00+00:00");
        assert!(!format!("{cert:?}").contains("PRIVATE"));
        let reference = br#"{"privateKey":{"type":"ref","ref":"k"},"certificate":"-----BEGIN CERTIFICATE-----\n","expiration":""}"#;
        assert!(certificate("t", reference).is_err());
    }
}
