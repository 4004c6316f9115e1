"""A toy recommender trained with distributed_embeddings.embedding_lookup on synthetic clicks.

Three categorical features (one of them multi-hot with variable length, fed as a RaggedTensor)
are pooled from embedding tables, concatenated and scored by a small MLP. Labels come from a
hidden per-id score, so the data has signal and the loss must fall; the program exits non-zero
if it does not.
"""

import argparse
import sys
import time

import numpy as np
import tensorflow as tf

import distributed_embeddings as de

VOCABS = (5000, 800, 2000)  # user id, item category, multi-hot history
WIDTH = 16


def make_batch(rng, hidden, batch, max_history):
  user = rng.zipf(1.3, size=batch) % VOCABS[0]
  category = rng.integers(0, VOCABS[1], size=batch)
  lengths = rng.integers(1, max_history + 1, size=batch)
  history = rng.zipf(1.2, size=int(lengths.sum())) % VOCABS[2]
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  score = hidden[0][user] + hidden[1][category] + np.add.reduceat(hidden[2][history], starts) / lengths
  label = (score + rng.normal(0, 0.3, size=batch) > 0).astype(np.float32)
  ids = (tf.constant(user[:, None]), tf.constant(category[:, None]),
         tf.RaggedTensor.from_row_lengths(history, lengths))
  return ids, tf.constant(label[:, None])


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv[1:])

  rng = np.random.default_rng(args.seed)
  tf.random.set_seed(args.seed)
  hidden = [rng.normal(0, 1, size=v) for v in VOCABS]
  tables = [tf.Variable(tf.random.uniform([v, WIDTH], -0.05, 0.05), name=f"table_{i}")
            for i, v in enumerate(VOCABS)]
  mlp = tf.keras.Sequential([tf.keras.layers.Dense(32, activation="relu"),
                             tf.keras.layers.Dense(1)])
  optimizer = tf.keras.optimizers.Adam(0.01)
  combiners = ("sum", "sum", "mean")

  @tf.function
  def train_step(ids, label):
    with tf.GradientTape() as tape:
      pooled = [de.embedding_lookup(t, i, combiner=c) for t, i, c in zip(tables, ids, combiners)]
      logits = mlp(tf.concat(pooled, axis=1))
      loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(label, logits))
    variables = tables + mlp.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  losses, start = [], time.perf_counter()
  for step in range(1, args.steps + 1):
    loss = float(train_step(*make_batch(rng, hidden, args.batch, 20)))
    losses.append(loss)
    if step == 1 or step % 50 == 0:
      print(f"step {step:4d}  loss {np.mean(losses[-50:]):.4f}", flush=True)
  elapsed = time.perf_counter() - start
  first, last = np.mean(losses[:20]), np.mean(losses[-20:])
  print(f"loss {first:.4f} -> {last:.4f} over {args.steps} steps, "
        f"{args.steps * args.batch / elapsed:,.0f} samples/s")
  if not last < 0.8 * first:
    print("FAILED: the loss did not fall", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
