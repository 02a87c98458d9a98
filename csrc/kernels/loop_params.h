// The K-space loop reads only these fields of the hidden-state params: the logit form (CPU and
// CUDA) runs the same loop through them.
#pragma once

#include "anchor_kernels/steer.h"

namespace anchor_kernels {

inline ak_steer_params loop_params(const ak_logits_params& q) {
  ak_steer_params p{};
  p.set_size = q.set_size;
  p.steps = q.steps;
  p.relative_step = q.relative_step;
  p.objective = q.objective;
  p.reg = q.reg;
  p.temperature = q.temperature;
  p.margin = q.margin;
  p.max_norm = q.max_norm;
  return p;
}

}  // namespace anchor_kernels
