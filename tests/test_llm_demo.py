"""The interim demo really trains: a short run of the arithmetic LLM lowers the loss."""

from sail_jax.training.llm_demo import make_batch, run


def test_batches_mark_answers_only():
    import numpy as np

    ids, mask = make_batch(np.random.default_rng(0), 2, 32)
    assert ids.shape == mask.shape == (2, 32)
    assert 0 < mask.sum() < (ids != 0).sum()


def test_short_run_lowers_loss():
    result = run(steps=25, batch=8, seq_len=32, lr=5e-3, log_every=1000)
    assert result["last_loss"] < 0.8 * result["first_loss"]
