"""The reference import path of the model-parallel API, `...python.layers.dist_model_parallel`.

The implementation lives in its own modules: the layer in dist_embedding.py, its placement
(`DistEmbeddingStrategy`) in planner.py, the training API (gradient tape, optimizer, broadcasts)
in training/distributed_training.py and the rows-only optimizer updates in
training/sparse_updates.py (with `RowwiseAdagrad` in training/rowwise_adagrad.py). Everything public is importable from here, as from
`distributed_embeddings.dist_model_parallel`.
"""

# pylint: disable=unused-import
from distributed_embeddings.python.layers.dist_embedding import DistributedEmbedding
from distributed_embeddings.python.layers.dist_embedding import ExchangeLayout
from distributed_embeddings.python.layers.dist_embedding import Piece
from distributed_embeddings.python.layers.planner import DistEmbeddingStrategy
from distributed_embeddings.python.layers.serving import export_for_serving
from distributed_embeddings.python.parallel.communicator import init_from_env
from distributed_embeddings.python.training.distributed_training import broadcast_variables
from distributed_embeddings.python.training.distributed_training import (
  BroadcastGlobalVariablesCallback,
)
from distributed_embeddings.python.training.distributed_training import DistributedGradientTape
from distributed_embeddings.python.training.distributed_training import DistributedOptimizer
from distributed_embeddings.python.training.distributed_training import is_model_parallel
from distributed_embeddings.python.training.rowwise_adagrad import RowwiseAdagrad
