//! NF4 4-bit quantization with double quantization, bit-compatible with bitsandbytes'
//! `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)` on CUDA.
//!
//! Layout (what bitsandbytes stores and what [`Nf4Tensor`] holds):
//! - the weight is flattened row-major and cut into blocks of `blocksize` (64) elements;
//! - each block's `absmax` is `max |x|` (f32); each element becomes the 4-bit index of an NF4
//!   code value, chosen by the CUDA kernel's decision tree on `x * (1 / absmax)`;
//! - two indices share a byte, the first element in the high nibble; an odd element count pads the
//!   last low nibble with the index of `0.0`;
//! - with double quantization the absmax values are centred on their mean (`offset`) and quantized
//!   again, 8 bits each in blocks of 256, with bitsandbytes' signed dynamic map; each of those
//!   blocks keeps its own f32 absmax (`nested_absmax`).
//!
//! Dequantization is `NF4[idx] * absmax` in f32, rounded once to the output dtype, exactly as the
//! kernel computes it, so dequantized values equal bitsandbytes' bit for bit.
//!
//! **Architecture Invariant:** this module is pure data and arithmetic on the CPU; it knows nothing
//! of candle's autograd or of files. `quant::weight` runs it inside ops, `quant::bnb` serializes it.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

/// The 16 NF4 code values, as bitsandbytes' CUDA kernels hold them (`nf4_dequantization_lut`).
/// The digits are bitsandbytes' own; each literal rounds to the same f32 as in nvcc.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The decision thresholds of bitsandbytes' `dQuantizeNF4` tree, in ascending order. The tree is a
/// binary search over these with strict `>` at every node, so the chosen index equals the number of
/// thresholds the value exceeds; a NaN exceeds none and gets index 0, as in the kernel. They are not
/// the exact midpoints of [`NF4_CODE`]: using midpoints would disagree with bitsandbytes.
/// Seven of them are decimal ties between two f32 values; nvcc, like Rust, rounds the literal
/// straight to f32, while going through f64 first (Python's `float32(0.848...)`) picks the other
/// neighbour for four of them, so these literals must stay f32 literals.
#[allow(clippy::excessive_precision)]
pub(crate) const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_400_499_343_9,
    -0.610_632_926_225_662_2,
    -0.459_995_269_775_390_6,
    -0.339_679_434_895_515_44,
    -0.234_607_405_960_559_84,
    -0.137_911_733_239_889_14,
    -0.045_525_018_125_772_476,
    0.039_790_149_778_127_67,
    0.120_255_250_483_751_3,
    0.203_521_251_678_466_8,
    0.292_013_771_831_989_3,
    0.389_312_535_524_368_3,
    0.501_663_416_624_069_2,
    0.642_786_920_070_648_2,
    0.861_478_418_111_801_1,
];

/// bitsandbytes' default (and transformers' only) 4-bit block size.
pub const BLOCKSIZE: usize = 64;
/// The block size of the double quantization of absmax (`quantize_blockwise(blocksize=256)`).
pub const NESTED_BLOCKSIZE: usize = 256;

/// What can go wrong building or reading NF4 data.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Nf4Error {
    #[error("NF4 block size {0} is not supported (bitsandbytes uses 32..4096, even)")]
    BadBlocksize(usize),
    #[error("NF4 data for shape {shape:?} needs {expected} {what}, found {found}")]
    BadLength {
        shape: Vec<usize>,
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("NF4 quantization needs a float weight (bf16, f16 or f32), got {0:?}")]
    BadDtype(DType),
    #[error("the 8-bit code map of double quantization must hold 256 values, found {0}")]
    BadCodeMap(usize),
}

/// The per-block scales: plain f32, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested(NestedAbsmax),
}

/// Double-quantized absmax: `absmax[i] = code[q[i]] * absmax2[i / blocksize] + offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One byte per 4-bit block.
    pub q: Vec<u8>,
    /// The 256-entry code map (bitsandbytes' `nested_quant_map`).
    pub code: Vec<f32>,
    /// One f32 per block of `blocksize` absmax values (`nested_absmax`).
    pub absmax: Vec<f32>,
    /// The mean that was subtracted before quantizing (`nested_offset`).
    pub offset: f32,
    /// 256 in everything bitsandbytes writes.
    pub blocksize: usize,
}

/// Options for [`Nf4Tensor::quantize`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nf4Options {
    pub blocksize: usize,
    /// bitsandbytes' `compress_statistics` / transformers' `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
}

impl Default for Nf4Options {
    fn default() -> Self {
        Nf4Options {
            blocksize: BLOCKSIZE,
            double_quant: true,
        }
    }
}

/// A weight in NF4: packed codes plus scales, with the original shape and dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    shape: Vec<usize>,
    dtype: DType,
    blocksize: usize,
    codes: Vec<u8>,
    absmax: Absmax,
}

impl Nf4Tensor {
    /// Quantize `values` (the flattened weight, already widened to f32) of the given shape;
    /// `dtype` is the weight's original dtype, which dequantization returns by default.
    pub fn quantize(
        values: &[f32],
        shape: &[usize],
        dtype: DType,
        opts: Nf4Options,
    ) -> Result<Self, Nf4Error> {
        Self::quantize_from(values, |x| x, shape, dtype, opts)
    }

    /// [`Self::quantize`] from values of any type that `widen` turns into f32 exactly (bf16,
    /// f16): each block is widened as it is quantized, in parallel, instead of the whole weight
    /// first (for Falcon-7B, 28 GB of f32 written and read on one core).
    fn quantize_from<T: Copy + Sync>(
        values: &[T],
        widen: impl Fn(T) -> f32 + Sync,
        shape: &[usize],
        dtype: DType,
        opts: Nf4Options,
    ) -> Result<Self, Nf4Error> {
        check_blocksize(opts.blocksize)?;
        check_float(dtype)?;
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(Nf4Error::BadLength {
                shape: shape.to_vec(),
                what: "values",
                expected: n,
                found: values.len(),
            });
        }
        let (codes, absmax) = quantize_nf4_blocks(values, &widen, opts.blocksize);
        let absmax = if opts.double_quant {
            Absmax::Nested(NestedAbsmax::quantize(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Nf4Tensor {
            shape: shape.to_vec(),
            dtype,
            blocksize: opts.blocksize,
            codes,
            absmax,
        })
    }

    /// Quantize a candle tensor (any device; its values are read to the CPU). A contiguous
    /// 16-bit tensor on the CPU is quantized from its own storage, widened block by block.
    pub fn from_tensor(t: &Tensor, opts: Nf4Options) -> candle_core::Result<Self> {
        let dtype = t.dtype();
        check_float(dtype).map_err(candle_core::Error::wrap)?;
        if t.device().is_cpu() {
            let (storage, layout) = t.storage_and_layout();
            if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            {
                let q = match cpu {
                    candle_core::CpuStorage::BF16(v) => Some(Self::quantize_from(
                        &v[start..end],
                        bf16::to_f32,
                        t.dims(),
                        dtype,
                        opts,
                    )),
                    candle_core::CpuStorage::F16(v) => Some(Self::quantize_from(
                        &v[start..end],
                        f16::to_f32,
                        t.dims(),
                        dtype,
                        opts,
                    )),
                    candle_core::CpuStorage::F32(v) => {
                        Some(Self::quantize(&v[start..end], t.dims(), dtype, opts))
                    }
                    _ => None,
                };
                if let Some(q) = q {
                    return q.map_err(candle_core::Error::wrap);
                }
            }
        }
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Self::quantize(&values, t.dims(), dtype, opts).map_err(candle_core::Error::wrap)
    }

    /// Assemble from stored parts (a bitsandbytes checkpoint), checking that the sizes agree.
    pub fn from_parts(
        shape: Vec<usize>,
        dtype: DType,
        blocksize: usize,
        codes: Vec<u8>,
        absmax: Absmax,
    ) -> Result<Self, Nf4Error> {
        check_blocksize(blocksize)?;
        check_float(dtype)?;
        let n: usize = shape.iter().product();
        let nb = n.div_ceil(blocksize);
        let len_check = |what, expected, found| {
            if expected == found {
                Ok(())
            } else {
                Err(Nf4Error::BadLength {
                    shape: shape.clone(),
                    what,
                    expected,
                    found,
                })
            }
        };
        len_check("code bytes", n.div_ceil(2), codes.len())?;
        match &absmax {
            Absmax::Plain(a) => len_check("absmax values", nb, a.len())?,
            Absmax::Nested(na) => {
                check_blocksize(na.blocksize)?;
                len_check("quantized absmax bytes", nb, na.q.len())?;
                len_check(
                    "nested absmax values",
                    nb.div_ceil(na.blocksize),
                    na.absmax.len(),
                )?;
                if na.code.len() != 256 {
                    return Err(Nf4Error::BadCodeMap(na.code.len()));
                }
            }
        }
        Ok(Nf4Tensor {
            shape,
            dtype,
            blocksize,
            codes,
            absmax,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The dtype the weight had before quantization (bitsandbytes' `quant_state.dtype`).
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes held by the quantized data (codes and scales).
    pub fn storage_bytes(&self) -> usize {
        self.codes.len()
            + match &self.absmax {
                Absmax::Plain(a) => 4 * a.len(),
                Absmax::Nested(n) => n.q.len() + 4 * n.absmax.len() + 4 * n.code.len() + 4,
            }
    }

    /// The per-block absmax in f32, undoing the double quantization as bitsandbytes does.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Nested(n) => n.dequantize(),
        }
    }

    /// The weight in f32 (each value `NF4[idx] * absmax`, as the kernel computes it).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        self.dequantize_with(|v| v)
    }

    /// Dequantize to a CPU tensor of `dtype` (bf16, f16 or f32) with the original shape. Values
    /// are rounded once from the f32 product, so they equal bitsandbytes' `dequantize_4bit`.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let shape = self.shape.as_slice();
        match dtype {
            DType::F32 => Tensor::from_vec(self.dequantize_f32(), shape, &Device::Cpu),
            DType::BF16 => {
                Tensor::from_vec(self.dequantize_with(bf16::from_f32), shape, &Device::Cpu)
            }
            DType::F16 => {
                Tensor::from_vec(self.dequantize_with(f16::from_f32), shape, &Device::Cpu)
            }
            other => Err(candle_core::Error::wrap(Nf4Error::BadDtype(other))),
        }
    }

    /// The weights, in `dtype` (bf16 or f16), as bitsandbytes' batch-1 GEMV forms them
    /// (`gemv_4bit`'s kernel, what transformers runs for a single token): the code's value
    /// rounded to `dtype` times the absmax rounded to it, the product rounded once (a 16-bit
    /// multiply; the f32 product of two 16-bit values is exact). The CPU twin of one row's
    /// product on the GPU under `ADAPTERLAB_NF4_ONE_ROW=gemv4bit`; each weight is within two
    /// steps of the type of [`Self::dequantize`]'s.
    pub fn dequantize_gemv4bit(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let shape = self.shape.as_slice();
        match dtype {
            DType::BF16 => Tensor::from_vec(
                self.gemv4bit_weights(bf16::from_f32, bf16::to_f32),
                shape,
                &Device::Cpu,
            ),
            DType::F16 => Tensor::from_vec(
                self.gemv4bit_weights(f16::from_f32, f16::to_f32),
                shape,
                &Device::Cpu,
            ),
            other => Err(candle_core::Error::wrap(Nf4Error::BadDtype(other))),
        }
    }

    /// [`Self::dequantize_gemv4bit`] in the 16-bit type `to` rounds to and `from` widens.
    fn gemv4bit_weights<T: Copy + Default + Send + Sync>(
        &self,
        to: fn(f32) -> T,
        from: fn(T) -> f32,
    ) -> Vec<T> {
        self.dequantize_table(|c, a| to(from(to(NF4_CODE[c])) * from(to(a))))
    }

    fn dequantize_with<T: Copy + Default + Send + Sync>(
        &self,
        convert: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        self.dequantize_table(|c, a| convert(NF4_CODE[c] * a))
    }

    /// Dequantize with a per-block table, `weight(code, absmax)` for each of the 16 codes: 16
    /// products and 16 conversions per block, then the elements are plain lookups (no
    /// per-element branches or multiplies). Large weights are split over threads by whole blocks.
    fn dequantize_table<T: Copy + Default + Send + Sync>(
        &self,
        weight: impl Fn(usize, f32) -> T + Sync,
    ) -> Vec<T> {
        let n = self.elem_count();
        let absmax = self.absmax_f32();
        let bs = self.blocksize;
        let mut out = vec![T::default(); n];
        let run = |first_block: usize, chunk: &mut [T]| {
            for (j, block) in chunk.chunks_mut(bs).enumerate() {
                let b = first_block + j;
                let a = absmax[b];
                let table: [T; 16] = std::array::from_fn(|i| weight(i, a));
                let bytes = &self.codes[b * bs / 2..];
                // Fixed-size pairs let the compiler drop the bounds checks in the hot loop.
                let (pairs, last) = block.as_chunks_mut::<2>();
                for (pair, &byte) in pairs.iter_mut().zip(bytes) {
                    *pair = [table[(byte >> 4) as usize], table[(byte & 0x0f) as usize]];
                }
                if let [last] = last {
                    *last = table[(bytes[pairs.len()] >> 4) as usize];
                }
            }
        };
        let blocks_per_chunk = PAR_CHUNK_ELEMS.div_ceil(bs);
        if n <= PAR_CHUNK_ELEMS {
            run(0, &mut out);
        } else {
            use rayon::prelude::*;
            out.par_chunks_mut(blocks_per_chunk * bs)
                .enumerate()
                .for_each(|(c, chunk)| run(c * blocks_per_chunk, chunk));
        }
        out
    }
}

/// Work below this many elements stays on the calling thread.
const PAR_CHUNK_ELEMS: usize = 1 << 18;

pub(crate) fn check_blocksize(bs: usize) -> Result<(), Nf4Error> {
    if (2..=4096).contains(&bs) && bs.is_multiple_of(2) {
        Ok(())
    } else {
        Err(Nf4Error::BadBlocksize(bs))
    }
}

pub(crate) fn check_float(dtype: DType) -> Result<(), Nf4Error> {
    match dtype {
        DType::BF16 | DType::F16 | DType::F32 => Ok(()),
        other => Err(Nf4Error::BadDtype(other)),
    }
}

/// bitsandbytes' CUDA library is built with `--use_fast_math`, which flushes subnormal floats to
/// zero; doing the same keeps blocks of subnormal values on the kernel's path.
#[inline]
fn ftz(x: f32) -> f32 {
    if x.is_subnormal() { 0.0 } else { x }
}

/// `1.0f / absmax` as the kernel computes it. The kernel's fast-math reciprocal is approximate;
/// this is the IEEE one, see the fixture tests for how often that matters.
#[inline]
fn reciprocal(absmax: f32) -> f32 {
    1.0 / absmax
}

/// The NF4 index of a normalized value: the number of decision thresholds it exceeds.
#[inline]
pub fn nf4_index(v: f32) -> u8 {
    NF4_THRESHOLDS.iter().map(|&t| u8::from(v > t)).sum()
}

/// Quantize flattened values in blocks: returns (packed codes, per-block absmax).
fn quantize_nf4_blocks<T: Copy + Sync>(
    values: &[T],
    widen: &(impl Fn(T) -> f32 + Sync),
    bs: usize,
) -> (Vec<u8>, Vec<f32>) {
    let n = values.len();
    let nb = n.div_ceil(bs);
    let mut codes = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; nb];
    let run = |vals: &[T], codes: &mut [u8], absmax: &mut [f32]| {
        for ((block, cbytes), am) in vals
            .chunks(bs)
            .zip(codes.chunks_mut(bs / 2))
            .zip(absmax.iter_mut())
        {
            // fmaxf over |x| starting from -FLT_MAX in the kernel; |x| >= 0 so 0 is the same start.
            let a = block.iter().fold(0f32, |m, &x| m.max(ftz(widen(x)).abs()));
            *am = a;
            let r = reciprocal(a);
            let idx = |x: f32| nf4_index(ftz(ftz(x) * r));
            let mut pairs = block.chunks_exact(2);
            for (pair, byte) in (&mut pairs).zip(cbytes.iter_mut()) {
                *byte = (idx(widen(pair[0])) << 4) | idx(widen(pair[1]));
            }
            if let [last] = pairs.remainder() {
                // The kernel loads the missing element as 0 and quantizes it like any other.
                cbytes[block.len() / 2] = (idx(widen(*last)) << 4) | idx(0.0);
            }
        }
    };
    let blocks_per_chunk = PAR_CHUNK_ELEMS.div_ceil(bs);
    if n <= PAR_CHUNK_ELEMS {
        run(values, &mut codes, &mut absmax);
    } else {
        use rayon::prelude::*;
        values
            .par_chunks(blocks_per_chunk * bs)
            .zip(codes.par_chunks_mut(blocks_per_chunk * bs / 2))
            .zip(absmax.par_chunks_mut(blocks_per_chunk))
            .for_each(|((v, c), a)| run(v, c, a));
    }
    (codes, absmax)
}

impl NestedAbsmax {
    /// Double-quantize absmax values as `quantize_4bit(compress_statistics=True)` does: subtract
    /// their mean, then 8-bit blockwise quantization (blocks of 256) with the signed dynamic map.
    pub fn quantize(absmax: &[f32]) -> Self {
        Self::quantize_with_offset(absmax, mean_f32(absmax))
    }

    /// The same with a given offset (e.g. the one bitsandbytes computed, to compare the rest).
    pub fn quantize_with_offset(absmax: &[f32], offset: f32) -> Self {
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let code = dynamic_map_signed();
        let (q, absmax2) = quantize_blockwise_8bit(&centred, &code, NESTED_BLOCKSIZE);
        NestedAbsmax {
            q,
            code: code.to_vec(),
            absmax: absmax2,
            offset,
            blocksize: NESTED_BLOCKSIZE,
        }
    }

    /// `code[q] * absmax2 + offset`, two separately rounded f32 operations as in bitsandbytes
    /// (`dequantize_blockwise(...)` then `absmax += offset`).
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| self.code[q as usize] * self.absmax[i / self.blocksize] + self.offset)
            .collect()
    }
}

/// The mean of f32 values, accumulated in f64 and rounded once. torch's CUDA `mean()` sums in f32
/// in its own tree order, so bitsandbytes' offset can differ from this in the last bit or two; the
/// offset is stored with the weights, so this only matters when comparing fresh quantizations.
pub fn mean_f32(values: &[f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    (values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64) as f32
}

/// bitsandbytes' 8-bit blockwise quantization (`kQuantizeBlockwise` with the General8bit type):
/// per block, absmax = max |x| and each value's index is picked by [`dquantize_8bit`] on
/// `x * (1 / absmax)`. Returns (indices, per-block absmax).
pub fn quantize_blockwise_8bit(
    values: &[f32],
    code: &[f32; 256],
    bs: usize,
) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; values.len()];
    let mut absmax = vec![0f32; values.len().div_ceil(bs)];
    // Blocks are independent: large inputs (a 7B model's biggest weight has 1.3M absmax values,
    // quantized again at load) are split over threads by whole blocks.
    let run = |vals: &[f32], q: &mut [u8], absmax: &mut [f32]| {
        for ((block, qb), am) in vals.chunks(bs).zip(q.chunks_mut(bs)).zip(absmax.iter_mut()) {
            let a = block.iter().fold(0f32, |m, &x| m.max(ftz(x).abs()));
            *am = a;
            let r = reciprocal(a);
            for (o, &x) in qb.iter_mut().zip(block) {
                *o = dquantize_8bit(code, ftz(ftz(x) * r));
            }
        }
    };
    let blocks_per_chunk = (PAR_CHUNK_ELEMS / 16).div_ceil(bs);
    if values.len() <= blocks_per_chunk * bs {
        run(values, &mut q, &mut absmax);
    } else {
        use rayon::prelude::*;
        values
            .par_chunks(blocks_per_chunk * bs)
            .zip(q.par_chunks_mut(blocks_per_chunk * bs))
            .zip(absmax.par_chunks_mut(blocks_per_chunk))
            .for_each(|((v, q), a)| run(v, q, a));
    }
    (q, absmax)
}

/// The index choice of bitsandbytes' `dQuantize<0>` (non-stochastic), step for step: a 7-level
/// binary search from the middle of the sorted map, then a comparison against the midpoint between
/// the landing value and the neighbour on the side of `x`. Its quirks are kept on purpose: the
/// bracketing values start as -1 and 1 (not map entries) and are only replaced at the ends, and a
/// value exactly on a midpoint goes to the landing index.
pub fn dquantize_8bit(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let chosen = if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint { upper_pivot } else { pivot }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint { lower_pivot } else { pivot }
    };
    chosen as u8
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: for each
/// exponent e in 0..7, the midpoints of `linspace(0.1, 1, 2^e + 1)` scaled by 10^(e-6), with both
/// signs, plus 0 and 1, sorted. Computed in f32 with torch's CPU `linspace` arithmetic (first half
/// counted from the start, second half from the end), as torch builds it before copying to CUDA.
pub fn dynamic_map_signed() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for e in 0..7i32 {
        let steps = (1usize << e) + 1;
        let b = linspace_f32(0.1, 1.0, steps);
        // Python: (10 ** (-(7 - 1) + i)) * means, a float32 tensor times a Python float: the scalar
        // is converted to f32 first.
        let scale = 10f64.powi(e - 6) as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// torch's CPU `linspace` for f32 (`aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp`): the
/// first half is `start + step * i`, the second `end - step * (steps - 1 - i)`, each a fused
/// multiply-add as torch's build compiles it. Checked bit for bit against bitsandbytes' map in
/// the fixture tests (plain multiply-then-add disagrees in 42 of 256 entries).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|idx| {
            if idx < halfway {
                step.mul_add(idx as f32, start)
            } else {
                (-step).mul_add((steps - idx - 1) as f32, end)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nearest(v: f32) -> u8 {
        let dist = |i: usize| (v - NF4_CODE[i]).abs();
        (1..16).fold(0, |best, i| if dist(i) < dist(best) { i } else { best }) as u8
    }

    /// bitsandbytes' batch-1 weights are the 16-bit code value times the 16-bit absmax,
    /// rounded once: within two steps of the type of the dequantized weight, and not always it.
    #[test]
    fn gemv4bit_weights_are_a_rounding_from_the_dequantized_ones() {
        let w: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.377).sin() * 0.05).collect();
        let t = Nf4Tensor::quantize(&w, &[64, 64], DType::F32, Nf4Options::default()).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let d = t.dequantize(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let g = t
                .dequantize_gemv4bit(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let (d, g) = (
                d.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            // Three roundings of 2^-9 (bf16) or 2^-12 (f16) of a value at most, against one: a
            // step of the type is at most 2^-7 or 2^-10 of a value, and the two are at most two
            // steps apart.
            let ulp = if dtype == DType::BF16 {
                2f32.powi(-6)
            } else {
                2f32.powi(-9)
            };
            let mut differ = 0;
            for (a, b) in d.iter().zip(&g) {
                assert!(
                    (a - b).abs() <= a.abs().max(b.abs()) * ulp,
                    "{a} against {b}"
                );
                differ += usize::from(a != b);
            }
            assert!(differ > 0, "{dtype:?}: no weight differs");
        }
    }

    #[test]
    fn index_is_nearest_code_away_from_thresholds() {
        let mut x = -1.0f32;
        while x <= 1.0 {
            let near_threshold = NF4_THRESHOLDS.iter().any(|t| (x - t).abs() < 2e-3);
            if !near_threshold {
                assert_eq!(nf4_index(x), nearest(x), "x = {x}");
            }
            x += 1e-3;
        }
    }

    #[test]
    fn thresholds_are_strict_and_nan_is_zero() {
        for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(nf4_index(t), k as u8, "on threshold {t}");
            assert_eq!(nf4_index(t.next_up()), k as u8 + 1, "above threshold {t}");
        }
        assert_eq!(nf4_index(f32::NAN), 0);
        assert_eq!(nf4_index(0.0), 7);
        assert_eq!(nf4_index(-0.0), 7);
        assert_eq!(nf4_index(1.0), 15);
        assert_eq!(nf4_index(-1.0), 0);
    }

    #[test]
    fn packs_first_element_in_high_nibble_and_pads_odd_counts() {
        // absmax 1: -1 -> 0, 1 -> 15, 0 -> 7.
        let t = Nf4Tensor::quantize(
            &[-1.0, 1.0, 0.0],
            &[3],
            DType::F32,
            Nf4Options {
                double_quant: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(t.codes(), &[0x0f, 0x77]);
        assert_eq!(t.absmax(), &Absmax::Plain(vec![1.0]));
        assert_eq!(t.dequantize_f32(), vec![-1.0, 1.0, 0.0]);
    }

    #[test]
    fn all_zero_block_follows_the_kernel() {
        // 0 * (1 / 0) is NaN in the kernel, which picks index 0; the dequantized value is -0.0.
        let t = Nf4Tensor::quantize(
            &[0.0; 64],
            &[64],
            DType::F32,
            Nf4Options {
                double_quant: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(t.codes().iter().all(|&b| b == 0));
        assert!(t.dequantize_f32().iter().all(|v| *v == 0.0));
    }

    #[test]
    fn roundtrip_error_is_within_half_the_widest_gap() {
        let vals: Vec<f32> = (0..1000)
            .map(|i| ((i as f32) * 0.7371).sin() * 0.05)
            .collect();
        let t = Nf4Tensor::quantize(&vals, &[10, 100], DType::F32, Nf4Options::default()).unwrap();
        let back = t.dequantize_f32();
        let absmax = t.absmax_f32();
        for (i, (a, b)) in vals.iter().zip(&back).enumerate() {
            // Widest NF4 gap is 1 - 0.7229 = 0.277; double quant adds a small absmax error.
            let bound = 0.15 * absmax[i / 64] + 1e-3;
            assert!((a - b).abs() <= bound, "elem {i}: {a} vs {b}");
        }
    }

    #[test]
    fn dequantize_matches_dtype_rounding_of_f32() {
        let vals: Vec<f32> = (0..300).map(|i| ((i as f32) * 1.37).cos()).collect();
        let t = Nf4Tensor::quantize(&vals, &[3, 100], DType::BF16, Nf4Options::default()).unwrap();
        let f = t.dequantize_f32();
        let b = t
            .dequantize(DType::BF16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<bf16>()
            .unwrap();
        for (x, y) in f.iter().zip(&b) {
            assert_eq!(bf16::from_f32(*x), *y);
        }
        assert_eq!(t.dequantize(DType::F32).unwrap().dims(), &[3, 100]);
    }

    /// A 16-bit tensor quantized from its own storage (widened block by block, in parallel)
    /// gives the bits of quantizing its values widened to f32 first.
    #[test]
    fn sixteen_bit_tensors_quantize_as_their_f32_values() {
        let n = PAR_CHUNK_ELEMS + 64 * 5 + 3;
        let vals: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.011).sin() * 3.0).collect();
        for dtype in [DType::BF16, DType::F16] {
            let t = Tensor::from_vec(vals.clone(), (1, n), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let widened = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
            let want = Nf4Tensor::quantize(
                &widened.to_vec1::<f32>().unwrap(),
                &[1, n],
                dtype,
                Nf4Options::default(),
            )
            .unwrap();
            let got = Nf4Tensor::from_tensor(&t, Nf4Options::default()).unwrap();
            assert_eq!(got.codes(), want.codes(), "{dtype:?}");
            assert_eq!(got.absmax_f32(), want.absmax_f32(), "{dtype:?}");
            assert_eq!(got.dtype(), dtype);
            // A view that is not contiguous goes the widening way and agrees too.
            let tt = Tensor::from_vec(vals[..64 * 40].to_vec(), (40, 64), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .t()
                .unwrap();
            let a = Nf4Tensor::from_tensor(&tt, Nf4Options::default()).unwrap();
            let b =
                Nf4Tensor::from_tensor(&tt.contiguous().unwrap(), Nf4Options::default()).unwrap();
            assert_eq!(a.codes(), b.codes());
        }
    }

    #[test]
    fn parallel_and_serial_paths_agree() {
        let n = PAR_CHUNK_ELEMS * 2 + 64 * 3 + 5;
        let vals: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.013).sin()).collect();
        let t = Nf4Tensor::quantize(&vals, &[n], DType::F32, Nf4Options::default()).unwrap();
        let (codes, absmax) = {
            // Serial reference: quantize block by block through the small path.
            let mut codes = Vec::new();
            let mut absmax = Vec::new();
            for chunk in vals.chunks(64 * 16) {
                let (c, a) = quantize_nf4_blocks(chunk, &|x| x, 64);
                codes.extend(c);
                absmax.extend(a);
            }
            (codes, absmax)
        };
        assert_eq!(t.codes(), codes.as_slice());
        assert_eq!(t.absmax_f32().len(), absmax.len());
        let back = t.dequantize_f32();
        let t_plain = Nf4Tensor::from_parts(
            vec![n],
            DType::F32,
            64,
            codes,
            Absmax::Plain(t.absmax_f32()),
        )
        .unwrap();
        let mut serial = Vec::new();
        for (b, a) in t_plain.absmax_f32().iter().enumerate() {
            for j in 0..64.min(n - b * 64) {
                let byte = t_plain.codes()[(b * 64 + j) / 2];
                let idx = if j % 2 == 0 { byte >> 4 } else { byte & 15 };
                serial.push(NF4_CODE[idx as usize] * a);
            }
        }
        assert_eq!(back, serial);
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map_signed();
        assert!(m.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        assert_eq!(m[127], 0.0);
        assert_eq!(m[255], 1.0);
        assert!(m[0] > -1.0 && m[0] < -0.99);
        assert!((m[128] - 5.5e-7).abs() < 1e-9);
    }

    #[test]
    fn eight_bit_index_of_map_values_is_their_own() {
        let m = dynamic_map_signed();
        for (i, &v) in m.iter().enumerate() {
            assert_eq!(dquantize_8bit(&m, v) as usize, i, "code {i} = {v}");
        }
        // Beyond the ends.
        assert_eq!(dquantize_8bit(&m, -1.0), 0);
        assert_eq!(dquantize_8bit(&m, 1.0), 255);
    }

    #[test]
    fn eight_bit_quantization_splits_over_threads_by_whole_blocks() {
        let code = dynamic_map_signed();
        let n = PAR_CHUNK_ELEMS + 256 * 3 + 17;
        let vals: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 1e-2).collect();
        let (q, a) = quantize_blockwise_8bit(&vals, &code, NESTED_BLOCKSIZE);
        let (mut q1, mut a1) = (Vec::new(), Vec::new());
        for chunk in vals.chunks(NESTED_BLOCKSIZE) {
            let (q, a) = quantize_blockwise_8bit(chunk, &code, NESTED_BLOCKSIZE);
            q1.extend(q);
            a1.extend(a);
        }
        assert_eq!(q, q1);
        assert_eq!(a, a1);
    }

    #[test]
    fn nested_absmax_roundtrip_is_close() {
        let absmax: Vec<f32> = (0..600)
            .map(|i| 0.01 + 0.02 * ((i as f32) * 0.31).sin().abs())
            .collect();
        let n = NestedAbsmax::quantize(&absmax);
        assert_eq!(n.q.len(), 600);
        assert_eq!(n.absmax.len(), 3);
        for (a, b) in absmax.iter().zip(n.dequantize()) {
            assert!((a - b).abs() < 2e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn from_parts_checks_lengths() {
        let e = Nf4Tensor::from_parts(
            vec![4, 64],
            DType::BF16,
            64,
            vec![0; 127],
            Absmax::Plain(vec![1.0; 4]),
        )
        .unwrap_err();
        assert_eq!(
            e,
            Nf4Error::BadLength {
                shape: vec![4, 64],
                what: "code bytes",
                expected: 128,
                found: 127
            }
        );
        let e = Nf4Tensor::from_parts(
            vec![4, 64],
            DType::U8,
            64,
            vec![0; 128],
            Absmax::Plain(vec![1.0; 4]),
        )
        .unwrap_err();
        assert_eq!(e, Nf4Error::BadDtype(DType::U8));
        let e =
            Nf4Tensor::quantize(&[1.0; 3], &[4], DType::F32, Nf4Options::default()).unwrap_err();
        assert!(matches!(e, Nf4Error::BadLength { what: "values", .. }));
    }
}
