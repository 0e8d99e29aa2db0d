//! The agent's iptables rules: its own nat chain, and a jump to it from PREROUTING for each
//! pod interface pattern and intercepted address — the instance metadata address, and the
//! container-credentials address when that endpoint is on.
//!
//! ```text
//! PREROUTING -i cali+ -d 169.254.169.254/32 -p tcp --dport 80 -j PODIAM   (per pattern)
//! PREROUTING -i cali+ -d 169.254.170.23/32 -p tcp --dport 80 -j PODIAM    (per pattern)
//! PODIAM     -d 169.254.169.254/32 -p tcp --dport 80 -j DNAT --to-destination HOST:254
//! PODIAM     -d 169.254.170.23/32 -p tcp --dport 80 -j DNAT --to-destination HOST:253
//! ```
//!
//! Fail closed: the rules stay in place when the agent stops, so while it is down pods'
//! metadata requests are DNATed to a closed port and refused — they never fall through to
//! the node's own metadata service. Only the explicit `uninstall` removes them.
//!
//! Installing is idempotent and never leaves the chain empty, even for an instant: a changed
//! DNAT target is inserted first and the old rule deleted after. Every command uses `-w` to
//! wait for the xtables lock instead of failing when another program holds it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// The agent's own chain in the nat table.
pub const CHAIN: &str = "PODIAM";
/// The instance metadata address pods are intercepted on.
pub const METADATA_IP: &str = "169.254.169.254";
/// The container-credentials address (EKS Pod Identity's) pods are intercepted on.
pub const CONTAINER_IP: &str = "169.254.170.23";
/// The instance metadata service's IPv6 address (Nitro instances).
pub const METADATA_IP6: &str = "fd00:ec2::254";
/// The container-credentials endpoint's IPv6 address.
pub const CONTAINER_IP6: &str = "fd00:ec2::23";

/// One intercepted address (port 80) and where its DNAT rule sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dnat {
    pub address: &'static str,
    pub target: SocketAddr,
}

/// Why an iptables command failed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("interface pattern {0:?} is not a valid interface name or prefix (like cali+)")]
    BadInterface(String),
}

/// Checks an interface pattern: a name of up to 15 characters, optionally ending in `+`.
pub fn valid_interface(pattern: &str) -> bool {
    let pattern = pattern.strip_prefix('!').unwrap_or(pattern);
    let name = pattern.strip_suffix('+').unwrap_or(pattern);
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

/// The match of an intercepted address's rules: TCP to `address`, port 80.
fn address_match(address: &str) -> Vec<String> {
    let bits = if address.contains(':') { 128 } else { 32 };
    [
        "-d",
        &format!("{address}/{bits}"),
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        "80",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The PREROUTING rule that jumps to our chain for one interface pattern and address; a
/// pattern `!eth0` (kiam's spelling) matches every interface but that one (`! -i eth0`).
pub fn jump_rule(interface: &str, address: &str) -> Vec<String> {
    let mut rule = address_match(address);
    // In the order `iptables -S` prints them: `-i` first, but `! -i` after `-d`.
    match interface.strip_prefix('!') {
        Some(excluded) => {
            let negated = ["!", "-i", excluded].map(String::from);
            rule.splice(2..2, negated);
        }
        None => {
            rule.splice(0..0, ["-i", interface].map(String::from));
        }
    }
    rule.extend(["-j".to_string(), CHAIN.to_string()]);
    rule
}

/// A DNAT rule inside our chain.
pub fn dnat_rule(dnat: Dnat) -> Vec<String> {
    let mut rule = address_match(dnat.address);
    rule.extend([
        "-j".to_string(),
        "DNAT".to_string(),
        "--to-destination".to_string(),
        dnat.target.to_string(),
    ]);
    rule
}

/// Runs iptables commands in the nat table.
#[derive(Clone, Debug)]
pub struct Iptables {
    program: String,
}

impl Iptables {
    pub fn new(program: impl Into<String>) -> Iptables {
        Iptables {
            program: program.into(),
        }
    }

    /// Runs `iptables -w -t nat ARGS…` and returns its output, whatever its exit status.
    async fn output(&self, args: &[&str]) -> Result<std::process::Output, IptablesError> {
        Command::new(&self.program)
            .args(["-w", "-t", "nat"])
            .args(args)
            .output()
            .await
            .map_err(|source| IptablesError::Spawn {
                program: self.program.clone(),
                source,
            })
    }

    /// Runs `iptables -w -t nat ARGS…`; Ok(false) when it exits 1 (a `-C` check that did not
    /// match, a chain that does not exist).
    async fn run(&self, args: &[String]) -> Result<bool, IptablesError> {
        let args_str: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = self.output(&args_str).await?;
        match output.status.code() {
            Some(0) => Ok(true),
            Some(1)
                if args
                    .first()
                    .is_some_and(|a| a == "-C" || a == "-S" || a == "-N") =>
            {
                Ok(false)
            }
            _ => Err(IptablesError::Failed {
                command: format!("{} -w -t nat {}", self.program, args.join(" ")),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            }),
        }
    }

    /// The rules of `chain` as `iptables -S` prints them; `None` when the chain does not
    /// exist (exit status 1). Any other failure — no permission (3 or 4), no table — is an
    /// error: taking it for "no chain" would let `uninstall` report success having removed
    /// nothing.
    async fn rules(&self, chain: &str) -> Result<Option<Vec<String>>, IptablesError> {
        let output = self.output(&["-S", chain]).await?;
        match output.status.code() {
            Some(0) => {}
            Some(1) => return Ok(None),
            _ => {
                return Err(IptablesError::Failed {
                    command: format!("{} -w -t nat -S {chain}", self.program),
                    stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                });
            }
        }
        let prefix = format!("-A {chain} ");
        Ok(Some(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|l| l.starts_with(&prefix))
                .map(str::to_string)
                .collect(),
        ))
    }

    fn with(op: &str, chain: &str, rule: &[String]) -> Vec<String> {
        let mut args = vec![op.to_string(), chain.to_string()];
        args.extend_from_slice(rule);
        args
    }

    /// Whether this program's rules are in place already: our chain with its rules, and a
    /// jump to it in PREROUTING (an agent ran here since the node booted). An error reads as
    /// not in place.
    pub async fn in_place(&self) -> bool {
        let chain = matches!(self.rules(CHAIN).await, Ok(Some(rules)) if rules.len() > 1);
        let jump = format!("-j {CHAIN}");
        chain
            && matches!(self.rules("PREROUTING").await,
                        Ok(Some(rules)) if rules.iter().any(|r| r.ends_with(&jump)))
    }

    /// Installs (or repairs) the chain, its DNAT rules (`dnats`, in order), and the jumps
    /// for each interface pattern and address. Idempotent.
    pub async fn install(
        &self,
        dnats: &[Dnat],
        interfaces: &[String],
    ) -> Result<bool, IptablesError> {
        let mut changed = false;
        if let Some(bad) = interfaces.iter().find(|i| !valid_interface(i)) {
            return Err(IptablesError::BadInterface(bad.clone()));
        }
        // 1. Our chain, holding exactly the DNAT rules, before anything jumps to it.
        let existing = match self.rules(CHAIN).await? {
            Some(rules) => rules,
            None => {
                self.run(&["-N".to_string(), CHAIN.to_string()]).await?;
                changed = true;
                Vec::new()
            }
        };
        let mut wanted = Vec::new();
        for dnat in dnats {
            wanted.push(dnat_rule(*dnat));
        }
        let mut in_place = existing.len() == wanted.len();
        for rule in &wanted {
            in_place = in_place && self.run(&Self::with("-C", CHAIN, rule)).await?;
        }
        if !in_place {
            changed = true;
            // Insert the right rules first, then delete everything after them: never empty.
            for (at, rule) in wanted.iter().enumerate() {
                let position = (at + 1).to_string();
                self.run(&Self::with("-I", CHAIN, &[&[position][..], rule].concat()))
                    .await?;
            }
            let after = (wanted.len() + 1).to_string();
            for _ in 1..=existing.len() {
                self.run(&["-D".to_string(), CHAIN.to_string(), after.clone()])
                    .await?;
            }
        }
        // 2. The jumps, first in PREROUTING so no other DNAT wins.
        let mut jumps = Vec::new();
        for interface in interfaces {
            for dnat in dnats {
                jumps.push(jump_rule(interface, dnat.address));
            }
        }
        for jump in jumps {
            if !self.run(&Self::with("-C", "PREROUTING", &jump)).await? {
                changed = true;
                self.run(&Self::with(
                    "-I",
                    "PREROUTING",
                    &[&["1".to_string()][..], &jump].concat(),
                ))
                .await?;
            }
        }
        Ok(changed)
    }

    /// Checks the rules every `upkeep.interval` until `shutdown`, and repairs them if someone
    /// removed or changed them, counting each repair. After a repair, when `upkeep` says so,
    /// connections that reached an intercepted address directly while the rules were gone
    /// are cut (their conntrack entries deleted), so that none outlives the repair.
    pub async fn keep(
        &self,
        dnats: &[Dnat],
        interfaces: &[String],
        upkeep: Upkeep,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(upkeep.interval) => {}
            }
            match self.install(dnats, interfaces).await {
                Ok(true) => {
                    if let Some(program) = &upkeep.conntrack
                        && let Err(error) = flush_conntrack(program, dnats, Flush::Direct).await
                    {
                        tracing::error!(%error, "cutting connections that bypassed the rules failed");
                    }
                    upkeep.repairs.inc();
                    tracing::warn!(
                        program = %self.program,
                        "iptables rules were changed by someone else; repaired"
                    );
                }
                Ok(false) => {}
                Err(error) => tracing::error!(%error, "checking the iptables rules failed"),
            }
        }
    }

    /// Removes every jump to our chain (whatever its interface) and the chain itself.
    /// The explicit uninstall action; idempotent. Fails unless PREROUTING could be read.
    pub async fn uninstall(&self) -> Result<(), IptablesError> {
        let prerouting = self
            .rules("PREROUTING")
            .await?
            .ok_or_else(|| IptablesError::Failed {
                command: format!("{} -w -t nat -S PREROUTING", self.program),
                stderr: "the nat table has no PREROUTING chain".to_string(),
            })?;
        let jumps: Vec<String> = prerouting
            .into_iter()
            .filter(|rule| rule.ends_with(&format!(" -j {CHAIN}")))
            .collect();
        for rule in jumps {
            let args: Vec<String> = rule
                .split_whitespace()
                .enumerate()
                .map(|(i, word)| {
                    if i == 0 {
                        "-D".to_string()
                    } else {
                        word.to_string()
                    }
                })
                .collect();
            self.run(&args).await?;
        }
        if self.rules(CHAIN).await?.is_some() {
            self.run(&["-F".to_string(), CHAIN.to_string()]).await?;
            self.run(&["-X".to_string(), CHAIN.to_string()]).await?;
        }
        Ok(())
    }
}

/// How the rules are kept: how often they are checked, the `conntrack` program to cut
/// connections that bypassed them with (none: not cut), and the counter of repairs.
#[derive(Clone, Debug)]
pub struct Upkeep {
    pub interval: Duration,
    pub conntrack: Option<String>,
    pub repairs: prometheus_client::metrics::counter::Counter,
}

/// Which conntrack entries toward an intercepted address [`flush_conntrack`] deletes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// Every one: at start, when connections to an earlier agent (or an earlier tool's DNAT
    /// target) and to the node's own service alike must go.
    Every,
    /// Those whose replies come from the address itself: connections that went straight to
    /// the node's service while the rules were gone. Connections DNATed to the agent stay
    /// (deleting their entries could reset requests in flight).
    Direct,
}

/// Deletes conntrack entries of TCP connections toward each of `dnats`' addresses, port 80
/// (which ones: `flush`), so that a connection a pod opened while no rule sent it to the
/// agent cannot go on bypassing it. Finding none is not an error; one address failing does
/// not keep the others' from being deleted (the first failure is returned).
pub async fn flush_conntrack(
    program: &str,
    dnats: &[Dnat],
    flush: Flush,
) -> Result<(), IptablesError> {
    let mut first_failure = None;
    for dnat in dnats {
        let args = conntrack_delete_args(dnat.address, flush);
        let failure = match Command::new(program).args(&args).output().await {
            Err(source) => Some(IptablesError::Spawn {
                program: program.to_string(),
                source,
            }),
            Ok(output) => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                (!output.status.success() && !stderr.contains("0 flow entries")).then(|| {
                    IptablesError::Failed {
                        command: format!("{program} {}", args.join(" ")),
                        stderr: stderr.trim().to_string(),
                    }
                })
            }
        };
        first_failure = first_failure.or(failure);
    }
    first_failure.map_or(Ok(()), Err)
}

/// The `conntrack -D` arguments that delete the entries `flush` names toward `address`:80.
fn conntrack_delete_args(address: &str, flush: Flush) -> Vec<&str> {
    let family = if address.contains(':') {
        "ipv6"
    } else {
        "ipv4"
    };
    let mut args = vec![
        "-D",
        "-f",
        family,
        "-p",
        "tcp",
        "--orig-dst",
        address,
        "--dport",
        "80",
    ];
    if flush == Flush::Direct {
        args.extend(["--reply-src", address]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_patterns() {
        for ok in [
            "cali+", "eni+", "cni0", "weave", "podv+", "eth0.100", "!eth0", "!ens+",
        ] {
            assert!(valid_interface(ok), "{ok}");
        }
        for bad in [
            "",
            "+",
            "a b",
            "verylonginterface0",
            "cali+ -j ACCEPT",
            "x;y",
            "!",
            "!!eth0",
            "! eth0",
            "eth0!",
        ] {
            assert!(!valid_interface(bad), "{bad}");
        }
    }

    #[test]
    fn a_repair_deletes_only_the_entries_of_direct_connections() {
        assert_eq!(
            conntrack_delete_args(METADATA_IP, Flush::Every).join(" "),
            "-D -f ipv4 -p tcp --orig-dst 169.254.169.254 --dport 80"
        );
        // Replies from the address itself: nothing DNATed them to the agent.
        assert_eq!(
            conntrack_delete_args(CONTAINER_IP6, Flush::Direct).join(" "),
            "-D -f ipv6 -p tcp --orig-dst fd00:ec2::23 --dport 80 --reply-src fd00:ec2::23"
        );
    }

    #[test]
    fn rules_are_what_iptables_prints_back() {
        // `iptables -S` prints rules in this canonical order, so the uninstall's parsing and
        // the install's checks agree.
        assert_eq!(
            jump_rule("cali+", METADATA_IP).join(" "),
            "-i cali+ -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j PODIAM"
        );
        assert_eq!(
            jump_rule("!eth0", METADATA_IP).join(" "),
            "-d 169.254.169.254/32 ! -i eth0 -p tcp -m tcp --dport 80 -j PODIAM"
        );
        assert_eq!(
            jump_rule("eni+", CONTAINER_IP).join(" "),
            "-i eni+ -d 169.254.170.23/32 -p tcp -m tcp --dport 80 -j PODIAM"
        );
        let dnat = Dnat {
            address: METADATA_IP,
            target: "10.0.0.1:8181".parse().expect("addr"),
        };
        assert_eq!(
            dnat_rule(dnat).join(" "),
            "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.1:8181"
        );
        let dnat6 = Dnat {
            address: METADATA_IP6,
            target: "[fd00:77::1]:254".parse().expect("addr"),
        };
        assert_eq!(
            dnat_rule(dnat6).join(" "),
            "-d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd00:77::1]:254"
        );
        assert_eq!(
            jump_rule("cali+", CONTAINER_IP6).join(" "),
            "-i cali+ -d fd00:ec2::23/128 -p tcp -m tcp --dport 80 -j PODIAM"
        );
    }
}
