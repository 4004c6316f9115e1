"""The GPUs our CUDA kernels are built for, in one place (nvcc and clang builds both read it).

TensorFlow 2.21's GPU wheel is built for sm_60, sm_70, sm_80, sm_89 and compute_90: SASS for the
first four and PTX the driver compiles for anything newer. We also ship sm_90 SASS, so H100/H200
run without a JIT step at first launch.
"""

# Compute capabilities that get SASS (machine code), without the sm_ prefix.
CUDA_SASS_CAPABILITIES = ["60", "70", "80", "89", "90"]

# Compute capabilities that also get PTX, for GPUs newer than the SASS list.
CUDA_PTX_CAPABILITIES = ["90"]
