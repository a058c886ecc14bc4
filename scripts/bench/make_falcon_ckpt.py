"""A random Falcon-7B-shaped checkpoint (real widths: hidden 4544, 71 query heads sharing one
key/value head, MLP 18176, vocabulary 65024) with few layers, written with numpy alone (f16
safetensors, HF tensor names, config.json as transformers writes Falcon-7B's), for CPU
benchmarks on a machine without torch. Weights are N(0, 0.02), layer norms 1 and 0.

    python make_falcon_ckpt.py OUT_DIR [LAYERS]     # needs numpy and safetensors
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

out, layers = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
h, heads, head_dim, ffn, vocab = 4544, 71, 64, 18176, 65024
rng = np.random.default_rng(0)


def normal(*shape):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


tensors = {"transformer.word_embeddings.weight": normal(vocab, h)}
for i in range(layers):
    p = f"transformer.h.{i}."
    tensors[p + "input_layernorm.weight"] = np.ones(h, np.float16)
    tensors[p + "input_layernorm.bias"] = np.zeros(h, np.float16)
    tensors[p + "self_attention.query_key_value.weight"] = normal((heads + 2) * head_dim, h)
    tensors[p + "self_attention.dense.weight"] = normal(h, h)
    tensors[p + "mlp.dense_h_to_4h.weight"] = normal(ffn, h)
    tensors[p + "mlp.dense_4h_to_h.weight"] = normal(h, ffn)
tensors["transformer.ln_f.weight"] = np.ones(h, np.float16)
tensors["transformer.ln_f.bias"] = np.zeros(h, np.float16)
os.makedirs(out, exist_ok=True)
save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
config = {
    "architectures": ["FalconForCausalLM"], "model_type": "falcon", "vocab_size": vocab,
    "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
    "multi_query": True, "parallel_attn": True, "bias": False, "alibi": False,
    "new_decoder_architecture": False, "layer_norm_epsilon": 1e-5, "bos_token_id": 11,
    "eos_token_id": 11, "torch_dtype": "float16", "tie_word_embeddings": True,
    "hidden_dropout": 0.0, "attention_dropout": 0.0, "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
}
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
print(json.dumps({"what": "make_ckpt", "dir": out, "layers": layers,
                  "params": int(sum(t.size for t in tensors.values()))}))
