"""The ``jaxmon`` command line: fit, score, report, compare, inspect.

Every bad input (missing path, wrong tap name, spec mismatch, truncated store, bad config)
exits with status 2 and one sentence on stderr; set ``JAXMON_DEBUG=1`` for the traceback.

Config files for ``fit`` (JSON or TOML) describe one estimator or a monitor::

    # fit.toml
    split = "trusted"                 # rows to fit on (optional; default: all rows)
    calibration_split = "heldout"     # optional: calibrate p-values on these held-out rows
                                      # (then split is needed, and another split)
    block_rows = 65536                # optional

    [monitor]                         # pattern -> spec, or -> {detector: spec}
    "blocks/*/mlp_out" = { name = "gaussian", params = { shrinkage = "ledoit_wolf" } }
    "blocks/0/out -> blocks/1/out" = { name = "transition" }   # a pair of taps

or, for a single tap::

    tap = "resid"
    [estimator]
    name = "gaussian"
    params = { diagonal = true }

The same in JSON (any file not ending in ``.toml``)::

    {"tap": "resid", "estimator": {"name": "gaussian", "params": {"diagonal": true}}}

Estimator names are those of ``jaxmon.registered()``; their parameters are the factories'
keyword arguments.

Many processes: ``fit`` and ``score`` run unchanged as the N processes of a ``jax.distributed``
job (each its own devices, the store and outputs on a file system all of them see), e.g.::

    jaxmon fit cfg.toml STORE -o CK --coordinator host0:1234 --num-processes 2 --process-id 0
    jaxmon fit cfg.toml STORE -o CK --coordinator host0:1234 --num-processes 2 --process-id 1

The flags default to the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; ``--coordinator auto`` (or only
``JAX_COORDINATOR_ADDRESS``) leaves the rest to jax's cluster detection (Slurm, Open MPI,
Cloud TPU, Kubernetes). ``jax.distributed`` is initialised before anything else touches a
device; blocks are split over the processes and the results (checkpoint, scores, summary) are
those of one process. Only process 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import tomllib
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


class CliError(Exception):
    """A bad input, reported as one sentence."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one sentence too (exit status 2)."""

    def error(self, message: str):
        hint = f"see `{self.prog} --help`"
        self.exit(2, f"{self.prog}: error: {_sentence(message, hint)}\n")


def _config_help() -> str:
    """The config-file part of this module's docstring, shown by ``jaxmon fit --help``."""
    doc = __doc__ or ""
    start = doc.find("Config files")
    return doc[start:].replace("``", "").replace("::", ":") if start >= 0 else ""


def _writable_dir(path: str, flag: str = "-o") -> None:
    """Refuses an output path that exists as a file, before any work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{flag} {path} is an existing file; give a directory path")


def _distributed(args) -> None:
    """Joins the ``jax.distributed`` job the flags or environment describe (if any).

    Must run before anything touches a JAX device (jax refuses to initialise afterwards).
    """
    if args.command not in ("fit", "score"):
        return  # the other commands read one checkpoint or query: one process
    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num, pid = args.num_processes, args.process_id
    try:
        num = num if num is not None else _env_int("JAX_NUM_PROCESSES")
        pid = pid if pid is not None else _env_int("JAX_PROCESS_ID")
    except ValueError as e:
        raise CliError(str(e)) from None
    if coordinator is None and num is None and pid is None:
        return  # one process, as always
    if coordinator is None:
        raise CliError(
            "--num-processes/--process-id need --coordinator HOST:PORT (process 0's address), "
            "or --coordinator auto for jax's cluster detection"
        )
    kwargs: dict[str, Any] = {}
    if coordinator != "auto":
        kwargs["coordinator_address"] = coordinator
    if num is not None:
        kwargs["num_processes"] = num
    if pid is not None:
        kwargs["process_id"] = pid
    import jax

    from jaxmon.errors import one_line

    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:
        raise CliError(
            f"cannot join the jax.distributed job at {coordinator} ({one_line(e, 200)})"
        ) from e


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name}={value!r} is not an integer") from None


def _primary() -> bool:
    """Whether this process reports (process 0 of a job; the only process otherwise)."""
    import jax

    return jax.process_index() == 0


def _load_config(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise CliError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            return tomllib.loads(raw.decode())
        return json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CliError(
            f"config file {path} is not valid {'TOML' if path.endswith('.toml') else 'JSON'} ({e})"
        ) from None


def _spec_estimator(spec: Any, where: str):
    import jaxmon
    from jaxmon.errors import ConfigError, one_line

    if isinstance(spec, dict) and "name" in spec:
        try:
            return jaxmon.from_spec({"params": {}, **spec})
        except (ConfigError, TypeError, ValueError) as e:
            raise CliError(f"{where}: {one_line(e, 500)}") from e
    if isinstance(spec, dict):
        return {k: _spec_estimator(v, f"{where}.{k}") for k, v in spec.items()}
    raise CliError(f"{where} must be an estimator spec like {{name = 'gaussian', params = {{}}}}")


def _build(config: dict[str, Any]):
    """(estimator, tap or None) from a config."""
    import jaxmon

    if not isinstance(config, dict):
        raise CliError("the config must be a table (a JSON object) with a monitor or an estimator")
    if ("monitor" in config) == ("estimator" in config):
        raise CliError("the config must have exactly one of a [monitor] or an [estimator] table")
    if "monitor" in config and not isinstance(config["monitor"], dict):
        raise CliError("[monitor] must be a table of tap pattern -> estimator spec")
    if "estimator" in config:
        est = _spec_estimator(config["estimator"], "estimator")
        if isinstance(est, dict):
            raise CliError("[estimator] must be one spec with a name; use [monitor] for several")
        return est, config.get("tap")
    from jaxmon._keys import parse_pattern

    mon = {}
    for pattern, spec in config["monitor"].items():
        mon[parse_pattern(pattern)] = _spec_estimator(spec, f"monitor[{pattern!r}]")
    return jaxmon.monitor(mon), None


def _fit(args) -> None:
    import jaxmon
    from jaxmon import checkpoint, query

    _writable_dir(args.out)
    config = _load_config(args.config)
    est, tap = _build(config)
    store = query.open_store(args.store)
    split = args.split or config.get("split")
    cal_split = config.get("calibration_split")
    kw = {"tap": tap, "block_rows": config.get("block_rows")}
    if cal_split is None:
        state, example = query.fit_store(store, est, split=split, **kw)
        fitted = est.finalize(state)
    else:  # the two passes: fit on `split`, then p-values from the held-out rows
        est, state, fitted, example = query.calibrate_store(
            store, est, fit_split=split, calibration_split=cal_split, **kw
        )
    meta = {"store": store.directory, "split": split, "config": config}
    checkpoint.save(
        args.out, est, state, fitted=fitted, step=args.step, metadata=meta, example=example
    )
    rows = jaxmon.num_rows(state)
    if isinstance(rows, dict):  # a monitor: one counter per key (and per calibration sketch)
        rows = max(rows.values())
    if _primary():
        print(f"fitted {est.spec.name} on {rows:,} of {store.rows:,} logged rows; saved {args.out}")


def _score(args) -> None:
    from jaxmon import checkpoint, query

    _writable_dir(args.out)
    ck = checkpoint.load(args.checkpoint, step=args.step)
    ck_meta_tap = (ck.metadata.get("user") or {}).get("config", {}).get("tap")
    res = query.score_store(
        args.store,
        ck,
        out=args.out,
        tap=args.tap or ck_meta_tap,
        block_rows=args.block_rows,
        top_k=args.top_k,
        resume=not args.restart,
    )
    if not _primary():
        return
    print(f"scored {res.rows:,} tokens into {res.directory}")
    for key in res.keys:
        top = res.top(key)[:3]
        best = ", ".join(f"row {t['row']} ({t['score']:.4g})" for t in top)
        print(f"  {key}: most anomalous {best}")


def _rank(args) -> None:
    import jaxmon
    from jaxmon import query

    if (args.checkpoint is None) == (args.query is None):
        raise CliError("rank needs a CHECKPOINT to score the store with, or --query Q (not both)")
    if args.checkpoint is not None and args.out is None:
        raise CliError("rank with a checkpoint scores the store: give -o OUT for the scores")
    kw = {}
    if args.checkpoint is not None:
        from jaxmon import checkpoint

        _writable_dir(args.out)
        kw = {"est_or_checkpoint": checkpoint.load(args.checkpoint), "out": args.out}
        if args.tap:
            kw["tap"] = args.tap
    ranked = query.rank_store(
        args.store,
        query=args.query,
        flagged=args.flagged,
        trusted=args.trusted,
        window=args.window,
        fpr=args.fpr,
        n_boot=args.n_boot,
        **kw,
    )
    if args.json:
        print(json.dumps(ranked, indent=1))
        return
    n = ranked[0]
    print(
        f"{len(ranked)} keys and aggregations ranked by AUROC of {n['n_flagged']:,} rows labelled "
        f"{args.flagged} against {n['n_clean']:,} labelled {args.trusted} (token level; "
        f"{args.n_boot} bootstrap resamples, 95% intervals; recall at {args.fpr:g} FPR):"
    )
    print(jaxmon.format_ranking(ranked, limit=args.limit))


def _report(args) -> None:
    from jaxmon import report

    _writable_dir(args.out)
    path = report.write_report(
        args.query, args.out, trusted=args.trusted, trusted_split=args.trusted_split
    )
    print(f"wrote {path}")


def _compare(args) -> None:
    import jaxmon
    from jaxmon import checkpoint
    from jaxmon._keys import kind_of

    a = checkpoint.load(args.a)
    b = checkpoint.load(args.b)
    if a.metadata["spec"] != b.metadata["spec"]:
        raise CliError(
            f"the checkpoints hold different estimators ({a.metadata['spec']['name']} vs "
            f"{b.metadata['spec']['name']} or different hyperparameters); compare needs two "
            "checkpoints of the same monitor"
        )
    fa = a.fitted if a.fitted is not None else a.estimator.finalize(a.state)
    fb = b.fitted if b.fitted is not None else b.estimator.finalize(b.state)
    results = {}
    if kind_of(a.estimator).calibrated:  # the inner fits and the score sketches, apart
        inner = jaxmon.compare(fa.inner, fb.inner, skip_unsupported=True)
        sk = jaxmon.compare(fa.scores, fb.scores, skip_unsupported=True)
        inner = inner if isinstance(inner, dict) else {"": inner}
        sk = sk if isinstance(sk, dict) else {"": sk}
        results.update(inner)
        results.update({f"{k} (score sketch)".strip(): v for k, v in sk.items()})
    else:
        res = jaxmon.compare(fa, fb, skip_unsupported=True)
        results = res if isinstance(res, dict) else {"": res}
    if args.json:
        print(json.dumps({k: r._asdict() for k, r in results.items()}, default=float, indent=1))
    else:
        print(jaxmon.comparison_table(results))


def _inspect(args) -> None:
    import jax

    from jaxmon import checkpoint

    ck = checkpoint.load(args.checkpoint, step=args.step)
    m = ck.metadata
    leaves = jax.tree_util.tree_leaves_with_path(ck.state)
    info = {
        "path": os.path.abspath(args.checkpoint),
        "steps": checkpoint.steps(args.checkpoint),
        "step": ck.step,
        "format_version": m["format_version"],
        "estimator": m["spec"],
        "jaxmon_version": m["jaxmon_version"],
        "created": m["created"],
        "example": m["example"],
        "rows": m["rows"],
        "nonfinite": m["nonfinite"],
        "has_fitted": ck.fitted is not None,
        "state_leaves": {jax.tree_util.keystr(p): f"{x.dtype}{list(x.shape)}" for p, x in leaves},
        "state_bytes": int(sum(x.size * x.dtype.itemsize for _, x in leaves)),
        "user": m["user"],
    }
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return
    print(f"jaxmon checkpoint {info['path']} step {ck.step} (steps {info['steps']})")
    print(f"  estimator: {json.dumps(m['spec'])}")
    print(
        f"  written by jaxmon {m['jaxmon_version']} at {m['created']} (checkpoint format "
        f"{m['format_version']}, every file verified against its digest)"
    )
    print(f"  init example: {json.dumps(m['example'])}")
    print(f"  rows: {json.dumps(m['rows'])}  non-finite: {json.dumps(m['nonfinite'])}")
    print(f"  fitted values: {'yes' if info['has_fitted'] else 'no'}")
    print(f"  state: {len(leaves)} arrays, {info['state_bytes']:,} bytes")
    for p, s in list(info["state_leaves"].items())[:40]:
        print(f"    {p}: {s}")
    if m["user"]:
        print(f"  user metadata: {json.dumps(m['user'])[:500]}")


_EXIT = (
    "Bad input (a missing path, a wrong tap name, a truncated store, a bad config...) exits with "
    "status 2 and one sentence on stderr; JAXMON_DEBUG=1 shows the traceback."
)


def _wrap(text: str) -> str:
    # The help formatter keeps examples as written, so prose is wrapped here.
    return textwrap.fill(text, 88)


def _command(sub, name: str, summary: str, description: str, example: str, **kw):
    """A subcommand whose --help says what it does, its arguments and an example."""
    return sub.add_parser(
        name,
        help=summary,
        description=_wrap(description),
        epilog=f"example:\n  {example}\n\n{_wrap(_EXIT)}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )


def _distributed_flags() -> argparse.ArgumentParser:
    """The jax.distributed flags shared by ``fit`` and ``score`` (a parent parser)."""
    dist = _Parser(add_help=False)
    g = dist.add_argument_group("many processes (jax.distributed)")
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address, the same for every process (env JAX_COORDINATOR_ADDRESS); "
        "'auto': jax's cluster detection",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="processes in the job (env JAX_NUM_PROCESSES)",
    )
    g.add_argument(
        "--process-id", type=int, metavar="I", help="this process, 0..N-1 (env JAX_PROCESS_ID)"
    )
    return dist


def _add_fit(sub, dist) -> None:
    f = sub.add_parser(
        "fit",
        help="fit a monitor on logged activations and save a checkpoint",
        description=_wrap(
            "Fit a monitor (or one estimator) on the rows of an activation store and save it, "
            "with its fitted value, as a jaxmon checkpoint. With calibration_split in the "
            "config, the monitor is calibrated too: fitted on `split`, then its scores' null "
            "distribution from the held-out rows (jaxmon.query.calibrate_store), so `jaxmon "
            "score` gives -log10 p-values."
        ),
        epilog=f"{_config_help()}\n{_wrap(_EXIT)}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[dist],
    )
    f.add_argument("config", help="JSON or TOML file describing the estimator or monitor")
    f.add_argument("store", help="activation store directory (jaxmon.io.ActivationWriter)")
    f.add_argument("-o", "--out", required=True, help="checkpoint directory to write")
    f.add_argument("--split", help="fit only on rows of this split (overrides the config)")
    f.add_argument("--step", type=int, default=0, help="checkpoint step (default 0)")
    f.set_defaults(fn=_fit)


def _add_score(sub, dist) -> None:
    s = _command(
        sub,
        "score",
        "score every token of a store against a checkpoint",
        "Score every row (token) of an activation store with the monitor of a checkpoint, in "
        "blocks of bounded memory, and write per-token scores (zarr), the top-k most anomalous "
        "tokens per key, per-sequence aggregates and a summary into the output directory "
        "(jaxmon.query.score_store). An interrupted run resumes where it stopped. Prints the "
        "three most anomalous tokens of every key.",
        "jaxmon score STORE CK -o Q --top-k 50",
        parents=[dist],
    )
    s.add_argument("store", help="activation store directory")
    s.add_argument("checkpoint", help="checkpoint directory written by `jaxmon fit`")
    s.add_argument("-o", "--out", required=True, help="query output directory")
    s.add_argument("--tap", help="tap scored by a single-tap estimator")
    s.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    s.add_argument("--block-rows", type=int, help="rows per block (memory bound)")
    s.add_argument("--top-k", type=int, default=100, help="most anomalous tokens kept per key")
    s.add_argument("--restart", action="store_true", help="start over instead of resuming")
    s.set_defaults(fn=_score)


def _add_rank(sub) -> None:
    k = _command(
        sub,
        "rank",
        "rank a monitor's keys by how well they separate flagged rows of a store",
        "Rank every score key (and sequence aggregation) of a monitor by AUROC of the store's "
        "rows labelled --flagged against those labelled --trusted, with bootstrap confidence "
        "intervals and the recall at --fpr (jaxmon.query.rank_store). Scores the store with "
        "CHECKPOINT into -o, or ranks a finished query (--query).",
        "jaxmon rank STORE --query Q --flagged 1 --limit 10",
    )
    k.add_argument("store", help="activation store directory (its label column is used)")
    k.add_argument("checkpoint", nargs="?", help="checkpoint to score the store with")
    k.add_argument("-o", "--out", help="query output directory (with a checkpoint)")
    k.add_argument("--query", help="rank this finished query of the store instead of scoring")
    k.add_argument("--tap", help="tap scored by a single-tap estimator")
    k.add_argument(
        "--flagged", type=int, nargs="+", default=[1], help="label value(s) of flagged rows"
    )
    k.add_argument("--trusted", type=int, default=0, help="label value of clean rows")
    k.add_argument("--window", type=int, default=16, help="tokens per rolling window")
    k.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the recall")
    k.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples")
    k.add_argument("--limit", type=int, help="print only the best N entries")
    k.add_argument("--json", action="store_true", help="print JSON")
    k.set_defaults(fn=_rank)


def _add_report(sub) -> None:
    r = _command(
        sub,
        "report",
        "write an HTML report with PNG plots for a query",
        "Write an HTML report of a finished query (jaxmon.report.write_report): per score key, "
        "a histogram of trusted against query scores, token and sequence AUROC when labels "
        "were logged, and the most anomalous sequences as text when tokens were logged.",
        "jaxmon report Q -o REPORT --trusted Q_CLEAN",
    )
    r.add_argument("query", help="query output directory written by `jaxmon score`")
    r.add_argument("-o", "--out", required=True, help="report directory")
    r.add_argument("--trusted", help="a query over trusted data for the reference histogram")
    r.add_argument("--trusted-split", default="trusted", help="split name of trusted rows")
    r.set_defaults(fn=_report)


def _add_compare(sub) -> None:
    c = _command(
        sub,
        "compare",
        "compare two checkpoints of the same monitor, per tap",
        "Compare the fitted values of two checkpoints of the same monitor, per key "
        "(jaxmon.compare): Frechet distance and KL between Gaussians, the change of a "
        "transition map, principal angles between sketched subspaces, KS between quantile "
        "sketches. Audits what a dataset or a model edit changed inside the model.",
        "jaxmon compare CK_BEFORE CK_AFTER --json",
    )
    c.add_argument("a", help="reference checkpoint")
    c.add_argument("b", help="checkpoint to audit")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(fn=_compare)


def _add_inspect(sub) -> None:
    i = _command(
        sub,
        "inspect",
        "print what a checkpoint holds",
        "Print what a jaxmon checkpoint holds: its steps, estimator spec, jaxmon version, init "
        "example, row counts, whether it has fitted values, and its state's arrays. Every file "
        "is verified against its digest first.",
        "jaxmon inspect CK --json",
    )
    i.add_argument("checkpoint", help="checkpoint directory")
    i.add_argument("--step", type=int, help="step (default: latest)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(fn=_inspect)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jaxmon",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap(
            "Mechanistic anomaly detection over logged activations: fit monitors, score "
            "stores, rank, report, compare and inspect checkpoints. `jaxmon COMMAND --help` "
            "describes each command."
        ),
        epilog=_wrap(_EXIT),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dist = _distributed_flags()
    _add_fit(sub, dist)
    _add_score(sub, dist)
    _add_rank(sub)
    _add_report(sub)
    _add_compare(sub)
    _add_inspect(sub)
    return p


def _sentence(text: str, hint: str = "") -> str:
    """``text`` on one line, ending with a period (and ``hint`` after a semicolon)."""
    msg = " ".join(str(text).split())
    if hint:
        msg = f"{msg.rstrip('.')}; {hint}"
    return msg if msg.endswith((".", "?", "!")) else msg + "."


def _message(e: Exception) -> str:
    """One sentence for a failure: jaxmon's own errors as they are, anything else briefly."""
    from jaxmon.errors import JaxmonError, one_line

    if isinstance(e, JaxmonError | CliError):
        return _sentence(one_line(e, 400))
    if isinstance(e, OSError) and e.filename is not None:
        return _sentence(f"{e.strerror or type(e).__name__}: {e.filename}")
    # Not a failure jaxmon anticipated: still one line, with the way to the full traceback.
    return _sentence(
        f"unexpected {type(e).__name__}: {one_line(e, 200)}", "set JAXMON_DEBUG=1 for the traceback"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``jaxmon`` command line; returns the exit status.

    Every failure exits with status 2 and one sentence on stderr (``JAXMON_DEBUG=1`` re-raises
    it with its traceback); Ctrl-C exits with 130.
    """
    args = _parser().parse_args(argv)
    try:
        _distributed(args)  # first: nothing may touch a device before jax.distributed starts
        args.fn(args)
    except KeyboardInterrupt:
        print("jaxmon: interrupted.", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("JAXMON_DEBUG"):
            raise
        print(f"jaxmon {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
