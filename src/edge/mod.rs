//! edge-est as an Azure IoT Edge module: configuration from the module twin's desired
//! properties, status in its reported properties, TLS certificates from the workload API,
//! and a last-known-good configuration on the data volume for starts while edgeHub is away.
//!
//! Pieces: [`env`] (the `IOTEDGE_*` environment), [`workload`] (the workload API client),
//! [`sas`] (client id, user name, SAS token), [`twin`] (MQTT to edgeHub), [`methods`] (direct
//! methods over the same connection), [`desired`] (twin →
//! `Config`, the one pure function [`module_config`]), [`reported`], [`certs`] (workload
//! certificates as files, renewal) and [`lkg`]. This module runs them: one controller task
//! owns the running configuration and applies every change in turn (twin, renewals), so a
//! configuration is always built from one consistent set of files.

pub mod certs;
pub mod desired;
pub mod env;
pub mod lkg;
pub mod manifest;
pub mod methods;
pub mod reported;
pub mod sas;
pub mod twin;
pub mod workload;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, PemSource, TlsConfig};
use crate::journal::Journal;
use crate::runtime::Runtime;
use crate::server::App;
use crate::transport::Listener;

pub use desired::{module_config, ModuleDefaults};
pub use env::EdgeEnv;

use certs::{CertFiles, Material};
use lkg::LastKnownGood;
use methods::{MethodCall, MethodError};
use reported::{Counters, Rejection, ReportInput, Reporter};
use twin::{TwinCommand, TwinEvent, TwinSettings};
use workload::WorkloadClient;

/// Timing of the module's background work.
#[derive(Clone, Debug)]
pub struct ModuleOptions {
    /// Lifetime of each SAS token (the C# SDK's default: one hour).
    pub sas_ttl: Duration,
    /// Longest pause between attempts to reach edgeHub.
    pub backoff_max: Duration,
    /// How often the counters and reachability in the reported properties are refreshed (a
    /// configuration change is reported at once).
    pub report_interval: Duration,
    /// MQTT keep-alive (edgeHub allows up to 10 minutes).
    pub keep_alive: Duration,
}

impl Default for ModuleOptions {
    fn default() -> Self {
        ModuleOptions {
            sas_ttl: Duration::from_secs(3600),
            backoff_max: Duration::from_secs(60),
            report_interval: Duration::from_secs(30),
            keep_alive: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Env(#[from] env::EnvError),
    #[error("{0}")]
    Io(String),
}

/// A running module.
pub struct ModuleHandle {
    addr: watch::Receiver<Option<SocketAddr>>,
    control: mpsc::Sender<Control>,
    app: watch::Receiver<Option<Arc<App>>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ModuleHandle {
    /// The EST listener's address, once a configuration is in force.
    pub fn addr(&self) -> Option<SocketAddr> {
        *self.addr.borrow()
    }

    /// Waits up to `timeout` for the EST listener.
    pub async fn serving(&mut self, timeout: Duration) -> Option<SocketAddr> {
        let _ = tokio::time::timeout(timeout, self.addr.wait_for(Option::is_some)).await;
        self.addr()
    }

    pub fn app(&self) -> Option<Arc<App>> {
        self.app.borrow().clone()
    }

    /// Reads the files of the running configuration again (what `reloadFiles` and SIGHUP
    /// do): the answer `reloadFiles` would give.
    pub async fn reload_files(&self, trigger: &'static str) -> Result<Value, MethodError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Reload(trigger, tx))
            .await
            .map_err(|_| MethodError::NotReady("the module is stopping".into()))?;
        rx.await
            .map_err(|_| MethodError::NotReady("the module is stopping".into()))?
    }

    /// Stops: disconnects from edgeHub, drains the EST listener, closes the journal.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Runs the module until `shutdown` completes; SIGHUP reads the configuration's files again
/// (like the `reloadFiles` direct method).
pub async fn run(env: EdgeEnv, shutdown: impl Future<Output = ()>) -> Result<(), EdgeError> {
    let handle = start(env, ModuleOptions::default()).await?;
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP cannot be handled: reloadFiles only");
            None
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = async { match &mut hangup { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                // The controller logs the outcome.
                let _ = handle.reload_files("SIGHUP").await;
            }
        }
    }
    tracing::info!("edge-est module stopping");
    handle.stop().await;
    Ok(())
}

/// Starts the module: workload certificates, the last-known-good configuration (served at
/// once if there is one), then the twin link and the controller.
pub async fn start(env: EdgeEnv, options: ModuleOptions) -> Result<ModuleHandle, EdgeError> {
    std::fs::create_dir_all(&env.data_dir)
        .map_err(|e| EdgeError::Io(format!("cannot create {}: {e}", env.data_dir.display())))?;
    let material = Material::new(&env.runtime_dir)
        .map_err(|e| EdgeError::Io(format!("cannot create {}: {e}", env.runtime_dir.display())))?;
    let workload = WorkloadClient::new(env.workload_socket(), &env.module_id, &env.generation_id);
    let (addr_tx, addr) = watch::channel(None);
    let (app_tx, app) = watch::channel(None);
    let (stop, stop_rx) = watch::channel(false);
    let (events_tx, events) = mpsc::channel(16);
    let (commands, commands_rx) = mpsc::channel(4);
    let (control, control_rx) = mpsc::channel(4);
    let reporter = Arc::new(Reporter::default());

    tracing::info!(device = %env.device_id, module = %env.module_id, gateway = %env.gateway_hostname, parent = env.parent_hostname.as_deref().unwrap_or("-"), "edge-est running as an IoT Edge module");
    let mut controller = Controller {
        lkg: LastKnownGood::new(&env.data_dir),
        env: env.clone(),
        options: options.clone(),
        workload: workload.clone(),
        material,
        server: None,
        identity: None,
        material_retry: None,
        renew_at: tokio::time::Instant::now(),
        desired: None,
        applied: None,
        rejection: None,
        desired_rejected: false,
        pending_restart: Vec::new(),
        app: None,
        serving: None,
        proxy: None,
        metrics: None,
        metrics_configured: None,
        last_reload: None,
        reporter: reporter.clone(),
        commands,
        addr_tx,
        app_tx,
    };
    // Certificates of an earlier run serve the last-known-good configuration at once; new
    // ones are asked for right after (or now, when there are none).
    controller.server = controller.material.existing_server();
    if env.parent_hostname.is_some() {
        controller.identity = controller.material.existing_identity();
    }
    let complete = controller.server.is_some()
        && controller.material.has_trust_bundle()
        && (env.parent_hostname.is_none() || controller.identity.is_some());
    if !complete {
        controller.refresh_material().await;
    }
    match controller.lkg.load() {
        Ok(Some(doc)) => match controller.apply(doc, Source::LastKnownGood).await {
            Ok(()) => tracing::info!(
                version = controller.applied.as_ref().and_then(|a| a.version),
                "serving the last-known-good configuration until the twin answers"
            ),
            Err(reason) => {
                tracing::warn!(%reason, "the last-known-good configuration cannot be used")
            }
        },
        Ok(None) => tracing::info!("no last-known-good configuration yet: waiting for the twin"),
        Err(e) => {
            tracing::warn!(file = %controller.lkg.path().display(), error = %e, "the last-known-good configuration is unreadable")
        }
    }
    controller.report();

    let settings = TwinSettings {
        host: env.gateway_hostname.clone(),
        port: env.mqtt_port,
        iothub_hostname: env.iothub_hostname.clone(),
        device_id: env.device_id.clone(),
        module_id: env.module_id.clone(),
        sas_ttl: options.sas_ttl,
        backoff_max: options.backoff_max,
        keep_alive: options.keep_alive,
    };
    let twin_task = tokio::spawn(twin::run(
        settings,
        workload,
        reporter,
        events_tx,
        commands_rx,
        stop_rx.clone(),
    ));
    let task = tokio::spawn(controller.run(events, control_rx, stop_rx, twin_task));
    Ok(ModuleHandle {
        addr,
        control,
        app,
        stop,
        task,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Twin,
    LastKnownGood,
}

/// The configuration in force.
struct Applied {
    /// The desired document it was made from (with `$version`).
    doc: Value,
    version: Option<i64>,
    config: Config,
    source: Source,
}

/// Requests to the controller from the process (not the twin).
enum Control {
    /// Read the configuration's files again; `&str` says who asked (for the log).
    Reload(&'static str, oneshot::Sender<Result<Value, MethodError>>),
}

/// The outcome of the last `reloadFiles` or SIGHUP.
struct Reload {
    time: OffsetDateTime,
    trigger: &'static str,
    error: Option<String>,
}

struct Serving {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The API proxy's socket listener (`proxy_socket`).
struct ProxyServing {
    path: PathBuf,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

struct Controller {
    env: EdgeEnv,
    options: ModuleOptions,
    workload: WorkloadClient,
    material: Material,
    server: Option<CertFiles>,
    identity: Option<CertFiles>,
    /// When to try the workload API again after a failure.
    material_retry: Option<tokio::time::Instant>,
    /// When the workload certificates are renewed next.
    renew_at: tokio::time::Instant,
    lkg: LastKnownGood,
    /// The twin's desired section as the module knows it (patches merged in), whether or
    /// not it was accepted.
    desired: Option<Value>,
    applied: Option<Applied>,
    rejection: Option<Rejection>,
    /// The twin's current desired document was refused (the previous one serves).
    desired_rejected: bool,
    pending_restart: Vec<String>,
    app: Option<Arc<App>>,
    serving: Option<Serving>,
    proxy: Option<ProxyServing>,
    metrics: Option<Serving>,
    /// The metrics address configured when the listener started (changes need a restart).
    metrics_configured: Option<SocketAddr>,
    last_reload: Option<Reload>,
    reporter: Arc<Reporter>,
    commands: mpsc::Sender<TwinCommand>,
    addr_tx: watch::Sender<Option<SocketAddr>>,
    app_tx: watch::Sender<Option<Arc<App>>>,
}

/// How long to wait before asking the workload API again after a failure.
const MATERIAL_RETRY: Duration = Duration::from_secs(15);

impl Controller {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<TwinEvent>,
        mut control: mpsc::Receiver<Control>,
        mut stop: watch::Receiver<bool>,
        twin_task: JoinHandle<()>,
    ) {
        let mut report_tick = tokio::time::interval(self.options.report_interval);
        report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let renewal = self.renew_at;
            tokio::select! {
                event = events.recv() => match event {
                    Some(TwinEvent::Desired(desired)) => self.on_desired(desired).await,
                    Some(TwinEvent::DesiredPatch(patch)) => self.on_patch(patch).await,
                    Some(TwinEvent::Method(call)) => self.on_method(call).await,
                    None => break,
                },
                Some(Control::Reload(trigger, reply)) = control.recv() => {
                    let _ = reply.send(self.reload_files(trigger).await);
                }
                () = tokio::time::sleep_until(renewal) => {
                    tracing::debug!("workload certificates: renewal due");
                    self.renew().await;
                }
                _ = report_tick.tick() => self.report(),
                _ = stop.changed() => break,
            }
        }
        let _ = twin_task.await;
        let proxy = self.proxy.take().map(|proxy| {
            let _ = proxy.stop.send(());
            proxy.task
        });
        for serving in [self.serving.take(), self.metrics.take()]
            .into_iter()
            .flatten()
        {
            let _ = serving.stop.send(());
            let _ = serving.task.await;
        }
        if let Some(task) = proxy {
            let _ = task.await;
        }
        if let Some(app) = &self.app {
            if let Err(e) = app.journal().close().await {
                tracing::error!(error = %e, "the journal could not be flushed on shutdown");
            }
        }
        let _ = self.addr_tx.send(None);
    }

    /// The module's defaults from the workload material at hand.
    fn defaults(&self) -> ModuleDefaults {
        let path = |p: &PathBuf| PemSource(p.display().to_string());
        ModuleDefaults {
            listen: desired::DEFAULT_LISTEN
                .parse()
                .expect("valid default address"),
            metrics_listen: Some(crate::metrics::MODULE_DEFAULT_LISTEN),
            journal: PathBuf::from("journal.jsonl"),
            tls: self.server.as_ref().map(|s| TlsConfig {
                certificate: path(&s.certificate),
                key: s.key.clone(),
            }),
            trust_bundle: self
                .material
                .has_trust_bundle()
                .then(|| path(&self.material.trust_bundle_path())),
            parent_hostname: self.env.parent_hostname.clone(),
            parent_port: self.env.parent_port,
            identity: self
                .identity
                .as_ref()
                .map(|i| (path(&i.certificate), i.key.clone())),
        }
    }

    /// Gets the trust bundle, the server certificate and (nested) the identity certificate
    /// from the workload API; what cannot be had is taken from the files of an earlier run
    /// while still valid, and asked for again later.
    async fn refresh_material(&mut self) {
        let mut failed = false;
        if let Err(e) = self.material.fetch_trust_bundle(&self.workload).await {
            failed = true;
            tracing::warn!(error = %e, have_earlier = self.material.has_trust_bundle(), "workload API: no trust bundle");
        }
        match self
            .material
            .fetch_server(&self.workload, &self.env.gateway_hostname)
            .await
        {
            Ok(files) => {
                tracing::info!(common_name = %self.env.gateway_hostname, not_after = %files.not_after, "workload API: server certificate");
                self.server = Some(files);
            }
            Err(e) => {
                failed = true;
                if self.server.is_none() {
                    self.server = self.material.existing_server();
                }
                tracing::warn!(error = %e, have_earlier = self.server.is_some(), "workload API: no server certificate");
            }
        }
        if self.env.parent_hostname.is_some() {
            match self.material.fetch_identity(&self.workload).await {
                Ok(files) => self.identity = Some(files),
                Err(e) => {
                    failed = true;
                    if self.identity.is_none() {
                        self.identity = self.material.existing_identity();
                    }
                    tracing::warn!(error = %e, have_earlier = self.identity.is_some(), "workload API: no identity certificate");
                }
            }
        }
        self.material_retry = failed.then(|| tokio::time::Instant::now() + MATERIAL_RETRY);
        // An absolute deadline, fixed until the next refresh.
        self.renew_at = self.next_renewal();
    }

    /// When the next certificate renewal (or retry) is due, from the certificates at hand.
    fn next_renewal(&self) -> tokio::time::Instant {
        let now = OffsetDateTime::now_utc();
        let mut waits: Vec<Duration> = [&self.server, &self.identity]
            .into_iter()
            .flatten()
            .map(|c| c.renew_in(now))
            .collect();
        if let Some(retry) = self.material_retry {
            waits.push(retry.saturating_duration_since(tokio::time::Instant::now()));
        }
        let wait = waits
            .into_iter()
            .min()
            .unwrap_or(Duration::from_secs(86_400));
        tracing::trace!(
            wait_s = wait.as_secs_f64(),
            "next workload certificate renewal"
        );
        tokio::time::Instant::now() + wait
    }

    /// Renews the workload certificates and swaps in a runtime built on the new files.
    async fn renew(&mut self) {
        let before = (
            self.server.clone(),
            self.identity.clone(),
            self.material.has_trust_bundle(),
        );
        self.refresh_material().await;
        if (
            self.server.clone(),
            self.identity.clone(),
            self.material.has_trust_bundle(),
        ) == before
        {
            return;
        }
        let doc = match (&self.applied, &self.desired) {
            (Some(applied), _) => Some((applied.doc.clone(), applied.source)),
            // Nothing serves yet (no certificate earlier?): try what the twin wants.
            (None, Some(desired)) => Some((desired.clone(), Source::Twin)),
            (None, None) => None,
        };
        if let Some((doc, source)) = doc {
            match self.apply(doc, source).await {
                Ok(()) => {
                    tracing::info!(not_after = ?self.server.as_ref().map(|s| s.not_after), "renewed workload certificates in force")
                }
                Err(reason) => {
                    tracing::error!(%reason, "renewed workload certificates could not be put in force")
                }
            }
        }
        self.report();
    }

    async fn on_desired(&mut self, desired: Value) {
        let version = desired::version(&desired);
        self.desired = Some(desired.clone());
        let unchanged = self.applied.as_ref().is_some_and(|a| {
            a.doc.as_object().map(desired::strip_metadata)
                == desired.as_object().map(desired::strip_metadata)
        });
        if unchanged {
            // Same configuration (a reconnection, or the twin caught up with the
            // last-known-good one): nothing to rebuild.
            if let Some(applied) = &mut self.applied {
                applied.version = version;
                applied.source = Source::Twin;
                applied.doc = desired.clone();
                if let Some(app) = &self.app {
                    app.set_config_version(version.unwrap_or(0));
                }
            }
            self.desired_rejected = false;
            if let Err(e) = self.lkg.save(&desired) {
                tracing::warn!(error = %e, "the last-known-good configuration could not be saved");
            }
        } else {
            self.accept_or_reject(desired).await;
        }
        self.report();
    }

    async fn on_patch(&mut self, patch: Value) {
        let Some(desired) = &mut self.desired else {
            return;
        };
        let (have, got) = (desired::version(desired), desired::version(&patch));
        if let (Some(have), Some(got)) = (have, got) {
            if got <= have {
                tracing::debug!(have, got, "stale desired patch ignored");
                return;
            }
            if got > have + 1 {
                tracing::info!(
                    have,
                    got,
                    "desired patches were missed: getting the whole twin"
                );
                let _ = self.commands.try_send(TwinCommand::Refresh);
                return;
            }
        }
        desired::merge_patch(desired, &patch);
        let desired = desired.clone();
        self.accept_or_reject(desired).await;
        self.report();
    }

    async fn accept_or_reject(&mut self, desired: Value) {
        let version = desired::version(&desired);
        match self.apply(desired, Source::Twin).await {
            Ok(()) => {
                self.desired_rejected = false;
                // The twin's current document is in force: a refusal of an earlier one is
                // history, and `lastRejection` goes (reported as null).
                self.rejection = None;
                tracing::info!(version, "desired configuration in force");
            }
            Err(reason) => {
                tracing::warn!(version, %reason, "desired configuration refused; the running one keeps serving");
                self.desired_rejected = true;
                self.rejection = Some(Rejection {
                    version,
                    reason,
                    time: OffsetDateTime::now_utc(),
                });
            }
        }
    }

    /// Builds, validates and loads `doc`, then swaps it in (binding a new listener first if
    /// the address changed). Nothing changes unless all of it succeeds.
    async fn apply(&mut self, doc: Value, source: Source) -> Result<(), String> {
        let version = desired::version(&doc);
        let config = module_config(&doc, &self.defaults()).map_err(|e| e.to_string())?;
        let base = self.env.data_dir.clone();
        let built = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || Runtime::build(&config, &base))
                .await
                .map_err(|e| e.to_string())?
        };
        let runtime = built.map_err(|e| e.to_string())?;
        let rebind = match (&self.serving, &self.applied) {
            (Some(_), Some(applied)) => applied.config.listen != config.listen,
            _ => true,
        };
        let listener = if rebind {
            Some(
                Listener::bind(config.listen)
                    .map_err(|e| format!("listen: cannot listen on {}: {e}", config.listen))?,
            )
        } else {
            None
        };
        // The API proxy's socket moves like the listener: the new one is bound first.
        let proxy_changed = config.proxy_socket != self.proxy.as_ref().map(|p| p.path.clone());
        let proxy_listener =
            match (&config.proxy_socket, proxy_changed) {
                (Some(path), true) => Some(crate::transport::proxy::bind(path).map_err(|e| {
                    format!("proxy_socket: cannot listen on {}: {e}", path.display())
                })?),
                _ => None,
            };

        let app = match &self.app {
            Some(app) => {
                app.swap(runtime);
                app.clone()
            }
            None => {
                let path = self.env.data_dir.join(&config.journal);
                let journal = Journal::open(&path).map_err(|e| e.to_string())?;
                let app = Arc::new(App::new(runtime, journal));
                self.app = Some(app.clone());
                let _ = self.app_tx.send(Some(app.clone()));
                self.metrics_configured = config.metrics_listen;
                if let Some(addr) = config.metrics_listen {
                    self.metrics = serve_metrics(addr, app.clone()).await;
                }
                app
            }
        };
        app.set_config_version(version.unwrap_or(0));
        if let Some(listener) = listener {
            let addr = listener.local_addr();
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(crate::app::run(listener, app.clone(), async {
                let _ = stopped.await;
            }));
            // The old listener stops accepting and lets its connections finish.
            if let Some(old) = self.serving.replace(Serving { addr, stop, task }) {
                let _ = old.stop.send(());
                tracing::info!(old = %old.addr, new = %addr, "EST listener moved");
            }
            tracing::info!(listen = %addr, "serving EST");
            if let Err(e) = crate::health::record_listen(&self.env.data_dir, addr) {
                tracing::warn!(dir = %self.env.data_dir.display(), error = %crate::config::write_error_text(&e), "cannot record the listener's address for `edge-est health`");
            }
            let _ = self.addr_tx.send(Some(addr));
        }
        if proxy_changed {
            if let Some(old) = self.proxy.take() {
                let _ = old.stop.send(());
                tracing::info!(socket = %old.path.display(), "API proxy socket closed");
            }
            if let (Some(listener), Some(path)) = (proxy_listener, &config.proxy_socket) {
                let (stop, stopped) = oneshot::channel::<()>();
                let task =
                    tokio::spawn(crate::app::run_proxy_socket(listener, app.clone(), async {
                        let _ = stopped.await;
                    }));
                tracing::info!(socket = %path.display(), "serving EST for the IoT Edge API proxy");
                self.proxy = Some(ProxyServing {
                    path: path.clone(),
                    stop,
                    task,
                });
            }
        }
        self.pending_restart.clear();
        let journal_path = self.env.data_dir.join(&config.journal);
        if app.journal().path() != journal_path {
            self.pending_restart.push("journal".into());
        }
        if self.metrics_configured != config.metrics_listen {
            self.pending_restart.push("metrics_listen".into());
        }
        if source == Source::Twin {
            if let Err(e) = self.lkg.save(&doc) {
                tracing::warn!(error = %e, "the last-known-good configuration could not be saved");
            }
        }
        self.applied = Some(Applied {
            doc,
            version,
            config,
            source,
        });
        Ok(())
    }

    /// Answers a direct method. `queryJournal` reads the journal off the controller (it
    /// answers when done); the others answer at once.
    async fn on_method(&mut self, call: MethodCall) {
        let request = match call.object() {
            Ok(request) => request,
            Err(e) => return call.answer(Err(e)),
        };
        match call.name.as_str() {
            "getStatus" => {
                let answer = if request.is_empty() {
                    Ok(self.status())
                } else {
                    Err(MethodError::BadRequest(
                        "getStatus takes no parameters (send {} or nothing)".into(),
                    ))
                };
                call.answer(answer);
            }
            "reloadFiles" => {
                let answer = if request.is_empty() {
                    self.reload_files("reloadFiles").await
                } else {
                    Err(MethodError::BadRequest(
                        "reloadFiles takes no parameters (send {} or nothing)".into(),
                    ))
                };
                call.answer(answer);
            }
            "queryJournal" => {
                let query = match methods::JournalQuery::parse(request) {
                    Ok(query) => query,
                    Err(e) => return call.answer(Err(e)),
                };
                let Some(app) = &self.app else {
                    return call.answer(Err(MethodError::NotReady(
                        "no configuration in force yet: the journal is not open".into(),
                    )));
                };
                let path = app.journal().path().to_path_buf();
                tokio::spawn(async move {
                    let answer =
                        tokio::task::spawn_blocking(move || methods::query_journal(&path, &query))
                            .await
                            .unwrap_or_else(|e| Err(MethodError::Failed(e.to_string())));
                    call.answer(answer);
                });
            }
            other => {
                let name = other.to_owned();
                call.answer(Err(MethodError::Unknown(name)));
            }
        }
    }

    /// `getStatus`: the reported document as of now, each issuer's certificate (and the
    /// earliest expiry on its chain), the TLS server certificate, each upstream's health and
    /// the last reload.
    fn status(&self) -> Value {
        self.report();
        let now = OffsetDateTime::now_utc();
        let mut status = serde_json::Map::new();
        status.insert("reported".into(), Value::Object(self.reporter.wanted()));
        let mut issuers = serde_json::Map::new();
        let mut upstreams = serde_json::Map::new();
        let runtime = self.app.as_ref().map(|a| a.runtime());
        if let (Some(applied), Some(runtime)) = (&self.applied, &runtime) {
            for label in &applied.config.labels {
                let route = match &label.name {
                    None => None,
                    Some(name) => match crate::est::Label::new(name) {
                        Ok(l) => Some(l),
                        Err(_) => continue,
                    },
                };
                let Some(rt) = runtime.label(&route) else {
                    continue;
                };
                let label_name = rt.display_name().to_owned();
                if let (Some(issuer), Some(name)) = (&rt.local, &label.issuer) {
                    let entry = issuers.entry(name.clone()).or_insert_with(|| {
                        let mut e = methods::expiry(issuer.not_after(), now);
                        e["subject"] = Value::String(issuer.subject().to_string());
                        if let Some(earliest) = earliest_not_after(issuer.chain()) {
                            e["chain"] = methods::expiry(earliest, now);
                        }
                        e["labels"] = Value::Array(Vec::new());
                        e
                    });
                    if let Some(labels) = entry["labels"].as_array_mut() {
                        labels.push(Value::String(label_name.clone()));
                    }
                }
                if let (Some(upstream), Some(name)) = (&rt.upstream, &label.upstream) {
                    let entry = upstreams.entry(name.clone()).or_insert_with(|| {
                        serde_json::json!({
                            "url": applied.config.upstreams.get(name).map(|u| u.url.clone()),
                            "reachable": upstream.is_reachable(),
                            "labels": [],
                        })
                    });
                    if let Some(labels) = entry["labels"].as_array_mut() {
                        labels.push(Value::String(label_name));
                    }
                }
            }
        }
        status.insert("issuers".into(), Value::Object(issuers));
        status.insert("upstreams".into(), Value::Object(upstreams));
        status.insert(
            "serverCertificate".into(),
            runtime
                .as_ref()
                .and_then(|r| r.tls_not_after)
                .map_or(Value::Null, |t| methods::expiry(t, now)),
        );
        status.insert(
            "lastReload".into(),
            self.last_reload.as_ref().map_or(Value::Null, |r| {
                serde_json::json!({
                    "time": r.time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                    "trigger": r.trigger,
                    "ok": r.error.is_none(),
                    "error": r.error,
                })
            }),
        );
        status.insert(
            "time".into(),
            Value::String(
                now.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            ),
        );
        Value::Object(status)
    }

    /// `reloadFiles` and SIGHUP: builds the running configuration again from its files
    /// (issuers, TLS, trust sets), validated like a twin change; if anything is wrong the
    /// running configuration keeps serving and the answer says why.
    async fn reload_files(&mut self, trigger: &'static str) -> Result<Value, MethodError> {
        let Some(applied) = &self.applied else {
            return Err(MethodError::NotReady(
                "no configuration in force yet: nothing to reload".into(),
            ));
        };
        let (doc, source, version) = (applied.doc.clone(), applied.source, applied.version);
        let result = self.apply(doc, source).await;
        let time = OffsetDateTime::now_utc();
        self.last_reload = Some(Reload {
            time,
            trigger,
            error: result.as_ref().err().cloned(),
        });
        self.report();
        match result {
            Ok(()) => {
                tracing::info!(
                    trigger,
                    version,
                    "configuration files read again and in force"
                );
                let status = self.status();
                Ok(serde_json::json!({
                    "reloaded": true,
                    "configVersion": version,
                    "issuers": status["issuers"],
                    "serverCertificate": status["serverCertificate"],
                }))
            }
            Err(reason) => {
                tracing::warn!(trigger, version, %reason, "configuration files refused; the running configuration keeps serving");
                Err(MethodError::BadRequest(format!(
                    "{reason} (the files read before keep serving)"
                )))
            }
        }
    }

    /// Sets the reported document (sent when edgeHub is connected).
    fn report(&self) {
        let status = match (&self.applied, self.desired_rejected) {
            (None, _) => "waiting-for-configuration",
            (Some(_), true) => "running-previous-configuration",
            (Some(a), false) if a.source == Source::LastKnownGood => "running-last-known-good",
            (Some(_), false) => "running",
        };
        let runtime = self.app.as_ref().map(|a| a.runtime());
        let document = reported::document(&ReportInput {
            status,
            config_version: self.applied.as_ref().and_then(|a| a.version),
            config_source: self.applied.as_ref().map(|a| match a.source {
                Source::Twin => "twin",
                Source::LastKnownGood => "last-known-good",
            }),
            rejection: self.rejection.as_ref(),
            config: self.applied.as_ref().map(|a| &a.config),
            runtime: runtime.as_deref(),
            counters: self.app.as_deref().map(counters),
            pending_restart: &self.pending_restart,
        });
        self.reporter.set(document);
    }
}

/// The earliest notAfter of a certificate chain (DER).
fn earliest_not_after(chain: &[rustls::pki_types::CertificateDer<'_>]) -> Option<OffsetDateTime> {
    chain
        .iter()
        .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
        .filter_map(|(_, cert)| {
            OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()
        })
        .min()
}

/// Issued, forwarded and refused counts of the running server.
fn counters(app: &App) -> Counters {
    let outcomes = app.metrics().outcomes();
    Counters {
        issued: outcomes.issued,
        forwarded: outcomes.forwarded,
        refused: outcomes.refused,
    }
}

async fn serve_metrics(addr: SocketAddr, app: Arc<App>) -> Option<Serving> {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "metrics listener cannot start");
            return None;
        }
    };
    let addr = listener.local_addr().ok()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(crate::metrics::serve(
        listener,
        Arc::new(move || app.render_metrics()),
        async {
            let _ = stopped.await;
        },
    ));
    tracing::info!(listen = %addr, "serving metrics");
    Some(Serving { addr, stop, task })
}
