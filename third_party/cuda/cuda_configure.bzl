"""Repository rule that finds the CUDA toolkit for --config=cuda builds.

The toolkit is the `cuda_path` attribute when given, else $CUDA_PATH, else /usr/local/cuda. The generated repository provides:
  :cuda_headers   CUDA runtime headers for host code (TF GPU kernels compiled by the C++ compiler);
  :cudart_static  the static CUDA runtime, so our op library does not clash with the CUDA 12
                  runtime a TensorFlow GPU wheel brings;
  defs.bzl        NVCC (absolute path) and CUDA_FOUND for //third_party/cuda:cuda.bzl.
Without a toolkit the targets still exist but fail with a clear message when a CUDA build uses them;
CPU builds never analyze them.
"""

def _cuda_configure_impl(repository_ctx):
    cuda_path = (repository_ctx.attr.cuda_path or repository_ctx.os.environ.get("CUDA_PATH", "") or
                 "/usr/local/cuda")
    nvcc = repository_ctx.path(cuda_path + "/bin/nvcc")
    if not nvcc.exists:
        repository_ctx.file("defs.bzl", """\
CUDA_FOUND = False
NVCC = ""

def _missing_impl(ctx):
    fail("--config=cuda needs the CUDA toolkit, but {cuda_path}/bin/nvcc does not exist; " +
         "install CUDA or set CUDA_PATH.")

missing_cuda = rule(implementation = _missing_impl)
""".format(cuda_path = cuda_path))
        repository_ctx.file("BUILD", """\
load(":defs.bzl", "missing_cuda")
package(default_visibility = ["//visibility:public"])
missing_cuda(name = "cuda_headers")
missing_cuda(name = "cudart_static")
""")
        return

    repository_ctx.symlink(cuda_path + "/include", "include")
    lib_dir = cuda_path + "/lib64"
    if not repository_ctx.path(lib_dir + "/libcudart_static.a").exists:
        lib_dir = cuda_path + "/targets/x86_64-linux/lib"
    repository_ctx.symlink(lib_dir, "lib64")
    version = repository_ctx.execute([str(nvcc), "--version"]).stdout.strip().split("\n")[-1]
    repository_ctx.file("defs.bzl", """\
# {version}
CUDA_FOUND = True
NVCC = "{nvcc}"
""".format(version = version, nvcc = str(nvcc.realpath)))
    repository_ctx.file("BUILD", """\
package(default_visibility = ["//visibility:public"])

# Only the top-level runtime headers: host code needs nothing deeper, and every declared header
# is linked into each sandboxed compile. nvcc finds its own headers (CCCL included) itself.
cc_library(
    name = "cuda_headers",
    hdrs = glob(["include/*.h", "include/*.hpp", "include/crt/*.h", "include/crt/*.hpp"]),
    includes = ["include"],
)

cc_library(
    name = "cudart_static",
    srcs = ["lib64/libcudart_static.a"],
    linkopts = ["-ldl", "-lpthread", "-lrt"],
    deps = [":cuda_headers"],
)
""")

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    attrs = {"cuda_path": attr.string(doc = "The toolkit's root; empty: $CUDA_PATH, else /usr/local/cuda.")},
    environ = ["CUDA_PATH"],
    local = True,
)
