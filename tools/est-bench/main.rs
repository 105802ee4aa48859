//! `est-bench`: a load generator for EST servers (RFC 7030), and the crypto-floor
//! microbenchmark and PKI generator behind `bench/run.sh`.
//!
//! ```text
//! est-bench [LOAD OPTIONS] https://localhost:8085/.well-known/est[/label]   drive a server
//! est-bench floor                 the crypto floor of one enrollment, one core, no sockets
//! est-bench pki --dir DIR         a benchmark PKI and server configurations
//! est-bench socket-floor --pki DIR   a minimal responder on the same stack: the socket floor
//! est-bench summary FLOOR.json NAME=RESULT.json ...   results next to the floor
//! est-bench outage               latency at the bottom of three layers, by outage of the top
//! est-bench hostile --server-bin BIN   refusing hostile client chains, and a client meanwhile
//! est-bench token                 a key in a PKCS#11 token vs a key file: signatures, handshakes
//! ```
//!
//! The load generator talks like IoT Edge's EST client (HTTP/1.1 without ALPN, lowercase
//! headers, base64 CSRs in 64-column lines, a fresh TLS connection per request unless
//! `--keep-alive`), checks every answer, and refuses any target that is not loopback unless
//! `--allow-remote` is given.

mod floor;
mod hostile;
mod load;
mod outage;
mod pki;
mod procfs;
mod socket_floor;
mod summary;
mod token;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "est-bench",
    version,
    about = "Load generator and crypto-floor benchmark for EST servers",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: load::LoadArgs,
}

#[derive(Subcommand)]
enum Command {
    /// The crypto floor of one enrollment on one core: TLS 1.3 full handshake with a P-256
    /// client certificate + CSR parse/verify + certificate signing, in memory, one thread.
    Floor(floor::FloorArgs),
    /// Writes a benchmark PKI (P-256 and RSA-2048 issuing CAs, server, device and RA
    /// credentials) and edge-est configurations into a directory.
    Pki(pki::PkiArgs),
    /// The socket floor: a minimal EST responder on edge-est's stack (TLS with a client
    /// certificate, one request, CSR verified, leaf signed; no policy, journal or logging),
    /// to be driven by the load generator.
    SocketFloor(socket_floor::SocketFloorArgs),
    /// Enrollment latency at the bottom of three layers in each outage shape of the top (up,
    /// refusing, hung, dropping SYNs); layers run in this process.
    Outage(outage::OutageArgs),
    /// Prints benchmark results (JSON files of `--json` runs) next to the floor.
    Summary(summary::SummaryArgs),
    /// What refusing hostile client certificate chains costs a server (a given edge-est
    /// binary), and a legitimate client's latency meanwhile.
    Hostile(hostile::HostileArgs),
    /// What a key in a PKCS#11 token (SoftHSM2) costs next to a key file: issuing signatures
    /// and TLS handshakes, in process.
    Token(token::TokenArgs),
}

/// Hands a report out: as JSON into `json_out` if given, and on stdout as JSON (`json`) or as
/// text (`print`).
fn emit<T: serde::Serialize>(
    report: &T,
    json_out: Option<&std::path::Path>,
    json: bool,
    print: impl FnOnce(&T),
) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = serde_json::to_string_pretty(report)?;
    if let Some(path) = json_out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        println!("{text}");
    } else {
        print(report);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Floor(args)) => floor::run(&args),
        Some(Command::Pki(args)) => pki::run(&args),
        Some(Command::SocketFloor(args)) => socket_floor::run(&args),
        Some(Command::Outage(args)) => outage::run(&args),
        Some(Command::Summary(args)) => summary::run(&args),
        Some(Command::Hostile(args)) => hostile::run(&args),
        Some(Command::Token(args)) => token::run(&args),
        None => load::run(cli.load),
    }
}
