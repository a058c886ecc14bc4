//! The in-process communicator: one thread per rank, the reduction done by each rank over all
//! ranks' buffers in rank order (bit-identical on every rank and every run). The CPU tests of
//! data parallelism run N trainers in N threads of one process with it.

use std::sync::{Arc, Condvar, Mutex};

use crate::train::dist::{Communicator, DistError, add_into};

struct State {
    /// Each rank's deposited buffer for the operation in progress.
    slots: Vec<Vec<f32>>,
    /// How many ranks have reached the current barrier, and which barrier it is.
    arrived: usize,
    generation: u64,
    /// A rank whose handle was dropped while others may still wait for it.
    left: Option<usize>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    turn: Condvar,
}

/// One rank's handle. Dropping it (the rank's trainer returned, or failed) releases the ranks
/// waiting for it with [`DistError::PeerLeft`].
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
}

impl InProcess {
    /// The handles of a world of `world` ranks, rank `i` at index `i`.
    pub fn group(world: usize) -> Vec<InProcess> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: vec![Vec::new(); world],
                arrived: 0,
                generation: 0,
                left: None,
            }),
            turn: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every rank has arrived; `deposit` runs under the lock on arrival.
    fn wait_all(&self, deposit: impl FnOnce(&mut State)) -> Result<(), DistError> {
        let mut st = self.lock();
        deposit(&mut st);
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            self.shared.turn.notify_all();
            return Ok(());
        }
        loop {
            // Completion is checked first: a rank that finished and dropped its handle after
            // this barrier must not fail it.
            if st.generation != generation {
                return Ok(());
            }
            if let Some(rank) = st.left {
                return Err(DistError::PeerLeft {
                    rank,
                    reason: "its handle was dropped (the rank returned or failed)".into(),
                });
            }
            st = self.shared.turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.left.get_or_insert(self.rank);
        self.shared.turn.notify_all();
    }
}

impl Communicator for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.wait_all(|st| st.slots[self.rank] = buf.to_vec())?;
        {
            let st = self.lock();
            for (rank, slot) in st.slots.iter().enumerate() {
                if slot.len() != buf.len() {
                    return Err(DistError::Length {
                        rank,
                        got: slot.len(),
                        want: buf.len(),
                    });
                }
            }
            buf.copy_from_slice(&st.slots[0]);
            for slot in &st.slots[1..] {
                add_into(buf, slot);
            }
        }
        // Nobody deposits the next operation's buffer before everyone has read this one's.
        self.wait_all(|_| {})
    }

    fn broadcast(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.wait_all(|st| {
            if self.rank == 0 {
                st.slots[0] = buf.to_vec();
            }
        })?;
        {
            let st = self.lock();
            if st.slots[0].len() != buf.len() {
                return Err(DistError::Length {
                    rank: self.rank,
                    got: buf.len(),
                    want: st.slots[0].len(),
                });
            }
            buf.copy_from_slice(&st.slots[0]);
        }
        self.wait_all(|_| {})
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.wait_all(|_| {})
    }

    fn backend(&self) -> &'static str {
        "in-process"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose sum depends on the order: (1e8 + 1) - 1e8 is 0 in f32, 1e8 - 1e8 + 1 is 1.
    fn buffers() -> Vec<Vec<f32>> {
        vec![vec![1e8, 0.1], vec![1.0, 0.2], vec![-1e8, 0.3]]
    }

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank_and_run() {
        let mut want = buffers()[0].clone();
        for b in &buffers()[1..] {
            add_into(&mut want, b);
        }
        for _ in 0..20 {
            let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = InProcess::group(3)
                    .into_iter()
                    .zip(buffers())
                    .map(|(c, mut b)| {
                        s.spawn(move || {
                            c.all_reduce_sum(&mut b).unwrap();
                            b
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in &results {
                assert_eq!(
                    r.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
        assert_eq!(want[0], 0.0, "the order shows: (1e8 + 1) - 1e8 is 0 in f32");
    }

    #[test]
    fn broadcast_gives_rank_0s_buffer_and_a_dropped_rank_releases_the_others() {
        let out: Vec<Result<Vec<f32>, String>> = std::thread::scope(|s| {
            let mut group = InProcess::group(3);
            let last = group.pop().unwrap();
            let handles: Vec<_> = group
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    s.spawn(move || {
                        let mut b = vec![i as f32; 2];
                        c.broadcast(&mut b).map_err(|e| e.to_string())?;
                        // Rank 2 is gone by now: this one must fail, not hang.
                        c.barrier().map_err(|e| e.to_string())?;
                        Ok(b)
                    })
                })
                .collect();
            let mut b = vec![9.0; 2];
            last.broadcast(&mut b).unwrap();
            assert_eq!(b, vec![0.0, 0.0]);
            drop(last);
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in out {
            let e = r.unwrap_err();
            assert!(e.contains("rank 2 left"), "{e}");
        }
    }
}
