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
    /// Log format: `human` (coloured on a terminal only), `json`, or `iotedge` (the `<N>`
    /// syslog-severity prefix edgeAgent's log parser reads). Default: `iotedge` when serving as
    /// an IoT Edge module, `human` otherwise. The level: `RUST_LOG`, else `RuntimeLogLevel`
    /// (edgeAgent's names), else info.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
    Iotedge,
}

#[derive(Subcommand)]
enum Command {
    /// Serve EST. Without --config, runs the development setup kept in --data-dir.
    Serve {
        /// Configuration file (TOML if it ends in .toml, JSON otherwise).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Without --config: the development setup's directory (default ./edge-est-data). As
        /// an IoT Edge module: where the journal, the last-known-good configuration and the
        /// workload certificates live (default: EDGE_EST_DATA_DIR, else /data). The server
        /// records its listener's address there for `edge-est health`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Listen address; overrides the configuration's.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Address of the Prometheus metrics listener (plain HTTP, GET /metrics); overrides
        /// the configuration's `metrics_listen`. Off unless given one way or the other.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Starts a three-layer hierarchy on loopback from a root and the top layer's CA (the
    /// middle and bottom layers enroll their own CAs from the layer above) and enrolls a
    /// child IoT Edge device at the bottom: identity certificate, Edge CA, renewal. Exits
    /// non-zero on any failure.
    Demo {
        /// Where to keep the generated PKI, configurations and journals (default: a new
        /// directory in the system's temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// First loopback port of the three configurations it writes (then +1, +2); the
        /// demo's own run uses free ports.
        #[arg(long, default_value_t = edge_est::demo::CONFIG_PORT)]
        config_port: u16,
    },
    /// Liveness probe for container health checks: exits 0 if edge-est answers `cacerts` on
    /// its EST listener. It probes --addr, else the listener of --config, else the address the
    /// server recorded in its data directory (--data-dir, EDGE_EST_DATA_DIR, else
    /// ./edge-est-data), else 127.0.0.1:8085.
    Health {
        /// host:port to probe (a host name or an address).
        #[arg(long)]
        addr: Option<String>,
        /// Probe the `listen` address of this configuration file.
        #[arg(long, conflicts_with = "addr")]
        config: Option<PathBuf>,
        /// The data directory of the server to probe (as given to `serve`).
        #[arg(long, env = "EDGE_EST_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Prints the argon2id hash of a password for `users`. On a terminal it prompts twice
    /// without echo; otherwise it reads one line on standard input.
    HashPassword,
    /// Validates a configuration file and every file it names, then exits. Reports every
    /// error found, one per line.
    CheckConfig {
        config: PathBuf,
        /// Check structure and policy only: the certificate, key and password files the
        /// configuration names need not exist (e.g. on a workstation without the PKI).
        #[arg(long)]
        offline: bool,
    },
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

/// Starts logging; `module` picks the IoT Edge format unless --log-format says otherwise.
fn init_logging(
    format: Option<LogFormat>,
    module: bool,
) -> anyhow::Result<edge_est::logging::FlushGuard<std::io::Stderr>> {
    use edge_est::logging::Style;
    let style = match format {
        Some(LogFormat::Human) => Style::Human,
        Some(LogFormat::Json) => Style::Json,
        Some(LogFormat::Iotedge) => Style::IotEdge,
        None if module => Style::IotEdge,
        None => Style::Human,
    };
    let guard = edge_est::logging::init(style).context("cannot start the log writer")?;
    // rustls logs through `log`; its IP-address-as-SNI warning goes out at debug.
    let _ = edge_est::transport::tls::LogBridge::install();
    Ok(guard)
}

/// Whether `serve` runs as an IoT Edge module (no --config, IOTEDGE_WORKLOADURI set).
fn module_mode(config: &Option<PathBuf>) -> bool {
    config.is_none() && edge_est::edge::EdgeEnv::present(|k| std::env::var(k).ok())
}

/// The password for `hash-password`: prompted twice without echo on a terminal, else the
/// first line of standard input.
fn read_password() -> anyhow::Result<String> {
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading the password")?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    let first = prompt_hidden("Password: ")?;
    anyhow::ensure!(!first.is_empty(), "no password given");
    let again = prompt_hidden("Again: ")?;
    anyhow::ensure!(first == again, "the two passwords differ");
    Ok(first)
}

/// Prompts on stderr and reads a line from the terminal on stdin with echo off.
fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    use std::io::Write;
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    #[cfg(unix)]
    let restore = {
        use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        quiet.local_modes.insert(LocalModes::ECHONL);
        tcsetattr(&stdin, OptionalActions::Now, &quiet).context("turning echo off")?;
        saved
    };
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    #[cfg(unix)]
    {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &restore,
        );
    }
    read.context("reading the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::HashPassword => {
            let password = read_password()?;
            anyhow::ensure!(!password.is_empty(), "no password on standard input");
            println!(
                "{}",
                edge_est::auth::basic::hash_password(&password).map_err(anyhow::Error::msg)?
            );
            Ok(())
        }
        Command::CheckConfig {
            config: path,
            offline,
        } => {
            let (config, base) = load(&path)?;
            let mut problems = config.problems();
            if !offline {
                problems.extend(config.file_problems(&base));
                // Loading finds the rest (a key that is not the certificate's, a CA that
                // cannot sign): it runs only on a configuration that passed the above.
                if problems.is_empty() {
                    if let Err(e) = edge_est::runtime::Runtime::build(&config, &base) {
                        problems.push(e);
                    }
                }
            }
            if !problems.is_empty() {
                for problem in &problems {
                    eprintln!("{}: {problem}", path.display());
                }
                eprintln!("{}: {} problem(s)", path.display(), problems.len());
                std::process::exit(1);
            }
            for warning in config.warnings() {
                eprintln!("{}: warning: {warning}", path.display());
            }
            if offline {
                println!(
                    "configuration is valid in structure and policy: {} label(s) (files not read)",
                    config.labels.len()
                );
            } else {
                println!("configuration is valid: {} label(s)", config.labels.len());
            }
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
            let mut reports = Vec::new();
            for file in &files {
                let report = check_file(file, &options);
                for error in &report.errors {
                    eprintln!("{}: {error}", file.display());
                }
                for warning in &report.warnings {
                    eprintln!("{}: warning: {warning}", file.display());
                }
                for module in &report.edge_est {
                    for warning in module.config.iter().flat_map(|c| c.warnings()) {
                        eprintln!(
                            "{}: warning: modulesContent.{}.properties.desired.{warning}",
                            file.display(),
                            module.name
                        );
                    }
                }
                println!("{}: {}", file.display(), report.summary());
                if !report.is_ok() {
                    failed += 1;
                }
                reports.push((file.display().to_string(), report));
            }
            // Given the manifests of several layers: each auto label's fallback allowance
            // within the RA rule the layer above has for it.
            let layers: Vec<edge_est::issue::fallback::LayerConfig> = reports
                .iter()
                .flat_map(|(file, report)| {
                    report.edge_est.iter().filter_map(move |m| {
                        Some(edge_est::issue::fallback::LayerConfig {
                            source: file,
                            ra_cn: &m.name,
                            config: m.config.as_ref()?,
                            nested: report.parent.is_some(),
                        })
                    })
                })
                .collect();
            let across = edge_est::issue::fallback::across_layers(&layers);
            for (file, problem) in &across {
                eprintln!("{file}: {problem}");
            }
            if !across.is_empty() {
                failed += 1;
            }
            if failed > 0 {
                eprintln!("{failed} of {} manifest(s) have errors", files.len());
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Health {
            addr,
            config,
            data_dir,
            timeout,
        } => {
            let target = match (addr, config) {
                (Some(addr), _) => addr,
                (None, Some(config)) => {
                    let (config, _) = load(&config)?;
                    edge_est::health::probe_address(config.listen).to_string()
                }
                (None, None) => {
                    let dir = data_dir.unwrap_or_else(|| PathBuf::from(DEV_DATA_DIR));
                    match edge_est::health::recorded_listen(&dir).map_err(anyhow::Error::msg)? {
                        Some(addr) => edge_est::health::probe_address(addr).to_string(),
                        None => edge_est::health::probe_address(edge_est::config::default_listen())
                            .to_string(),
                    }
                }
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let status = runtime
                .block_on(edge_est::health::probe_host(
                    &target,
                    std::time::Duration::from_secs(timeout),
                ))
                .map_err(anyhow::Error::msg)?;
            println!("{status}");
            Ok(())
        }
        Command::Demo { dir, config_port } => {
            anyhow::ensure!(
                config_port <= u16::MAX - 2,
                "--config-port: the three layers need it and the two ports after it"
            );
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("edge-est-demo-{}", std::process::id()))
            });
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder
                .create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let _logging = match std::env::var_os("RUST_LOG") {
                Some(_) => Some(init_logging(cli.log_format, false)?),
                None => None,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime
                .block_on(edge_est::demo::run(&dir, config_port))
                .map_err(|e| anyhow::anyhow!("demo failed: {e}"))
        }
        Command::Serve {
            config,
            data_dir,
            listen,
            metrics_listen,
        } => {
            let _logging = init_logging(cli.log_format, module_mode(&config))?;
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

/// The development setup's directory when --data-dir does not say.
const DEV_DATA_DIR: &str = "./edge-est-data";

async fn serve(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    // Inside an IoT Edge module (IOTEDGE_WORKLOADURI set) and without --config: the module
    // twin configures the server (see `edge_est::edge`).
    // --data-dir overrides EDGE_EST_DATA_DIR there; --listen is the twin's to set.
    if module_mode(&config) {
        anyhow::ensure!(
            listen.is_none() && metrics_listen.is_none(),
            "--listen and --metrics-listen do not apply to an IoT Edge module: the module \
             twin's desired properties `listen` and `metrics_listen` set them"
        );
        let env = edge_est::edge::EdgeEnv::from_vars(|name| match (name, &data_dir) {
            ("EDGE_EST_DATA_DIR", Some(dir)) => Some(dir.to_string_lossy().into_owned()),
            _ => std::env::var(name).ok(),
        })?;
        return Ok(edge_est::edge::run(env, shutdown_signal()).await?);
    }
    let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(DEV_DATA_DIR));
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
        if let Err(e) = edge_est::health::record_listen(&setup.data_dir, local) {
            tracing::warn!(dir = %setup.data_dir.display(), error = %e, "cannot record the listener's address for `edge-est health`");
        }
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
         curl -sS --fail-with-body --cacert {root} -u {user}:{password} -H 'Content-Type: application/pkcs10' \\\n      \
         --data-binary @device.csr https://{host}/.well-known/est/simpleenroll \\\n    \
         | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out device.pem\n  \
         curl -sS --fail-with-body --cacert {root} https://{host}/.well-known/est/cacerts | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out chain.pem\n  \
         openssl verify -CAfile {root} -untrusted chain.pem device.pem\n",
        root = setup.root_pem().display(),
        user = dev::DEV_USER,
    );
}
