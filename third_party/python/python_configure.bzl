"""Repository rule that makes the project's venv interpreter Bazel's Python toolchain.

Bazel 4.2.3's py_test ignores --python_path while Python toolchains are on, so the interpreter is
registered as a toolchain instead. The interpreter is the `python` attribute when given, else $DE_PYTHON, else the venv that
tools/bootstrap/ensure_env.sh creates at <this repository>/.venv.
"""

def resolve_python(repository_ctx):
    """Returns the absolute path of the Python interpreter the build uses: the rule's `python`
    attribute (a consuming workspace's choice), else $DE_PYTHON, else this repository's .venv."""
    python = repository_ctx.attr.python or repository_ctx.os.environ.get("DE_PYTHON", "")
    if not python:
        workspace = repository_ctx.path(Label("//:WORKSPACE")).dirname
        python = "%s/.venv/bin/python3" % workspace
    if not repository_ctx.path(python).exists:
        fail("Python interpreter %s not found: run tools/bootstrap/ensure_env.sh or set DE_PYTHON." %
             python)
    return python

def _python_configure_impl(repository_ctx):
    python = resolve_python(repository_ctx)
    repository_ctx.file("BUILD", """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
    stub_shebang = "#!{python}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
""".format(python = python))

python_configure = repository_rule(
    implementation = _python_configure_impl,
    attrs = {"python": attr.string(doc = "Absolute path of the interpreter; empty: see above.")},
    environ = ["DE_PYTHON"],
    local = True,
)
