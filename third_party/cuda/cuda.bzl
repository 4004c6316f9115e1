"""cuda_library: compiles .cu sources with nvcc into objects that link like a cc_library.

Bazel 4.2.3 has no CUDA support and rules_cuda cannot be fetched offline, so this rule runs nvcc
once per source with the include paths and defines of its deps, the C++ toolchain's compiler as the
host compiler, and position-independent code, and returns CcInfo so cc_library, cc_binary and cc_test
targets can depend on it. Code is built for sm_80 and sm_90 (SASS) plus compute_90 PTX so newer GPUs
can JIT it.
"""

load("@bazel_tools//tools/cpp:toolchain_utils.bzl", "find_cpp_toolchain")
load("@local_config_cuda//:defs.bzl", "CUDA_FOUND", "NVCC")

_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]

def _cuda_library_impl(ctx):
    if not CUDA_FOUND:
        fail("%s needs the CUDA toolkit (nvcc); install CUDA or set CUDA_PATH." % ctx.label)
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
        obj = ctx.actions.declare_file("_objs/%s/%s.pic.o" % (ctx.label.name, src.basename[:-3]))
        args = ctx.actions.args()
        args.add("-ccbin", cc_toolchain.compiler_executable)
        args.add_all(["-x", "cu", "-std=c++17", "-O3", "-Xcompiler", "-fPIC"])
        args.add_all(["--expt-relaxed-constexpr", "-Werror=all-warnings"])
        args.add_all(_GENCODE)
        args.add_all(ctx.attr.copts)
        args.add_all(comp.defines, format_each = "-D%s")
        args.add_all(comp.includes, format_each = "-I%s")
        args.add_all(comp.quote_includes, format_each = "-I%s")
        args.add_all(comp.system_includes, before_each = "-isystem")
        args.add("-I.")
        args.add("-c", src)
        args.add("-o", obj)
        ctx.actions.run(
            executable = NVCC,
            arguments = [args],
            inputs = depset([src] + ctx.files.hdrs, transitive = [comp.headers]),
            outputs = [obj],
            mnemonic = "NvccCompile",
            progress_message = "Compiling CUDA %s" % src.short_path,
            use_default_shell_env = True,
        )
        objects.append(obj)

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
    },
    fragments = ["cpp"],
    toolchains = ["@bazel_tools//tools/cpp:toolchain_type"],
    incompatible_use_toolchain_transition = True,
)
