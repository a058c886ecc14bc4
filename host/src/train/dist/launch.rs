//! The launcher of `--nproc-per-node N`, as torchrun's: starts one worker process per local
//! rank (this binary again, with the same arguments less the launcher's flags, and torchrun's
//! variables in its environment), then supervises them. When one fails, the others are
//! stopped (SIGTERM, then SIGKILL after a grace period) and the launch fails naming the rank.

use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// How long stopped workers get to exit before they are killed.
const GRACE: Duration = Duration::from_secs(10);

/// One node's share of the world.
#[derive(Debug, Clone)]
pub struct Launch {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// Runs `program args` once per local rank and waits for all. Ok when every worker exits 0.
pub fn run(launch: &Launch, program: &std::path::Path, args: &[OsString]) -> Result<()> {
    let world = launch.nproc_per_node * launch.nnodes;
    let mut workers: Vec<(usize, Child)> = Vec::new();
    for local in 0..launch.nproc_per_node {
        let rank = launch.node_rank * launch.nproc_per_node + local;
        let spawned = Command::new(program)
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", launch.nproc_per_node.to_string())
            .env("MASTER_ADDR", &launch.master_addr)
            .env("MASTER_PORT", launch.master_port.to_string())
            .spawn()
            .with_context(|| format!("failed to start rank {rank} ({})", program.display()));
        match spawned {
            Ok(child) => workers.push((rank, child)),
            Err(e) => {
                stop_all(&mut workers);
                return Err(e);
            }
        }
    }
    supervise(workers)
}

fn supervise(mut workers: Vec<(usize, Child)>) -> Result<()> {
    loop {
        let mut i = 0;
        while i < workers.len() {
            let (rank, child) = &mut workers[i];
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {
                    workers.remove(i);
                    continue;
                }
                Ok(Some(status)) => {
                    let rank = *rank;
                    workers.remove(i);
                    let stopped: Vec<usize> = workers.iter().map(|(r, _)| *r).collect();
                    stop_all(&mut workers);
                    bail!(
                        "rank {rank} {}; stopped the other ranks {stopped:?}",
                        describe(status)
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    let rank = *rank;
                    stop_all(&mut workers);
                    bail!("failed to watch rank {rank}: {e}");
                }
            }
            i += 1;
        }
        if workers.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt as _;
        if let Some(sig) = status.signal() {
            return format!("was killed by signal {sig}");
        }
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("exited ({status})"),
    }
}

/// SIGTERM to every worker (a trainer may write what it can), SIGKILL to those still running
/// after [`GRACE`].
fn stop_all(workers: &mut [(usize, Child)]) {
    for (_, child) in workers.iter_mut() {
        #[cfg(unix)]
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        #[cfg(not(unix))]
        let _ = child.kill();
    }
    let deadline = Instant::now() + GRACE;
    for (_, child) in workers.iter_mut() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn sh(script: &str) -> (std::path::PathBuf, Vec<OsString>) {
        ("/bin/sh".into(), vec!["-c".into(), script.into()])
    }

    #[test]
    fn a_failing_rank_fails_the_launch_and_stops_the_others() {
        let (program, args) = sh(r#"if [ "$RANK" = 1 ]; then exit 3; fi; sleep 30"#);
        let launch = Launch {
            nproc_per_node: 3,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 1,
        };
        let started = Instant::now();
        let err = run(&launch, &program, &args).unwrap_err().to_string();
        assert!(
            err.contains("rank 1 exited with status 3") && err.contains("[0, 2]"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the others were stopped"
        );
    }

    #[test]
    fn workers_get_torchruns_variables() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().display().to_string();
        let (program, args) = sh(&format!(
            r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT" > {out}/$RANK"#
        ));
        let launch = Launch {
            nproc_per_node: 2,
            nnodes: 2,
            node_rank: 1,
            master_addr: "n0".into(),
            master_port: 4000,
        };
        run(&launch, &program, &args).unwrap();
        let read = |r: &str| std::fs::read_to_string(dir.path().join(r)).unwrap();
        assert_eq!(read("2").trim(), "2 4 0 n0 4000");
        assert_eq!(read("3").trim(), "3 4 1 n0 4000");
    }
}
