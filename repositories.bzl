"""The repositories distributed-embeddings' targets need, for this workspace and for consumers.

A workspace that vendors this one writes:

    local_repository(name = "distributed_embeddings", path = "third_party/distributed_embeddings")
    load("@distributed_embeddings//:repositories.bzl", "distributed_embeddings_dependencies")
    distributed_embeddings_dependencies(python = "/path/to/venv/bin/python3")

Each repository is declared only if the workspace has not declared one of that name already, so a
monorepo's own googletest, rules_cc or Python toolchain wins. Everything resolves offline.
"""

load("//third_party/cuda:cuda_configure.bzl", "cuda_configure")
load("//third_party/python:python_configure.bzl", "python_configure")
load("//third_party/tf:tf_configure.bzl", "tf_configure")

def _offline_stand_in_impl(repository_ctx):
    # A directory of this repository, linked in as a repository of its own.
    source = repository_ctx.path(repository_ctx.attr.marker).dirname
    for child in source.readdir():
        repository_ctx.symlink(child, child.basename)

_offline_stand_in = repository_rule(
    implementation = _offline_stand_in_impl,
    attrs = {"marker": attr.label(doc = "A file at the top of the stand-in's directory.")},
    local = True,
)

def _maybe(rule, name, **kwargs):
    if not native.existing_rule(name):
        rule(name = name, **kwargs)

def distributed_embeddings_dependencies(
        python = "",
        cuda_path = "",
        googletest_path = "/usr/src/googletest",
        rules_java_path = "/usr/share/bazel/rules/java",
        register_python_toolchain = True):
    """Declares every repository our targets use.

    Args:
      python: absolute path of the interpreter whose TensorFlow the op library builds against and
        that runs the Python tests ("": $DE_PYTHON, else this repository's .venv).
      cuda_path: the CUDA toolkit for --config=cuda ("": $CUDA_PATH, else /usr/local/cuda).
      googletest_path: googletest sources (Debian's googletest package by default).
      rules_java_path: a rules_java checkout (Debian's bazel-rules-java by default).
      register_python_toolchain: whether to make `python` Bazel's Python toolchain.
    """

    # Bazel 4.2.3's WORKSPACE suffix would download these three; offline stand-ins first.
    _maybe(
        _offline_stand_in,
        name = "rules_cc",
        marker = Label("//third_party/offline/rules_cc:WORKSPACE"),
    )
    _maybe(native.local_repository, name = "rules_java", path = rules_java_path)
    _maybe(
        _offline_stand_in,
        name = "remote_coverage_tools",
        marker = Label("//third_party/offline/remote_coverage_tools:WORKSPACE"),
    )
    _maybe(
        native.new_local_repository,
        name = "com_google_googletest",
        build_file = str(Label("//third_party/googletest:googletest.BUILD")),
        path = googletest_path,
    )
    _maybe(python_configure, name = "local_config_python", python = python)
    if register_python_toolchain:
        native.register_toolchains("@local_config_python//:toolchain")
    _maybe(tf_configure, name = "local_config_tf", python = python)
    _maybe(cuda_configure, name = "local_config_cuda", cuda_path = cuda_path)
