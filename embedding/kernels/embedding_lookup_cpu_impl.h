// The CPU implementations of the pooled embedding lookup, its sparse backward and COO conversion,
// as templates: embedding_lookup_cpu.cc instantiates them for float, embedding_lookup_cpu_double.cc
// for double, so the two compile in parallel (the sanitizer build of one file took minutes).
// Internal to the kernel library.
//
// The forward pass is bound by random reads of table rows, so it walks each thread's ids in order
// and prefetches the rows kPrefetchDistance ids ahead (what FBGEMM does): a plain gather waits on
// memory latency for every row. Its summation order follows TensorFlow's CPU reduce_sum. For the
// common widths a bag's sums stay in vector registers, and x86-64 builds carry an AVX2 version of
// those loops picked at run time. The backward pass builds the unique ids with an open-addressing
// hash table in one serial pass, groups occurrences by unique id with a counting sort, then sums
// the gradient rows of each unique id in parallel, in occurrence order, which keeps it
// deterministic.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_EMBEDDING_LOOKUP_CPU_IMPL_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_EMBEDDING_LOOKUP_CPU_IMPL_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "embedding/kernels/embedding_lookup.h"
#include "embedding/kernels/input_errors.h"
#include "embedding/kernels/lookup_rules.h"

// x86-64 builds also compile the hot loops for AVX2 (a function attribute, not a build flag) and
// pick that version at run time, since the library must run on every x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__)
#define DE_HAVE_AVX2_CLONES 1
#else
#define DE_HAVE_AVX2_CLONES 0
#endif

namespace distributed_embeddings {
namespace cpu_internal {

// Set by ForcePortableCpuLoopsForTesting; defined in embedding_lookup_cpu.cc.
extern std::atomic<bool> force_portable_loops;

}  // namespace cpu_internal

namespace {

using cpu_internal::force_portable_loops;

#if DE_HAVE_AVX2_CLONES
bool CpuHasAvx2() {
  // The builtin also checks that the OS saves the 256-bit registers.
  static const bool has_avx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return has_avx2 && !force_portable_loops.load(std::memory_order_relaxed);
}
#endif

constexpr int64_t kPrefetchDistance = 8;
constexpr int64_t kCacheLineBytes = 64;

inline void PrefetchLine(const char* address) {
#if defined(__x86_64__)
  // Volatile asm: GCC deletes a loop whose only statement is __builtin_prefetch as dead code.
  asm volatile("prefetcht0 %0" : : "m"(*address));
#else
  __builtin_prefetch(address, /*rw=*/0, /*locality=*/3);
#endif
}

// Prefetches every cache line the row touches (a row need not start on a line boundary): one
// line per 64 bytes from its start, and the line of its last byte, which a misaligned row spills
// onto. The row is read a few iterations later. With a compile-time row_bytes (the fixed-width
// loops) the loop unrolls to straight-line prefetches.
template <typename T>
inline void PrefetchRow(const T* row, int64_t row_bytes) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < row_bytes; offset += kCacheLineBytes) {
    PrefetchLine(bytes + offset);
  }
  PrefetchLine(bytes + row_bytes - 1);
}

template <typename T>
inline void AddRow(const T* __restrict src, int64_t width, T* __restrict dst) {
  for (int64_t w = 0; w < width; ++w) dst[w] += src[w];
}

// TensorFlow's CPU reduce_sum over the hotness axis (Eigen, AVX packets) sums a reduced length of
// at least 16 with four interleaved partial sums on the lanes that fill whole packets, and in order
// elsewhere. Following the same order makes dense lookups equal tf.reduce_sum(tf.gather(...)) bit
// for bit, so a model can switch to this op without any numeric drift.
constexpr int64_t kEigenUnrollMinLength = 16;
constexpr int64_t kEigenPacketBytes = 32;

// Sums (or averages) the rows of bags [bag_begin, bag_end), for any width, keeping the running sums
// in `output`. Division, not multiplication by a reciprocal, keeps the mean identical to
// tf.reduce_mean (and sqrtn to TensorFlow's sum / sqrt(count)).
template <typename T, typename IdT, typename OffsetT>
void ForwardBags(const T* __restrict params, int64_t num_rows, int64_t width,
                 const CsrIds<IdT, OffsetT>& csr, Combiner combiner, int64_t bag_begin,
                 int64_t bag_end, T* __restrict output) {
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(T));
  const int64_t range_end = static_cast<int64_t>(csr.row_splits[bag_end]);
  const int64_t packet_lanes =
      width / (kEigenPacketBytes / sizeof(T)) * (kEigenPacketBytes / sizeof(T));
  std::vector<T> scratch(3 * packet_lanes);
  // Issues the loads of the row kPrefetchDistance ids ahead of position j.
  const auto prefetch_ahead = [&](int64_t j) {
    if (j + kPrefetchDistance < range_end) {
      const IdT ahead = csr.ids[j + kPrefetchDistance];
      if (InRange(ahead, num_rows)) {
        PrefetchRow(params + static_cast<int64_t>(ahead) * width, row_bytes);
      }
    }
  };
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    T* __restrict out = output + b * width;
    std::fill(out, out + width, T(0));
    const int64_t begin = static_cast<int64_t>(csr.row_splits[b]);
    const int64_t end = static_cast<int64_t>(csr.row_splits[b + 1]);
    const bool interleave = end - begin >= kEigenUnrollMinLength && packet_lanes > 0;
    const int64_t interleaved_end = interleave ? begin + (end - begin) / 4 * 4 : begin;
    int64_t valid = 0;
    if (interleave) std::fill(scratch.begin(), scratch.end(), T(0));
    for (int64_t j = begin; j < interleaved_end; ++j) {
      prefetch_ahead(j);
      const IdT id = csr.ids[j];
      if (!InRange(id, num_rows)) continue;  // Only reachable with BoundsCheck::kSkip.
      const T* row = params + static_cast<int64_t>(id) * width;
      const int64_t k = (j - begin) % 4;
      AddRow(row, packet_lanes, k == 0 ? out : scratch.data() + (k - 1) * packet_lanes);
      AddRow(row + packet_lanes, width - packet_lanes, out + packet_lanes);
      ++valid;
    }
    if (interleave) {
      for (int64_t k = 0; k < 3; ++k) AddRow(scratch.data() + k * packet_lanes, packet_lanes, out);
    }
    for (int64_t j = interleaved_end; j < end; ++j) {
      prefetch_ahead(j);
      const IdT id = csr.ids[j];
      if (!InRange(id, num_rows)) continue;
      AddRow(params + static_cast<int64_t>(id) * width, width, out);
      ++valid;
    }
    if (combiner != Combiner::kSum && MeanDivides(valid)) {
      const T divisor = BagDivisor<T>(valid, combiner == Combiner::kSqrtn);
      for (int64_t w = 0; w < width; ++w) out[w] /= divisor;
    }
  }
}

// The common widths get a loop of their own: the width is a compile-time constant and a bag's sums
// live in vector registers instead of memory (BENCHMARKS.md has the gain).
// Packet<T> is one 32-byte vector, the packet TensorFlow's reduction uses, so each lane still sees
// its additions in the same order. Rows are summed a block of packets at a time, as many as fit in
// registers next to the loads; the whole row is prefetched with the first block.

// Packets pass only between functions that are always inlined, so no call ever uses the vector
// ABI that GCC warns about for the non-AVX build of these helpers.
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename T>
struct PacketOf;
template <>
struct PacketOf<float> {
  typedef float type __attribute__((vector_size(kEigenPacketBytes)));
};
template <>
struct PacketOf<double> {
  typedef double type __attribute__((vector_size(kEigenPacketBytes)));
};
template <typename T>
using Packet = typename PacketOf<T>::type;

template <typename T>
__attribute__((always_inline)) inline Packet<T> LoadPacket(const T* source) {
  Packet<T> packet;
  std::memcpy(&packet, source, sizeof(packet));  // rows need not be 32-byte aligned
  return packet;
}

template <typename T>
__attribute__((always_inline)) inline void StorePacket(const Packet<T>& packet, T* target) {
  std::memcpy(target, &packet, sizeof(packet));
}

// Loops over the packets of a block are unrolled before the compiler decides where arrays live, so
// that each packet of running sums gets a register of its own.
#define DE_UNROLL _Pragma("GCC unroll 16")

// The bags [bag_begin, bag_end) with a compile-time width. kSkip: ids may be out of range (they
// are left out); otherwise ValidateCsrIds has checked every id and the loop checks none.
template <int64_t kWidth, bool kSkip, typename T, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void ForwardBagsFixedWidthImpl(
    const T* __restrict params, int64_t num_rows, const CsrIds<IdT, OffsetT>& csr,
    Combiner combiner, int64_t bag_begin, int64_t bag_end, T* __restrict output) {
  constexpr int64_t kLanes = kEigenPacketBytes / sizeof(T);
  constexpr int64_t kPackets = kWidth / kLanes;
  static_assert(kPackets * kLanes == kWidth, "fixed widths are whole packets");
  // Registers: 8 running sums in order; 4 partial sums x 4 packets when interleaving (AVX2 has
  // 16, and the adds take their row operand straight from memory).
  constexpr int64_t kBlock = kPackets < 8 ? kPackets : 8;
  constexpr int64_t kInterleavedBlock = kPackets < 4 ? kPackets : 4;
  constexpr int64_t kRowBytes = kWidth * sizeof(T);
  const IdT* __restrict ids = csr.ids;
  const int64_t range_end = static_cast<int64_t>(csr.row_splits[bag_end]);
  const auto valid = [&](int64_t j) { return !kSkip || InRange(ids[j], num_rows); };
  const auto row_of = [&](int64_t j) { return params + static_cast<int64_t>(ids[j]) * kWidth; };
  const auto prefetch_ahead = [&](int64_t j) {
    if (j + kPrefetchDistance < range_end && valid(j + kPrefetchDistance)) {
      PrefetchRow(row_of(j + kPrefetchDistance), kRowBytes);
    }
  };
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    const int64_t begin = static_cast<int64_t>(csr.row_splits[b]);
    const int64_t end = static_cast<int64_t>(csr.row_splits[b + 1]);
    const bool interleave = end - begin >= kEigenUnrollMinLength;
    const int64_t interleaved_end = interleave ? begin + (end - begin) / 4 * 4 : begin;
    int64_t num_valid = end - begin;
    if (kSkip) {
      num_valid = 0;
      for (int64_t j = begin; j < end; ++j) num_valid += valid(j);
    }
    const bool divide = combiner != Combiner::kSum && MeanDivides(num_valid);
    const T count = BagDivisor<T>(num_valid, combiner == Combiner::kSqrtn);
    T* __restrict out = output + b * kWidth;

    // The interleaved prefix, id k of each group of four into partial sum k, combined in
    // `prefix`.
    alignas(kEigenPacketBytes) T prefix[kWidth];
    if (interleave) {
      for (int64_t first = 0; first < kWidth; first += kInterleavedBlock * kLanes) {
        Packet<T> partial[4][kInterleavedBlock];
        DE_UNROLL
        for (int64_t k = 0; k < 4; ++k) {
          DE_UNROLL
          for (int64_t p = 0; p < kInterleavedBlock; ++p) partial[k][p] = Packet<T>{};
        }
        for (int64_t j = begin; j < interleaved_end; j += 4) {
          DE_UNROLL
          for (int64_t k = 0; k < 4; ++k) {
            if (first == 0) prefetch_ahead(j + k);
            if (!valid(j + k)) continue;
            const T* row = row_of(j + k) + first;
            DE_UNROLL
            for (int64_t p = 0; p < kInterleavedBlock; ++p) {
              partial[k][p] += LoadPacket(row + p * kLanes);
            }
          }
        }
        DE_UNROLL
        for (int64_t p = 0; p < kInterleavedBlock; ++p) {
          StorePacket(((partial[0][p] + partial[1][p]) + partial[2][p]) + partial[3][p],
                      prefix + first + p * kLanes);
        }
      }
    }
    // The rest in order, kBlock packets of lanes at a time.
    for (int64_t first = 0; first < kWidth; first += kBlock * kLanes) {
      Packet<T> sum[kBlock];
      DE_UNROLL
      for (int64_t p = 0; p < kBlock; ++p) {
        sum[p] = interleave ? LoadPacket(prefix + first + p * kLanes) : Packet<T>{};
      }
      for (int64_t j = interleaved_end; j < end; ++j) {
        if (first == 0) prefetch_ahead(j);
        if (!valid(j)) continue;
        const T* row = row_of(j) + first;
        DE_UNROLL
        for (int64_t p = 0; p < kBlock; ++p) sum[p] += LoadPacket(row + p * kLanes);
      }
      DE_UNROLL
      for (int64_t p = 0; p < kBlock; ++p) {
        StorePacket(divide ? sum[p] / count : sum[p], out + first + p * kLanes);
      }
    }
  }
}

template <int64_t kWidth, typename T, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void ForwardBagsFixedWidth(
    const T* params, int64_t num_rows, const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
    BoundsCheck bounds_check, int64_t bag_begin, int64_t bag_end, T* output) {
  if (bounds_check == BoundsCheck::kSkip) {
    ForwardBagsFixedWidthImpl<kWidth, true>(params, num_rows, csr, combiner, bag_begin, bag_end,
                                            output);
  } else {
    ForwardBagsFixedWidthImpl<kWidth, false>(params, num_rows, csr, combiner, bag_begin, bag_end,
                                             output);
  }
}

// Runs the fixed-width loop for the common widths and the generic one otherwise. Always inlined
// into its callers below, so that each compiles it for its own instruction set.
template <typename T, typename IdT, typename OffsetT>
__attribute__((always_inline)) inline void ForwardBagsAnyWidth(
    const T* params, int64_t num_rows, int64_t width, const CsrIds<IdT, OffsetT>& csr,
    Combiner combiner, BoundsCheck bounds_check, int64_t bag_begin, int64_t bag_end, T* output) {
  switch (width) {
    case 16:
      return ForwardBagsFixedWidth<16>(params, num_rows, csr, combiner, bounds_check, bag_begin,
                                       bag_end, output);
    case 32:
      return ForwardBagsFixedWidth<32>(params, num_rows, csr, combiner, bounds_check, bag_begin,
                                       bag_end, output);
    case 64:
      return ForwardBagsFixedWidth<64>(params, num_rows, csr, combiner, bounds_check, bag_begin,
                                       bag_end, output);
    case 128:
      return ForwardBagsFixedWidth<128>(params, num_rows, csr, combiner, bounds_check, bag_begin,
                                        bag_end, output);
    case 256:
      return ForwardBagsFixedWidth<256>(params, num_rows, csr, combiner, bounds_check, bag_begin,
                                        bag_end, output);
    default:
      return ForwardBags(params, num_rows, width, csr, combiner, bag_begin, bag_end, output);
  }
}

template <typename T, typename IdT, typename OffsetT>
void ForwardBagsPortable(const T* params, int64_t num_rows, int64_t width,
                         const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                         BoundsCheck bounds_check, int64_t bag_begin, int64_t bag_end, T* output) {
  ForwardBagsAnyWidth(params, num_rows, width, csr, combiner, bounds_check, bag_begin, bag_end,
                      output);
}

#if DE_HAVE_AVX2_CLONES
// The same loops with 256-bit instructions, chosen at run time since the wheel targets every
// x86-64 CPU. Only the instructions change, not the order of additions (no FMA: no product).
template <typename T, typename IdT, typename OffsetT>
__attribute__((target("avx2"))) void ForwardBagsAvx2(const T* params, int64_t num_rows,
                                                     int64_t width, const CsrIds<IdT, OffsetT>& csr,
                                                     Combiner combiner, BoundsCheck bounds_check,
                                                     int64_t bag_begin, int64_t bag_end,
                                                     T* output) {
  ForwardBagsAnyWidth(params, num_rows, width, csr, combiner, bounds_check, bag_begin, bag_end,
                      output);
}
#endif

// Whether row_splits starts at 0, never decreases and ends at nnz, and (with check_ids) every id
// lies in [0, num_rows). Branch-free reductions over the whole input, so that they vectorize: this
// runs before every forward and backward pass. ValidateCsrIds finds the culprit when it fails.
template <typename IdT, typename OffsetT>
__attribute__((always_inline)) inline bool CsrIsValidImpl(const CsrIds<IdT, OffsetT>& csr,
                                                          int64_t num_rows, bool check_ids) {
  const OffsetT* __restrict splits = csr.row_splits;
  if (splits[0] != 0 || static_cast<int64_t>(splits[csr.batch]) != csr.nnz) return false;
  // Integer flags rather than bool: GCC vectorizes an OR-reduction of integers only.
  int64_t decreasing = 0;
  for (int64_t b = 0; b < csr.batch; ++b) {
    decreasing |= static_cast<int64_t>(splits[b] > splits[b + 1]);
  }
  int64_t out_of_range = 0;
  if (check_ids) {
    const IdT* __restrict ids = csr.ids;
    for (int64_t j = 0; j < csr.nnz; ++j) {
      const int64_t id = ids[j];
      out_of_range |= static_cast<int64_t>(id < 0) | static_cast<int64_t>(id >= num_rows);
    }
  }
  return (decreasing | out_of_range) == 0;
}

template <typename IdT, typename OffsetT>
bool CsrIsValidPortable(const CsrIds<IdT, OffsetT>& csr, int64_t num_rows, bool check_ids) {
  return CsrIsValidImpl(csr, num_rows, check_ids);
}

#if DE_HAVE_AVX2_CLONES
template <typename IdT, typename OffsetT>
__attribute__((target("avx2"))) bool CsrIsValidAvx2(const CsrIds<IdT, OffsetT>& csr,
                                                    int64_t num_rows, bool check_ids) {
  return CsrIsValidImpl(csr, num_rows, check_ids);
}
#endif

template <typename IdT, typename OffsetT>
bool CsrIsValid(const CsrIds<IdT, OffsetT>& csr, int64_t num_rows, bool check_ids) {
#if DE_HAVE_AVX2_CLONES
  if (CpuHasAvx2()) return CsrIsValidAvx2(csr, num_rows, check_ids);
#endif
  return CsrIsValidPortable(csr, num_rows, check_ids);
}

// Open-addressing hash map from id to its index among the unique ids, in first-occurrence order.
// Key and index share a slot, so a lookup touches one cache line; callers prefetch the slot of an
// id a few ids ahead, because with many distinct ids nearly every probe misses the cache.
template <typename IdT>
class UniqueIdMap {
 public:
  // Slots for `max_unique` ids: a power of two at least twice that, so probes stay short.
  static int64_t Slots(int64_t max_unique) {
    int64_t capacity = 16;
    while (capacity < 2 * max_unique) capacity *= 2;
    return capacity;
  }

  explicit UniqueIdMap(int64_t max_unique) {
    const int64_t capacity = Slots(max_unique);
    mask_ = static_cast<uint64_t>(capacity - 1);
    slots_.assign(capacity, Slot{kEmpty, 0});
  }

  void Prefetch(IdT id) const {
    PrefetchLine(reinterpret_cast<const char*>(&slots_[Hash(id) & mask_]));
  }

  // Returns the index of `id`, giving it the next index if it is new.
  int64_t Insert(IdT id, IdT* unique_ids, int64_t* num_unique) {
    uint64_t slot = Hash(id) & mask_;
    while (true) {
      Slot& entry = slots_[slot];
      if (entry.key == static_cast<int64_t>(id)) return entry.index;
      if (entry.key == kEmpty) {
        entry = Slot{static_cast<int64_t>(id), *num_unique};
        unique_ids[*num_unique] = id;
        return (*num_unique)++;
      }
      slot = (slot + 1) & mask_;
    }
  }

 private:
  static constexpr int64_t kEmpty = -1;  // Valid ids are never negative.
  struct Slot {
    int64_t key;
    int64_t index;
  };

  static uint64_t Hash(IdT id) {
    // Fibonacci hashing spreads consecutive ids; the high bits are the well-mixed ones.
    const uint64_t h = static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 32);
  }

  uint64_t mask_ = 0;
  std::vector<Slot> slots_;
};

// Index of each row among the unique ids, one int64 per table row: for tables of at most twice
// the hash map's slots, this costs no more memory than the map, and needs no hashing or probing.
template <typename IdT>
class DenseIdMap {
 public:
  explicit DenseIdMap(int64_t num_rows) : index_(num_rows, -1) {}

  // Worth it when the table has at most as many rows as the map for `max_unique` has bytes / 8.
  static bool Preferred(int64_t num_rows, int64_t max_unique) {
    return num_rows <= 2 * UniqueIdMap<IdT>::Slots(max_unique);
  }

  void Prefetch(IdT id) const {
    if (InRange(id, static_cast<int64_t>(index_.size()))) {
      PrefetchLine(reinterpret_cast<const char*>(&index_[id]));
    }
  }

  int64_t Insert(IdT id, IdT* unique_ids, int64_t* num_unique) {
    int64_t& index = index_[id];
    if (index < 0) {
      index = *num_unique;
      unique_ids[(*num_unique)++] = id;
    }
    return index;
  }

 private:
  std::vector<int64_t> index_;
};

// unique_of[j] = the index of ids[j] among the unique ids (first-occurrence order), -1 for an id
// outside the table (skipped).
template <typename Map, typename IdT>
void IndexUniqueIds(Map& map, const IdT* ids, int64_t nnz, int64_t num_rows, int64_t* unique_of,
                    IdT* unique_ids, int64_t* num_unique) {
  constexpr int64_t kMapPrefetchDistance = 16;
  for (int64_t j = 0; j < nnz; ++j) {
    if (j + kMapPrefetchDistance < nnz) map.Prefetch(ids[j + kMapPrefetchDistance]);
    unique_of[j] = InRange(ids[j], num_rows) ? map.Insert(ids[j], unique_ids, num_unique) : -1;
  }
}

// IndexUniqueIds over every id of `csr`, with whichever map is smaller: a hash map (16 bytes a
// slot, 2-4 slots per possible unique id) or a per-row array (8 bytes a row).
template <typename IdT, typename OffsetT>
void IndexUniqueIdsOfCsr(const CsrIds<IdT, OffsetT>& csr, int64_t num_rows, int64_t* unique_of,
                         IdT* unique_ids, int64_t* num_unique) {
  const int64_t max_unique = MaxUniqueIds(csr.nnz, num_rows);
  if (DenseIdMap<IdT>::Preferred(num_rows, max_unique)) {
    DenseIdMap<IdT> map(num_rows);
    IndexUniqueIds(map, csr.ids, csr.nnz, num_rows, unique_of, unique_ids, num_unique);
  } else {
    UniqueIdMap<IdT> map(max_unique);
    IndexUniqueIds(map, csr.ids, csr.nnz, num_rows, unique_of, unique_ids, num_unique);
  }
}

// Row u of `unique_grad` = the sum, in occurrence order, over the occurrences k in
// [starts[u], starts[u + 1]) of row `row_of(k)` of `source`, each multiplied by `weight_of(k)`
// when kWeighted (the product, then the sum: no FMA), for u in [u_begin, u_end); a compile-time
// width, sums in registers and the rows prefetched, as in the forward pass.
template <int64_t kWidth, bool kWeighted, typename T, typename RowOf, typename WeightOf>
__attribute__((always_inline)) inline void SumOccurrenceRowsFixedWidth(
    const T* __restrict source, const int64_t* __restrict starts, const RowOf& row_of,
    const WeightOf& weight_of, int64_t u_begin, int64_t u_end, T* __restrict unique_grad) {
  constexpr int64_t kLanes = kEigenPacketBytes / sizeof(T);
  constexpr int64_t kPackets = kWidth / kLanes;
  constexpr int64_t kBlock = kPackets < 8 ? kPackets : 8;
  const int64_t range_end = starts[u_end];
  for (int64_t u = u_begin; u < u_end; ++u) {
    for (int64_t first = 0; first < kWidth; first += kBlock * kLanes) {
      Packet<T> sum[kBlock];
      DE_UNROLL
      for (int64_t p = 0; p < kBlock; ++p) sum[p] = Packet<T>{};
      for (int64_t k = starts[u]; k < starts[u + 1]; ++k) {
        if (first == 0 && k + kPrefetchDistance < range_end) {
          PrefetchRow(source + row_of(k + kPrefetchDistance) * kWidth, kWidth * sizeof(T));
        }
        const T* row = source + row_of(k) * kWidth + first;
        if constexpr (kWeighted) {
          const T weight = weight_of(k);
          DE_UNROLL
          for (int64_t p = 0; p < kBlock; ++p) sum[p] += LoadPacket(row + p * kLanes) * weight;
        } else {
          DE_UNROLL
          for (int64_t p = 0; p < kBlock; ++p) sum[p] += LoadPacket(row + p * kLanes);
        }
      }
      DE_UNROLL
      for (int64_t p = 0; p < kBlock; ++p) {
        StorePacket(sum[p], unique_grad + u * kWidth + first + p * kLanes);
      }
    }
  }
}

// SumOccurrenceRowsFixedWidth for the common widths, and a plain loop for the others.
template <bool kWeighted, typename T, typename RowOf, typename WeightOf>
__attribute__((always_inline)) inline void SumOccurrenceRowsAnyWidth(
    const T* __restrict source, int64_t width, const int64_t* __restrict starts,
    const RowOf& row_of, const WeightOf& weight_of, int64_t u_begin, int64_t u_end,
    T* __restrict unique_grad) {
  switch (width) {
#define DE_FIXED_WIDTH_CASE(kWidth)                                                          \
  case kWidth:                                                                               \
    return SumOccurrenceRowsFixedWidth<kWidth, kWeighted>(source, starts, row_of, weight_of, \
                                                          u_begin, u_end, unique_grad);
    DE_FIXED_WIDTH_CASE(16)
    DE_FIXED_WIDTH_CASE(32)
    DE_FIXED_WIDTH_CASE(64)
    DE_FIXED_WIDTH_CASE(128)
    DE_FIXED_WIDTH_CASE(256)
#undef DE_FIXED_WIDTH_CASE
    default:
      break;
  }
  for (int64_t u = u_begin; u < u_end; ++u) {
    T* __restrict out = unique_grad + u * width;
    std::fill(out, out + width, T(0));
    for (int64_t k = starts[u]; k < starts[u + 1]; ++k) {
      const T* __restrict row = source + row_of(k) * width;
      if constexpr (kWeighted) {
        const T weight = weight_of(k);
        for (int64_t w = 0; w < width; ++w) out[w] += row[w] * weight;
      } else {
        AddRow(row, width, out);
      }
    }
  }
}

// Row u of `unique_grad` = the sum, in occurrence order, of the `source` rows listed in
// bags[starts[u]] .. bags[starts[u + 1] - 1], each times its occurrence's weight
// weights[positions[k]] unless `weights` is null.
template <typename T>
__attribute__((always_inline)) inline void SumGradRowsAnyWidth(
    const T* source, int64_t width, const T* weights, const int64_t* starts, const int64_t* bags,
    const int64_t* positions, int64_t u_begin, int64_t u_end, T* unique_grad) {
  const auto row_of = [bags](int64_t k) { return bags[k]; };
  if (weights == nullptr) {
    SumOccurrenceRowsAnyWidth<false>(
        source, width, starts, row_of, [](int64_t) { return T(1); }, u_begin, u_end, unique_grad);
  } else {
    SumOccurrenceRowsAnyWidth<true>(
        source, width, starts, row_of, [=](int64_t k) { return weights[positions[k]]; }, u_begin,
        u_end, unique_grad);
  }
}

template <typename T>
void SumGradRowsPortable(const T* source, int64_t width, const T* weights, const int64_t* starts,
                         const int64_t* bags, const int64_t* positions, int64_t u_begin,
                         int64_t u_end, T* unique_grad) {
  SumGradRowsAnyWidth(source, width, weights, starts, bags, positions, u_begin, u_end, unique_grad);
}

#if DE_HAVE_AVX2_CLONES
template <typename T>
__attribute__((target("avx2"))) void SumGradRowsAvx2(const T* source, int64_t width,
                                                     const T* weights, const int64_t* starts,
                                                     const int64_t* bags, const int64_t* positions,
                                                     int64_t u_begin, int64_t u_end,
                                                     T* unique_grad) {
  SumGradRowsAnyWidth(source, width, weights, starts, bags, positions, u_begin, u_end, unique_grad);
}
#endif

}  // namespace

template <typename IdT, typename OffsetT>
Status ValidateCsrIds(const CsrIds<IdT, OffsetT>& csr, int64_t num_rows, BoundsCheck bounds_check) {
  if (csr.nnz > static_cast<int64_t>(std::numeric_limits<OffsetT>::max())) {
    return NnzTooLargeError(csr.nnz, std::numeric_limits<OffsetT>::max());
  }
  const bool check_ids = bounds_check == BoundsCheck::kError;
  if (CsrIsValid(csr, num_rows, check_ids)) return Status::Ok();
  // Something is wrong: find the first offending element, in the order the checks are documented.
  const OffsetT* splits = csr.row_splits;
  if (splits[0] != 0) return RowSplitsStartError(splits[0]);
  for (int64_t b = 0; b < csr.batch; ++b) {
    if (splits[b] > splits[b + 1]) return RowSplitsDecreasingError(b, splits[b], splits[b + 1]);
  }
  if (static_cast<int64_t>(splits[csr.batch]) != csr.nnz) {
    return RowSplitsEndError(csr.batch, splits[csr.batch], csr.nnz);
  }
  for (int64_t j = 0; check_ids && j < csr.nnz; ++j) {
    if (!InRange(csr.ids[j], num_rows)) return IdOutOfRangeError(j, csr.ids[j], num_rows);
  }
  return Status::Internal("ValidateCsrIds: the fast and the detailed checks disagree.");
}

template <typename T, typename IdT, typename OffsetT>
Status PooledLookupForwardCpu(const T* params, int64_t num_rows, int64_t width,
                              const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                              BoundsCheck bounds_check, T* output,
                              const ParallelFor& parallel_for) {
  DE_RETURN_IF_ERROR(ValidateCsrIds(csr, num_rows, bounds_check));
  if (width == 0) return Status::Ok();
  const int64_t cost_per_id = width * static_cast<int64_t>(sizeof(T));
  const auto forward_bags = [&](int64_t begin, int64_t end) {
#if DE_HAVE_AVX2_CLONES
    if (CpuHasAvx2()) {
      return ForwardBagsAvx2(params, num_rows, width, csr, combiner, bounds_check, begin, end,
                             output);
    }
#endif
    ForwardBagsPortable(params, num_rows, width, csr, combiner, bounds_check, begin, end, output);
  };
  RunParallelBalanced(parallel_for, csr.batch, csr.row_splits, cost_per_id, forward_bags);
  return Status::Ok();
}

namespace {

// What bag b's weighted sum is divided by: 1 for sum; the sum of its valid ids' weights for mean,
// the square root of the sum of their squares for sqrtn; 0 when that is zero (the bag gives zeros).
template <typename T, typename IdT, typename OffsetT>
T WeightedBagDivisor(const CsrIds<IdT, OffsetT>& csr, const T* weights, int64_t num_rows,
                     Combiner combiner, int64_t b) {
  if (combiner == Combiner::kSum) return T(1);
  T total = T(0);
  for (int64_t j = csr.row_splits[b]; j < static_cast<int64_t>(csr.row_splits[b + 1]); ++j) {
    if (!InRange(csr.ids[j], num_rows)) continue;
    total += combiner == Combiner::kMean ? weights[j] : weights[j] * weights[j];
  }
  if (combiner == Combiner::kSqrtn) total = std::sqrt(total);
  return WeightedDivides(total) ? total : T(0);
}

// `grad_output` ([batch, width]) with row b divided by divisor_of(b), once per bag, as
// tf.reduce_mean's gradient divides; a divisor of 0 (a weighted bag that gave zeros) gives zeros.
template <typename T, typename DivisorOf>
std::vector<T> DividedByBag(const T* grad_output, int64_t batch, int64_t width,
                            const DivisorOf& divisor_of) {
  std::vector<T> scaled(batch * width);
  for (int64_t b = 0; b < batch; ++b) {
    const T divisor = divisor_of(b);
    for (int64_t w = 0; w < width; ++w) {
      scaled[b * width + w] = divisor == T(0) ? T(0) : grad_output[b * width + w] / divisor;
    }
  }
  return scaled;
}

// A counting sort of the valid occurrences (unique_of[j] >= 0) by unique id, keeping occurrence
// order within each: the occurrences of unique id u are entries starts[u] .. starts[u + 1] - 1 of
// `bags` (each occurrence's bag) and, unless it is null, of `positions` (its position in csr.ids).
template <typename IdT, typename OffsetT>
void GroupOccurrencesByUniqueId(const CsrIds<IdT, OffsetT>& csr, const int64_t* unique_of,
                                int64_t n_unique, std::vector<int64_t>* starts,
                                std::vector<int64_t>* bags, std::vector<int64_t>* positions) {
  starts->assign(n_unique + 1, 0);
  for (int64_t j = 0; j < csr.nnz; ++j) {
    if (unique_of[j] >= 0) ++(*starts)[unique_of[j] + 1];
  }
  for (int64_t u = 0; u < n_unique; ++u) (*starts)[u + 1] += (*starts)[u];
  bags->resize((*starts)[n_unique]);
  if (positions != nullptr) positions->resize((*starts)[n_unique]);
  std::vector<int64_t> cursor(starts->begin(), starts->end() - 1);
  for (int64_t b = 0; b < csr.batch; ++b) {
    for (int64_t j = csr.row_splits[b]; j < static_cast<int64_t>(csr.row_splits[b + 1]); ++j) {
      if (unique_of[j] < 0) continue;
      const int64_t k = cursor[unique_of[j]]++;
      (*bags)[k] = b;
      if (positions != nullptr) (*positions)[k] = j;
    }
  }
}

// Row u - u_begin of `unique_grad`, for u in [u_begin, u_end): SumGradRowsAnyWidth, in the AVX2
// build where the CPU has it.
template <typename T>
void SumGradRows(const T* source, int64_t width, const T* weights, const int64_t* starts,
                 const int64_t* bags, const int64_t* positions, int64_t u_begin, int64_t u_end,
                 T* unique_grad) {
  // starts shifted to u_begin: the summed rows land from the start of unique_grad.
#if DE_HAVE_AVX2_CLONES
  if (CpuHasAvx2()) {
    return SumGradRowsAvx2(source, width, weights, starts + u_begin, bags, positions, 0,
                           u_end - u_begin, unique_grad);
  }
#endif
  SumGradRowsPortable(source, width, weights, starts + u_begin, bags, positions, 0, u_end - u_begin,
                      unique_grad);
}

// What each unique id's gradient row sums (steps 1-3 of BackwardValidated, shared with the
// half-table backward): the rows of `source` listed in bags[starts[u]] .. bags[starts[u + 1] - 1],
// weighted by weights[positions[k]] unless `weights` is null.
template <typename T>
struct GroupedGradient {
  std::vector<T> scaled;  // the output gradient divided per bag, when the combiner divides
  const T* source = nullptr;
  std::vector<int64_t> starts, bags, positions;
};

// Writes the unique ids (and their count, 0 when there is nothing to sum) and returns how their
// gradient rows are made up.
template <typename T, typename IdT, typename OffsetT>
GroupedGradient<T> GroupGradientByUniqueId(const T* grad_output, int64_t num_rows, int64_t width,
                                           const CsrIds<IdT, OffsetT>& csr, const T* weights,
                                           Combiner combiner, IdT* unique_ids,
                                           int64_t* num_unique) {
  GroupedGradient<T> grouped;
  grouped.source = grad_output;
  *num_unique = 0;
  if (csr.nnz == 0) return grouped;

  // 1. Unique ids in first-occurrence order; -1 marks a skipped invalid id.
  std::vector<int64_t> unique_of(csr.nnz);
  IndexUniqueIdsOfCsr(csr, num_rows, unique_of.data(), unique_ids, num_unique);
  const int64_t n_unique = *num_unique;
  if (n_unique == 0) return grouped;  // Every id skipped (BoundsCheck::kSkip).

  // 2. The gradient each occurrence contributes: its bag's output gradient, divided by the bag's
  //    divisor: for mean its valid length, for sqrtn that length's square root (weighted: the
  //    weights' sum, the square root of their squares' sum; zeros where the forward gave zeros).
  if (combiner != Combiner::kSum) {
    grouped.scaled = DividedByBag(grad_output, csr.batch, width, [&](int64_t b) {
      if (weights != nullptr) return WeightedBagDivisor(csr, weights, num_rows, combiner, b);
      int64_t valid = 0;
      for (int64_t j = csr.row_splits[b]; j < static_cast<int64_t>(csr.row_splits[b + 1]); ++j) {
        valid += unique_of[j] >= 0;
      }
      return MeanDivides(valid) ? BagDivisor<T>(valid, combiner == Combiner::kSqrtn) : T(1);
    });
    grouped.source = grouped.scaled.data();
  }

  // 3. Occurrences grouped by unique id, each recorded as its bag (the row of `source` it adds)
  //    and, for weighted bags, its position (its weight).
  GroupOccurrencesByUniqueId(csr, unique_of.data(), n_unique, &grouped.starts, &grouped.bags,
                             weights != nullptr ? &grouped.positions : nullptr);
  return grouped;
}

// The backward pass once the ids are validated, of unweighted bags (`weights` null) or weighted
// ones (WeightedPooledLookupBackwardCpu).
template <typename T, typename IdT, typename OffsetT>
void BackwardValidated(const T* grad_output, int64_t num_rows, int64_t width,
                       const CsrIds<IdT, OffsetT>& csr, const T* weights, Combiner combiner,
                       IdT* unique_ids, T* unique_grad, int64_t* num_unique,
                       const ParallelFor& parallel_for) {
  const GroupedGradient<T> g = GroupGradientByUniqueId(grad_output, num_rows, width, csr, weights,
                                                       combiner, unique_ids, num_unique);
  if (*num_unique == 0) return;
  // 4. Sum each unique id's gradient rows, unique ids split across threads by occurrences.
  const int64_t cost_per_occurrence = width * static_cast<int64_t>(sizeof(T));
  const auto sum_grad_rows = [&](int64_t begin, int64_t end) {
    SumGradRows(g.source, width, weights, g.starts.data(), g.bags.data(), g.positions.data(), begin,
                end, unique_grad + begin * width);
  };
  RunParallelBalanced(parallel_for, *num_unique, g.starts.data(), cost_per_occurrence,
                      sum_grad_rows);
}

// PooledLookupBackwardCpu and WeightedPooledLookupBackwardCpu.
template <typename T, typename IdT, typename OffsetT>
Status BackwardCpu(const T* grad_output, int64_t num_rows, int64_t width,
                   const CsrIds<IdT, OffsetT>& csr, const T* weights, Combiner combiner,
                   BoundsCheck bounds_check, IdT* unique_ids, T* unique_grad, int64_t* num_unique,
                   const ParallelFor& parallel_for) {
  DE_RETURN_IF_ERROR(ValidateCsrIds(csr, num_rows, bounds_check));
  // The scratch buffers (hash slots, per-id indices) are allocated on this thread; running out
  // of memory for them is an error for the caller, never std::terminate.
  try {
    BackwardValidated(grad_output, num_rows, width, csr, weights, combiner, unique_ids, unique_grad,
                      num_unique, parallel_for);
  } catch (const std::bad_alloc&) {
    *num_unique = 0;
    return Status::ResourceExhausted("out of memory for the backward pass's scratch buffers (" +
                                     std::to_string(csr.nnz) + " ids).");
  }
  return Status::Ok();
}

}  // namespace

template <typename T, typename IdT, typename OffsetT>
Status PooledLookupBackwardCpu(const T* grad_output, int64_t num_rows, int64_t width,
                               const CsrIds<IdT, OffsetT>& csr, Combiner combiner,
                               BoundsCheck bounds_check, IdT* unique_ids, T* unique_grad,
                               int64_t* num_unique, const ParallelFor& parallel_for) {
  return BackwardCpu<T>(grad_output, num_rows, width, csr, nullptr, combiner, bounds_check,
                        unique_ids, unique_grad, num_unique, parallel_for);
}

template <typename OffsetT>
Status CooToRowSplitsCpu(const int64_t* indices, int64_t nnz, int64_t num_rows_dense,
                         int64_t num_cols_dense, OffsetT* row_splits) {
  if (nnz > static_cast<int64_t>(std::numeric_limits<OffsetT>::max())) {
    return NnzTooLargeError(nnz, std::numeric_limits<OffsetT>::max());
  }
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t row = indices[2 * j];
    const int64_t col = indices[2 * j + 1];
    if (!CooInBounds(row, col, num_rows_dense, num_cols_dense)) {
      return CooIndexOutOfBoundsError(j, row, col, num_rows_dense, num_cols_dense);
    }
    if (j > 0) {
      const int64_t prev_row = indices[2 * j - 2];
      const int64_t prev_col = indices[2 * j - 1];
      if (!CooFollows(prev_row, prev_col, row, col)) {
        return CooIndexOrderError(j, row, col, prev_row, prev_col);
      }
    }
  }
  // Rows are sorted, so row_splits[r] is the position of the first index with row >= r.
  int64_t j = 0;
  for (int64_t r = 0; r <= num_rows_dense; ++r) {
    while (j < nnz && indices[2 * j] < r) ++j;
    row_splits[r] = static_cast<OffsetT>(j);
  }
  return Status::Ok();
}

// Explicit instantiations of the two lookup entry points for one (table, id, offset) type.
#define DE_INSTANTIATE_CPU_LOOKUP(T, IdT, OffsetT)                                                 \
  template Status PooledLookupForwardCpu(const T*, int64_t, int64_t, const CsrIds<IdT, OffsetT>&,  \
                                         Combiner, BoundsCheck, T*, const ParallelFor&);           \
  template Status PooledLookupBackwardCpu(const T*, int64_t, int64_t, const CsrIds<IdT, OffsetT>&, \
                                          Combiner, BoundsCheck, IdT*, T*, int64_t*,               \
                                          const ParallelFor&);

}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_EMBEDDING_LOOKUP_CPU_IMPL_H_
