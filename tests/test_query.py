"""Batch queries: score_store against direct scoring, top-k and sequence aggregates against
numpy, one compilation, 8 devices, calibrated p-values, kill-and-resume bit for bit, and
truncated stores."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon
from jaxmon import checkpoint, io, query
from jaxmon.errors import ConfigError, NotFittedError, StoreError

from laws import json_field, sigkill_when

D = 8


@pytest.fixture
def store(tmp_path, rng):
    """1,000 tokens (20 sequences of 50) of two taps; trusted, then labelled query rows."""
    with io.ActivationWriter(tmp_path / "store", chunk_rows=32) as w:
        for i in range(5):
            x = rng.normal(size=(4, 50, D)).astype(np.float32)
            if i >= 3:
                x[1::2, 10:20] += 4.0  # anomalous stretch in odd sequences of the query split
            w.write(
                {"h": x, "g": x[..., :3] * 2},
                split="trusted" if i < 3 else "query",
                label=np.array([0, 1, 0, 1]) if i >= 3 else None,
            )
    return tmp_path / "store"


def _fit(store, est=None):
    est = est or jaxmon.gaussian(shrinkage=0.1)
    state, example = query.fit_store(store, est, tap="h", split="trusted")
    return est, state, example


def test_fit_store_equals_direct_update(store):
    est, state, _ = _fit(store)
    st = query.open_store(store)
    x = st.taps["h"][:600].read().result()  # the trusted rows come first
    ref = est.update(est.init(jax.ShapeDtypeStruct((D,), jnp.float32)), jnp.asarray(x))
    assert jaxmon.num_rows(state) == 600
    np.testing.assert_allclose(state.mean, ref.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.m2, ref.m2, rtol=1e-4, atol=1e-4)


def test_score_store_matches_direct_scores_topk_and_sequences(store, tmp_path):
    est, state, _ = _fit(store)
    fitted = est.finalize(state)
    traces = []

    def counting_score(f, x, *, mask=None):
        traces.append(x.shape)  # runs once per trace of the block scorer
        return est.score(f, x, mask=mask)

    counted = est._replace(score=counting_score)
    res = query.score_store(
        store, counted, fitted, out=tmp_path / "q", tap="h", block_rows=96, top_k=7
    )
    assert len(traces) == 1  # 1,000 rows in blocks of 96 (tail padded): one compilation
    st = query.open_store(store)
    x = st.taps["h"][:].read().result()
    ref = np.asarray(est.score(fitted, jnp.asarray(x)), np.float64)
    got = res.scores("h")
    assert got.shape == (1000,)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # Top-k: exactly numpy's top 7 of the written scores (ties broken by row).
    order = np.lexsort((np.arange(1000), -got.astype(np.float64)))[:7]
    assert [t["row"] for t in res.top("h")] == order.tolist()
    assert [t["score"] for t in res.top("h")] == got[order].astype(np.float64).tolist()
    seq_ids = st.read_meta("sequence_id", 0, 1000)
    assert [t["sequence_id"] for t in res.top("h")] == seq_ids[order].tolist()
    # Per-sequence max and mean against a numpy group-by.
    seqs = res.sequences()
    np.testing.assert_array_equal(seqs["sequence_id"], np.arange(20))
    for s in range(20):
        sel = got[seq_ids == s].astype(np.float64)
        assert seqs["max/h"][s] == sel.max()
        np.testing.assert_allclose(seqs["mean/h"][s], sel.mean(), rtol=1e-12)
    np.testing.assert_array_equal(seqs["label"], [-1] * 12 + [0, 1, 0, 1] * 2)
    # The planted anomalies lead the ranking of query sequences.
    q = seqs["split"] == 1
    assert jaxmon.metrics.auroc(seqs["max/h"][q], seqs["label"][q]) == 1.0


def test_monitor_scores_every_key_over_eight_devices(store, tmp_path):
    assert len(jax.local_devices()) == 8
    mon = jaxmon.monitor({"*": jaxmon.gaussian(diagonal=True)})
    state, _example = query.fit_store(store, mon, split="trusted")
    fitted = mon.finalize(state)
    res = query.score_store(store, mon, fitted, out=tmp_path / "q", block_rows=64)
    assert res.summary["block_rows"] % 8 == 0
    st = query.open_store(store)
    taps = {t: jnp.asarray(st.taps[t][:].read().result()) for t in ("h", "g")}
    ref = mon.score(fitted, taps)
    assert sorted(res.keys) == sorted(ref)
    for k in res.keys:
        np.testing.assert_allclose(res.scores(k), ref[k], rtol=1e-5, atol=1e-5)


def test_calibrated_monitor_reports_exceedances(store, tmp_path):
    cal = jaxmon.calibrated(jaxmon.gaussian(shrinkage=0.1))
    st = query.open_store(store)
    x = st.taps["h"][:600].read().result()
    s = cal.update(cal.init(jax.ShapeDtypeStruct((D,), jnp.float32)), jnp.asarray(x[:300]))
    s = jaxmon.begin_calibration(cal, s)
    s = cal.update(s, jnp.asarray(x[300:600]))
    fitted = cal.finalize(s)
    # Through a checkpoint: the fitted value is a registered dataclass with a static spec.
    checkpoint.save(tmp_path / "ck", cal, s, fitted=fitted)
    ck = checkpoint.load(tmp_path / "ck")
    assert ck.fitted.spec == fitted.spec
    res = query.score_store(
        store, str(tmp_path / "ck"), out=tmp_path / "q", tap="h", block_rows=128
    )
    assert res.summary["calibrated"]
    p = np.asarray(jaxmon.p_values(fitted, jnp.asarray(st.taps["h"][:].read().result())))
    info = res.summary["keys"]["h"]
    for fpr in query.FPRS:
        # -log10 p >= -log10 fpr  <=>  p <= fpr (up to float rounding at the boundary)
        assert abs(info["exceedances"][str(fpr)] - int(np.sum(p <= fpr))) <= 1
        thr = float(np.asarray(jaxmon.threshold(fitted, fpr=fpr)))
        assert info["raw_thresholds"][str(fpr)] == thr
    # Scored once: the same pass kept the raw inner scores, and the calibrated scores are
    # exactly those of calibrated(...).score on the rows.
    assert res.summary["raw"]
    xs = jnp.asarray(st.taps["h"][:].read().result())
    inner = jaxmon.gaussian(shrinkage=0.1)
    np.testing.assert_allclose(res.scores("h", raw=True), inner.score(fitted.inner, xs), rtol=1e-5)
    np.testing.assert_allclose(res.scores("h"), cal.score(fitted, xs), rtol=1e-5, atol=1e-6)
    with pytest.raises(jaxmon.StoreError, match="no raw scores"):
        query.score_store(store, inner, fitted.inner, out=tmp_path / "q2", tap="h").scores(
            "h", raw=True
        )


def test_checkpoint_path_progress_and_errors(store, tmp_path, capsys):
    est, state, example = _fit(store)
    checkpoint.save(tmp_path / "ck", est, state, example=example)
    res = query.score_store(store, str(tmp_path / "ck"), out=tmp_path / "q", tap="h")
    assert res.summary["rows"] == 1000
    assert capsys.readouterr().err == ""  # quiet when stderr is not a terminal
    query.score_store(store, str(tmp_path / "ck"), out=tmp_path / "qp", tap="h", progress=True)
    last = capsys.readouterr().err.splitlines()[-1]  # tqdm's last refresh of the bar
    assert "score_store" in last and "1000/1000" in last and "rows/s" in last
    query.fit_store(store, est, tap="h", progress=True)
    assert "fit_store" in capsys.readouterr().err.splitlines()[-1]
    query.fit_store(store, est, tap="h")
    assert capsys.readouterr().err == ""
    with pytest.raises(query.StoreError, match="say which one"):
        query.score_store(store, str(tmp_path / "ck"), out=tmp_path / "q2")
    with pytest.raises(query.StoreError, match="no tap 'nope'"):
        query.score_store(store, str(tmp_path / "ck"), out=tmp_path / "q2", tap="nope")
    with pytest.raises(query.StoreError, match="different query"):
        query.score_store(store, str(tmp_path / "ck"), out=tmp_path / "q", tap="h", block_rows=64)


def test_nonfinite_rows_are_counted_and_lead_the_top_k(tmp_path, rng):
    """Rows holding NaN/inf score +inf, lead top-k (ties by row) and are counted per key."""
    x = rng.normal(size=(500, D)).astype(np.float32)
    g = rng.normal(size=(500, 3)).astype(np.float32)
    bad_h = [3, 77, 300, 301, 499]
    bad_g = [10, 300]
    x[bad_h[:3], 2] = np.nan
    x[bad_h[3:], 0] = np.inf
    g[bad_g[0], 1] = -np.inf
    g[bad_g[1], 0] = np.nan
    with io.ActivationWriter(tmp_path / "st", chunk_rows=32) as w:
        w.write({"h": x, "g": g})
    mon = jaxmon.monitor({"*": jaxmon.gaussian(shrinkage=0.1)})
    clean = {"h": jnp.asarray(rng.normal(size=(400, D)), jnp.float32),
             "g": jnp.asarray(rng.normal(size=(400, 3)), jnp.float32)}  # fmt: skip
    fitted = mon.finalize(mon.update(mon.init(clean), clean))
    results = [
        query.score_store(tmp_path / "st", mon, fitted, out=tmp_path / f"q{b}", block_rows=b,
                          top_k=k)
        for b, k in ((64, 8), (256, 3))
    ]  # fmt: skip
    for res in results:
        want = {"h": bad_h, "g": bad_g}
        for key in ("h", "g"):
            info = res.summary["keys"][key]
            assert info["nonfinite"] == len(want[key]) and info["nan"] == 0
            top = res.top(key)
            lead = min(len(top), len(want[key]))
            assert [t["row"] for t in top[:lead]] == want[key][:lead]
            assert all(t["score"] == np.inf for t in top[:lead])
            scores = res.scores(key)
            assert np.isfinite(info["mean"]) and info["max"] == np.inf
            np.testing.assert_allclose(info["mean"], scores[np.isfinite(scores)].mean(), 1e-5)
    assert results[0].top("h")[:3] == results[1].top("h")  # the same whatever the blocking


def test_top_k_keeps_nan_and_orders_inf_whatever_the_blocking():
    rng = np.random.default_rng(1)
    s = rng.normal(size=1000).astype(np.float32)
    s[[5, 500, 900]] = np.inf
    s[[7, 600]] = np.nan  # no jaxmon estimator gives NaN, but it must never vanish
    s[rng.choice(1000, 50)] = 2.5  # many ties at the boundary
    want = None
    for block in (1, 7, 64, 1000):
        rows, sc = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for lo in range(0, 1000, block):
            blk = s[lo : lo + block]
            idx = query._block_topk(blk, 20)
            rows, sc = query._topk_merge(rows, sc, lo + idx, blk[idx], 20)
        if want is None:
            want = rows
            assert rows[:5].tolist() == [5, 7, 500, 600, 900]  # inf and NaN first, by row
            assert np.isnan(sc[1]) and np.isnan(sc[3]) and np.all(sc[[0, 2, 4]] == np.inf)
        np.testing.assert_array_equal(rows, want)


def test_score_store_refuses_bad_arguments_at_the_call(store, tmp_path):
    est, state, _ = _fit(store)
    fitted = est.finalize(state)
    for kw, msg in (
        ({"block_rows": 0}, "block_rows must be a positive integer, got 0"),
        ({"block_rows": -64}, "block_rows must be a positive integer"),
        ({"top_k": 0}, "top_k must be a positive integer, got 0"),
        ({"devices": []}, "devices is empty"),
    ):
        with pytest.raises(ConfigError, match=msg):
            query.score_store(store, est, fitted, out=tmp_path / "q", tap="h", **kw)
    with pytest.raises(ConfigError, match="block_rows must be a positive integer"):
        query.fit_store(store, est, tap="h", block_rows=0)
    with pytest.raises(ConfigError, match="expected a jaxmon Estimator"):
        query.fit_store(store, jaxmon.gaussian, tap="h")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file; score_store writes a directory"):
        query.score_store(store, est, fitted, out=tmp_path / "file", tap="h")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="holds no jaxmon query; refusing to replace it"):
        query.score_store(store, est, fitted, out=tmp_path / "mine", tap="h")
    assert (tmp_path / "mine" / "notes.txt").exists()
    empty = jax.jit(est.finalize)(est.init(jax.ShapeDtypeStruct((D,), jnp.float32)))
    with pytest.raises(NotFittedError, match="score_store"):
        query.score_store(store, est, empty, out=tmp_path / "q", tap="h")
    assert not (tmp_path / "q").exists()  # refused before anything was written


def test_truncated_stores_give_clear_errors(store, tmp_path):
    manifest = json.loads((store / "manifest.json").read_text())
    chunk = store / manifest["taps"]["h"]["path"] / "c" / "3" / "0"
    data = chunk.read_bytes()
    chunk.unlink()
    with pytest.raises(query.StoreError, match=r"truncated: chunk 3 of tap 'h' is missing"):
        query.open_store(store)
    chunk.write_bytes(data)
    query.open_store(store)
    manifest["rows"] = 5000
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(query.StoreError, match="holds 1000 rows but the manifest says 5000"):
        query.open_store(store)
    (store / "manifest.json").unlink()
    with pytest.raises(query.StoreError, match=r"no manifest\.json"):
        query.open_store(store)
    with pytest.raises(query.StoreError, match="no activation store"):
        query.open_store(tmp_path / "nowhere")


def _files(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, directory)] = open(p, "rb").read()
    return out


@pytest.mark.slow
def test_killed_query_resumes_bit_identically(tmp_path, rng):
    n_seq = 40
    with io.ActivationWriter(tmp_path / "store", chunk_rows=32) as w:
        for _ in range(4):
            w.write({"h": rng.normal(size=(n_seq // 4, 64, D)).astype(np.float32)}, split="trusted")
    est, state, example = _fit(tmp_path / "store")
    ck = tmp_path / "ck"
    checkpoint.save(ck, est, state, fitted=est.finalize(state), example=example)
    out = tmp_path / "killed"
    script = os.path.join(os.path.dirname(__file__), "_kill_query.py")
    cmd = [sys.executable, script, str(tmp_path / "store"), str(ck), str(out), "64", "0.3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    sigkill_when(proc, lambda: json_field(out / "progress.json", "next_block", 0) >= 3)
    killed_at = json.loads((out / "progress.json").read_text())["next_block"]
    assert 3 <= killed_at < 40  # 2,560 rows in blocks of 64
    calls = []
    query.score_store(
        tmp_path / "store",
        str(ck),
        out=out,
        tap="h",
        block_rows=64,
        top_k=10,
        callback=lambda d, t: calls.append(d),
    )
    assert len(calls) == 40 - killed_at  # it resumed, it did not start over
    query.score_store(
        tmp_path / "store", str(ck), out=tmp_path / "straight", tap="h", block_rows=64, top_k=10
    )
    a, b = _files(out), _files(tmp_path / "straight")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name


def test_fit_store_continues_a_calibration_pass_over_eight_devices(store):
    """The replicas of a continued fit start from the merge identity of its pass: the
    calibration rows land once in the score sketches, the fitted inner state is kept."""
    cal = jaxmon.calibrated(jaxmon.gaussian(shrinkage=0.1))
    s, example = query.fit_store(store, cal, tap="h", split="trusted")
    one, _ = query.fit_store(store, cal, tap="h", split="trusted", devices=jax.devices()[:1])
    assert jaxmon.num_rows(s) == jaxmon.num_rows(one)
    np.testing.assert_allclose(s.inner.m2, one.inner.m2, rtol=1e-5, atol=1e-4)
    s = jaxmon.begin_calibration(cal, s)
    inner = jax.device_get(s.inner)
    s2, _ = query.fit_store(store, cal, s, tap="h", split="query")
    counts = jaxmon.num_rows(s2)
    assert counts[".inner.counts"] == 600 and counts[".scores.counts"] == 400
    for a, b in zip(jax.tree.leaves(s2.inner), jax.tree.leaves(inner), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The same p-values as one stream through the calibration rows (sketch error bound).
    x = query.open_store(store).taps["h"][600:1000].read().result()
    ref = cal.update(s, jnp.asarray(x))
    q = jnp.asarray(x[:50])
    np.testing.assert_allclose(
        jaxmon.p_values(cal.finalize(s2), q), jaxmon.p_values(cal.finalize(ref), q), atol=0.01
    )
    assert example == jax.ShapeDtypeStruct((D,), jnp.float32)


def test_fit_store_gives_the_label_column_to_probes_and_trusted_rows_to_the_rest(store):
    st = query.open_store(store)
    x = st.taps["h"][:].read().result()
    lab = st.read_meta("label", 0, st.rows).astype(np.int32)
    mon = jaxmon.monitor({"h": {"probe": jaxmon.probe(), "gauss": jaxmon.gaussian()}})
    state, example = query.fit_store(store, mon, block_rows=64)  # supervised: labels by default
    ref = mon.update(mon.init(example), {"h": jnp.asarray(x)}, labels=jnp.asarray(lab))
    for k in ("h:probe", "h:gauss"):
        assert jaxmon.num_rows(state[k]) == jaxmon.num_rows(ref[k])
        np.testing.assert_allclose(
            jax.tree.leaves(state[k])[2], jax.tree.leaves(ref[k])[2], rtol=1e-5, atol=1e-5
        )
    # The Gaussian saw the trusted rows only: unlabelled (-1) and flagged rows stay out.
    assert jaxmon.num_rows(state["h:gauss"]) == int((lab == 0).sum())
    # A mapping of stored values: flagged = stored 1, trusted = stored 0 (the same here).
    again, _ = query.fit_store(store, mon, block_rows=64, labels={0: 0, 1: 1})
    assert jaxmon.num_rows(again) == jaxmon.num_rows(state)
    with pytest.raises(ConfigError, match="labels"):
        query.fit_store(store, mon, labels={0: 5})


def test_rank_store_ranks_keys_by_the_label_column(store, tmp_path):
    mon = jaxmon.monitor({"h": jaxmon.gaussian(shrinkage=0.1), "g": jaxmon.gaussian()})
    state, _ = query.fit_store(store, mon, split="trusted")
    fitted = mon.finalize(state)
    ranked = query.rank_store(store, mon, fitted, out=tmp_path / "q", n_boot=50, block_rows=64)
    tok = [r for r in ranked if r["level"] == "token"]
    assert {r["key"] for r in tok} == {"h", "g"}
    # Only the label-0 and label-1 rows of the query split are compared (the trusted split's
    # rows are unlabelled): 200 of each.
    assert all(r["n_clean"] == 200 and r["n_flagged"] == 200 for r in tok)
    st = query.open_store(store)
    lab = st.read_meta("label", 0, st.rows)
    res = query.load_result(tmp_path / "q")
    from sklearn.metrics import roc_auc_score

    for r in tok:
        s = res.scores(r["key"])
        want = roc_auc_score(lab[lab >= 0], s[lab >= 0])
        assert r["auroc"] == pytest.approx(want, abs=1e-9)
    # Ranking the finished query again scores nothing: the same numbers.
    again = query.rank_store(store, query=tmp_path / "q", n_boot=50)
    assert [(r["key"], r["auroc"]) for r in again] == [(r["key"], r["auroc"]) for r in ranked]
    seq = [r for r in ranked if r["level"] == "sequence"]
    assert seq and all(r["n_clean"] == 4 and r["n_flagged"] == 4 for r in seq)
    with pytest.raises(StoreError, match="labelled"):
        query.rank_store(store, query=tmp_path / "q", flagged=7)


def _leaves_equal(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or {"rtol": 0}))


def test_calibrate_store_is_the_two_passes(store):
    """Fit on one split, begin_calibration, the held-out split, finalize: as done by hand."""
    mon = jaxmon.monitor({"*": jaxmon.gaussian(shrinkage=0.1)})
    got = query.calibrate_store(store, mon, fit_split="trusted", calibration_split="query")
    cal = jaxmon.calibrated(mon)
    assert got.estimator.spec == cal.spec
    state, example = query.fit_store(store, cal, split="trusted")  # a calibrated monitor
    state = jaxmon.begin_calibration(cal, state)
    state, _ = query.fit_store(store, cal, state, split="query")
    assert jaxmon.num_rows(got.state) == jaxmon.num_rows(state)
    _leaves_equal(got.state, state, rtol=1e-6, atol=1e-6)
    _leaves_equal(got.fitted, cal.finalize(state), rtol=1e-6, atol=1e-6)
    assert got.example == example
    # A calibrated estimator is used as it is; a single tap is named as for fit_store.
    one = query.calibrate_store(
        store,
        jaxmon.calibrated(jaxmon.gaussian()),
        tap="h",
        fit_split="trusted",
        calibration_split="query",
    )
    assert one.estimator.spec.name == "calibrated"
    rows = jaxmon.num_rows(one.state)
    assert rows[".inner.counts"] == 600 and rows[".scores.counts"] == 400


def test_calibrate_store_from_a_checkpoint_starts_from_its_fitted_state(store, tmp_path):
    """A monitor fitted elsewhere (a train step) and saved: calibrating it on held-out rows is
    one call, equal to building the calibrated state around the checkpoint's by hand."""
    mon = jaxmon.monitor({"*": jaxmon.gaussian(shrinkage=0.1)})
    state, example = query.fit_store(store, mon, split="trusted")
    checkpoint.save(tmp_path / "ck", mon, state, fitted=mon.finalize(state), example=example)
    ck = checkpoint.load(tmp_path / "ck")
    got = query.calibrate_store(store, ck, calibration_split="query")
    # By hand, as the demo used to: the checkpoint's state as the calibrated state's inner one.
    cal = jaxmon.calibrated(ck.estimator)
    ref = cal.init(example)._replace(inner=ck.state)
    ref = jaxmon.begin_calibration(cal, ref)
    ref, _ = query.fit_store(store, cal, ref, split="query")
    assert jaxmon.num_rows(got.state) == jaxmon.num_rows(ref)
    _leaves_equal(got.state, ref)
    _leaves_equal(got.fitted, cal.finalize(ref))
    # A checkpoint directory; a calibrated checkpoint is calibrated again from its inner state.
    again = query.calibrate_store(str(store), str(tmp_path / "ck"), calibration_split="query")
    _leaves_equal(again.state, got.state)
    checkpoint.save(tmp_path / "ck2", again.estimator, again.state, example=again.example)
    twice = query.calibrate_store(store, tmp_path / "ck2", calibration_split="query")
    _leaves_equal(twice.state, got.state)
    # An estimator with its fitted state is the same as its checkpoint.
    same = query.calibrate_store(store, mon, state, calibration_split="query")
    _leaves_equal(same.state, got.state)


def test_calibrate_store_refuses_rows_that_are_not_held_out(store, tmp_path):
    est = jaxmon.gaussian()
    with pytest.raises(ConfigError, match="held out"):
        query.calibrate_store(store, est, tap="h")
    with pytest.raises(ConfigError, match="held out"):
        query.calibrate_store(store, est, tap="h", fit_split="trusted", calibration_split="trusted")
    state, _ = query.fit_store(store, est, tap="h", split="trusted")
    with pytest.raises(ConfigError, match="fit_split"):
        query.calibrate_store(store, est, state, tap="h", fit_split="trusted")
    with pytest.raises(ConfigError, match="expected a jaxmon Estimator"):
        query.calibrate_store(store, jaxmon.gaussian, tap="h", calibration_split="query")
    # Scoring a calibrated estimator needs its calibrated fitted value.
    cal = jaxmon.calibrated(est)
    with pytest.raises(ConfigError, match="calibrated but its fitted value"):
        query.score_store(store, cal, est.finalize(state), out=tmp_path / "q", tap="h")
    with pytest.raises(ConfigError, match="method must be"):
        query.score_store_batch(store, out=tmp_path / "qb", tap="h", method="nope")
    assert not (tmp_path / "q").exists() and not (tmp_path / "qb").exists()
