"""Training with model-parallel embeddings: gradient reduction, optimizers, broadcasts."""
