"""Benchmark evaluation in VLMEvalKit formats: TSV reading, prompts, scoring (model-free) and the runner."""
