"""The bad-input battery (issue 11): every way a new user was found to get a silent "normal",
a lost store, a raw traceback or code run from a file, each now a typed error or a correct
"anomalous". One test per finding, through the public API; the property-based half is
``tests/test_properties.py``, and the crafted-file details are in ``test_checkpoint_format.py``
and ``test_store_integrity.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon
import jaxmon.sklearn
from jaxmon import checkpoint, io, query

D = 8
EX = jax.ShapeDtypeStruct((D,), jnp.float32)


def _rows(seed: int, n: int, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _one_sentence(err: BaseException, limit: int = 300) -> str:
    msg = str(err)
    assert "\n" not in msg and len(msg) <= limit, msg
    return msg


# --------------------------------------------------------------------------- 1. non-finite rows


def test_nan_query_row_scores_inf_not_nan():
    est = jaxmon.gaussian()
    f = est.finalize(est.update(est.init(EX), jnp.asarray(_rows(0, 200))))
    q = _rows(1, 4)
    q[1, 3] = np.nan
    q[2, 0] = np.inf
    s = np.asarray(est.score(f, jnp.asarray(q)))
    assert np.isposinf(s[1]) and np.isposinf(s[2])
    assert np.all(np.isfinite(s[[0, 3]]))


def test_sklearn_detector_flags_nan_rows_and_refuses_all_nan_fits():
    det = jaxmon.sklearn.Detector(jaxmon.gaussian(shrinkage="ledoit_wolf")).fit(_rows(2, 300))
    q = _rows(3, 5)
    q[4, 0] = np.nan
    assert det.predict(q)[4] == 1
    with pytest.raises(jaxmon.NotFittedError, match="NaN"):
        jaxmon.sklearn.Detector().fit(np.full((50, D), np.nan, np.float32))


# --------------------------------------------------------------------------- 2. empty fits


@pytest.mark.parametrize(
    "make",
    [
        lambda: jaxmon.gaussian(),
        lambda: jaxmon.gaussian(shrinkage="ledoit_wolf"),
        lambda: jaxmon.knn(k=3, bank_size=32),
    ],
    ids=["gaussian", "ledoit_wolf", "knn"],
)
def test_fit_on_nothing_is_an_error_not_confident_scores(make):
    est = make()
    with pytest.raises(jaxmon.NotFittedError, match="no rows") as info:
        est.finalize(est.init(EX))
    _one_sentence(info.value)


def test_calibrated_monitor_without_calibration_rows_is_refused():
    mon = jaxmon.monitor({"t": jaxmon.gaussian(shrinkage="ledoit_wolf")})
    cal = jaxmon.calibrated(mon)
    s = cal.update(cal.init({"t": EX}), {"t": jnp.asarray(_rows(4, 300))})
    s = jaxmon.begin_calibration(cal, s)
    with pytest.raises(jaxmon.NotFittedError, match="calibration pass saw no rows"):
        cal.finalize(s)
    # All calibration rows masked is the same mistake.
    s2 = cal.update(s, {"t": jnp.asarray(_rows(5, 10))}, mask=jnp.zeros((10,), bool))
    with pytest.raises(jaxmon.NotFittedError):
        cal.finalize(s2)


def test_fewer_rows_than_features_without_shrinkage_warns_and_names_the_fix():
    est = jaxmon.gaussian()
    s = est.update(
        est.init(jax.ShapeDtypeStruct((32,), jnp.float32)), jnp.asarray(_rows(6, 10, 32))
    )
    with pytest.warns(jaxmon.ConditioningWarning, match='shrinkage="ledoit_wolf"'):
        est.finalize(s)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jaxmon.ConditioningWarning)
        jaxmon.gaussian(shrinkage="ledoit_wolf").finalize(s)  # shrunk: no warning


# --------------------------------------------------------------------------- 3. p-value floor


def test_strong_anomalies_stay_ordered_past_the_calibration_set():
    cal = jaxmon.calibrated(jaxmon.gaussian())
    s = cal.update(cal.init(EX), jnp.asarray(_rows(7, 2000)))
    s = jaxmon.begin_calibration(cal, s)
    s = cal.update(s, jnp.asarray(_rows(8, 2000)))
    f = cal.finalize(s)
    q = np.zeros((4, D), np.float32)
    q[:, 0] = [25.0, 50.0, 100.0, 200.0]  # standard deviations out
    p = np.asarray(jaxmon.p_values(f, jnp.asarray(q)))
    assert np.all(p < 1 / 2001) and np.all(p > 0), p
    assert np.all(np.diff(p) < 0), p  # strictly decreasing: no tie at the floor
    scores = np.asarray(cal.score(f, jnp.asarray(q)))
    assert np.all(np.diff(scores) > 0), scores
    # Combined evidence keeps the order too (two copies of the same tap), in log space even
    # where the p-values themselves leave float32's range.
    lp1 = jaxmon.p_values(f, jnp.asarray(q * 10), log=True)
    for method in ("fisher", "bonferroni", "cauchy"):
        lp = jaxmon.combine({"a": lp1, "b": lp1}, method=method, log=True, log_inputs=True)
        assert np.all(np.isfinite(lp)) and np.all(np.diff(np.asarray(lp)) < 0), (method, lp)


# --------------------------------------------------------------------------- 4 and 6. checkpoints


@pytest.fixture
def knn_checkpoint(tmp_path):
    cal = jaxmon.calibrated(jaxmon.knn(k=3, bank_size=64))
    s = cal.update(cal.init(EX), jnp.asarray(_rows(9, 300)))
    s = jaxmon.begin_calibration(cal, s)
    s = cal.update(s, jnp.asarray(_rows(10, 300)))
    checkpoint.save(tmp_path / "ck", cal, s, fitted=cal.finalize(s), example=EX)
    return tmp_path / "ck"


def _data_files(ck: Path) -> list[Path]:
    return sorted(
        p
        for p in ck.rglob("*")
        if p.is_file() and "jaxmon_fitted" in p.parts and "/d/" in str(p) and p.stat().st_size
    )


def test_flipped_bit_in_a_checkpoint_is_detected_and_named(knn_checkpoint):
    target = _data_files(knn_checkpoint)[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    with pytest.raises(Exception) as info:
        jaxmon.load(knn_checkpoint)
    assert "Checkpoint" in type(info.value).__name__
    assert target.name in _one_sentence(info.value)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_checkpoint_file_is_one_sentence(knn_checkpoint, damage):
    target = _data_files(knn_checkpoint)[0]
    if damage == "missing":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:7])
    with pytest.raises(jaxmon.CheckpointError) as info:
        jaxmon.load(knn_checkpoint)
    assert target.name in _one_sentence(info.value)
    # The CLI says the same sentence, exit 2, no traceback.
    out = subprocess.run(
        [sys.executable, "-m", "jaxmon.cli", "inspect", str(knn_checkpoint)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert len(out.stderr) < 400


def test_loading_a_checkpoint_never_runs_code_it_names(knn_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    meta_files = [p for p in knn_checkpoint.rglob("*") if p.is_file() and "jaxmon_meta" in p.parts]
    edited = False
    for path in meta_files:
        try:
            meta = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(meta, dict) or "state_tree" not in meta:
            continue
        meta["state_tree"] = {
            "t": "namedtuple",
            "cls": "os:system",
            "fields": [["command", {"t": "static", "value": f"touch {marker}"}]],
        }
        meta["spec"] = {"name": "os:system", "params": {"command": f"touch {marker}"}}
        path.write_text(json.dumps(meta))
        edited = True
    assert edited
    checkpoint.seal(knn_checkpoint, 0)  # even with valid digests, nothing may run
    with pytest.raises(jaxmon.CheckpointError):
        jaxmon.load(knn_checkpoint)
    assert not marker.exists()


# --------------------------------------------------------------------------- 7. errors from below


def test_monitor_given_an_array_instead_of_a_dict_says_so():
    mon = jaxmon.monitor({"t": jaxmon.gaussian()})
    s = mon.init({"t": EX})
    with pytest.raises(jaxmon.ShapeError, match="expects a dict"):
        mon.update(s, jnp.asarray(_rows(11, 4)))


def test_detector_with_a_bare_name_is_a_config_error():
    with pytest.raises(jaxmon.ConfigError, match="spec must be JSON"):
        jaxmon.sklearn.Detector("gaussian").fit(_rows(12, 20))


def test_batch_size_zero_is_a_config_error():
    with pytest.raises(jaxmon.ConfigError, match="batch_size"):
        jaxmon.sklearn.Detector(batch_size=0).fit(_rows(13, 20))


def test_cli_output_onto_an_existing_file_is_one_sentence(tmp_path):
    store = tmp_path / "store"
    with io.ActivationWriter(store, overwrite=True) as w:
        w.write({"t": _rows(14, 300)}, split="trusted")
    cfg = tmp_path / "fit.json"
    cfg.write_text(json.dumps({"tap": "t", "estimator": {"name": "gaussian"}}))
    existing = tmp_path / "already_a_file"
    existing.write_text("x")
    out = subprocess.run(
        [sys.executable, "-m", "jaxmon.cli", "fit", str(cfg), str(store), "-o", str(existing)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert query.open_store(store).rows == 300
