"""py_wheel_deterministic: packs a package's files into a reproducible PEP 427 wheel.

rules_python's py_wheel cannot be fetched offline, so this small rule runs build_wheel.py. Files
land in the wheel at their workspace-relative path minus `strip_prefix`, whether they are sources
or generated (the op library).
"""

def _short_path(f):
    return f.short_path

def _py_wheel_impl(ctx):
    name = "%s-%s-py3-none-%s.whl" % (ctx.attr.distribution, ctx.attr.version,
                                      ctx.attr.platform_tag)
    output = ctx.actions.declare_file(ctx.attr.out_dir + "/" + name)
    args = ctx.actions.args()
    args.add("--output", output)
    args.add("--name", ctx.attr.distribution)
    args.add("--version", ctx.attr.version)
    args.add("--version_file", ctx.file.version_file)
    args.add("--platform_tag", ctx.attr.platform_tag)
    args.add("--summary", ctx.attr.summary)
    args.add("--requires_python", ctx.attr.requires_python)
    args.add("--description_file", ctx.file.description)
    prefix = ctx.attr.strip_prefix
    for f in sorted(ctx.files.srcs, key = _short_path):
        if not f.short_path.startswith(prefix):
            fail("%s is not under strip_prefix %s" % (f.short_path, prefix))
        args.add("%s=%s" % (f.path, f.short_path[len(prefix):]))
    ctx.actions.run(
        executable = ctx.executable._builder,
        arguments = [args],
        inputs = ctx.files.srcs + [ctx.file.version_file, ctx.file.description],
        outputs = [output],
        mnemonic = "PyWheel",
        progress_message = "Packing wheel %s" % name,
    )
    return [DefaultInfo(files = depset([output]), runfiles = ctx.runfiles(files = [output]))]

py_wheel_deterministic = rule(
    implementation = _py_wheel_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = True),
        "strip_prefix": attr.string(mandatory = True),
        "distribution": attr.string(mandatory = True),
        "version": attr.string(mandatory = True),
        "version_file": attr.label(allow_single_file = True, mandatory = True),
        "description": attr.label(allow_single_file = True, mandatory = True),
        "out_dir": attr.string(default = "dist"),
        "platform_tag": attr.string(default = "linux_x86_64"),
        "summary": attr.string(),
        "requires_python": attr.string(default = ">=3.9"),
        "_builder": attr.label(
            default = "//tools/wheel:build_wheel",
            executable = True,
            cfg = "exec",
        ),
    },
)
