"""Host-side preprocessing (numpy/PIL, no torch): image tiling, tokenizer, chat template, processor.

Everything here reproduces the original SAIL-VL2 processor bit for bit
(../shared/docs/sailvl2-reference.md §5, §6); deviations are documented where they occur.
"""
