"""Training: losses, train state and step, AdaLRS, checkpoints and the gin entry point."""
