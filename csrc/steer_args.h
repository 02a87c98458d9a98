// Tensor checks shared by the CPU and CUDA torch bindings: every error names the argument.
// This is the only C++ that sees at::Tensor besides the bindings themselves.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "anchor_kernels/steer.h"

namespace anchor_kernels {

// Keeps the (possibly made-contiguous) tensors alive as long as the params point at them.
struct SteerCall {
  at::Tensor hidden, weight, bias, anchor_ids, anchor_weights, gram, direction, row_sets, step_size,
      out;
  ak_steer_params params{};
};

// Which op is checking, and the name of its first tensor (hidden or logits), for the messages.
struct OpNames {
  const char* op;
  const char* first;
};
constexpr OpNames kSteerHidden{"steer_hidden", "hidden"};
constexpr OpNames kSteerLogits{"steer_logits_", "logits"};

inline ak_dtype to_ak_dtype(at::ScalarType t, const OpNames& at) {
  switch (t) {
    case at::kFloat: return AK_FLOAT32;
    case at::kHalf: return AK_FLOAT16;
    case at::kBFloat16: return AK_BFLOAT16;
    default:
      TORCH_CHECK(false, at.op, ": ", at.first, " must be float32, float16 or bfloat16, got ", t);
  }
}

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                         int64_t dim, const at::Device& device, const OpNames& at) {
  TORCH_CHECK(t.dim() == dim, at.op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, at.op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, at.op, ": ", name, " is on ", t.device(), " but ", at.first,
              " is on ", device);
}

// The scalar ranges of the K-space loop (anchor_kernels/triton_steer.py holds the same).
inline void check_loop_scalars(int64_t steps, const std::string& objective, double reg,
                               double temperature, double margin, double max_norm) {
  TORCH_CHECK(steps >= 0 && steps <= AK_MAX_STEPS, "anchor_kernels: steps must be in [0, ",
              AK_MAX_STEPS, "], got ", steps);
  TORCH_CHECK(objective == "mean" || objective == "lse",
              "anchor_kernels: objective must be 'mean' or 'lse', got '", objective, "'");
  constexpr double kFloatMax = 3.4028234663852886e38;
  TORCH_CHECK(std::isfinite(reg) && reg >= 0 && reg <= kFloatMax,
              "anchor_kernels: reg must be >= 0 and finite in float32, got ", reg);
  TORCH_CHECK(temperature >= AK_MIN_TEMPERATURE && temperature <= AK_MAX_TEMPERATURE,
              "anchor_kernels: temperature must be in [", AK_MIN_TEMPERATURE, ", ",
              AK_MAX_TEMPERATURE, "], got ", temperature);
  TORCH_CHECK(!std::isnan(margin) && (std::isinf(margin) || std::fabs(margin) <= kFloatMax),
              "anchor_kernels: margin must be finite in float32 or +inf (which disables it), got ",
              margin);
  TORCH_CHECK(max_norm >= 0 && (std::isinf(max_norm) || max_norm <= kFloatMax),
              "anchor_kernels: max_norm must be >= 0 and finite in float32, or +inf (no trust "
              "region), got ", max_norm);

}

// anchor_ids [S, K], anchor_weights [S, K], gram [S, K, K], row_sets [B], step_size [B].
inline void check_bank(const at::Tensor& anchor_ids, const at::Tensor& anchor_weights,
                       const at::Tensor& gram, const at::Tensor& row_sets,
                       const at::Tensor& step_size, int64_t rows, const at::Device& dev,
                       const OpNames& at) {
  check_tensor(anchor_ids, "anchor_ids", at::kLong, 2, dev, at);
  const int64_t S = anchor_ids.size(0), K = anchor_ids.size(1);
  TORCH_CHECK(S >= 1 && K >= 1, at.op, ": anchor_ids must be [S, K] with S, K >= 1, got ",
              anchor_ids.sizes());
  check_tensor(anchor_weights, "anchor_weights", at::kFloat, 2, dev, at);
  TORCH_CHECK(anchor_weights.sizes() == anchor_ids.sizes(), at.op, ": anchor_weights ",
              anchor_weights.sizes(), " must match anchor_ids ", anchor_ids.sizes());
  check_tensor(gram, "gram", at::kFloat, 3, dev, at);
  TORCH_CHECK(gram.size(0) == S && gram.size(1) == K && gram.size(2) == K, at.op,
              ": gram must be [S, K, K] = [", S, ", ", K, ", ", K, "], got ", gram.sizes());
  check_tensor(row_sets, "row_sets", at::kLong, 1, dev, at);
  TORCH_CHECK(row_sets.size(0) == rows, at.op, ": row_sets has ", row_sets.size(0),
              " entries but ", at.first, " has ", rows, " rows");
  check_tensor(step_size, "step_size", at::kFloat, 1, dev, at);
  TORCH_CHECK(step_size.size(0) == rows, at.op, ": step_size has ", step_size.size(0),
              " entries but ", at.first, " has ", rows, " rows");
}

// The K-space loop's fields, shared by ak_steer_params and ak_logits_params.
template <typename Params>
void set_loop_fields(Params& p, int64_t steps, const std::string& objective, double reg,
                     double temperature, double margin, double max_norm, bool relative_step) {
  p.steps = steps;
  p.relative_step = relative_step ? 1 : 0;
  p.objective = objective == "lse" ? AK_OBJECTIVE_LSE : AK_OBJECTIVE_MEAN;
  p.reg = static_cast<float>(reg);
  p.temperature = static_cast<float>(temperature);
  p.margin = static_cast<float>(margin);
  p.max_norm = static_cast<float>(max_norm);
}

inline at::Tensor unit_stride_rows(const at::Tensor& t) {
  return t.stride(-1) == 1 && t.stride(0) >= 0 ? t : t.contiguous();
}

inline SteerCall make_steer_call(const at::Tensor& hidden, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const at::Tensor& anchor_ids, const at::Tensor& anchor_weights,
                                 const at::Tensor& gram, const at::Tensor& row_sets,
                                 const at::Tensor& step_size, int64_t steps,
                                 const std::string& objective, double reg, double temperature,
                                 double margin, double max_norm, bool relative_step,
                                 const std::optional<at::Tensor>& direction) {
  const at::Device dev = hidden.device();
  TORCH_CHECK(hidden.dim() == 2, "steer_hidden: hidden must be 2-D [B, d], got shape ",
              hidden.sizes());
  const ak_dtype dtype = to_ak_dtype(hidden.scalar_type(), kSteerHidden);
  TORCH_CHECK(hidden.size(1) >= 1, "steer_hidden: hidden must have d >= 1");
  check_tensor(weight, "weight", hidden.scalar_type(), 2, dev, kSteerHidden);
  TORCH_CHECK(weight.size(1) == hidden.size(1), "steer_hidden: weight is [V, d] = ",
              weight.sizes(), " but hidden has d = ", hidden.size(1));
  TORCH_CHECK(weight.size(0) >= 1, "steer_hidden: weight must have V >= 1 rows");
  check_bank(anchor_ids, anchor_weights, gram, row_sets, step_size, hidden.size(0), dev, kSteerHidden);
  const int64_t S = anchor_ids.size(0), K = anchor_ids.size(1);
  check_loop_scalars(steps, objective, reg, temperature, margin, max_norm);

  SteerCall call;
  call.hidden = unit_stride_rows(hidden);
  call.weight = unit_stride_rows(weight);
  if (bias.has_value()) {
    check_tensor(*bias, "bias", hidden.scalar_type(), 1, dev, kSteerHidden);
    TORCH_CHECK(bias->size(0) == weight.size(0), "steer_hidden: bias has ", bias->size(0),
                " entries but weight has V = ", weight.size(0), " rows");
    call.bias = bias->contiguous();
  }
  if (direction.has_value()) {
    check_tensor(*direction, "direction", at::kFloat, 2, dev, kSteerHidden);
    TORCH_CHECK(direction->size(0) == S && direction->size(1) == hidden.size(1),
                "steer_hidden: direction must be [S, d] = [", S, ", ", hidden.size(1), "], got ",
                direction->sizes());
    call.direction = direction->contiguous();
  }
  call.anchor_ids = anchor_ids.contiguous();
  call.anchor_weights = anchor_weights.contiguous();
  call.gram = gram.contiguous();
  call.row_sets = row_sets.contiguous();
  call.step_size = step_size.contiguous();
  call.out = at::empty(hidden.sizes(), hidden.options());

  ak_steer_params& p = call.params;
  p.dtype = dtype;
  p.rows = hidden.size(0);
  p.dim = hidden.size(1);
  p.vocab = weight.size(0);
  p.hidden = call.hidden.data_ptr();
  p.hidden_row_stride = call.hidden.stride(0);
  p.weight = call.weight.data_ptr();
  p.weight_row_stride = call.weight.stride(0);
  p.bias = call.bias.defined() ? call.bias.data_ptr() : nullptr;
  p.anchor_ids = call.anchor_ids.data_ptr<int64_t>();
  p.anchor_weights = call.anchor_weights.data_ptr<float>();
  p.gram = call.gram.data_ptr<float>();
  p.direction = call.direction.defined() ? call.direction.data_ptr<float>() : nullptr;
  p.num_sets = S;
  p.set_size = K;
  p.row_sets = call.row_sets.data_ptr<int64_t>();
  p.step_size = call.step_size.data_ptr<float>();
  set_loop_fields(p, steps, objective, reg, temperature, margin, max_norm, relative_step);
  p.out = call.out.data_ptr();
  p.out_row_stride = call.out.stride(0);
  return call;
}


// The checks and the C params of anchor_kernels::steer_logits_, shared by its CPU and CUDA
// implementations; the contiguous tensors the params point into live in ``tensors``.
struct LogitsCall {
  std::vector<at::Tensor> tensors;
  ak_logits_params params{};
};

inline LogitsCall make_logits_call(const at::Tensor& logits, const at::Tensor& mixing,
                                   const at::Tensor& anchor_ids, const at::Tensor& anchor_weights,
                                   const at::Tensor& gram, const at::Tensor& row_sets,
                                   const at::Tensor& step_size,
                                   const std::optional<at::Tensor>& hidden_norm, int64_t steps,
                                   const std::string& objective, double reg, double temperature,
                                   double margin, double max_norm, bool relative_step) {
  const at::Device dev = logits.device();
  TORCH_CHECK(logits.dim() == 2, "steer_logits_: logits must be 2-D [B, V], got shape ",
              logits.sizes());
  const ak_dtype dtype = to_ak_dtype(logits.scalar_type(), kSteerLogits);
  TORCH_CHECK(logits.stride(1) == 1 && (logits.size(0) <= 1 || logits.stride(0) >= logits.size(1)),
              "steer_logits_: logits must have unit stride along V and non-overlapping rows (it is "
              "edited in place)");
  check_bank(anchor_ids, anchor_weights, gram, row_sets, step_size, logits.size(0), dev, kSteerLogits);
  const int64_t S = anchor_ids.size(0), K = anchor_ids.size(1), V = logits.size(1);
  TORCH_CHECK(mixing.scalar_type() == at::kFloat || mixing.scalar_type() == at::kHalf ||
                  mixing.scalar_type() == at::kBFloat16,
              "steer_logits_: mixing must be float32, float16 or bfloat16, got ", mixing.scalar_type());
  check_tensor(mixing, "mixing", mixing.scalar_type(), 3, dev, kSteerLogits);
  TORCH_CHECK(mixing.size(0) == S && mixing.size(1) == K && mixing.size(2) == V,
              "steer_logits_: mixing must be [S, K, V] = [", S, ", ", K, ", ", V, "], got ",
              mixing.sizes());
  const std::string& obj = objective;
  check_loop_scalars(steps, obj, reg, temperature, margin, max_norm);
  const bool needs_norm = std::isfinite(max_norm) || relative_step;
  TORCH_CHECK(hidden_norm.has_value() || !needs_norm,
              "steer_logits_: max_norm (the trust region) and relative_step need hidden_norm "
              "(||h0|| per row), which logits do not carry");
  at::Tensor norm;
  if (hidden_norm.has_value()) {
    check_tensor(*hidden_norm, "hidden_norm", at::kFloat, 1, dev, kSteerLogits);
    TORCH_CHECK(hidden_norm->size(0) == logits.size(0), "steer_logits_: hidden_norm has ",
                hidden_norm->size(0), " entries but logits has ", logits.size(0), " rows");
    norm = hidden_norm->contiguous();
  }
  LogitsCall call;
  call.tensors = {mixing.contiguous(), anchor_ids.contiguous(), anchor_weights.contiguous(),
                  gram.contiguous(), row_sets.contiguous(), step_size.contiguous(), norm};
  const at::Tensor &m = call.tensors[0], &ids = call.tensors[1], &aw = call.tensors[2],
                   &g = call.tensors[3], &rs = call.tensors[4], &eta = call.tensors[5];
  ak_logits_params& q = call.params;
  q.dtype = dtype;
  q.rows = logits.size(0);
  q.vocab = V;
  q.logits = logits.data_ptr();
  q.logits_row_stride = logits.stride(0);
  q.mixing = m.data_ptr();
  q.mixing_dtype = to_ak_dtype(m.scalar_type(), kSteerLogits);
  q.anchor_ids = ids.data_ptr<int64_t>();
  q.anchor_weights = aw.data_ptr<float>();
  q.gram = g.data_ptr<float>();
  q.num_sets = S;
  q.set_size = K;
  q.row_sets = rs.data_ptr<int64_t>();
  q.step_size = eta.data_ptr<float>();
  q.hidden_norm = norm.defined() ? norm.data_ptr<float>() : nullptr;
  set_loop_fields(q, steps, obj, reg, temperature, margin, max_norm, relative_step);
  // An empty batch's tensors have null data pointers, which the C check reads as missing.
  TORCH_CHECK(q.rows == 0 || ak_steer_logits_check_params(&q) == AK_OK,
              "steer_logits_: invalid arguments");
  return call;
}

}  // namespace anchor_kernels
