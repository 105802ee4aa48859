//! A real MQTT broker (mosquitto) with TLS from a test CA, standing in for edgeHub's MQTT
//! side; a twin responder that answers with exactly edgeHub's twin topics and payloads; and a
//! TLS proxy that records each MQTT CONNECT on its way to the broker.

use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// The mosquitto binary. Missing, the broker tests fail unless
/// `EDGE_EST_SKIP_MISSING_TOOLS=1` ([`super::tool`]); `.ci/run` installs it.
pub fn mosquitto() -> Option<PathBuf> {
    super::tool("mosquitto", "mosquitto")
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub const RESPONDER_USER: &str = "twin-responder";
/// The twin responder's (and the method caller's) password at the broker.
pub const RESPONDER_PASSWORD: &str = "responder-secret";
/// The password the SAS gate ([`ConnectCapture`]) puts in a module's CONNECT once it has
/// checked its SAS token: the broker takes nothing else from `module_user`, so a module
/// reaches it only through the gate.
const GATE_PASSWORD: &str = "checked-by-the-sas-gate";

/// A mosquitto process on 127.0.0.1:`port` with TLS and no anonymous access: a
/// `password_file` made at start (`mosquitto_passwd`) knows `RESPONDER_USER` and
/// `module_user` (whose password only the SAS gate sends); only they may use `$iothub/#`
/// (ACL). Killed on drop.
pub struct Mosquitto {
    pub port: u16,
    pub log: PathBuf,
    child: Child,
}

impl Mosquitto {
    pub fn start(
        binary: &Path,
        dir: &Path,
        port: u16,
        cert: &(String, String),
        module_user: &str,
    ) -> Mosquitto {
        let dir = dir.join(format!("mosquitto-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("broker.pem"), &cert.0).unwrap();
        std::fs::write(dir.join("broker.key"), &cert.1).unwrap();
        std::fs::write(
            dir.join("acl"),
            format!(
                "user {RESPONDER_USER}\ntopic readwrite $iothub/#\n\nuser {module_user}\ntopic readwrite $iothub/#\n"
            ),
        )
        .unwrap();
        let passwords = dir.join("passwords");
        let passwd = binary.with_file_name("mosquitto_passwd");
        let passwd = if passwd.exists() {
            passwd
        } else {
            PathBuf::from("/usr/bin/mosquitto_passwd")
        };
        for (i, (user, password)) in [
            (RESPONDER_USER, RESPONDER_PASSWORD),
            (module_user, GATE_PASSWORD),
        ]
        .into_iter()
        .enumerate()
        {
            let mut command = Command::new(&passwd);
            if i == 0 {
                command.arg("-c");
            }
            let out = command
                .arg("-b")
                .arg(&passwords)
                .arg(user)
                .arg(password)
                .output()
                .expect("run mosquitto_passwd (package mosquitto)");
            assert!(out.status.success(), "mosquitto_passwd: {out:?}");
        }
        let log = dir.join("mosquitto.log");
        let conf = dir.join("mosquitto.conf");
        let mut text = format!(
            "per_listener_settings false\n\
             persistence false\n\
             allow_anonymous false\n\
             password_file {passwords}\n\
             acl_file {acl}\n\
             connection_messages true\n\
             log_dest file {log}\n\
             log_type all\n\
             listener {port} 127.0.0.1\n\
             certfile {dir}/broker.pem\n\
             keyfile {dir}/broker.key\n",
            acl = dir.join("acl").display(),
            passwords = passwords.display(),
            log = log.display(),
            dir = dir.display(),
        );
        if is_root() {
            text.push_str("user root\n");
        }
        std::fs::File::create(&conf)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let mut broker = Mosquitto { port, log, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = broker.child.try_wait() {
                panic!("mosquitto exited ({status}): {}", broker.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start: {}",
                broker.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        broker
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn roots(trust_bundle: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(trust_bundle.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

fn client_tls(trust_bundle: &str) -> Arc<rustls::ClientConfig> {
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(trust_bundle))
        .with_no_client_auth(),
    )
}

/// What the twin responder holds and saw.
#[derive(Debug, Default)]
pub struct TwinState {
    /// The desired section, with `$version`.
    pub desired: Value,
    /// The reported section (patches merged in).
    pub reported: Value,
    pub gets: usize,
    pub reported_patches: Vec<Value>,
}

/// Answers `$iothub/twin/GET/?$rid=` with `$iothub/twin/res/200/?$rid=` and the twin, takes
/// reported patches (`$iothub/twin/res/204/?$rid=`), publishes desired patches on
/// `$iothub/twin/PATCH/properties/desired/?$version=N` — edgeHub's topics and payloads.
pub struct TwinResponder {
    pub state: Arc<Mutex<TwinState>>,
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl TwinResponder {
    /// Connects to the broker and waits until it is subscribed. `desired` gets `$version` 1
    /// unless it has one.
    pub async fn start(port: u16, trust_bundle: &str, mut desired: Value) -> TwinResponder {
        if desired.get("$version").is_none() {
            desired["$version"] = json!(1);
        }
        let state = Arc::new(Mutex::new(TwinState {
            desired,
            reported: json!({}),
            ..TwinState::default()
        }));
        let mut options = MqttOptions::new(RESPONDER_USER, "localhost", port);
        options
            .set_credentials(RESPONDER_USER, RESPONDER_PASSWORD)
            .set_max_packet_size(256 * 1024, 256 * 1024)
            .set_transport(Transport::Tls(TlsConfiguration::Rustls(client_tls(
                trust_bundle,
            ))));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client
            .subscribe("$iothub/twin/GET/#", QoS::AtMostOnce)
            .await
            .unwrap();
        client
            .subscribe("$iothub/twin/PATCH/properties/reported/#", QoS::AtMostOnce)
            .await
            .unwrap();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        let responder = client.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut subacks = 0;
            loop {
                let event = match eventloop.poll().await {
                    Ok(event) => event,
                    Err(e) => {
                        eprintln!("twin responder: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                match event {
                    Event::Incoming(Packet::SubAck(ack)) => {
                        assert!(
                            !ack.return_codes
                                .contains(&rumqttc::SubscribeReasonCode::Failure),
                            "the broker refused the responder's subscriptions"
                        );
                        subacks += 1;
                        if subacks == 2 {
                            if let Some(ready) = ready.take() {
                                let _ = ready.send(());
                            }
                        }
                    }
                    Event::Incoming(Packet::Publish(publish)) => {
                        let topic = publish.topic.clone();
                        let rid = topic
                            .split_once("?$rid=")
                            .map(|(_, r)| r.split('&').next().unwrap_or("").to_owned())
                            .unwrap_or_default();
                        if topic.starts_with("$iothub/twin/GET/") {
                            let body = {
                                let mut s = served.lock().unwrap();
                                s.gets += 1;
                                json!({ "desired": s.desired, "reported": s.reported })
                            };
                            let _ = responder
                                .publish(
                                    format!("$iothub/twin/res/200/?$rid={rid}"),
                                    QoS::AtMostOnce,
                                    false,
                                    body.to_string(),
                                )
                                .await;
                        } else if topic.starts_with("$iothub/twin/PATCH/properties/reported/") {
                            let patch: Value =
                                serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
                            let status = if patch.is_object() && publish.payload.len() <= 32 * 1024
                            {
                                let mut s = served.lock().unwrap();
                                let version = s
                                    .reported
                                    .get("$version")
                                    .and_then(Value::as_i64)
                                    .unwrap_or(0);
                                edge_est::edge::desired::merge_patch(&mut s.reported, &patch);
                                s.reported["$version"] = json!(version + 1);
                                s.reported_patches.push(patch);
                                204
                            } else {
                                400
                            };
                            let _ = responder
                                .publish(
                                    format!("$iothub/twin/res/{status}/?$rid={rid}"),
                                    QoS::AtMostOnce,
                                    false,
                                    Vec::new(),
                                )
                                .await;
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("twin responder subscribed in time")
            .unwrap();
        TwinResponder {
            state,
            client,
            task,
        }
    }

    /// Applies `patch` to the desired section and publishes it as edgeHub does; returns the
    /// new `$version`.
    pub async fn patch_desired(&self, mut patch: Value) -> i64 {
        let version = {
            let mut s = self.state.lock().unwrap();
            let version = s.desired["$version"].as_i64().unwrap_or(0) + 1;
            patch["$version"] = json!(version);
            edge_est::edge::desired::merge_patch(&mut s.desired, &patch);
            version
        };
        self.client
            .publish(
                format!("$iothub/twin/PATCH/properties/desired/?$version={version}"),
                QoS::AtMostOnce,
                false,
                patch.to_string(),
            )
            .await
            .unwrap();
        version
    }

    pub fn reported(&self) -> Value {
        self.state.lock().unwrap().reported.clone()
    }

    pub fn gets(&self) -> usize {
        self.state.lock().unwrap().gets
    }

    /// Waits until the reported section satisfies `pred`.
    pub async fn wait_reported(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reported = self.reported();
            if pred(&reported) {
                return reported;
            }
            assert!(
                Instant::now() < deadline,
                "reported properties never showed {what}: {reported:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TwinResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The fields of an MQTT CONNECT, and the gate's answer: `None` let through, `Some((code,
/// reason))` refused with that CONNACK return code.
#[derive(Clone, Debug)]
pub struct Connect {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: u16,
    pub refused: Option<(u8, String)>,
}

/// What edgeHub checks of a module's CONNECT before it lets it in (`MqttUsernameParser`,
/// `DeviceIdentityProvider`, `SharedAccessSignature`, `DeviceScopeTokenAuthenticator`; see
/// the IoT Edge reference): a blank client id or a user name without `api-version` is
/// answered with return code 3; a client id other than `{device}/{module}`, a user name for
/// another identity, a token that is not `SharedAccessSignature sr=…&sig=…&se=…`, an
/// audience other than the hub's or the gateway's (this module or its device, compared
/// case-insensitively), an HMAC that does not verify with the module's key over the verbatim
/// `sr`, a line feed and `se`, or an `se` more than 5 minutes past: return code 5.
#[derive(Clone, Debug)]
pub struct SasCheck {
    pub hub: String,
    pub gateway: String,
    pub device: String,
    pub module: String,
    /// The module identity key (the workload API's).
    pub key: Vec<u8>,
}

/// CONNACK return codes.
pub const CONNACK_SERVER_UNAVAILABLE: u8 = 3;
pub const CONNACK_NOT_AUTHORIZED: u8 = 5;

impl SasCheck {
    pub fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
        now: u64,
    ) -> Result<(), (u8, String)> {
        let malformed = |why: String| Err((CONNACK_SERVER_UNAVAILABLE, why));
        let refused = |why: String| Err((CONNACK_NOT_AUTHORIZED, why));
        if client_id.is_empty() {
            return malformed("blank client id".into());
        }
        let Some(username) = username else {
            return malformed("no user name".into());
        };
        let Some((path, query)) = username.split_once("/?") else {
            return malformed(format!("user name {username:?} has no query"));
        };
        if !query.split('&').any(|kv| kv.starts_with("api-version=")) {
            return malformed(format!("user name {username:?} has no api-version"));
        }
        let segments: Vec<&str> = path.split('/').collect();
        let [_host, device, module] = segments[..] else {
            return malformed(format!(
                "user name {username:?} is not host/device/module/?…"
            ));
        };
        let identity = format!("{}/{}", self.device, self.module);
        if client_id != identity {
            return refused(format!("client id {client_id:?} is not {identity:?}"));
        }
        if format!("{device}/{module}") != identity {
            return refused(format!("user name names {device}/{module}"));
        }
        let Some(token) = password else {
            return refused("no SAS token".into());
        };
        let parts: Vec<&str> = token.split_whitespace().collect();
        let ["SharedAccessSignature", fields] = parts[..] else {
            return refused("not \"SharedAccessSignature <fields>\"".into());
        };
        let mut sr = None;
        let mut sig = None;
        let mut se = None;
        for field in fields.split('&') {
            let kv: Vec<&str> = field.split('=').collect();
            let [key, value] = kv[..] else {
                return refused(format!("field {field:?} is not key=value"));
            };
            match key {
                "sr" => sr = Some(value),
                "sig" => sig = Some(value),
                "se" => se = Some(value),
                _ => {}
            }
        }
        let (Some(sr), Some(sig), Some(se)) = (sr, sig, se) else {
            return refused("sr, sig or se missing".into());
        };
        let Ok(expiry) = se.parse::<u64>() else {
            return refused(format!("se {se:?} is not a number"));
        };
        if expiry + 300 < now {
            return refused(format!("token expired at {expiry} (now {now})"));
        }
        let audience = percent_encoding::percent_decode_str(sr)
            .decode_utf8_lossy()
            .to_lowercase();
        let (host, scope) = audience.split_once('/').unwrap_or((&audience, ""));
        let device_scope = format!("devices/{}", self.device).to_lowercase();
        let module_scope = format!("{device_scope}/modules/{}", self.module).to_lowercase();
        if !(host == self.hub.to_lowercase() || host == self.gateway.to_lowercase())
            || !(scope == device_scope || scope == module_scope)
        {
            return refused(format!("audience {audience:?} is not this module's"));
        }
        let digest = percent_encoding::percent_decode_str(sig)
            .decode_utf8()
            .ok()
            .and_then(|b64| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .ok()
            });
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.key);
        let verified = digest.is_some_and(|d| {
            aws_lc_rs::hmac::verify(&key, format!("{sr}\n{expiry}").as_bytes(), &d).is_ok()
        });
        if !verified {
            return refused("the signature does not verify with the module's key".into());
        }
        Ok(())
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// edgeHub's front door for modules: a TLS proxy in front of the broker (TLS with `cert` on
/// its side, TLS to the broker trusting `trust_bundle`) that records every CONNECT and checks
/// it as edgeHub does ([`SasCheck`]). Refused, the client gets edgeHub's CONNACK return code
/// and the connection is closed; let through, the CONNECT reaches the broker with the
/// password the broker expects of the module (`GATE_PASSWORD`).
pub struct ConnectCapture {
    pub port: u16,
    pub connects: Arc<Mutex<Vec<Connect>>>,
    task: JoinHandle<()>,
}

impl ConnectCapture {
    pub async fn start(
        broker_port: u16,
        cert: &(String, String),
        trust_bundle: &str,
        sas: SasCheck,
    ) -> ConnectCapture {
        Self::start_at(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            broker_port,
            cert,
            trust_bundle,
            sas,
        )
    }

    /// [`ConnectCapture::start`] on a listener of the caller's.
    pub fn start_at(
        listener: tokio::net::TcpListener,
        broker_port: u16,
        cert: &(String, String),
        trust_bundle: &str,
        sas: SasCheck,
    ) -> ConnectCapture {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.0.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap();
        let server = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
        );
        let client = client_tls(trust_bundle);
        let port = listener.local_addr().unwrap().port();
        let sas = Arc::new(sas);
        let connects = Arc::new(Mutex::new(Vec::new()));
        let recorded = connects.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (server, client, recorded, sas) = (
                    server.clone(),
                    client.clone(),
                    recorded.clone(),
                    sas.clone(),
                );
                tokio::spawn(async move {
                    let Ok(mut inbound) = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await
                    else {
                        return;
                    };
                    let mut buffer = BytesMut::new();
                    loop {
                        let mut probe = buffer.clone();
                        match Packet::read(&mut probe, 1024 * 1024) {
                            Ok(Packet::Connect(mut connect)) => {
                                let username = connect.login.as_ref().map(|l| l.username.clone());
                                let password = connect.login.as_ref().map(|l| l.password.clone());
                                let verdict = sas.check(
                                    &connect.client_id,
                                    username.as_deref(),
                                    password.as_deref(),
                                    unix_now(),
                                );
                                recorded.lock().unwrap().push(Connect {
                                    client_id: connect.client_id.clone(),
                                    username,
                                    password,
                                    keep_alive: connect.keep_alive,
                                    refused: verdict.clone().err(),
                                });
                                if let Err((code, _)) = verdict {
                                    let _ = inbound.write_all(&[0x20, 0x02, 0x00, code]).await;
                                    let _ = inbound.shutdown().await;
                                    return;
                                }
                                if let Some(login) = connect.login.as_mut() {
                                    login.password = GATE_PASSWORD.to_owned();
                                }
                                let mut rewritten = BytesMut::new();
                                if Packet::Connect(connect)
                                    .write(&mut rewritten, 1024 * 1024)
                                    .is_err()
                                {
                                    return;
                                }
                                rewritten.extend_from_slice(&probe);
                                buffer = rewritten;
                                break;
                            }
                            Ok(_) => return,
                            Err(rumqttc::Error::InsufficientBytes(_)) => {}
                            Err(_) => return,
                        }
                        let mut chunk = [0u8; 4096];
                        match inbound.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                    else {
                        return;
                    };
                    let Ok(mut outbound) = tokio_rustls::TlsConnector::from(client)
                        .connect(ServerName::try_from("localhost").unwrap(), tcp)
                        .await
                    else {
                        return;
                    };
                    if outbound.write_all(&buffer).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        ConnectCapture {
            port,
            connects,
            task,
        }
    }

    pub fn connects(&self) -> Vec<Connect> {
        self.connects.lock().unwrap().clone()
    }
}

impl Drop for ConnectCapture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The certificate a TLS server at `addr` presents for `name` (trusting `root_pem`).
pub async fn served_certificate(addr: SocketAddr, name: &str, root_pem: &str) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_tls(root_pem))
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .expect("TLS handshake with the module");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Connects to `port` as `client_id` with `username`/`password` and returns the CONNACK's
/// outcome: `Ok(())` accepted, `Err(code)` refused with that return code (0 for a connection
/// that failed otherwise).
pub async fn connack(
    port: u16,
    trust_bundle: &str,
    client_id: &str,
    username: &str,
    password: &str,
) -> Result<(), u8> {
    let mut options = MqttOptions::new(client_id, "localhost", port);
    options
        .set_credentials(username, password)
        .set_transport(Transport::Tls(TlsConfiguration::Rustls(client_tls(
            trust_bundle,
        ))));
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    return Err(code as u8);
                }
                Err(_) => return Err(0),
            }
        }
    })
    .await
    .expect("a CONNACK within 10 s");
    let _ = client.disconnect().await;
    outcome
}
