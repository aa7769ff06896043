"""Abstract init of each preset gives the published parameter counts."""

from __future__ import annotations

import pytest

from sail_jax.config import get_preset
from sail_jax.params import parameter_counts

VIT_HUGE = 682_031_616


@pytest.mark.parametrize(
    "preset, adapter, llm",
    [
        ("sailvl2-2b", 16_793_600, 2_031_739_904),  # lm_head stored untied in the checkpoint
        ("sailvl2-8b", 41_963_520, 8_190_735_360),
    ],
)
def test_dense_presets(preset, adapter, llm):
    counts = parameter_counts(get_preset(preset))
    assert counts == {"vision": VIT_HUGE, "adapter": adapter, "llm": llm, "total": VIT_HUGE + adapter + llm}


def test_2b_total_matches_checkpoint_index():
    # bf16 bytes of the released 2B checkpoint = index metadata total_size 5,461,130,240
    assert parameter_counts(get_preset("sailvl2-2b"))["total"] * 2 == 5_461_130_240


def test_scanned_layout_same_count():
    cfg = get_preset("sailvl2-2b", scan_layers=True)
    assert parameter_counts(cfg)["total"] == 2_730_565_120
