//! Wiring: a validated configuration becomes a running server on a listener.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

use crate::transport::Listener;

use crate::config::{Config, ConfigError};
use crate::journal::{Journal, JournalError};
use crate::runtime::Runtime;
use crate::server::App;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Builds the application from a configuration; relative paths resolve against `base`.
pub fn build(config: &Config, base: &Path) -> Result<Arc<App>, StartError> {
    let runtime = Runtime::build(config, base)?;
    let journal = Journal::open(&base.join(&config.journal))?;
    Ok(Arc::new(App::new(runtime, journal)))
}

/// Serves EST on `listener` until `shutdown` completes; in-flight requests are drained.
pub async fn run(listener: Listener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    app.start_delegation();
    let max_connections = app.runtime().limits.max_connections;
    crate::transport::serve(listener, app, max_connections, shutdown).await;
}

/// Serves EST for the IoT Edge API proxy on the unix socket `listener` (see
/// [`crate::transport::proxy`]: the forwarded client certificate header counts there, and
/// only there) until `shutdown` completes; in-flight requests are drained.
pub async fn run_proxy_socket(
    listener: UnixListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) {
    let max_connections = app.runtime().limits.max_connections;
    crate::transport::proxy::serve(listener, app, max_connections, shutdown).await;
}

/// Binds the API proxy's socket of `config.proxy_socket`, if there is one.
pub fn bind_proxy_socket(config: &Config) -> std::io::Result<Option<UnixListener>> {
    config
        .proxy_socket
        .as_deref()
        .map(crate::transport::proxy::bind)
        .transpose()
}

/// The whole life of a server process: EST on `listener` and, if given, Prometheus metrics
/// on `metrics` (see [`crate::metrics::serve`]) until `shutdown` completes. Then it stops
/// accepting, lets in-flight requests finish (bounded by the transport's drain timeout),
/// stops the metrics listener and closes the journal: every certificate handed out is on
/// disk when this returns.
pub async fn serve(
    listener: Listener,
    metrics: Option<TcpListener>,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with_proxy_socket(listener, None, metrics, app, shutdown).await;
}

/// [`serve`], with the API proxy's socket listener too when `proxy` is given: both stop
/// accepting at once when `shutdown` completes.
pub async fn serve_with_proxy_socket(
    listener: Listener,
    proxy: Option<UnixListener>,
    metrics: Option<TcpListener>,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_est, est_stopped) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let proxy_task = proxy.map(|listener| {
        tokio::spawn(run_proxy_socket(
            listener,
            app.clone(),
            stopped(est_stopped.clone()),
        ))
    });
    let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
    let metrics_task = metrics.map(|listener| {
        let source = app.clone();
        let mut stopped = metrics_stopped.clone();
        tokio::spawn(crate::metrics::serve(
            listener,
            Arc::new(move || source.render_metrics()),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ))
    });
    let trigger = async {
        shutdown.await;
        let _ = stop_est.send(true);
    };
    tokio::join!(
        run(listener, app.clone(), stopped(est_stopped.clone())),
        trigger
    );
    if let Some(task) = proxy_task {
        let _ = task.await;
    }
    let _ = stop_metrics.send(true);
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    match app.journal().close().await {
        Ok(()) => {
            tracing::info!(journal = %app.journal().path().display(), "journal flushed and closed")
        }
        Err(e) => tracing::error!(error = %e, "the journal could not be flushed on shutdown"),
    }
}
