"""cuda_library: compiles .cu sources into objects that link like a cc_library.

Bazel 4.2.3 has no CUDA support and rules_cuda cannot be fetched offline, so this rule runs the
CUDA compiler that //third_party/cuda:cuda_configure.bzl found, with the include paths and defines
of its deps and position-independent code, and returns CcInfo so cc_library, cc_binary and cc_test
targets can depend on it. The GPUs built for are those of capabilities.bzl.

  nvcc   (a full toolkit): one nvcc action per source, the C++ toolchain's compiler as the host
         compiler.
  clang  (the hermetic CUDA 12 root from PyPI, which has no nvcc): per source, one device compile
         per SASS capability (clang to PTX, ptxas to a cubin), one to PTX, //tools/cuda:fatbinary
         to pack them, and a host compile that embeds the fat binary the way nvcc does. Split up
         so Bazel caches and runs each step on its own.
"""

load("@bazel_tools//tools/cpp:toolchain_utils.bzl", "find_cpp_toolchain")
load(
    "@local_config_cuda//:defs.bzl",
    "CLANG",
    "CUDA_COMPILER",
    "CUDA_FOUND",
    "CUDA_ROOT",
    "NVCC",
    "NVCC_CAPABILITIES",
)
load(":capabilities.bzl", "CUDA_PTX_CAPABILITIES", "CUDA_SASS_CAPABILITIES")

def _nvcc_gencode():
    # A newer nvcc than TF's may have dropped the oldest GPUs: those it cannot build for are left
    # out (the hermetic CUDA 12 toolchain builds them all).
    sass = [cc for cc in CUDA_SASS_CAPABILITIES if cc in NVCC_CAPABILITIES]
    ptx = [cc for cc in CUDA_PTX_CAPABILITIES if cc in NVCC_CAPABILITIES]
    flags = ["-gencode=arch=compute_%s,code=sm_%s" % (cc, cc) for cc in sass]
    flags += ["-gencode=arch=compute_%s,code=compute_%s" % (cc, cc) for cc in ptx]
    return flags

def _common_args(args, ctx, comp):
    args.add_all(ctx.attr.copts)
    args.add_all(comp.defines, format_each = "-D%s")
    args.add_all(comp.includes, format_each = "-I%s")
    args.add_all(comp.quote_includes, format_each = "-I%s")
    args.add_all(comp.system_includes, before_each = "-isystem")
    args.add("-I.")

def _nvcc_compile(ctx, cc_toolchain, comp, src, inputs):
    obj = ctx.actions.declare_file("_objs/%s/%s.pic.o" % (ctx.label.name, src.basename[:-3]))
    args = ctx.actions.args()
    args.add("-ccbin", cc_toolchain.compiler_executable)
    args.add_all(["-x", "cu", "-std=c++17", "-O3", "-Xcompiler", "-fPIC"])
    args.add_all(["--expt-relaxed-constexpr", "-Werror=all-warnings"])
    args.add_all(_nvcc_gencode())
    _common_args(args, ctx, comp)
    args.add("-c", src)
    args.add("-o", obj)
    ctx.actions.run(
        executable = NVCC,
        arguments = [args],
        inputs = inputs,
        outputs = [obj],
        mnemonic = "NvccCompile",
        progress_message = "Compiling CUDA %s" % src.short_path,
        use_default_shell_env = True,
    )
    return obj

def _clang_args(ctx, comp):
    args = ctx.actions.args()
    args.add_all(["-x", "cuda", "--cuda-path=" + CUDA_ROOT, "-std=c++17", "-O3", "-fPIC"])
    # Clang 19 knows CUDA up to 12.3 in full; 12.5 adds nothing our kernels use.
    args.add_all(["-Wall", "-Werror", "-Wno-unknown-cuda-version"])
    # Only what the library's headers declare is used across objects, and every cuda_library is
    # linked statically: keep CUB's and our templates' symbols from being exported (and from
    # binding to another library's copy of the same CUB).
    args.add("-fvisibility=hidden")
    # The sources must not depend on where the checkout is (reproducible objects and wheel).
    args.add("-ffile-prefix-map=%s/=" % CUDA_ROOT)
    _common_args(args, ctx, comp)
    return args

def _clang_compile(ctx, comp, src, inputs):
    stem = "_objs/%s/%s" % (ctx.label.name, src.basename[:-3])
    images = []
    fatbin_args = ctx.actions.args()
    for kind, capabilities in [("cubin", CUDA_SASS_CAPABILITIES), ("ptx", CUDA_PTX_CAPABILITIES)]:
        for cc in capabilities:
            out = ctx.actions.declare_file("%s.sm_%s.%s" % (stem, cc, kind))
            args = _clang_args(ctx, comp)
            args.add_all(["--cuda-device-only", "--cuda-gpu-arch=sm_" + cc])
            args.add("-c" if kind == "cubin" else "-S", src)
            args.add("-o", out)
            ctx.actions.run(
                executable = CLANG,
                arguments = [args],
                inputs = inputs,
                outputs = [out],
                mnemonic = "ClangCudaDevice",
                progress_message = "Compiling CUDA %s for sm_%s (%s)" % (src.short_path, cc, kind),
                use_default_shell_env = True,
            )
            images.append(out)
            fatbin_args.add("--%s=%s:%s" % (kind, cc, out.path))

    fatbin = ctx.actions.declare_file(stem + ".fatbin")
    fatbin_args.add("--output=" + fatbin.path)
    ctx.actions.run(
        executable = ctx.executable._fatbinary,
        arguments = [fatbin_args],
        inputs = images,
        outputs = [fatbin],
        mnemonic = "CudaFatbinary",
        progress_message = "Packing the device code of %s" % src.short_path,
    )

    obj = ctx.actions.declare_file(stem + ".pic.o")
    args = _clang_args(ctx, comp)
    args.add("--cuda-host-only")
    args.add_all(["-Xclang", "-fcuda-include-gpubinary", "-Xclang", fatbin])
    args.add("-c", src)
    args.add("-o", obj)
    ctx.actions.run(
        executable = CLANG,
        arguments = [args],
        inputs = depset([fatbin], transitive = [inputs]),
        outputs = [obj],
        mnemonic = "ClangCudaHost",
        progress_message = "Compiling CUDA %s (host)" % src.short_path,
        use_default_shell_env = True,
    )
    return obj

def _cuda_library_impl(ctx):
    if not CUDA_FOUND:
        fail("%s needs the CUDA toolkit; run tools/bootstrap/ensure_env.sh --cuda or set CUDA_PATH." %
             ctx.label)
    cc_toolchain = find_cpp_toolchain(ctx)
    feature_configuration = cc_common.configure_features(
        ctx = ctx,
        cc_toolchain = cc_toolchain,
        requested_features = ctx.features,
        unsupported_features = ctx.disabled_features,
    )
    dep_infos = [dep[CcInfo] for dep in ctx.attr.deps]
    merged = cc_common.merge_cc_infos(cc_infos = dep_infos)
    comp = merged.compilation_context

    objects = []
    for src in ctx.files.srcs:
        inputs = depset([src] + ctx.files.hdrs, transitive = [comp.headers])
        if CUDA_COMPILER == "nvcc":
            objects.append(_nvcc_compile(ctx, cc_toolchain, comp, src, inputs))
        else:
            objects.append(_clang_compile(ctx, comp, src, inputs))

    own_context = cc_common.create_compilation_context(headers = depset(ctx.files.hdrs))
    linking_context, _ = cc_common.create_linking_context_from_compilation_outputs(
        actions = ctx.actions,
        feature_configuration = feature_configuration,
        cc_toolchain = cc_toolchain,
        compilation_outputs = cc_common.create_compilation_outputs(
            objects = depset(objects),
            pic_objects = depset(objects),
        ),
        linking_contexts = [merged.linking_context],
        name = ctx.label.name,
        alwayslink = True,
        # A shared object of these alone would miss the CUDA runtime symbols; link them statically.
        disallow_dynamic_library = True,
    )
    return [
        DefaultInfo(files = depset(objects)),
        cc_common.merge_cc_infos(cc_infos = [
            CcInfo(compilation_context = own_context, linking_context = linking_context),
            merged,
        ]),
    ]

cuda_library = rule(
    implementation = _cuda_library_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu"]),
        "hdrs": attr.label_list(allow_files = [".h", ".cuh"]),
        "deps": attr.label_list(providers = [CcInfo]),
        "copts": attr.string_list(),
        "_cc_toolchain": attr.label(default = "@bazel_tools//tools/cpp:current_cc_toolchain"),
        # Only clang builds pack fat binaries themselves (and only they can build the packer).
        "_fatbinary": attr.label(
            default = Label("//tools/cuda:fatbinary") if CUDA_COMPILER == "clang" else None,
            executable = True,
            cfg = "exec",
        ),
    },
    fragments = ["cpp"],
    toolchains = ["@bazel_tools//tools/cpp:toolchain_type"],
    incompatible_use_toolchain_transition = True,
)
