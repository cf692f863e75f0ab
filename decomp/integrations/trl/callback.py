"""``DecompositionCallback``: the decomp run directory of a TRL run, and the exact decomposition
of the coming optimizer step every ``decomp_every`` steps (see the package docstring).

The run directory is checked at train begin before anything is written (:func:`check_run_dir`):
a new run never erases an earlier run's records, and a resume never appends to records of other
settings; ``decomp_run.json`` is replaced atomically."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import trl
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from decomp import __version__
from decomp.instrument import instrument_update, record_count
from decomp.integrations.trl.align import MTPModelView, plain_forward, rollout_batch
from decomp.integrations.trl.heldout import heldout_batch
from decomp.integrations.trl.interface import MeasuredTrainer
from decomp.integrations.trl.loss import trl_rl_loss
from decomp.integrations.trl.support import unsupported_loss_settings
from decomp.runlog import (
    RUN_FILE,
    SCHEMA_VERSION,
    BadJSON,
    JsonlWriter,
    json_safe,
    parse_json,
    truncate_jsonl,
    write_json,
)



def metric_name(record: dict[str, Any], key: str) -> str:
    """The logger's name of a record's field: ``decomp/<key>`` for the active direction's
    training split, with ``<direction>/`` for a shadow direction and ``heldout/`` for the
    held-out split inserted (one list per name, so the splits are never averaged together)."""
    parts = ["decomp"]
    if record["direction"] != "active":
        parts.append(record["direction"])
    if record.get("split", "train") != "train":
        parts.append(record["split"])
    return "/".join([*parts, key])


class DecompositionCallback(TrainerCallback):
    """Writes the decomp run directory and, every ``every`` optimizer steps, the exact
    decomposition of the coming step (module docstring). Installed by the MTP trainer, which it
    reads through :class:`~decomp.integrations.trl.interface.MeasuredTrainer`.
    """

    def __init__(self, trainer: MeasuredTrainer, every: int = 0) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.trainer = trainer
        self.every = every
        self.out: Path | None = None
        self._writers: dict[str, JsonlWriter] = {}
        self._decomp_seconds = 0.0
        self._reward = math.nan  # mean reward of the latest generation batch

    # run directory ------------------------------------------------------------------------

    def _main(self) -> bool:
        return bool(self.trainer.accelerator.is_main_process)

    def _check_measurable(self) -> None:
        tr = self.trainer
        problems = unsupported_loss_settings(tr)
        if getattr(tr, "is_deepspeed_enabled", False) or getattr(tr, "is_fsdp_enabled", False):
            problems.append("DeepSpeed/FSDP (sharded parameters or optimizer state)")
        if problems:
            raise ValueError(f"decomp_every > 0: the decomposition does not support {', '.join(problems)}")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.every:
            self._check_measurable()
        if not self._main():
            return
        self.out = Path(self.trainer.decomp_dir or args.output_dir)
        run = {"config": self.run_config(args), "decomp_version": __version__, "schema_version": SCHEMA_VERSION}
        # TRL has restored global_step from the checkpoint by now: 0 is a new run, > 0 a resume
        prepare_run_dir(self.out, run, state.global_step, overwrite=self.trainer.decomp_overwrite)
        self._writers = {name: JsonlWriter(self.out / f"{name}.jsonl") for name in ("metrics", "decomposition")}

    def run_config(self, args: Any) -> dict[str, Any]:
        """The ``config`` of ``decomp_run.json``: the decomp configs and the trainer settings
        the records depend on (what a resume must keep unchanged, :func:`check_run_dir`)."""
        tr = self.trainer
        return {
            **asdict(tr.mtp_config),
            **asdict(tr.instrument_config),
            "trainer": "trl.GRPOTrainer",
            "trl_version": trl.__version__,
            "model": getattr(tr.model.config, "_name_or_path", ""),
            "seed": args.seed,
            "learning_rate": args.learning_rate,
            "loss_type": tr.loss_type,
            "beta": float(tr.beta),
            "num_generations": tr.num_generations,
            "num_iterations": tr.num_iterations,
            "steps_per_generation": args.steps_per_generation,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_grad_norm": args.max_grad_norm,
            "num_processes": tr.accelerator.num_processes,
            # the split exists only with evaluation prompts, whatever the config's default says
            "heldout": self.heldout,
            "heldout_prompts": 0 if tr.heldout_prompts is None else len(tr.heldout_prompts),
        }

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    # per step -----------------------------------------------------------------------------

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step + 1  # the step about to be taken
        if not self.every or step % self.every or not self._main() or self.trainer.last_micro_batch is None:
            return
        start = time.perf_counter()
        records = self.measure(step)
        tr = self.trainer
        for record in records:
            self._writers["decomposition"].write({"step": step, "regime": tr.regime.name, **record})
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    tr.log_metric(metric_name(record, key), float(value))
        self._decomp_seconds += time.perf_counter() - start

    @property
    def heldout(self) -> bool:
        """Whether decompositions get a held-out split (prompts given and not switched off)."""
        tr = self.trainer
        return tr.heldout_prompts is not None and bool(tr.instrument_config.heldout)

    def progress_bar(self, step: int, total: int) -> Any:
        """The progress bar over the ``total`` records of the instrumented step ``step``: it
        advances once per record, showing the direction and split just measured and its seconds.
        Off where the trainer's ``disable_tqdm`` is set (as TRL's own bar)."""
        return tqdm(total=total, desc=f"decomp step {step}", unit="record", leave=False, dynamic_ncols=True,
                    disable=bool(getattr(self.trainer.args, "disable_tqdm", False)))

    def measure(self, step: int | None = None) -> list[dict[str, Any]]:
        """The decomposition records of the coming optimizer step ``step`` (default: the next
        one): one per direction and split (``train``, and ``heldout`` when :attr:`heldout`),
        with a progress bar over them (:meth:`progress_bar`)."""
        tr = self.trainer
        micro = tr.last_micro_batch
        assert micro is not None
        step = tr.state.global_step + 1 if step is None else step
        inputs = micro["inputs"]
        lm = tr.accelerator.unwrap_model(tr.model)
        view = MTPModelView(lm, tr.temperature)
        batch = rollout_batch(inputs, micro["logp"])
        old = batch.response(batch.old_logp)
        optimizer = getattr(tr.optimizer, "optimizer", tr.optimizer)  # accelerate wraps it
        grad_clipped = self._grad_clipped(lm)
        directions = tr.instrument_config.directions
        with plain_forward(lm):
            # sampled in eval mode (no dropout) from the very parameters the updates start at
            eval_batch = heldout_batch(tr, view, step, batch.tokens.shape[0]) if self.heldout else None
            bar = self.progress_bar(step, record_count(directions, eval_batch))

            def advance(record: dict[str, Any]) -> None:
                copy = f" = {record['same_as']}" if record.get("same_as") else ""
                bar.set_postfix_str(f"{record['direction']}/{record['split']}{copy} {record['seconds']:.1f} s",
                                    refresh=False)
                bar.update(1)

            with bar:
                result = instrument_update(
                    view, batch, optimizer, tr.regime, scale=tr.mtp_config.mtp_scale, coef=float(micro["coef"]),
                    clip=(float(tr.epsilon_low), float(tr.epsilon_high)), directions=directions,
                    rl_loss_of_logp=trl_rl_loss(tr, inputs, old), eval_batch=eval_batch,
                    search_splits=tr.instrument_config.searched_splits,
                    realized_dtype=_realized_dtype(tr.instrument_config),
                    share_second_order=False,  # a real LM: one second-order graph alive at a time
                    hvp_microbatch_rows=tr.instrument_config.hvp_rows(real_lm=True),
                    on_record=advance,
                )
        return [{**r, "grad_clipped": grad_clipped} for r in result.decompositions]

    def _grad_clipped(self, lm: nn.Module) -> bool:
        max_norm = self.trainer.args.max_grad_norm
        if not max_norm or max_norm <= 0:
            return False
        grads = [p.grad for p in lm.parameters() if p.grad is not None]
        if not grads:
            return False
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        return norm >= max_norm * (1 - 1e-4)  # clipping scaled the gradient to max_norm

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        applied = self.trainer.pop_step_mtp()
        if not self._main() or "metrics" not in self._writers:
            return
        reward = self.trainer.last_logged("reward")
        if reward is not None:  # TRL logs one per generation batch and clears its log at each log
            self._reward = reward
        self._writers["metrics"].write({
            "step": state.global_step, "regime": self.trainer.regime.name, "reward_mean": self._reward,
            "mtp_coef": applied["coef"], "mtp_loss": applied["loss"], "decomp_seconds": self._decomp_seconds,
        })
        self._decomp_seconds = 0.0


def _realized_dtype(cfg) -> torch.dtype:
    """A TRL model is a Hugging Face LM: ``auto`` evaluates the realized changes in float64."""
    return torch.float64 if cfg.realized_dtype == "auto" else getattr(torch, cfg.realized_dtype)


# the run directory ----------------------------------------------------------------------------

RECORD_FILES = ("metrics.jsonl", "decomposition.jsonl")
# config keys a resume may change: the environment, not the run's settings (a TRL patch release
# installed between a crash and its resume must not cost the records); a change warns and the
# rewritten decomp_run.json names the new version. Every other key, and the schema, must match.
RESUMABLE_KEYS = ("trl_version",)


def prepare_run_dir(out: Path, run: dict[str, Any], step: int, *, overwrite: bool = False) -> None:
    """Make ``out`` the run directory of a training starting at ``step`` (0: a new run, else a
    resume from that checkpoint step) and write ``run`` as its ``decomp_run.json``.

    Checked first, touching nothing (:func:`check_run_dir`); then the records of steps after the
    checkpoint are dropped (a resume) or, with ``overwrite``, all records are deleted.
    """
    out.mkdir(parents=True, exist_ok=True)
    check_run_dir(out, run, step, overwrite=overwrite)
    for name in RECORD_FILES:
        if overwrite:
            (out / name).unlink(missing_ok=True)
        else:  # a resumed run: drop records of steps after the checkpoint (none exist for a new run)
            truncate_jsonl(out / name, lambda r: isinstance(r.get("step"), int) and r["step"] <= step)
    write_json(out / RUN_FILE, run)  # atomic: a run killed meanwhile leaves the old file or the new one


def check_run_dir(out: Path, run: dict[str, Any], step: int, *, overwrite: bool = False) -> None:
    """Raise a one-line ``ValueError`` saying how to proceed where writing ``run`` into ``out``
    would lose or mix records, without touching the folder.

    A new run (``step`` 0) is refused when ``out`` holds decomp files of an earlier one: starting
    over would erase them (the trainer's ``decomp_overwrite=True`` allows it). A resume is refused
    when the saved ``decomp_run.json`` is unreadable or its settings differ from ``run``'s (beyond
    :data:`RESUMABLE_KEYS`): the records before and after the resume would describe two runs.
    """
    found = [name for name in (RUN_FILE, *RECORD_FILES) if (out / name).exists()]
    if overwrite or not found:
        return
    if step == 0:
        raise ValueError(
            f"{out} already holds the decomp records of another run ({', '.join(found)}) and this training does not "
            "resume from a checkpoint: choose another decomp_dir (or output_dir), resume with "
            "trainer.train(resume_from_checkpoint=...), or pass decomp_overwrite=True to the trainer to replace them"
        )
    if not (out / RUN_FILE).exists():
        return  # nothing to compare with (deleted by the user): the records are kept up to the checkpoint
    saved = saved_run(out / RUN_FILE)
    changed = changed_keys(saved, run)
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        old, new = _comparable(saved), _comparable(run)
        diff = "; ".join(f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in refused)
        raise ValueError(
            f"cannot resume into {out}: its {RUN_FILE} has other settings (saved vs this trainer: {diff}); resume "
            "with the same settings, choose another decomp_dir, or pass decomp_overwrite=True to the trainer to "
            "replace its records"
        )
    for key in changed:
        warnings.warn(f"resuming {out} with {key}={run['config'].get(key)!r} (the run started with "
                      f"{saved['config'].get(key)!r}); {RUN_FILE} now records the new value", UserWarning, stacklevel=2)


def saved_run(path: Path) -> dict[str, Any]:
    """The content of a ``decomp_run.json``; a one-line ``ValueError`` with the way out when it is
    unreadable (a resume cannot check its settings against a file it cannot read)."""
    way_out = "delete it, or pass decomp_overwrite=True to the trainer to replace the folder's decomp records"
    try:
        data = parse_json(path.read_bytes())
    except (OSError, BadJSON) as err:
        problem = f"{type(err).__name__}: {err}"[:200].replace("\n", " ")
        raise ValueError(f"{path} is unreadable ({problem}); {way_out}") from None
    if not (isinstance(data, dict) and isinstance(data.get("config"), dict) and "schema_version" in data):
        raise ValueError(f"{path} is not a decomp run description (no config and schema_version); {way_out}")
    return data


def changed_keys(saved: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """The config keys (and ``schema_version``) whose values differ between two run descriptions,
    compared as JSON reads them back (tuples as lists, non-finite floats as ``null``)."""
    old, new = _comparable(saved), _comparable(run)
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _comparable(run: dict[str, Any]) -> dict[str, Any]:
    flat = {**run.get("config", {}), "schema_version": run.get("schema_version")}
    return json.loads(json.dumps(json_safe(flat)))
