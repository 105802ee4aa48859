//! The `edge-est` command: CLI, logging, configuration, then `app::run`.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use edge_est::config::dev::{self, PasswordSource};
use edge_est::config::Config;

#[derive(Parser)]
#[command(
    name = "edge-est",
    version,
    about = "EST server and registration authority for layered IoT Edge hierarchies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve EST. Without --config, runs the development setup kept in --data-dir.
    Serve {
        /// Configuration file (TOML if it ends in .toml, JSON otherwise).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Directory of the development setup (used without --config).
        #[arg(long, default_value = "./edge-est-data")]
        data_dir: PathBuf,
        /// Listen address; overrides the configuration's.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Address of the Prometheus metrics listener (plain HTTP, GET /metrics); overrides
        /// the configuration's `metrics_listen`. Off unless given one way or the other.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Starts a three-layer hierarchy on loopback and enrolls a child IoT Edge device
    /// through it: identity certificate, Edge CA, renewal. Exits non-zero on any failure.
    Demo {
        /// Where to keep the generated PKI, configurations and journals.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Liveness probe for container health checks: exits 0 if the EST listener answers.
    Health {
        /// The listener to probe.
        #[arg(long, default_value = "127.0.0.1:8085")]
        addr: SocketAddr,
    },
    /// Reads a password on standard input and prints its argon2id hash for `users`.
    HashPassword,
    /// Loads and validates a configuration file, then exits.
    CheckConfig { config: PathBuf },
    /// Validates IoT Hub deployment manifests (or deployment.template.json files): their
    /// shape, createOptions, twin limits, and each edge-est module's desired properties
    /// through the module's own configuration validator. One line per manifest; exits
    /// non-zero if any has an error.
    CheckManifest {
        /// Manifests to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Validate this module as edge-est whatever its image or name (repeatable). Without
        /// it, modules whose image repository is `edge-est` or whose name is edge-est,
        /// edgeest or estproxy are.
        #[arg(long = "module", value_name = "NAME")]
        modules: Vec<String>,
        /// The device is nested under this parent (IOTEDGE_PARENTHOSTNAME). By default a
        /// manifest that pulls images through $upstream is taken as nested.
        #[arg(long, conflicts_with = "no_parent")]
        parent_hostname: Option<String>,
        /// The device is a top-layer device (no IOTEDGE_PARENTHOSTNAME).
        #[arg(long)]
        no_parent: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::HashPassword => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password")?;
            let password = line.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "no password on standard input");
            println!(
                "{}",
                edge_est::auth::basic::hash_password(password).map_err(anyhow::Error::msg)?
            );
            Ok(())
        }
        Command::CheckConfig { config } => {
            let (config, base) = load(&config)?;
            edge_est::runtime::Runtime::build(&config, &base)?;
            println!("configuration is valid: {} label(s)", config.labels.len());
            Ok(())
        }
        Command::CheckManifest {
            files,
            modules,
            parent_hostname,
            no_parent,
        } => {
            use edge_est::edge::manifest::{check_file, CheckOptions, Parent};
            let options = CheckOptions {
                modules,
                parent: match (parent_hostname, no_parent) {
                    (Some(host), _) => Parent::Hostname(host),
                    (None, true) => Parent::None,
                    (None, false) => Parent::Infer,
                },
            };
            let mut failed = 0;
            for file in &files {
                let report = check_file(file, &options);
                for error in &report.errors {
                    eprintln!("{}: {error}", file.display());
                }
                println!("{}: {}", file.display(), report.summary());
                if !report.is_ok() {
                    failed += 1;
                }
            }
            if failed > 0 {
                eprintln!("{failed} of {} manifest(s) have errors", files.len());
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Health { addr } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let status = runtime
                .block_on(edge_est::health::probe(
                    addr,
                    std::time::Duration::from_secs(5),
                ))
                .map_err(anyhow::Error::msg)?;
            println!("{status}");
            Ok(())
        }
        Command::Demo { dir } => {
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("edge-est-demo-{}", std::process::id()))
            });
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            if std::env::var_os("RUST_LOG").is_some() {
                init_logging(cli.log_format);
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime
                .block_on(edge_est::demo::run(&dir))
                .map_err(|e| anyhow::anyhow!("demo failed: {e}"))
        }
        Command::Serve {
            config,
            data_dir,
            listen,
            metrics_listen,
        } => {
            init_logging(cli.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(config, data_dir, listen, metrics_listen))
        }
    }
}

fn load(path: &Path) -> anyhow::Result<(Config, PathBuf)> {
    let config = Config::from_file(path)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((config, base))
}

async fn serve(
    config: Option<PathBuf>,
    data_dir: PathBuf,
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    // Inside an IoT Edge module (IOTEDGE_WORKLOADURI set) and without --config: the module
    // twin configures the server (see `edge_est::edge`).
    if config.is_none() && edge_est::edge::EdgeEnv::present(|k| std::env::var(k).ok()) {
        let env = edge_est::edge::EdgeEnv::from_process()?;
        return Ok(edge_est::edge::run(env, shutdown_signal()).await?);
    }
    let (mut config, base, dev_setup) = match config {
        Some(path) => {
            let (config, base) = load(&path)?;
            (config, base, None)
        }
        None => {
            let setup = dev::prepare(
                &data_dir,
                listen.unwrap_or_else(edge_est::config::default_listen),
            )?;
            (setup.config.clone(), PathBuf::new(), Some(setup))
        }
    };
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if let Some(metrics_listen) = metrics_listen {
        config.metrics_listen = Some(metrics_listen);
    }
    let app = edge_est::app::build(&config, &base)?;
    let listener = edge_est::transport::Listener::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local = listener.local_addr();
    tracing::info!(listen = %local, labels = config.labels.len(), journal = %app.journal().path().display(), "edge-est serving EST");
    if let Some(setup) = &dev_setup {
        print_dev_instructions(setup, local);
    }
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let metrics = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            tracing::info!(listen = %metrics.local_addr()?, "serving Prometheus metrics at /metrics");
            Some(metrics)
        }
        None => None,
    };
    let proxy = edge_est::app::bind_proxy_socket(&config).with_context(|| {
        format!(
            "cannot listen on the API proxy socket {}",
            config
                .proxy_socket
                .as_deref()
                .unwrap_or(Path::new(""))
                .display()
        )
    })?;
    if let Some(path) = &config.proxy_socket {
        tracing::info!(socket = %path.display(), "serving EST for the IoT Edge API proxy (x-ms-edge-clientcert honoured there only)");
    }
    edge_est::app::serve_with_proxy_socket(listener, proxy, metrics, app, shutdown_signal()).await;
    tracing::info!("edge-est stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn print_dev_instructions(setup: &dev::DevSetup, local: SocketAddr) {
    let dir = setup.data_dir.display();
    let password = match &setup.password {
        PasswordSource::Environment => format!("\"${}\"", dev::PASSWORD_ENV),
        PasswordSource::GeneratedNow(p) => {
            println!(
                "Development password for user {} (shown once, kept in {dir}/dev-password): {p}",
                dev::DEV_USER
            );
            format!("\"$(cat {dir}/dev-password)\"")
        }
        PasswordSource::File => format!("\"$(cat {dir}/dev-password)\""),
    };
    let host = if local.ip().is_loopback() || local.ip().is_unspecified() {
        format!("localhost:{}", local.port())
    } else {
        local.to_string()
    };
    println!(
        "\nedge-est development server on https://{host}/.well-known/est (trust anchor: {root})\n\
         Enroll a device with curl and openssl:\n\n  \
         openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout device.key -subj /CN=device1 -out device.csr\n  \
         curl -sf --cacert {root} -u {user}:{password} -H 'Content-Type: application/pkcs10' \\\n      \
         --data-binary @device.csr https://{host}/.well-known/est/simpleenroll \\\n    \
         | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out device.pem\n  \
         curl -sf --cacert {root} https://{host}/.well-known/est/cacerts | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out chain.pem\n  \
         openssl verify -CAfile {root} -untrusted chain.pem device.pem\n",
        root = setup.root_pem().display(),
        user = dev::DEV_USER,
    );
}
