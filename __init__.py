"""Only for Bazel workspaces that vendor this repository under the name "distributed_embeddings".

Their runfiles then hold this repository's root as a directory of that name on sys.path, ahead of
the real package in python/, and Bazel fills it with an empty __init__.py: the package would be
shadowed. With this file that directory is the package: its submodules are found in
python/distributed_embeddings, whose __init__ runs here. Pip installs and this repository's own
builds never import it.
"""

import os as _os

__path__ = [
  _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "python", "distributed_embeddings")
]
_real_init = _os.path.join(__path__[0], "__init__.py")
with open(_real_init) as _source:
  exec(compile(_source.read(), _real_init, "exec"))  # pylint: disable=exec-used
del _source, _real_init
