// Half-precision table types of the kernel library: IEEE binary16 (Float16) and bfloat16
// (BFloat16). Each is two bytes with the bit layout of Eigen::half / __half and Eigen::bfloat16 /
// __nv_bfloat16, so a framework hands its own buffers over with a reinterpret_cast.
//
// Kernels never compute in these types: they widen every value to float (exactly), accumulate in
// float, and round once when they store a result, to nearest even as Eigen and CUDA's __float2half
// do. NaN stays NaN (a quiet one), and a float beyond the type's range becomes infinity.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HALF_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HALF_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "embedding/kernels/lookup_rules.h"

namespace distributed_embeddings {

struct Float16 {
  uint16_t bits;
};

struct BFloat16 {
  uint16_t bits;
};

static_assert(sizeof(Float16) == 2 && sizeof(BFloat16) == 2, "half types are two bytes");

template <typename T>
constexpr bool kIsHalf = std::is_same_v<T, Float16> || std::is_same_v<T, BFloat16>;

// The type a kernel accumulates values of type T in: float for the half types, T otherwise.
template <typename T>
using AccumulatorOf = std::conditional_t<kIsHalf<T>, float, T>;

namespace half_internal {

DE_HOST_DEVICE uint32_t FloatBits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

DE_HOST_DEVICE float FloatFromBits(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

}  // namespace half_internal

// Widen: the value as its accumulator type, exactly. Written with selects, not branches, so that
// loops over a row vectorize.
DE_HOST_DEVICE float Widen(float value) { return value; }
DE_HOST_DEVICE double Widen(double value) { return value; }

DE_HOST_DEVICE float Widen(BFloat16 value) {
  return half_internal::FloatFromBits(static_cast<uint32_t>(value.bits) << 16);
}

DE_HOST_DEVICE float Widen(Float16 value) {
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  const uint32_t magnitude = value.bits & 0x7fffu;
  // Normal numbers: the exponent rebiased from 15 to 127; infinity and NaN: all ones.
  uint32_t bits = (magnitude << 13) + 0x38000000u;
  bits += magnitude >= 0x7c00u ? 0x38000000u : 0u;
  // Zero and subnormals are magnitude * 2^-24, exact in float.
  const float subnormal = static_cast<float>(magnitude) * 5.9604644775390625e-8f;
  const uint32_t unsigned_bits = magnitude < 0x0400u ? half_internal::FloatBits(subnormal) : bits;
  return half_internal::FloatFromBits(unsigned_bits | sign);
}

DE_HOST_DEVICE BFloat16 RoundToBFloat16(float value) {
  const uint32_t bits = half_internal::FloatBits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return BFloat16{static_cast<uint16_t>((bits >> 16) | 0x0040u)};
  }
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>((bits + rounding) >> 16)};
}

DE_HOST_DEVICE Float16 RoundToFloat16(float value) {
  const uint32_t bits = half_internal::FloatBits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  uint16_t half;
  if (magnitude > 0x7f800000u) {
    half = 0x7e00u;  // NaN
  } else if (magnitude >= 0x477ff000u) {
    half = 0x7c00u;  // 65520 and above round to infinity
  } else if (magnitude < 0x38800000u) {
    // Below 2^-14 the result is a subnormal, a multiple of 2^-24: adding 0.5 (whose float ulp is
    // 2^-24) rounds the value to that multiple, to nearest even, in the low mantissa bits.
    const float shifted = half_internal::FloatFromBits(magnitude) + 0.5f;
    half = static_cast<uint16_t>(half_internal::FloatBits(shifted) - 0x3f000000u);
  } else {
    // Rebias the exponent from 127 to 15 and round the 13 dropped mantissa bits to nearest even.
    const uint32_t odd = (magnitude >> 13) & 1u;
    half = static_cast<uint16_t>((magnitude - 0x38000000u + 0x0fffu + odd) >> 13);
  }
  return Float16{static_cast<uint16_t>(sign | half)};
}

// Store: writes an accumulated value into an output of type float, double or a half type.
DE_HOST_DEVICE void Store(float value, float* target) { *target = value; }
DE_HOST_DEVICE void Store(double value, double* target) { *target = value; }
DE_HOST_DEVICE void Store(float value, Float16* target) { *target = RoundToFloat16(value); }
DE_HOST_DEVICE void Store(float value, BFloat16* target) { *target = RoundToBFloat16(value); }

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_HALF_H_
