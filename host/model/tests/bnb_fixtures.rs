//! Golden tests against bitsandbytes, PEFT and transformers: the fixtures in `fixtures/bnb/`
//! were written on a CUDA machine by `fixtures/make_bnb_fixtures.py` (its `manifest.json` says
//! with which versions). Bit-exact where bitsandbytes is deterministic; where it is not (the
//! double quantization's mean, reduced by torch in its own order) the test says how close.

use std::path::{Path, PathBuf};

use adapterlab_model::io::tensors::TensorMap;
use adapterlab_model::lora::merge;
use adapterlab_model::lora::peft;
use adapterlab_model::quant::bnb::{self, MapLayer};
use adapterlab_model::quant::nf4::{self, Absmax, NestedAbsmax, Nf4Options, Nf4Tensor};
use adapterlab_model::quant::weight::{BaseWeight, Nf4Weight};
use candle_core::{DType, Device, Tensor};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bnb")
}

fn load(rel: &str) -> TensorMap {
    TensorMap::read_file(&dir().join(rel)).unwrap_or_else(|e| panic!("{e:#}"))
}

fn vec_u8(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Positions where two byte slices differ, for failure messages.
fn diff_positions<T: PartialEq>(a: &[T], b: &[T]) -> Vec<usize> {
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .take(20)
        .collect()
}

const NF4_CASES: [&str; 8] = [
    "bf16_64x64",
    "f32_96x128",
    "bf16_80x208",
    "f16_96x64",
    "f32_7x9",
    "f32_boundaries",
    "bf16_128x1024",
    "f32_64x1024",
];

#[test]
fn nf4_codes_and_absmax_equal_bitsandbytes() {
    let mut report = Vec::new();
    for case in NF4_CASES {
        let m = load(&format!("nf4/{case}.safetensors"));
        let input = m.require("input").unwrap();
        let ours = Nf4Tensor::from_tensor(
            input,
            Nf4Options {
                double_quant: false,
                ..Default::default()
            },
        )
        .unwrap();
        let codes = vec_u8(m.require("codes").unwrap());
        let d = diff_positions(ours.codes(), &codes);
        assert!(
            d.is_empty(),
            "{case}: NF4 code bytes differ from bitsandbytes at {d:?}"
        );
        let Absmax::Plain(absmax) = ours.absmax() else {
            unreachable!()
        };
        let raw = vec_f32(m.require("absmax_raw").unwrap());
        assert_eq!(bits(absmax), bits(&raw), "{case}: absmax");
        report.push(format!("{case}: {} codes equal", ours.elem_count()));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn double_quantization_equals_bitsandbytes() {
    for case in NF4_CASES {
        let m = load(&format!("nf4/{case}.safetensors"));
        let raw = vec_f32(m.require("absmax_raw").unwrap());
        let offset = vec_f32(m.require("offset").unwrap())[0];
        // Everything after the mean is deterministic: given bitsandbytes' offset, the 8-bit
        // indices and nested absmax must be identical.
        let n = NestedAbsmax::quantize_with_offset(&raw, offset);
        let q = vec_u8(m.require("absmax_q").unwrap());
        let d = diff_positions(&n.q, &q);
        assert!(d.is_empty(), "{case}: 8-bit absmax indices differ at {d:?}");
        assert_eq!(
            bits(&n.absmax),
            bits(&vec_f32(m.require("nested_absmax").unwrap())),
            "{case}: nested_absmax"
        );
        assert_eq!(
            bits(&n.code),
            bits(&vec_f32(m.require("nested_code").unwrap())),
            "{case}: dynamic map"
        );
        assert_eq!(
            bits(&nf4::NF4_CODE),
            bits(&vec_f32(m.require("code").unwrap())),
            "{case}: NF4 table"
        );
        // Our own mean (f64-accumulated) against torch's CUDA mean.
        let ours = nf4::mean_f32(&raw);
        let ulps = (ours.to_bits() as i64 - offset.to_bits() as i64).abs();
        assert!(
            ulps <= 4,
            "{case}: offset {ours} vs bitsandbytes {offset} ({ulps} ulps)"
        );
        let mine = NestedAbsmax::quantize(&raw);
        let mismatched = mine.q.iter().zip(&q).filter(|(a, b)| a != b).count();
        eprintln!(
            "{case}: offset differs by {ulps} ulp(s); {mismatched} of {} absmax indices differ with our own offset",
            q.len()
        );
    }
}

#[test]
fn dequantized_values_equal_bitsandbytes() {
    for case in NF4_CASES {
        let m = load(&format!("nf4/{case}.safetensors"));
        let input = m.require("input").unwrap();
        let offset = vec_f32(m.require("offset").unwrap())[0];
        let nested = NestedAbsmax {
            q: vec_u8(m.require("absmax_q").unwrap()),
            code: vec_f32(m.require("nested_code").unwrap()),
            absmax: vec_f32(m.require("nested_absmax").unwrap()),
            offset,
            blocksize: 256,
        };
        assert_eq!(
            bits(&nested.dequantize()),
            bits(&vec_f32(m.require("absmax_deq").unwrap())),
            "{case}: dequantized absmax"
        );
        let t = Nf4Tensor::from_parts(
            input.dims().to_vec(),
            input.dtype(),
            64,
            vec_u8(m.require("codes").unwrap()),
            Absmax::Nested(nested),
        )
        .unwrap();
        let ours = t.dequantize(input.dtype()).unwrap();
        let theirs = m.require("dequant").unwrap();
        assert_eq!(ours.dtype(), theirs.dtype());
        assert_eq!(
            bits(&vec_f32(&ours)),
            bits(&vec_f32(theirs)),
            "{case}: dequantized weight"
        );
        if let Some(flat) = m.get("dequant_no_dq") {
            let plain = Nf4Tensor::from_parts(
                input.dims().to_vec(),
                input.dtype(),
                64,
                vec_u8(m.require("codes_no_dq").unwrap()),
                Absmax::Plain(vec_f32(m.require("absmax_raw").unwrap())),
            )
            .unwrap();
            assert_eq!(
                bits(&vec_f32(&plain.dequantize(input.dtype()).unwrap())),
                bits(&vec_f32(flat)),
                "{case}: no double quant"
            );
        }
        // The GPU path (tensor ops) gives the same bits.
        let w = Nf4Weight::new(t, input.dtype(), &Device::Cpu).unwrap();
        assert_eq!(
            bits(&vec_f32(
                &w.dequantize_with_tensor_ops(input.dtype(), &Device::Cpu)
                    .unwrap()
            )),
            bits(&vec_f32(theirs)),
            "{case}: tensor-op path"
        );
    }
}

#[test]
fn blockwise_8bit_equals_bitsandbytes() {
    let m = load("blockwise8.safetensors");
    let code = vec_f32(m.require("code").unwrap());
    assert_eq!(
        bits(&nf4::dynamic_map_signed()),
        bits(&code),
        "create_dynamic_map(signed=True)"
    );
    let input = vec_f32(m.require("input").unwrap());
    let map: [f32; 256] = code.try_into().unwrap();
    let (q, absmax) = nf4::quantize_blockwise_8bit(&input, &map, 256);
    let theirs = vec_u8(m.require("codes").unwrap());
    let d = diff_positions(&q, &theirs);
    assert!(
        d.is_empty(),
        "8-bit indices differ at {d:?}: ours {:?} theirs {:?}",
        d.iter().map(|&i| q[i]).collect::<Vec<_>>(),
        d.iter().map(|&i| theirs[i]).collect::<Vec<_>>()
    );
    assert_eq!(bits(&absmax), bits(&vec_f32(m.require("absmax").unwrap())));
}

#[test]
fn linear4bit_state_dict_reads_and_writes_byte_for_byte() {
    let m = load("linear4bit/model.safetensors");
    let layer = MapLayer {
        map: &m,
        prefix: "",
    };
    assert_eq!(bnb::detect(&layer), Some("nf4"));
    let t = bnb::read_nf4(&layer).unwrap();
    assert_eq!(t.shape(), &[96, 128]);
    assert_eq!(t.dtype(), DType::BF16);
    // Written back: every tensor equal in name, dtype, shape and bytes, the JSON included.
    let ours = bnb::nf4_tensors("", &t).unwrap();
    let names: Vec<&String> = ours.iter().map(|(k, _)| k).collect();
    let theirs: Vec<&String> = m.names().filter(|n| *n != "bias").collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, theirs);
    for (name, ours) in &ours {
        let theirs = m.require(name).unwrap();
        assert_eq!(
            (ours.dtype(), ours.dims()),
            (theirs.dtype(), theirs.dims()),
            "{name}"
        );
        let (a, b) = (ours.flatten_all().unwrap(), theirs.flatten_all().unwrap());
        let same = match ours.dtype() {
            DType::U8 => a.to_vec1::<u8>().unwrap() == b.to_vec1::<u8>().unwrap(),
            _ => bits(&a.to_vec1::<f32>().unwrap()) == bits(&b.to_vec1::<f32>().unwrap()),
        };
        if name.contains("quant_state") {
            let s = |t: &Tensor| String::from_utf8(t.to_vec1::<u8>().unwrap()).unwrap();
            assert_eq!(s(&a), s(&b), "quant_state JSON");
        }
        assert!(same, "{name} differs");
    }
    // Quantizing the dense weight ourselves gives the same codes and scales.
    let dense = load("linear4bit/dense.safetensors");
    let w = dense.require("weight").unwrap();
    let mine = Nf4Tensor::from_tensor(w, Nf4Options::default()).unwrap();
    assert_eq!(mine.codes(), t.codes());
    let (Absmax::Nested(a), Absmax::Nested(b)) = (mine.absmax(), t.absmax()) else {
        panic!("nested")
    };
    assert_eq!(bits(&a.absmax), bits(&b.absmax));
    assert_eq!(a.q, b.q);
    // And the layer computes what bnb.nn.Linear4bit computed (bf16 matmuls differ in order).
    let lin = Nf4Weight::new(t, DType::BF16, &Device::Cpu).unwrap();
    let x = dense.require("x").unwrap();
    let y = lin
        .forward(x)
        .unwrap()
        .broadcast_add(dense.require("bias").unwrap())
        .unwrap();
    let y_bnb = dense.require("y").unwrap();
    let (ours, theirs) = (vec_f32(&y), vec_f32(y_bnb));
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(&theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 0.02 * scale,
        "forward: max error {err} against max |y| {scale}"
    );
}

fn assert_close(ours: &Tensor, theirs: &Tensor, tol: f32, what: &str) {
    assert_eq!(ours.dims(), theirs.dims(), "{what}");
    let (a, b) = (vec_f32(ours), vec_f32(theirs));
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err <= tol, "{what}: max error {err}");
}

#[test]
fn peft_adapter_loads_and_merges_like_peft() {
    let ad = peft::load_adapter(&dir().join("falcon_tiny_lora")).unwrap();
    assert_eq!((ad.lora.r, ad.lora.lora_alpha), (4, 8.0));
    let modules = ad.modules().unwrap();
    assert_eq!(modules.len(), 2 * 4, "4 linear kinds in 2 layers");
    assert!(
        modules
            .iter()
            .any(|m| m.0 == "transformer.h.0.self_attention.query_key_value")
    );
    let out = tempfile::tempdir().unwrap();
    let report = merge::merge_model_dir(
        &dir().join("falcon_tiny"),
        &dir().join("falcon_tiny_lora"),
        out.path(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(report.merged_modules.len(), 8);
    let ours = TensorMap::read_model_dir(out.path()).unwrap();
    let peft_merged = TensorMap::read_model_dir(&dir().join("falcon_tiny_merged")).unwrap();
    for (name, t) in peft_merged.iter() {
        assert_close(ours.require(name).unwrap(), t, 1e-5, name);
    }
    assert_eq!(ours.len(), peft_merged.len());
}

#[test]
fn our_adapter_files_have_peft_names_and_fields() {
    use adapterlab_model::nn::linear::LinearBuilder;
    let src = dir().join("falcon_tiny_lora");
    let ad = peft::load_adapter(&src).unwrap();
    let theirs_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    let reg = ad.into_registry().unwrap();
    // Place the adapter on layers of the right shapes, as a model would.
    let base = TensorMap::read_model_dir(&dir().join("falcon_tiny")).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(
        base.clone().into_inner().into_iter().collect(),
        DType::F32,
        &Device::Cpu,
    );
    let b = LinearBuilder::dense().with_lora_registry(reg);
    for i in 0..2 {
        for (m, i_dim, o_dim) in [
            ("self_attention.query_key_value", 64, 96),
            ("self_attention.dense", 64, 64),
            ("mlp.dense_h_to_4h", 64, 256),
            ("mlp.dense_4h_to_h", 256, 64),
        ] {
            b.load(vb.pp(format!("transformer.h.{i}.{m}")), i_dim, o_dim, false)
                .unwrap();
        }
    }
    b.lora().unwrap().finish().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (cfg, file) =
        peft::save_adapter(out.path(), b.lora().unwrap(), &Default::default()).unwrap();
    let ours = TensorMap::read_file(&file).unwrap();
    let theirs = load("falcon_tiny_lora/adapter_model.safetensors");
    assert_eq!(
        ours.names().collect::<Vec<_>>(),
        theirs.names().collect::<Vec<_>>()
    );
    for (name, t) in theirs.iter() {
        assert_close(ours.require(name).unwrap(), t, 0.0, name);
    }
    let ours_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg).unwrap()).unwrap();
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    // peft_version is PEFT's own stamp; we do not claim one.
    let missing: Vec<String> = keys(&theirs_cfg)
        .into_iter()
        .filter(|k| ours_cfg.get(k).is_none() && k != "peft_version")
        .collect();
    assert!(
        missing.is_empty(),
        "fields PEFT writes that we do not: {missing:?}"
    );
    for k in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "bias",
        "fan_in_fan_out",
        "use_rslora",
    ] {
        assert_eq!(ours_cfg[k], theirs_cfg[k], "{k}");
    }
}

#[test]
fn hf_bnb_checkpoints_read_and_match_our_quantization() {
    for (qdir, ddir) in [
        ("llama_tiny_bnb4", "llama_tiny"),
        ("falcon_tiny_bnb4", "falcon_tiny"),
    ] {
        let q = TensorMap::read_model_dir(&dir().join(qdir)).unwrap();
        let dense = TensorMap::read_model_dir(&dir().join(ddir)).unwrap();
        let layers: Vec<String> = q
            .names()
            .filter_map(|n| {
                n.strip_suffix(".weight.quant_state.bitsandbytes__nf4")
                    .map(String::from)
            })
            .collect();
        assert!(!layers.is_empty(), "{qdir}: no NF4 layers");
        for layer in &layers {
            let t = bnb::read_nf4(&MapLayer {
                map: &q,
                prefix: layer,
            })
            .unwrap();
            // transformers loaded the f32 checkpoint as bf16, then quantized.
            let w = dense
                .require(&format!("{layer}.weight"))
                .unwrap()
                .to_dtype(t.dtype())
                .unwrap();
            let mine = Nf4Tensor::from_tensor(&w, Nf4Options::default()).unwrap();
            assert_eq!(mine.codes(), t.codes(), "{qdir}: {layer} codes");
            assert_eq!(bits(&mine.absmax_f32()).len(), bits(&t.absmax_f32()).len());
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir().join(qdir).join("config.json")).unwrap(),
        )
        .unwrap();
        let ours = bnb::quantization_config(DType::BF16, true, None);
        for (k, v) in ours.as_object().unwrap() {
            assert_eq!(
                cfg["quantization_config"].get(k),
                Some(v),
                "{qdir}: quantization_config.{k}"
            );
        }
    }
}

/// Our writers against the files HF wrote from the same inputs: byte for byte.
#[test]
fn our_files_are_byte_identical_to_hf_and_peft() {
    use adapterlab_model::nn::linear::LinearBuilder;
    use adapterlab_model::quant::quantize::{self, QuantizeOptions};
    let out = tempfile::tempdir().unwrap();
    let same = |a: &Path, b: &Path| std::fs::read(a).unwrap() == std::fs::read(b).unwrap();
    for model in ["llama_tiny", "falcon_tiny"] {
        // transformers loaded the f32 checkpoint with dtype=bfloat16, then quantized.
        let dst = out.path().join(format!("{model}_bnb4"));
        let opts = QuantizeOptions {
            cast: Some(DType::BF16),
            ..Default::default()
        };
        quantize::quantize_model_dir(&dir().join(model), &dst, &opts).unwrap();
        let theirs = dir().join(format!("{model}_bnb4"));
        assert!(
            same(
                &dst.join("model.safetensors"),
                &theirs.join("model.safetensors")
            ),
            "{model}: NF4 checkpoint bytes"
        );
        let read = |p: &Path| {
            serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(p.join("config.json")).unwrap(),
            )
            .unwrap()
        };
        if model == "llama_tiny" {
            // Written by transformers' save_pretrained: ours must say the same.
            assert_eq!(read(&dst), read(&theirs), "{model}: config.json");
        } else {
            // The Falcon one was written by the fixture script by hand (transformers 5.17 does not
            // quantize Falcon); only its quantization_config is transformers' own.
            assert_eq!(
                read(&dst)["quantization_config"],
                read(&theirs)["quantization_config"]
            );
        }

        // The PEFT adapter, read and written back through layers of the model's shapes.
        let src = dir().join(format!("{model}_lora"));
        let builder = LinearBuilder::dense()
            .with_lora_registry(peft::load_adapter(&src).unwrap().into_registry().unwrap());
        let base = TensorMap::read_model_dir(&dir().join(model)).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(
            base.clone().into_inner().into_iter().collect(),
            DType::F32,
            &Device::Cpu,
        );
        for (name, t) in base.iter() {
            if let (Some(module), 2) = (name.strip_suffix(".weight"), t.rank()) {
                let (o, i) = t.dims2().unwrap();
                builder.load(vb.pp(module), i, o, false).unwrap();
            }
        }
        let reg = builder.lora().unwrap();
        reg.finish().unwrap();
        let (_, file) = peft::save_adapter(
            &out.path().join(format!("{model}_lora")),
            reg,
            &Default::default(),
        )
        .unwrap();
        assert!(
            same(&file, &src.join("adapter_model.safetensors")),
            "{model}: adapter bytes"
        );
    }
    let merged = out.path().join("falcon_merged");
    merge::merge_model_dir(
        &dir().join("falcon_tiny"),
        &dir().join("falcon_tiny_lora"),
        &merged,
        &Default::default(),
    )
    .unwrap();
    assert!(
        same(
            &merged.join("model.safetensors"),
            &dir().join("falcon_tiny_merged/model.safetensors")
        ),
        "merged bytes"
    );
}
