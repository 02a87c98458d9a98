// The op schema (declared once, here) and its CPU implementation.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "steer_args.h"

namespace anchor_kernels {

#ifdef ANCHOR_KERNELS_WITH_CUDA
std::optional<std::string> cuda_check_device(int device);  // ops_cuda.cpp
#endif

at::Tensor steer_hidden_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& anchor_ids,
                            const at::Tensor& anchor_weights, const at::Tensor& gram,
                            const at::Tensor& row_sets, const at::Tensor& step_size,
                            int64_t steps, c10::string_view objective, double reg,
                            double temperature, double margin, double max_norm,
                            bool relative_step, const std::optional<at::Tensor>& direction) {
  SteerCall call = make_steer_call(hidden, weight, bias, anchor_ids, anchor_weights, gram,
                                   row_sets, step_size, steps, std::string(objective), reg,
                                   temperature, margin, max_norm, relative_step, direction);
  TORCH_CHECK(ak_steer_check_params(&call.params) == AK_OK,
              "steer_hidden: invalid arguments (internal check)");
  // Each chunk converts the anchor rows once, so keep chunks a few rows long.
  const int64_t grain = std::max<int64_t>(1, call.params.rows / (2 * at::get_num_threads()));
  std::atomic<int> status{AK_OK};
  at::parallel_for(0, call.params.rows, grain, [&](int64_t begin, int64_t end) {
    const ak_status st = ak_steer_rows_cpu(&call.params, begin, end);
    if (st != AK_OK) status.store(st);
  });
  TORCH_CHECK(status.load() != AK_ERROR_ROW_SET, "steer_hidden: row_sets entries must be in [-1, ",
              call.params.num_sets, ")");
  TORCH_CHECK(status.load() != AK_ERROR_ANCHOR_ID, "steer_hidden: anchor_ids must be in [0, ",
              call.params.vocab, ") (the vocabulary size of weight)");
  TORCH_CHECK(status.load() == AK_OK, "steer_hidden: CPU kernel failed with status ",
              status.load());
  return call.out;
}

void steer_logits_cpu(const at::Tensor& logits, const at::Tensor& mixing,
                      const at::Tensor& anchor_ids, const at::Tensor& anchor_weights,
                      const at::Tensor& gram, const at::Tensor& row_sets,
                      const at::Tensor& step_size, const std::optional<at::Tensor>& hidden_norm,
                      int64_t steps, c10::string_view objective, double reg, double temperature,
                      double margin, double max_norm, bool relative_step) {
  LogitsCall call = make_logits_call(logits, mixing, anchor_ids, anchor_weights, gram, row_sets,
                                     step_size, hidden_norm, steps, std::string(objective), reg,
                                     temperature, margin, max_norm, relative_step);
  const ak_logits_params& q = call.params;
  if (q.rows == 0) return;  // nothing to edit (and no coefficient buffer to hand the kernels)
  const int64_t S = q.num_sets, K = q.set_size, V = q.vocab;
  std::atomic<int> status{AK_OK};
  std::vector<float> coef(q.rows * K);
  std::vector<uint8_t> moved(q.rows);
  at::parallel_for(0, q.rows, 1, [&](int64_t begin, int64_t end) {
    const ak_status st = ak_steer_logits_solve_cpu(&q, begin, end, coef.data(), moved.data());
    if (st != AK_OK) status.store(st);
  });
  // Over the vocabulary, so one call reads M once however many rows share a set.
  if (status.load() == AK_OK)
    at::parallel_for(0, V, 2048, [&](int64_t begin, int64_t end) {
      const ak_status st = ak_steer_logits_apply_cpu(&q, coef.data(), moved.data(), begin, end);
      if (st != AK_OK) status.store(st);
    });
  TORCH_CHECK(status.load() != AK_ERROR_ROW_SET, "steer_logits_: row_sets entries must be in [-1, ",
              S, ")");
  TORCH_CHECK(status.load() != AK_ERROR_ANCHOR_ID, "steer_logits_: anchor_ids must be in [0, ", V,
              ") (the vocabulary size of logits)");
  TORCH_CHECK(status.load() == AK_OK, "steer_logits_: CPU kernel failed with status ",
              status.load());
}

}  // namespace anchor_kernels

TORCH_LIBRARY(anchor_kernels, m) {
  m.def(
      "steer_hidden(Tensor hidden, Tensor weight, Tensor? bias, Tensor anchor_ids, "
      "Tensor anchor_weights, Tensor gram, Tensor row_sets, Tensor step_size, int steps, "
      "str objective, float reg, float temperature, float margin, float max_norm, "
      "bool relative_step, Tensor? direction=None) -> Tensor");
  m.def(
      "steer_logits_(Tensor(a!) logits, Tensor mixing, Tensor anchor_ids, Tensor anchor_weights, "
      "Tensor gram, Tensor row_sets, Tensor step_size, Tensor? hidden_norm, int steps, "
      "str objective, float reg, float temperature, float margin, float max_norm, "
      "bool relative_step) -> ()");
}

TORCH_LIBRARY_IMPL(anchor_kernels, CPU, m) {
  m.impl("steer_hidden", &anchor_kernels::steer_hidden_cpu);
  m.impl("steer_logits_", &anchor_kernels::steer_logits_cpu);
}

#ifdef ANCHOR_KERNELS_WITH_CUDA
#define AK_CUDA_BUILT true
#else
#define AK_CUDA_BUILT false
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "anchor_kernels native ops; importing registers torch.ops.anchor_kernels.*";
  m.attr("cuda_built") = AK_CUDA_BUILT;
  m.attr("max_steps") = AK_MAX_STEPS;
  m.attr("min_temperature") = AK_MIN_TEMPERATURE;
  m.attr("max_temperature") = AK_MAX_TEMPERATURE;
#ifdef ANCHOR_KERNELS_WITH_CUDA
  m.def("cuda_check_device", &anchor_kernels::cuda_check_device,
        "None if the CUDA kernels run on this device index, else why not");
#endif
}
