//! Wiring: a validated configuration becomes a running server on a listener.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;

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
pub async fn run(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let max_connections = app.runtime().limits.max_connections;
    crate::transport::serve(listener, app, max_connections, shutdown).await;
}
