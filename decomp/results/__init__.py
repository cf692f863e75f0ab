"""Results of run directories, as ``decomp plot``, ``validate`` and ``report`` give them:
figures, estimator validation, claims and reports.

This package only reads run directories written by :mod:`decomp.training.loop` (or any trainer writing
the same JSONL schema); it never imports the training code.
"""
