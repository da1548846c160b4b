"""The tiny DeepSeek-V3 checkpoint: config and deterministic random weights."""

import math

import numpy as np
import torch

from quant import log_uniform, quantize_weight

MODEL_SEED = 20250801
TOKENS_SEED = 4242
N_TOKENS = 53

QUANT_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def make_config(transformers_version):
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 256,
        "initializer_range": 0.02,
        "intermediate_size": 384,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 128,
        "moe_layer_freq": 1,
        "n_group": 4,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "q_lora_rank": 256,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": dict(QUANT_CONFIG),
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": transformers_version,
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 1024,
    }


# Output-RMS gain of each linear for unit-RMS inputs (weight std = gain/sqrt(in)).
GAINS = {
    "q_a_proj": 1.0, "q_b_proj": 1.0, "kv_a_proj_with_mqa": 1.0, "kv_b_proj": 1.0,
    "o_proj": 1.0, "gate_proj": 1.0, "up_proj": 1.0, "down_proj": 1.0,
}
SCALE_SPREAD = 16.0  # weight_scale_inv multipliers are log-uniform in [1, 16]
ROUTER_GAIN = 2.0
BIAS_STD = 0.1
LM_HEAD_GAIN = 2.0
NORM_W_STD = 0.1


def _bf16(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(torch.bfloat16)


def _fp8_linear(ck, rng, name, out_f, in_f, kind):
    w = rng.standard_normal((out_f, in_f)) * (GAINS[kind] / math.sqrt(in_f))
    mult = log_uniform(rng, 1.0, SCALE_SPREAD, (-(-out_f // 128), -(-in_f // 128)))
    q, s = quantize_weight(w, mult)
    ck[name + ".weight"] = q
    ck[name + ".weight_scale_inv"] = s


def _norm(ck, rng, name, n):
    ck[name + ".weight"] = _bf16(1.0 + NORM_W_STD * rng.standard_normal(n))


def _mlp(ck, rng, prefix, inter, D):
    _fp8_linear(ck, rng, prefix + ".gate_proj", inter, D, "gate_proj")
    _fp8_linear(ck, rng, prefix + ".up_proj", inter, D, "up_proj")
    _fp8_linear(ck, rng, prefix + ".down_proj", D, inter, "down_proj")


def is_moe_layer(cfg, L):
    return L >= cfg["first_k_dense_replace"]


def decoder_layer(ck, rng, cfg, L):
    """The weights of decoder layer L (attention + dense MLP or MoE), drawn from rng in a fixed order."""
    D = cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    E = cfg["n_routed_experts"]
    I_moe = cfg["moe_intermediate_size"]
    p = f"model.layers.{L}"
    _norm(ck, rng, p + ".input_layernorm", D)
    _norm(ck, rng, p + ".post_attention_layernorm", D)
    a = p + ".self_attn"
    _fp8_linear(ck, rng, a + ".q_a_proj", qr, D, "q_a_proj")
    _norm(ck, rng, a + ".q_a_layernorm", qr)
    _fp8_linear(ck, rng, a + ".q_b_proj", H * (dn + dr), qr, "q_b_proj")
    _fp8_linear(ck, rng, a + ".kv_a_proj_with_mqa", kvr + dr, D, "kv_a_proj_with_mqa")
    _norm(ck, rng, a + ".kv_a_layernorm", kvr)
    _fp8_linear(ck, rng, a + ".kv_b_proj", H * (dn + dv), kvr, "kv_b_proj")
    _fp8_linear(ck, rng, a + ".o_proj", D, H * dv, "o_proj")
    if not is_moe_layer(cfg, L):
        _mlp(ck, rng, p + ".mlp", cfg["intermediate_size"], D)
    else:
        m = p + ".mlp"
        ck[m + ".gate.weight"] = _bf16(rng.standard_normal((E, D)) * (ROUTER_GAIN / math.sqrt(D)))
        ck[m + ".gate.e_score_correction_bias"] = torch.from_numpy(
            (BIAS_STD * rng.standard_normal(E)).astype(np.float32))
        for e in range(E):
            _mlp(ck, rng, f"{m}.experts.{e}", I_moe, D)
        _mlp(ck, rng, m + ".shared_experts", I_moe * cfg["n_shared_experts"], D)


def make_checkpoint(cfg):
    """Returns {hf_name: tensor} in checkpoint dtypes (e4m3 / f32 scales / bf16 / f32 bias)."""
    rng = np.random.default_rng(MODEL_SEED)
    D = cfg["hidden_size"]
    ck = {}

    def bf16(a):
        return _bf16(a)

    def norm(name, n):
        _norm(ck, rng, name, n)

    ck["model.embed_tokens.weight"] = bf16(rng.standard_normal((cfg["vocab_size"], D)))
    for L in range(cfg["num_hidden_layers"]):
        decoder_layer(ck, rng, cfg, L)
    norm("model.norm", D)
    ck["lm_head.weight"] = bf16(rng.standard_normal((cfg["vocab_size"], D)) * (LM_HEAD_GAIN / math.sqrt(D)))
    return ck


def hf_f32_state_dict(ck):
    """Dequantized float32 weights under the same (HF) names, scales dropped."""
    from quant import dequant_f32
    out = {}
    for k, v in ck.items():
        if k.endswith(".weight_scale_inv"):
            continue
        s = ck.get(k + "_scale_inv")
        out[k] = dequant_f32(v, s) if s is not None else v.to(torch.float32)
    return out


# --------------------------------------------------------------------------- MTP
MTP_SEED_BASE = 20250901   # the MTP layer's weights: the seed of MTP_SEEDS from here with the clearest routing
MTP_SEEDS = 12
EH_PROJ_GAIN = 1.0


def make_mtp_config(cfg):
    """The MTP checkpoint's config: the V3 config with one next-n prediction layer."""
    c = dict(cfg)
    c["num_nextn_predict_layers"] = 1
    return c


def make_mtp_checkpoint(cfg, lm_head, seed):
    """The multi-token-prediction layer of DeepSeek-V3 (layer index num_hidden_layers).

    As in the released V3 checkpoint: enorm, hnorm (bf16), eh_proj [D, 2D] (bf16: engines load it
    unquantized), one full decoder layer (MoE, FP8), shared_head.norm (bf16) and shared_head.head
    (bf16, a copy of lm_head, as in the released checkpoint).  The embedding is shared with the main
    model and not repeated here."""
    rng = np.random.default_rng(seed)
    D = cfg["hidden_size"]
    L = cfg["num_hidden_layers"]
    p = f"model.layers.{L}"
    ck = {}
    _norm(ck, rng, p + ".enorm", D)
    _norm(ck, rng, p + ".hnorm", D)
    ck[p + ".eh_proj.weight"] = _bf16(rng.standard_normal((D, 2 * D)) * (EH_PROJ_GAIN / math.sqrt(2 * D)))
    decoder_layer(ck, rng, cfg, L)
    _norm(ck, rng, p + ".shared_head.norm", D)
    ck[p + ".shared_head.head.weight"] = lm_head.clone()
    return ck


# --------------------------------------------------------------------------- DeepSeek-V3.2
V32_SEED = 20251001
V32_INDEX = {"index_n_heads": 16, "index_head_dim": 128, "index_topk": 16}
WEIGHTS_PROJ_GAIN = 1.0


def make_v32_config(cfg):
    """The tiny V3.2 config: the V3 config plus the indexer; index_topk (16) is well below the
    prompt length, so the sparse selection matters for most positions."""
    c = dict(cfg)
    c.update(V32_INDEX)
    c["architectures"] = ["DeepseekV32ForCausalLM"]
    c["model_type"] = "deepseek_v32"
    return c


def make_v32_indexer(cfg):
    """The indexer weights of every layer (HF names under self_attn.indexer): wq_b and wk FP8 with
    128x128 scales, k_norm (LayerNorm weight and bias) and weights_proj bf16."""
    rng = np.random.default_rng(V32_SEED)
    D = cfg["hidden_size"]
    n, d = cfg["index_n_heads"], cfg["index_head_dim"]
    ck = {}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}.self_attn.indexer"
        _fp8_linear(ck, rng, p + ".wq_b", n * d, cfg["q_lora_rank"], "q_b_proj")
        _fp8_linear(ck, rng, p + ".wk", d, D, "q_a_proj")
        _norm(ck, rng, p + ".k_norm", d)
        ck[p + ".k_norm.bias"] = _bf16(NORM_W_STD * rng.standard_normal(d))
        ck[p + ".weights_proj.weight"] = _bf16(rng.standard_normal((n, D)) * (WEIGHTS_PROJ_GAIN / math.sqrt(D)))
    return ck
