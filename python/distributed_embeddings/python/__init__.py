"""Implementation modules of distributed_embeddings."""
