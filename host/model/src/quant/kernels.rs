//! The host side of the NF4 kernels: quantization at load (`nf4_quantize.cu`, the GPU twin of
//! the CPU path, bit for bit), dequantization (`nf4.cu`) in one pass, every step in f32
//! with the operations bitsandbytes does and one rounding (the same bits as the CPU path; the
//! tensor-op version it replaced moved ~20 bytes per weight through five kernels, this one reads
//! half a byte and writes two), and the decoding kernels ([`DecodeKernel`]) computing `y = x W^T`
//! straight from the 4-bit data for a few rows, so a token reads half a byte per weight.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig};
use candle_core::{CudaStorage, DType, Error, Result, Storage, Tensor};

use crate::ops::epilogue::Epilogue;
use crate::ops::kernels::{CudaInput, CudaModule, cuda_device, wrap};
use crate::ops::switch::Switch;

/// Rows of `x` the GEMVs (`nf4_gemv_*`, `nf4_gemv32_*`) handle; more rows go through
/// dequantize + cuBLAS, or, opted in, the tensor-core GEMM or the small-batch GEMM.
pub const GEMV_MAX_ROWS: usize = 8;

/// Rows of `x` the small-batch GEMM (`nf4_gemm_small_*`) handles: batched decoding.
pub const GEMM_MAX_ROWS: usize = 32;

/// Rows of `x` the tensor-core GEMM (`nf4_mma_*`) handles: one m16n8k16 A operand.
pub const MMA_MAX_ROWS: usize = 16;

/// 4-byte words of codes (8 weights each) a thread of the wide dequantization kernel
/// (`nf4_dequant_wide_*`) turns into weights: 32 bytes of loads a thread in flight at once.
const DEQUANT_WORDS: usize = 8;

/// How the tensor-core kernel (`nf4_mma.cu`) splits its work: `warps` warps a block split a
/// row's 128-column chunks, each warp issuing `unroll` chunks' loads of codes before it uses
/// any, and computing `tiles` tiles of 8 features from each fragment of x it loads. A feature's
/// sum depends on `warps` alone: warp w adds chunks w, w + warps, w + 2 warps ... in that order
/// whatever `unroll` and `tiles` are, so tilings of 8 warps give the bits of the kernel before
/// it had tilings.
///
/// `swapped`: the form for up to 8 rows that takes W as the mma's A operand and x as its B
/// (16 features a block, `tiles` 1; `nf4_mma_swapped` in nf4_mma.cu). Where x is the A operand,
/// its rows 8-15 are zero registers moved into place for every mma; ncu counted ~9 instructions
/// a weight at one row there, issue bound (H100, 2026-12-07).
///
/// `pairs`: the swapped form with each weight formed as bitsandbytes' batch-1 GEMV forms it
/// ([`OneRow::Gemv4bit`]; `nf4_mma_pairs` in nf4_mma.cu), two weights a shared load, split
/// over k where that fills the GPU ([`PairsSplit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaTiling {
    pub warps: u32,
    pub unroll: u32,
    pub tiles: u32,
    pub swapped: bool,
    pub pairs: bool,
}

impl MmaTiling {
    const fn new(warps: u32, unroll: u32, tiles: u32) -> Self {
        MmaTiling {
            warps,
            unroll,
            tiles,
            swapped: false,
            pairs: false,
        }
    }

    const fn swapped(warps: u32, unroll: u32) -> Self {
        MmaTiling {
            warps,
            unroll,
            tiles: 1,
            swapped: true,
            pairs: false,
        }
    }

    const fn pairs(warps: u32, unroll: u32) -> Self {
        MmaTiling {
            warps,
            unroll,
            tiles: 1,
            swapped: true,
            pairs: true,
        }
    }

    /// The tilings decoding uses: up to 8 rows, more, and one row with bitsandbytes' batch-1
    /// weights ([`Self::for_shape`]).
    pub const DEFAULTS: [MmaTiling; 3] = [
        MmaTiling::swapped(8, 2),
        MmaTiling::new(8, 1, 2),
        MmaTiling::pairs(8, 2),
    ];

    /// The tilings decoding may launch (the defaults), whose instances are in the decoding
    /// module (with PDL where it is on). Tried and measured slower on an H100 (2026-12-07,
    /// BENCHMARKS.md), so no longer built: the pairs form asking the L2 for each warp's next
    /// round of codes (`p8u2f`, −0.7% end to end), issuing it into a second set of registers
    /// before computing the current one (`p8u1a` −5%, `p8u2a` −10%), copying each warp's codes
    /// to shared memory stages ahead (`p8c3` −20%: more traffic on the shared-memory pipe the
    /// form already waits on), and forming the pairs in registers by byte permutes instead of
    /// from the shared table (`p8u2l` −11%: ~60% more integer instructions).
    pub const DECODING: [MmaTiling; 3] = Self::DEFAULTS;

    /// Every tiling there are instances of: the decoding ones and those `bench kernels`
    /// measures them against.
    pub const ALL: [MmaTiling; 15] = [
        MmaTiling::new(8, 2, 1),
        MmaTiling::new(8, 4, 1),
        MmaTiling::new(4, 4, 1),
        MmaTiling::new(8, 2, 2),
        MmaTiling::new(8, 1, 2),
        MmaTiling::new(8, 4, 2),
        MmaTiling::new(4, 2, 2),
        MmaTiling::new(8, 1, 4),
        MmaTiling::swapped(8, 2),
        MmaTiling::swapped(8, 4),
        MmaTiling::swapped(4, 4),
        MmaTiling::swapped(16, 1),
        MmaTiling::pairs(8, 4),
        MmaTiling::pairs(8, 2),
        MmaTiling::pairs(4, 4),
    ];

    /// Whether this tiling's kernel takes `m` rows: the swapped form holds them as the 8 columns
    /// of its B operand.
    pub fn serves_rows(self, m: usize) -> bool {
        m > 0 && m <= if self.swapped { 8 } else { MMA_MAX_ROWS }
    }

    /// The tiling decoding uses for `m` rows: up to 8 rows the swapped form (`s8u2`). On an H100
    /// on 2026-12-07 (BENCHMARKS.md) decoding at batch 1 ran 166.4 tokens/s with it against
    /// 159.9 for the 05:23 build in one call, and 159.3 against 159.2 in the next with `w8u4t1`
    /// instead, though `bench kernels` alone put `w8u4t1` 3% ahead (103.9 against 106.8 µs a
    /// layer). Measured on an H100 on 2026-12-06 (BENCHMARKS.md,
    /// `bench kernels` at Falcon-7B's four linear shapes, µs a layer), against the kernel's
    /// first form (`w8u2t1`): at one row `w8u4t1` took 108.8 against 111.1; at 16 rows
    /// `w8u2t2` took 158.7 against 203.7 (x loaded once for 16 features instead of 8; four
    /// tiles held more registers and were slower), and in the next call `w8u1t2` 154.5 against
    /// `w8u2t2`'s 159.4.
    ///
    /// `ADAPTERLAB_NF4_MMA_TILING` names another tiling for up to 8 rows where the swapped form
    /// runs (how decoding measures one end to end); a name outside its set is an error.
    ///
    /// One row of `k` features against `n` takes the `pairs` form where
    /// `ADAPTERLAB_NF4_ONE_ROW` is `gemv4bit` (the default; see [`OneRow`]) and its 32-bit
    /// addresses reach every weight (`n * k < 2^32`), in [`MmaTiling::DEFAULTS`]' third.
    pub fn for_shape(m: usize, k: usize, n: usize) -> Result<Self> {
        if m == 1 && one_row()? == OneRow::Gemv4bit && Self::pairs_reach(k, n) {
            return Ok(Self::DEFAULTS[2]);
        }
        match SMALL_TILING.get()? {
            Some(t) if m <= 8 => Ok(t),
            _ => Ok(Self::DEFAULTS[usize::from(m > 8)]),
        }
    }

    /// Whether the `pairs` form's 32-bit element offsets reach every weight of `n x k`.
    pub fn pairs_reach(k: usize, n: usize) -> bool {
        n.checked_mul(k).is_some_and(|e| e <= u32::MAX as usize)
    }

    /// How reports name it: `w8u2t1`, `s8u2` swapped, `p8u4` with bitsandbytes' batch-1 weights.
    pub fn name(self) -> String {
        if self.pairs {
            format!("p{}u{}", self.warps, self.unroll)
        } else if self.swapped {
            format!("s{}u{}", self.warps, self.unroll)
        } else {
            format!("w{}u{}t{}", self.warps, self.unroll, self.tiles)
        }
    }

    /// The instance for `m` rows of 16-bit `x` (`bf16` or f16): rows 8-15 of the A operand
    /// exist only past 8 rows (the swapped form has one instance).
    fn kernel_name(self, m: usize, bf16: bool) -> String {
        let ty = if bf16 { "bf16" } else { "f16" };
        if self.swapped {
            format!("nf4_mma_{ty}_{}", self.name())
        } else {
            format!("nf4_mma_{ty}_{}h{}", self.name(), u8::from(m > 8))
        }
    }

    /// Features one block computes.
    fn features(self) -> usize {
        if self.swapped {
            16
        } else {
            8 * self.tiles as usize
        }
    }

    /// Bytes of dynamic shared memory a block takes: the `pairs` form's table of 256 rows of 64
    /// words (`PAIR_ROW_WORDS` in nf4_mma.cu).
    fn dynamic_shared(self) -> u32 {
        if self.pairs { PAIR_TABLE_BYTES } else { 0 }
    }

    /// Bytes of the warps' partial sums in shared memory (`part` in nf4_mma.cu).
    #[cfg(test)]
    fn partial_bytes(self) -> usize {
        let rows = if self.swapped { 8 } else { 16 };
        self.warps as usize * rows * self.features() * 4
    }
}

/// A weight's absmax blocks, as a decoding kernel needs to know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    /// Weights per absmax (bitsandbytes' `blocksize`).
    pub size: usize,
    /// Absmax values per block of double quantization, where double-quantized.
    pub nested: Option<usize>,
}

impl Blocks {
    /// Both sizes powers of two, so a weight's block is a shift away: what the 16-byte GEMV and
    /// the tensor-core GEMM need to issue every load of a round at once (see `absmax_fetch` in
    /// nf4_common.cu), and the wide dequantization kernel. bitsandbytes writes 64 and 256.
    fn by_shifts(self) -> bool {
        self.size.is_power_of_two() && self.nested.is_none_or(usize::is_power_of_two)
    }
}

/// A kernel multiplying `x` straight from the 4-bit data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKernel {
    /// A warp a feature, 4-byte loads of codes: any shape, up to [`GEMV_MAX_ROWS`] rows.
    Words,
    /// A warp a feature, 16-byte loads of codes, four in flight a lane: rows that are multiples
    /// of 32, blocksizes that are powers of two (at least 32).
    Wide,
    /// Tensor cores (sm_80 and later), 8 features a block: up to [`MMA_MAX_ROWS`] rows, rows
    /// that are multiples of 32, blocksizes that are powers of two (at least 32), features a
    /// multiple of 8.
    Mma,
    /// x staged through shared memory a tile at a time: up to [`GEMM_MAX_ROWS`] rows, rows and
    /// blocks multiples of 8.
    Tiled,
}

impl DecodeKernel {
    pub const ALL: [DecodeKernel; 4] = [
        DecodeKernel::Words,
        DecodeKernel::Wide,
        DecodeKernel::Mma,
        DecodeKernel::Tiled,
    ];

    /// The name the speed switches and reports give it.
    pub const fn name(self) -> &'static str {
        match self {
            DecodeKernel::Words => "words",
            DecodeKernel::Wide => "wide",
            DecodeKernel::Mma => "mma",
            DecodeKernel::Tiled => "tiled",
        }
    }

    /// Whether this kernel serves `m` rows of `k` features against `n` features in `blocks`.
    pub fn serves(self, m: usize, k: usize, n: usize, blocks: Blocks) -> bool {
        let bs = blocks.size;
        m > 0
            && match self {
                DecodeKernel::Words => m <= GEMV_MAX_ROWS,
                DecodeKernel::Wide => {
                    m <= GEMV_MAX_ROWS
                        && k.is_multiple_of(32)
                        && bs.is_multiple_of(32)
                        && blocks.by_shifts()
                }
                DecodeKernel::Mma => {
                    m <= MMA_MAX_ROWS
                        && k.is_multiple_of(32)
                        && bs.is_multiple_of(32)
                        && blocks.by_shifts()
                        && n.is_multiple_of(8)
                }
                DecodeKernel::Tiled => {
                    m <= GEMM_MAX_ROWS && k.is_multiple_of(8) && bs.is_multiple_of(8)
                }
            }
    }

    /// [`Self::serves`] on a card that runs the tensor-core kernel or not (`mma_capable`, see
    /// [`runs_mma`]): the one rule for which kernels a card can be given.
    pub fn serves_on(
        self,
        m: usize,
        k: usize,
        n: usize,
        blocks: Blocks,
        mma_capable: bool,
    ) -> bool {
        self.serves(m, k, n, blocks) && (mma_capable || self != DecodeKernel::Mma)
    }

    /// Whether the kernel computes an adapter's `h` for `m` rows at rank `r` in its own launch
    /// ([`LoraH::FromA`]).
    pub fn computes_lora_h(self, m: usize, r: usize) -> bool {
        self == DecodeKernel::Mma && r > 0 && m * r <= LORA_H_BLOCKS
    }

    /// Whether the kernel applies an [`Epilogue`] other than `None` to its output
    /// ([`gemv_with`]'s `out`).
    pub fn applies_epilogue(self) -> bool {
        self == DecodeKernel::Mma
    }

    /// Whether the kernel adds an adapter's product in its epilogue (see [`LoraEpilogue`]).
    pub fn adds_lora(self) -> bool {
        self != DecodeKernel::Tiled
    }

    /// The kernel decoding `m` rows takes under the speed switches, if one serves them
    /// (`None`: dequantize + cuBLAS).
    ///
    /// `ADAPTERLAB_NF4_GEMV` picks the kernel for up to [`GEMV_MAX_ROWS`] rows: `mma` (the
    /// default), `wide` or `words`, each falling back to the next simpler one where it does not
    /// serve the shape. `ADAPTERLAB_NF4_SMALL_BATCH` picks it for more rows: `mma` (the default;
    /// up to [`MMA_MAX_ROWS`] rows, more dequantize), `dequantize` or `tiled`. Measured on an
    /// H100 on 2026-12-06 (BENCHMARKS.md), decoding the 7B shape without an adapter: batch 1 at
    /// 159 tokens/s with `mma`, 156 with `wide`, 115 with `words` (one call); each kernel alone,
    /// `mma` was the fastest at batch 1 on three of Falcon-7B's four linear shapes and within 3%
    /// on the fourth. Batch 16: 1,082 with `mma`; earlier, 762 with `dequantize` and 508 with
    /// `tiled`.
    ///
    /// `mma_capable`: whether the card runs the tensor-core kernel ([`runs_mma`]); where it does
    /// not, `mma` falls back as where it does not serve the shape.
    pub fn for_rows(
        m: usize,
        k: usize,
        n: usize,
        blocks: Blocks,
        mma_capable: bool,
    ) -> Result<Option<Self>> {
        let (gemv, small) = switches()?;
        let pick = |wanted: &[DecodeKernel]| {
            wanted
                .iter()
                .copied()
                .find(|kernel| kernel.serves_on(m, k, n, blocks, mma_capable))
        };
        Ok(if m <= GEMV_MAX_ROWS {
            match gemv {
                DecodeKernel::Words => pick(&[DecodeKernel::Words]),
                DecodeKernel::Wide => pick(&[DecodeKernel::Wide, DecodeKernel::Words]),
                _ => pick(&[DecodeKernel::Mma, DecodeKernel::Wide, DecodeKernel::Words]),
            }
        } else {
            small.and_then(|kernel| pick(&[kernel]))
        })
    }
}

/// Whether `device` runs the tensor-core kernel (its module is compiled for `compute_80`).
pub fn runs_mma(device: &candle_core::Device) -> Result<bool> {
    crate::ops::kernels::sm80_or_later(device)
}

/// The `ADAPTERLAB_NF4_GEMV`, `ADAPTERLAB_NF4_SMALL_BATCH`, `ADAPTERLAB_NF4_MMA_TILING`,
/// `ADAPTERLAB_NF4_ONE_ROW` and `ADAPTERLAB_NF4_PAIRS_SPLIT` in force, by variable, as the
/// names they take, for reports.
pub fn decode_settings() -> Result<[(&'static str, &'static str); 5]> {
    let (gemv, small) = switches()?;
    // Each default is among its switch's names (a unit test holds it there).
    let tiling = SMALL_TILING.in_force(MmaTiling::DEFAULTS[0])?.1;
    let split = PAIRS_SPLIT.in_force(PairsSplit::Auto)?.1;
    let one = ONE_ROW.in_force(OneRow::Gemv4bit)?.1;
    Ok([
        ("ADAPTERLAB_NF4_GEMV", gemv.name()),
        (
            "ADAPTERLAB_NF4_SMALL_BATCH",
            small.map_or("dequantize", DecodeKernel::name),
        ),
        ("ADAPTERLAB_NF4_MMA_TILING", tiling),
        ("ADAPTERLAB_NF4_ONE_ROW", one),
        ("ADAPTERLAB_NF4_PAIRS_SPLIT", split),
    ])
}

/// `ADAPTERLAB_NF4_MMA_TILING`: the tensor-core kernel's tiling for up to 8 rows, in place of
/// [`MmaTiling::DEFAULTS`]' (the swapped forms, which serve them all).
static SMALL_TILING: Switch<MmaTiling> = Switch::new(
    "ADAPTERLAB_NF4_MMA_TILING",
    &[
        ("s8u2", MmaTiling::swapped(8, 2)),
        ("s8u4", MmaTiling::swapped(8, 4)),
        ("s4u4", MmaTiling::swapped(4, 4)),
        ("s16u1", MmaTiling::swapped(16, 1)),
    ],
);

/// Whether the `pairs` form (one row) splits a product over k (`ADAPTERLAB_NF4_PAIRS_SPLIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairsSplit {
    /// Into [`PAIRS_SLICES`] slices where the groups of 16 features alone would leave places
    /// idle ([`pairs_slices`]): Falcon-7B's down projection.
    Auto,
    /// Never: a block takes a group's whole row.
    Off,
}

/// `ADAPTERLAB_NF4_PAIRS_SPLIT`: `auto` (the default) or `off` ([`PairsSplit`]).
static PAIRS_SPLIT: Switch<PairsSplit> = Switch::new(
    "ADAPTERLAB_NF4_PAIRS_SPLIT",
    &[("auto", PairsSplit::Auto), ("off", PairsSplit::Off)],
);

/// Slices of k a split `pairs` product takes.
pub const PAIRS_SLICES: usize = 4;

/// Groups of 16 features up to which a `pairs` product splits (and the counts it keeps).
const PAIRS_SPLIT_GROUPS: usize = 512;

/// f32 partial sums a split `pairs` product keeps: 16 a slice of each group.
const PAIRS_SPLIT_SUMS: usize = PAIRS_SPLIT_GROUPS * PAIRS_SLICES * 16;

/// Slices of k the `pairs` form takes for `n` features of `k` columns: [`PAIRS_SLICES`] where
/// there are at most [`PAIRS_SPLIT_GROUPS`] groups (an H100 holds 396 blocks of the form, so
/// fewer groups leave places idle) and each slice keeps 32 chunks of 128 columns or more (4
/// rounds a warp), else 1. A function of the shape alone, not the card, so the sums (slices
/// added in order) are the same on any card. Falcon-7B: the down projection (284 groups, 142
/// chunks) splits; QKV and the attention's output (36 chunks) and the up projection (1,136
/// groups) do not.
pub fn pairs_slices(k: usize, n: usize) -> Result<usize> {
    let (groups, chunks) = (n.div_ceil(16), k.div_ceil(128));
    let split = PAIRS_SPLIT.get()?.unwrap_or(PairsSplit::Auto) == PairsSplit::Auto;
    Ok(
        if split && groups <= PAIRS_SPLIT_GROUPS && chunks >= 32 * PAIRS_SLICES {
            PAIRS_SLICES
        } else {
            1
        },
    )
}

/// How one row's product (batch-1 decoding) forms each weight from its code and its block's
/// absmax (`ADAPTERLAB_NF4_ONE_ROW`). The two put a weight at most two steps of the 16-bit type
/// apart. On an H100 (2026-12-07, BENCHMARKS.md) batch-1 decoding ran 2.7-3.1% faster with
/// `gemv4bit` than with `dequantize` in two calls (214.3 against 208.6 tokens/s at 17:34).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneRow {
    /// As bitsandbytes' batch-1 GEMV (`gemv_4bit`, which transformers runs for a single token):
    /// the code's value rounded to 16 bits times the absmax rounded to 16 bits, one 16-bit
    /// multiply (`Nf4Tensor::dequantize_gemv4bit` is its CPU twin). The products are exact
    /// and summed in f32 (bitsandbytes rounds each product to 16 bits first). Two weights a
    /// shared load (the `pairs` form).
    Gemv4bit,
    /// As the dequantize kernel (and every product of more rows): the f32 product of the code's
    /// value and the absmax, rounded once.
    Dequantize,
}

/// `ADAPTERLAB_NF4_ONE_ROW`: `gemv4bit` (the default) or `dequantize` ([`OneRow`]).
static ONE_ROW: Switch<OneRow> = Switch::new(
    "ADAPTERLAB_NF4_ONE_ROW",
    &[
        ("gemv4bit", OneRow::Gemv4bit),
        ("dequantize", OneRow::Dequantize),
    ],
);

fn one_row() -> Result<OneRow> {
    Ok(ONE_ROW.get()?.unwrap_or(OneRow::Gemv4bit))
}

/// Bytes of the `pairs` form's table (dynamic shared memory, 64 KB).
const PAIR_TABLE_BYTES: u32 = 256 * 64 * 4;

/// `ADAPTERLAB_NF4_GEMV`: the kernel for up to [`GEMV_MAX_ROWS`] rows.
static GEMV: Switch<DecodeKernel> = Switch::new(
    "ADAPTERLAB_NF4_GEMV",
    &[
        (DecodeKernel::Words.name(), DecodeKernel::Words),
        (DecodeKernel::Wide.name(), DecodeKernel::Wide),
        (DecodeKernel::Mma.name(), DecodeKernel::Mma),
    ],
);

/// `ADAPTERLAB_NF4_SMALL_BATCH`: the kernel for more rows (`None`: dequantize + cuBLAS).
static SMALL_BATCH: Switch<Option<DecodeKernel>> = Switch::new(
    "ADAPTERLAB_NF4_SMALL_BATCH",
    &[
        ("dequantize", None),
        (DecodeKernel::Mma.name(), Some(DecodeKernel::Mma)),
        (DecodeKernel::Tiled.name(), Some(DecodeKernel::Tiled)),
    ],
);

/// The two switches with their defaults.
fn switches() -> Result<(DecodeKernel, Option<DecodeKernel>)> {
    Ok((
        GEMV.get()?.unwrap_or(DecodeKernel::Mma),
        SMALL_BATCH.get()?.unwrap_or(Some(DecodeKernel::Mma)),
    ))
}

/// This wing's kernel modules, for [`crate::engine::device::compile_kernels`].
pub fn modules() -> [&'static CudaModule; 6] {
    [
        &NF4,
        &NF4_QUANTIZE,
        &NF4_MMA,
        &NF4_MMA_PDL,
        &NF4_MMA_PDL_EARLY,
        &NF4_MMA_TILINGS,
    ]
}

pub(crate) static NF4: CudaModule = CudaModule::new(
    "adapterlab_nf4",
    concat!(include_str!("nf4_common.cu"), include_str!("nf4.cu")),
    nf4_defines,
);

/// The tensor-core kernel's source, which its modules compile with different instances and
/// defines.
const NF4_MMA_SOURCE: &str = concat!(
    include_str!("../ops/pdl.cu"),
    include_str!("nf4_common.cu"),
    include_str!("../ops/mma.cu"),
    include_str!("../ops/dot16.cu"),
    include_str!("nf4_mma.cu")
);

/// The tensor-core GEMM, a module of its own for the architecture it needs, with the tilings
/// decoding may launch ([`MmaTiling::DECODING`]).
pub(crate) static NF4_MMA: CudaModule =
    CudaModule::new("adapterlab_nf4_mma", NF4_MMA_SOURCE, || {
        decoding_defines("")
    })
    .for_arch("compute_80");

/// The decoding modules' defines: `pdl`'s, then [`MmaTiling::DECODING`]'s instances.
fn decoding_defines(pdl: &str) -> String {
    format!("{pdl}{}", nf4_mma_defines(&MmaTiling::DECODING))
}

/// [`NF4_MMA`] compiled for compute_90 with programmatic dependent launch (ops/pdl.rs):
/// decoding's kernels where the card has sm_90 and `ADAPTERLAB_DECODE_PDL` allows.
pub(crate) static NF4_MMA_PDL: CudaModule =
    CudaModule::new("adapterlab_nf4_mma_pdl", NF4_MMA_SOURCE, || {
        decoding_defines(&crate::ops::pdl::on_defines())
    })
    .for_arch("compute_90");

/// [`NF4_MMA_PDL`] whose blocks also let the next kernel be scheduled as they start.
pub(crate) static NF4_MMA_PDL_EARLY: CudaModule =
    CudaModule::new("adapterlab_nf4_mma_pdl_early", NF4_MMA_SOURCE, || {
        decoding_defines(&crate::ops::pdl::early_defines())
    })
    .for_arch("compute_90");

/// The module decoding's tensor-core kernel launches from with PDL on `device` (ops/pdl.rs),
/// `None` for a plain launch.
fn pdl_module(device: &candle_core::CudaDevice) -> Result<Option<&'static CudaModule>> {
    use crate::ops::pdl::Pdl;
    Ok(
        match crate::ops::pdl::in_force(&candle_core::Device::Cuda(device.clone()))? {
            Pdl::Off => None,
            Pdl::On => Some(&NF4_MMA_PDL),
            Pdl::Early | Pdl::Products => Some(&NF4_MMA_PDL_EARLY),
        },
    )
}

/// The same kernel's other tilings, which only `bench kernels` and the GPU tests run: a module
/// of their own, so a process that decodes never compiles them.
pub(crate) static NF4_MMA_TILINGS: CudaModule =
    CudaModule::new("adapterlab_nf4_mma_tilings", NF4_MMA_SOURCE, || {
        nf4_mma_defines(&MmaTiling::ALL)
    })
    .for_arch("compute_80");

/// Quantization at load, a module of its own so that the decoding kernels never depend on it.
pub(crate) static NF4_QUANTIZE: CudaModule = CudaModule::new(
    "adapterlab_nf4_quantize",
    include_str!("nf4_quantize.cu"),
    nf4_quantize_defines,
);

/// The GEMV's row count and the NF4 code book, as the source expects them.
fn nf4_defines() -> String {
    let table: Vec<String> = crate::quant::nf4::NF4_CODE
        .iter()
        .map(|v| format!("{v:?}f"))
        .collect();
    format!(
        "#define GEMV_MAX_ROWS {GEMV_MAX_ROWS}\n#define GEMM_MAX_ROWS {GEMM_MAX_ROWS}\n#define DEQUANT_WORDS {DEQUANT_WORDS}\n#define NF4_TABLE {}\n#define NF4_PAIRS_BF16 {}\n#define NF4_PAIRS_F16 {}\n",
        table.join(", "),
        pair_words(true).join(", "),
        pair_words(false).join(", ")
    )
}

/// The `pairs` form's 256 pairs (`NF4_PAIRS_BF16`, `NF4_PAIRS_F16` in nf4_mma.cu): pair `e` the
/// 16-bit values of the codes in byte `e`, its high nibble's (the first weight) in the low half,
/// each the NF4 value rounded to nearest even as bitsandbytes' batch-1 GEMV rounds its table.
fn pair_words(bf16: bool) -> Vec<String> {
    let bits = |v: f32| -> u32 {
        if bf16 {
            u32::from(half::bf16::from_f32(v).to_bits())
        } else {
            u32::from(half::f16::from_f32(v).to_bits())
        }
    };
    let code = &crate::quant::nf4::NF4_CODE;
    (0..256usize)
        .map(|e| format!("0x{:08x}u", bits(code[e >> 4]) | (bits(code[e & 15]) << 16)))
        .collect()
}

/// [`nf4_defines`] and the tensor-core kernel's instances, one a tiling and A operand height.
fn nf4_mma_defines(tilings: &[MmaTiling]) -> String {
    let instances: Vec<String> = tilings
        .iter()
        .flat_map(|t| {
            if t.pairs {
                vec![format!("MMA_PAIRS_INSTANCE({}, {})", t.warps, t.unroll)]
            } else if t.swapped {
                vec![format!("MMA_SWAPPED_INSTANCE({}, {})", t.warps, t.unroll)]
            } else {
                [0, 1]
                    .map(|h| format!("MMA_INSTANCE({}, {}, {}, {h})", t.warps, t.unroll, t.tiles))
                    .to_vec()
            }
        })
        .collect();
    format!(
        "{}#define MMA_TILINGS {}\n",
        nf4_defines(),
        instances.join(" ")
    )
}

/// The quantization thresholds, as their f32 bits: a decimal literal would have to round to the
/// same f32 in NVRTC as in Rust, and seven of them are ties (see `NF4_THRESHOLDS`).
fn nf4_quantize_defines() -> String {
    let thresholds: Vec<String> = crate::quant::nf4::NF4_THRESHOLDS
        .iter()
        .map(|v| format!("0x{:08x}u", v.to_bits()))
        .collect();
    format!("#define NF4_THRESHOLD_BITS {}\n", thresholds.join(", "))
}

/// NF4 blocks one launch block quantizes (a warp each).
const QUANT_WARPS_PER_BLOCK: usize = 8;

/// Quantize `w` (on the GPU, bf16, f16 or f32, any shape) in blocks of `blocksize` elements of
/// its row-major order: returns the packed codes (`[ceil(n / 2)]` u8) and the per-block absmax
/// (`[ceil(n / blocksize)]` f32) on the GPU, bit-equal to `quant::nf4`'s CPU path.
pub fn quantize(w: &Tensor, blocksize: usize) -> Result<(Tensor, Tensor)> {
    crate::quant::nf4::check_blocksize(blocksize).map_err(Error::wrap)?;
    let dev = cuda_device(w)?;
    let w = w.contiguous()?;
    let n = w.elem_count();
    let nb = n.div_ceil(blocksize);
    if n == 0 {
        return Ok((
            Tensor::zeros(0, DType::U8, w.device())?,
            Tensor::zeros(0, DType::F32, w.device())?,
        ));
    }
    let input = CudaInput::of(&w)?;
    let cfg = LaunchConfig {
        grid_dim: (nb.div_ceil(QUANT_WARPS_PER_BLOCK) as u32, 1, 1),
        block_dim: (32 * QUANT_WARPS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_i, bs) = (n as i64, blocksize as i32);
    // SAFETY: the kernel writes every byte of codes and every absmax.
    let (codes, absmax) = unsafe { (dev.alloc::<u8>(n.div_ceil(2))?, dev.alloc::<f32>(nb)?) };
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let x = input.view::<$t>(n)?;
            crate::run_kernel!(NF4_QUANTIZE, dev, $name, cfg; &x, &n_i, &bs, &codes, &absmax)?;
        }};
    }
    match w.dtype() {
        DType::F32 => launch!("nf4_quantize_f32", f32),
        DType::BF16 => launch!("nf4_quantize_bf16", half::bf16),
        DType::F16 => launch!("nf4_quantize_f16", half::f16),
        other => return Err(Error::wrap(crate::quant::nf4::Nf4Error::BadDtype(other))),
    }
    Ok((wrap(codes, &dev, n.div_ceil(2)), wrap(absmax, &dev, nb)))
}

/// The 4-bit data of one weight on the GPU, as `linear::DeviceNf4` holds it.
pub struct Nf4Gpu<'a> {
    /// `[bytes]` u8, two codes a byte, high nibble first.
    pub codes: &'a Tensor,
    pub absmax: AbsmaxGpu<'a>,
    /// Elements of the weight.
    pub n: usize,
    /// Elements per absmax block (64).
    pub blocksize: usize,
}

impl Nf4Gpu<'_> {
    pub fn blocks(&self) -> Blocks {
        Blocks {
            size: self.blocksize,
            nested: match self.absmax {
                AbsmaxGpu::Plain(_) => None,
                AbsmaxGpu::Nested { blocksize, .. } => Some(blocksize),
            },
        }
    }
}

pub enum AbsmaxGpu<'a> {
    /// One f32 per block.
    Plain(&'a Tensor),
    /// Double quantization: `code[q[i]] * absmax[i / blocksize] + offset`.
    Nested {
        q: &'a Tensor,
        code: &'a Tensor,
        absmax: &'a Tensor,
        offset: f32,
        blocksize: usize,
    },
}

/// Runs `f` with the CUDA slice of every input tensor (which must be fresh, offset-0 tensors of
/// the named dtype).
fn with_slices<R>(w: &Nf4Gpu, f: impl FnOnce(Slices) -> Result<R>) -> Result<R> {
    fn guard(t: &Tensor) -> Result<impl std::ops::Deref<Target = Storage> + '_> {
        if t.layout().start_offset() != 0 || !t.is_contiguous() {
            return Err(Error::Msg("NF4 CUDA kernel: input is a view".into()));
        }
        Ok(t.storage_and_layout().0)
    }
    fn cuda(s: &Storage) -> Result<&CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => Err(Error::Msg(
                "NF4 CUDA kernel: input is not on the GPU".into(),
            )),
        }
    }
    let codes = guard(w.codes)?;
    match &w.absmax {
        AbsmaxGpu::Plain(a) => {
            let a = guard(a)?;
            let a = cuda(&a)?.as_cuda_slice::<f32>()?;
            let codes = cuda(&codes)?.as_cuda_slice::<u8>()?;
            f(Slices {
                codes,
                nested: 0,
                absmax: a,
                aq: codes,
                acode: a,
                offset: 0.0,
                nbs: 1,
            })
        }
        AbsmaxGpu::Nested {
            q,
            code,
            absmax,
            offset,
            blocksize,
        } => {
            let (q, code, absmax) = (guard(q)?, guard(code)?, guard(absmax)?);
            f(Slices {
                codes: cuda(&codes)?.as_cuda_slice::<u8>()?,
                nested: 1,
                absmax: cuda(&absmax)?.as_cuda_slice::<f32>()?,
                aq: cuda(&q)?.as_cuda_slice::<u8>()?,
                acode: cuda(&code)?.as_cuda_slice::<f32>()?,
                offset: *offset,
                nbs: *blocksize as i32,
            })
        }
    }
}

struct Slices<'a> {
    codes: &'a CudaSlice<u8>,
    nested: i32,
    absmax: &'a CudaSlice<f32>,
    aq: &'a CudaSlice<u8>,
    acode: &'a CudaSlice<f32>,
    offset: f32,
    nbs: i32,
}

/// The whole weight in `dtype` (bf16, f16 or f32), flat: the caller reshapes it.
pub fn dequantize(w: &Nf4Gpu, dtype: DType) -> Result<Tensor> {
    let dev = cuda_device(w.codes)?;
    let n = w.n as i64;
    let bs = w.blocksize as i32;
    let threads = 256usize;
    // Eight weights a thread where whole 4-byte words of codes share an absmax block; with
    // power-of-two blocksizes (bitsandbytes' all are), DEQUANT_WORDS such words a thread.
    let by8 = w.n.is_multiple_of(8) && w.blocksize.is_multiple_of(8) && w.n <= u32::MAX as usize;
    let wide = by8 && w.blocks().by_shifts();
    let launches = match (wide, by8) {
        (true, _) => (w.n / 8).div_ceil(DEQUANT_WORDS),
        (false, true) => w.n / 8,
        (false, false) => w.n.div_ceil(2),
    };
    let cfg = LaunchConfig {
        grid_dim: (launches.div_ceil(threads) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    with_slices(w, |s| {
        macro_rules! launch {
            ($name:literal, $name8:literal, $wide:literal, $t:ty) => {{
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(w.n)? };
                let name = match (wide, by8) {
                    (true, _) => $wide,
                    (false, true) => $name8,
                    (false, false) => $name,
                };
                crate::run_kernel!(NF4, dev, name, cfg;
                    s.codes, &n, &bs, &s.nested, s.absmax, s.aq, s.acode, &s.offset, &s.nbs, &out,
                )?;
                Ok(wrap(out, &dev, w.n))
            }};
        }
        match dtype {
            DType::F32 => {
                launch!(
                    "nf4_dequant_f32",
                    "nf4_dequant8_f32",
                    "nf4_dequant_wide_f32",
                    f32
                )
            }
            DType::BF16 => launch!(
                "nf4_dequant_bf16",
                "nf4_dequant8_bf16",
                "nf4_dequant_wide_bf16",
                half::bf16
            ),
            DType::F16 => {
                launch!(
                    "nf4_dequant_f16",
                    "nf4_dequant8_f16",
                    "nf4_dequant_wide_f16",
                    half::f16
                )
            }
            other => Err(Error::Msg(format!(
                "NF4 dequantize to {other:?} is not supported"
            ))),
        }
    })
}

/// An unmerged LoRA adapter's product for a decoding kernel to add to the base's: its `h = x A^T`,
/// `b` (`[n, r]` f32) and the scaling.
pub struct LoraEpilogue<'a> {
    pub h: LoraH<'a>,
    pub b: &'a Tensor,
    pub scaling: f32,
}

/// Where a decoding kernel's epilogue takes the adapter's `h = x A^T` from.
pub enum LoraH<'a> {
    /// Computed before (`lora::kernels::lora_h`): `[m, r]` f32.
    Given(&'a Tensor),
    /// `A` (`[r, k]` f32, contiguous): the kernel computes h in blocks of its own launch, the
    /// bits of `lora_h` (where it [`DecodeKernel::computes_lora_h`]).
    FromA(&'a Tensor),
}

/// `h` blocks (rows times rank) a launch computing h itself may have: one flag each.
pub const LORA_H_BLOCKS: usize = 8192;

/// What the tensor-core kernel's launches share on one device, made once: the flags the `h`
/// blocks of a decoding launch set ([`LORA_H_BLOCKS`] u32, zero at first), and a split `pairs`
/// product's partial sums (16 a slice of a group) and its groups' counts (zero between launches:
/// the block that counts a group's last slice sets it back).
#[derive(Clone)]
struct LaunchState {
    flags: Tensor,
    scratch: Tensor,
    counts: Tensor,
}

/// [`LaunchState`] on `dev`, and the value this launch sets the flags to: never the one the
/// launch before passed, so a flag left by it never reads as set (launches on a stream run one
/// after another).
fn launch_state(dev: &candle_core::CudaDevice) -> Result<(LaunchState, u32)> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static MADE: std::sync::Mutex<Vec<LaunchState>> = std::sync::Mutex::new(Vec::new());
    static EPOCH: AtomicU32 = AtomicU32::new(0);
    let device = candle_core::Device::Cuda(dev.clone());
    let state = {
        let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
        match made.iter().find(|t| t.flags.device().same_device(&device)) {
            Some(t) => t.clone(),
            None => {
                let t = LaunchState {
                    flags: Tensor::zeros(LORA_H_BLOCKS, DType::U32, &device)?,
                    scratch: Tensor::zeros(PAIRS_SPLIT_SUMS, DType::F32, &device)?,
                    counts: Tensor::zeros(PAIRS_SPLIT_GROUPS, DType::U32, &device)?,
                };
                made.push(t.clone());
                t
            }
        }
    };
    // Zero is what a fresh flag holds: skip it when the count wraps.
    let mut epoch = EPOCH.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    if epoch == 0 {
        epoch = EPOCH.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    }
    Ok((state, epoch))
}

/// The module holding the tensor-core kernel's instances of `tiling`, and the PDL module
/// decoding launches them from on `dev` (`None`: a plain launch).
fn mma_modules(
    dev: &candle_core::CudaDevice,
    tiling: MmaTiling,
) -> Result<(&'static CudaModule, Option<&'static CudaModule>)> {
    // Decoding's own tilings launch with PDL where it is on (the GPU tests and `bench kernels`
    // name other tilings, which the PDL module has no instances of).
    Ok(if MmaTiling::DECODING.contains(&tiling) {
        (&NF4_MMA, pdl_module(dev)?)
    } else {
        (&NF4_MMA_TILINGS, None)
    })
}

/// Blocks of `tiling`'s instance for `dtype` that fit on `dev`'s multiprocessors at once (the
/// `pairs` form's grid), after allowing the function its dynamic shared memory; kept per device
/// and instance.
fn resident_blocks(
    dev: &candle_core::CudaDevice,
    tiling: MmaTiling,
    dtype: DType,
) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    type Known = (candle_core::Device, String, usize);
    static KNOWN: std::sync::Mutex<Vec<Known>> = std::sync::Mutex::new(Vec::new());
    let device = candle_core::Device::Cuda(dev.clone());
    let name = tiling.kernel_name(1, dtype == DType::BF16);
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, b)) = known
        .iter()
        .find(|(d, n, _)| d.same_device(&device) && *n == name)
    {
        return Ok(*b);
    }
    let (module, pdl) = mma_modules(dev, tiling)?;
    let mut per_sm = u32::MAX;
    // Both modules' functions are allowed the table: a later call may launch either.
    for module in [Some(module), pdl].into_iter().flatten() {
        let func = dev.get_or_load_custom_func(&name, module.name, module.ptx()?)?;
        func.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            tiling.dynamic_shared() as i32,
        )
        .map_err(|e| {
            Error::Msg(format!(
                "{name}: {e:?} allowing {} bytes of shared memory",
                tiling.dynamic_shared()
            ))
        })?;
        let fits = func
            .occupancy_max_active_blocks_per_multiprocessor(
                32 * tiling.warps,
                tiling.dynamic_shared() as usize,
                None,
            )
            .map_err(Error::wrap)?;
        per_sm = per_sm.min(fits);
    }
    if per_sm == 0 {
        return Err(Error::Msg(format!(
            "{name}: no block fits on a multiprocessor"
        )));
    }
    let blocks = per_sm as usize * crate::ops::kernels::multiprocessors(dev)? as usize;
    known.push((device, name, blocks));
    Ok(blocks)
}

/// `x [m, k] @ W^T` for `W [n, k]` held as NF4, `x` bf16 or f16, with `kernel` (which must
/// [`DecodeKernel::serves`] the shape; the tensor-core kernel in `tiling`, which decoding takes
/// from [`MmaTiling::for_rows`] and `bench kernels` and the GPU tests vary; other kernels ignore
/// it), and with `lora` the adapter's product added in the same launch (where the kernel
/// [`DecodeKernel::adds_lora`]), and `out` applied to the result before it is stored (where the
/// kernel [`DecodeKernel::applies_epilogue`]; the bits of [`Epilogue::apply`] on the output).
pub fn gemv_with(
    w: &Nf4Gpu,
    out_features: usize,
    x: &Tensor,
    kernel: DecodeKernel,
    tiling: MmaTiling,
    lora: Option<&LoraEpilogue>,
    epilogue: Epilogue,
) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    if out_features * k != w.n
        || !kernel.serves(m, k, out_features, w.blocks())
        || (kernel == DecodeKernel::Mma && !tiling.serves_rows(m))
        || (kernel == DecodeKernel::Mma && tiling.pairs && !MmaTiling::pairs_reach(k, out_features))
        || (lora.is_some() && !kernel.adds_lora())
        || (!matches!(epilogue, Epilogue::None) && !kernel.applies_epilogue())
    {
        return Err(Error::Msg(format!(
            "NF4 {kernel:?} kernel (tiling {}, adapter: {}, epilogue: {epilogue:?}): {m} rows of {k} features against a weight of {} elements ({out_features} features) in blocks of {}",
            tiling.name(),
            lora.is_some(),
            w.n,
            w.blocksize
        )));
    }
    // With LoRA: (h, its A where the kernel computes it, B, scaling, rank).
    let made_h;
    let lora = match lora {
        None => None,
        Some(l) => {
            let (bn, r) = l.b.dims2()?;
            let (h, a, fits) = match l.h {
                LoraH::Given(h) => (h, None, h.dims2()? == (m, r)),
                LoraH::FromA(a) => {
                    let fits = kernel.computes_lora_h(m, r) && a.dims2()? == (r, k);
                    let adev = cuda_device(a)?;
                    // SAFETY: the kernel's h blocks write every element before any is read.
                    made_h = wrap(unsafe { adev.alloc::<f32>(m * r)? }, &adev, (m, r));
                    (&made_h, Some(a), fits && a.dtype() == DType::F32)
                }
            };
            if !fits || bn != out_features || h.dtype() != DType::F32 || l.b.dtype() != DType::F32 {
                return Err(Error::Msg(format!(
                    "NF4 GEMV with LoRA: {m} rows of {k}, {out_features} outputs, h {:?} {:?}, A {:?}, B {:?} {:?}, kernel {kernel:?}",
                    h.dims(),
                    h.dtype(),
                    a.map(|a| (a.dims().to_vec(), a.dtype())),
                    l.b.dims(),
                    l.b.dtype()
                )));
            }
            Some((
                CudaInput::of(h)?,
                a.map(CudaInput::of).transpose()?,
                CudaInput::of(l.b)?,
                l.scaling,
                r,
            ))
        }
    };
    // The residual's inputs, each [m, out_features] in x's dtype.
    let residual = match epilogue {
        Epilogue::Residual { x: rx, b: rb } => {
            for t in [rx, rb] {
                if t.elem_count() != m * out_features || t.dtype() != x.dtype() {
                    return Err(Error::Msg(format!(
                        "NF4 GEMV with the residual: {m} x {out_features} outputs, a residual input {:?} {:?}",
                        t.dims(),
                        t.dtype()
                    )));
                }
            }
            Some((CudaInput::of(rx)?, CudaInput::of(rb)?))
        }
        _ => None,
    };
    // The slices of k the pairs form splits the product into (one row only; 1 elsewhere).
    let slices = match kernel == DecodeKernel::Mma && tiling.pairs && m == 1 {
        true => pairs_slices(k, out_features)?,
        false => 1,
    };
    // The h blocks a launch runs before the product's (0 where h is given).
    let hb = match &lora {
        Some((_, Some(_), _, _, r)) => m * r,
        _ => 0,
    };
    let x = if x.is_contiguous() && x.layout().start_offset() == 0 {
        x.clone()
    } else {
        // A fresh, offset-0 copy; the round trip through f32 is exact for bf16 and f16.
        x.to_dtype(DType::F32)?.to_dtype(x.dtype())?
    };
    let dev = cuda_device(&x)?;
    let (n_i, k_i, m_i, bs) = (out_features as i32, k as i32, m as i32, w.blocksize as i32);
    let cfg = match kernel {
        // 8 warps, one output feature each.
        DecodeKernel::Words | DecodeKernel::Wide | DecodeKernel::Tiled => LaunchConfig {
            grid_dim: (out_features.div_ceil(8) as u32, 1, 1),
            block_dim: (32 * 8, 1, 1),
            shared_mem_bytes: 0,
        },
        // `tiling.features()` a block, its warps splitting the columns, after the h blocks; the
        // `pairs` form's blocks loop over the groups of features, no more of them than fit on
        // the card at once beside the h blocks (each fills its table once; a product block that
        // found no room would start only as the h blocks leave, and finish that much later:
        // Falcon-7B's up projection has 1,136 groups for 396 places on an H100).
        DecodeKernel::Mma => {
            let items = out_features.div_ceil(tiling.features()) * slices;
            let blocks = match tiling.pairs {
                true => {
                    let resident = resident_blocks(&dev, tiling, x.dtype())?;
                    items.min(resident.saturating_sub(hb).max(1))
                }
                false => items,
            };
            LaunchConfig {
                grid_dim: ((hb + blocks) as u32, 1, 1),
                block_dim: (32 * tiling.warps, 1, 1),
                shared_mem_bytes: tiling.dynamic_shared(),
            }
        }
    };
    let (xs, _) = x.storage_and_layout();
    let xs = match &*xs {
        Storage::Cuda(c) => c,
        _ => return Err(Error::Msg("NF4 GEMV: x is not on the GPU".into())),
    };
    // The tensor-core kernel's module and PDL module (see mma_modules).
    let (mma_module, pdl) = match kernel {
        DecodeKernel::Mma => mma_modules(&dev, tiling)?,
        _ => (&NF4_MMA, None),
    };
    with_slices(w, |s| {
        // Every kernel but the tiled one also takes the adapter's inputs (lr = 0: none; the
        // absmax then stands in for the pointers it never reads).
        macro_rules! launch {
            ($module:expr, $name:expr, $t:ty) => {{
                let xv = xs.as_cuda_slice::<$t>()?;
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(m * out_features)? };
                // The tensor-core kernel's last parameters: the epilogue's code; where h is
                // computed in the launch, A, the flags, this launch's value of them and the h
                // blocks (no A: B's slice in A's place, never read); the residual's x and b
                // (none: x's slice in their place, never read).
                let act = epilogue.code();
                let (rx, rb) = match &residual {
                    Some((rx, rb)) => {
                        (rx.view::<$t>(m * out_features)?, rb.view::<$t>(m * out_features)?)
                    }
                    None => (xv.slice(..), xv.slice(..)),
                };
                let (state, epoch) = launch_state(&dev)?;
                let flags = CudaInput::of(&state.flags)?;
                let flags = flags.view::<u32>(LORA_H_BLOCKS)?;
                let scratch = CudaInput::of(&state.scratch)?;
                let scratch = scratch.view::<f32>(PAIRS_SPLIT_SUMS)?;
                let counts = CudaInput::of(&state.counts)?;
                let counts = counts.view::<u32>(PAIRS_SPLIT_GROUPS)?;
                let hb_i = hb as i32;
                let slices_i = slices as i32;
                match (&lora, kernel) {
                    (_, DecodeKernel::Tiled) => {
                        crate::run_kernel!($module, dev, $name, cfg;
                            s.codes, &n_i, &k_i, &bs, &s.nested, s.absmax, s.aq, s.acode,
                            &s.offset, &s.nbs, xv, &out, &m_i,
                        )?;
                    }
                    (Some((h, a, b, scaling, r)), kernel) => {
                        let (hv, bv) = (h.view::<f32>(m * r)?, b.view::<f32>(out_features * r)?);
                        let av = match a {
                            Some(a) => a.view::<f32>(r * k)?,
                            None => b.view::<f32>(out_features * r)?,
                        };
                        let r_i = *r as i32;
                        if kernel == DecodeKernel::Mma {
                            crate::run_kernel_maybe_pdl!(pdl, $module, dev, $name, cfg;
                                s.codes, &n_i, &k_i, &bs, &s.nested, s.absmax, s.aq, s.acode,
                                &s.offset, &s.nbs, xv, &out, &m_i, &hv, &bv, scaling, &r_i, &act,
                                &av, &flags, &epoch, &hb_i, &rx, &rb, &slices_i, &scratch, &counts,
                            )?;
                        } else {
                            crate::run_kernel!($module, dev, $name, cfg;
                                s.codes, &n_i, &k_i, &bs, &s.nested, s.absmax, s.aq, s.acode,
                                &s.offset, &s.nbs, xv, &out, &m_i, &hv, &bv, scaling, &r_i,
                            )?;
                        }
                    }
                    (None, kernel) => {
                        let (none, zero) = (0i32, 0f32);
                        if kernel == DecodeKernel::Mma {
                            crate::run_kernel_maybe_pdl!(pdl, $module, dev, $name, cfg;
                                s.codes, &n_i, &k_i, &bs, &s.nested, s.absmax, s.aq, s.acode,
                                &s.offset, &s.nbs, xv, &out, &m_i, s.absmax, s.absmax, &zero,
                                &none, &act, s.absmax, &flags, &epoch, &none, &rx, &rb, &slices_i,
                                &scratch, &counts,
                            )?;
                        } else {
                            crate::run_kernel!($module, dev, $name, cfg;
                                s.codes, &n_i, &k_i, &bs, &s.nested, s.absmax, s.aq, s.acode,
                                &s.offset, &s.nbs, xv, &out, &m_i, s.absmax, s.absmax, &zero,
                                &none,
                            )?;
                        }
                    }
                }
                Ok(wrap(out, &dev, (m, out_features)))
            }};
        }
        // (module, bf16 instance, f16 instance); one row has an instance of its own in the
        // 16-byte GEMV (nothing kept for rows that are not there).
        let (module, bf16, f16): (&CudaModule, String, String) = match kernel {
            DecodeKernel::Words => (&NF4, "nf4_gemv_bf16".into(), "nf4_gemv_f16".into()),
            DecodeKernel::Wide if m == 1 => {
                (&NF4, "nf4_gemv32_1_bf16".into(), "nf4_gemv32_1_f16".into())
            }
            DecodeKernel::Wide => (&NF4, "nf4_gemv32_bf16".into(), "nf4_gemv32_f16".into()),
            DecodeKernel::Mma => (
                mma_module,
                tiling.kernel_name(m, true),
                tiling.kernel_name(m, false),
            ),
            DecodeKernel::Tiled => (
                &NF4,
                "nf4_gemm_small_bf16".into(),
                "nf4_gemm_small_f16".into(),
            ),
        };
        match x.dtype() {
            DType::BF16 => launch!(module, &bf16, half::bf16),
            DType::F16 => launch!(module, &f16, half::f16),
            other => Err(Error::Msg(format!(
                "NF4 GEMV on {other:?} input is not supported"
            ))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_names_are_the_tables() {
        SMALL_TILING.names_match().unwrap();
        PAIRS_SPLIT.names_match().unwrap();
        ONE_ROW.names_match().unwrap();
        GEMV.names_match().unwrap();
        SMALL_BATCH.names_match().unwrap();
    }

    /// Falcon-7B's one-row products: only the down projection (284 groups of 142 chunks) splits
    /// over k; a product with fewer than 32 chunks a slice or more groups than the counts keep
    /// does not (a unit test's process sets no switch: `auto`).
    #[test]
    fn one_row_splits_only_where_groups_leave_places_idle() {
        for (k, n, slices) in [
            (4544, 4672, 1),
            (4544, 4544, 1),
            (4544, 18176, 1),
            (18176, 4544, PAIRS_SLICES),
            (18176, 40, PAIRS_SLICES),
            (16_000, 4544, 1),
            (18176, 16 * PAIRS_SPLIT_GROUPS + 16, 1),
        ] {
            assert_eq!(pairs_slices(k, n).unwrap(), slices, "{k} x {n}");
        }
    }

    #[test]
    fn decoding_tilings_have_instances_and_split_the_rows_at_eight() {
        for t in MmaTiling::DEFAULTS {
            assert!(
                MmaTiling::DECODING.contains(&t),
                "{} is not decoding's",
                t.name()
            );
        }
        for t in MmaTiling::DECODING {
            assert!(MmaTiling::ALL.contains(&t), "{} has no instance", t.name());
        }
        let (k, n) = (4544, 4672);
        // Unset, one row takes the pairs form (a unit test's process sets no switch), up to 8
        // rows the swapped form, more the A-operand form.
        for (m, default) in [(1, 2), (2, 0), (8, 0), (9, 1), (MMA_MAX_ROWS, 1)] {
            assert_eq!(
                MmaTiling::for_shape(m, k, n).unwrap(),
                MmaTiling::DEFAULTS[default],
                "{m} rows"
            );
        }
        // Past 32-bit offsets one row keeps the swapped form.
        assert!(!MmaTiling::pairs_reach(1 << 16, 1 << 16));
        assert_eq!(
            MmaTiling::for_shape(1, 1 << 16, 1 << 16).unwrap(),
            MmaTiling::DEFAULTS[0]
        );
        // The switches' names are the tilings' own, each one with an instance serving 8 rows
        // and the defaults among them (what reports name when
        // they are unset).
        assert!(
            SMALL_TILING
                .options()
                .contains(&("s8u2", MmaTiling::DEFAULTS[0]))
        );
        for (name, t) in SMALL_TILING.options() {
            assert_eq!(*name, t.name());
            assert!(
                MmaTiling::ALL.contains(t) && t.serves_rows(8) && !t.pairs,
                "{name}"
            );
        }
        let mut names: Vec<String> = MmaTiling::ALL.iter().map(|t| t.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(
            names.len(),
            MmaTiling::ALL.len(),
            "two tilings share a kernel name"
        );
        // Every instance's static shared memory (the warps' partial sums and the tables) fits
        // the 48 KB a block may declare statically, and with the pairs form's table a block
        // fits the 227 KB an sm_90 block may have.
        for t in MmaTiling::ALL {
            // The table's 256-byte alignment may pad up to 255 bytes.
            let fixed = t.partial_bytes() + (16 + 256) * 4 + 255;
            assert!(fixed <= 48 * 1024, "{}", t.name());
            assert!(
                fixed + t.dynamic_shared() as usize <= 227 * 1024,
                "{}",
                t.name()
            );
        }
        for m in 1..=MMA_MAX_ROWS {
            assert!(
                MmaTiling::for_shape(m, k, n).unwrap().serves_rows(m),
                "{m} rows"
            );
        }
    }

    #[test]
    fn the_pair_words_are_the_rounded_codes_high_nibble_first() {
        let words = pair_words(true);
        assert_eq!(words.len(), 256);
        let code = &crate::quant::nf4::NF4_CODE;
        // Byte 0x0f: code 0 (-1.0) first, code 15 (1.0) second.
        let expect = u32::from(half::bf16::from_f32(code[0]).to_bits())
            | (u32::from(half::bf16::from_f32(code[15]).to_bits()) << 16);
        assert_eq!(words[0x0f], format!("0x{expect:08x}u"));
        assert_eq!(words[0x0f], "0x3f80bf80u");
        let f16 = pair_words(false);
        assert_eq!(f16[0xf0], "0xbc003c00u");
    }
}
