"""The evaluation's selectors and published placements (tasks and metrics: test_ruler_tasks.py)."""
import pytest
import torch

import dash
import eval_ruler as er


def test_uniform_is_hybrid_distillations_uniform():
    for K, layers in er.HYBRID_DISTILLATION["uniform"].items():
        assert er.uniform(36, K) == layers
    assert er.uniform(8, 2) == [0, 4] and er.uniform(8, 5) == [0, 1, 3, 4, 6]


def test_published_placements_are_well_formed():
    for sel, by_k in er.HYBRID_DISTILLATION.items():
        assert set(by_k) == {5, 9, 12, 18}, sel
        for K, layers in by_k.items():
            assert len(set(layers)) == K and layers == sorted(layers) and 0 <= layers[0] and layers[-1] < 36
    for sel in ("kl_guided", "ar", "mse", "ppl", "ar_multihop"):  # rankings: each K is a prefix of the next
        ks = sorted(er.HYBRID_DISTILLATION[sel])
        assert all(set(er.HYBRID_DISTILLATION[sel][a]) < set(er.HYBRID_DISTILLATION[sel][b]) for a, b in zip(ks, ks[1:]))
    assert not set(er.JET_NEMOTRON["full"]) & set(er.JET_NEMOTRON["swa"])


def test_top_and_fill():
    assert er.top([0.1, 0.9, 0.5, 0.7], 2) == [1, 3]
    arch = {"candidates": ["full", "swa", "gdn"], "layers": ["gdn", "full", "gdn"]}
    report = {"layers": [{"swa": {"after": 0.2}, "gdn": {"after": 0.1}}, {"swa": {"after": 0.1}, "gdn": {"after": 0.5}},
                         {"swa": {"after": 0.3}, "gdn": {"after": 0.4}}]}
    assert er.fill_layers(arch, report, "best") == ["gdn", "swa", "swa"]
    assert er.fill_layers(arch, None, "best") == ["gdn"] * 3
    assert er.fill_layers(arch, report, "swa") == ["swa"] * 3


@pytest.fixture(scope="module")
def small():
    return dash.load_model(str(dash.SMALL_MODEL))


def test_needle_positions_point_at_the_needle(small):
    model, tok = small
    s = er.make_samples("niah_single_1", tok, 512, 1, seed=3)[0]
    ids, pos, needle = er.answer_positions(tok, s)
    assert tok.decode(ids[0, needle]).strip(" .") == s["outputs"][0]
    assert tok.decode(ids[0, pos + 1]).strip().startswith(s["outputs"][0])  # the positions that write the answer


def test_probe_selectors_score_every_layer(small):
    model, tok = small
    probes = er.make_samples("niah_multikey_2", tok, 512, 2, seed=4)
    drops = er.recall_importance(model, tok, probes)
    scores = er.retrieval_scores(model, tok, probes)
    assert len(drops) == len(scores) == 8
    assert all(0 <= s <= 1 for s in scores) and max(scores) > 0.2  # some head of the trained model finds the needle
    assert max(drops) > 1.0  # zeroing some layer's attention loses the recalled value
    assert all(type(l.self_attn).__name__ == "Qwen2Attention" for l in model.model.layers)  # hooks removed
