//! `est-bench summary`: the results of `bench/run.sh` (JSON files in one directory) printed
//! next to the crypto floor (in memory) and the socket floor, each checked against the targets
//! of issues 7 and 18.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use crate::floor::FloorReport;
use crate::load::LoadReport;

#[derive(Args, Debug)]
pub struct SummaryArgs {
    /// Directory holding floor.json and the runs' JSON files (see bench/run.sh).
    #[arg(long)]
    pub dir: PathBuf,
}

#[derive(Deserialize)]
struct IdleRss {
    rss_kib: u64,
}

fn read<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> anyhow::Result<Option<T>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("parsing {}", path.display()))
}

/// The storm's p99 target: a third of the 30 s IoT Edge gives one EST request.
const STORM_P99_TARGET_S: f64 = 10.0;

/// The storm's servers, in the order bench/run.sh passes their pids.
const STORM_LAYERS: [&str; 3] = [
    "top (signs)",
    "middle (forwards)",
    "bottom (forwards, devices)",
];

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn errors(r: &LoadReport) -> String {
    if r.failed == 0 {
        "0".to_owned()
    } else {
        format!("{} of {}", r.failed, r.completed)
    }
}

pub fn run(args: &SummaryArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    println!();
    println!("== edge-est benchmark summary ==");
    let mut floor: FloorReport = read(dir, "floor.json")?.context("floor.json is missing")?;
    let first_floor_p256_us = floor.floor_p256_us;
    // A second floor measured right after the P-256 local-sign run: the machine's speed drifts
    // (a VM shares its host), and the ratios use the mean of both.
    if let Some(end) = read::<FloorReport>(dir, "floor-end.json")? {
        println!(
            "crypto floor before / after the P-256 local-sign run: {:.0} / {:.0} µs all P-256, {:.0} / {:.0} µs \
             RSA-2048 issuer; the mean is used below",
            floor.floor_p256_us, end.floor_p256_us, floor.floor_rsa2048_us, end.floor_rsa2048_us
        );
        let mean = |a: f64, b: f64| (a + b) / 2.0;
        floor.handshake_server_us = mean(floor.handshake_server_us, end.handshake_server_us);
        floor.handshake_client_us = mean(floor.handshake_client_us, end.handshake_client_us);
        floor.handshake_server_rsa_ca_us = mean(
            floor.handshake_server_rsa_ca_us,
            end.handshake_server_rsa_ca_us,
        );
        floor.csr_verify_us = mean(floor.csr_verify_us, end.csr_verify_us);
        floor.sign_p256_us = mean(floor.sign_p256_us, end.sign_p256_us);
        floor.sign_rsa2048_us = mean(floor.sign_rsa2048_us, end.sign_rsa2048_us);
        floor.floor_p256_us = floor.handshake_server_us + floor.csr_verify_us + floor.sign_p256_us;
        floor.floor_rsa2048_us =
            floor.handshake_server_rsa_ca_us + floor.csr_verify_us + floor.sign_rsa2048_us;
        floor.floor_p256_both_sides_us = floor.floor_p256_us + floor.handshake_client_us;
        floor.floor_p256_per_s = 1e6 / floor.floor_p256_us;
        floor.floor_rsa2048_per_s = 1e6 / floor.floor_rsa2048_us;
        floor.floor_p256_both_sides_per_s = 1e6 / floor.floor_p256_both_sides_us;
        floor.cpu_over_wall = floor.cpu_over_wall.min(end.cpu_over_wall);
    }
    println!(
        "crypto floor, server side, one core ({}; {}; thread CPU time, the thread had the core \
         {:.0} % of the time):",
        floor.cpu_model,
        floor.tls,
        floor.cpu_over_wall * 100.0
    );
    println!(
        "  all P-256: handshake {:.0} + CSR {:.0} + sign {:.0} = {:.0} µs -> {:.0} enrollments/s per core",
        floor.handshake_server_us,
        floor.csr_verify_us,
        floor.sign_p256_us,
        floor.floor_p256_us,
        floor.floor_p256_per_s
    );
    println!(
        "  RSA-2048 issuer: handshake {:.0} + CSR {:.0} + sign {:.0} = {:.0} µs -> {:.0} enrollments/s per core",
        floor.handshake_server_rsa_ca_us,
        floor.csr_verify_us,
        floor.sign_rsa2048_us,
        floor.floor_rsa2048_us,
        floor.floor_rsa2048_per_s
    );
    println!(
        "  (both sides of the handshake, as the field notes count: {:.0} µs -> {:.0}/s)",
        floor.floor_p256_both_sides_us, floor.floor_p256_both_sides_per_s
    );
    println!();
    println!(
        "{:<46} {:>9} {:>8} {:>8} {:>10} {:>9} {:>7} {:>5}  {:<8} target",
        "scenario",
        "units/s",
        "p50 ms",
        "p99 ms",
        "srv µs/u",
        "u/s/core",
        "/floor",
        "other",
        "errors"
    );
    let row = |title: &str, r: &LoadReport, floor_per_s: Option<f64>, target: &str| {
        let ratio = match (floor_per_s, r.units_per_core_s) {
            (Some(f), Some(u)) => format!("{:.2}", u / f),
            _ => "-".to_owned(),
        };
        println!(
            "{:<46} {:>9.0} {:>8.2} {:>8.2} {:>10.0} {:>9.0} {:>7} {:>5}  {:<8} {}",
            title,
            r.rate,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.server_cpu_us_per_unit.unwrap_or(f64::NAN),
            r.units_per_core_s.unwrap_or(f64::NAN),
            ratio,
            r.other_cpu_share
                .map_or_else(|| "-".to_owned(), |o| format!("{:.0}%", o * 100.0)),
            errors(r),
            target
        );
    };

    let mut verdicts: Vec<String> = Vec::new();
    let mut rounds = sign_p256_rounds(dir, first_floor_p256_us)?;
    let side_by_side: Vec<String> = rounds.iter().map(SignRound::side_by_side).collect();
    rounds.sort_by(|a, b| a.ratio.total_cmp(&b.ratio));
    if let Some(median) = rounds.get(rounds.len() / 2) {
        let r = &median.report;
        let met = median.ratio >= 0.5 && rounds.iter().all(|round| round.report.failed == 0);
        row(
            &format!("local-sign P-256, fresh mTLS, c={}", r.concurrency),
            r,
            Some(1e6 / median.floor_us),
            &format!(">= 0.50 of floor: {}", verdict(met)),
        );
        let each: Vec<String> = rounds
            .iter()
            .map(|round| {
                format!(
                    "{:.2} ({:.0} µs vs a {:.0} µs floor)",
                    round.ratio,
                    round.report.server_cpu_us_per_unit.unwrap_or(f64::NAN),
                    round.floor_us
                )
            })
            .collect();
        println!(
            "{:<46} rounds, lowest first: {}; the median counts",
            "",
            each.join(", ")
        );
        if let Some(socket) = &median.socket {
            row(
                &format!("socket floor (minimal responder), c={}", socket.concurrency),
                socket,
                Some(1e6 / median.floor_us),
                "(same stack, no policy/journal/log)",
            );
        }
        verdicts.push(format!(
            "local-sign P-256 fresh mTLS >= 50 % of the floor per core of server CPU: {} ({:.0} %, median of {} rounds)",
            verdict(met),
            median.ratio * 100.0,
            rounds.len()
        ));
    }
    if side_by_side.iter().any(|s| !s.is_empty()) {
        println!();
        println!(
            "server CPU per fresh-mTLS enrollment, P-256, side by side (µs; in-memory floor = the \
             mean of the floors around the round):"
        );
        println!(
            "  {:<7} {:>10} {:>10} {:>9} {:>11} {:>11} {:>11} {:>11} {:>8} {:>8}",
            "round",
            "in-memory",
            "socket",
            "edge-est",
            "socket-mem",
            "edge-sock",
            "mem/edge",
            "sock/edge",
            "sock cs",
            "edge cs"
        );
        for line in side_by_side.iter().filter(|s| !s.is_empty()) {
            println!("  {line}");
        }
        println!(
            "  socket-mem: what sockets, syscalls and wake-ups cost this machine for the same \
             crypto; edge-sock: edge-est's own (HTTP, policy, journal, logging, metrics);\n  \
             mem/edge is the key ratio (target >= 0.50); cs: voluntary context switches of the \
             server per enrollment"
        );
        println!();
    }
    if let Some(r) = read::<LoadReport>(dir, "sign-rsa.json")? {
        row(
            &format!(
                "local-sign RSA-2048 issuer, fresh mTLS, c={}",
                r.concurrency
            ),
            &r,
            Some(floor.floor_rsa2048_per_s),
            "(vs the RSA floor)",
        );
    }
    if let Some(r) = read::<LoadReport>(dir, "iot-edge.json")? {
        row(
            &format!("IoT Edge shape (enroll+cacerts), c={}", r.concurrency),
            &r,
            Some(floor.floor_p256_per_s),
            "(issuances)",
        );
    }
    if let Some(r) = read::<LoadReport>(dir, "cacerts.json")? {
        let met = r.rate >= 20_000.0 && r.failed == 0;
        row(
            &format!("cacerts keep-alive, c={}", r.concurrency),
            &r,
            None,
            &format!(">= 20000/s: {}", verdict(met)),
        );
        verdicts.push(format!(
            "cacerts keep-alive >= 20,000 requests/s: {} ({:.0}/s)",
            verdict(met),
            r.rate
        ));
    }
    if let Some(r) = read::<LoadReport>(dir, "rss.json")? {
        row(
            &format!("100k enrollments, keep-alive mTLS, c={}", r.concurrency),
            &r,
            Some(floor.floor_p256_per_s),
            "(no handshake per request)",
        );
    }

    let forward: Vec<Option<LoadReport>> = (0..3)
        .map(|n| read::<LoadReport>(dir, &format!("forward-{n}.json")))
        .collect::<anyhow::Result<_>>()?;
    let forward_tput: Vec<Option<LoadReport>> = (0..3)
        .map(|n| read::<LoadReport>(dir, &format!("forward-tput-{n}.json")))
        .collect::<anyhow::Result<_>>()?;
    // The median p50 of the latency rounds (forward-N.json, forward-N.r2.json, ...).
    let median_p50 = |n: usize| -> anyhow::Result<Option<(f64, usize)>> {
        let mut p50s = Vec::new();
        for suffix in ["", ".r2", ".r3", ".r4", ".r5"] {
            if let Some(r) = read::<LoadReport>(dir, &format!("forward-{n}{suffix}.json"))? {
                p50s.push(r.latency_ms.p50);
            }
        }
        p50s.sort_by(f64::total_cmp);
        Ok(p50s.get(p50s.len() / 2).map(|m| (*m, p50s.len())))
    };
    let medians: Vec<Option<(f64, usize)>> =
        (0..3).map(median_p50).collect::<anyhow::Result<_>>()?;
    if forward.iter().all(Option::is_none) {
        println!("{:<46} forward: not supported by this build", "forwarding");
    } else {
        let base = medians[0].map(|(m, _)| m);
        for (n, r) in forward.iter().enumerate() {
            let Some(r) = r else { continue };
            let (median, rounds) = medians[n].unwrap_or((r.latency_ms.p50, 1));
            let target = match (n, base) {
                (0, _) => format!("(baseline; median p50 of {rounds} rounds {median:.2} ms)"),
                (_, Some(b)) => {
                    let added = (median - b) / n as f64;
                    let met = added <= 1.0 && r.failed == 0;
                    verdicts.push(format!(
                        "forwarding through {n} layer(s) adds <= 1 ms p50 per layer: {} \
                         ({added:+.2} ms per layer)",
                        verdict(met)
                    ));
                    format!(
                        "median p50 {median:.2} ms ({rounds} rounds): {added:+.2} ms/layer <= 1: {}",
                        verdict(met)
                    )
                }
                _ => "-".to_owned(),
            };
            row(
                &format!("forward {n} layer(s), fresh mTLS, c={}", r.concurrency),
                r,
                Some(floor.floor_p256_per_s),
                &target,
            );
        }
        for (n, r) in forward_tput.iter().enumerate() {
            let Some(r) = r else { continue };
            row(
                &format!("forward {n} layer(s), fresh mTLS, c={}", r.concurrency),
                r,
                Some(floor.floor_p256_per_s),
                "(all layers' CPU)",
            );
        }
    }

    if let Some(r) = read::<LoadReport>(dir, "storm.json")? {
        println!();
        let p99_s = r.latency_ms.p99 / 1000.0;
        let met = r.failed == 0 && p99_s <= STORM_P99_TARGET_S;
        println!(
            "storm: {} distinct devices re-enrolling (simpleenroll + cacerts, two fresh mTLS \
             connections each) at the bottom of three layers, c={}, fresh servers:",
            r.completed, r.concurrency
        );
        println!(
            "  completed in {:.1} s ({:.0} issuances/s); errors {}; latency p50 {:.0} ms, p99 {:.0} ms, \
             max {:.0} ms (target: 0 errors, p99 <= {:.0} s of IoT Edge's 30 s: {})",
            r.duration_s,
            r.rate,
            errors(&r),
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.max,
            STORM_P99_TARGET_S,
            verdict(met)
        );
        for (k, v) in &r.errors {
            println!("    error {k}: {v}");
        }
        for (server, layer) in r.servers.iter().zip(STORM_LAYERS) {
            println!(
                "  {layer:<28} {:>6.0} µs CPU per issuance, peak RSS (VmHWM) {:.1} MiB \
                 (from {:.1} MiB), {} voluntary context switches per issuance",
                server.cpu_us_per_unit,
                mib(server.memory_after.hwm_kib),
                mib(server.memory_before.rss_kib),
                server
                    .voluntary_switches_per_unit
                    .map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
            );
        }
        if let Some(all) = r.server_cpu_us_per_unit {
            println!(
                "  {:<28} {all:>6.0} µs CPU per issuance",
                "all three layers"
            );
        }
        verdicts.push(format!(
            "storm of {} devices through three layers: 0 errors and p99 <= {:.0} s: {} ({} errors, p99 {:.1} s, {:.1} s in all)",
            r.completed,
            STORM_P99_TARGET_S,
            verdict(met),
            r.failed,
            p99_s,
            r.duration_s
        ));
    }

    println!();
    let idle = read::<IdleRss>(dir, "idle-rss.json")?;
    if let Some(idle) = &idle {
        let met = idle.rss_kib <= 15 * 1024;
        println!(
            "idle RSS of a fresh server: {:.1} MiB (target <= 15 MiB: {})",
            mib(idle.rss_kib),
            verdict(met)
        );
        verdicts.push(format!(
            "idle RSS <= 15 MiB: {} ({:.1} MiB)",
            verdict(met),
            mib(idle.rss_kib)
        ));
    }
    if let Some(r) = read::<LoadReport>(dir, "rss.json")? {
        if let Some(server) = r.servers.first() {
            let samples = &server.rss_samples;
            let text: Vec<String> = samples
                .iter()
                .map(|(n, kib)| format!("{}k: {:.1}", n / 1000, mib(*kib)))
                .collect();
            println!(
                "RSS over {} enrollments (MiB at completed count): before {:.1}; {}; VmHWM {:.1}",
                r.completed,
                mib(server.memory_before.rss_kib),
                text.join(", "),
                mib(server.memory_after.hwm_kib)
            );
            if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
                let grown = last.1 as f64 - first.1 as f64;
                let per = grown * 1024.0 / (last.0.saturating_sub(first.0)).max(1) as f64;
                let met = grown <= 1024.0 && r.failed == 0;
                println!(
                    "  growth from {}k to {}k: {:+.1} MiB = {:+.1} bytes per enrollment \
                     (target: none, i.e. <= 1 MiB of allocator noise: {})",
                    first.0 / 1000,
                    last.0 / 1000,
                    grown / 1024.0,
                    per,
                    verdict(met)
                );
                verdicts.push(format!(
                    "no RSS growth over {} enrollments: {} ({:+.1} MiB from {}k to {}k)",
                    r.completed,
                    verdict(met),
                    grown / 1024.0,
                    first.0 / 1000,
                    last.0 / 1000
                ));
            }
        }
    }
    println!();
    println!("targets (issues 7 and 18):");
    for v in verdicts {
        println!("  - {v}");
    }
    Ok(())
}

/// One round of the P-256 local-sign run, set against the floor measured around it.
struct SignRound {
    report: LoadReport,
    /// The socket floor measured in the same round (socket-floor.json, ...), if any.
    socket: Option<LoadReport>,
    /// The mean of the floors measured just before and just after the round.
    floor_us: f64,
    ratio: f64,
}

impl SignRound {
    /// In-memory floor, socket floor, edge-est, their differences and ratios (per core).
    fn side_by_side(&self) -> String {
        let Some(socket) = &self.socket else {
            return String::new();
        };
        let edge = self.report.server_cpu_us_per_unit.unwrap_or(f64::NAN);
        let sock = socket.server_cpu_us_per_unit.unwrap_or(f64::NAN);
        let mem = self.floor_us;
        let switches = |r: &LoadReport| {
            r.servers
                .first()
                .and_then(|s| s.voluntary_switches_per_unit)
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
        };
        format!(
            "{:<7} {:>10.0} {:>10.0} {:>9.0} {:>+11.0} {:>+11.0} {:>11.2} {:>11.2} {:>8} {:>8}{}",
            self.report
                .name
                .as_deref()
                .and_then(|n| n.rsplit_once(".r").map(|(_, r)| r))
                .unwrap_or("1"),
            mem,
            sock,
            edge,
            sock - mem,
            edge - sock,
            mem / edge,
            sock / edge,
            switches(socket),
            switches(&self.report),
            if socket.failed > 0 || self.report.failed > 0 {
                "  (errors!)"
            } else {
                ""
            }
        )
    }
}

/// The rounds of the P-256 local-sign run (sign-p256.json, sign-p256.r2.json, ...), each
/// followed by a floor (floor-end.json, floor-end.r2.json, ...); the first round follows
/// floor.json. The VM's speed drifts over minutes, so each round has its own floor.
fn sign_p256_rounds(dir: &Path, first_floor_us: f64) -> anyhow::Result<Vec<SignRound>> {
    let mut before = first_floor_us;
    let mut rounds = Vec::new();
    for suffix in ["", ".r2", ".r3", ".r4", ".r5"] {
        let Some(report) = read::<LoadReport>(dir, &format!("sign-p256{suffix}.json"))? else {
            break;
        };
        let after = read::<FloorReport>(dir, &format!("floor-end{suffix}.json"))?
            .map_or(before, |f| f.floor_p256_us);
        let floor_us = (before + after) / 2.0;
        let ratio = report.units_per_core_s.unwrap_or(0.0) * floor_us / 1e6;
        let socket = read::<LoadReport>(dir, &format!("socket-floor{suffix}.json"))?;
        rounds.push(SignRound {
            report,
            socket,
            floor_us,
            ratio,
        });
        before = after;
    }
    Ok(rounds)
}
