//! The module twin over MQTT 3.1.1 to edgeHub (rumqttc over rustls): connect with a SAS token
//! signed by the workload API, subscribe to twin responses and desired patches, GET the twin,
//! send reported patches, and take direct-method calls ([`super::methods`]) and send their
//! answers. Reconnects with back-off after any disconnect, and proactively before
//! the token expires; every new connection re-GETs the whole twin (patches may have been
//! missed) and re-sends the reported state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::methods::{self, MethodCall, MethodReply};
use super::reported::Reporter;
use super::sas;
use super::workload::WorkloadClient;

pub const TOPIC_RESPONSES: &str = "$iothub/twin/res/#";
pub const TOPIC_DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";
const RESPONSE_PREFIX: &str = "$iothub/twin/res/";
const DESIRED_PREFIX: &str = "$iothub/twin/PATCH/properties/desired/";

/// How long a twin GET may go unanswered before it is sent again.
const GET_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before asking again after a failed GET or a refused reported patch.
const RETRY_PAUSE: Duration = Duration::from_secs(10);
/// edgeHub's largest inbound message is 256 KiB; reported patches are at most 32 KB and
/// direct-method answers at most 128 KB (plus the topic).
const MAX_INCOMING: usize = 256 * 1024;
const MAX_OUTGOING: usize = methods::MAX_PAYLOAD + 1024;

/// Where and who: everything a connection needs besides the token.
#[derive(Clone, Debug)]
pub struct TwinSettings {
    pub host: String,
    pub port: u16,
    pub iothub_hostname: String,
    pub device_id: String,
    pub module_id: String,
    /// Lifetime of each SAS token; the connection is renewed when 15 % of it is left.
    pub sas_ttl: Duration,
    /// Longest pause between connection attempts (the pause doubles from 1 s).
    pub backoff_max: Duration,
    pub keep_alive: Duration,
}

/// What the twin tells the module.
#[derive(Debug)]
pub enum TwinEvent {
    /// The whole desired section (with `$version`), after each (re)connection.
    Desired(Value),
    /// A desired-properties patch (with `$version`).
    DesiredPatch(Value),
    /// A direct-method call, to be answered on the connection it came on.
    Method(MethodCall),
}

/// What the module asks of the twin link.
#[derive(Debug)]
pub enum TwinCommand {
    /// GET the whole twin again (a patch was missed).
    Refresh,
}

enum End {
    /// The token is about to expire: reconnect at once.
    Renew,
    Stop,
}

/// Runs the twin link until `stop` turns true.
pub async fn run(
    settings: TwinSettings,
    workload: WorkloadClient,
    reporter: Arc<Reporter>,
    events: mpsc::Sender<TwinEvent>,
    mut commands: mpsc::Receiver<TwinCommand>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if *stop.borrow() {
            return;
        }
        let mut synced = false;
        let result = session(
            &settings,
            &workload,
            &reporter,
            &events,
            &mut commands,
            &mut stop,
            &mut synced,
        )
        .await;
        reporter.disconnected();
        if synced {
            backoff = Duration::from_secs(1);
        }
        match result {
            Ok(End::Stop) => return,
            Ok(End::Renew) => {
                tracing::info!("module twin: reconnecting with a new SAS token");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), host = %settings.host, port = settings.port, "module twin: edgeHub connection lost or refused");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(settings.backoff_max.max(Duration::from_secs(1)));
    }
}

/// One MQTT connection, from the token to its end.
async fn session(
    settings: &TwinSettings,
    workload: &WorkloadClient,
    reporter: &Reporter,
    events: &mpsc::Sender<TwinEvent>,
    commands: &mut mpsc::Receiver<TwinCommand>,
    stop: &mut watch::Receiver<bool>,
    synced: &mut bool,
) -> Result<End, String> {
    // Stopping must not wait for a workload API call in progress.
    let (tls, token) = tokio::select! {
        prepared = credentials(settings, workload) => prepared?,
        _ = stop.changed() => return Ok(End::Stop),
    };
    let renew_at = Instant::now() + settings.sas_ttl.mul_f64(0.85);

    let mut options = MqttOptions::new(
        sas::client_id(&settings.device_id, &settings.module_id),
        settings.host.clone(),
        settings.port,
    );
    options
        .set_credentials(
            sas::username(
                &settings.host,
                &settings.device_id,
                &settings.module_id,
                &sas::product(),
            ),
            token,
        )
        .set_keep_alive(settings.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING, MAX_OUTGOING)
        .set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(tls))));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    // Answers to direct methods of this connection; those of a closed one are dropped.
    let (replies_tx, mut replies) = mpsc::unbounded_channel::<MethodReply>();
    let mut network = eventloop.network_options();
    network.set_connection_timeout(10);
    eventloop.set_network_options(network);

    let mut link = Link {
        client,
        next_rid: 1,
        pending: HashMap::new(),
        subacks: 0,
        get_rid: None,
        get_deadline: None,
        synced: false,
        early_patches: Vec::new(),
    };
    loop {
        let get_deadline = link.get_deadline;
        tokio::select! {
            event = eventloop.poll() => {
                let event = event.map_err(|e| match e {
                    rumqttc::ConnectionError::ConnectionRefused(code) => refused(code),
                    other => other.to_string(),
                })?;
                match event {
                    Event::Incoming(Packet::ConnAck(ack)) => {
                        if ack.code != ConnectReturnCode::Success {
                            return Err(refused(ack.code));
                        }
                        tracing::info!(host = %settings.host, port = settings.port, "module twin: connected to edgeHub");
                        link.client
                            .try_subscribe(TOPIC_RESPONSES, QoS::AtMostOnce)
                            .and_then(|()| link.client.try_subscribe(TOPIC_DESIRED, QoS::AtMostOnce))
                            .and_then(|()| link.client.try_subscribe(methods::TOPIC_METHODS, QoS::AtLeastOnce))
                            .map_err(|e| e.to_string())?;
                        link.subacks = 3;
                    }
                    Event::Incoming(Packet::SubAck(ack)) => {
                        if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                            return Err("edgeHub refused the twin or method subscriptions".into());
                        }
                        link.subacks = link.subacks.saturating_sub(1);
                        if link.subacks == 0 && link.get_rid.is_none() && !link.synced {
                            link.get()?;
                        }
                    }
                    Event::Incoming(Packet::Publish(publish)) => {
                        let topic = publish.topic.clone();
                        if let Some(rest) = topic.strip_prefix(RESPONSE_PREFIX) {
                            link.response(rest, &publish.payload, reporter, events).await?;
                            if link.synced {
                                *synced = true;
                            }
                        } else if let Some((name, rid)) = methods::parse_topic(&topic) {
                            tracing::debug!(method = %name, rid = %rid, bytes = publish.payload.len(), "direct method called");
                            let call = MethodCall::new(name, rid, publish.payload.to_vec(), replies_tx.clone());
                            events
                                .send(TwinEvent::Method(call))
                                .await
                                .map_err(|_| "module stopped")?;
                        } else if topic.starts_with(methods::TOPIC_METHODS.trim_end_matches('#')) {
                            tracing::warn!(topic = %topic.chars().take(200).collect::<String>(), "direct method call without a usable $rid: not answered");
                        } else if topic.starts_with(DESIRED_PREFIX) {
                            match desired_patch(&topic, &publish.payload) {
                                // Before the GET answered: kept until it has (the module
                                // drops those the answer already includes).
                                Some(patch) if !link.synced => link.early_patches.push(patch),
                                Some(patch) => events
                                    .send(TwinEvent::DesiredPatch(patch))
                                    .await
                                    .map_err(|_| "module stopped")?,
                                None => {
                                    tracing::warn!("module twin: a desired patch is not a JSON object; getting the whole twin");
                                    link.get()?;
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some(reply) = replies.recv() => {
                link.client
                    .try_publish(
                        methods::reply_topic(reply.status, &reply.rid),
                        QoS::AtLeastOnce,
                        false,
                        reply.payload,
                    )
                    .map_err(|e| e.to_string())?;
            }
            () = reporter.changed(), if link.synced => {
                for patch in reporter.take_patches() {
                    link.report(&patch)?;
                }
            }
            command = commands.recv() => match command {
                Some(TwinCommand::Refresh) if link.subacks == 0 => link.get()?,
                Some(TwinCommand::Refresh) => {}
                None => return Ok(End::Stop),
            },
            () = sleep_until_opt(get_deadline) => {
                link.get()?;
            }
            () = tokio::time::sleep_until(renew_at) => {
                disconnect(&link.client, &mut eventloop).await;
                return Ok(End::Renew);
            }
            _ = stop.changed() => {
                disconnect(&link.client, &mut eventloop).await;
                return Ok(End::Stop);
            }
        }
    }
}

/// The TLS configuration (trust bundle) and a fresh SAS token, from the workload API.
async fn credentials(
    settings: &TwinSettings,
    workload: &WorkloadClient,
) -> Result<(rustls::ClientConfig, String), String> {
    let bundle = workload.trust_bundle().await.map_err(|e| e.to_string())?;
    let tls = client_config(&bundle)?;
    let expiry = unix_now() + settings.sas_ttl.as_secs().max(60);
    let resource = sas::resource(
        &settings.iothub_hostname,
        &settings.device_id,
        &settings.module_id,
    );
    let digest = workload
        .sign(sas::string_to_sign(&resource, expiry).as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    Ok((tls, sas::token(&resource, expiry, &digest)))
}

/// The state of one connection's twin conversation.
struct Link {
    client: AsyncClient,
    next_rid: u64,
    /// Requests awaiting a response, by `$rid`.
    pending: HashMap<String, Request>,
    subacks: usize,
    get_rid: Option<String>,
    /// When to GET (again): after a timeout or a failure.
    get_deadline: Option<Instant>,
    /// The twin GET of this connection was answered.
    synced: bool,
    /// Desired patches received while the GET was outstanding.
    early_patches: Vec<Value>,
}

enum Request {
    Get,
    Reported,
}

impl Link {
    fn rid(&mut self) -> String {
        let rid = self.next_rid.to_string();
        self.next_rid += 1;
        rid
    }

    fn get(&mut self) -> Result<(), String> {
        let rid = self.rid();
        self.client
            .try_publish(
                format!("$iothub/twin/GET/?$rid={rid}"),
                QoS::AtMostOnce,
                false,
                Vec::new(),
            )
            .map_err(|e| e.to_string())?;
        self.pending.insert(rid.clone(), Request::Get);
        self.get_rid = Some(rid);
        self.get_deadline = Some(Instant::now() + GET_TIMEOUT);
        Ok(())
    }

    fn report(&mut self, patch: &Value) -> Result<(), String> {
        let rid = self.rid();
        self.client
            .try_publish(
                format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                QoS::AtMostOnce,
                false,
                patch.to_string(),
            )
            .map_err(|e| e.to_string())?;
        self.pending.insert(rid, Request::Reported);
        Ok(())
    }

    /// `rest` is what follows `$iothub/twin/res/`: `{status}/?$rid={rid}[&$version=…]`.
    async fn response(
        &mut self,
        rest: &str,
        payload: &[u8],
        reporter: &Reporter,
        events: &mpsc::Sender<TwinEvent>,
    ) -> Result<(), String> {
        let status: u16 = rest
            .split('/')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let Some(rid) = query_value(rest, "$rid") else {
            return Ok(());
        };
        match self.pending.remove(&rid) {
            Some(Request::Get) if self.get_rid.as_deref() == Some(rid.as_str()) => {
                self.get_rid = None;
                if status != 200 {
                    tracing::warn!(status, "module twin: GET refused; asking again later");
                    self.get_deadline = Some(Instant::now() + RETRY_PAUSE);
                    return Ok(());
                }
                let twin: Value = serde_json::from_slice(payload)
                    .map_err(|e| format!("twin is not JSON: {e}"))?;
                self.get_deadline = None;
                self.synced = true;
                reporter.twin_reported(twin.get("reported").unwrap_or(&Value::Null));
                let desired = twin
                    .get("desired")
                    .cloned()
                    .unwrap_or_else(|| Value::Object(Default::default()));
                events
                    .send(TwinEvent::Desired(desired))
                    .await
                    .map_err(|_| "module stopped".to_owned())?;
                for patch in std::mem::take(&mut self.early_patches) {
                    events
                        .send(TwinEvent::DesiredPatch(patch))
                        .await
                        .map_err(|_| "module stopped".to_owned())?;
                }
            }
            Some(Request::Reported) if !(200..300).contains(&status) => {
                let text = String::from_utf8_lossy(payload);
                tracing::warn!(status, answer = %text.chars().take(300).collect::<String>(), "module twin: reported patch refused; resynchronising later");
                // What the twin holds is unknown now: GET it again in a while.
                reporter.disconnected();
                self.synced = false;
                self.get_deadline = Some(Instant::now() + RETRY_PAUSE);
            }
            _ => {}
        }
        Ok(())
    }
}

fn refused(code: ConnectReturnCode) -> String {
    let why = match code {
        ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword => {
            "not authorized (SAS token, audience or client id)"
        }
        ConnectReturnCode::ServiceUnavailable => "server unavailable (malformed user name?)",
        _ => "refused",
    };
    format!("edgeHub refused the connection: {why} ({code:?})")
}

async fn disconnect(client: &AsyncClient, eventloop: &mut rumqttc::EventLoop) {
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A desired patch as a JSON object with its `$version` (from the topic if the body lacks it).
fn desired_patch(topic: &str, payload: &[u8]) -> Option<Value> {
    let mut patch: Value = serde_json::from_slice(payload).ok()?;
    let map = patch.as_object_mut()?;
    if !map.contains_key("$version") {
        if let Some(version) = query_value(topic, "$version").and_then(|v| v.parse::<i64>().ok()) {
            map.insert("$version".into(), version.into());
        }
    }
    Some(patch)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A value of the query part of a twin topic (`…/?$rid=4&$version=7`).
fn query_value(topic: &str, name: &str) -> Option<String> {
    let (_, query) = topic.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// TLS to edgeHub: the trust bundle's certificates are the only anchors; the host name is
/// checked.
pub fn client_config(trust_bundle: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(trust_bundle.as_bytes()) {
        let cert = cert.map_err(|e| format!("trust bundle: not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("trust bundle: unusable certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("trust bundle: no certificate".into());
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(crate::transport::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_patches_carry_their_version() {
        let topic = "$iothub/twin/PATCH/properties/desired/?$version=7";
        assert_eq!(
            desired_patch(topic, br#"{"a":1,"$version":7}"#),
            Some(serde_json::json!({"a": 1, "$version": 7}))
        );
        assert_eq!(
            desired_patch(topic, br#"{"a":1}"#),
            Some(serde_json::json!({"a": 1, "$version": 7}))
        );
        assert_eq!(desired_patch(topic, b"[1]"), None);
        assert_eq!(desired_patch(topic, b"{"), None);
    }

    #[test]
    fn query_values_of_twin_topics() {
        assert_eq!(query_value("200/?$rid=4", "$rid").as_deref(), Some("4"));
        assert_eq!(
            query_value("204/?$rid=9&$version=12", "$version").as_deref(),
            Some("12")
        );
        assert_eq!(
            query_value(
                "$iothub/twin/PATCH/properties/desired/?$version=3",
                "$version"
            )
            .as_deref(),
            Some("3")
        );
        assert_eq!(query_value("200/", "$rid"), None);
    }
}
