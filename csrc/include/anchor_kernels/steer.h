/* anchor_kernels C API: anchor-word steering of an LM's last hidden state.
 *
 * Torch-free on purpose: engines written in C/C++ link this without libtorch, and the
 * torch bindings in csrc/ops*.cpp are thin wrappers over exactly these entry points.
 * The maths is ../../../../shared/docs/METHOD.md (K-space form):
 *
 *   z0 = W_A h0 + b_A;  c = 0
 *   if relative_step: eta = step_size * ||h0|| / ||grad G(h0)||   (0 if either norm is 0)
 *   repeat steps times:  z = z0 + Gm c;  m = (G(z) finite && G(z) < margin)
 *                        c += eta * m * (s(z) - reg * c);  trust region on c^T Gm c
 *   h' = h0 + W_A^T c     (a row whose c stays exactly 0 is copied bit for bit)
 *
 * Anchor banks: S sets padded to a common size K. anchor_weights > 0 marks a positive
 * anchor (alpha), < 0 a negative one (-beta), 0 padding. gram[s] = W_A W_A^T of set s.
 *
 * fp32's range (issue 20, items 6 and 9; csrc/kernels/fp_range.h): ||h0|| is scaled by a power
 * of two before squaring where its plain sum of squares leaves fp32's range, and the relative
 * step's and the trust region's quadratic forms are of vectors scaled by powers of two, so
 * hidden rows near 1e20 or 1e-25 and steps up to FLT_MAX under a trust region are exact. Where
 * fp32 cannot represent the problem a row is left untouched (copied bit for bit, never inf or
 * NaN): a set with a live gram diagonal that is not 0 or in [2^-80, FLT_MAX] (anchor rows longer
 * than 1.8e19 or nonzero and shorter than 9.1e-13), and a row whose c_T is not finite or whose
 * sum_k |c_k| sqrt(gram[k][k]) (a bound on the edit's partial sums) exceeds FLT_MAX.
 */
#ifndef ANCHOR_KERNELS_STEER_H_
#define ANCHOR_KERNELS_STEER_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Ranges every entry point enforces (fp32 arithmetic; a loop that ends). */
#define AK_MAX_STEPS 10000
#define AK_MIN_TEMPERATURE 1e-4f
#define AK_MAX_TEMPERATURE 1e6f

typedef enum { AK_FLOAT32 = 0, AK_FLOAT16 = 1, AK_BFLOAT16 = 2 } ak_dtype;
typedef enum { AK_OBJECTIVE_MEAN = 0, AK_OBJECTIVE_LSE = 1 } ak_objective;

typedef enum {
  AK_OK = 0,
  AK_ERROR_INVALID_ARGUMENT = 1, /* a shape, stride, size or config value is out of range */
  AK_ERROR_ROW_SET = 2,          /* row_sets[r] is outside [-1, num_sets) (CPU only) */
  AK_ERROR_ANCHOR_ID = 3,        /* an anchor id is outside [0, vocab) (CPU only) */
  AK_ERROR_UNSUPPORTED = 4,      /* set_size, dim or shared memory past what the CUDA kernel
                                    supports on this device */
  AK_ERROR_CUDA = 5,             /* this launch failed: see ak_cuda_last_error() */
  AK_ERROR_NO_KERNEL_IMAGE = 6   /* the library holds no kernel for this GPU architecture */
} ak_status;

typedef struct {
  ak_dtype dtype;              /* of hidden, weight, bias and out */
  int64_t rows;                /* B */
  int64_t dim;                 /* d */
  int64_t vocab;               /* V */
  const void* hidden;          /* [B, d], unit stride along d */
  int64_t hidden_row_stride;   /* in elements */
  const void* weight;          /* [V, d], unit stride along d */
  int64_t weight_row_stride;   /* in elements */
  const void* bias;            /* [V] contiguous, or NULL */
  const int64_t* anchor_ids;   /* [S, K] contiguous */
  const float* anchor_weights; /* [S, K] contiguous: >0 positive, <0 negative, 0 padding */
  const float* gram;           /* [S, K, K] contiguous; a set whose live diagonal entries are
                                  not 0 or in [2^-80, FLT_MAX] leaves its rows untouched */
  const float* direction;      /* [S, d] contiguous, or NULL: u = W_A^T w of each set (objective
                                  MEAN's rank-one form; METHOD.md), computed once with the Gram
                                  (anchor_kernels.prepare_anchors). NULL: the kernels compute it
                                  on every call. Ignored by objective LSE. */
  int64_t num_sets;            /* S */
  int64_t set_size;            /* K (padded) */
  const int64_t* row_sets;     /* [B]: set index per row, -1 = leave the row untouched */
  const float* step_size;      /* [B]: eta per row; a row whose eta is not finite and > 0 is
                                  left untouched (as is one whose ||h0|| is not finite and >= 0
                                  where the trust region or relative_step uses it) */
  int64_t steps;               /* 0 <= T <= AK_MAX_STEPS */
  int32_t relative_step;       /* 1: step_size is the fraction of ||h0|| the first step moves h */
  ak_objective objective;
  float reg;                   /* lambda >= 0 */
  float temperature;           /* tau in [AK_MIN_TEMPERATURE, AK_MAX_TEMPERATURE] (lse only) */
  float margin;                /* +inf: always update */
  float max_norm;              /* rho >= 0; +inf: no trust region */
  void* out;                   /* [B, d], unit stride along d; may not alias hidden */
  int64_t out_row_stride;      /* in elements */
  float* workspace;            /* CUDA device scratch, fp32, or NULL; its plan by precedence:
                                  split_slices > 1: the split-d plan, [split_slices, B, K + 1]
                                  of partial z0 and ||h0||^2 (any objective). Else objective
                                  MEAN without a direction: the rank-one form, [S, d] (u =
                                  W_A^T w per set: one dot, a scalar loop and one axpy per row;
                                  with a direction the rank-one form needs no workspace). */
  int64_t workspace_size;      /* floats at workspace; a launch whose plan needs more fails with
                                  AK_ERROR_INVALID_ARGUMENT (ak_cuda_workspace_size) */
  int64_t split_slices;        /* CUDA, general loop: > 1 gives each row this many blocks, one per
                                  slice of d (two launches; needs the workspace); 0 or 1: one block
                                  per row. ak_cuda_split_slices() picks it by shape. */
} ak_steer_params;

/* The logit-space form (METHOD.md): W h' + b = (W h0 + b) + M c_T with M = W W_A^T, applied to
 * raw logits in place. Rows that are not steered are neither written nor read beyond their
 * anchors' logits. */
typedef struct {
  ak_dtype dtype;              /* of logits */
  int64_t rows;                /* B */
  int64_t vocab;               /* V */
  void* logits;                /* [B, V], unit stride along V, edited in place */
  int64_t logits_row_stride;   /* in elements */
  const void* mixing;          /* [S, K, V] contiguous: M^T of each set, 0 in padding rows */
  ak_dtype mixing_dtype;       /* of mixing: fp32 (0, the default), or fp16/bf16 where the head's
                                  precision allows (half the bytes the apply reads) */
  const int64_t* anchor_ids;   /* [S, K] */
  const float* anchor_weights; /* [S, K] */
  const float* gram;           /* [S, K, K] */
  int64_t num_sets;            /* S */
  int64_t set_size;            /* K */
  const int64_t* row_sets;     /* [B] */
  const float* step_size;      /* [B], as in ak_steer_params */
  const float* hidden_norm;    /* [B] ||h0||, or NULL: then max_norm must be +inf and
                                  relative_step 0 (logits do not carry ||h0||); a row whose
                                  entry is not finite and >= 0 is left untouched where it is used */
  int64_t steps;
  int32_t relative_step;
  ak_objective objective;
  float reg, temperature, margin, max_norm;
} ak_logits_params;

ak_status ak_steer_logits_check_params(const ak_logits_params* p);
/* CPU, two phases (callers parallelise each): coefficients c [B, K] and a moved flag per row for
 * rows [row_begin, row_end) (reads only their anchors' logits; validates row_sets and ids), then
 * logits[r, v] += sum_k mixing[set(r), k, v] c[r, k] for vocabulary entries [v_begin, v_end) of every moved
 * row, each row of M read once for all the rows of its set (fp32 accumulation whatever the dtypes). */
ak_status ak_steer_logits_solve_cpu(const ak_logits_params* p, int64_t row_begin, int64_t row_end,
                                    float* coef, uint8_t* moved);
ak_status ak_steer_logits_apply_cpu(const ak_logits_params* p, const float* coef,
                                    const uint8_t* moved, int64_t v_begin, int64_t v_end);
/* CUDA, two launches on `stream`: a block per row solves c from its anchors' logits into `coef`
 * (device scratch, [B, K] fp32), then (row, vocabulary tile) blocks add M c in place. Rows out
 * of range, unsteered or frozen are not written. Graph-capturable. */
ak_status ak_steer_logits_cuda(const ak_logits_params* p, float* coef, void* stream);

/* Checks everything that does not need to read tensor data. */
ak_status ak_steer_check_params(const ak_steer_params* p);

/* CPU: rows [row_begin, row_end) on the calling thread (callers parallelise over rows).
 * Also validates row_sets and anchor ids of the rows it touches. */
ak_status ak_steer_rows_cpu(const ak_steer_params* p, int64_t row_begin, int64_t row_end);

/* CUDA: all rows, one launch on `stream` (a cudaStream_t; objective MEAN with a workspace and
 * no direction: two, u per set, then the rows). Device pointers. Rows whose
 * set index is out of range are left untouched (no host sync to report it; validate ids
 * and row_sets beforehand). Graph-capturable: no allocation, no synchronisation. */
ak_status ak_steer_hidden_cuda(const ak_steer_params* p, void* stream);

/* The CUDA plan for p's shape (rows, dim, set_size, steps, dtype) on a GPU of sm_count SMs: 1
 * (one block per row) or the number of d-slices (>= AK_SPLIT_MIN_SLICE columns each; the model
 * counts AK_SPLIT_OCCUPANCY blocks per SM per wave) that a performance model of the two plans
 * says is fastest (bench/plan_model.py holds the same model). Modelled, not yet measured on a
 * GPU. */
#define AK_SPLIT_MIN_SLICE 256
#define AK_SPLIT_OCCUPANCY 2
int64_t ak_cuda_split_slices(const ak_steer_params* p, int64_t sm_count);
/* Floats of workspace the plan that `p` selects needs (see ak_steer_params.workspace):
 * split_slices > 1 -> split_slices * rows * (set_size + 1); else objective MEAN without a
 * direction -> num_sets * dim (the rank-one form; with neither a direction nor a workspace the
 * one-block-per-row loop runs instead); else 0. -1 if the size overflows. */
int64_t ak_cuda_workspace_size(const ak_steer_params* p);
/* The current device's SM count (queried once per device), or -1 if CUDA cannot say. */
int64_t ak_cuda_sm_count(void);

/* Largest set_size / dim the CUDA kernels accept, and rows per ak_steer_logits_cuda call
 * (AK_ERROR_UNSUPPORTED past them). */
int64_t ak_cuda_max_set_size(void);
int64_t ak_cuda_max_dim(void);
int64_t ak_cuda_max_logit_rows(void);

/* AK_OK if the CUDA kernels can run on `device` (a kernel image for its architecture is in
 * the library), AK_ERROR_NO_KERNEL_IMAGE if not, AK_ERROR_CUDA if the device is unusable. */
ak_status ak_cuda_check_device(int device);

/* The message of the error behind the last AK_ERROR_CUDA on this host thread. */
const char* ak_cuda_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* ANCHOR_KERNELS_STEER_H_ */
