// CUDA implementation of anchor_kernels::steer_hidden: a thin binding over the torch-free
// launcher in kernels/steer_cuda.cu. Current stream, device guard, no sync: graph-capturable.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>

#include "steer_args.h"

namespace anchor_kernels {

// The plan for the general loop: ak_cuda_split_slices by its model, or $ANCHOR_KERNELS_CUDA_PLAN
// ("tiled": one block per row; "split_d": at least two slices). Read on the host per call, so a
// captured CUDA graph keeps the plan it was captured with.
int64_t cuda_split_slices(const ak_steer_params& p) {
  const int64_t dim = p.dim;
  const char* env = std::getenv("ANCHOR_KERNELS_CUDA_PLAN");
  const std::string plan = env ? env : "auto";
  TORCH_CHECK(plan == "auto" || plan == "tiled" || plan == "split_d",
              "ANCHOR_KERNELS_CUDA_PLAN must be auto, tiled or split_d, got '", plan, "'");
  if (plan == "tiled") return 1;
  const int64_t slices = ak_cuda_split_slices(&p, ak_cuda_sm_count());
  if (plan == "split_d" && dim >= 2) return std::max<int64_t>(2, std::min<int64_t>(slices, dim));
  return slices;
}

at::Tensor steer_hidden_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& anchor_ids,
                             const at::Tensor& anchor_weights, const at::Tensor& gram,
                             const at::Tensor& row_sets, const at::Tensor& step_size,
                             int64_t steps, c10::string_view objective, double reg,
                             double temperature, double margin, double max_norm,
                             bool relative_step, const std::optional<at::Tensor>& direction) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  SteerCall call = make_steer_call(hidden, weight, bias, anchor_ids, anchor_weights, gram,
                                   row_sets, step_size, steps, std::string(objective), reg,
                                   temperature, margin, max_norm, relative_step, direction);
  at::Tensor workspace;
  const at::TensorOptions fp32 = hidden.options().dtype(at::kFloat);
  if (call.params.objective == AK_OBJECTIVE_MEAN) {
    // the rank-one form: u = W_A^T w per set, given (prepared with the anchors) or computed here
    if (call.params.rows > 0 && !call.params.direction) {
      workspace = at::empty({call.params.num_sets, call.params.dim}, fp32);
      call.params.workspace = workspace.data_ptr<float>();
      call.params.workspace_size = workspace.numel();
    }
  } else if (call.params.rows > 0) {
    const int64_t slices = cuda_split_slices(call.params);
    if (slices > 1) {  // the split-d plan: partial z0 and ||h0||^2 per slice
      workspace = at::empty({slices, call.params.rows, call.params.set_size + 1}, fp32);
      call.params.workspace = workspace.data_ptr<float>();
      call.params.workspace_size = workspace.numel();
      call.params.split_slices = slices;
    }
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

void steer_logits_cuda(const at::Tensor& logits, const at::Tensor& mixing,
                       const at::Tensor& anchor_ids, const at::Tensor& anchor_weights,
                       const at::Tensor& gram, const at::Tensor& row_sets,
                       const at::Tensor& step_size, const std::optional<at::Tensor>& hidden_norm,
                       int64_t steps, c10::string_view objective, double reg, double temperature,
                       double margin, double max_norm, bool relative_step) {
  const c10::cuda::CUDAGuard guard(logits.device());
  LogitsCall call = make_logits_call(logits, mixing, anchor_ids, anchor_weights, gram, row_sets,
                                     step_size, hidden_norm, steps, std::string(objective), reg,
                                     temperature, margin, max_norm, relative_step);
  if (call.params.rows == 0) return;  // nothing to edit (and no coefficient buffer to point at)
  const at::Tensor coef =
      at::empty({call.params.rows, call.params.set_size}, logits.options().dtype(at::kFloat));
  const ak_status st = ak_steer_logits_cuda(&call.params, coef.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(st != AK_ERROR_UNSUPPORTED, "steer_logits: the cuda backend supports K <= ",
              ak_cuda_max_set_size(), " anchors per set and ", ak_cuda_max_logit_rows(),
              " rows per call, got K = ", call.params.set_size, " and ", call.params.rows,
              " rows; use the triton backend");
  TORCH_CHECK(st != AK_ERROR_NO_KERNEL_IMAGE, "steer_logits: anchor_kernels._C holds no CUDA "
              "kernel for this GPU (", ak_cuda_last_error(), "); use the triton backend");
  TORCH_CHECK(st != AK_ERROR_CUDA, "steer_logits: CUDA launch failed: ", ak_cuda_last_error());
  TORCH_CHECK(st == AK_OK, "steer_logits: invalid arguments (status ", static_cast<int>(st), ")");
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
  m.impl("steer_logits_", &anchor_kernels::steer_logits_cuda);
}
