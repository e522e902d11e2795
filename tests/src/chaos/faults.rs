//! The faults a chaos phase injects, by name (`docs/chaos.md`, "The
//! faults"). What each does to the cluster is in `run.rs`; what the client
//! processes do differently under it (poison values, racing writes, more
//! keys) is in `client.rs`.

use std::fmt;
use std::str::FromStr;

/// A fault a phase injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// No fault: the baseline.
    None,
    /// SIGKILL of a cache node, restarted (empty) at the heal.
    NodeKill,
    /// SIGSTOP of a cache node, SIGCONT at the heal.
    NodePause,
    /// Every client is cut off from a node: its proxies blackhole (existing
    /// connections hang, new ones hang), as a real partition looks.
    Partition,
    /// Added latency between the clients and a node.
    Latency,
    /// SIGKILL of the Kafka broker, restarted on the same log at the heal.
    BrokerRestart,
    /// PostgreSQL stopped (fast), started again at the heal.
    PostgresRestart,
    /// SIGKILL of the write-back worker, restarted at the heal.
    WorkerKill,
    /// SIGSTOP of PostgreSQL (the postmaster and every backend): every
    /// statement hangs with its connection open; SIGCONT at the heal.
    DbStall,
    /// SIGSTOP of one client process (its requests, clock and health view
    /// freeze mid-flight); SIGCONT at the heal.
    ClientPause,
    /// One client's proxy to one node blackholes; every other path works.
    AsymmetricPartition,
    /// The clients also write values the table's CHECK constraint refuses
    /// (`poison…`).
    Poison,
    /// The write-back worker stopped (SIGKILL) while the clients write to
    /// more keys, until the nodes' `max_dirty_bytes` refuses dirty writes;
    /// started again at the heal.
    DirtyBudget,
    /// Write-through keyspaces switched live to cache-aside, back to
    /// write-through, then to write-around (away) until the phase ends.
    StrategySwitch,
    /// The worker is restarted with the fault point that exits between a
    /// batch's commit and `MarkClean`; restarted without it at the heal.
    WorkerKillAfterCommit,
    /// The clients also write shared keys at the same wall-clock
    /// millisecond.
    RacingWriters,
}

impl FaultKind {
    /// Every fault, in the default schedule's order.
    pub const ALL: [FaultKind; 15] = [
        FaultKind::NodeKill,
        FaultKind::NodePause,
        FaultKind::Partition,
        FaultKind::Latency,
        FaultKind::BrokerRestart,
        FaultKind::PostgresRestart,
        FaultKind::WorkerKill,
        FaultKind::DbStall,
        FaultKind::ClientPause,
        FaultKind::AsymmetricPartition,
        FaultKind::Poison,
        FaultKind::DirtyBudget,
        FaultKind::StrategySwitch,
        FaultKind::WorkerKillAfterCommit,
        FaultKind::RacingWriters,
    ];

    /// The faults of the single-client suite before many writers: for
    /// comparing with it.
    pub const SINGLE_WRITER: [FaultKind; 7] = [
        FaultKind::NodeKill,
        FaultKind::NodePause,
        FaultKind::Partition,
        FaultKind::Latency,
        FaultKind::BrokerRestart,
        FaultKind::PostgresRestart,
        FaultKind::WorkerKill,
    ];

    /// The fault's name, as options and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::None => "none",
            FaultKind::NodeKill => "node-kill",
            FaultKind::NodePause => "node-pause",
            FaultKind::Partition => "partition",
            FaultKind::Latency => "latency",
            FaultKind::BrokerRestart => "broker-restart",
            FaultKind::PostgresRestart => "postgres-restart",
            FaultKind::WorkerKill => "worker-kill",
            FaultKind::DbStall => "db-stall",
            FaultKind::ClientPause => "client-pause",
            FaultKind::AsymmetricPartition => "asymmetric-partition",
            FaultKind::Poison => "poison",
            FaultKind::DirtyBudget => "dirty-budget",
            FaultKind::StrategySwitch => "strategy-switch",
            FaultKind::WorkerKillAfterCommit => "worker-kill-after-commit",
            FaultKind::RacingWriters => "racing-writers",
        }
    }

    /// Whether the fault may cut a client off from a key's owner (or make
    /// the owner lose what it held), so that the client reads another node
    /// or the store: the faults under which a write-back client may miss
    /// its own write for the strategy's bound (`docs/write-back.md`).
    /// Latency counts: calls that time out mark the node down as a
    /// partition would.
    pub fn cuts_nodes(self) -> bool {
        matches!(
            self,
            FaultKind::NodeKill
                | FaultKind::NodePause
                | FaultKind::Latency
                | FaultKind::Partition
                | FaultKind::AsymmetricPartition
                | FaultKind::ClientPause
        )
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        std::iter::once(FaultKind::None)
            .chain(FaultKind::ALL)
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown fault {s:?}; one of none, {}",
                    FaultKind::ALL.map(FaultKind::name).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_names_round_trip() {
        for fault in std::iter::once(FaultKind::None).chain(FaultKind::ALL) {
            assert_eq!(fault.name().parse::<FaultKind>(), Ok(fault));
        }
        assert!("sigkill".parse::<FaultKind>().is_err());
    }

    #[test]
    fn every_single_writer_fault_is_in_the_full_schedule() {
        for fault in FaultKind::SINGLE_WRITER {
            assert!(FaultKind::ALL.contains(&fault), "{fault}");
        }
    }
}
