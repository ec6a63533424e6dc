"""probes.features: pooling, feature names, the on-disk cache, non-finite features (untrained micro models)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from experiments.data import load_dataset
from probes import features
from probes.features import FeatureError, extract, feature_specs


@pytest.fixture(scope="module")
def ds():
    return load_dataset("hierarchy", "test", limit=32, seed=0, n=64)


@pytest.fixture(scope="module")
def steps():
    torch.manual_seed(0)
    return models.create_model("steps_deit_micro", num_classes=16).eval()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _counter(model):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_pools_and_derived_features(steps, ds):
    names = ["final", "slow_path", "fast_path", "merge.slow_in", "merge.fast_in", "merge.slow_out", "merge.fast_out",
             "stages.0.steps.1.y", "blocks.5.slow", "blocks.5.fast", "blocks.0", "logits"]
    out = extract(steps, ds, names, pool="mean", cache=False)
    widths = {n: a.shape[-1] for n, a in out.items()}
    assert widths == {"final": 128, "slow_path": 96, "fast_path": 32, "merge.slow_in": 96, "merge.fast_in": 32,
                      "merge.slow_out": 96, "merge.fast_out": 32, "stages.0.steps.1.y": 96, "blocks.5.slow": 64,
                      "blocks.5.fast": 32, "blocks.0": 64, "logits": 16}
    assert all(a.shape[0] == 32 and a.dtype == np.float32 for a in out.values())
    np.testing.assert_array_equal(out["final"][:, :96], out["slow_path"])
    cls = extract(steps, ds, ["final"], pool="cls", cache=False)["final"]
    tokens = extract(steps, ds, ["fast_path"], pool="tokens", cache=False)["fast_path"]
    assert cls.shape == (32, 128) and tokens.shape == (32, 49, 32)  # 7x7 patches, class token dropped
    np.testing.assert_allclose(tokens.mean(1), out["fast_path"], atol=1e-5)
    assert "blocks.0.slow" not in feature_specs(steps)  # a first-step block has nothing to split


def test_baseline_matched_splits(ds):
    base = models.create_model("resnet_micro", num_classes=16).eval()
    specs = feature_specs(base, model_name="resnet_micro", random_splits=2)
    slow, fast = specs["matched.random1.slow"].index, specs["matched.random1.fast"].index
    assert len(slow) == 176 and len(fast) == 80 and sorted(slow + fast) == list(range(256))  # steps_resnet_micro
    out = extract(base, ds, ["matched.contiguous.slow", "matched.contiguous.fast", "blocks.3.matched.fast"],
                  pool="tokens", cache=False, model_name="resnet_micro")
    assert out["matched.contiguous.slow"].shape == (32, 1, 176) and out["matched.contiguous.fast"].shape[-1] == 80
    with pytest.raises(FeatureError, match="baseline without slow/fast paths.*matched"):
        extract(base, ds, ["slow_path"], model_name="resnet_micro", cache=False)
    with pytest.raises(FeatureError, match="no class token"):
        extract(base, ds, ["final"], pool="cls", model_name="resnet_micro", cache=False)


def test_cache_hit_does_no_forward_pass(steps, ds, cache):
    calls, handle = _counter(steps)
    try:
        first = extract(steps, ds, ["slow_path", "fast_path"])
        assert calls and len(list(cache.glob("*.feat"))) == 1  # one site ("final") behind both features
        calls.clear()
        again = extract(steps, ds, ["fast_path", "final"])  # other features of the same site: still cached
        assert not calls
        np.testing.assert_array_equal(again["fast_path"], first["fast_path"])
    finally:
        handle.remove()


def test_truncated_cache_file_is_rebuilt(steps, ds, cache):
    ref = extract(steps, ds, ["final"])["final"].copy()
    (path,) = cache.glob("*.feat")
    path.write_bytes(path.read_bytes()[:-100])
    calls, handle = _counter(steps)
    try:
        got = extract(steps, ds, ["final"])["final"]
    finally:
        handle.remove()
    assert calls  # rebuilt, not read
    np.testing.assert_array_equal(got, ref)
    key = features._cache_key(features.model_hash(steps), ds.fingerprint, "final", "mean", "float32")
    np.testing.assert_array_equal(features._read_cache(key), ref)  # the rewritten file is whole again


def test_stale_key_misses(ds, cache):
    torch.manual_seed(1)
    model = models.create_model("steps_deit_micro", num_classes=16).eval()
    extract(model, ds, ["final"])
    with torch.no_grad():
        model.head.bias.add_(1.0)  # other weights: another hash, so another key
    calls, handle = _counter(model)
    try:
        extract(model, ds, ["final"])
        assert calls
        calls.clear()
        extract(model, ds, ["final"], pool="cls")  # other settings: another key
        assert calls
    finally:
        handle.remove()
    assert len(list(cache.glob("*.feat"))) == 3


def test_non_finite_features_name_the_site(ds, cache):
    model = models.create_model("steps_deit_micro", num_classes=16).eval()
    with torch.no_grad():
        model.blocks.steps[2].blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(FeatureError, match=r"site 'final' .*NaN/inf for 32 of 32 images"):
        extract(model, ds, ["slow_path"])
    assert not list(cache.glob("*.feat"))  # never cached
    ok = extract(model, ds, ["stages.0.steps.1.y"])  # the steps before the bad block are fine
    assert np.isfinite(ok["stages.0.steps.1.y"]).all()


def test_unknown_feature_and_pool(steps, ds):
    with pytest.raises(FeatureError, match="unknown feature 'nope'"):
        extract(steps, ds, ["nope"], cache=False)
    with pytest.raises(FeatureError, match="unknown pool 'max'"):
        extract(steps, ds, ["final"], pool="max", cache=False)


@pytest.mark.parametrize("name", ["steps_deit_micro", "steps_swin_micro", "steps_resnet_micro", "swin_micro"])
def test_batches_side_by_side_give_the_one_thread_features(name, ds):
    """On the CPU `extract` runs one batch per torch thread at once (each forward on one thread, its hooks
    seeing only its own pass): every family gives the features of one batch after another, row for row."""
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=16).eval()
    sites = ["final", "blocks.1"] + (["slow_path", "fast_path"] if name.startswith("steps") else [])
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):  # 8 batches of 4: one at a time, then two at a time
            torch.set_num_threads(n)
            outs.append(extract(model, ds, sites, batch_size=4, cache=False))
    finally:
        torch.set_num_threads(threads)
    for s in sites:
        np.testing.assert_array_equal(outs[0][s], outs[1][s], err_msg=s)
    assert not any(m._forward_hooks for m in model.modules())  # every pass removed its hooks


def test_forward_paths_from_two_threads_at_once_each_get_their_own_pass(steps, ds):
    from concurrent.futures import ThreadPoolExecutor

    from models.sites import forward_paths

    a, b = ds.normalise(ds.images[:8]), ds.normalise(ds.images[8:16])
    with torch.no_grad():
        ref = {k: forward_paths(steps, x, ["final", "blocks.3"]) for k, x in (("a", a), ("b", b))}
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(forward_paths, steps, x, ["final", "blocks.3"]) for x in (a, b) * 20]
            got = [r.result() for r in runs]
    for i, out in enumerate(got):
        for site in ("final", "blocks.3"):
            torch.testing.assert_close(out[site], ref["ab"[i % 2]][site], rtol=0, atol=0)
