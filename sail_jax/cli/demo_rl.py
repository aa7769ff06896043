"""`sail-jax demo-rl`: RL with verifiable rewards raising held-out accuracy on CPU (a short SFT of the demo model,
then DAPO on generated count / colour questions; see sail_jax/evaluation/demo_rl.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-rl", help="unfinished SFT of the demo model, then RL on count/colour questions: held-out "
                                       "greedy accuracy before -> after RL")
    p.add_argument("--out", default="demo_rl_out", help="directory for data, sft/, rl/ and demo_rl_results.json "
                                                        "(replaced if it exists)")
    p.add_argument("--n", type=int, default=3000, help="SFT samples to generate")
    p.add_argument("--sft-steps", type=int, default=60,
                   help="the SFT step RL starts from: mid-schedule on purpose, so the model reads counts only partly")
    p.add_argument("--sft-schedule", type=int, default=100, help="length of the SFT learning-rate schedule")
    p.add_argument("--episodes", type=int, default=10, help="RL episodes")
    p.add_argument("--prompts-per-episode", type=int, default=16, help="prompts per RL episode")
    p.add_argument("--samples", type=int, default=8, help="sampled completions per prompt (the group size)")
    p.add_argument("--n-heldout", type=int, default=1600,
                   help="held-out demo samples; ~1/4 give a count or colour question (~400 by default)")
    p.add_argument("--n-rl", type=int, default=2400, help="demo samples drawn for RL prompts (~1/4 are kept)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, SFT and RL")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sail_jax.evaluation.demo_rl import run_demo_rl

    result = run_demo_rl(args.out, n=args.n, sft_steps=args.sft_steps, sft_schedule=args.sft_schedule,
                         episodes=args.episodes,
                         prompts_per_episode=args.prompts_per_episode, samples_per_prompt=args.samples,
                         n_heldout=args.n_heldout, n_rl=args.n_rl, seed=args.seed)
    print(f"before {result['heldout_accuracy_before']:.4f} after {result['heldout_accuracy_after']:.4f}")
    return 0
