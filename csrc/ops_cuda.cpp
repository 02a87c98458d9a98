// CUDA implementation of anchor_kernels::steer_hidden: a thin binding over the torch-free
// launcher in kernels/steer_cuda.cu. Current stream, device guard, no sync: graph-capturable.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "steer_args.h"

namespace anchor_kernels {

at::Tensor steer_hidden_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& anchor_ids,
                             const at::Tensor& anchor_weights, const at::Tensor& gram,
                             const at::Tensor& row_sets, const at::Tensor& step_size,
                             int64_t steps, c10::string_view objective, double reg,
                             double temperature, double margin, double max_norm,
                             bool relative_step) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  SteerCall call = make_steer_call(hidden, weight, bias, anchor_ids, anchor_weights, gram,
                                   row_sets, step_size, steps, std::string(objective), reg,
                                   temperature, margin, max_norm, relative_step);
  at::Tensor workspace;  // the rank-one form of "mean": u = W_A^T w and w . b_A per set
  if (call.params.objective == AK_OBJECTIVE_MEAN && call.params.rows > 0) {
    workspace = at::empty({call.params.num_sets, call.params.dim + 1}, hidden.options().dtype(at::kFloat));
    call.params.workspace = workspace.data_ptr<float>();
  }
  const ak_status st =
      ak_steer_hidden_cuda(&call.params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(st != AK_ERROR_UNSUPPORTED, "steer_hidden: the cuda backend supports K <= ",
              ak_cuda_max_set_size(), " anchors per set and d <= ", ak_cuda_max_dim(),
              " within this GPU's shared memory, got K = ", call.params.set_size, ", d = ",
              call.params.dim, "; use backend='triton'");
  TORCH_CHECK(st != AK_ERROR_NO_KERNEL_IMAGE, "steer_hidden: anchor_kernels._C holds no CUDA "
              "kernel for this GPU (", ak_cuda_last_error(), "); rebuild with "
              "ANCHOR_KERNELS_CUDA_ARCHS including its architecture, or use backend='triton'");
  TORCH_CHECK(st != AK_ERROR_CUDA, "steer_hidden: CUDA launch failed: ", ak_cuda_last_error());
  TORCH_CHECK(st == AK_OK, "steer_hidden: invalid arguments (status ", static_cast<int>(st), ")");
  return call.out;
}

std::optional<std::string> cuda_check_device(int device) {
  const ak_status st = ak_cuda_check_device(device);
  if (st == AK_OK) return std::nullopt;
  return std::string(st == AK_ERROR_NO_KERNEL_IMAGE ? "no kernel image for this GPU: "
                                                    : "CUDA error: ") + ak_cuda_last_error();
}

}  // namespace anchor_kernels

TORCH_LIBRARY_IMPL(anchor_kernels, CUDA, m) {
  m.impl("steer_hidden", &anchor_kernels::steer_hidden_cuda);
}
