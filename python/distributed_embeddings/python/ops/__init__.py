"""TensorFlow ops: the pooled embedding lookup and its gradient."""
