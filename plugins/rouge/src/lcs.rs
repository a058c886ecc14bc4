//! Longest common subsequences over token ids, bit-parallel so that long texts stay cheap.
//!
//! rouge-score fills a full `(n+1) x (m+1)` table of Python ints; for a 1 MB prediction that
//! is billions of cells. Here a DP row is a bit vector (Hyyrö's formulation): bit `j` of row
//! `i` is 0 exactly when `T[i][j+1] = T[i][j] + 1`, so `T[i][j]` is the number of zero bits
//! below `j`, and one row costs `m / 64` word operations.
//!
//! [`lcs_indices`] must reproduce rouge-score's `_backtrack_norec`, tie-breaking included,
//! because `rougeLsum` depends on *which* LCS is read out. It walks the same path over the
//! same table values; to avoid keeping all `n` rows, it keeps every `k`-th row (`k ~ sqrt(n)`)
//! and recomputes one block of rows at a time while walking back.

/// Bit vectors over the positions of the column sequence `b`.
struct Columns {
    /// Number of 64-bit words per row.
    words: usize,
    matches: Matches,
}

/// Where each symbol occurs in `b`, as match vectors.
enum Matches {
    /// Every symbol's full match vector, `words` words each, indexed by symbol id: one
    /// allocation, for the usual short texts (ids are dense from 0).
    Dense(Vec<u64>),
    /// For long texts, where a vector per symbol would be too big.
    Sparse {
        /// Positions in `b` of each symbol id (`b`'s ids index this; others have no entry).
        positions: Vec<Vec<u32>>,
        /// Full match vectors of the symbols that occur more than `words` times, so that a
        /// row never costs more than O(words) however repetitive the text ("a a a ...").
        dense: Vec<Option<Vec<u64>>>,
        /// A zeroed scratch vector; `step` sets a sparse symbol's bits in it and clears them
        /// again.
        scratch: Vec<u64>,
    },
}

/// The most words [`Matches::Dense`] may take (256 KiB).
const DENSE_WORDS: usize = 1 << 15;

impl Columns {
    fn new(b: &[u32]) -> Self {
        let max_id = b.iter().copied().max().map_or(0, |id| id as usize + 1);
        let words = b.len().div_ceil(64);
        if max_id.saturating_mul(words) <= DENSE_WORDS {
            let mut bits = vec![0u64; max_id * words];
            for (j, &id) in b.iter().enumerate() {
                bits[id as usize * words + j / 64] |= 1 << (j % 64);
            }
            return Columns {
                words,
                matches: Matches::Dense(bits),
            };
        }
        let mut positions = vec![Vec::new(); max_id];
        for (j, &id) in b.iter().enumerate() {
            // Positions fit in u32: a text has fewer than 2^32 tokens.
            positions[id as usize].push(j as u32);
        }
        let dense = positions
            .iter()
            .map(|p| {
                (p.len() > words).then(|| {
                    let mut bits = vec![0u64; words];
                    for &j in p {
                        bits[j as usize / 64] |= 1 << (j % 64);
                    }
                    bits
                })
            })
            .collect();
        Columns {
            words,
            matches: Matches::Sparse {
                positions,
                dense,
                scratch: vec![0; words],
            },
        }
    }

    /// All-ones row: row 0 of the table (no increments).
    fn first_row(&self) -> Vec<u64> {
        vec![u64::MAX; self.words]
    }

    /// Advances `row` from `T[i-1]` to `T[i]` for the row symbol `symbol`. A symbol that
    /// does not occur in `b` matches nowhere: the row equals the previous one.
    fn step(&mut self, row: &mut [u64], symbol: u32) {
        let symbol = symbol as usize;
        let words = self.words;
        match &mut self.matches {
            Matches::Dense(bits) => {
                if let Some(bits) = bits.get(symbol * words..(symbol + 1) * words) {
                    advance(row, bits);
                }
            }
            Matches::Sparse {
                positions,
                dense,
                scratch,
            } => {
                let Some(positions) = positions.get(symbol).filter(|p| !p.is_empty()) else {
                    return;
                };
                if let Some(Some(bits)) = dense.get(symbol) {
                    advance(row, bits);
                    return;
                }
                for &j in positions {
                    scratch[j as usize / 64] |= 1 << (j % 64);
                }
                advance(row, scratch);
                for &j in positions {
                    scratch[j as usize / 64] = 0;
                }
            }
        }
    }
}

/// One DP row: V' = (V + U) | (V & !PM), U = V & PM, as one multi-word addition.
fn advance(row: &mut [u64], matches: &[u64]) {
    let mut carry = false;
    for (v, &pm) in row.iter_mut().zip(matches) {
        let u = *v & pm;
        let (sum, c1) = v.overflowing_add(u);
        let (sum, c2) = sum.overflowing_add(carry as u64);
        carry = c1 || c2;
        *v = sum | (*v & !pm);
    }
}

/// `T[.][j]` for a row: zeros among bits `0..j`. Padding bits above `m` stay 1.
fn rank(row: &[u64], j: usize) -> usize {
    let full = j / 64;
    let mut zeros: usize = row[..full].iter().map(|w| w.count_zeros() as usize).sum();
    let rest = j % 64;
    if rest > 0 {
        let mask = (1u64 << rest) - 1;
        zeros += (!row[full] & mask).count_ones() as usize;
    }
    zeros
}

/// Whether `T[.][j+1] = T[.][j] + 1`, as 0 or 1.
fn increment(row: &[u64], j: usize) -> usize {
    ((row[j / 64] >> (j % 64)) & 1 == 0) as usize
}

/// The length of a longest common subsequence of `a` and `b`.
pub fn lcs_length(a: &[u32], b: &[u32]) -> usize {
    if a.is_empty() || b.is_empty() {
        return 0;
    }
    let mut columns = Columns::new(b);
    let mut row = columns.first_row();
    for &symbol in a {
        columns.step(&mut row, symbol);
    }
    rank(&row, b.len())
}

/// rouge-score's `lcs_ind(ref, can)`: the indices into `a` (= `ref`) of the LCS that
/// `_backtrack_norec` reads out of `_lcs_table(ref, can)`, ascending.
pub fn lcs_indices(a: &[u32], b: &[u32]) -> Vec<usize> {
    // A small table is kept whole (one block); a big one in blocks of about sqrt(n) rows.
    let block = if (a.len() + 1) * b.len().div_ceil(64) <= DENSE_WORDS {
        a.len()
    } else {
        (a.len() as f64).sqrt().ceil() as usize
    };
    lcs_indices_with_block(a, b, block.max(1))
}

/// [`lcs_indices`] with an explicit checkpoint spacing (tests use small ones).
fn lcs_indices_with_block(a: &[u32], b: &[u32], block: usize) -> Vec<usize> {
    let (n, m) = (a.len(), b.len());
    if n == 0 || m == 0 {
        return Vec::new();
    }
    let mut table = Table::new(a, b, block);
    let (mut i, mut j) = (n, m);
    // Invariant: cur = T[i][j], up = T[i-1][j].
    let mut cur = table.rank(i, j);
    let mut up = table.rank(i - 1, j);
    let mut lcs = Vec::with_capacity(cur);
    while i > 0 && j > 0 {
        if a[i - 1] == b[j - 1] {
            lcs.push(i - 1);
            i -= 1;
            j -= 1;
            cur -= 1;
            up = if i > 0 { table.rank(i - 1, j) } else { 0 };
            continue;
        }
        let left = cur - table.increment(i, j - 1);
        if left > up {
            // T[i][j-1] > T[i-1][j]: move left.
            up -= if i > 0 {
                table.increment(i - 1, j - 1)
            } else {
                0
            };
            cur = left;
            j -= 1;
        } else {
            cur = up;
            i -= 1;
            up = if i > 0 { table.rank(i - 1, j) } else { 0 };
        }
    }
    lcs.reverse();
    lcs
}

/// The rows of `T`, kept as checkpoints every `block` rows plus one recomputed block.
struct Table<'a> {
    a: &'a [u32],
    columns: Columns,
    block: usize,
    /// `checkpoints[c]` is row `c * block`.
    checkpoints: Vec<Vec<u64>>,
    /// Rows `lo..=hi`, flattened; empty before the first access.
    rows: Vec<u64>,
    lo: usize,
    hi: usize,
}

impl<'a> Table<'a> {
    fn new(a: &'a [u32], b: &[u32], block: usize) -> Self {
        let mut columns = Columns::new(b);
        let mut row = columns.first_row();
        let mut checkpoints = vec![row.clone()];
        for (i, &symbol) in a.iter().enumerate() {
            columns.step(&mut row, symbol);
            if (i + 1) % block == 0 {
                checkpoints.push(row.clone());
            }
        }
        Table {
            a,
            columns,
            block,
            checkpoints,
            rows: Vec::new(),
            lo: 1,
            hi: 0,
        }
    }

    /// Row `r`, recomputing a block when `r` is outside the one held. The walk only moves
    /// down, so a new block spans from `r`'s checkpoint up to two rows past the old `lo`,
    /// keeping the rows the walk still needs.
    fn row(&mut self, r: usize) -> &[u64] {
        if self.rows.is_empty() || r < self.lo || r > self.hi {
            let hi = if self.rows.is_empty() || r > self.hi {
                r
            } else {
                (self.lo + 1).min(self.a.len())
            };
            let lo = (r / self.block) * self.block;
            let words = self.columns.words;
            let mut row = self.checkpoints[r / self.block].clone();
            let mut rows = Vec::with_capacity((hi - lo + 1) * words);
            rows.extend_from_slice(&row);
            for i in lo + 1..=hi {
                self.columns.step(&mut row, self.a[i - 1]);
                rows.extend_from_slice(&row);
            }
            self.rows = rows;
            self.lo = lo;
            self.hi = hi;
        }
        let words = self.columns.words;
        let start = (r - self.lo) * words;
        &self.rows[start..start + words]
    }

    fn rank(&mut self, r: usize, j: usize) -> usize {
        rank(self.row(r), j)
    }

    fn increment(&mut self, r: usize, j: usize) -> usize {
        increment(self.row(r), j)
    }
}

#[cfg(test)]
mod tests {
    use crate::lcs::{lcs_indices_with_block, lcs_length};

    /// rouge-score's `_lcs_table`, verbatim.
    fn lcs_table(r: &[u32], c: &[u32]) -> Vec<Vec<usize>> {
        let mut t = vec![vec![0; c.len() + 1]; r.len() + 1];
        for i in 1..=r.len() {
            for j in 1..=c.len() {
                t[i][j] = if r[i - 1] == c[j - 1] {
                    t[i - 1][j - 1] + 1
                } else {
                    t[i - 1][j].max(t[i][j - 1])
                };
            }
        }
        t
    }

    /// rouge-score's `_backtrack_norec`, verbatim.
    fn backtrack(t: &[Vec<usize>], r: &[u32], c: &[u32]) -> Vec<usize> {
        let (mut i, mut j) = (r.len(), c.len());
        let mut lcs = Vec::new();
        while i > 0 && j > 0 {
            if r[i - 1] == c[j - 1] {
                lcs.insert(0, i - 1);
                i -= 1;
                j -= 1;
            } else if t[i][j - 1] > t[i - 1][j] {
                j -= 1;
            } else {
                i -= 1;
            }
        }
        lcs
    }

    /// A small deterministic generator (xorshift), so the test needs no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn seq(&mut self, max_len: u64, alphabet: u64) -> Vec<u32> {
            let len = self.next() % (max_len + 1);
            (0..len).map(|_| (self.next() % alphabet) as u32).collect()
        }
    }

    #[test]
    fn matches_the_reference_table_and_backtrack() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        for case in 0..3000 {
            // Lengths cross the 64-bit word boundary; small alphabets force many ties.
            // A large alphabet takes the sparse match vectors.
            let max_len = [5, 20, 70, 150][case % 4];
            let alphabet = [2, 3, 5, 30, 20_000][(case / 4) % 5];
            let a = rng.seq(max_len, alphabet);
            let b = rng.seq(max_len, alphabet);
            let t = lcs_table(&a, &b);
            assert_eq!(lcs_length(&a, &b), t[a.len()][b.len()], "{a:?} {b:?}");
            let expect = backtrack(&t, &a, &b);
            for block in [1, 2, 3, 7, 64, 1000] {
                assert_eq!(
                    lcs_indices_with_block(&a, &b, block),
                    expect,
                    "block {block}: {a:?} {b:?}"
                );
            }
        }
    }

    #[test]
    fn empty_inputs() {
        assert_eq!(lcs_length(&[], &[1]), 0);
        assert_eq!(lcs_indices_with_block(&[1], &[], 1), Vec::<usize>::new());
    }
}
