"""Model assemblies: Qwen3 LLM, SAIL-ViT, the pixel-shuffle adapter and the full SAIL-VL2 model."""
