//! The CPU communicator between processes: a star through rank 0 over the rendezvous's
//! connections. Rank 0 receives every rank's buffer in rank order, sums them in that order
//! (as [`crate::train::dist::local::InProcess`] does, so the results are the same bits) and
//! sends the sum back. Meant for CPU training and for testing the multi-process path end to
//! end; GPUs use NCCL.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use crate::train::dist::rendezvous;
use crate::train::dist::{Communicator, DistError, add_into};

pub struct TcpCommunicator {
    rank: usize,
    world: usize,
    /// Rank 0: the connection to rank `r` at `r - 1`. Others: the connection to rank 0.
    links: Mutex<Vec<TcpStream>>,
}

impl TcpCommunicator {
    /// Rendezvous at `master` (`host:port`); rank 0 listens on the port.
    pub fn connect(
        master: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        let links = if rank == 0 {
            let port = master
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .ok_or_else(|| DistError::Protocol(format!("{master}: no port")))?;
            let listener = rendezvous::listen(port)?;
            rendezvous::serve(&listener, world, &[], timeout)?
        } else {
            vec![rendezvous::join(master, rank, world, timeout)?.1]
        };
        Ok(Self::from_links(rank, world, links))
    }

    /// Over connections a rendezvous made (rank 0: one per other rank, in rank order).
    pub fn from_links(rank: usize, world: usize, links: Vec<TcpStream>) -> Self {
        TcpCommunicator {
            rank,
            world,
            links: Mutex::new(links),
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Vec<TcpStream>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn send(stream: &mut TcpStream, buf: &[f32], peer: usize) -> Result<(), DistError> {
    let mut bytes = Vec::with_capacity(8 + buf.len() * 4);
    bytes.extend((buf.len() as u64).to_le_bytes());
    for x in buf {
        bytes.extend(x.to_le_bytes());
    }
    stream.write_all(&bytes).map_err(|e| DistError::PeerLeft {
        rank: peer,
        reason: e.to_string(),
    })
}

fn recv(stream: &mut TcpStream, buf: &mut [f32], peer: usize) -> Result<(), DistError> {
    let left = |e: std::io::Error| DistError::PeerLeft {
        rank: peer,
        reason: if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "its connection closed (the process exited?)".into()
        } else {
            e.to_string()
        },
    };
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).map_err(left)?;
    let len = u64::from_le_bytes(len) as usize;
    if len != buf.len() {
        return Err(DistError::Length {
            rank: peer,
            got: len,
            want: buf.len(),
        });
    }
    let mut bytes = vec![0u8; len * 4];
    stream.read_exact(&mut bytes).map_err(left)?;
    for (x, b) in buf.iter_mut().zip(bytes.chunks_exact(4)) {
        *x = f32::from_le_bytes(b.try_into().expect("4 bytes"));
    }
    Ok(())
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let mut links = self.links();
        if self.rank != 0 {
            send(&mut links[0], buf, 0)?;
            return recv(&mut links[0], buf, 0);
        }
        let mut theirs = vec![0f32; buf.len()];
        for (i, link) in links.iter_mut().enumerate() {
            recv(link, &mut theirs, i + 1)?;
            add_into(buf, &theirs);
        }
        for (i, link) in links.iter_mut().enumerate() {
            send(link, buf, i + 1)?;
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let mut links = self.links();
        if self.rank != 0 {
            return recv(&mut links[0], buf, 0);
        }
        for (i, link) in links.iter_mut().enumerate() {
            send(link, buf, i + 1)?;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.all_reduce_sum(&mut [])
    }

    fn backend(&self) -> &'static str {
        "tcp"
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::train::dist::local::InProcess;

    /// The same buffers reduced over TCP and in process give the same bits.
    #[test]
    fn tcp_reduction_equals_the_in_process_one() {
        let buffers: Vec<Vec<f32>> = (0..3)
            .map(|r| {
                (0..50)
                    .map(|i| ((i * 31 + r * 7) as f32).sin() * 1e3f32.powi(r))
                    .collect()
            })
            .collect();
        let reduce = |comms: Vec<Box<dyn Communicator>>| -> Vec<Vec<f32>> {
            std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .zip(buffers.clone())
                    .map(|(c, mut b)| {
                        s.spawn(move || {
                            c.all_reduce_sum(&mut b).unwrap();
                            let mut from0 = vec![c.rank() as f32; 2];
                            c.broadcast(&mut from0).unwrap();
                            assert_eq!(from0, vec![0.0; 2]);
                            c.barrier().unwrap();
                            b
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        let local = reduce(
            InProcess::group(3)
                .into_iter()
                .map(|c| Box::new(c) as Box<dyn Communicator>)
                .collect(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let comms: Vec<Box<dyn Communicator>> = std::thread::scope(|s| {
            let peers: Vec<_> = (1..3)
                .map(|r| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        let (_, link) =
                            rendezvous::join(&addr, r, 3, Duration::from_secs(10)).unwrap();
                        TcpCommunicator::from_links(r, 3, vec![link])
                    })
                })
                .collect();
            let links = rendezvous::serve(&listener, 3, &[], Duration::from_secs(10)).unwrap();
            let mut all: Vec<Box<dyn Communicator>> =
                vec![Box::new(TcpCommunicator::from_links(0, 3, links))];
            all.extend(
                peers
                    .into_iter()
                    .map(|h| Box::new(h.join().unwrap()) as Box<dyn Communicator>),
            );
            all
        });
        let tcp = reduce(comms);
        for (a, b) in local.iter().chain(&tcp).zip(local.iter().cycle()) {
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
