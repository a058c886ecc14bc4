//! The bitsandbytes / HF serialization of a 4-bit linear layer, read and written bit for bit.
//!
//! `bnb.nn.Linear4bit._save_to_state_dict` stores, for a layer at prefix `P`:
//! - `P.weight`: the packed codes, u8 of shape `[(n + 1) / 2, 1]`;
//! - `P.weight.absmax`: u8 per block when double-quantized (else f32);
//! - `P.weight.quant_map`: the 16 NF4 values, f32;
//! - `P.weight.nested_absmax` (f32) and `P.weight.nested_quant_map` (256 f32) when double-quantized;
//! - `P.weight.quant_state.bitsandbytes__nf4`: u8 bytes of `json.dumps` of the non-tensor state
//!   (`quant_type`, `blocksize`, `dtype`, `shape`, `nested_blocksize`, `nested_dtype`,
//!   `nested_offset`, in that order).
//!
//! transformers reads these back when `config.json` has a `quantization_config` with
//! `quant_method: "bitsandbytes"`, which [`quantization_config`] writes.
//!
//! **Architecture Invariant:** this is the only module that knows bitsandbytes' names and JSON.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::io::tensors::TensorMap;
use crate::quant::nf4::{Absmax, NF4_CODE, NestedAbsmax, Nf4Tensor};

/// Tensor names relative to the layer prefix.
pub const WEIGHT: &str = "weight";
pub const ABSMAX: &str = "weight.absmax";
pub const QUANT_MAP: &str = "weight.quant_map";
pub const NESTED_ABSMAX: &str = "weight.nested_absmax";
pub const NESTED_QUANT_MAP: &str = "weight.nested_quant_map";
pub const QUANT_STATE_NF4: &str = "weight.quant_state.bitsandbytes__nf4";
pub const QUANT_STATE_FP4: &str = "weight.quant_state.bitsandbytes__fp4";

/// A problem with one layer's bitsandbytes tensors; `at` names the file and tensor.
#[derive(Debug, thiserror::Error)]
#[error("{at}: {kind}")]
pub struct BnbError {
    pub at: String,
    pub kind: BnbErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum BnbErrorKind {
    #[error("missing")]
    Missing,
    #[error("expected dtype {expected:?}, found {found:?}")]
    WrongDtype { expected: DType, found: DType },
    #[error("bad quant_state: {0}")]
    BadQuantState(String),
    #[error("quant_type {0:?} is not supported (only nf4)")]
    Unsupported(String),
    #[error("quant_map is not bitsandbytes' NF4 table")]
    NotNf4Map,
    #[error("{0}")]
    Nf4(#[from] crate::quant::nf4::Nf4Error),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

/// Where the tensors of one layer come from: names are relative to the layer's prefix.
pub trait TensorSource {
    /// Something that names the file and layer, for errors.
    fn describe(&self, name: &str) -> String;
    fn contains(&self, name: &str) -> bool;
    /// The tensor on the CPU. `dtype` is what bitsandbytes stores under that name: a source that
    /// knows the stored dtype returns the tensor unconverted (so a mismatch is reported), one that
    /// does not (a `VarBuilder`) converts to it.
    fn get(&self, name: &str, dtype: DType) -> candle_core::Result<Tensor>;
}

impl TensorSource for candle_nn::VarBuilder<'_> {
    fn describe(&self, name: &str) -> String {
        format!("checkpoint tensor {}", join(&self.prefix(), name))
    }
    fn contains(&self, name: &str) -> bool {
        self.contains_tensor(name)
    }
    fn get(&self, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        self.clone()
            .set_device(Device::Cpu)
            .get_unchecked_dtype(name, dtype)
    }
}

/// A layer inside a [`TensorMap`].
pub struct MapLayer<'a> {
    pub map: &'a TensorMap,
    pub prefix: &'a str,
}

impl TensorSource for MapLayer<'_> {
    fn describe(&self, name: &str) -> String {
        format!("{}: tensor {}", self.map.origin(), join(self.prefix, name))
    }
    fn contains(&self, name: &str) -> bool {
        self.map.contains(&join(self.prefix, name))
    }
    fn get(&self, name: &str, _dtype: DType) -> candle_core::Result<Tensor> {
        let full = join(self.prefix, name);
        self.map
            .get(&full)
            .cloned()
            .ok_or_else(|| candle_core::Error::msg(format!("tensor {full} is missing")))
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The 4-bit format of a layer's stored weight, if it is a bitsandbytes one.
pub fn detect(src: &impl TensorSource) -> Option<&'static str> {
    if src.contains(QUANT_STATE_NF4) {
        Some("nf4")
    } else if src.contains(QUANT_STATE_FP4) {
        Some("fp4")
    } else {
        None
    }
}

/// The non-tensor part of bitsandbytes' `QuantState.as_dict()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantStateJson {
    pub quant_type: String,
    pub blocksize: usize,
    pub dtype: String,
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_blocksize: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_offset: Option<f64>,
}

/// torch dtype names as bitsandbytes writes them (`str(dtype).strip("torch.")`).
pub fn dtype_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::BF16 => Some("bfloat16"),
        DType::F16 => Some("float16"),
        DType::F32 => Some("float32"),
        _ => None,
    }
}

pub fn dtype_from_name(name: &str) -> Option<DType> {
    match name {
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

impl QuantStateJson {
    pub fn of(t: &Nf4Tensor) -> Self {
        let (nested_blocksize, nested_dtype, nested_offset) = match t.absmax() {
            Absmax::Plain(_) => (None, None, None),
            Absmax::Nested(n) => (
                Some(n.blocksize),
                Some("float32".to_string()),
                Some(f64::from(n.offset)),
            ),
        };
        QuantStateJson {
            quant_type: "nf4".into(),
            blocksize: t.blocksize(),
            dtype: dtype_name(t.dtype()).unwrap_or("float32").into(),
            shape: t.shape().to_vec(),
            nested_blocksize,
            nested_dtype,
            nested_offset,
        }
    }

    /// The bytes Python's `json.dumps` writes for this dict, in bitsandbytes' key order, so our
    /// files equal bitsandbytes' byte for byte.
    pub fn to_python_json(&self) -> String {
        let mut s = format!(
            "{{\"quant_type\": {}, \"blocksize\": {}, \"dtype\": {}, \"shape\": [{}]",
            json_str(&self.quant_type),
            self.blocksize,
            json_str(&self.dtype),
            self.shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(b) = self.nested_blocksize {
            s += &format!(", \"nested_blocksize\": {b}");
        }
        if let Some(d) = &self.nested_dtype {
            s += &format!(", \"nested_dtype\": {}", json_str(d));
        }
        if let Some(o) = self.nested_offset {
            s += &format!(", \"nested_offset\": {}", python_float_repr(o));
        }
        s + "}"
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest digits that round-trip,
/// positional when the decimal exponent is in [-4, 16), else `d.ddde±XX`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // Rust's `{:e}` gives the same shortest round-trip digits, as `d.ddde<exp>`.
    let sci = format!("{:e}", x.abs());
    let (mant, exp) = sci.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    let decpt = exp + 1;
    if (-4 < decpt) && (decpt <= 16) {
        let body = if decpt <= 0 {
            format!("0.{}{}", "0".repeat((-decpt) as usize), digits)
        } else if decpt as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(decpt as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..decpt as usize],
                &digits[decpt as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let e = exp.unsigned_abs();
        format!("{sign}{m}e{}{e:02}", if exp < 0 { '-' } else { '+' })
    }
}

fn err(src: &impl TensorSource, name: &str, kind: BnbErrorKind) -> BnbError {
    BnbError {
        at: src.describe(name),
        kind,
    }
}

fn fetch(src: &impl TensorSource, name: &str, dtype: DType) -> Result<Tensor, BnbError> {
    if !src.contains(name) {
        return Err(err(src, name, BnbErrorKind::Missing));
    }
    let t = src.get(name, dtype).map_err(|e| err(src, name, e.into()))?;
    if t.dtype() != dtype {
        return Err(err(
            src,
            name,
            BnbErrorKind::WrongDtype {
                expected: dtype,
                found: t.dtype(),
            },
        ));
    }
    Ok(t)
}

fn flat<T: candle_core::WithDType>(
    src: &impl TensorSource,
    name: &str,
    t: &Tensor,
) -> Result<Vec<T>, BnbError> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<T>())
        .map_err(|e| err(src, name, e.into()))
}

/// Read one layer's bitsandbytes NF4 weight.
pub fn read_nf4(src: &impl TensorSource) -> Result<Nf4Tensor, BnbError> {
    if src.contains(QUANT_STATE_FP4) {
        return Err(err(
            src,
            QUANT_STATE_FP4,
            BnbErrorKind::Unsupported("fp4".into()),
        ));
    }
    let qs_t = fetch(src, QUANT_STATE_NF4, DType::U8)?;
    let qs_bytes = flat::<u8>(src, QUANT_STATE_NF4, &qs_t)?;
    let qs: QuantStateJson = serde_json::from_slice(&qs_bytes).map_err(|e| {
        err(
            src,
            QUANT_STATE_NF4,
            BnbErrorKind::BadQuantState(e.to_string()),
        )
    })?;
    if qs.quant_type != "nf4" {
        return Err(err(
            src,
            QUANT_STATE_NF4,
            BnbErrorKind::Unsupported(qs.quant_type),
        ));
    }
    let dtype = dtype_from_name(&qs.dtype).ok_or_else(|| {
        err(
            src,
            QUANT_STATE_NF4,
            BnbErrorKind::BadQuantState(format!("dtype {:?}", qs.dtype)),
        )
    })?;

    let codes = flat::<u8>(src, WEIGHT, &fetch(src, WEIGHT, DType::U8)?)?;
    let qmap = flat::<f32>(src, QUANT_MAP, &fetch(src, QUANT_MAP, DType::F32)?)?;
    // The CUDA kernels dequantize with their built-in table and ignore quant_map; refuse a file
    // whose map says otherwise rather than silently disagree with bitsandbytes.
    if qmap.len() != 16
        || qmap
            .iter()
            .zip(NF4_CODE)
            .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(err(src, QUANT_MAP, BnbErrorKind::NotNf4Map));
    }
    let absmax = match (qs.nested_blocksize, qs.nested_offset) {
        (Some(nested_blocksize), Some(offset)) => {
            if qs.nested_dtype.as_deref().is_some_and(|d| d != "float32") {
                return Err(err(
                    src,
                    QUANT_STATE_NF4,
                    BnbErrorKind::BadQuantState("nested_dtype must be float32".into()),
                ));
            }
            NestedAbsmax {
                q: flat::<u8>(src, ABSMAX, &fetch(src, ABSMAX, DType::U8)?)?,
                code: flat::<f32>(
                    src,
                    NESTED_QUANT_MAP,
                    &fetch(src, NESTED_QUANT_MAP, DType::F32)?,
                )?,
                absmax: flat::<f32>(src, NESTED_ABSMAX, &fetch(src, NESTED_ABSMAX, DType::F32)?)?,
                offset: offset as f32,
                blocksize: nested_blocksize,
            }
            .into()
        }
        (None, None) => Absmax::Plain(flat::<f32>(src, ABSMAX, &fetch(src, ABSMAX, DType::F32)?)?),
        _ => {
            return Err(err(
                src,
                QUANT_STATE_NF4,
                BnbErrorKind::BadQuantState(
                    "nested_blocksize and nested_offset go together".into(),
                ),
            ));
        }
    };
    Nf4Tensor::from_parts(qs.shape, dtype, qs.blocksize, codes, absmax)
        .map_err(|e| err(src, WEIGHT, e.into()))
}

impl From<NestedAbsmax> for Absmax {
    fn from(n: NestedAbsmax) -> Self {
        Absmax::Nested(n)
    }
}

/// The tensors bitsandbytes' `state_dict()` holds for this weight, named under `prefix` (the
/// layer's module path), on the CPU.
pub fn nf4_tensors(prefix: &str, t: &Nf4Tensor) -> candle_core::Result<Vec<(String, Tensor)>> {
    let cpu = &Device::Cpu;
    let mut out = vec![(
        join(prefix, WEIGHT),
        Tensor::from_vec(t.codes().to_vec(), (t.codes().len(), 1), cpu)?,
    )];
    match t.absmax() {
        Absmax::Plain(a) => out.push((
            join(prefix, ABSMAX),
            Tensor::from_vec(a.clone(), a.len(), cpu)?,
        )),
        Absmax::Nested(n) => {
            out.push((
                join(prefix, ABSMAX),
                Tensor::from_vec(n.q.clone(), n.q.len(), cpu)?,
            ));
        }
    }
    out.push((
        join(prefix, QUANT_MAP),
        Tensor::from_vec(NF4_CODE.to_vec(), 16, cpu)?,
    ));
    if let Absmax::Nested(n) = t.absmax() {
        out.push((
            join(prefix, NESTED_ABSMAX),
            Tensor::from_vec(n.absmax.clone(), n.absmax.len(), cpu)?,
        ));
        out.push((
            join(prefix, NESTED_QUANT_MAP),
            Tensor::from_vec(n.code.clone(), n.code.len(), cpu)?,
        ));
    }
    let json = QuantStateJson::of(t).to_python_json().into_bytes();
    let len = json.len();
    out.push((
        join(prefix, QUANT_STATE_NF4),
        Tensor::from_vec(json, len, cpu)?,
    ));
    Ok(out)
}

/// `config.json`'s `quantization_config` for an NF4 checkpoint, as transformers'
/// `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...).to_dict()` writes it.
pub fn quantization_config(
    compute_dtype: DType,
    double_quant: bool,
    skip_modules: Option<&[String]>,
) -> serde_json::Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": dtype_name(compute_dtype).unwrap_or("float32"),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::nf4::Nf4Options;

    #[test]
    fn python_repr_matches_python() {
        let check = |x: f64, expect: &str| assert_eq!(python_float_repr(x), expect, "{x}");
        check(0.0, "0.0");
        check(-0.0, "-0.0");
        check(1.0, "1.0");
        check(6.0, "6.0");
        check(0.1, "0.1");
        check(0.0001, "0.0001");
        check(0.00001, "1e-05");
        check(1.5e-7, "1.5e-07");
        check(123456.0, "123456.0");
        check(1e16, "1e+16");
        check(1234567890123456.0, "1234567890123456.0");
        check(f64::from(0.1f32), "0.10000000149011612");
        check(f64::from(0.0123f32), "0.012299999594688416");
        check(-2.5e-5, "-2.5e-05");
        check(1e100, "1e+100");
    }

    #[test]
    fn quant_state_json_is_python_json() {
        let vals: Vec<f32> = (0..64 * 300)
            .map(|i| ((i as f32) * 0.37).sin() * 0.02)
            .collect();
        let t = Nf4Tensor::quantize(&vals, &[96, 200], DType::BF16, Nf4Options::default()).unwrap();
        let Absmax::Nested(n) = t.absmax() else {
            panic!("nested")
        };
        let s = QuantStateJson::of(&t).to_python_json();
        assert_eq!(
            s,
            format!(
                "{{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [96, 200], \
                 \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": {}}}",
                python_float_repr(f64::from(n.offset))
            )
        );
        let back: QuantStateJson = serde_json::from_str(&s).unwrap();
        assert_eq!(back, QuantStateJson::of(&t));
    }

    #[test]
    fn tensors_roundtrip_through_a_map() {
        let vals: Vec<f32> = (0..32 * 48).map(|i| ((i as f32) * 0.11).cos()).collect();
        for double_quant in [true, false] {
            let t = Nf4Tensor::quantize(
                &vals,
                &[32, 48],
                DType::F16,
                Nf4Options {
                    double_quant,
                    ..Default::default()
                },
            )
            .unwrap();
            let map = TensorMap::from_tensors(
                "mem",
                nf4_tensors("model.layers.0.mlp.up_proj", &t).unwrap(),
            );
            assert_eq!(
                map.require("model.layers.0.mlp.up_proj.weight")
                    .unwrap()
                    .dims(),
                &[768, 1]
            );
            let layer = MapLayer {
                map: &map,
                prefix: "model.layers.0.mlp.up_proj",
            };
            assert_eq!(detect(&layer), Some("nf4"));
            assert_eq!(read_nf4(&layer).unwrap(), t);
        }
    }

    #[test]
    fn errors_name_file_and_tensor() {
        let t =
            Nf4Tensor::quantize(&[0.5; 128], &[2, 64], DType::BF16, Nf4Options::default()).unwrap();
        let mut map = TensorMap::from_tensors("ckpt.safetensors", nf4_tensors("l", &t).unwrap());
        map.remove("l.weight.nested_absmax");
        let e = read_nf4(&MapLayer {
            map: &map,
            prefix: "l",
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "ckpt.safetensors: tensor l.weight.nested_absmax: missing"
        );
        map.insert(
            "l.weight.nested_absmax",
            Tensor::zeros(1, DType::F16, &Device::Cpu).unwrap(),
        );
        let e = read_nf4(&MapLayer {
            map: &map,
            prefix: "l",
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("l.weight.nested_absmax: expected dtype F32, found F16"),
            "{e}"
        );
        map.insert(
            "l.weight.quant_map",
            Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = read_nf4(&MapLayer {
            map: &map,
            prefix: "l",
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.ends_with("quant_map is not bitsandbytes' NF4 table"),
            "{e}"
        );
    }
}
