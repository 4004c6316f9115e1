"""Starts N local workers of a training script: `python -m distributed_embeddings.launch -n 4 train.py ARGS`.

Each worker is a process with TF_CONFIG naming all workers (free localhost ports) and its own
index, and DE_LOCAL_RANK, which picks its GPU on a GPU host (and TF_ENABLE_ONEDNN_OPTS=0 unless
set: oneDNN's pooling CPU allocator keeps each process's peak memory); the script calls
`distributed_embeddings.dist_model_parallel.init_from_env()`. Output is streamed with a
`[rank N]` prefix. If a worker exits with an error the launcher says which, stops
the others at once and exits with that worker's code, so a dead worker never leaves the rest
hanging in a collective.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_ports(count):
  sockets = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def _stream(rank, pipe, lock):
  for line in iter(pipe.readline, b""):
    with lock:
      sys.stdout.write(f"[rank {rank}] {line.decode(errors='replace')}")
      sys.stdout.flush()


def _stop(processes, grace_seconds=5.0):
  for p in processes:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_seconds
  for p in processes:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(num_workers, command, env=None):
  """Runs `command` (a list) as `num_workers` workers; returns the exit code."""
  ports = free_ports(num_workers)
  workers = [f"127.0.0.1:{port}" for port in ports]
  lock = threading.Lock()
  processes, streams = [], []
  for rank in range(num_workers):
    worker_env = dict(env if env is not None else os.environ)
    worker_env["TF_CONFIG"] = json.dumps(
      {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}
    )
    worker_env["PYTHONUNBUFFERED"] = "1"
    # oneDNN's CPU allocator pools every large allocation for the life of the process, each
    # process up to the host's whole memory: N workers on one host keep N high-water marks.
    # Off unless asked for; it made no measurable difference to the main job's speed.
    worker_env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    # All workers share this host: the local rank picks each one's GPU (init_from_env).
    worker_env["DE_LOCAL_RANK"] = str(rank)
    p = subprocess.Popen(command, env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    processes.append(p)
    t = threading.Thread(target=_stream, args=(rank, p.stdout, lock), daemon=True)
    t.start()
    streams.append(t)
  try:
    while True:
      codes = [p.poll() for p in processes]
      failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
      if failed:
        rank, code = failed[0]
        with lock:
          print(
            f"[launch] worker {rank} exited with code {code}; stopping the other workers.",
            file=sys.stderr,
            flush=True,
          )
        _stop(processes)
        return code if code > 0 else 1
      if all(code == 0 for code in codes):
        return 0
      time.sleep(0.1)
  except KeyboardInterrupt:
    _stop(processes)
    return 130
  finally:
    for t in streams:
      t.join(timeout=1.0)


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m distributed_embeddings.launch",
    description="Runs a training script as N local workers connected for collective ops.",
  )
  parser.add_argument("-n", "--num_workers", type=int, required=True)
  parser.add_argument("script")
  parser.add_argument("args", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  if args.num_workers < 1:
    parser.error(f"--num_workers must be at least 1; got {args.num_workers}")
  return launch(args.num_workers, [sys.executable, args.script] + args.args)


if __name__ == "__main__":
  sys.exit(main())
