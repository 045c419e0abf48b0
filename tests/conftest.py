"""Shared fixtures: tiny random Qwen2 models with a real (tiny) tokenizer, saved like hub checkpoints."""
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dash  # noqa: E402


def pytest_collection_modifyitems(items):
    """GPU tests of RWKV-7 last: on a fresh machine fla builds and autotunes its RWKV-7 kernels on first use (no
    shipped configs; over 5 minutes on an H100), and a time limit should cut those, not the tests after them."""
    items.sort(key=lambda item: "rwkv7" in item.nodeid and item.get_closest_marker("gpu") is not None)


def stdlib_text(n_files: int = 6) -> str:
    """Offline text that exists on every machine: some of Python's own standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((root / f).read_text() for f in ["argparse.py", "textwrap.py", "json/decoder.py",
                                                     "string.py", "shlex.py", "fnmatch.py"][:n_files])


def make_tokenizer(vocab: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([stdlib_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model_dir(path: Path, seed: int = 0, layers: int = 4) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # bigger attention logits than the default init, so that operators differ clearly
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory) -> Path:
    """Same shape as tiny_dir, other weights: a cache made for one must be refused for the other."""
    return make_model_dir(tmp_path_factory.mktemp("other"), seed=1)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(stdlib_text())
    return path


@pytest.fixture
def tiny(tiny_dir):
    """A fresh (model, tokenizer) of the tiny checkpoint, float32 on CPU."""
    return dash.load_model(str(tiny_dir))


def tiny_cfg(tiny_dir, text_file, **kw) -> dash.Config:
    base = dict(model=str(tiny_dir), k=1, tokens=512, seq_len=64, batch_size=2, lr=0.1, window=8,
                data=str(text_file), kernels="torch", device="cpu", prep_tokens=256, check_samples=0,
                skip_below=0.0, log_every=1000)
    base.update(kw)
    return dash.Config(**base)


def prepared_state(tiny_dir, text_file, path, names=("full", "swa", "gla", "gdn"), **kw) -> dict:
    """Prepared candidate parameters for the tiny model (so that linear layers are not at their identity init)."""
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, cache=str(path), candidates=",".join(names), **kw), 4)
    model, tok = dash.load_model(str(tiny_dir))
    return dash.load_or_prepare(model, list(names), cfg, dash.load_data(tok, cfg, parts=("held_out", "prep")))[1]


def plain_kl_and_grad(model, ids, w):
    """The reference for dash.kl_and_grad: HF's own forward of teacher and mixture (operator probabilities w), a plain
    full-vocabulary KL(teacher || mixture) averaged over tokens, and its gradient w.r.t. w by autograd."""
    with torch.no_grad():
        dash.set_probs(model, None)
        log_p = model(ids, use_cache=False).logits.log_softmax(-1)
    w_ref = w.clone().requires_grad_()
    dash.set_probs(model, w_ref)
    log_q = model(ids, use_cache=False).logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    kl.backward()
    return kl.detach(), w_ref.grad


def rel(a, b) -> float:
    """Relative error of a against b (Frobenius norms)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_chunked_is_the_recurrence(chunked, recurrent, inputs, scale=0.3):
    """A chunked form against its token-by-token recurrence: the outputs o and final state S, and the gradients of
    every input (the last is the initial state) for random output gradients."""
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    ref = [t.detach().clone().requires_grad_() for t in inputs]
    o, S = chunked(*ins[:-1], scale, ins[-1])
    o_ref, S_ref = recurrent(*ref[:-1], scale, ref[-1])
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
    do, dS = torch.randn_like(o), torch.randn_like(S)
    ((o * do).sum() + (S * dS).sum()).backward()
    ((o_ref * do).sum() + (S_ref * dS).sum()).backward()
    for a, b in zip(ins, ref):
        assert rel(a.grad, b.grad) < 1e-4
