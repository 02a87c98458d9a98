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
                            bool relative_step) {
  SteerCall call = make_steer_call(hidden, weight, bias, anchor_ids, anchor_weights, gram,
                                   row_sets, step_size, steps, std::string(objective), reg,
                                   temperature, margin, max_norm, relative_step);
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
  const at::Device dev = logits.device();
  TORCH_CHECK(logits.dim() == 2, "steer_logits: logits must be 2-D [B, V], got shape ",
              logits.sizes());
  const ak_dtype dtype = to_ak_dtype(logits.scalar_type());
  TORCH_CHECK(logits.stride(1) == 1 && (logits.size(0) <= 1 || logits.stride(0) >= logits.size(1)),
              "steer_logits: logits must have unit stride along V and non-overlapping rows (it is "
              "edited in place)");
  check_bank(anchor_ids, anchor_weights, gram, row_sets, step_size, logits.size(0), dev);
  const int64_t S = anchor_ids.size(0), K = anchor_ids.size(1), V = logits.size(1);
  check_tensor(mixing, "mixing", at::kFloat, 3, dev);
  TORCH_CHECK(mixing.size(0) == S && mixing.size(1) == K && mixing.size(2) == V,
              "steer_logits: mixing must be [S, K, V] = [", S, ", ", K, ", ", V, "], got ",
              mixing.sizes());
  const std::string obj(objective);
  check_loop_scalars(steps, obj, reg, temperature, margin, max_norm);
  const bool needs_norm = std::isfinite(max_norm) || relative_step;
  TORCH_CHECK(hidden_norm.has_value() || !needs_norm,
              "steer_logits: max_norm (the trust region) and relative_step need hidden_norm "
              "(||h0|| per row), which logits do not carry");
  at::Tensor norm;
  if (hidden_norm.has_value()) {
    check_tensor(*hidden_norm, "hidden_norm", at::kFloat, 1, dev);
    TORCH_CHECK(hidden_norm->size(0) == logits.size(0), "steer_logits: hidden_norm has ",
                hidden_norm->size(0), " entries but logits has ", logits.size(0), " rows");
    norm = hidden_norm->contiguous();
  }
  const at::Tensor m = mixing.contiguous(), ids = anchor_ids.contiguous(),
                   aw = anchor_weights.contiguous(), g = gram.contiguous(),
                   rs = row_sets.contiguous(), eta = step_size.contiguous();
  ak_logits_params q{};
  q.dtype = dtype;
  q.rows = logits.size(0);
  q.vocab = V;
  q.logits = logits.data_ptr();
  q.logits_row_stride = logits.stride(0);
  q.mixing = m.data_ptr<float>();
  q.anchor_ids = ids.data_ptr<int64_t>();
  q.anchor_weights = aw.data_ptr<float>();
  q.gram = g.data_ptr<float>();
  q.num_sets = S;
  q.set_size = K;
  q.row_sets = rs.data_ptr<int64_t>();
  q.step_size = eta.data_ptr<float>();
  q.hidden_norm = norm.defined() ? norm.data_ptr<float>() : nullptr;
  set_loop_fields(q, steps, obj, reg, temperature, margin, max_norm, relative_step);
  TORCH_CHECK(ak_steer_logits_check_params(&q) == AK_OK, "steer_logits: invalid arguments");
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
  TORCH_CHECK(status.load() != AK_ERROR_ROW_SET, "steer_logits: row_sets entries must be in [-1, ",
              S, ")");
  TORCH_CHECK(status.load() != AK_ERROR_ANCHOR_ID, "steer_logits: anchor_ids must be in [0, ", V,
              ") (the vocabulary size of logits)");
  TORCH_CHECK(status.load() == AK_OK, "steer_logits: CPU kernel failed with status ",
              status.load());
}

}  // namespace anchor_kernels

TORCH_LIBRARY(anchor_kernels, m) {
  m.def(
      "steer_hidden(Tensor hidden, Tensor weight, Tensor? bias, Tensor anchor_ids, "
      "Tensor anchor_weights, Tensor gram, Tensor row_sets, Tensor step_size, int steps, "
      "str objective, float reg, float temperature, float margin, float max_norm, "
      "bool relative_step) -> Tensor");
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
