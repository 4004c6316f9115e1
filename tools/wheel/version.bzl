"""The release version; build_wheel.py checks it against distributed_embeddings.__version__."""

VERSION = "0.1.0"
