"""Integrations with existing RL trainers (optional extras).

- :mod:`decomp.integrations.trl`: the MTP regimes, OCC and the exact decomposition inside TRL's
  ``GRPOTrainer`` (``pip install 'decomp[trl]'``).
"""
