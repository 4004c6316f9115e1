// What the sparse update tests share: a step's hyperparameters and the rules of sparse_update.h
// written from their definitions in double, one row at a time.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_SPARSE_UPDATE_TEST_UTIL_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_SPARSE_UPDATE_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "embedding/kernels/sparse_update.h"

namespace distributed_embeddings {
namespace testing {

struct Hyper {
  double lr = 0.05, epsilon = 1e-7, beta1 = 0.9, beta2 = 0.999;
  // Lazy Adam's rate at step 3, as Keras computes it.
  double AdamRate() const {
    return lr * std::sqrt(1 - std::pow(beta2, 3)) / (1 - std::pow(beta1, 3));
  }
};

template <typename T>
SparseHyper<T> ToKernel(SparseRule rule, const Hyper& h) {
  SparseHyper<T> out;
  out.learning_rate = static_cast<T>(rule == SparseRule::kLazyAdam ? h.AdamRate() : h.lr);
  out.epsilon = static_cast<T>(h.epsilon);
  out.one_minus_beta1 = static_cast<T>(1 - h.beta1);
  out.one_minus_beta2 = static_cast<T>(1 - h.beta2);
  return out;
}

// The kernel's view of a table and the state `rule` keeps (slots it does not use stay null).
template <typename T>
SparseTable<T> SparseTableOf(SparseRule rule, int64_t num_rows, int64_t width,
                             std::vector<T>& weights, std::vector<T>& slot0,
                             std::vector<T>& slot1) {
  SparseTable<T> table;
  table.weights = weights.data();
  table.num_rows = num_rows;
  table.width = width;
  if (SparseRuleSlots(rule) > 0) table.slots[0] = slot0.data();
  if (SparseRuleSlots(rule) > 1) table.slots[1] = slot1.data();
  return table;
}

// One row's update by `rule` with its summed gradient `g`: `w` the row, `s0` its first state
// (row-wise Adagrad: the row's one accumulator), `s1` its second.
inline void ReferenceRuleRow(SparseRule rule, const Hyper& h, int64_t width, const double* g,
                             double* w, double* s0, double* s1) {
  if (rule == SparseRule::kSgd) {
    for (int64_t k = 0; k < width; ++k) w[k] -= h.lr * g[k];
  } else if (rule == SparseRule::kAdagrad) {
    for (int64_t k = 0; k < width; ++k) {
      s0[k] += g[k] * g[k];
      w[k] -= h.lr * g[k] / std::sqrt(s0[k] + h.epsilon);
    }
  } else if (rule == SparseRule::kRowwiseAdagrad) {
    double mean = 0;
    for (int64_t k = 0; k < width; ++k) mean += g[k] * g[k] / width;
    *s0 += mean;
    for (int64_t k = 0; k < width; ++k) w[k] -= h.lr * g[k] / std::sqrt(*s0 + h.epsilon);
  } else {
    for (int64_t k = 0; k < width; ++k) {
      s0[k] = h.beta1 * s0[k] + (1 - h.beta1) * g[k];
      s1[k] = h.beta2 * s1[k] + (1 - h.beta2) * g[k] * g[k];
      w[k] -= h.AdamRate() * s0[k] / (std::sqrt(s1[k]) + h.epsilon);
    }
  }
}

// ReferenceRuleRow on row `r` of a table and its state held whole: [rows, width] weights, the
// rule's slots of one value per element (row-wise Adagrad: per row); unused slots may be empty.
inline void ReferenceRuleAt(SparseRule rule, const Hyper& h, int64_t width, const double* g,
                            int64_t r, std::vector<double>* weights, std::vector<double>* slot0,
                            std::vector<double>* slot1) {
  const int64_t slot_width = SparseRuleSlotsPerRow(rule) ? 1 : width;
  double* s0 = SparseRuleSlots(rule) > 0 ? slot0->data() + r * slot_width : nullptr;
  double* s1 = SparseRuleSlots(rule) > 1 ? slot1->data() + r * width : nullptr;
  ReferenceRuleRow(rule, h, width, g, weights->data() + r * width, s0, s1);
}

constexpr SparseRule kRules[] = {SparseRule::kSgd, SparseRule::kAdagrad,
                                 SparseRule::kRowwiseAdagrad, SparseRule::kLazyAdam};

inline std::string RuleName(SparseRule rule) {
  switch (rule) {
    case SparseRule::kSgd:
      return "sgd";
    case SparseRule::kAdagrad:
      return "adagrad";
    case SparseRule::kRowwiseAdagrad:
      return "rowwise_adagrad";
    case SparseRule::kLazyAdam:
      return "lazy_adam";
  }
  return "?";
}

}  // namespace testing
}  // namespace distributed_embeddings

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_SPARSE_UPDATE_TEST_UTIL_H_
