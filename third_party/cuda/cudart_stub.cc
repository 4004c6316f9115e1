// The CUDA runtime API our code calls, forwarded to libcudart.so.12 loaded on first use.
//
// Linking libcudart.so.12 as a dependency would keep the op library from loading where it is
// missing (under tensorflow-cpu, on a machine without CUDA), and the static runtime is not in the
// PyPI wheels the hermetic toolchain uses. So the op library and the CUDA tests link this instead:
// each function loads the runtime once, then calls it; without one, every call returns
// cudaErrorSharedObjectInitFailed (the kernels' callers report it; the tests skip as on a machine
// without a GPU) and the fat binaries register nowhere, which is harmless as nothing launches.
//
// Where the runtime comes from, first found wins:
//   1. one already loaded, or on the loader's path (TensorFlow's GPU wheel loads its own, from the
//      nvidia-cuda-runtime-cu12 wheel, before it loads op libraries);
//   2. nvidia/cuda_runtime/lib/libcudart.so.12 in a folder above this library (a pip install puts
//      that wheel in the same site-packages as ours);
//   3. the RUNPATH of the binary (the toolchain's lib64 for the CUDA tests).
//
// Compiled with -fvisibility=hidden: these definitions bind only inside the library that links
// them and never interpose on another CUDA runtime in the process.

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstddef>
#include <string>

namespace {

constexpr char kRuntime[] = "libcudart.so.12";
constexpr cudaError_t kUnavailable = cudaErrorSharedObjectInitFailed;

void* OpenFromAncestors() {
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&OpenFromAncestors), &info) || !info.dli_fname) {
    return nullptr;
  }
  std::string dir = info.dli_fname;
  for (size_t slash = dir.rfind('/'); slash != std::string::npos && slash > 0;
       slash = dir.rfind('/')) {
    dir.resize(slash);
    const std::string candidate = dir + "/nvidia/cuda_runtime/lib/" + kRuntime;
    if (void* handle = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL)) return handle;
  }
  return nullptr;
}

void* Runtime() {
  // A function-local static: thread-safe, and callable from the static constructors that register
  // fat binaries while this library is being loaded.
  static void* const handle = [] {
    void* found = dlopen(kRuntime, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (!found) found = OpenFromAncestors();
    if (!found) found = dlopen(kRuntime, RTLD_NOW | RTLD_LOCAL);
    return found;
  }();
  return handle;
}

template <typename Fn>
Fn Symbol(const char* name) {
  void* handle = Runtime();
  return handle ? reinterpret_cast<Fn>(dlsym(handle, name)) : nullptr;
}

// The runtime's own NAME, typed as our declaration of it; null without a runtime.
#define DE_CUDART_SYMBOL(name) Symbol<decltype(&name)>(#name)

// Calls the runtime's NAME with ARGS, or returns kUnavailable.
#define DE_CUDART_FORWARD(name, ...)             \
  static const auto fn = DE_CUDART_SYMBOL(name); \
  return fn ? fn(__VA_ARGS__) : kUnavailable

// Handed out by __cudaRegisterFatBinary without a runtime: a non-null handle that the other
// registration calls recognise and ignore.
void* unregistered_fatbin = nullptr;

}  // namespace

// The registration and launch hooks that host code compiled for CUDA calls; the runtime defines
// them, its headers do not declare them.
extern "C" {
void** __cudaRegisterFatBinary(void* fatbin);
void __cudaRegisterFatBinaryEnd(void** handle);
void __cudaUnregisterFatBinary(void** handle);
void __cudaRegisterFunction(void** handle, const char* host_function, char* device_function,
                            const char* device_name, int thread_limit, uint3* thread_id,
                            uint3* block_id, dim3* block_dim, dim3* grid_dim, int* warp_size);
unsigned __cudaPushCallConfiguration(dim3 grid_dim, dim3 block_dim, size_t shared_mem,
                                     void* stream);
cudaError_t __cudaPopCallConfiguration(dim3* grid_dim, dim3* block_dim, size_t* shared_mem,
                                       void* stream);

void** __cudaRegisterFatBinary(void* fatbin) {
  static const auto fn = DE_CUDART_SYMBOL(__cudaRegisterFatBinary);
  return fn ? fn(fatbin) : &unregistered_fatbin;
}

void __cudaRegisterFatBinaryEnd(void** handle) {
  static const auto fn = DE_CUDART_SYMBOL(__cudaRegisterFatBinaryEnd);
  if (fn && handle != &unregistered_fatbin) fn(handle);
}

void __cudaUnregisterFatBinary(void** handle) {
  static const auto fn = DE_CUDART_SYMBOL(__cudaUnregisterFatBinary);
  if (fn && handle != &unregistered_fatbin) fn(handle);
}

void __cudaRegisterFunction(void** handle, const char* host_function, char* device_function,
                            const char* device_name, int thread_limit, uint3* thread_id,
                            uint3* block_id, dim3* block_dim, dim3* grid_dim, int* warp_size) {
  static const auto fn = DE_CUDART_SYMBOL(__cudaRegisterFunction);
  if (fn && handle != &unregistered_fatbin) {
    fn(handle, host_function, device_function, device_name, thread_limit, thread_id, block_id,
       block_dim, grid_dim, warp_size);
  }
}

unsigned __cudaPushCallConfiguration(dim3 grid_dim, dim3 block_dim, size_t shared_mem,
                                     void* stream) {
  static const auto fn = DE_CUDART_SYMBOL(__cudaPushCallConfiguration);
  // Non-zero tells the launch stub to skip the launch; cudaLaunchKernel is not reached then.
  return fn ? fn(grid_dim, block_dim, shared_mem, stream) : 1;
}

cudaError_t __cudaPopCallConfiguration(dim3* grid_dim, dim3* block_dim, size_t* shared_mem,
                                       void* stream) {
  DE_CUDART_FORWARD(__cudaPopCallConfiguration, grid_dim, block_dim, shared_mem, stream);
}

cudaError_t cudaLaunchKernel(const void* func, dim3 grid_dim, dim3 block_dim, void** args,
                             size_t shared_mem, cudaStream_t stream) {
  DE_CUDART_FORWARD(cudaLaunchKernel, func, grid_dim, block_dim, args, shared_mem, stream);
}

cudaError_t cudaGetLastError() { DE_CUDART_FORWARD(cudaGetLastError); }

cudaError_t cudaPeekAtLastError() { DE_CUDART_FORWARD(cudaPeekAtLastError); }

const char* cudaGetErrorString(cudaError_t error) {
  static const auto fn = DE_CUDART_SYMBOL(cudaGetErrorString);
  if (fn) return fn(error);
  return error == kUnavailable ? "the CUDA runtime (libcudart.so.12) could not be loaded"
                               : "unknown CUDA error (the CUDA runtime is not loaded)";
}

cudaError_t cudaGetDeviceCount(int* count) {
  static const auto fn = DE_CUDART_SYMBOL(cudaGetDeviceCount);
  if (!fn) {
    *count = 0;
    return kUnavailable;
  }
  return fn(count);
}

cudaError_t cudaGetDevice(int* device) { DE_CUDART_FORWARD(cudaGetDevice, device); }

cudaError_t cudaSetDevice(int device) { DE_CUDART_FORWARD(cudaSetDevice, device); }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  DE_CUDART_FORWARD(cudaDeviceGetAttribute, value, attr, device);
}

cudaError_t cudaDeviceSynchronize() { DE_CUDART_FORWARD(cudaDeviceSynchronize); }

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  DE_CUDART_FORWARD(cudaFuncGetAttributes, attr, func);
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* num_blocks,
                                                                   const void* func, int block_size,
                                                                   size_t shared_mem,
                                                                   unsigned int flags) {
  DE_CUDART_FORWARD(cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags, num_blocks, func,
                    block_size, shared_mem, flags);
}

cudaError_t cudaMalloc(void** ptr, size_t size) { DE_CUDART_FORWARD(cudaMalloc, ptr, size); }

cudaError_t cudaFree(void* ptr) { DE_CUDART_FORWARD(cudaFree, ptr); }

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  DE_CUDART_FORWARD(cudaMemcpy, dst, src, count, kind);
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  DE_CUDART_FORWARD(cudaMemcpyAsync, dst, src, count, kind, stream);
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  DE_CUDART_FORWARD(cudaMemsetAsync, ptr, value, count, stream);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  DE_CUDART_FORWARD(cudaStreamCreateWithFlags, stream, flags);
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) { DE_CUDART_FORWARD(cudaStreamDestroy, stream); }

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  DE_CUDART_FORWARD(cudaStreamSynchronize, stream);
}

}  // extern "C"
