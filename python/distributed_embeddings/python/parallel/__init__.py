"""Communication among workers: TensorFlow collective ops, launch helpers."""
