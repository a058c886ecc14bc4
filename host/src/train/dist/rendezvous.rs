//! The rendezvous: rank 0 listens on the master address, every other rank connects and says
//! who it is, and rank 0 answers each with the same payload (the 128-byte NCCL unique id, or
//! nothing for the TCP communicator). The connections stay open for whoever wants them.
//!
//! Wire format (little endian): a peer sends `b"ADLB"`, its rank and the world size as `u32`;
//! rank 0 answers with the payload's length as `u32` and the payload.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::train::dist::DistError;

const MAGIC: &[u8; 4] = b"ADLB";

/// How long ranks wait for each other at the start (torchrun's default is 900 s; loading a
/// large model before the rendezvous can take minutes on one rank and seconds on another).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);

/// Rank 0's side on `listener`: waits for ranks `1..world`, answers each with `payload`, and
/// returns their connections (index `r - 1` is rank `r`). Fails naming the ranks that did not
/// arrive within `timeout`.
pub fn serve(
    listener: &TcpListener,
    world: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<TcpStream>, DistError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let io = |e: std::io::Error| DistError::Protocol(format!("{addr}: {e}"));
    listener.set_nonblocking(true).map_err(io)?;
    let deadline = Instant::now() + timeout;
    let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(DistError::Missing {
                        addr,
                        missing: (1..world).filter(|r| peers[r - 1].is_none()).collect(),
                        world,
                        secs: timeout.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(io(e)),
        };
        stream.set_nonblocking(false).map_err(io)?;
        // A connection that says nothing (a port scanner, a stale peer) must not stall us.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        let mut hello = [0u8; 12];
        if stream.read_exact(&mut hello).is_err() || &hello[..4] != MAGIC {
            tracing::warn!("rendezvous on {addr}: ignored a connection that is not a rank");
            continue;
        }
        let rank = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes")) as usize;
        let their_world = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
        if their_world != world {
            return Err(DistError::Protocol(format!(
                "rank {rank} says the world has {their_world} ranks, rank 0 says {world}"
            )));
        }
        if rank == 0 || rank >= world {
            return Err(DistError::Protocol(format!(
                "a peer claims rank {rank}, outside 1..{world}"
            )));
        }
        if peers[rank - 1].is_some() {
            return Err(DistError::Protocol(format!(
                "two processes claim rank {rank} (RANK set alike twice?)"
            )));
        }
        stream
            .write_all(&(payload.len() as u32).to_le_bytes())
            .and_then(|_| stream.write_all(payload))
            .map_err(|e| DistError::PeerLeft {
                rank,
                reason: e.to_string(),
            })?;
        stream.set_read_timeout(None).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        peers[rank - 1] = Some(stream);
    }
    Ok(peers.into_iter().flatten().collect())
}

/// A peer's side: connects to rank 0 at `addr` (retrying until `timeout`: rank 0 may not be
/// listening yet), says it is `rank` of `world`, and returns the payload and the connection.
pub fn join(
    addr: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<(Vec<u8>, TcpStream), DistError> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        let attempt = addr.to_socket_addrs().and_then(|mut a| {
            let a = a
                .next()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
            TcpStream::connect_timeout(&a, Duration::from_secs(5))
        });
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(DistError::NoRoot {
                    addr: addr.to_string(),
                    secs: timeout.as_secs(),
                    source: e,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let left = |e: std::io::Error| DistError::PeerLeft {
        rank: 0,
        reason: format!("during the rendezvous on {addr}: {e}"),
    };
    let mut hello = MAGIC.to_vec();
    hello.extend((rank as u32).to_le_bytes());
    hello.extend((world as u32).to_le_bytes());
    stream.write_all(&hello).map_err(left)?;
    // Rank 0 answers once every rank has arrived, which may take the whole timeout.
    stream
        .set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1))
                + Duration::from_secs(30),
        ))
        .map_err(left)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(left)?;
    let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut payload).map_err(left)?;
    stream.set_read_timeout(None).map_err(left)?;
    stream.set_nodelay(true).map_err(left)?;
    Ok((payload, stream))
}

/// Rank 0's listener: on every interface at `port`, since the master address others dial may
/// name this host by any of its addresses.
pub fn listen(port: u16) -> Result<TcpListener, DistError> {
    TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        DistError::Protocol(format!(
            "rank 0 cannot listen on port {port} (MASTER_PORT / --master-port): {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_rank_0s_payload() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let id: Vec<u8> = (0..128).map(|i| (i * 7) as u8).collect();
        let got = std::thread::scope(|s| {
            let peers: Vec<_> = (1..4)
                .map(|r| {
                    let addr = addr.clone();
                    s.spawn(move || join(&addr, r, 4, Duration::from_secs(10)).unwrap().0)
                })
                .collect();
            let streams = serve(&listener, 4, &id, Duration::from_secs(10)).unwrap();
            assert_eq!(streams.len(), 3);
            peers
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        for payload in got {
            assert_eq!(payload, id);
        }
    }

    #[test]
    fn a_rank_that_does_not_arrive_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let err = std::thread::scope(|s| {
            s.spawn(|| join(&addr, 2, 3, Duration::from_secs(5)));
            serve(&listener, 3, b"id", Duration::from_millis(600)).unwrap_err()
        });
        let text = err.to_string();
        assert!(text.contains("rank(s) [1] of 3 did not arrive"), "{text}");
    }

    #[test]
    fn a_root_that_never_listens_is_an_error_not_a_hang() {
        // A port nothing listens on: bind, read the port, close.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = join(
            &format!("127.0.0.1:{port}"),
            1,
            2,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("rank 0 could not be reached"),
            "{err}"
        );
    }
}
