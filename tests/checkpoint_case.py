"""A small model with our layers and its deterministic training steps, shared by the checkpoint
test and the fresh process it starts."""

import keras
import numpy as np
import tensorflow as tf

import distributed_embeddings as de


def build():
  keys = keras.Input(shape=(None,), ragged=True, dtype="int64")
  dense = keras.Input(shape=(3,), dtype="float32")
  ids = de.IntegerLookup(500, name="lookup")(keys)
  pooled = de.Embedding(501, 8, combiner="mean", name="emb")(ids)
  x = keras.layers.Concatenate()([pooled, keras.layers.Dense(4, name="bottom")(dense)])
  model = keras.Model([keys, dense], keras.layers.Dense(1, name="top")(x))
  optimizer = keras.optimizers.Adagrad(0.1)
  optimizer.build(model.trainable_variables)
  return model, optimizer


def batch(step):
  rng = np.random.default_rng(1000 + step)
  lengths = rng.integers(1, 6, size=32)
  keys = tf.RaggedTensor.from_row_lengths(rng.zipf(1.3, size=lengths.sum()) * 7919, lengths)
  return keys, rng.standard_normal((32, 3)).astype(np.float32), rng.random((32, 1)) < 0.3


def train(model, optimizer, steps):
  loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

  @tf.function
  def step_fn(keys, dense, label):
    with tf.GradientTape() as tape:
      loss = loss_fn(tf.cast(label, tf.float32), model([keys, dense], training=True))
    optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

  for step in steps:
    step_fn(*batch(step))


def state(model, optimizer):
  """Every number that training changes: weights (the vocabulary too) and optimizer slots."""
  return [v.numpy() for v in model.weights] + [v.numpy() for v in optimizer.variables]
