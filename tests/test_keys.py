"""Monitor keys: one owner parses and formats ``a->b:det``, and agrees with the keys a monitor
gives; ``kind_of`` decides "monitor?" and "calibrated?" from the spec, through wrappers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon
from jaxmon._keys import MonitorKey, kind_of, parse_pattern
from jaxmon.errors import ConfigError


@pytest.mark.parametrize(
    "text, taps, detector",
    [
        ("blocks/0/mlp_out", ("blocks/0/mlp_out",), None),
        ("blocks/0/mlp_out:gauss", ("blocks/0/mlp_out",), "gauss"),
        ("a->b", ("a", "b"), None),
        ("blocks/0/resid->blocks/1/resid:ridge", ("blocks/0/resid", "blocks/1/resid"), "ridge"),
        # A detector never holds ':', so the detector is what follows the last one.
        ("ns:tap:det", ("ns:tap",), "det"),
    ],
)
def test_parse_and_format_round_trip(text, taps, detector):
    key = MonitorKey.parse(text)
    assert key.taps == taps and key.detector == detector
    assert key.pair == (len(taps) == 2)
    assert str(key) == key.format() == text
    assert MonitorKey.of(taps if len(taps) == 2 else taps[0], detector) == key
    assert MonitorKey.of(taps, detector).format() == text
    assert key.with_detector(None).format() == key.base == "->".join(taps)


@pytest.mark.parametrize("bad", ["", "a:", ":det", "a->", "->b", "a->b->c", 3, None])
def test_malformed_keys_are_config_errors(bad):
    with pytest.raises(ConfigError):
        MonitorKey.parse(bad)


def test_builder_refuses_what_no_monitor_makes():
    with pytest.raises(ConfigError, match="one tap or a pair"):
        MonitorKey.of(("a", "b", "c"))
    with pytest.raises(ConfigError, match="without ':'"):
        MonitorKey.of("a", "x:y")
    with pytest.raises(ConfigError, match="one tap or a pair"):
        MonitorKey.of("")


def test_pair_patterns_of_config_files():
    assert parse_pattern("blocks/*/out") == "blocks/*/out"
    assert parse_pattern("blocks/0/out -> blocks/1/out") == ("blocks/0/out", "blocks/1/out")
    assert parse_pattern("a->b") == ("a", "b")
    with pytest.raises(ConfigError, match="pair pattern"):
        parse_pattern("a -> b -> c")
    with pytest.raises(ConfigError, match="pair pattern"):
        parse_pattern("a -> ")


def test_keys_agree_with_the_keys_a_monitor_gives():
    d = 4
    taps = {f"blocks/{i}/{t}": np.ones((3, d), np.float32) for i in range(3) for t in ("r", "m")}
    mon = jaxmon.monitor(
        {
            "blocks/*/r": {"g": jaxmon.gaussian(), "d": jaxmon.gaussian(diagonal=True)},
            "blocks/*/m": jaxmon.gaussian(),
            ("blocks/[0-1]/r", "blocks/[1-2]/r"): jaxmon.transition(),
        }
    )
    state = mon.init({k: jax.ShapeDtypeStruct((d,), jnp.float32) for k in taps})
    want = {MonitorKey.of(f"blocks/{i}/r", det).format() for i in range(3) for det in ("g", "d")}
    want |= {MonitorKey.of(f"blocks/{i}/m").format() for i in range(3)}
    want |= {MonitorKey.of((f"blocks/{i}/r", f"blocks/{i + 1}/r")).format() for i in range(2)}
    assert set(state) == want
    for key in state:
        assert set(MonitorKey.parse(key).taps) <= set(taps)


def test_kind_of_looks_through_wrappers_and_takes_any_spec_form():
    mon = jaxmon.monitor({"*": jaxmon.gaussian()})
    g = jaxmon.gaussian()
    assert kind_of(mon) == (True, False)
    assert kind_of(jaxmon.calibrated(mon)) == (True, True)
    assert kind_of(jaxmon.every_k(mon, 2)) == (True, False)
    assert kind_of(jaxmon.calibrated(jaxmon.every_k(mon, 2))) == (True, True)
    assert kind_of(g) == (False, False)
    assert kind_of(jaxmon.calibrated(g)) == (False, True)
    cal = jaxmon.calibrated(mon)
    for form in (cal.spec, cal.spec.to_dict(), cal.spec.to_json()):
        assert kind_of(form) == (True, True)
    # A hyperparameter that happens to say "monitor" is not a monitor (no substring search).
    assert kind_of({"name": "calibrated", "params": {"note": "monitor"}}) == (False, True)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert kind_of(jaxmon.sharding.shard_local(mon, mesh, "data")) == (True, False)
    with pytest.raises(ConfigError, match="expected a jaxmon Estimator"):
        kind_of(jaxmon.gaussian)
