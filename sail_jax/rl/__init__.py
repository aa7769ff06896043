"""RL post-training pieces that do not depend on the engine or trainer: the DAPO/GSPO policy loss, group advantages
and overlong shaping, verifiable / judge / mixed rewards, DAPO dynamic sampling and the RL prompt reader."""

from sail_jax.rl.advantages import group_advantages, overlong_penalty
from sail_jax.rl.dynamic_sampling import GroupBatch, GroupFilter, fill_batch, filter_groups
from sail_jax.rl.judge import HttpJudge, Judge, JudgeError, load_callable, make_judge
from sail_jax.rl.loss import agg_denom, agg_loss, per_token_loss, policy_loss
from sail_jax.rl.prompts import PromptSet, RLPrompt, parse_prompt, read_prompts
from sail_jax.rl.rewards import (
    KINDS,
    RewardWeights,
    answer_reward,
    count_reward,
    extract_boxed,
    final_answer,
    format_reward,
    math_equal,
    math_reward,
    mcq_reward,
    mixed_reward,
    option_letter,
)

__all__ = [
    "KINDS", "GroupBatch", "GroupFilter", "HttpJudge", "Judge", "JudgeError", "PromptSet", "RLPrompt", "RewardWeights",
    "agg_denom", "agg_loss", "answer_reward", "count_reward", "extract_boxed", "fill_batch", "filter_groups",
    "final_answer", "format_reward", "group_advantages", "load_callable", "make_judge", "math_equal", "math_reward",
    "mcq_reward", "mixed_reward", "option_letter", "overlong_penalty", "parse_prompt", "per_token_loss",
    "policy_loss", "read_prompts",
]
