"""The jaxmon command line, run as subprocesses: a full fit/inspect/score/report/compare run
and every kind of bad input (non-zero exit, one sentence on stderr, no traceback)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon
from jaxmon import checkpoint, cli, io, query

ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
ENV.pop("JAXMON_DEBUG", None)


def _cmd(*args):
    return [sys.executable, "-m", "jaxmon.cli", *map(str, args)]


def _run(*args):
    return subprocess.run(_cmd(*args), capture_output=True, text=True, env=ENV, timeout=300)


def _parallel(*commands):
    """Runs commands concurrently; returns their stdouts (each must succeed)."""
    procs = [
        subprocess.Popen(
            _cmd(*c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
        )
        for c in commands
    ]
    outs = []
    for c, p in zip(commands, procs, strict=True):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (c[0], err)
        outs.append(out)
    return outs


def _store(path, rng):
    with io.ActivationWriter(path, chunk_rows=64) as w:
        for i in range(6):
            x = rng.normal(size=(4, 30, 8)).astype(np.float32)
            if i >= 4:
                x[1::2, 5:9] += 5.0
            w.write(
                {"blocks/0/out": x, "blocks/1/out": x[..., :4] * 2},
                split=("trusted", "trusted", "heldout", "heldout", "query", "query")[i],
                label=np.array([0, 1, 0, 1]) if i >= 4 else None,
                tokens=[[f"tok{j}" for j in range(30)]] * 4,
            )


@pytest.mark.parametrize("command", [None, "fit", "score", "rank", "report", "compare", "inspect"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"] if command is None else [command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: jaxmon" in out
    assert "exits with status 2 and one sentence" in " ".join(out.split())
    if command == "fit":  # the config format, with its example, verbatim
        assert "[monitor]" in out and 'name = "gaussian"' in out and '"estimator":' in out
        assert '"blocks/*/mlp_out" = { name = "gaussian"' in out
    elif command is not None:  # what it does, and an example
        assert "example:\n  jaxmon " + command in out


def test_help_describes_every_command_and_argument():
    sub = next(a for a in cli._parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"fit", "score", "rank", "report", "compare", "inspect"}
    for name, parser in sub.choices.items():
        assert len(parser.description or "") > 80, name
        for action in parser._actions:
            assert action.help, (name, action.dest)


def _one_sentence(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].endswith((".", "?")), err
    return lines[0]


def test_usage_errors_are_one_sentence(capsys):
    for argv in (["fit", "cfg.toml"], ["frobnicate"], ["inspect", "ck", "--step", "x"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        line = _one_sentence(capsys.readouterr().err)
        assert line.startswith("jaxmon") and "--help" in line


def test_unexpected_failures_are_one_line_unless_debugging(monkeypatch, capsys, tmp_path):
    def boom(args):
        raise RuntimeError("deep inside\n" + "x" * 3000)

    monkeypatch.setattr(cli, "_inspect", boom)
    monkeypatch.delenv("JAXMON_DEBUG", raising=False)
    assert cli.main(["inspect", str(tmp_path)]) == 2
    line = _one_sentence(capsys.readouterr().err)
    assert "unexpected RuntimeError: deep inside" in line and len(line) < 300
    assert "JAXMON_DEBUG=1" in line
    monkeypatch.setenv("JAXMON_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["inspect", str(tmp_path)])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_inspect", interrupted)
    assert cli.main(["inspect", str(tmp_path)]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_inspect_score_report_compare(tmp_path, rng):
    _store(tmp_path / "store", rng)
    cfg = tmp_path / "fit.toml"
    cfg.write_text(
        'split = "trusted"\n'
        '[monitor]\n"blocks/*/out" = { name = "gaussian", params = { shrinkage = 0.1 } }\n'
    )
    r = _run("fit", cfg, tmp_path / "store", "-o", tmp_path / "ck")
    assert r.returncode == 0, r.stderr
    ck = jaxmon.load(tmp_path / "ck")
    assert ck.estimator.spec.name == "monitor" and ck.fitted is not None
    assert ck.metadata["example"]["dict"]["blocks/1/out"] == {"shape": [4], "dtype": "float32"}
    # The fit equals fitting the same rows in this process.
    mon = jaxmon.monitor({"blocks/*/out": jaxmon.gaussian(shrinkage=0.1)})
    state, _ = query.fit_store(tmp_path / "store", mon, split="trusted")
    np.testing.assert_allclose(
        ck.state["blocks/0/out"].m2, state["blocks/0/out"].m2, rtol=1e-5, atol=1e-5
    )

    cfg2 = tmp_path / "fit2.toml"
    cfg2.write_text(cfg.read_text().replace('split = "trusted"', 'split = "query"', 1))
    # Independent commands run side by side: each pays the interpreter and jax start-up.
    inspect, score, _ = _parallel(
        ("inspect", tmp_path / "ck", "--json"),
        ("score", tmp_path / "store", tmp_path / "ck", "-o", tmp_path / "q", "--top-k", "5"),
        ("fit", cfg2, tmp_path / "store", "-o", tmp_path / "ck2"),
    )
    info = json.loads(inspect)
    assert info["estimator"]["name"] == "monitor" and info["has_fitted"]
    assert "scored 720 tokens" in score  # every split: trusted, heldout and query rows
    res = query.load_result(tmp_path / "q")
    assert sorted(res.keys) == ["blocks/0/out", "blocks/1/out"]
    assert len(res.top("blocks/0/out")) == 5

    _, compare, rank = _parallel(
        ("report", tmp_path / "q", "-o", tmp_path / "rep"),
        ("compare", tmp_path / "ck", tmp_path / "ck2", "--json"),
        ("rank", tmp_path / "store", "--query", tmp_path / "q", "--n-boot", "20", "--json"),
    )
    ranked = json.loads(rank)
    want = query.rank_store(tmp_path / "store", query=tmp_path / "q", n_boot=20)
    assert [(r["key"], r["level"], r["auroc"]) for r in ranked] == [
        (r["key"], r["level"], r["auroc"]) for r in want
    ]
    assert ranked[0]["auroc"] > 0.9 and ranked[0]["ci_low"] <= ranked[0]["auroc"]
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "blocks/0/out" in page and "<mark" in page and "hist_000.png" in page
    assert (tmp_path / "rep" / "hist_001.png").read_bytes()[:4] == b"\x89PNG"
    comp = json.loads(compare)
    assert comp["blocks/0/out"]["kind"] == "gaussian" and comp["blocks/0/out"]["distance"] > 0


@pytest.mark.slow
def test_bad_inputs_exit_nonzero_with_one_sentence(tmp_path, rng):
    _store(tmp_path / "store", rng)
    est = jaxmon.gaussian()
    example = jax.ShapeDtypeStruct((8,), jnp.float32)
    state, _ = query.fit_store(tmp_path / "store", est, tap="blocks/0/out")
    checkpoint.save(tmp_path / "ck", est, state, example=example)
    checkpoint.save(
        tmp_path / "ck_diag",
        jaxmon.gaussian(diagonal=True),
        jaxmon.gaussian(diagonal=True).init(example),
        example=example,
    )
    shutil.copytree(tmp_path / "store", tmp_path / "cut")
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    os.remove(tmp_path / "cut" / manifest["taps"]["blocks/0/out"]["path"] / "c" / "1" / "0")
    shutil.copytree(tmp_path / "ck", tmp_path / "ck_flip")
    data = max(
        (p for p in (tmp_path / "ck_flip" / "0" / "jaxmon_state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "fit.json").write_text(
        json.dumps({"tap": "blocks/0/out", "estimator": {"name": "gaussian"}})
    )
    (tmp_path / "unknown.json").write_text(
        json.dumps({"tap": "blocks/0/out", "estimator": {"name": "gausian"}})
    )
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nomatch.json").write_text(json.dumps({"monitor": {"mlp/*": {"name": "gaussian"}}}))
    cases = {
        "missing store": (
            ("score", tmp_path / "nowhere", tmp_path / "ck", "-o", tmp_path / "q1"),
            "no activation store",
        ),
        "wrong tap": (
            ("score", tmp_path / "store", tmp_path / "ck", "-o", tmp_path / "q2", "--tap", "x"),
            "has no tap 'x'",
        ),
        "spec mismatch": (
            ("compare", tmp_path / "ck", tmp_path / "ck_diag"),
            "different estimators",
        ),
        "truncated store": (
            (
                "score",
                tmp_path / "cut",
                tmp_path / "ck",
                "-o",
                tmp_path / "q3",
                "--tap",
                "blocks/0/out",
            ),
            "truncated: chunk 1 of tap 'blocks/0/out' is missing",
        ),
        "bad config": (
            ("fit", tmp_path / "bad.json", tmp_path / "store", "-o", tmp_path / "c"),
            "not valid JSON",
        ),
        "no tap matches": (
            ("fit", tmp_path / "nomatch.json", tmp_path / "store", "-o", tmp_path / "c2"),
            "mlp/*",
        ),
        "existing file as -o for fit": (
            ("fit", tmp_path / "fit.json", tmp_path / "store", "-o", tmp_path / "a_file"),
            "a_file is an existing file",
        ),
        "existing file as -o for score": (
            ("score", tmp_path / "store", tmp_path / "ck", "-o", tmp_path / "a_file"),
            "a_file is an existing file",
        ),
        "corrupted checkpoint, inspect": (
            ("inspect", tmp_path / "ck_flip"),
            f"checkpoint file {data.relative_to(tmp_path / 'ck_flip' / '0').as_posix()} of step 0",
        ),
        "corrupted checkpoint, score": (
            ("score", tmp_path / "store", tmp_path / "ck_flip", "-o", tmp_path / "q4"),
            "is corrupted",
        ),
        "unknown estimator": (
            ("fit", tmp_path / "unknown.json", tmp_path / "store", "-o", tmp_path / "c3"),
            "no estimator named 'gausian'",
        ),
    }
    # Start every case at once: each pays the interpreter and jax start-up.
    procs = {
        name: subprocess.Popen(
            _cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
        )
        for name, (args, _) in cases.items()
    }
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip() and "WARNING" not in ln]
        assert p.returncode == 2, (name, err)
        assert len(lines) == 1, (name, err)
        assert "Traceback" not in err, (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
        assert lines[0].startswith("jaxmon ") and lines[0].endswith((".", "?")), lines[0]
        if "checkpoint" in name:
            assert len(lines[0]) <= 340, lines[0]  # the 300-character sentence and its prefix
    assert not (tmp_path / "c3").exists() and (tmp_path / "a_file").read_text().startswith("not")


def test_distributed_flags_and_environment(monkeypatch, capsys, tmp_path):
    """--coordinator/--num-processes/--process-id (or JAX_* variables) start jax.distributed
    before any work, for fit and score only; bad values are one sentence."""
    calls = []

    def initialize(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("no coordinator there")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    fit = ["fit", str(tmp_path / "cfg.json"), str(tmp_path / "st"), "-o", str(tmp_path / "ck")]
    assert cli.main([*fit, "--num-processes", "2", "--process-id", "0"]) == 2
    assert "need --coordinator" in _one_sentence(capsys.readouterr().err) and not calls
    argv = [*fit, "--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "1"]
    assert cli.main(argv) == 2
    line = _one_sentence(capsys.readouterr().err)
    assert "cannot join the jax.distributed job at localhost:1" in line
    assert calls == [{"coordinator_address": "localhost:1", "num_processes": 2, "process_id": 1}]
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:7")
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    score = ["score", str(tmp_path / "st"), str(tmp_path / "ck"), "-o", str(tmp_path / "q")]
    assert cli.main(score) == 2
    assert "JAX_PROCESS_ID='x' is not an integer" in _one_sentence(capsys.readouterr().err)
    monkeypatch.delenv("JAX_PROCESS_ID")
    assert cli.main([*score, "--coordinator", "auto"]) == 2  # cluster detection: no arguments
    assert calls[-1] == {}
    capsys.readouterr()
    assert cli.main(score) == 2  # the address alone: jax detects the rest
    assert calls[-1] == {"coordinator_address": "host0:7"}
    n = len(calls)
    assert cli.main(["inspect", str(tmp_path / "ck")]) == 2  # one process: never joins
    assert len(calls) == n and "no checkpoint" in capsys.readouterr().err


def test_fit_with_a_calibration_split_equals_the_two_passes(tmp_path, rng, capsys):
    """`calibration_split` in the config: fit on `split`, then calibrate on the held-out split
    (the library's two passes), saved as one calibrated checkpoint."""
    _store(tmp_path / "store", rng)
    cfg = tmp_path / "fit.json"
    cfg.write_text(
        json.dumps(
            {
                "split": "trusted",
                "calibration_split": "heldout",
                "monitor": {"blocks/*/out": {"name": "gaussian", "params": {"shrinkage": 0.1}}},
            }
        )
    )
    assert cli.main(["fit", str(cfg), str(tmp_path / "store"), "-o", str(tmp_path / "ck")]) == 0
    assert "fitted calibrated on 240 of 720 logged rows" in capsys.readouterr().out
    ck = jaxmon.load(tmp_path / "ck")
    cal = jaxmon.calibrated(jaxmon.monitor({"blocks/*/out": jaxmon.gaussian(shrinkage=0.1)}))
    assert ck.estimator.spec == cal.spec
    state, _ = query.fit_store(tmp_path / "store", cal, split="trusted")
    state = jaxmon.begin_calibration(cal, state)
    state, _ = query.fit_store(tmp_path / "store", cal, state, split="heldout")
    assert jaxmon.num_rows(ck.state) == jaxmon.num_rows(state)
    for a, b in zip(jax.tree.leaves(ck.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    x = {t: query.open_store(tmp_path / "store").read(t, 0, 50).result() for t in state.inner}
    np.testing.assert_allclose(
        np.asarray(ck.estimator.score(ck.fitted, x)["blocks/0/out"]),
        np.asarray(cal.score(cal.finalize(state), x)["blocks/0/out"]),
        rtol=1e-5,
    )
