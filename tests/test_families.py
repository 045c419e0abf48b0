"""Model families (issue 18): one tiny random config per family, built here from its config class, saved like a hub
checkpoint with the tests' tiny tokenizer. For each: the search runs end to end from the CLI; a hybrid with every
operator kind generates with its caches what it computes without (left padding included); the search's step equals
HF's forward plus a plain KL. And the families dash cannot take apart are refused, each naming what is missing."""
import json

import pytest
import torch
import transformers

import dash
from conftest import make_tokenizer, plain_kl_and_grad

# Small enough for seconds on a CPU; windows (8) shorter than the sequences (64), so that they matter.
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
FAMILIES = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "llama": ("LlamaConfig", dict()),
    "mistral": ("MistralConfig", dict(sliding_window=8)),                      # a window in every layer
    "qwen3": ("Qwen3Config", dict(head_dim=16, layer_types=["full_attention", "sliding_attention"] * 2,
                                  use_sliding_window=True, sliding_window=8)),  # per-head q/k norms; windows per layer
    "olmo2": ("Olmo2Config", dict()),                                          # q/k norms over the whole projection
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                        layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                        rope_local_base_freq=10_000.0)),       # (1 + w) norms, 2 RoPEs, embed scale
}
ALL_OPS = ["full", "swa", "gla", "gdn", "rwkv7", "nats"]


def family_dir(tmp_path_factory, family: str):
    cls, extra = FAMILIES[family]
    tok = make_tokenizer()
    config = getattr(transformers, cls)(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, **BASE, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # bigger attention logits than the default init, so that operators differ clearly
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return request.param, family_dir(tmp_path_factory, request.param)


def test_the_search_runs_end_to_end_and_its_hybrids_generate_as_they_compute(family, text_file, tmp_path):
    """The CLI from candidates to an exported architecture; then hybrids that use every operator kind, each checked
    by make_hybrid's guard (cached generation with left padding against recomputation, fp32: 1e-3), and the same
    comparison here by hand for one of them (so that this test fails even if the guard were switched off)."""
    name, path = family
    out, cache = tmp_path / "out", tmp_path / "cands.safetensors"
    dash.main(["--model", str(path), "--data", str(text_file), "--candidates", ",".join(ALL_OPS), "--tokens", "256",
               "--seq-len", "64", "--batch-size", "2", "--k", "1", "--window", "8", "--prep-tokens", "256",
               "--held-out", "1", "--polish", "1", "--cache", str(cache), "--out", str(out), "--check-samples", "0",
               "--device", "cpu", "--kernels", "torch"])
    arch = json.loads((out / "arch.json").read_text())
    assert len(arch["layers"]) == 4 and arch["layers"].count("full") == 1
    model, tok = dash.build_hybrid(out / "arch.json")
    cfg = dash.arch_config(arch)
    state = dash.candidates_for(model, arch, cfg)
    for shift in range(2):  # every operator in some layer, twice over
        layers = [ALL_OPS[(l + 4 * shift) % len(ALL_OPS)] for l in range(4)]
        dash.make_hybrid(model, layers, state, cfg)  # raises if cached generation differs
    ids = torch.randint(3, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, 20:])], 1)
        ref = model(input_ids=out.sequences, attention_mask=full_mask,
                    position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0), use_cache=False).logits[:, 19:-1]
    assert torch.allclose(torch.stack(out.logits, 1), ref, atol=1e-4), name


def test_a_search_step_is_the_plain_kl_of_hf_forward(family, text_file):
    """kl_and_grad (the search's spelled-out pass, final_hidden, and the chunked KL) against HF's own forward of
    teacher and mixture and a plain full-vocabulary KL: the KL and its gradient w.r.t. the operator weights."""
    name, path = family
    model, _ = dash.load_model(str(path))
    names = ["full", "swa", "gla", "gdn"]
    cfg = dash.Config(model=str(path), window=8, kernels="torch", kl_chunk=16)
    ops = dash.make_ops(model, names, cfg)
    with torch.no_grad():  # operators off their identity start
        for layer_ops in ops:
            for op in layer_ops.values():
                for p in op.parameters():
                    p.add_(0.05 * torch.randn_like(p))
    dash.install(model, ops)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).softmax(-1)
    kl, dkl_dw = dash.kl_and_grad(model, ids, w, [[True] * 4] * 4, cfg)
    kl_ref, dkl_dw_ref = plain_kl_and_grad(model, ids, w)
    assert kl_ref > 1e-3, name  # the mixture is not the teacher: the comparison means something
    assert torch.allclose(kl, kl_ref, rtol=1e-4), (name, kl, kl_ref)
    assert torch.allclose(dkl_dw, dkl_dw_ref, rtol=1e-3, atol=1e-7), (name, (dkl_dw - dkl_dw_ref).abs().max())


def test_a_windowed_teacher_layer_keeps_its_window_as_full(family):
    """In a layer where the teacher attends to a window of its own, 'full' is that windowed attention, and costs
    what the window costs; elsewhere 'full' is full causal attention."""
    name, path = family
    model, _ = dash.load_model(str(path))
    cfg = dash.Config(window=8, kernels="torch")
    for attn in dash.teacher_attention(model):
        full = dash.FullAttention(attn, cfg)
        window = {"mistral": 8}.get(name, 8 if getattr(attn, "sliding_window", None) else None)
        assert full.window == window, (name, attn.layer_idx)
        assert full.cost(1024) == (1.0 if window is None else 8 / 512)


def refused(tmp_path, cls, match, **extra):
    tok = make_tokenizer()
    config = getattr(transformers, cls)(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **BASE, **extra)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match=match):
        dash.main(["--model", str(tmp_path), "--device", "cpu"])


def test_phi3_fused_projections_are_refused(tmp_path):
    refused(tmp_path, "Phi3Config", "fused q/k/v projection")


def test_latent_attention_is_refused(tmp_path):
    refused(tmp_path, "DeepseekV3Config", "latent attention", q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            first_k_dense_replace=4)


def test_a_model_that_is_already_a_hybrid_is_refused(tmp_path):
    refused(tmp_path, "Qwen3NextConfig", "already a hybrid", head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


def test_logit_soft_capping_is_refused(tmp_path):
    refused(tmp_path, "Gemma3TextConfig", "final_logit_softcapping = 30.0; dash's operators and KL assume no "
            "soft-capping", head_dim=16, final_logit_softcapping=30.0)


def test_benchmark_shapes_have_the_published_parameter_counts():
    """tests/benchmark.py --shape builds random-weight models from these configs: each has the parameter count its
    model card publishes (Qwen2.5-3B 3.09B, Qwen3-4B 4.02B, Qwen2.5-7B 7.61B, Llama-3.1-8B 8.03B), within 0.5%."""
    import benchmark
    published = {"qwen2.5-3b": 3.09e9, "qwen3-4b": 4.02e9, "qwen2.5-7b": 7.61e9, "llama-3.1-8b": 8.03e9}
    for name, n in published.items():
        cls, kw = benchmark.SHAPES[name]
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw))
        count = sum(p.numel() for p in model.parameters())
        assert abs(count / n - 1) < 5e-3, (name, count)


def test_a_bf16_teacher_gives_its_operators_bf16_projections(family):
    """OLMo 2's rotary embedding gives fp32 cos and sin in a bf16 model: the rotated q and k must come back in the
    model's dtype, or the teacher's own sdpa refuses mixed dtypes (found on the H100)."""
    name, path = family
    model, _ = dash.load_model(str(path), dtype=torch.bfloat16)
    attn = dash.teacher_attention(model)[0]
    x = torch.randn(1, 12, 64, dtype=torch.bfloat16)
    rope = model.model.rotary_emb(x, torch.arange(12)[None], *(["sliding_attention"] if name == "gemma3" else []))
    p = dash.project(attn, x, rope)
    assert {t.dtype for t in (p.q, p.k, p.v, p.q_rope, p.k_rope)} == {torch.bfloat16}, name
    assert dash.FullAttention(attn, dash.Config(kernels="torch"))(p).dtype == torch.bfloat16
