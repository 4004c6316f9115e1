"""Repository rule that finds the CUDA toolkit for --config=cuda builds.

The toolkit, first found wins:
  1. the `cuda_path` attribute, else $CUDA_PATH (a full toolkit with nvcc, or a hermetic root);
  2. the hermetic CUDA 12 root that tools/bootstrap/ensure_env.sh --cuda installs from PyPI into
     .toolchains/cuda-12.5 of this workspace (tools/bootstrap/cuda_toolchain.py);
  3. /usr/local/cuda.
A root with bin/nvcc compiles with nvcc and links the static runtime. The hermetic root has no nvcc
(no PyPI wheel ships it): clang compiles the .cu sources over its headers, ptxas and libdevice,
//tools/cuda:fatbinary packs the device code with its libnvfatbin, and the runtime is
//third_party/cuda:cudart_stub, which loads libcudart.so.12 when it is first needed.

The generated repository provides:
  :cuda_headers    the runtime headers for host code (TF GPU kernels compiled by the C++ compiler);
  :cudart          the CUDA runtime to link: static (nvcc) or the loading stub (clang);
  :cudart_runpath  testonly: puts the toolchain's lib64 on a test binary's RUNPATH, so the stub
                   finds the hermetic libcudart.so.12 there;
  :nvfatbin        libnvfatbin (clang mode), for //tools/cuda:fatbinary;
  defs.bzl         CUDA_FOUND, CUDA_COMPILER ("nvcc" or "clang"), NVCC, CLANG, CUDA_ROOT and
                   NVCC_CAPABILITIES (the sm_ codes that nvcc can build for).
Without a toolkit the targets still exist but fail with a clear message when a CUDA build uses them;
CPU builds never analyze them.
"""

_TARGETS = ["cuda_headers", "cudart", "cudart_runpath", "nvfatbin"]

# The clang that compiles CUDA in the hermetic mode: Debian bookworm's clang-19 knows CUDA 12.5.
_CLANG = "clang++-19"

def _absolute(label):
    # str(label) drops the repository of the main one, which inside another repository would mean
    # that repository: spell it out.
    return "@%s//%s:%s" % (label.workspace_name, label.package, label.name)

def _missing(repository_ctx, why):
    repository_ctx.file("defs.bzl", """\
CUDA_FOUND = False
CUDA_COMPILER = ""
NVCC = ""
CLANG = ""
CUDA_ROOT = ""
NVCC_CAPABILITIES = []

def _missing_impl(ctx):
    fail({why})

missing_cuda = rule(implementation = _missing_impl)
""".format(why = repr(why)))
    repository_ctx.file("BUILD", "\n".join([
        'load(":defs.bzl", "missing_cuda")',
        'package(default_visibility = ["//visibility:public"])',
    ] + ['missing_cuda(name = "%s")' % name for name in _TARGETS]) + "\n")

def _find_root(repository_ctx):
    explicit = repository_ctx.attr.cuda_path or repository_ctx.os.environ.get("CUDA_PATH", "")
    if explicit:
        return explicit
    hermetic = repository_ctx.path(Label("//:WORKSPACE")).dirname.get_child(".toolchains").get_child("cuda-12.5")
    if hermetic.get_child("bin").get_child("ptxas").exists:
        return str(hermetic)
    return "/usr/local/cuda"

def _cuda_configure_impl(repository_ctx):
    root = _find_root(repository_ctx)
    nvcc = repository_ctx.path(root + "/bin/nvcc")
    ptxas = repository_ctx.path(root + "/bin/ptxas")
    if nvcc.exists:
        compiler = "nvcc"
    elif ptxas.exists:
        compiler = "clang"
        clang = repository_ctx.os.environ.get("CUDA_CLANG", "") or repository_ctx.which(_CLANG)
        if not clang:
            _missing(repository_ctx, ("--config=cuda with the hermetic CUDA root %s needs %s " +
                                      "(Debian package clang-19); tools/bootstrap/ensure_env.sh " +
                                      "--cuda installs both.") % (root, _CLANG))
            return
    else:
        _missing(repository_ctx, ("--config=cuda needs a CUDA toolkit, but %s has neither " +
                                  "bin/nvcc nor bin/ptxas; run tools/bootstrap/ensure_env.sh " +
                                  "--cuda (the pinned CUDA 12 from PyPI), then " +
                                  "`bazel sync --configure`, or set CUDA_PATH.") % root)
        return

    repository_ctx.symlink(root + "/include", "include")
    lib_dir = root + "/lib64"
    if compiler == "nvcc" and not repository_ctx.path(lib_dir + "/libcudart_static.a").exists:
        lib_dir = root + "/targets/x86_64-linux/lib"
    repository_ctx.symlink(lib_dir, "lib64")
    real_root = str(repository_ctx.path(root).realpath)
    nvcc_capabilities = []
    if compiler == "nvcc":
        version = repository_ctx.execute([str(nvcc), "--version"]).stdout.strip().split("\n")[-1]
        # What this nvcc can build for (CUDA 13 dropped sm_60 and sm_70, for one).
        listed = repository_ctx.execute([str(nvcc), "--list-gpu-code"]).stdout.strip().splitlines()
        nvcc_capabilities = [code[3:] for code in listed if code.startswith("sm_")]
        cudart = """\
cc_library(
    name = "cudart",
    srcs = ["lib64/libcudart_static.a"],
    linkopts = ["-ldl", "-lpthread", "-lrt"],
    deps = [":cuda_headers"],
)

cc_library(name = "cudart_runpath", testonly = True)

cc_library(name = "nvfatbin")
"""
    else:
        version = "hermetic CUDA root, compiled by " + str(clang)
        cudart = """\
alias(
    name = "cudart",
    actual = "{stub}",
)

cc_library(
    name = "cudart_runpath",
    testonly = True,
    linkopts = ["-Wl,-rpath,{lib64}"],
)

cc_library(
    name = "nvfatbin",
    srcs = ["lib64/libnvfatbin.so.12"],
    hdrs = ["include/nvFatbin.h"],
    includes = ["include"],
)
""".format(stub = _absolute(Label("//third_party/cuda:cudart_stub")), lib64 = real_root + "/lib64")
    repository_ctx.file("defs.bzl", """\
# {version}
CUDA_FOUND = True
CUDA_COMPILER = "{compiler}"
NVCC = "{nvcc}"
CLANG = "{clang}"
CUDA_ROOT = "{root}"
NVCC_CAPABILITIES = {nvcc_capabilities}
""".format(
        nvcc_capabilities = repr(nvcc_capabilities),
        version = version,
        compiler = compiler,
        nvcc = str(nvcc.realpath) if compiler == "nvcc" else "",
        clang = str(clang) if compiler == "clang" else "",
        root = real_root,
    ))
    repository_ctx.file("BUILD", """\
package(default_visibility = ["//visibility:public"])

# Only the top-level runtime headers: host code needs nothing deeper, and every declared header
# is linked into each sandboxed compile. The CUDA compiler finds its own headers (CCCL included).
cc_library(
    name = "cuda_headers",
    hdrs = glob(["include/*.h", "include/*.hpp", "include/crt/*.h", "include/crt/*.hpp"]),
    includes = ["include"],
)

""" + cudart)

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    attrs = {"cuda_path": attr.string(doc = "The toolkit's root; empty: see the module docstring.")},
    environ = ["CUDA_PATH", "CUDA_CLANG"],
    # Re-run by `bazel sync --configure`, e.g. after installing the toolchain.
    configure = True,
    local = True,
)
