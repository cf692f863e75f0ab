"""The study: experiment definitions, the runs they need, and the code that turns their run
directories into the committed ``figures/`` and ``figures/STUDY.md`` (``make study``).

Not installed with decomp: the library part every run directory can use is
:mod:`decomp.results`; this folder is the experiment that the project reports.
"""
