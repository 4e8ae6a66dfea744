"""`make demo`: monitor a backdoored language model end to end (``python -m jaxmon.demo``).

1. **Train** a small causal transformer LM (Flax NNX, optax) on the docstrings of Python's own
   standard library, byte-level; a few training windows carry a trigger after which the text
   switches to a fixed payload. Report the clean loss and the attack success rate.
2. **Monitor** every block's residual stream and MLP output inside the jitted train step, on
   the trusted (untriggered) rows of each batch, and save the monitor with the model in one
   orbax checkpoint.
3. **Log** every tap's activations over a query set (held-out clean, triggered, word-shuffled
   and Python source code) to zarr, with token text and labels.
4. **Answer from the checkpoint alone**, in a fresh process: load the monitor, calibrate it on
   held-out clean text, batch-score the store once, fit probes from 20 labelled sequences of
   each anomaly kind (never in the query set), print one table (AUROC and recall at 1% FPR per
   detector, tap and anomaly kind, at token and sequence level, plus the calibrated multi-tap
   combinations and the probes), rank the monitor's keys with the labelled examples
   (``jaxmon rank``), and write the HTML report.

Run ``python -m jaxmon.demo --quick`` for a small run (the test suite's), or with no flags for the
default run.

The demo is a user of jaxmon, not a part of it: it imports only the public API (``jaxmon``,
``jaxmon.query``, ``jaxmon.io``, ``jaxmon.checkpoint``, ``jaxmon.nnx``, ``jaxmon.report``,
``jaxmon.metrics``). Its modules, one per stage:

* :mod:`~jaxmon.demo.lm`: the toy language model, its corpus and its query set;
* :mod:`~jaxmon.demo.train`: stages 1-2 (training with the monitor in the step, the checkpoint);
* :mod:`~jaxmon.demo.activations`: stage 3 (logging the taps to activation stores);
* :mod:`~jaxmon.demo.answer` and :mod:`~jaxmon.demo.table`: stage 4 and its result table;
* :mod:`~jaxmon.demo.run`: the command line; :mod:`~jaxmon.demo.common`: sizes, console, bars.

Outputs under ``--out`` (default ``runs/demo``): ``checkpoint/`` (orbax: model parameters and the
monitor's state, fitted value and metadata), ``store/query``, ``store/calib`` and
``store/probe`` (activation stores; ``probe`` holds the labelled examples), the batch-query
outputs ``scores/`` (raw and calibrated -log10 p of the query set, scored once),
``scores_calib/`` (the calibration text), ``scores_probe/`` (the probes) and
``scores_examples/`` (the labelled examples, for ``jaxmon rank``), ``report/index.html``,
``table.txt``, and ``train.json`` / ``log.json`` / ``summary.json`` (every figure printed).
"""

from jaxmon.demo.run import main

__all__ = ["main"]
