//! Packing (TRL's `packing = true`): tokenized examples put into rows of at most
//! `max_seq_length` tokens as TRL's `pack_dataset` does (`trl/data_utils.py`), so a run packs
//! the same examples together as TRL, with each of TRL's `packing_strategy`s:
//! - `bfd` ([`pack_bfd`]): best-fit decreasing; an example longer than a row is cut to it.
//! - `bfd_split` ([`pack_bfd_split`], TRL 0.2x's `bfd-requeue`): the same, but a long example
//!   is split into row-sized pieces that are packed like examples, so no token is lost.
//! - `wrapped` ([`pack_wrapped`]): all examples one after the other, cut every `max_seq_length`
//!   tokens, ignoring where examples end.
//!
//! The best-fit rows keep each example's (or piece's) length (TRL's `seq_lengths`): the model
//! restarts positions and confines attention at each (`AttentionContext::packed`), as
//! transformers' padding-free path does for TRL's packed rows. Wrapped rows are plain rows, as
//! TRL feeds them (not padding-free): positions run through and attention crosses examples.

use adapterlab_model::engine::loss::{Example, Packed};
use std::collections::{BTreeMap, VecDeque};

/// TRL packs inside `datasets.map(batched=True)`, whose batches hold 1,000 examples: each
/// thousand is packed on its own, and so here.
pub const TRL_MAP_BATCH: usize = 1000;

/// Best-fit decreasing over each [`TRL_MAP_BATCH`] examples in order: empty examples are
/// dropped, longer ones cut to `seq_length` (keeping the start), the rest taken longest first
/// (ties in their order) and each put into the open row with the least room that still fits
/// it (the oldest such row), else into a new row. Rows come in the order they were opened,
/// their examples in the order they were put in. No example is split.
pub fn pack_bfd(examples: &[Example], seq_length: usize) -> Vec<Packed> {
    best_fit_decreasing(examples, seq_length, false)
}

/// [`pack_bfd`], except that an example longer than `seq_length` is split into pieces of
/// `seq_length` tokens (the last one shorter), each packed as an example of its own and taken
/// in its turn by length, as TRL's `bfd_split` does. Each piece restarts positions: the first
/// token of a later piece is not predicted from the piece before.
pub fn pack_bfd_split(examples: &[Example], seq_length: usize) -> Vec<Packed> {
    best_fit_decreasing(examples, seq_length, true)
}

/// Each [`TRL_MAP_BATCH`] examples concatenated in order and cut into rows of `seq_length`
/// tokens (the chunk's last row shorter), as TRL's `wrapped` strategy does; each row is one
/// sequence, crossing example boundaries. An example's first token is predicted from the
/// example before it when `loss_on_prompts` (TRL labels every token unless the loss is on
/// completions only, and a prompt's first token is never a completion token).
pub fn pack_wrapped(examples: &[Example], seq_length: usize, loss_on_prompts: bool) -> Vec<Packed> {
    let seq_length = seq_length.max(1);
    let mut rows = Vec::new();
    for chunk in examples.chunks(TRL_MAP_BATCH) {
        let mut all = Packed::concat(&chunk.iter().collect::<Vec<_>>()).row;
        let mut start = 0;
        for e in chunk {
            if let Some(t) = all
                .targets
                .get_mut(start)
                .filter(|_| !e.input_ids.is_empty())
            {
                *t = loss_on_prompts;
            }
            start += e.input_ids.len();
        }
        for (ids, targets) in all
            .input_ids
            .chunks(seq_length)
            .zip(all.targets.chunks(seq_length))
        {
            rows.push(Packed::single(Example {
                input_ids: ids.to_vec(),
                targets: targets.to_vec(),
            }));
        }
    }
    rows
}

/// The pieces an example is packed as: its start cut to `seq_length`, or with `split` all of it
/// in `seq_length`-token pieces; none for an empty example.
fn pieces(e: &Example, seq_length: usize, split: bool) -> Vec<Example> {
    let n = e.input_ids.len();
    let starts = (0..n)
        .step_by(seq_length)
        .take(if split { usize::MAX } else { 1 });
    starts
        .map(|start| {
            let end = (start + seq_length).min(n);
            Example {
                input_ids: e.input_ids[start..end].to_vec(),
                targets: e.targets[start.min(e.targets.len())..end.min(e.targets.len())].to_vec(),
            }
        })
        .collect()
}

fn best_fit_decreasing(examples: &[Example], seq_length: usize, split: bool) -> Vec<Packed> {
    let seq_length = seq_length.max(1);
    let mut rows = Vec::new();
    for chunk in examples.chunks(TRL_MAP_BATCH) {
        let cut: Vec<Example> = chunk
            .iter()
            .flat_map(|e| pieces(e, seq_length, split))
            .collect();
        let mut order: Vec<usize> = (0..cut.len()).collect();
        // Stable, as pyarrow's sort: equal lengths keep their order.
        order.sort_by(|&a, &b| cut[b].input_ids.len().cmp(&cut[a].input_ids.len()));
        // Rows by the room they have left (TRL's segment tree and `space_to_bin`).
        let mut by_room: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
        let mut bins: Vec<(Vec<usize>, usize)> = Vec::new();
        for i in order {
            let len = cut[i].input_ids.len();
            let fit = by_room.range(len..).next().map(|(&room, _)| room);
            let bin = match fit {
                Some(room) => {
                    let queue = by_room.get_mut(&room).expect("room found above");
                    let bin = queue.pop_front().expect("no empty queues are kept");
                    if queue.is_empty() {
                        by_room.remove(&room);
                    }
                    bin
                }
                None => {
                    bins.push((Vec::new(), 0));
                    bins.len() - 1
                }
            };
            bins[bin].0.push(i);
            bins[bin].1 += len;
            let room = seq_length - bins[bin].1;
            if room > 0 {
                by_room.entry(room).or_default().push_back(bin);
            }
        }
        rows.extend(
            bins.into_iter()
                .map(|(ids, _)| Packed::concat(&ids.iter().map(|&i| &cut[i]).collect::<Vec<_>>())),
        );
    }
    rows
}

/// How full the rows are: real tokens over `rows × seq_length`, for the log.
pub fn fill(rows: &[Packed], seq_length: usize) -> f64 {
    let tokens: usize = rows.iter().map(|r| r.row.input_ids.len()).sum();
    tokens as f64 / (rows.len() * seq_length).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Examples of the given lengths, each token its example's index (so rows show where every
    /// example went) and every token but the first a target.
    fn examples(lengths: &[usize]) -> Vec<Example> {
        lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| Example {
                input_ids: vec![i as u32; n],
                targets: (0..n).map(|t| t > 0).collect(),
            })
            .collect()
    }

    /// Each row as the example indices it holds, in order.
    fn layout(rows: &[Packed]) -> Vec<Vec<u32>> {
        rows.iter()
            .map(|r| {
                let mut at = 0;
                r.seq_lengths
                    .iter()
                    .map(|&n| {
                        at += n;
                        r.row.input_ids[at - n]
                    })
                    .collect()
            })
            .collect()
    }

    fn check(lengths: &[usize], seq_length: usize, expect: &[&[u32]]) {
        let ex = examples(lengths);
        let rows = pack_bfd(&ex, seq_length);
        assert_eq!(
            layout(&rows),
            expect,
            "lengths {lengths:?} into {seq_length}"
        );
        for r in &rows {
            assert!(r.row.input_ids.len() <= seq_length);
            assert_eq!(r.seq_lengths.iter().sum::<usize>(), r.row.input_ids.len());
            assert_eq!(r.row.targets.len(), r.row.input_ids.len());
        }
    }

    /// TRL's docstring example (`pack_dataset(..., seq_length=4, strategy="bfd")`): lengths
    /// 5, 2, 3, 1 give rows [0 (cut to 4)], [2, 3], [1], with seq_lengths [[4], [3, 1], [2]].
    #[test]
    fn packs_as_trls_docstring_example() {
        check(&[5, 2, 3, 1], 4, &[&[0], &[2, 3], &[1]]);
        let rows = pack_bfd(&examples(&[5, 2, 3, 1]), 4);
        let lengths: Vec<Vec<usize>> = rows.iter().map(|r| r.seq_lengths.clone()).collect();
        assert_eq!(lengths, vec![vec![4], vec![3, 1], vec![2]]);
    }

    #[test]
    fn best_fit_takes_the_tightest_row_and_the_oldest_among_equals() {
        // 6 and 5 open two rows (room 4 and 5); 4 fits both and takes the tighter (room 4);
        // 3 then goes to the row with room 5; ties in length keep their order (1 before 2).
        check(&[6, 5, 4, 3], 10, &[&[0, 2], &[1, 3]]);
        check(&[3, 3, 3, 3], 7, &[&[0, 1], &[2, 3]]);
        // Two rows with equal room: the first opened gets the example.
        check(&[5, 5, 2], 7, &[&[0, 2], &[1]]);
    }

    #[test]
    fn every_example_lands_whole_once_and_empty_ones_are_dropped() {
        let lengths: Vec<usize> = (0..300).map(|i| (i * 7919) % 97).collect();
        let ex = examples(&lengths);
        let rows = pack_bfd(&ex, 128);
        let mut seen: Vec<u32> = layout(&rows).into_iter().flatten().collect();
        seen.sort();
        let want: Vec<u32> = (0..300u32).filter(|&i| lengths[i as usize] > 0).collect();
        assert_eq!(seen, want);
        for r in &rows {
            let mut at = 0;
            for &n in &r.seq_lengths {
                let i = r.row.input_ids[at] as usize;
                assert_eq!(n, lengths[i], "example {i} was split");
                assert!(r.row.input_ids[at..at + n].iter().all(|&t| t as usize == i));
                // Each example's first token stays a non-target.
                assert!(!r.row.targets[at]);
                at += n;
            }
            assert!(at <= 128);
        }
        assert!(fill(&rows, 128) > 0.9, "{}", fill(&rows, 128));
    }

    #[test]
    fn each_thousand_examples_is_packed_on_its_own_as_trl_maps_them() {
        // 1001 one-token examples into rows of 2000: the first row has room for all, but the
        // thousand-example boundary puts the last one in a row of its own.
        let rows = pack_bfd(&examples(&[1; 1001]), 2000);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].seq_lengths.len(), 1000);
        assert_eq!(rows[1].seq_lengths.len(), 1);
    }

    /// TRL's docstring example for `bfd_split` (`bfd-requeue` before TRL 1): the 5-token
    /// example's last token is packed as an example of its own, so rows hold
    /// [1, 2, 3, 4], [8, 9, 10, 5], [6, 7, 11] with seq_lengths [[4], [3, 1], [2, 1]].
    #[test]
    fn bfd_split_packs_as_trls_docstring_example() {
        let rows = pack_bfd_split(&examples(&[5, 2, 3, 1]), 4);
        assert_eq!(layout(&rows), vec![vec![0], vec![2, 0], vec![1, 3]]);
        let lengths: Vec<Vec<usize>> = rows.iter().map(|r| r.seq_lengths.clone()).collect();
        assert_eq!(lengths, vec![vec![4], vec![3, 1], vec![2, 1]]);
        // No token is lost, each piece keeps its targets, and a piece is at most a row.
        let tokens: usize = rows.iter().map(|r| r.row.input_ids.len()).sum();
        assert_eq!(tokens, 11);
        assert_eq!(rows[1].row.targets, vec![false, true, true, true]);
        let long = pack_bfd_split(&examples(&[10]), 4);
        let lengths: Vec<Vec<usize>> = long.iter().map(|r| r.seq_lengths.clone()).collect();
        assert_eq!(lengths, vec![vec![4], vec![4], vec![2]]);
    }

    /// TRL's `wrapped`: the examples run on, cut every `seq_length` tokens; each row is one
    /// sequence.
    #[test]
    fn wrapped_cuts_the_concatenation_into_rows() {
        let rows = pack_wrapped(&examples(&[5, 2, 3, 1]), 4, false);
        let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.row.input_ids.clone()).collect();
        assert_eq!(ids, vec![vec![0, 0, 0, 0], vec![0, 1, 1, 2], vec![2, 2, 3]]);
        assert!(
            rows.iter()
                .all(|r| r.seq_lengths == vec![r.row.input_ids.len()])
        );
        // An example's first token is a label only when the loss is on prompts too.
        assert_eq!(rows[1].row.targets, vec![true, false, true, false]);
        let rows = pack_wrapped(&examples(&[5, 2, 3, 1]), 4, true);
        assert_eq!(rows[1].row.targets, vec![true, true, true, true]);
        assert_eq!(rows[2].row.targets, vec![true, true, true]);
        // Each thousand examples wraps on its own, as TRL maps them.
        let rows = pack_wrapped(&examples(&[1; 1001]), 600, false);
        let lengths: Vec<usize> = rows.iter().map(|r| r.row.input_ids.len()).collect();
        assert_eq!(lengths, vec![600, 400, 1]);
    }
}
