"""Hybrids generate with caches (KV for full attention, a window for swa, recurrent state for linear layers, the
tokens NAtS still keeps) exactly what they generate recomputing the whole prefix at every step, with left-padded batches."""
import pytest
import torch

import dash
from conftest import prepared_state


def greedy_recompute(model, ids, mask, n):
    """Greedy decoding without any cache: the whole (left-padded) prefix runs again at every step."""
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.fixture(scope="module")
def prepared(tiny_dir, text_file, tmp_path_factory):
    """Candidate weights for the tiny model, every registered operator (so that none is at its initial values)."""
    return prepared_state(tiny_dir, text_file, tmp_path_factory.mktemp("c") / "c.safetensors",
                          names=tuple(dash.CANDIDATES))


@pytest.mark.parametrize("layers", [["full"] * 4, ["swa"] * 4, ["gla"] * 4, ["gdn"] * 4, ["rwkv7"] * 4, ["nats"] * 4,
                                    ["gla", "full", "swa", "gdn"], ["swa", "gdn", "full", "gla"],
                                    ["nats", "rwkv7", "full", "nats"]])
def test_cached_generation_equals_recomputation(tiny_dir, prepared, layers):
    model, tok = dash.load_model(str(tiny_dir))
    dash.make_hybrid(model, layers, prepared, dash.Config(window=5, kernels="torch"))
    tok.padding_side = "left"
    batch = tok(["def parse(self, args):", "x = 1", "import os\nimport sys\nprint"], return_tensors="pt",
                padding=True)
    assert (batch.attention_mask == 0).any()  # really padded
    n = 12  # past the window of 5: the sliding window and the linear states are exercised
    ref = greedy_recompute(model, batch.input_ids, batch.attention_mask, n)
    out = model.generate(**batch, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    assert torch.equal(out, ref), (layers, out, ref)
    # and each row equals that prompt decoded alone, without padding
    for i in range(3):
        alone = tok(tok.decode(batch.input_ids[i][batch.attention_mask[i] == 1]), return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=n, do_sample=False, min_new_tokens=n)
        assert torch.equal(single[0, -n:], out[i, -n:]), (layers, i)


def test_hybrid_cache_keeps_a_window_and_a_state(tiny_dir, prepared):
    """What a hybrid saves: swa layers keep at most `window` keys, linear layers a fixed-size state."""
    model, tok = dash.load_model(str(tiny_dir))
    dash.make_hybrid(model, ["full", "swa", "gla", "gdn"], prepared, dash.Config(window=5, kernels="torch"))
    from transformers import DynamicCache
    ids = tok("def parse(self, args): return args.strip()", return_tensors="pt").input_ids
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    full, swa, gla, gdn = cache.layers
    assert full.keys.shape[-2] == ids.shape[1]
    assert swa.keys.shape[-2] == 5 - 1  # the window, less the token that comes next
    assert gla.state.shape == gdn.state.shape == (1, 4, 16, 16) and gla.keys is None
    assert cache.get_seq_length() == ids.shape[1]


def test_generation_check_stops_a_hybrid_whose_cache_is_broken(tiny_dir, prepared, monkeypatch):
    """make_hybrid() checks cached generation against recomputation; a slot that forgets what it kept (as HF's
    sliding-window slot, seen through transformers 5.24's renamed argument, did) is stopped with the version to
    install, not scored."""
    model, _ = dash.load_model(str(tiny_dir))
    layers = ["gla", "full", "swa", "gdn"]
    dash.make_hybrid(model, layers, prepared, dash.Config(window=5, kernels="torch"))  # a sound one passes

    append = dash.KVSlot.append

    def forgetful(self, k, v):  # a window that keeps nothing: every step sees only its own tokens, silently
        if self.keep is not None:
            self.keys = self.values = None
        return append(self, k, v)
    monkeypatch.setattr(dash.KVSlot, "append", forgetful)
    import transformers
    with pytest.raises(dash.DashError, match=f"relative error.*transformers {transformers.__version__}.*"
                                             f"pip install 'transformers>="):
        dash.make_hybrid(model, layers, prepared, dash.Config(window=5, kernels="torch"))
    monkeypatch.setattr(dash.KVSlot, "append", lambda self, k, v: (k, v))  # ... or one that fails loudly inside HF
    with pytest.raises(dash.DashError, match="RuntimeError.*pip install"):
        dash.make_hybrid(model, layers, prepared, dash.Config(window=5, kernels="torch"))
