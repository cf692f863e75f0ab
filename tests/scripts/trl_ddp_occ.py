"""Run by tests/test_trl.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): an OCC run whose
ranks save, before every optimizer step, the λ they applied and the proxy inputs of their own
micro-batch, so the test can check that every rank applied the estimate of the union; the
decomposition (rank 0 only) samples a held-out batch too, which must not block the other rank. Arguments: checkpoint folder, output folder, ``checkpointing`` or ``plain`` (activation
checkpointing on or off: off, transformers would ask DDP to look for unused parameters)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
from trl import GRPOConfig

from decomp.integrations.trl import InstrumentConfig, MTPConfig, MTPGRPOTrainer
from decomp.training.texttasks import make_text_task


def digit_reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


class Save(TrainerCallback):
    def __init__(self, trainer, out: Path) -> None:
        self.trainer, self.out, self.rows = trainer, out, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        micro = self.trainer.last_micro_batch
        t = micro["tensors"]
        self.rows.append({"step": state.global_step + 1, "coef": micro["coef"], "a": t["mtp_logp"][0] - t["old_logp"],
                          "b": t["logp"] - t["old_logp"], "mask": t["mask"][0]})

    def on_train_end(self, args, state, control, **kwargs):
        torch.save(self.rows, self.out / f"rank{self.trainer.accelerator.process_index}.pt")


def main() -> None:
    checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
    checkpointing = sys.argv[3] == "checkpointing" if len(sys.argv) > 3 else True
    task = make_text_task("add1")
    data = Dataset.from_list([{"prompt": p.question, "answer": p.answer} for p in task.train])
    config = GRPOConfig(output_dir=str(out), use_cpu=True, per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                        max_steps=2, num_iterations=2, learning_rate=1e-3, save_strategy="no", seed=0, report_to=[],
                        bf16=False, max_grad_norm=0.0, logging_steps=1, disable_tqdm=True,
                        gradient_checkpointing=checkpointing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=LlamaForCausalLM.from_pretrained(checkpoint), reward_funcs=digit_reward,
                                 args=config, train_dataset=data,
                                 processing_class=AutoTokenizer.from_pretrained(checkpoint),
                                 mtp_config=MTPConfig(regime="occ"),
                                 instrument_config=InstrumentConfig(decomp_every=2),
                                 heldout_prompts=[{"prompt": p.question, "answer": p.answer} for p in task.held_out])
        trainer.add_callback(Save(trainer, out))
        trainer.train()
    if torch.distributed.is_initialized():  # a clean shutdown: gloo's threads joined before exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
