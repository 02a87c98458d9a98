// CUDA implementation of anchor_kernels::steer_hidden: a thin binding over the torch-free
// launcher in kernels/steer_cuda.cu. Current stream, device guard, no sync: graph-capturable.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "steer_args.h"

namespace anchor_kernels {

at::Tensor steer_hidden_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& anchor_ids,
                             const at::Tensor& anchor_weights, const at::Tensor& gram,
                             const at::Tensor& row_sets, const at::Tensor& step_size,
                             int64_t steps, c10::string_view objective, double reg,
                             double temperature, double margin, double max_norm) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  SteerCall call = make_steer_call(hidden, weight, bias, anchor_ids, anchor_weights, gram,
                                   row_sets, step_size, steps, std::string(objective), reg,
                                   temperature, margin, max_norm);
  const ak_status st =
      ak_steer_hidden_cuda(&call.params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(st != AK_ERROR_UNSUPPORTED, "steer_hidden: the cuda backend supports K <= ",
              ak_cuda_max_set_size(), " anchors per set and d <= 32768, got K = ",
              call.params.set_size, ", d = ", call.params.dim);
  TORCH_CHECK(st != AK_ERROR_CUDA, "steer_hidden: CUDA launch failed: ",
              cudaGetErrorString(cudaGetLastError()));
  TORCH_CHECK(st == AK_OK, "steer_hidden: invalid arguments (status ", static_cast<int>(st), ")");
  return call.out;
}

}  // namespace anchor_kernels

TORCH_LIBRARY_IMPL(anchor_kernels, CUDA, m) {
  m.impl("steer_hidden", &anchor_kernels::steer_hidden_cuda);
}
