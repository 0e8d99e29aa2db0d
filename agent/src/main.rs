//! `podiam-agent`: check the flags, set up logging, then serve or uninstall. Serving: install
//! the iptables rules if none are in place, build the agent, bind its listeners, install the
//! rules (again: idempotent), serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use podiam_agent::config::{Cli, Command, Interception, ServeConfig, ValidConfig};
use podiam_agent::intercepted::Intercepted;
use podiam_agent::iptables::{Dnat, Flush, Iptables, Upkeep, flush_conntrack};
use podiam_agent::{Agent, Listeners};
use tokio_util::sync::CancellationToken;

/// The program that deletes conntrack entries (conntrack-tools'), looked up in PATH.
const CONNTRACK: &str = "conntrack";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Serve(config) => match ServeConfig::validate(*config) {
            Ok(config) => Ok(config),
            Err(problems) => {
                for problem in problems {
                    eprintln!("podiam-agent: {problem}");
                }
                return ExitCode::from(2);
            }
        },
        Command::Uninstall(config) => Err(config),
    };
    podiam_runtime::telemetry::init(cli.log_format, &cli.log_level);
    podiam_runtime::tls::install_crypto_provider();
    let threads = match &command {
        Ok(config) => config.worker_threads,
        Err(_) => 1,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "starting the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Ok(config) => serve(config).await,
            Err(config) => uninstall(config).await,
        }
    });
    // Serving has ended; what may still run is a DNS lookup on a blocking thread (one that
    // hangs for as long as an unanswering DNS server makes it), which nobody waits for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: ValidConfig) -> anyhow::Result<()> {
    tracing::info!(worker_threads = config.worker_threads, "starting");
    let mut rules = rules_before_start(&config).await?;
    let agent = Agent::build(config.clone()).await?;
    // Both ports with SO_REUSEPORT: during a rolling update (DaemonSet maxSurge) the new
    // agent binds beside the old one; the kernel spreads connections over both until the old
    // one stops accepting. The kubelet's probes may meanwhile reach either agent, which is
    // harmless: both serve.
    let bind = |addr| {
        podiam_runtime::serve::bind_reuseport(addr).with_context(|| format!("binding {addr}"))
    };
    let listeners = Listeners {
        pods: bind(config.listen)?,
        container: config.container_listen.map(bind).transpose()?,
        pods6: config.listen6.map(bind).transpose()?,
        container6: config.container_listen6.map(bind).transpose()?,
        health: bind(config.health_listen)?,
    };
    if let Some(warning) = config.pod_port_warning(podiam_agent::config::unprivileged_port_start())
    {
        tracing::warn!("{warning}");
    }
    if let (None, Some(interception)) = (&rules, &config.iptables) {
        rules = Some((intercept(interception, false).await?, interception));
    }
    // Written last: whoever reads the file finds every listener bound and the rules in place.
    if let Some(path) = &config.listen_address_file {
        write_addresses(path, &listeners)?;
    }
    // With the rules ours, pods' connections come through them and only those are served.
    let listeners = only_intercepted(listeners, rules.is_some(), agent.connection_observer());
    let shutdown = CancellationToken::new();
    tokio::spawn(podiam_runtime::telemetry::cancel_on_signal(
        shutdown.clone(),
    ));
    // The rules are kept until the pod-facing port has drained.
    let stop = CancellationToken::new();
    let intercepting = rules.is_some();
    let keeping = keep_intercepting(rules, &agent, &stop);
    // With the rules in place, the servers may lift this node's agent-not-ready taint.
    let reporting = intercepting.then(|| tokio::spawn(agent.report_node_ready(stop.clone())));
    let served = agent.serve(listeners, shutdown).await;
    stop.cancel();
    if let Some(reporting) = reporting {
        let _ = reporting.await;
    }
    if !keeping.is_empty() {
        for kept in keeping {
            let _ = kept.await;
        }
        tracing::info!("stopped; the iptables rules stay (podiam-agent uninstall removes them)");
    }
    served
}

/// The rules installed before anything else the agent does at start, where none are in
/// place (a node just booted, or rules uninstalled): until they are, pods reach the node's
/// own metadata service, and a start that fails or waits (TLS files, the servers' names,
/// the ports) would leave them so; with the rules and no agent listening yet, pods are
/// refused instead. Where an agent's rules are in place already (a restart, a rolling
/// update) they keep pods away meanwhile, and they are installed anew only once the agent
/// has started: a new agent that cannot start does not point them elsewhere.
async fn rules_before_start(
    config: &ValidConfig,
) -> anyhow::Result<Option<(Vec<Family>, &Interception)>> {
    let Some(interception) = &config.iptables else {
        return Ok(None);
    };
    let mut programs = vec![interception.program.as_str()];
    programs.extend(interception.v6.as_ref().map(|v6| v6.program.as_str()));
    for program in programs {
        if !Iptables::new(program).in_place().await {
            return Ok(Some((intercept(interception, true).await?, interception)));
        }
    }
    Ok(None)
}

/// One address family's iptables program and its DNAT rules, as installed.
type Family = (Iptables, Vec<Dnat>);

/// Keeps the installed `rules` in place, and checks that they reach this node's pods,
/// until `stop`: the tasks that end then.
fn keep_intercepting(
    rules: Option<(Vec<Family>, &Interception)>,
    agent: &Agent,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let Some((families, interception)) = rules else {
        return Vec::new();
    };
    let mut tasks: Vec<_> = families
        .into_iter()
        .map(|(iptables, dnats)| {
            let stop = stop.clone();
            let interfaces = interception.interfaces.clone();
            let upkeep = Upkeep {
                interval: interception.sync_interval,
                conntrack: interception.flush_conntrack.then(|| CONNTRACK.to_string()),
                repairs: agent.iptables_repairs(),
            };
            tokio::spawn(async move { iptables.keep(&dnats, &interfaces, upkeep, stop).await })
        })
        .collect();
    let own = std::iter::once(interception.target.ip())
        .chain(interception.v6.as_ref().map(|v6| v6.target.ip()))
        .collect();
    tasks.push(tokio::spawn(agent.check_reach(
        interception.interfaces.clone(),
        own,
        interception.sync_interval,
        stop.clone(),
    )));
    tasks
}

/// The pod-facing `listeners`, taking only connections that came through the DNAT rules
/// when `check` (see [`Intercepted`]).
fn only_intercepted(
    listeners: Listeners,
    check: bool,
    observer: std::sync::Arc<dyn podiam_runtime::serve::ConnectionObserver>,
) -> Listeners<Intercepted> {
    let wrap = |listener| Intercepted::new(listener, check, std::sync::Arc::clone(&observer));
    Listeners {
        pods: wrap(listeners.pods),
        container: listeners.container.map(wrap),
        pods6: listeners.pods6.map(wrap),
        container6: listeners.container6.map(wrap),
        health: listeners.health,
    }
}

/// Writes where each listener listens (`--listen-address-file`, for ports 0).
fn write_addresses(path: &std::path::Path, listeners: &Listeners) -> anyhow::Result<()> {
    let mut addresses = vec![("listen", listeners.pods.local_addr()?)];
    for (name, listener) in [
        ("container-listen", &listeners.container),
        ("listen6", &listeners.pods6),
        ("container-listen6", &listeners.container6),
    ] {
        if let Some(listener) = listener {
            addresses.push((name, listener.local_addr()?));
        }
    }
    addresses.push(("health-listen", listeners.health.local_addr()?));
    podiam_runtime::net::write_address_file(path, &addresses)
        .with_context(|| format!("writing --listen-address-file {}", path.display()))
}

/// Installs the DNAT rules and their jumps: pods' metadata (and container-credentials)
/// traffic comes here from now on, and keeps coming here (refused while no agent listens)
/// until `uninstall`. With `--flush-conntrack`, connections that would bypass them are cut:
/// where no rules of ours were in place (`fresh`: a node just booted, podiam newly
/// installed, another tool's rules being replaced), every connection toward the addresses;
/// otherwise (a restart, a rolling update) only those that went straight to an address, and
/// only if the rules needed mending: the connections DNATed to the running agent, and those
/// waiting for this one, go on.
async fn intercept(interception: &Interception, fresh: bool) -> anyhow::Result<Vec<Family>> {
    let mut families = vec![(Iptables::new(&interception.program), interception.dnats())];
    if let Some(v6) = &interception.v6 {
        families.push((Iptables::new(&v6.program), v6.dnats()));
    }
    let mut flushed = Vec::new();
    for (iptables, dnats) in &families {
        let changed = iptables
            .install(dnats, &interception.interfaces)
            .await
            .context("installing the iptables rules")?;
        let flush = match (interception.flush_conntrack, fresh, changed) {
            (true, true, _) => Some(Flush::Every),
            (true, false, true) => Some(Flush::Direct),
            _ => None,
        };
        let Some(flush) = flush else { continue };
        flush_conntrack(CONNTRACK, dnats, flush)
            .await
            .context("deleting conntrack entries that bypass the rules")?;
        flushed.push(flush);
    }
    tracing::info!(
        target = %interception.target,
        container_target = ?interception.container_target,
        ipv6 = ?interception.v6,
        interfaces = ?interception.interfaces,
        flushed_conntrack = ?flushed.first(),
        "iptables rules in place"
    );
    Ok(families)
}

/// Removes the iptables rules and, when asked, the token key file. Either missing is fine:
/// uninstalling twice succeeds.
async fn uninstall(config: podiam_agent::config::UninstallConfig) -> anyhow::Result<()> {
    let ip6tables = podiam_agent::config::ip6tables_program(
        &config.iptables_bin,
        config.ip6tables_bin.as_deref(),
    );
    Iptables::new(config.iptables_bin).uninstall().await?;
    tracing::info!("iptables rules removed");
    // A node without IPv6 (or without ip6tables) has no IPv6 rules of ours to remove.
    match Iptables::new(&ip6tables).uninstall().await {
        Ok(()) => tracing::info!("ip6tables rules removed"),
        Err(error) => tracing::warn!(%error, "no ip6tables rules removed"),
    }
    if let Some(path) = config.token_key_file {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "token key file removed"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "no token key file to remove");
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("removing the token key file {}", path.display())));
            }
        }
    }
    Ok(())
}
