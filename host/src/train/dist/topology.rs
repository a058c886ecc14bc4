//! Who this process is in a data-parallel run, parsed once: from `--nproc-per-node` and its
//! companions (this process then launches the workers), or from torchrun's environment
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), or from Slurm's
//! (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR`/`MASTER_PORT` exported
//! by the batch script), in that order.

use anyhow::{Context as _, Result, bail};

/// torchrun's default port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// One rank's place in the world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub world_size: usize,
    /// The rank among this host's processes: the GPU it uses.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Topology {
    pub fn single() -> Self {
        Topology {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
        }
    }

    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// The launcher's flags, as `adapterlab train` takes them (torchrun's names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchFlags {
    pub nproc_per_node: Option<usize>,
    pub nnodes: Option<usize>,
    pub node_rank: Option<usize>,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

/// What this process does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// One process, one device: no communication.
    Single,
    /// Start `nproc_per_node` workers (ranks `node_rank * nproc_per_node + i`) and supervise.
    Launcher {
        nproc_per_node: usize,
        nnodes: usize,
        node_rank: usize,
        master_addr: String,
        master_port: u16,
    },
    /// Be one rank.
    Worker(Topology),
}

/// Parses the flags and the environment (`env` looks a variable up: `std::env::var` in
/// the binary, a table in tests).
pub fn resolve(flags: &LaunchFlags, env: impl Fn(&str) -> Option<String>) -> Result<Role> {
    let num = |name: &str| -> Result<Option<usize>> {
        env(name)
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("environment variable {name}={v:?} is not a number"))
            })
            .transpose()
    };
    let port = |v: Option<String>, what: &str| -> Result<u16> {
        match v.filter(|v| !v.trim().is_empty()) {
            None => Ok(DEFAULT_MASTER_PORT),
            Some(v) => v
                .trim()
                .parse::<u16>()
                .with_context(|| format!("{what}={v:?} is not a port number")),
        }
    };
    if let Some(nproc) = flags.nproc_per_node {
        let nnodes = flags.nnodes.unwrap_or(1);
        let node_rank = flags.node_rank.unwrap_or(0);
        if nproc == 0 || nnodes == 0 {
            bail!("--nproc-per-node and --nnodes must be at least 1");
        }
        if node_rank >= nnodes {
            bail!("--node-rank {node_rank} is not below --nnodes {nnodes}");
        }
        if nnodes > 1 && flags.master_addr.is_none() {
            bail!(
                "--nnodes {nnodes} needs --master-addr: the address of node 0, which every node dials"
            );
        }
        return Ok(Role::Launcher {
            nproc_per_node: nproc,
            nnodes,
            node_rank,
            master_addr: flags
                .master_addr
                .clone()
                .unwrap_or_else(|| "127.0.0.1".into()),
            master_port: match flags.master_port {
                Some(p) => p,
                None => port(None, "")?,
            },
        });
    }
    if flags.nnodes.is_some() || flags.node_rank.is_some() {
        bail!("--nnodes and --node-rank go with --nproc-per-node");
    }
    let (rank, world, local, source) = if let Some(rank) = num("RANK")? {
        let world = num("WORLD_SIZE")?.context("RANK is set but WORLD_SIZE is not")?;
        (rank, world, num("LOCAL_RANK")?, "RANK/WORLD_SIZE")
    } else if let Some(rank) = num("SLURM_PROCID")? {
        let world = num("SLURM_NTASKS")?.context("SLURM_PROCID is set but SLURM_NTASKS is not")?;
        (
            rank,
            world,
            num("SLURM_LOCALID")?,
            "SLURM_PROCID/SLURM_NTASKS",
        )
    } else {
        if flags.master_addr.is_some() || flags.master_port.is_some() {
            bail!(
                "--master-addr/--master-port need --nproc-per-node, or RANK/WORLD_SIZE in the environment"
            );
        }
        return Ok(Role::Single);
    };
    if world == 0 || rank >= world {
        bail!("{source}: rank {rank} is not below the world size {world}");
    }
    if world == 1 {
        return Ok(Role::Single);
    }
    let master_addr = match flags.master_addr.clone().or_else(|| env("MASTER_ADDR")) {
        Some(a) if !a.trim().is_empty() => a.trim().to_string(),
        // torchrun always sets it; under Slurm the batch script exports it (the first host of
        // `scontrol show hostnames`). Guessing would make each node wait for itself.
        _ => bail!(
            "{source} says this is rank {rank} of {world}, but MASTER_ADDR is not set \
             (export the address of rank 0's host, e.g. the first of `scontrol show hostnames`)"
        ),
    };
    let master_port = match flags.master_port {
        Some(p) => p,
        None => port(env("MASTER_PORT"), "MASTER_PORT")?,
    };
    Ok(Role::Worker(Topology {
        rank,
        world_size: world,
        // One node when nothing says otherwise.
        local_rank: local.unwrap_or(rank),
        master_addr,
        master_port,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(flags: LaunchFlags, vars: &[(&str, &str)], expect: Result<Role, &str>) {
        let got = resolve(&flags, |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        match (got, expect) {
            (Ok(g), Ok(e)) => assert_eq!(g, e),
            (Err(g), Err(e)) => assert!(format!("{g:#}").contains(e), "{g:#} lacks {e:?}"),
            (g, e) => panic!("got {g:?}, expected {e:?}"),
        }
    }

    fn worker(rank: usize, world: usize, local: usize, addr: &str, port: u16) -> Role {
        Role::Worker(Topology {
            rank,
            world_size: world,
            local_rank: local,
            master_addr: addr.into(),
            master_port: port,
        })
    }

    #[test]
    fn flags_and_environments_resolve_to_one_role() {
        check(LaunchFlags::default(), &[], Ok(Role::Single));
        check(
            LaunchFlags::default(),
            &[("RANK", "0"), ("WORLD_SIZE", "1")],
            Ok(Role::Single),
        );
        check(
            LaunchFlags {
                nproc_per_node: Some(4),
                ..Default::default()
            },
            &[],
            Ok(Role::Launcher {
                nproc_per_node: 4,
                nnodes: 1,
                node_rank: 0,
                master_addr: "127.0.0.1".into(),
                master_port: 29500,
            }),
        );
        check(
            LaunchFlags::default(),
            &[
                ("RANK", "3"),
                ("WORLD_SIZE", "8"),
                ("LOCAL_RANK", "1"),
                ("MASTER_ADDR", "node0"),
                ("MASTER_PORT", "1234"),
            ],
            Ok(worker(3, 8, 1, "node0", 1234)),
        );
        check(
            LaunchFlags::default(),
            &[
                ("SLURM_PROCID", "5"),
                ("SLURM_NTASKS", "8"),
                ("SLURM_LOCALID", "1"),
                ("MASTER_ADDR", "n0"),
            ],
            Ok(worker(5, 8, 1, "n0", 29500)),
        );
        // torchrun's variables win over Slurm's (torchrun inside an allocation).
        check(
            LaunchFlags::default(),
            &[
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
                ("MASTER_ADDR", "h"),
            ],
            Ok(worker(1, 2, 1, "h", 29500)),
        );
    }

    #[test]
    fn bad_launches_are_errors_naming_the_setting() {
        check(
            LaunchFlags::default(),
            &[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
            Err("rank 2 is not below the world size 2"),
        );
        check(
            LaunchFlags::default(),
            &[("RANK", "x")],
            Err("RANK=\"x\" is not a number"),
        );
        check(
            LaunchFlags::default(),
            &[("RANK", "1")],
            Err("WORLD_SIZE is not"),
        );
        check(
            LaunchFlags::default(),
            &[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "4")],
            Err("MASTER_ADDR is not set"),
        );
        check(
            LaunchFlags::default(),
            &[
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "99999"),
            ],
            Err("MASTER_PORT=\"99999\" is not a port number"),
        );
        check(
            LaunchFlags {
                nproc_per_node: Some(2),
                nnodes: Some(2),
                node_rank: Some(2),
                ..Default::default()
            },
            &[],
            Err("--node-rank 2 is not below --nnodes 2"),
        );
        check(
            LaunchFlags {
                nproc_per_node: Some(2),
                nnodes: Some(2),
                ..Default::default()
            },
            &[],
            Err("needs --master-addr"),
        );
        check(
            LaunchFlags {
                nnodes: Some(2),
                ..Default::default()
            },
            &[],
            Err("go with --nproc-per-node"),
        );
    }
}
