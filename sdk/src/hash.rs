//! A fast, deterministic hasher for plugin code. `std`'s default `HashMap` seeds itself from
//! the host's randomness, which makes a component import `wasi:random`; a fixed-key SipHash
//! avoids that but is slow for the many short keys metrics hash (n-grams, tokens). This is
//! the Fx hash (rustc's): a multiply and a rotate per word. Not DoS-resistant, which inside a
//! sandbox with a deadline costs at most a timeout.

use std::hash::{BuildHasherDefault, Hasher};

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub type FxBuildHasher = BuildHasherDefault<FxHasher>;
/// A `HashMap` with the Fx hasher.
pub type FastMap<K, V> = std::collections::HashMap<K, V, FxBuildHasher>;
/// A `HashSet` with the Fx hasher.
pub type FastSet<T> = std::collections::HashSet<T, FxBuildHasher>;
