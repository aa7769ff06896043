"""`sail-jax demo-rl` end to end at a tiny size (data -> step 2 of a 4-step SFT -> eval -> 2 RL episodes -> eval ->
results JSON), through the CLI in a subprocess; the rise itself is measured at full size (BUILD.md, RL loop)."""

from __future__ import annotations

import json
import subprocess
import sys

from sail_jax.evaluation.demo_rl import exact_match


def test_exact_match_judge_uses_the_heldout_scoring():
    assert exact_match("What color is the circle?", " Red.", "red") == 1.0
    assert exact_match("What color is the circle?", "blue", "red") == 0.0


def test_demo_rl_runs_end_to_end(tmp_path):
    out = tmp_path / "demo_rl"
    cmd = [sys.executable, "-m", "sail_jax", "demo-rl", "--out", str(out), "--n", "24", "--sft-steps", "2",
           "--sft-schedule", "4", "--episodes", "2", "--prompts-per-episode", "2", "--samples", "4",
           "--n-heldout", "24", "--n-rl", "40"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out greedy accuracy" in proc.stdout
    saved = json.loads((out / "demo_rl_results.json").read_text())
    assert saved["sft_steps"] == 2 and saved["episodes"] == 2 and saved["rollouts_per_episode"] == 8
    assert saved["n_heldout"] == len(saved["predictions_before"]) == len(saved["predictions_after"]) > 0
    assert {p["category"] for p in saved["predictions_after"]} <= {"count", "color"}
    assert 0 <= saved["heldout_accuracy_before"] <= 1 and 0 <= saved["heldout_accuracy_after"] <= 1
    # RL trained from the SFT checkpoint and saved its last episode
    assert (out / "rl" / "checkpoints" / "2").is_dir() and (out / "sft" / "checkpoints" / "2").is_dir()
    rl_prompts = [json.loads(line) for line in (out / "rl_prompts.jsonl").read_text().splitlines()]
    assert rl_prompts and {p["kind"] for p in rl_prompts} <= {"count", "open"}
