//! A stand-in for IoT Edge's workload API on a real unix socket (hyper): `sign`,
//! `trust-bundle`, `certificate/server` and `certificate/identity`, with the documented JSON
//! shapes, the `api-version` check (400 without it) and the body rule (a POST without
//! `Content-Type: application/json` loses its body). It records every request.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::pki::TestCa;

/// api-version values the real daemon accepts.
pub const API_VERSIONS: [&str; 7] = [
    "2018-06-28",
    "2019-01-30",
    "2019-10-22",
    "2019-11-05",
    "2020-07-07",
    "2021-12-07",
    "2022-08-03",
];

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub status: u16,
}

pub struct State {
    pub module_id: String,
    /// The module identity key the HMACs are made with.
    pub key: Vec<u8>,
    pub edge_ca: TestCa,
    /// Edge CA, then the root (`trust_bundle_cert`).
    pub trust_bundle: String,
    /// Lifetime of the server certificates handed out.
    pub server_lifetime: Mutex<Duration>,
    pub requests: Mutex<Vec<Recorded>>,
}

pub struct WorkloadStandIn {
    pub socket: PathBuf,
    pub state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
}

impl WorkloadStandIn {
    /// Listens on `dir/workload.sock`. The Edge CA is a CA under `root` (whose PEM is
    /// `root_pem`), as on a device whose Edge CA came from the hierarchy.
    pub async fn start(dir: &Path, module_id: &str, root: &TestCa) -> WorkloadStandIn {
        let (edge_ca, _) = root.sub_ca(
            "edge-est test Edge CA gw1",
            Some(0),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        let trust_bundle = format!("{}{}", edge_ca.cert_pem, root.cert_pem);
        let key: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        let state = Arc::new(State {
            module_id: module_id.to_owned(),
            key,
            edge_ca,
            trust_bundle,
            server_lifetime: Mutex::new(Duration::from_secs(30 * 86_400)),
            requests: Mutex::new(Vec::new()),
        });
        let socket = dir.join("workload.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind the workload socket");
        let (stop, mut stopped) = oneshot::channel::<()>();
        let served = state.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    _ = &mut stopped => return,
                };
                let state = served.clone();
                tokio::spawn(async move {
                    let handler = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&state, request).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), handler)
                        .await;
                });
            }
        });
        WorkloadStandIn {
            socket,
            state,
            stop: Some(stop),
        }
    }

    pub fn uri(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn set_server_lifetime(&self, lifetime: Duration) {
        *self.state.server_lifetime.lock().unwrap() = lifetime;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// A server certificate for `host` from the Edge CA (for the broker): chain PEM, key PEM.
    pub fn issue_server(&self, host: &str, lifetime: Duration) -> (String, String) {
        issue(
            &self.state.edge_ca,
            host,
            &[],
            lifetime,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// HMAC-SHA256 with the module key, as `sign` computes it.
    pub fn hmac(&self, data: &[u8]) -> Vec<u8> {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.state.key);
        aws_lc_rs::hmac::sign(&key, data).as_ref().to_vec()
    }
}

impl Drop for WorkloadStandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn issue(
    ca: &TestCa,
    common_name: &str,
    extra_dns: &[&str],
    lifetime: Duration,
    eku: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let mut sans = vec![match common_name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(common_name.try_into().unwrap()),
    }];
    for dns in extra_dns {
        sans.push(SanType::DnsName((*dns).try_into().unwrap()));
    }
    if eku == ExtendedKeyUsagePurpose::ServerAuth {
        params.subject_alt_names = sans;
    }
    params.extended_key_usages = vec![eku];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + lifetime;
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (
        format!("{}{}", cert.pem(), ca.cert_pem),
        key.serialize_pem(),
    )
}

fn answer(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn message(status: u16, text: &str) -> Response<Full<Bytes>> {
    answer(status, json!({ "message": text }))
}

async fn handle(state: &State, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let response = route(
        state,
        &method,
        &path,
        query.as_deref(),
        content_type.as_deref(),
        &body,
    );
    state.requests.lock().unwrap().push(Recorded {
        method,
        path,
        query,
        content_type,
        body,
        status: response.status().as_u16(),
    });
    response
}

fn route(
    state: &State,
    method: &str,
    path: &str,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let version = query.and_then(|q| {
        q.split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == "api-version")
            .map(|(_, v)| v.to_owned())
    });
    match version {
        None => return message(400, "api-version not specified"),
        Some(v) if !API_VERSIONS.contains(&v.as_str()) => {
            return message(400, &format!("invalid api-version {v:?}"))
        }
        Some(_) => {}
    }
    // The real server drops the body of a POST that is not application/json.
    let json_body: Option<Value> = (content_type == Some("application/json"))
        .then(|| serde_json::from_slice(body).ok())
        .flatten();
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let own = |name: &str| name.trim_start_matches('$') == state.module_id;
    match (method, segments.as_slice()) {
        ("GET", ["trust-bundle"]) => answer(200, json!({ "certificate": state.trust_bundle })),
        ("POST", ["modules", name, "genid", _, "sign"]) if own(name) => {
            let Some(body) = json_body else {
                return message(400, "missing parameter: request body");
            };
            let Some(data) = body
                .get("data")
                .and_then(Value::as_str)
                .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
            else {
                return message(400, "invalid parameter: data");
            };
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &state.key);
            let digest = aws_lc_rs::hmac::sign(&key, &data);
            answer(
                200,
                json!({ "digest": base64::engine::general_purpose::STANDARD.encode(digest.as_ref()) }),
            )
        }
        ("POST", ["modules", name, "genid", _, "certificate", "server"]) if own(name) => {
            let Some(cn) = json_body
                .as_ref()
                .and_then(|b| b.get("commonName"))
                .and_then(Value::as_str)
            else {
                return message(400, "missing request body");
            };
            let lifetime = *state.server_lifetime.lock().unwrap();
            let (chain, key) = issue(
                &state.edge_ca,
                cn,
                &[&state.module_id],
                lifetime,
                ExtendedKeyUsagePurpose::ServerAuth,
            );
            certificate_answer(chain, key, lifetime)
        }
        ("POST", ["modules", name, "certificate", "identity"]) if own(name) => {
            let lifetime = Duration::from_secs(30 * 86_400);
            let (chain, key) = issue(
                &state.edge_ca,
                &state.module_id,
                &[],
                lifetime,
                ExtendedKeyUsagePurpose::ClientAuth,
            );
            certificate_answer(chain, key, lifetime)
        }
        ("POST", ["modules", _, ..]) => message(403, "module not found or not the caller"),
        _ => message(404, "not found"),
    }
}

fn certificate_answer(chain: String, key: String, lifetime: Duration) -> Response<Full<Bytes>> {
    let expiration = (OffsetDateTime::now_utc() + lifetime)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    answer(
        201,
        json!({
            "privateKey": { "type": "key", "bytes": key },
            "certificate": chain,
            "expiration": expiration,
        }),
    )
}

/// One raw request to the stand-in (for checking the stand-in itself): status and body.
pub async fn raw_request(socket: &Path, method: &str, uri: &str) -> (u16, String) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
