"""``benchmarks/check_bf16_rankings.py`` on a small store and checkpoint, as the lead will run
it on the demo's (``STORE_DIR CHECKPOINT_DIR``)."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import jaxmon
from jaxmon import checkpoint
from jaxmon import io as jio

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import check_bf16_rankings as cbr
from test_matrix_unit import demo_like, labelled_queries


def test_spec_walk_sets_precision_on_every_estimator_with_the_knob():
    mon = jaxmon.calibrated(
        jaxmon.monitor(
            {
                "a": {"g": jaxmon.gaussian(), "k": jaxmon.knn(k=2, bank_size=8)},
                ("a", "b"): jaxmon.transition(),
                "b": {
                    "q": jaxmon.quantiles() if hasattr(jaxmon, "quantiles") else jaxmon.gaussian()
                },
            }
        )
    )
    spec = cbr.with_precision(mon.spec.to_dict(), "float32")
    est = jaxmon.from_spec(spec)
    text = est.spec.to_json()
    assert text.count('"precision": "float32"') >= 3
    assert mon.spec.to_json().count("precision") == 0  # the original is untouched


def test_script_on_a_bf16_store_passes(tmp_path, rng, capsys):
    d = 48
    mon = jaxmon.monitor(
        {
            "blocks/*/resid": {
                "gauss": jaxmon.gaussian(shrinkage="ledoit_wolf"),
                "pca": jaxmon.pca_residual(rank=8),
                "knn": jaxmon.knn(k=5, bank_size=256),
            },
            ("blocks/0/resid", "blocks/1/resid"): jaxmon.transition(),
        }
    )
    train = {"blocks/0/resid": demo_like(rng, 3000, d), "blocks/1/resid": demo_like(rng, 3000, d)}
    train["blocks/1/resid"] += 0.5 * train["blocks/0/resid"]
    state = mon.update(mon.init({k: v[:1] for k, v in train.items()}), train)
    fitted = mon.finalize(state)
    example = {k: jnp.zeros((1, d), jnp.bfloat16) for k in train}
    checkpoint.save(tmp_path / "ck", mon, state, fitted=fitted, example=example)
    x0, labels = labelled_queries(rng, 2000, d)
    x1, _ = labelled_queries(rng, 2000, d)
    x1 += 0.5 * x0
    with jio.ActivationWriter(tmp_path / "store", dtype="bfloat16") as w:
        for lo in range(0, len(labels), 1000):
            sl = slice(lo, lo + 1000)
            w.write(
                {"blocks/0/resid": x0[sl], "blocks/1/resid": x1[sl]},
                label=labels[sl].astype(np.int32),
                split="query",
            )
    code = cbr.main([str(tmp_path / "store"), str(tmp_path / "ck"), "--block-rows", "1024"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all keys pass" in out
    for key in ("blocks/0/resid:gauss", "blocks/1/resid:pca", "blocks/0/resid->blocks/1/resid"):
        assert key in out
