"""distributed-embeddings: fast pooled embedding lookups and model-parallel embeddings for TF 2."""

from distributed_embeddings.python.layers.embedding import ConcatOneHotEmbedding
from distributed_embeddings.python.layers.embedding import Embedding
from distributed_embeddings.python.layers.embedding import IntegerLookup
from distributed_embeddings.python.ops.embedding_lookup_ops import embedding_lookup
from distributed_embeddings import dist_model_parallel
from distributed_embeddings.dist_model_parallel import broadcast_variables
from distributed_embeddings.dist_model_parallel import BroadcastGlobalVariablesCallback
from distributed_embeddings.dist_model_parallel import DistEmbeddingStrategy
from distributed_embeddings.dist_model_parallel import DistributedEmbedding
from distributed_embeddings.dist_model_parallel import DistributedGradientTape
from distributed_embeddings.dist_model_parallel import DistributedOptimizer
from distributed_embeddings.dist_model_parallel import RowwiseAdagrad

__version__ = "0.1.0"

__all__ = [
  "ConcatOneHotEmbedding",
  "Embedding",
  "IntegerLookup",
  "embedding_lookup",
  "dist_model_parallel",
  "broadcast_variables",
  "BroadcastGlobalVariablesCallback",
  "DistEmbeddingStrategy",
  "DistributedEmbedding",
  "DistributedGradientTape",
  "DistributedOptimizer",
  "RowwiseAdagrad",
]
