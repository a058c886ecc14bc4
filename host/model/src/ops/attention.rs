//! What attention needs besides weights, shared by Falcon and Llama: the KV cache, the causal
//! mask combined with a padding mask (and, for packed rows, a segment mask), position ids as
//! `generate` computes them, rotary embeddings, ALiBi biases, and scaled dot-product attention.
//!
//! **Architecture Invariant:** the `attention_mask` a model gets always covers the cached tokens
//! and the new ones (`[batch, past + seq]`), as in transformers; positions, padding and ALiBi are
//! all derived from it, so left-padded batches give each row the numbers it would get alone.
//! Packed rows (several examples in one row, TRL's `packing`) add segment ids: positions restart
//! at each segment and a query sees only keys of its own segment, so each packed example gets
//! the numbers it would get alone too.

use candle_core::{D, DType, Device, Result, Tensor};

/// Keys and values of every layer seen so far, `[batch, kv_heads, past, head_dim]` each.
///
/// Each layer's keys and values live in buffers with room for more tokens than they hold
/// ([`KvCache::with_room`]; [`KvCache::ROOM`] unless told): a decoding step writes its token in
/// place (one copy per tensor) instead of concatenating the whole past into a new tensor (a
/// copy of everything cached, two launches per tensor, every layer, every token), and a full
/// buffer grows by the tokens it needs plus the room. The views [`KvCache::append`] returns
/// cover the tokens written so far; later steps write only past them, so a view never changes
/// under its holder.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    room: usize,
}

#[derive(Debug)]
struct LayerCache {
    /// `[2, batch, kv_heads, capacity, head_dim]`, keys then values, the first `len` positions
    /// written: one buffer, so one kernel can write both in place (`ops::rope_append`).
    kv: Tensor,
    len: usize,
}

impl KvCache {
    /// Tokens a buffer has room for beyond what it holds when it is made or grown, unless
    /// [`KvCache::with_room`] says otherwise.
    pub const ROOM: usize = 256;

    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            room: Self::ROOM,
        }
    }

    /// The cache with buffers made (or grown) with room for `tokens` more than they hold:
    /// generation passes the tokens it may add, so the buffers are made once at the size the
    /// whole generation needs, and a wide cache (many KV heads, large batches) reserves no more.
    pub fn with_room(mut self, tokens: usize) -> Self {
        self.room = tokens;
        self
    }

    /// Tokens cached so far.
    pub fn seq_len(&self) -> usize {
        match self.layers.first() {
            Some(Some(l)) => l.len,
            _ => 0,
        }
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Appends this step's keys and values for `layer`, returning all of them.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
        if v.dims() != k.dims() || v.dtype() != k.dtype() {
            candle_core::bail!(
                "kv cache: keys {:?} {:?} and values {:?} {:?} differ",
                k.dims(),
                k.dtype(),
                v.dims(),
                v.dtype()
            );
        }
        let (buffer, len) = self.reserve(layer, k.dims4()?, k.dtype(), k.device())?;
        buffer.slice_set(&Tensor::stack(&[&k, &v], 0)?, 3, len)?;
        self.advance(layer, k.dim(2)?)
    }

    /// The buffer of `layer` (`[2, batch, kv_heads, capacity, head_dim]`, made or grown to fit
    /// `new` more positions of `[batch, kv_heads, new, head_dim]`) and the positions it holds,
    /// for a writer that then calls [`Self::advance`].
    pub(crate) fn reserve(
        &mut self,
        layer: usize,
        (b, h, new, d): (usize, usize, usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, usize)> {
        let room = self.room;
        let slot = self.slot(layer)?;
        let len = slot.as_ref().map_or(0, |l| l.len);
        if let Some(l) = slot.as_ref()
            && l.kv.dims()[..3] != [2, b, h][..]
        {
            candle_core::bail!(
                "kv cache: layer {layer} holds {:?}, given [{b}, {h}, {new}, {d}]",
                l.kv.dims()
            );
        }
        let fits = slot.as_ref().is_some_and(|l| l.len + new <= l.kv.dims()[3]);
        if !fits {
            let buffer = Tensor::zeros((2, b, h, len + new + room, d), dtype, device)?;
            if let Some(old) = slot.take() {
                buffer.slice_set(&old.kv.narrow(3, 0, len)?.contiguous()?, 3, 0)?;
            }
            *slot = Some(LayerCache { kv: buffer, len });
        }
        let l = slot.as_ref().expect("made above");
        Ok((l.kv.clone(), l.len))
    }

    /// Counts `new` positions written into `layer`'s buffer after [`Self::reserve`], returning
    /// all its keys and values.
    pub(crate) fn advance(&mut self, layer: usize, new: usize) -> Result<(Tensor, Tensor)> {
        let Some(l) = self.slot(layer)?.as_mut() else {
            candle_core::bail!("kv cache: layer {layer} advanced before it was reserved");
        };
        if l.len + new > l.kv.dims()[3] {
            candle_core::bail!("kv cache: layer {layer} advanced past its capacity");
        }
        l.len += new;
        let all = l.kv.narrow(3, 0, l.len)?;
        Ok((all.get(0)?, all.get(1)?))
    }

    fn slot(&mut self, layer: usize) -> Result<&mut Option<LayerCache>> {
        let layers = self.layers.len();
        self.layers.get_mut(layer).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "kv cache has {layers} layers, asked for layer {layer}"
            ))
        })
    }
}

/// The per-forward facts every layer shares: rotary positions, the additive mask and the
/// positions ALiBi measures keys by.
#[derive(Debug, Clone)]
pub struct AttentionContext {
    pub batch: usize,
    pub seq_len: usize,
    pub past_len: usize,
    /// Position id of each new token, `[batch][seq_len]`: `cumsum(mask) - 1`, 1 on padding
    /// (transformers' `prepare_inputs_for_generation`).
    pub positions: Vec<Vec<u32>>,
    /// `(cumsum(mask) - 1) * mask` over all `past + seq` keys, as transformers'
    /// `build_alibi_tensor` uses.
    pub key_positions: Vec<Vec<u32>>,
    /// [`Self::mask`], made on first use.
    bias: std::sync::OnceLock<Option<Tensor>>,
    /// [`Self::regrouped`], made on first use.
    segments: std::sync::OnceLock<Option<Segments>>,
    /// Which attention the layers run; the model sets it ([`AttentionContext::with_kernel`]).
    pub kernel: AttentionKernel,
    /// Who sees whom, as flash attention reads it: made on first use, once per forward.
    visibility: std::sync::OnceLock<crate::ops::flash::Visibility>,
    /// Real keys and packed examples per row, what [`Self::visibility`] is made from.
    real: Vec<Vec<bool>>,
    examples: Option<Vec<Vec<u32>>>,
    device: Device,
}

/// The attention a model runs, transformers' `attn_implementation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// Scores materialised and masked, as transformers' `eager` (here with one fused softmax,
    /// and backward recomputing the probabilities rather than keeping them).
    #[default]
    Eager,
    /// [`crate::ops::flash`]: no scores stored, masking from the context's [`Visibility`]
    /// (transformers' `flash_attention_2`, varlen for packed rows).
    ///
    /// [`Visibility`]: crate::ops::flash::Visibility
    Flash,
}

impl AttentionKernel {
    /// Refuses a kernel that cannot serve heads of `head_dim`.
    pub fn check_head_dim(self, head_dim: usize) -> Result<()> {
        if self == AttentionKernel::Flash && head_dim > crate::ops::flash::MAX_HEAD_DIM {
            candle_core::bail!(
                "flash attention serves heads of at most {} dimensions; this model's have {head_dim}: use eager attention",
                crate::ops::flash::MAX_HEAD_DIM
            );
        }
        Ok(())
    }
}

/// How eager attention runs packed rows (`ADAPTERLAB_PACKED_ATTENTION`): regrouped one example
/// a row ([`Segments`], `regroup`) or as the packed rows under their block-diagonal mask
/// (`mask`). The two give the same numbers up to the matmuls' summation order
/// (`regrouped_packed_attention_equals_the_masked_rows_and_their_gradients`); the choice is
/// speed alone. Regrouping computes fewer scores but gathers and scatters every q, k and v (and
/// their gradients): on an H100 (2026-12-06, 7B shape, 8 x 512 packed rows of 100-400-token
/// examples) it trained at 4,233 useful tokens/s against the mask's 7,173, so a CUDA device
/// masks by default and the CPU, where scores cost more than copies, regroups.
/// Flash attention reads packed rows directly and ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedAttention {
    Regroup,
    Mask,
}

impl PackedAttention {
    pub const ENV: &'static str = "ADAPTERLAB_PACKED_ATTENTION";

    /// The choice for `device`: the environment's, else the device's default (see above).
    pub fn for_device(device: &Device) -> Result<Self> {
        Ok(Self::from_env()?.unwrap_or(if device.is_cpu() {
            PackedAttention::Regroup
        } else {
            PackedAttention::Mask
        }))
    }

    /// The environment's choice, read once (`None` when unset); an unknown value is an error
    /// naming the variable.
    pub fn from_env() -> Result<Option<Self>> {
        static SWITCH: crate::ops::switch::Switch<PackedAttention> =
            crate::ops::switch::Switch::new(PackedAttention::ENV, PackedAttention::NAMES);
        SWITCH.get()
    }

    const NAMES: &'static [(&'static str, PackedAttention)] = &[
        ("regroup", PackedAttention::Regroup),
        ("mask", PackedAttention::Mask),
    ];

    #[cfg(test)]
    fn parse(value: Option<&str>) -> std::result::Result<Option<Self>, String> {
        crate::ops::switch::parse(Self::ENV, value, Self::NAMES)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PackedAttention::Regroup => "regroup",
            PackedAttention::Mask => "mask",
        }
    }
}

/// Packed rows regrouped for attention, one example a row: the masked `[b, h, s, s]` scores of
/// a packed batch spend most of their work on pairs of tokens from different examples, which
/// the mask then discards. Regrouped, the examples are sorted by length and cut into at most
/// [`Segments::MAX_GROUPS`] groups, each padded to its longest example, so attention computes
/// `sum(n_g x longest_g^2)` scores instead of `b x s^2`. The result is the same (masked keys get
/// exactly zero weight either way), up to the matmuls' summation order.
#[derive(Debug, Clone)]
pub struct Segments {
    /// Flat positions `row * seq + t` of each group's examples' tokens, group after group,
    /// each example padded to its group's longest with its first position (masked as a key).
    gather: Tensor,
    /// For each flat position, its slot in the gathered layout (row padding reads slot 0):
    /// `[b * seq]` u32.
    scatter: Tensor,
    groups: Vec<Group>,
}

#[derive(Debug, Clone)]
struct Group {
    /// Examples in the group, and the longest one's length.
    n: usize,
    longest: usize,
    /// Causal within each example, padding slots masked as keys: `[n, 1, longest, longest]`.
    bias: Tensor,
}

impl Segments {
    /// Separate attention calls one packed batch may be cut into.
    pub const MAX_GROUPS: usize = 4;

    /// The regrouping of `segments` (ids per token, real tokens per `mask`), or `None` when it
    /// would not compute fewer scores than the packed rows.
    fn plan(
        mask: &[Vec<bool>],
        segments: &[Vec<u32>],
        seq_len: usize,
        device: &Device,
    ) -> Result<Option<Self>> {
        // Runs of equal ids among real tokens, as flat positions.
        let mut runs: Vec<Vec<u32>> = Vec::new();
        for (b, (row, ids)) in mask.iter().zip(segments).enumerate() {
            let mut previous: Option<u32> = None;
            for (t, (&real, &id)) in row.iter().zip(ids).enumerate() {
                if !real {
                    previous = None;
                    continue;
                }
                if previous != Some(id) {
                    runs.push(Vec::new());
                }
                previous = Some(id);
                runs.last_mut()
                    .expect("a run was opened")
                    .push((b * seq_len + t) as u32);
            }
        }
        if runs.is_empty() {
            return Ok(None);
        }
        // Longest first (ties in order), then the cut into groups that computes fewest scores.
        runs.sort_by_key(|r| std::cmp::Reverse(r.len()));
        let lengths: Vec<usize> = runs.iter().map(Vec::len).collect();
        let (cost, cuts) = cheapest_cut(&lengths, Self::MAX_GROUPS);
        if cost >= mask.len() * seq_len * seq_len {
            return Ok(None);
        }
        let mut gather = Vec::new();
        let mut scatter = vec![0u32; mask.len() * seq_len];
        let mut groups = Vec::with_capacity(cuts.len());
        for (first, end) in cuts {
            let group = &runs[first..end];
            let longest = group[0].len();
            let mut bias = vec![0f32; group.len() * longest * longest];
            for (r, run) in group.iter().enumerate() {
                for slot in 0..longest {
                    if let Some(&flat) = run.get(slot) {
                        scatter[flat as usize] = gather.len() as u32;
                    }
                    gather.push(run.get(slot).copied().unwrap_or(run[0]));
                    for key in 0..longest {
                        if key > slot || key >= run.len() {
                            bias[(r * longest + slot) * longest + key] = f32::MIN;
                        }
                    }
                }
            }
            groups.push(Group {
                n: group.len(),
                longest,
                bias: Tensor::from_vec(bias, (group.len(), 1, longest, longest), device)?,
            });
        }
        let slots = gather.len();
        Ok(Some(Segments {
            gather: Tensor::from_vec(gather, slots, device)?,
            scatter: Tensor::from_vec(scatter, mask.len() * seq_len, device)?,
            groups,
        }))
    }

    /// Attention over the regrouped examples: `q` `[b, h, s, d]`, `k`, `v` `[b, kv, s, d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, h, s, d) = q.dims4()?;
        // `[b, heads, s, d]` → `[slots, heads * d]`, the slots in group order.
        let gathered = |x: &Tensor| -> Result<Tensor> {
            let (b, heads, t, d) = x.dims4()?;
            x.transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, heads * d))?
                .index_select(&self.gather, 0)
        };
        let (qg, kg, vg) = (gathered(q)?, gathered(k)?, gathered(v)?);
        let mut outs = Vec::with_capacity(self.groups.len());
        let mut first = 0;
        for g in &self.groups {
            let slots = g.n * g.longest;
            let rows = |x: &Tensor| -> Result<Tensor> {
                let width = x.dim(1)? / d;
                x.narrow(0, first, slots)?
                    .reshape((g.n, g.longest, width, d))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let out = attend(
                &rows(&qg)?,
                &rows(&kg)?,
                &rows(&vg)?,
                scale,
                None,
                Some(&g.bias),
            )?;
            outs.push(out.transpose(1, 2)?.contiguous()?.reshape((slots, h * d))?);
            first += slots;
        }
        let out = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 0)?
        };
        out.index_select(&self.scatter, 0)?
            .reshape((b, s, h, d))?
            .transpose(1, 2)
    }
}

/// The cut of `lengths` (sorted longest first) into at most `max_groups` consecutive groups
/// that minimises `sum(n_g x longest_g^2)`, the scores attention computes; returns that sum and
/// the groups as `(first, end)` ranges. Dynamic programming over the cut points: a packed batch
/// holds a few hundred examples at most.
fn cheapest_cut(lengths: &[usize], max_groups: usize) -> (usize, Vec<(usize, usize)>) {
    let n = lengths.len();
    let cost = |first: usize, end: usize| (end - first) * lengths[first] * lengths[first];
    // best[g][i]: the cheapest cut of lengths[i..] into at most g groups, and its first end.
    let mut best = vec![vec![(usize::MAX, n); n + 1]; max_groups + 1];
    for row in best.iter_mut() {
        row[n] = (0, n);
    }
    for g in 1..=max_groups {
        for i in (0..n).rev() {
            let mut choice = (cost(i, n), n);
            // Longer first groups first: of equal costs, the fewer calls.
            for end in (i + 1..n).rev() {
                let rest = best[g - 1][end].0;
                if rest != usize::MAX && cost(i, end) + rest < choice.0 {
                    choice = (cost(i, end) + rest, end);
                }
            }
            best[g][i] = choice;
        }
    }
    let mut cuts = Vec::new();
    let (mut i, mut g) = (0, max_groups);
    while i < n {
        let end = best[g][i].1;
        cuts.push((i, end));
        i = end;
        g -= 1;
    }
    (best[max_groups][0].0, cuts)
}

impl AttentionContext {
    /// `attention_mask`: `[batch, past + seq]`, any dtype, non-zero = attend; `None` = all ones.
    pub fn new(
        attention_mask: Option<&Tensor>,
        batch: usize,
        seq_len: usize,
        past_len: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::build(attention_mask, None, batch, seq_len, past_len, device)
    }

    /// Refuses a context made for another input than `input_ids` `[batch, seq]` after what
    /// `cache` holds.
    pub fn check_fits(&self, input_ids: &Tensor, cache: Option<&KvCache>) -> Result<()> {
        let (b, s) = input_ids.dims2()?;
        let past = cache.map_or(0, KvCache::seq_len);
        if (self.batch, self.seq_len, self.past_len) != (b, s, past) {
            candle_core::bail!(
                "attention context for [{}, {}] after {} cached, input [{b}, {s}] after {past}",
                self.batch,
                self.seq_len,
                self.past_len
            );
        }
        Ok(())
    }

    /// For packed rows (no cache): `segments[b][t]` is the example token `t` of row `b` belongs
    /// to (any id; a change of id starts a new example). Positions (rotary and ALiBi) restart at
    /// 0 at each example, and a query attends only to earlier keys of its own example, as
    /// transformers' padding-free path (`position_ids` restarting, FlashAttention's varlen)
    /// treats TRL's packed rows.
    pub fn packed(
        attention_mask: Option<&Tensor>,
        segments: &[Vec<u32>],
        batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> Result<Self> {
        if segments.len() != batch || segments.iter().any(|r| r.len() != seq_len) {
            candle_core::bail!(
                "segment ids cover {} rows of {:?} tokens, expected [batch {batch}, seq {seq_len}]",
                segments.len(),
                segments.iter().map(Vec::len).collect::<Vec<_>>()
            );
        }
        Self::build(attention_mask, Some(segments), batch, seq_len, 0, device)
    }

    fn build(
        attention_mask: Option<&Tensor>,
        segments: Option<&[Vec<u32>]>,
        batch: usize,
        seq_len: usize,
        past_len: usize,
        device: &Device,
    ) -> Result<Self> {
        let total = past_len + seq_len;
        let mask: Vec<Vec<bool>> = match attention_mask {
            None => vec![vec![true; total]; batch],
            Some(m) => {
                let dims = m.dims();
                if dims != [batch, total] {
                    candle_core::bail!(
                        "attention_mask has shape {dims:?}, expected [batch {batch}, past {past_len} + new {seq_len}]"
                    );
                }
                m.to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|row| row.into_iter().map(|x| x != 0.0).collect())
                    .collect()
            }
        };
        let mut positions = Vec::with_capacity(batch);
        let mut key_positions = Vec::with_capacity(batch);
        for (b, row) in mask.iter().enumerate() {
            let mut count = 0u32;
            let mut keys = Vec::with_capacity(total);
            let mut pos = Vec::with_capacity(total);
            for (j, &m) in row.iter().enumerate() {
                if let Some(seg) = segments
                    && j > 0
                    && seg[b][j] != seg[b][j - 1]
                {
                    count = 0;
                }
                count += m as u32;
                // cumsum - 1, which is -1 before the first real token: only reached by padding.
                let p = count.saturating_sub(1);
                keys.push(if m { p } else { 0 });
                pos.push(if m { p } else { 1 });
            }
            positions.push(pos[past_len..].to_vec());
            key_positions.push(keys);
        }
        Ok(AttentionContext {
            batch,
            seq_len,
            past_len,
            positions,
            key_positions,
            bias: std::sync::OnceLock::new(),
            segments: std::sync::OnceLock::new(),
            kernel: AttentionKernel::Eager,
            visibility: std::sync::OnceLock::new(),
            real: mask,
            examples: segments.map(<[Vec<u32>]>::to_vec),
            device: device.clone(),
        })
    }

    /// The additive mask `[batch, 1, seq, past + seq]` in f32: 0 where a query may attend,
    /// `f32::MIN` elsewhere (transformers uses `finfo.min`, so fully masked padding rows become
    /// uniform rather than NaN). `None` when nothing is masked (one new token, no padding).
    /// Made on first use (flash attention never needs it), once per forward.
    pub fn mask(&self) -> Result<Option<&Tensor>> {
        if let Some(m) = self.bias.get() {
            return Ok(m.as_ref());
        }
        let (batch, seq_len, past_len) = (self.batch, self.seq_len, self.past_len);
        let total = past_len + seq_len;
        let segments = self.examples.as_deref();
        let any_padding = self.real.iter().any(|r| r.iter().any(|m| !m));
        let bias = if seq_len == 1 && !any_padding && segments.is_none() {
            None
        } else {
            let mut data = vec![0f32; batch * seq_len * total];
            for (b, row) in self.real.iter().enumerate() {
                for i in 0..seq_len {
                    let q = past_len + i;
                    for (j, &m) in row.iter().enumerate() {
                        // Packed rows have no cache: keys and queries share the segment ids.
                        let other = segments.is_some_and(|seg| seg[b][j] != seg[b][q]);
                        if j > q || !m || other {
                            data[(b * seq_len + i) * total + j] = f32::MIN;
                        }
                    }
                }
            }
            Some(Tensor::from_vec(
                data,
                (batch, 1, seq_len, total),
                &self.device,
            )?)
        };
        Ok(self.bias.get_or_init(|| bias).as_ref())
    }

    /// Packed rows regrouped for attention one example a row, when that computes fewer scores
    /// than the masked rows ([`Segments`]); made on first use.
    pub fn regrouped(&self) -> Result<Option<&Segments>> {
        if let Some(s) = self.segments.get() {
            return Ok(s.as_ref());
        }
        let plan = match &self.examples {
            Some(seg) if PackedAttention::for_device(&self.device)? == PackedAttention::Regroup => {
                Segments::plan(&self.real, seg, self.seq_len, &self.device)?
            }
            _ => None,
        };
        Ok(self.segments.get_or_init(|| plan).as_ref())
    }

    /// The context with the layers running `kernel`.
    pub fn with_kernel(mut self, kernel: AttentionKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Who sees whom, for flash attention.
    pub fn visibility(&self) -> Result<&crate::ops::flash::Visibility> {
        if let Some(v) = self.visibility.get() {
            return Ok(v);
        }
        let v = crate::ops::flash::Visibility::new(
            &self.real,
            self.examples.as_deref(),
            self.past_len,
            &self.device,
        )?;
        Ok(self.visibility.get_or_init(|| v))
    }
}

/// Attention under `ctx`: flash attention when the context says so; else [`attend`] with its
/// mask, or, for packed rows worth regrouping (and no ALiBi, whose bias is laid out per packed
/// row), one example a row ([`Segments`]).
pub fn attend_in(
    ctx: &AttentionContext,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    pre_scale_bias: Option<&Tensor>,
) -> Result<Tensor> {
    if ctx.kernel == AttentionKernel::Flash {
        let vis = ctx.visibility()?;
        return crate::ops::flash::flash_attend(q, k, v, scale, pre_scale_bias, vis);
    }
    // One new query after a cache (decoding): the eager path in one launch, where it applies.
    if pre_scale_bias.is_none()
        && ctx.seq_len == 1
        && let Some(out) = crate::ops::decode_attention::attend(q, k, v, scale, ctx.mask()?)?
    {
        return Ok(out);
    }
    if pre_scale_bias.is_none()
        && let Some(seg) = ctx.regrouped()?
    {
        return seg.attend(q, k, v, scale);
    }
    attend(q, k, v, scale, pre_scale_bias, ctx.mask()?)
}

/// Rotary embeddings (`rotate_half` layout, as transformers' Llama and Falcon).
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    /// `inv_freq` as transformers' `ROPE_INIT_FUNCTIONS` compute it, in f32.
    pub fn new(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        let base = theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
            .collect();
        match scaling {
            Some(RopeScaling::Linear { factor }) => {
                inv_freq.iter_mut().for_each(|f| *f /= *factor as f32);
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old = *original_max_position_embeddings as f32;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let smooth = (old / wavelen - low) / (high - low);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if medium { smoothed } else { scaled };
                }
            }
            Some(RopeScaling::Other(_)) | None => {}
        }
        Rotary { inv_freq }
    }

    /// `(cos, sin)`, each `[batch, seq, head_dim / 2]` in `dtype`, for the context's positions:
    /// `position * inv_freq` in f32, as transformers computes `freqs`. Its `cat(freqs, freqs)`
    /// repeats them; the `rope` kernel reads one half for both. Made once per forward pass.
    pub fn cos_sin(
        &self,
        ctx: &AttentionContext,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let n = ctx.batch * ctx.seq_len * half;
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for row in &ctx.positions {
            for &p in row {
                for f in &self.inv_freq {
                    let x = p as f32 * f;
                    cos.push(x.cos());
                    sin.push(x.sin());
                }
            }
        }
        let shape = (ctx.batch, ctx.seq_len, half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// `x * cos + rotate_half(x) * sin` for `x` of shape `[batch, heads, seq, head_dim]`, with
    /// `cos`/`sin` as [`Self::cos_sin`] makes them: candle's fused `rope` kernel, and when a
    /// gradient is wanted one graph node whose backward is the inverse rotation (`rope` with
    /// `-sin`), instead of seven ops and their backward.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let out = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
        if !x.track_op() {
            return Ok(out);
        }
        let (cos, neg_sin) = (cos.clone(), sin.neg()?);
        crate::ops::handover::with_backward("rope", x, out, move |_, grad| {
            candle_nn::rotary_emb::rope(&grad.contiguous()?, &cos, &neg_sin)
        })
    }
}

/// ALiBi slopes of transformers' `build_alibi_tensor`.
pub fn alibi_slopes(num_heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - num_heads.leading_zeros());
    let base = 2f32.powf(-(2f32.powf(-((closest as f32).log2() - 3.0))));
    let mut slopes: Vec<f32> = (1..=closest).map(|p| base.powi(p as i32)).collect();
    if closest != num_heads {
        let extra_base = 2f32.powf(-(2f32.powf(-((2.0 * closest as f32).log2() - 3.0))));
        let remaining = closest.min(num_heads - closest);
        slopes.extend((0..remaining).map(|i| extra_base.powi((1 + 2 * i) as i32)));
    }
    slopes
}

/// The ALiBi bias `[batch, heads, 1, past + seq]`, rounded as transformers computes it: the
/// slopes in bfloat16 times the key positions (promoted to bfloat16), the product rounded to
/// bfloat16, then widened.
pub fn alibi_bias(
    ctx: &AttentionContext,
    num_heads: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    use half::bf16;
    let slopes = alibi_slopes(num_heads);
    let total = ctx.past_len + ctx.seq_len;
    let mut data = Vec::with_capacity(ctx.batch * num_heads * total);
    for row in &ctx.key_positions {
        for s in &slopes {
            let s = bf16::from_f32(*s).to_f32();
            for &p in row {
                let p = bf16::from_f32(p as f32).to_f32();
                data.push(bf16::from_f32(s * p).to_f32());
            }
        }
    }
    Tensor::from_vec(data, (ctx.batch, num_heads, 1, total), device)?.to_dtype(dtype)
}

/// `[batch, kv_heads, t, d]` → `[batch, kv_heads * groups, t, d]`, query head `h` reading KV
/// head `h / groups` (transformers' `repeat_kv`): what grouped [`attend`] is checked against.
/// Rotary scaling, as transformers' `ROPE_INIT_FUNCTIONS` computes it. Only the kinds that are
/// a fixed change of `inv_freq` are implemented; `dynamic`, `yarn` and `longrope` are refused by
/// `validate()`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// `inv_freq / factor`.
    Linear { factor: f64 },
    /// Llama 3.1's smooth per-frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// A kind this crate does not implement; kept so `validate()` can name it.
    Other(String),
}

#[cfg(test)]
fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, groups, t, d))?
        .reshape((b, kv * groups, t, d))
}

/// Scaled dot-product attention: `softmax((q k^T + pre) * scale + mask) v`, the softmax in f32.
///
/// `q`: `[b, h, s, d]`; `k`, `v`: `[b, kv, t, d]` with `h` a multiple of `kv` (query head `i`
/// reads KV head `i / (h / kv)`, as transformers' `repeat_kv` pairs them). The keys and values
/// are never repeated: the queries of a KV head's group are one matrix (`[b, kv, g * s, d]`,
/// the same memory as `[b, h, s, d]`), so one matmul per KV head serves the group.
/// `pre_scale_bias`: ALiBi `[b, h, 1, t]`, added before scaling as Falcon does; `mask`:
/// `[b or 1, 1, s, t]`.
///
/// When a gradient is wanted the scores and probabilities are not kept for backward: they are
/// `[b, h, s, t]` per layer (0.6 GB in f32 at Falcon-7B's 71 heads, 8 x 512 tokens), more than
/// all other activations of a layer together. The graph keeps `q`, `k` and `v` and backward
/// recomputes the probabilities, as flash attention does.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    pre_scale_bias: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return attend_eager(q, k, v, scale, pre_scale_bias, mask);
    }
    let out = attend_eager(
        &q.detach(),
        &k.detach(),
        &v.detach(),
        scale,
        pre_scale_bias,
        mask,
    )?;
    let node = RecomputedAttention {
        scale,
        pre_scale_bias: pre_scale_bias.map(Tensor::detach),
        mask: mask.map(Tensor::detach),
    };
    crate::ops::handover::with_backward3(
        "recomputed-attention",
        [q, k, v],
        out,
        Box::new(move |[q, k, v], _out, dout| node.backward(q, k, v, dout)),
    )
}

/// `[b, h, s, x]` as `[b, kv, (h / kv) * s, x]`: each KV head's query group as one matrix.
fn grouped(x: &Tensor, kv: usize) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    if h % kv != 0 {
        candle_core::bail!("attention: {h} query heads do not split into {kv} KV heads");
    }
    x.contiguous()?.reshape((b, kv, (h / kv) * s, d))
}

/// `q k^T` per query head, `[b, h, s, t]` in `q`'s dtype.
fn scores(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let (b, h, s, _) = q.dims4()?;
    let (_, kv, t, _) = k.dims4()?;
    grouped(q, kv)?
        .matmul(&k.contiguous()?.t()?)?
        .reshape((b, h, s, t))
}

/// `p v` per query head: `p` `[b, h, s, t]`, `v` `[b, kv, t, d]` → `[b, h, s, d]`.
fn weighted(p: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, s, _) = p.dims4()?;
    let (_, kv, _, d) = v.dims4()?;
    grouped(p, kv)?
        .matmul(&v.contiguous()?)?
        .reshape((b, h, s, d))
}

fn attend_eager(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    pre_scale_bias: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = q.device();
    let probs = crate::ops::profile::scope("attn.probs", dev, || {
        probabilities(q, k, scale, pre_scale_bias, mask)
    })?;
    crate::ops::profile::scope("attn.pv", dev, || weighted(&probs, v))
}

/// `softmax((q k^T + pre) * scale + mask)`, computed in f32 and returned in `q`'s dtype.
fn probabilities(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    pre_scale_bias: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    match pre_scale_bias {
        None => crate::ops::softmax::masked_softmax(&scores(q, k)?, mask, scale as f32),
        Some(b) => alibi_probabilities_f32(q, k, scale, b, mask)?.to_dtype(q.dtype()),
    }
}

/// `softmax((q k^T + alibi) * scale + mask)` op by op, in f32 (ALiBi, the RW models only, has
/// no fused kernel).
fn alibi_probabilities_f32(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    alibi: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let s = scores(q, k)?
        .to_dtype(DType::F32)?
        .broadcast_add(&alibi.to_dtype(DType::F32)?)?;
    let s = (s * scale)?;
    let s = match mask {
        Some(m) => s.broadcast_add(m)?,
        None => s,
    };
    crate::ops::softmax::softmax_last_dim(&s, DType::F32)
}

/// The backward pass of [`attend`] with a gradient, which recomputes the probabilities from
/// `q` and `k`.
struct RecomputedAttention {
    scale: f64,
    pre_scale_bias: Option<Tensor>,
    mask: Option<Tensor>,
}

/// Backward works on batch rows in chunks of at most this many score elements (0.5 GB in
/// 16 bits), so long sequences do not need the whole batch's scores at once.
const BACKWARD_CHUNK_ELEMS: usize = 256 << 20;

impl RecomputedAttention {
    /// `(dq, dk, dv)` for batch rows `rows` of `q [b,h,s,d]`, `k`/`v` `[b,kv,t,d]`, `dout`.
    fn backward_rows(
        &self,
        rows: std::ops::Range<usize>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (start, n) = (rows.start, rows.len());
        let pick = |t: &Tensor| t.narrow(0, start, n);
        let (q, k, v, dout) = (pick(q)?, pick(k)?, pick(v)?, pick(dout)?);
        let pick_opt = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            t.as_ref()
                .map(|t| {
                    if t.dims()[0] == 1 {
                        Ok(t.clone())
                    } else {
                        pick(t)
                    }
                })
                .transpose()
        };
        let (bias, mask) = (pick_opt(&self.pre_scale_bias)?, pick_opt(&self.mask)?);
        let kv = k.dims()[1];
        let dtype = q.dtype();
        let dev = q.device().clone();
        let sc = |name, f: &dyn Fn() -> Result<Tensor>| crate::ops::profile::scope(name, &dev, f);
        // dP = dO V^T, per query head.
        let dp = sc("attn.bwd.dp", &|| {
            let (b, h, s, _) = dout.dims4()?;
            let t = v.dims()[2];
            grouped(&dout, kv)?
                .matmul(&v.contiguous()?.t()?)?
                .reshape((b, h, s, t))
        })?;
        let (p, ds) = match &bias {
            None => {
                let s = sc("attn.bwd.scores", &|| scores(&q, &k))?;
                crate::ops::profile::scope("attn.bwd.softmax", &dev, || {
                    crate::ops::softmax::masked_softmax_backward(
                        &s,
                        mask.as_ref(),
                        &dp,
                        self.scale as f32,
                    )
                })?
            }
            Some(alibi) => {
                // ALiBi: the op-by-op softmax backward, dS = P * (dP - sum_j P dP) * scale.
                let p = alibi_probabilities_f32(&q, &k, self.scale, alibi, mask.as_ref())?;
                let dp = dp.to_dtype(DType::F32)?;
                let rowsum = (&p * &dp)?.sum_keepdim(D::Minus1)?;
                let ds = ((&p * dp.broadcast_sub(&rowsum)?)? * self.scale)?.to_dtype(dtype)?;
                (p.to_dtype(dtype)?, ds)
            }
        };
        // dV = P^T dO, dQ = dS K, dK = dS^T Q, each per KV head over its query group.
        let (gp, gds, gdo, gq) = (
            grouped(&p, kv)?,
            grouped(&ds, kv)?,
            grouped(&dout, kv)?,
            grouped(&q, kv)?,
        );
        // Transposed operands go to the matmul as views: cuBLAS and gemm take either layout.
        let dv = sc("attn.bwd.dv", &|| gp.t()?.matmul(&gdo))?;
        let dq = sc("attn.bwd.dq", &|| {
            gds.matmul(&k.contiguous()?)?.reshape(q.dims())
        })?;
        let dk = sc("attn.bwd.dk", &|| gds.t()?.matmul(&gq))?;
        Ok((dq, dk, dv))
    }
}

impl RecomputedAttention {
    /// `[dq, dk, dv]`, batch rows in chunks of at most [`BACKWARD_CHUNK_ELEMS`] scores.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        crate::ops::profile::scope("attn.bwd", q.device(), || {
            let (b, h, s, _) = q.dims4()?;
            let t = k.dims()[2];
            let per_row = (h * s * t).max(1);
            let chunk = (BACKWARD_CHUNK_ELEMS / per_row).clamp(1, b);
            let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
            let mut start = 0;
            while start < b {
                let end = (start + chunk).min(b);
                let (dq, dk, dv) = self.backward_rows(start..end, q, k, v, dout)?;
                dqs.push(dq);
                dks.push(dk);
                dvs.push(dv);
                start = end;
            }
            let cat = |v: Vec<Tensor>| -> Result<Tensor> {
                if v.len() == 1 {
                    Ok(v.into_iter().next().unwrap())
                } else {
                    Tensor::cat(&v, 0)
                }
            };
            Ok([Some(cat(dqs)?), Some(cat(dks)?), Some(cat(dvs)?)])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_mask_follow_left_padding() -> Result<()> {
        let dev = Device::Cpu;
        let mask = Tensor::new(&[[0u32, 0, 1, 1], [1, 1, 1, 1]], &dev)?;
        let ctx = AttentionContext::new(Some(&mask), 2, 4, 0, &dev)?;
        assert_eq!(ctx.positions, vec![vec![1, 1, 0, 1], vec![0, 1, 2, 3]]);
        assert_eq!(ctx.key_positions, vec![vec![0, 0, 0, 1], vec![0, 1, 2, 3]]);
        let bias = ctx.mask()?.unwrap().squeeze(1)?.to_vec3::<f32>()?;
        let m = f32::MIN;
        assert_eq!(bias[0][3], vec![m, m, 0., 0.]);
        assert_eq!(bias[0][0], vec![m, m, m, m]);
        assert_eq!(bias[1][1], vec![0., 0., m, m]);

        // One cached step later: the new token sees everything unpadded before it.
        let mask = Tensor::new(&[[0u8, 0, 1, 1, 1], [1, 1, 1, 1, 1]], &dev)?;
        let ctx = AttentionContext::new(Some(&mask), 2, 1, 4, &dev)?;
        assert_eq!(ctx.positions, vec![vec![2], vec![4]]);
        let bias = ctx
            .mask()?
            .unwrap()
            .squeeze(1)?
            .squeeze(1)?
            .to_vec2::<f32>()?;
        assert_eq!(bias[0], vec![m, m, 0., 0., 0.]);
        assert!(AttentionContext::new(Some(&mask), 2, 1, 3, &dev).is_err());
        Ok(())
    }

    #[test]
    fn the_cache_grows_in_place_and_its_views_never_change() -> Result<()> {
        let dev = Device::Cpu;
        let step = |t: usize, n: usize| -> Result<(Tensor, Tensor)> {
            // [batch 2, kv 3, n tokens, d 4] holding their absolute position t.., k and v apart.
            let pos = Tensor::arange(t as u32, (t + n) as u32, &dev)?.to_dtype(DType::F32)?;
            let k = pos
                .reshape((1, 1, n, 1))?
                .broadcast_as((2, 3, n, 4))?
                .contiguous()?;
            Ok((k.clone(), (k + 1000.0)?))
        };
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        // The default room, grown past once; a room of 3, grown every few tokens.
        for room in [KvCache::ROOM, 3] {
            let mut cache = KvCache::new(2).with_room(room);
            let (k0, v0) = step(0, 5)?;
            let (first_k, _) = cache.append(1, &k0, &v0)?;
            let mut t = 5;
            while t < 5 + room + 40 {
                let (k, v) = step(t, 1)?;
                let (all_k, all_v) = cache.append(1, &k, &v)?;
                t += 1;
                assert_eq!(all_k.dims(), &[2, 3, t, 4]);
                let want = step(0, t)?;
                assert_eq!(diff(&all_k, &want.0)?, 0.0, "room {room}: keys at {t}");
                assert_eq!(diff(&all_v, &want.1)?, 0.0, "room {room}: values at {t}");
            }
            assert_eq!(first_k.dims(), &[2, 3, 5, 4]);
            assert_eq!(diff(&first_k, &k0)?, 0.0, "the first view kept its tokens");
            let refused = cache.append(2, &k0, &v0).err().map(|e| e.to_string());
            assert!(refused.is_some_and(|e| e.contains("2 layers")));
            // Another batch size for a layer already holding one, keys and values that differ,
            // and positions counted before any were reserved: refused, naming what was given.
            let (k3, v3) = (k0.narrow(0, 0, 1)?, v0.narrow(0, 0, 1)?);
            let refused = cache.append(1, &k3, &v3).err().map(|e| e.to_string());
            assert!(
                refused.is_some_and(|e| e.contains("layer 1 holds")),
                "room {room}"
            );
            let refused = cache.append(0, &k0, &v3).err().map(|e| e.to_string());
            assert!(refused.is_some_and(|e| e.contains("differ")), "room {room}");
            let refused = cache.advance(0, 1).err().map(|e| e.to_string());
            assert!(refused.is_some_and(|e| e.contains("before it was reserved")));
        }
        Ok(())
    }

    #[test]
    fn the_cheapest_cut_into_length_groups() {
        // One group pads everything to 10: 4 x 100 = 400; two groups: 2 x 100 + 2 x 4 = 208.
        assert_eq!(cheapest_cut(&[10, 10, 2, 2], 1), (400, vec![(0, 4)]));
        assert_eq!(
            cheapest_cut(&[10, 10, 2, 2], 2),
            (208, vec![(0, 2), (2, 4)])
        );
        // A third group would not lower it: still two.
        assert_eq!(
            cheapest_cut(&[10, 10, 2, 2], 3),
            (208, vec![(0, 2), (2, 4)])
        );
        assert_eq!(cheapest_cut(&[5], 4), (25, vec![(0, 1)]));
    }

    #[test]
    fn packed_attention_reads_regroup_mask_and_refuses_anything_else() {
        assert_eq!(PackedAttention::parse(None), Ok(None));
        assert_eq!(
            PackedAttention::parse(Some("regroup")),
            Ok(Some(PackedAttention::Regroup))
        );
        assert_eq!(
            PackedAttention::parse(Some("mask")),
            Ok(Some(PackedAttention::Mask))
        );
        // Unset, the CPU regroups (the CI's environment leaves the variable unset).
        assert_eq!(
            PackedAttention::for_device(&Device::Cpu).unwrap(),
            PackedAttention::Regroup
        );
        let err = PackedAttention::parse(Some("masked")).unwrap_err();
        assert!(
            err.contains("ADAPTERLAB_PACKED_ATTENTION") && err.contains("\"mask\""),
            "{err}"
        );
    }

    #[test]
    fn regrouped_packed_attention_equals_the_masked_rows_and_their_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // Row 0: examples of 3, 1 and 4 tokens; row 1: 2 and 3 tokens, then 3 of padding.
        let mask = Tensor::new(
            &[[1u32, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]],
            &dev,
        )?;
        let segments = vec![vec![0, 0, 0, 1, 2, 2, 2, 2], vec![5, 5, 6, 6, 6, 6, 6, 6]];
        let ctx = AttentionContext::packed(Some(&mask), &segments, 2, 8, &dev)?;
        let seg = ctx
            .regrouped()?
            .expect("5 examples of at most 4 tokens: few scores");
        // Lengths 4, 3, 3, 2, 1 in four groups: 16 + 18 + 4 + 1 = 39 scores, against the
        // 2 x 8^2 = 128 of the masked rows.
        let shape: Vec<(usize, usize)> = seg.groups.iter().map(|g| (g.n, g.longest)).collect();
        assert_eq!(shape, vec![(1, 4), (2, 3), (1, 2), (1, 1)]);
        // Grouped queries (6 heads over 2 KV heads), as Llama and Falcon-40B use them.
        let q = candle_core::Var::randn(0f32, 1., (2, 6, 8, 4), &dev)?;
        let k = candle_core::Var::randn(0f32, 1., (2, 2, 8, 4), &dev)?;
        let v = candle_core::Var::randn(0f32, 1., (2, 2, 8, 4), &dev)?;
        let w = Tensor::randn(0f32, 1., (2, 6, 8, 4), &dev)?;
        // Only real tokens count: the rows' padding outputs differ by design.
        let real = mask
            .to_dtype(DType::F32)?
            .reshape((2, 1, 8, 1))?
            .broadcast_as((2, 6, 8, 4))?;
        let run = |regrouped: bool| -> Result<(Tensor, Vec<Tensor>)> {
            let out = if regrouped {
                attend_in(&ctx, q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.5, None)?
            } else {
                attend(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    0.5,
                    None,
                    ctx.mask()?,
                )?
            };
            let out = (out * &real)?;
            let grads = (&out * &w)?.sum_all()?.backward()?;
            let g = [&q, &k, &v].map(|x| grads.get(x.as_tensor()).unwrap().clone());
            Ok((out, g.to_vec()))
        };
        let (a, ga) = run(true)?;
        let (b, gb) = run(false)?;
        let diff = |x: &Tensor, y: &Tensor| -> Result<f32> {
            (x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(diff(&a, &b)? < 1e-6, "outputs differ by {}", diff(&a, &b)?);
        for (name, (x, y)) in ["q", "k", "v"].iter().zip(ga.iter().zip(&gb)) {
            assert!(diff(x, y)? < 1e-5, "d{name} differs by {}", diff(x, y)?);
        }
        // Not worth regrouping: one example filling each row.
        let whole = AttentionContext::packed(None, &[vec![0; 8], vec![1; 8]], 2, 8, &dev)?;
        assert!(whole.regrouped()?.is_none());
        Ok(())
    }

    #[test]
    fn packed_rows_restart_positions_and_attend_within_their_segment() -> Result<()> {
        let dev = Device::Cpu;
        // Row 0: examples of 3 and 2 tokens; row 1: one of 2 tokens, then right padding.
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 0, 0, 0]], &dev)?;
        let segments = vec![vec![0, 0, 0, 1, 1], vec![0, 0, 1, 1, 1]];
        let ctx = AttentionContext::packed(Some(&mask), &segments, 2, 5, &dev)?;
        assert_eq!(
            ctx.positions,
            vec![vec![0, 1, 2, 0, 1], vec![0, 1, 1, 1, 1]]
        );
        assert_eq!(
            ctx.key_positions,
            vec![vec![0, 1, 2, 0, 1], vec![0, 1, 0, 0, 0]]
        );
        let bias = ctx.mask()?.unwrap().squeeze(1)?.to_vec3::<f32>()?;
        let m = f32::MIN;
        assert_eq!(bias[0][2], vec![0., 0., 0., m, m]);
        assert_eq!(bias[0][3], vec![m, m, m, 0., m]);
        assert_eq!(bias[0][4], vec![m, m, m, 0., 0.]);
        assert_eq!(bias[1][1], vec![0., 0., m, m, m]);
        // One segment a row is the unpacked context, bit for bit.
        let one = vec![vec![7; 5], vec![0; 5]];
        let packed = AttentionContext::packed(Some(&mask), &one, 2, 5, &dev)?;
        let plain = AttentionContext::new(Some(&mask), 2, 5, 0, &dev)?;
        assert_eq!(packed.positions, plain.positions);
        assert_eq!(packed.key_positions, plain.key_positions);
        let (a, b) = (packed.mask()?.unwrap(), plain.mask()?.unwrap());
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?
        );
        assert!(AttentionContext::packed(Some(&mask), &segments[..1], 2, 5, &dev).is_err());
        Ok(())
    }

    #[test]
    fn alibi_slopes_match_transformers() {
        // build_alibi_tensor for 4 heads: base 2^-2; for 6: 4 powers of 2^-2 then 2 of 2^-1.
        assert_eq!(alibi_slopes(4), vec![0.25, 0.0625, 0.015625, 0.00390625]);
        let s6 = alibi_slopes(6);
        assert_eq!(s6.len(), 6);
        assert_eq!(&s6[4..], &[0.5, 0.125]);
    }

    /// `fast` and `slow` agree, and so do their gradients with respect to `vars` (against the
    /// weights `w`).
    fn assert_same_with_gradients(
        fast: Tensor,
        slow: Tensor,
        w: &Tensor,
        vars: [(&str, &candle_core::Var); 3],
    ) -> Result<()> {
        let diff = (&fast - &slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "forward differs by {diff}");
        let gf = (fast * w)?.sum_all()?.backward()?;
        let gs = (slow * w)?.sum_all()?.backward()?;
        for (name, var) in vars {
            let (a, e) = (gf.get(var).unwrap(), gs.get(var).unwrap());
            let diff = (a - e)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "d{name} differs by {diff}");
        }
        Ok(())
    }

    /// Attention op by op, which candle can differentiate: what the recomputing, fused path
    /// must equal.
    fn attend_reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        pre_scale_bias: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let scores = match pre_scale_bias {
            Some(b) => scores.broadcast_add(b)?,
            None => scores,
        };
        let scores = (scores * scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(v)
    }

    #[test]
    fn recomputed_attention_gradients_equal_the_eager_graphs() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, s, d) = (2, 3, 5, 4);
        let mk = |seed: f32| -> Result<candle_core::Var> {
            let n = b * h * s * d;
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
            candle_core::Var::from_tensor(&Tensor::from_vec(v, (b, h, s, d), &dev)?)
        };
        let (q, k, v) = (mk(0.1)?, mk(1.3)?, mk(2.9)?);
        let mask = Tensor::new(&[[0u32, 1, 1, 1, 1], [1, 1, 1, 1, 1]], &dev)?;
        let ctx = AttentionContext::new(Some(&mask), b, s, 0, &dev)?;
        let alibi = alibi_bias(&ctx, h, DType::F32, &dev)?;
        let w = Tensor::from_vec(
            (0..b * h * s * d).map(|i| (i % 7) as f32 - 3.0).collect(),
            (b, h, s, d),
            &dev,
        )?;
        for bias in [None, Some(&alibi)] {
            let fast = attend(&q, &k, &v, 0.5, bias, ctx.mask()?)?;
            let slow = attend_reference(&q, &k, &v, 0.5, bias, ctx.mask()?)?;
            assert_same_with_gradients(fast, slow, &w, [("q", &q), ("k", &k), ("v", &v)])?;
        }
        Ok(())
    }

    /// Attention over KV heads shared by query groups equals attention over repeated keys and
    /// values, forward and backward (the gradient of a shared head sums over its group).
    #[test]
    fn grouped_attention_equals_repeated_kv() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, kv, s, d) = (2, 6, 2, 5, 4);
        let mk = |heads: usize, seed: f32| -> Result<candle_core::Var> {
            let n = b * heads * s * d;
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.29 + seed).sin()).collect();
            candle_core::Var::from_tensor(&Tensor::from_vec(v, (b, heads, s, d), &dev)?)
        };
        let (q, k, v) = (mk(h, 0.3)?, mk(kv, 1.1)?, mk(kv, 2.3)?);
        let mask = Tensor::new(&[[0u32, 1, 1, 1, 1], [1, 1, 1, 1, 1]], &dev)?;
        let ctx = AttentionContext::new(Some(&mask), b, s, 0, &dev)?;
        let w = Tensor::from_vec(
            (0..b * h * s * d).map(|i| (i % 7) as f32 - 3.0).collect(),
            (b, h, s, d),
            &dev,
        )?;
        let grouped = attend(&q, &k, &v, 0.5, None, ctx.mask()?)?;
        let (kr, vr) = (repeat_kv(&k, h / kv)?, repeat_kv(&v, h / kv)?);
        let repeated = attend(&q, &kr, &vr, 0.5, None, ctx.mask()?)?;
        assert_same_with_gradients(grouped, repeated, &w, [("q", &q), ("k", &k), ("v", &v)])?;
        Ok(())
    }

    #[test]
    fn repeat_kv_groups_adjacent_heads() -> Result<()> {
        let x = Tensor::new(&[1f32, 2.], &Device::Cpu)?.reshape((1, 2, 1, 1))?;
        let r = repeat_kv(&x, 3)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(r, vec![1., 1., 1., 2., 2., 2.]);
        Ok(())
    }
}
