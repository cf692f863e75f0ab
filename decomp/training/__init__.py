"""The reference RLVR harness: tasks, warm start, policies (built-in and Hugging Face), the
instrumented GRPO loop, its run directories and the ``decomp`` command line.

Training code calls the measurement core (:mod:`decomp.instrument`); nothing in the core imports
from here.
"""
