"""A benchmark program plus the smoke test that keeps it runnable."""

def py_benchmark(name, smoke_test_size = "medium", deps = [], data = []):
    """`name`: a py_binary from name.py, run with `bazel run`; `name_smoke_test`: the same program
    with --quick (one tiny case, no timing asserted) in `bazel test`."""
    native.py_binary(
        name = name,
        srcs = [name + ".py"],
        data = data,
        python_version = "PY3",
        deps = ["//python:distributed_embeddings", ":bench_report"] + deps,
    )
    native.py_test(
        name = name + "_smoke_test",
        size = smoke_test_size,
        srcs = [name + ".py"],
        args = ["--quick"],
        data = data,
        main = name + ".py",
        python_version = "PY3",
        deps = ["//python:distributed_embeddings", ":bench_report"] + deps,
    )
