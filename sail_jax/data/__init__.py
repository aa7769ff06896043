"""Host-side preprocessing (numpy/PIL, no torch): image tiling, tokenizer, chat template, processor.

Everything here reproduces the original SAIL-VL2 processor (dynamic tiling, the univl-chat template, the image
token expansion) bit for bit; deviations are documented where they occur.
"""
