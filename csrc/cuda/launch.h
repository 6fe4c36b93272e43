// Plain-data interface between the host glue (ops_cuda.cpp, compiled by the C++ compiler with ATen) and the
// kernels (*.cu, compiled by nvcc without torch headers: faster builds, no ATen in device code).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace torchutils_ext {
namespace cuda {

// EMA: one entry per dense (ema, model) pair with numel > 0; kind is an EmaKind.
struct EmaEntry {
  void* ema;
  const void* model;
  int64_t numel;
  uint8_t kind;
};
// Decay from device memory (ptr, float or double) or, when ptr is null, the host value.
struct EmaDecay {
  const void* ptr;
  bool is_double;
  double value;
};
void launch_ema(const EmaEntry* entries, int n, EmaDecay decay, bool lerp, cudaStream_t stream);

// count_zeros: adds the number of zero elements of every entry into *out (int64, on device).
struct ZeroEntry {
  const void* ptr;
  int64_t numel;
  uint64_t mask;
  int elem_size;
};
void launch_count_zeros(const ZeroEntry* entries, int n, int64_t* out, cudaStream_t stream);

// fold_conv_bn: one entry per layer whose weight walks as rows (see RowLayout). BN vectors are of the weight's
// dtype, or of its math type (float/double) when vec_op. Optional vectors (bias, bn_w, bn_b) may be null. out_w
// may equal w (in place). numel >= 1 sizes the launch (block 0 of a layer writes its bias, even for an empty
// weight); elems is the weight's element count.
struct FoldEntry {
  const void* w;
  void* out_w;
  const void* bias;
  const void* bn_w;
  const void* bn_b;
  const void* mean;
  const void* var;
  void* out_b;
  double eps;
  int64_t numel, elems, K, ipg, opg, C;
  bool vec_op;
};
enum class FoldDtype : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };
void launch_fold(const FoldEntry* entries, int n, FoldDtype dtype, cudaStream_t stream);

// Raises (through the host glue) when a launch failed.
const char* last_launch_error();

}  // namespace cuda
}  // namespace torchutils_ext
