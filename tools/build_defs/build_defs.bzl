"""Compiler flags and CUDA switches for the whole project, chosen in one place."""

# Warnings are errors in our own code; TF and CUDA headers come in as system headers.
DE_COPTS = [
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Werror",
]

# Kernel code is hot and memory-bound: -O3 lets GCC vectorize the row accumulation loops, and
# without errno a square root vectorizes too. No contraction into fused multiply-adds: the
# optimizer updates match Keras's float operations bit for bit.
DE_KERNEL_COPTS = DE_COPTS + [
    "-O3",
    "-fno-math-errno",
    "-ffp-contract=off",
]

def if_cuda(if_true, if_false = []):
    """Selects if_true in --config=cuda builds and if_false otherwise."""
    return select({
        "//third_party/cuda:using_cuda": if_true,
        "//conditions:default": if_false,
    })

def cuda_only():
    """target_compatible_with value that skips a target outside --config=cuda builds."""
    return if_cuda([], ["//third_party/cuda:cuda_build_disabled"])
