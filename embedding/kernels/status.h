// Status: the error type of the framework-free kernel library.
//
// Kernels return a Status instead of throwing or aborting so each framework binding can turn it
// into its own error (TensorFlow's InvalidArgument, for instance) without this library depending on
// it.
#ifndef DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_STATUS_H_
#define DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_STATUS_H_

#include <string>
#include <utility>

namespace distributed_embeddings {

class Status {
 public:
  enum class Code { kOk, kInvalidArgument, kResourceExhausted, kInternal };

  Status() = default;

  static Status Ok() { return Status(); }
  // A caller error: bad ids, malformed row_splits, inconsistent sizes.
  static Status InvalidArgument(std::string message) {
    return Status(Code::kInvalidArgument, std::move(message));
  }
  // Memory for the call's scratch buffers could not be allocated.
  static Status ResourceExhausted(std::string message) {
    return Status(Code::kResourceExhausted, std::move(message));
  }
  // Our error or the device's: a failed CUDA launch, an impossible state.
  static Status Internal(std::string message) {
    return Status(Code::kInternal, std::move(message));
  }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  Code code_ = Code::kOk;
  std::string message_;
};

}  // namespace distributed_embeddings

// Returns from the enclosing function if `expr` yields a non-OK Status.
#define DE_RETURN_IF_ERROR(expr)                          \
  do {                                                    \
    ::distributed_embeddings::Status de_status_ = (expr); \
    if (!de_status_.ok()) return de_status_;              \
  } while (0)

#endif  // DISTRIBUTED_EMBEDDINGS_EMBEDDING_KERNELS_STATUS_H_
