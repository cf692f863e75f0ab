"""What the decomp callback reads from the trainer it measures: a small interface, so that the
callback never imports the trainer (which installs it) and the trainer's internals stay its own.

:class:`~decomp.integrations.trl.trainer.MTPGRPOTrainer` implements :class:`MeasuredTrainer`;
beyond these members the callback reads only attributes of TRL's ``GRPOTrainer`` itself
(``accelerator``, ``model``, ``optimizer``, ``state``, ``args``, ``loss_type``, ``beta``,
``temperature``, ``epsilon_low``/``epsilon_high``, ``num_generations``, ``num_iterations``),
whose tested range :mod:`decomp.integrations.trl.support` states.
"""

from __future__ import annotations

from typing import Any, Protocol

from decomp.config import InstrumentConfig, MTPConfig
from decomp.regimes import Regime


class MeasuredTrainer(Protocol):
    """The MTP trainer as :class:`~decomp.integrations.trl.callback.DecompositionCallback` sees it."""

    mtp_config: MTPConfig
    instrument_config: InstrumentConfig
    regime: Regime
    decomp_dir: str  # the run directory ("" for the trainer's output_dir)
    decomp_overwrite: bool  # whether a new run may replace an earlier run's records there
    heldout_prompts: Any  # evaluation prompts for the held-out split, or None
    last_micro_batch: dict[str, Any] | None  # the last training micro-batch and the λ applied to it

    def pop_step_mtp(self) -> dict[str, float]:
        """Mean applied ``λ`` and ``L_MTP`` over the micro-batches since the last call."""
        ...

    def log_metric(self, name: str, value: float) -> None:
        """Append ``value`` to the trainer's training log under ``name``."""
        ...

    def last_logged(self, name: str) -> float | None:
        """The last value logged under ``name`` since the trainer's last log, or ``None``."""
        ...
