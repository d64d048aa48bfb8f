// Fused CPU kernels for the scratch cells: the step loops of gru_lm/cells.py, with the
// elementwise work of each step in one vectorised pass between BLAS calls. Tensors and
// state are float32; the GEMMs take fp32 operands, or bf16-rounded ones (train.precision=bf16,
// see Gemm below).
// Same inputs, outputs and saved tensors as the Python loops, which remain the portable
// fallback; tests check the two agree. All tensors are contiguous, row-major.
//
// Threads split the batch, not the GEMMs: the rows of a batch never interact inside the
// recurrence, so each thread runs all steps for its own rows with single-threaded BLAS
// calls (BLAS runs serially inside a parallel region). At batch 32 that beats two threads
// meeting at every small GEMM. The all-step weight gradients run after, on all threads.
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using at::Tensor;

// BLAS as linked into libtorch_cpu (MKL in the x86 CPU wheels): calling it directly skips
// the dispatcher and the tensor views that at::mm needs at every step.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);
// MKL's bf16 x bf16 -> fp32 GEMM (fp32 accumulation). Weak: a torch built without MKL
// (aarch64 wheels) lacks it, and the kernels still load, without this GEMM.
extern "C" void gemm_bf16bf16f32_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const float* alpha,
                                  const uint16_t* a, const int* lda, const uint16_t* b,
                                  const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));

namespace {

// ---------------------------------------------------------------- the GEMMs
// Every product of the recurrences goes through one Gemm, of one kind per call:
//   kFp32       float32 operands, MKL sgemm.
//   kBf16Mkl    operands rounded to bfloat16 (nearest even), fp32 accumulation and output:
//               MKL's gemm_bf16bf16f32, native bf16 arithmetic where the CPU has it.
//   kBf16Sgemm  the same numbers by sgemm on fp32 copies of the rounded operands: a product
//               of two bf16 values is exact in fp32, so only the order of the sums differs.
// The two bf16 kinds give the same model; which is faster depends on the CPU, so the caller
// picks one by timing both (gru_lm/cells.py); hidden states and weights stay fp32 throughout.
enum Kind : int64_t { kFp32 = 0, kBf16Mkl = 1, kBf16Sgemm = 2 };

bool has_kind(int64_t kind) {
  return kind == kFp32 || kind == kBf16Sgemm || (kind == kBf16Mkl && gemm_bf16bf16f32_);
}

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline uint16_t to_bf16(float x) {  // round to nearest even (inputs are finite here)
  const uint32_t u = bits_of(x);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_value(float x) {
  const uint32_t u = static_cast<uint32_t>(to_bf16(x)) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One operand as the GEMM reads it, row-major with row stride ld: the fp32 matrix itself,
// or a rounded copy (fp32 values or bf16 bits) held by a Buf.
struct Mat {
  const float* f = nullptr;
  const uint16_t* h = nullptr;
  int64_t ld = 0;
};
struct Buf {  // reused step after step: resize() allocates only the first time
  std::vector<float> f;
  std::vector<uint16_t> h;
};

// A contiguous copy of the rows x cols matrix at p (row stride ld), each entry round()ed.
template <typename T, typename Round>
const T* rounded(const float* p, int64_t rows, int64_t cols, int64_t ld, std::vector<T>& out,
                 Round round) {
  out.resize(rows * cols);
  T* o = out.data();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) o[r * cols + j] = round(p[r * ld + j]);
  });
  return o;
}

class Gemm {
 public:
  explicit Gemm(int64_t kind) : kind_(kind) {
    TORCH_CHECK(has_kind(kind), "fused kernels: GEMM kind ", kind, " is not available here");
  }

  // The rows x cols matrix at p (row stride ld) as this GEMM's operand.
  Mat operand(const float* p, int64_t rows, int64_t cols, int64_t ld, Buf& buf) const {
    if (kind_ == kFp32) return {p, nullptr, ld};
    if (kind_ == kBf16Sgemm)
      return {rounded(p, rows, cols, ld, buf.f, [](float x) { return bf16_value(x); }),
              nullptr, cols};
    return {nullptr, rounded(p, rows, cols, ld, buf.h, [](float x) { return to_bf16(x); }),
            cols};
  }

  // Row-major C[M x N] = op(A)[M x K] . B[K x N] + beta C (ldc: C's row stride).
  // BLAS is column-major, where a row-major matrix reads as its transpose: C^T = B^T op(A)^T.
  void operator()(bool transA, int64_t M, int64_t N, int64_t K, const Mat& A, const Mat& B,
                  float beta, float* C, int64_t ldc) const {
    const char ta = 'N', tb = transA ? 'T' : 'N';
    const int m = N, n = M, k = K, la = B.ld, lb = A.ld, lc = ldc;
    const float one = 1.0f;
    if (kind_ == kBf16Mkl)
      gemm_bf16bf16f32_(&ta, &tb, &m, &n, &k, &one, B.h, &la, A.h, &lb, &beta, C, &lc);
    else
      sgemm_(&ta, &tb, &m, &n, &k, &one, B.f, &la, A.f, &lb, &beta, C, &lc);
  }

 private:
  int64_t kind_;
};

inline float sigm(float x) { return 1.0f / (1.0f + std::exp(-x)); }

inline const float* cptr(const Tensor& t) { return t.data_ptr<float>(); }
inline float* ptr(Tensor& t) { return t.data_ptr<float>(); }

// Where the input projection of row r = t * B + b comes from: a dense P (T, B, width), or,
// for a first layer fed token ids, the row ids[r] of a (vocab_size, width) table = W_x + b,
// so the (T, B, width) lookup is never materialised.
struct Rows {
  const float* base;
  const int64_t* ids;
  int64_t width;
  const float* operator()(int64_t r) const { return base + (ids ? ids[r] : r) * width; }
};

// The gradient of a table input: per-thread accumulators (no races), summed at the end.
struct TableGrad {
  Tensor acc;
  const int64_t* ids = nullptr;
  int64_t width = 0, rows = 0;
  TableGrad(const c10::optional<Tensor>& ids_t, int64_t table_rows, int64_t w,
            const at::TensorOptions& opts) {
    if (!ids_t.has_value()) return;
    ids = ids_t->data_ptr<int64_t>();
    width = w;
    rows = table_rows;
    acc = at::zeros({at::get_num_threads(), table_rows, w}, opts);
  }
  // Add the dP rows [r0, r0 + nb) (row stride width) into this thread's table.
  void add(int64_t r0, int64_t nb, const float* dp) {
    if (!ids) return;
    float* mine = acc.data_ptr<float>() + at::get_thread_num() * rows * width;
    for (int64_t b = 0; b < nb; ++b) {
      float* dst = mine + ids[r0 + b] * width;
      const float* src = dp + b * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) dst[j] += src[j];
    }
  }
  Tensor result() const { return acc.sum(0); }
};

Rows rows_of(const Tensor& P, const c10::optional<Tensor>& ids, int64_t width) {
  return {P.data_ptr<float>(), ids.has_value() ? ids->data_ptr<int64_t>() : nullptr, width};
}

// A contiguous transpose by 32 x 32 tiles (Tensor::contiguous on a transposed view walks
// one side with a large stride and is several times slower at these sizes).
Tensor transposed(const Tensor& W) {
  const Tensor Wc = W.contiguous();
  const int64_t R = Wc.size(0), C = Wc.size(1);
  Tensor out = at::empty({C, R}, Wc.options());
  const float* src = Wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  constexpr int64_t tile = 32;
  for (int64_t i0 = 0; i0 < R; i0 += tile)
    for (int64_t j0 = 0; j0 < C; j0 += tile)
      for (int64_t i = i0; i < std::min(R, i0 + tile); ++i)
        for (int64_t j = j0; j < std::min(C, j0 + tile); ++j) dst[j * R + i] = src[i * C + j];
  return out;
}

// Run body(b0, b1) on row ranges that split the batch evenly over the threads.
template <typename F>
void over_rows(int64_t B, const F& body) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, B, (B + threads - 1) / threads, body);
}

// Weight gradient sum_t Hprev_t^T dA_t with Hprev = [H0; Y_0 .. Y_{T-2}], as two GEMMs so
// the shifted copy of Y is never built. dA has row stride ld_da, width n.
Tensor weight_grad(const Gemm& gemm, const float* h0, const float* y, const float* da,
                   int64_t T, int64_t B, int64_t nh, int64_t n, int64_t ld_da,
                   const at::TensorOptions& opts) {
  Tensor dW = at::empty({nh, n}, opts);
  Buf a, b;
  gemm(true, nh, n, B, gemm.operand(h0, B, nh, nh, a), gemm.operand(da, B, n, ld_da, b), 0.0f,
       ptr(dW), n);
  if (T > 1) {
    const int64_t rows = (T - 1) * B;
    gemm(true, nh, n, rows, gemm.operand(y, rows, nh, nh, a),
         gemm.operand(da + B * ld_da, rows, n, ld_da, b), 1.0f, ptr(dW), n);
  }
  return dW;
}

// The carry buffers swap roles every step; after T steps this one holds the result.
Tensor final_carry(Tensor& carry, Tensor& next, int64_t T) { return T % 2 ? next : carry; }

// ---------------------------------------------------------------- entry-point checks
// The loops read raw pointers, so a wrong shape or a token id outside the table would read
// or write out of bounds: every entry point checks first and raises a RuntimeError instead.

void check_matrix(const Tensor& W, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(W.scalar_type() == at::kFloat && W.device().is_cpu() && W.dim() == 2 &&
                  W.size(0) == rows && W.size(1) == cols && W.is_contiguous(),
              "fused kernels: ", name, " must be a contiguous float32 CPU (", rows, ", ", cols,
              ") matrix, got ", W.scalar_type(), " ", W.sizes());
}

void check_ids(const c10::optional<Tensor>& ids, int64_t table_rows, int64_t T, int64_t B) {
  if (!ids) return;
  TORCH_CHECK(ids->scalar_type() == at::kLong && ids->dim() == 2 && ids->size(0) == T &&
                  ids->size(1) == B && ids->is_contiguous(),
              "fused kernels: ids must be contiguous int64 (", T, ", ", B, "), got ",
              ids->scalar_type(), " ", ids->sizes());
  if (ids->numel() == 0) return;
  const int64_t lo = ids->min().item<int64_t>(), hi = ids->max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < table_rows, "fused kernels: token id ", lo < 0 ? lo : hi,
              " is outside the input table of ", table_rows, " rows");
}

// P is (T, B, width), or with ids the (table_rows, width) table; H0 (B, nh). Returns T.
int64_t check_input(const Tensor& P, const c10::optional<Tensor>& ids, const Tensor& H0,
                    int64_t num_gates) {
  TORCH_CHECK(H0.scalar_type() == at::kFloat && H0.dim() == 2,
              "fused kernels: H0 must be a float32 (batch_size, num_hiddens) matrix, got ",
              H0.sizes());
  const int64_t B = H0.size(0), width = num_gates * H0.size(1);
  TORCH_CHECK(P.scalar_type() == at::kFloat && P.device().is_cpu() && P.is_contiguous(),
              "fused kernels: P must be a contiguous float32 CPU tensor");
  if (ids) {
    TORCH_CHECK(P.dim() == 2 && P.size(1) == width, "fused kernels: the input table must be (",
                "vocab_size, ", width, "), got ", P.sizes());
    TORCH_CHECK(ids->dim() == 2, "fused kernels: ids must be (num_steps, batch_size)");
    check_ids(ids, P.size(0), ids->size(0), B);
    return ids->size(0);
  }
  TORCH_CHECK(P.dim() == 3 && P.size(1) == B && P.size(2) == width, "fused kernels: P must be ",
              "(num_steps, ", B, ", ", width, "), got ", P.sizes());
  return P.size(0);
}

// Backward: dY and the saved states agree with Y; ids still index the table.
void check_backward(const Tensor& dY, const Tensor& Y, const c10::optional<Tensor>& ids,
                    int64_t table_rows) {
  TORCH_CHECK(Y.scalar_type() == at::kFloat && Y.dim() == 3 && Y.is_contiguous(),
              "fused kernels: Y must be a contiguous float32 (T, B, num_hiddens) tensor");
  TORCH_CHECK(dY.scalar_type() == at::kFloat && dY.sizes() == Y.sizes(),
              "fused kernels: dY must have Y's shape ", Y.sizes(), ", got ", dY.sizes());
  check_ids(ids, table_rows, Y.size(0), Y.size(1));
}

void check_saved(const Tensor& X, const Tensor& Y, int64_t width, const char* name) {
  TORCH_CHECK(X.scalar_type() == at::kFloat && X.is_contiguous() && X.dim() == 3 &&
                  X.size(0) == Y.size(0) && X.size(1) == Y.size(1) && X.size(2) == width,
              "fused kernels: saved tensor ", name, " does not match Y");
}

// ---------------------------------------------------------------- GRU, the book's formula
// Z = s(P_z + H W_hz), R = s(P_r + H W_hr), H_tilde = tanh(P_h + (R*H) W_hh),
// H' = H_tilde + Z (H - H_tilde)
std::vector<Tensor> gru_forward(Tensor P, c10::optional<Tensor> ids, Tensor H0, Tensor W_hzr,
                                Tensor W_hh, int64_t kind) {
  const Gemm gemm(kind);
  check_input(P, ids, H0, 3);
  check_matrix(W_hzr, H0.size(1), 2 * H0.size(1), "W_hzr");
  check_matrix(W_hh, H0.size(1), H0.size(1), "W_hh");
  const int64_t nh = H0.size(1);
  const int64_t T = ids ? ids->size(0) : P.size(0), B = H0.size(0);
  const Rows prow = rows_of(P, ids, 3 * nh);
  auto opts = P.options();
  Tensor Y = at::empty({T, B, nh}, opts), ZR = at::empty({T, B, 2 * nh}, opts);
  Tensor H_tilde = at::empty({T, B, nh}, opts), S = at::empty({T, B, nh}, opts);
  Tensor H0c = H0.contiguous();
  Buf wzr_buf, whh_buf;
  const Mat wzr = gemm.operand(cptr(W_hzr), nh, 2 * nh, 2 * nh, wzr_buf);
  const Mat whh = gemm.operand(cptr(W_hh), nh, nh, nh, whh_buf);
  const float* h0 = cptr(H0c);
  float *y = ptr(Y), *zr = ptr(ZR), *h_tilde = ptr(H_tilde), *s = ptr(S);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    Buf a;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r0 = t * B + b0;  // first row of this thread at step t
      const float* h = t ? y + (r0 - B) * nh : h0 + b0 * nh;
      float *zr_t = zr + r0 * 2 * nh, *s_t = s + r0 * nh, *h_tilde_t = h_tilde + r0 * nh;
      float* y_t = y + r0 * nh;
      gemm(false, nb, 2 * nh, nh, gemm.operand(h, nb, nh, nh, a), wzr, 0.0f, zr_t, 2 * nh);
      for (int64_t b = 0; b < nb; ++b) {
        float* zrb = zr_t + b * 2 * nh;
        const float* pb = prow(r0 + b);
#pragma omp simd
        for (int64_t j = 0; j < 2 * nh; ++j) zrb[j] = sigm(zrb[j] + pb[j]);
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) s_t[b * nh + j] = zrb[nh + j] * h[b * nh + j];
      }
      gemm(false, nb, nh, nh, gemm.operand(s_t, nb, nh, nh, a), whh, 0.0f, h_tilde_t, nh);
      for (int64_t b = 0; b < nb; ++b) {
        const float* pb = prow(r0 + b) + 2 * nh;
        const float* zb = zr_t + b * 2 * nh;
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) {
          const int64_t i = b * nh + j;
          const float c = std::tanh(h_tilde_t[i] + pb[j]);
          h_tilde_t[i] = c;
          y_t[i] = c + zb[j] * (h[i] - c);
        }
      }
    }
  });
  return {Y, ZR, H_tilde, S};
}

std::vector<Tensor> gru_backward(Tensor dY, c10::optional<Tensor> ids, int64_t table_rows,
                                 Tensor H0, Tensor W_hzr, Tensor W_hh, Tensor Y, Tensor ZR,
                                 Tensor H_tilde, Tensor S, int64_t kind) {
  const Gemm gemm(kind);
  check_backward(dY, Y, ids, table_rows);
  check_matrix(W_hzr, Y.size(2), 2 * Y.size(2), "W_hzr");
  check_matrix(W_hh, Y.size(2), Y.size(2), "W_hh");
  check_saved(ZR, Y, 2 * Y.size(2), "ZR");
  check_saved(H_tilde, Y, Y.size(2), "H_tilde");
  check_saved(S, Y, Y.size(2), "S");
  const int64_t T = Y.size(0), B = Y.size(1), nh = Y.size(2);
  auto opts = Y.options();
  TableGrad dtable(ids, table_rows, 3 * nh, opts);
  dY = dY.contiguous();
  Tensor H0c = H0.contiguous();
  Tensor dA = at::empty({T, B, 3 * nh}, opts);  // = dP: [z | r | h]
  Tensor dS = at::empty({B, nh}, opts);
  Tensor carry = at::zeros({B, nh}, opts), next = at::empty({B, nh}, opts);
  // Transposed once here: BLAS is faster on a plain B than on a transposed one at these sizes.
  Tensor W_hzr_T = transposed(W_hzr), W_hh_T = transposed(W_hh);
  const float *y = cptr(Y), *zr = cptr(ZR), *h_tilde = cptr(H_tilde), *dy = cptr(dY);
  const float* h0 = cptr(H0c);
  Buf wzr_buf, whh_buf;
  const Mat wzr_t = gemm.operand(cptr(W_hzr_T), 2 * nh, nh, nh, wzr_buf);
  const Mat whh_t = gemm.operand(cptr(W_hh_T), nh, nh, nh, whh_buf);
  float *da = ptr(dA), *ds_all = ptr(dS), *carry_p = ptr(carry), *next_p = ptr(next);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    float *c = carry_p + b0 * nh, *nx = next_p + b0 * nh, *ds = ds_all + b0 * nh;
    Buf a;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t r0 = t * B + b0;
      const float* hp = t ? y + (r0 - B) * nh : h0 + b0 * nh;
      const float *zr_t = zr + r0 * 2 * nh, *h_tilde_t = h_tilde + r0 * nh;
      const float* dy_t = dy + r0 * nh;
      float* da_t = da + r0 * 3 * nh;
      for (int64_t b = 0; b < nb; ++b) {
        const float* zb = zr_t + b * 2 * nh;
        float* dab = da_t + b * 3 * nh;
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) {
          const int64_t i = b * nh + j;
          const float z = zb[j], cand = h_tilde_t[i];
          const float dh = dy_t[i] + c[i];
          dab[2 * nh + j] = dh * (1.0f - z) * (1.0f - cand * cand);
          dab[j] = dh * (hp[i] - cand) * z * (1.0f - z);
          nx[i] = dh * z;  // the direct path H' = ... + Z H
        }
      }
      // dS = dAh W_hh^T
      gemm(false, nb, nh, nh, gemm.operand(da_t + 2 * nh, nb, nh, 3 * nh, a), whh_t, 0.0f, ds, nh);
      for (int64_t b = 0; b < nb; ++b) {
        const float* rb = zr_t + b * 2 * nh + nh;
        float* dab = da_t + b * 3 * nh;
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) {
          const int64_t i = b * nh + j;
          const float r = rb[j];
          dab[nh + j] = ds[i] * hp[i] * r * (1.0f - r);
          nx[i] += ds[i] * r;
        }
      }
      // carry += dAzr W_hzr^T
      gemm(false, nb, nh, 2 * nh, gemm.operand(da_t, nb, 2 * nh, 3 * nh, a), wzr_t, 1.0f, nx, nh);
      dtable.add(r0, nb, da_t);  // dP = dA
      std::swap(c, nx);
    }
  });
  Tensor dH0 = final_carry(carry, next, T);
  Tensor dW_hzr = weight_grad(gemm, h0, y, da, T, B, nh, 2 * nh, 3 * nh, opts);
  Tensor dW_hh = at::empty({nh, nh}, opts);
  Buf s_buf, dah_buf;
  gemm(true, nh, nh, T * B, gemm.operand(cptr(S), T * B, nh, nh, s_buf),
       gemm.operand(da + 2 * nh, T * B, nh, 3 * nh, dah_buf), 0.0f, ptr(dW_hh), nh);
  return {ids ? dtable.result() : dA, dH0, dW_hzr, dW_hh};
}

// ---------------------------------------------------------------- GRU, torch.nn's formula
// A = H W_h; Z, R = s(P + A); M = A_h + b_hh; N = tanh(P_h + R M); H' = N + Z (H - N)
std::vector<Tensor> gru_ra_forward(Tensor P, c10::optional<Tensor> ids, Tensor H0, Tensor W_h,
                                   Tensor b_hh, int64_t kind) {
  const Gemm gemm(kind);
  check_input(P, ids, H0, 3);
  check_matrix(W_h, H0.size(1), 3 * H0.size(1), "W_h");
  TORCH_CHECK(b_hh.numel() == H0.size(1), "fused kernels: b_hh must have num_hiddens entries");
  const int64_t nh = H0.size(1);
  const int64_t T = ids ? ids->size(0) : P.size(0), B = H0.size(0);
  const Rows prow = rows_of(P, ids, 3 * nh);
  auto opts = P.options();
  Tensor Y = at::empty({T, B, nh}, opts), ZR = at::empty({T, B, 2 * nh}, opts);
  Tensor N = at::empty({T, B, nh}, opts), M = at::empty({T, B, nh}, opts);
  Tensor A = at::empty({B, 3 * nh}, opts);
  Tensor H0c = H0.contiguous(), bhc = b_hh.contiguous();
  Buf wh_buf;
  const Mat wh = gemm.operand(cptr(W_h), nh, 3 * nh, 3 * nh, wh_buf);
  const float *bh = cptr(bhc), *h0 = cptr(H0c);
  float *y = ptr(Y), *zr = ptr(ZR), *n = ptr(N), *m = ptr(M), *a_all = ptr(A);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    float* a = a_all + b0 * 3 * nh;
    Buf h_buf;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r0 = t * B + b0;
      const float* h = t ? y + (r0 - B) * nh : h0 + b0 * nh;
      gemm(false, nb, 3 * nh, nh, gemm.operand(h, nb, nh, nh, h_buf), wh, 0.0f, a, 3 * nh);
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t r = r0 + b;
        const float* pb = prow(r);
        const float* ab = a + b * 3 * nh;
        float* zrb = zr + r * 2 * nh;
#pragma omp simd
        for (int64_t j = 0; j < 2 * nh; ++j) zrb[j] = sigm(pb[j] + ab[j]);
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) {
          const float mm = ab[2 * nh + j] + bh[j];
          m[r * nh + j] = mm;
          const float nn = std::tanh(pb[2 * nh + j] + zrb[nh + j] * mm);
          n[r * nh + j] = nn;
          y[r * nh + j] = nn + zrb[j] * (h[b * nh + j] - nn);
        }
      }
    }
  });
  return {Y, ZR, N, M};
}

std::vector<Tensor> gru_ra_backward(Tensor dY, c10::optional<Tensor> ids, int64_t table_rows,
                                    Tensor H0, Tensor W_h, Tensor Y, Tensor ZR, Tensor N,
                                    Tensor M, int64_t kind) {
  const Gemm gemm(kind);
  check_backward(dY, Y, ids, table_rows);
  check_matrix(W_h, Y.size(2), 3 * Y.size(2), "W_h");
  check_saved(ZR, Y, 2 * Y.size(2), "ZR");
  check_saved(N, Y, Y.size(2), "N");
  check_saved(M, Y, Y.size(2), "M");
  const int64_t T = Y.size(0), B = Y.size(1), nh = Y.size(2);
  auto opts = Y.options();
  TableGrad dtable(ids, table_rows, 3 * nh, opts);
  dY = dY.contiguous();
  Tensor H0c = H0.contiguous();
  Tensor dA = at::empty({T, B, 3 * nh}, opts);  // d(H W_h): [z | r | m]
  Tensor dP = at::empty({T, B, 3 * nh}, opts);
  Tensor carry = at::zeros({B, nh}, opts), next = at::empty({B, nh}, opts);
  Tensor W_h_T = transposed(W_h);
  const float *y = cptr(Y), *zr = cptr(ZR), *n = cptr(N), *m = cptr(M), *dy = cptr(dY);
  const float* h0 = cptr(H0c);
  Buf wh_buf;
  const Mat wh_t = gemm.operand(cptr(W_h_T), 3 * nh, nh, nh, wh_buf);
  float *da = ptr(dA), *dp = ptr(dP), *carry_p = ptr(carry), *next_p = ptr(next);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    float *c = carry_p + b0 * nh, *nx = next_p + b0 * nh;
    Buf a;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t r0 = t * B + b0;
      const float* hp = t ? y + (r0 - B) * nh : h0 + b0 * nh;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t r = r0 + b;
        const float* zb = zr + r * 2 * nh;
        float* dab = da + r * 3 * nh;
        float* dpb = dp + r * 3 * nh;
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) {
          const int64_t i = b * nh + j;
          const float z = zb[j], rr = zb[nh + j], nn = n[r * nh + j];
          const float dh = dy[r * nh + j] + c[i];
          const float dan = dh * (1.0f - z) * (1.0f - nn * nn);
          const float daz = dh * (hp[i] - nn) * z * (1.0f - z);
          const float dar = dan * m[r * nh + j] * rr * (1.0f - rr);
          dab[j] = daz;
          dab[nh + j] = dar;
          dab[2 * nh + j] = dan * rr;
          dpb[j] = daz;
          dpb[nh + j] = dar;
          dpb[2 * nh + j] = dan;
          nx[i] = dh * z;
        }
      }
      gemm(false, nb, nh, 3 * nh, gemm.operand(da + r0 * 3 * nh, nb, 3 * nh, 3 * nh, a), wh_t,
           1.0f, nx, nh);
      dtable.add(r0, nb, dp + r0 * 3 * nh);
      std::swap(c, nx);
    }
  });
  Tensor dH0 = final_carry(carry, next, T);
  Tensor dW_h = weight_grad(gemm, h0, y, da, T, B, nh, 3 * nh, 3 * nh, opts);
  Tensor db_hh = dA.view({T * B, 3 * nh}).narrow(1, 2 * nh, nh).sum(0);
  return {ids ? dtable.result() : dP, dH0, dW_h, db_hh};
}

// ---------------------------------------------------------------- LSTM [i | f | g | o]
std::vector<Tensor> lstm_forward(Tensor P, c10::optional<Tensor> ids, Tensor H0, Tensor C0,
                                 Tensor W_h, int64_t kind) {
  const Gemm gemm(kind);
  check_input(P, ids, H0, 4);
  TORCH_CHECK(C0.sizes() == H0.sizes(), "fused kernels: C0 must have H0's shape");
  check_matrix(W_h, H0.size(1), 4 * H0.size(1), "W_h");
  const int64_t nh = H0.size(1);
  const int64_t T = ids ? ids->size(0) : P.size(0), B = H0.size(0);
  const Rows prow = rows_of(P, ids, 4 * nh);
  auto opts = P.options();
  Tensor Y = at::empty({T, B, nh}, opts), IFGO = at::empty({T, B, 4 * nh}, opts);
  Tensor Cs = at::empty({T, B, nh}, opts), Tc = at::empty({T, B, nh}, opts);
  Tensor H0c = H0.contiguous(), C0c = C0.contiguous();
  Buf wh_buf;
  const Mat wh = gemm.operand(cptr(W_h), nh, 4 * nh, 4 * nh, wh_buf);
  const float *h0 = cptr(H0c), *c0 = cptr(C0c);
  float *y = ptr(Y), *ifgo = ptr(IFGO), *cs = ptr(Cs), *tc = ptr(Tc);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    Buf h_buf;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r0 = t * B + b0;
      const float* h = t ? y + (r0 - B) * nh : h0 + b0 * nh;
      const float* cp = t ? cs + (r0 - B) * nh : c0 + b0 * nh;
      float* ifgo_t = ifgo + r0 * 4 * nh;
      gemm(false, nb, 4 * nh, nh, gemm.operand(h, nb, nh, nh, h_buf), wh, 0.0f, ifgo_t, 4 * nh);
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t r = r0 + b;
        float* gb = ifgo_t + b * 4 * nh;
        const float* pb = prow(r);
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) {
          const float ig = sigm(gb[j] + pb[j]), fg = sigm(gb[nh + j] + pb[nh + j]);
          const float cg = std::tanh(gb[2 * nh + j] + pb[2 * nh + j]);
          const float og = sigm(gb[3 * nh + j] + pb[3 * nh + j]);
          gb[j] = ig;
          gb[nh + j] = fg;
          gb[2 * nh + j] = cg;
          gb[3 * nh + j] = og;
          const float cn = fg * cp[b * nh + j] + ig * cg;
          cs[r * nh + j] = cn;
          const float th = std::tanh(cn);
          tc[r * nh + j] = th;
          y[r * nh + j] = og * th;
        }
      }
    }
  });
  return {Y, IFGO, Cs, Tc};
}

std::vector<Tensor> lstm_backward(Tensor dY, Tensor dC_T, c10::optional<Tensor> ids,
                                  int64_t table_rows, Tensor H0, Tensor C0, Tensor W_h, Tensor Y,
                                  Tensor IFGO, Tensor Cs, Tensor Tc, int64_t kind) {
  const Gemm gemm(kind);
  check_backward(dY, Y, ids, table_rows);
  check_matrix(W_h, Y.size(2), 4 * Y.size(2), "W_h");
  check_saved(IFGO, Y, 4 * Y.size(2), "IFGO");
  check_saved(Cs, Y, Y.size(2), "Cs");
  check_saved(Tc, Y, Y.size(2), "Tc");
  TORCH_CHECK(!dC_T.defined() || dC_T.numel() == Y.size(1) * Y.size(2),
              "fused kernels: dC_T must be (batch_size, num_hiddens)");
  const int64_t T = Y.size(0), B = Y.size(1), nh = Y.size(2);
  auto opts = Y.options();
  TableGrad dtable(ids, table_rows, 4 * nh, opts);
  dY = dY.contiguous();
  Tensor H0c = H0.contiguous(), C0c = C0.contiguous();
  Tensor dA = at::empty({T, B, 4 * nh}, opts);
  Tensor carry_h = at::zeros({B, nh}, opts);
  Tensor carry_c = dC_T.defined() ? dC_T.contiguous().clone() : at::zeros({B, nh}, opts);
  Tensor W_h_T = transposed(W_h);
  const float *ifgo = cptr(IFGO), *cs = cptr(Cs), *tc = cptr(Tc), *dy = cptr(dY);
  Buf wh_buf;
  const Mat wh_t = gemm.operand(cptr(W_h_T), 4 * nh, nh, nh, wh_buf);
  const float *h0 = cptr(H0c), *c0 = cptr(C0c), *y = cptr(Y);
  float *da = ptr(dA), *ch_all = ptr(carry_h), *cc_all = ptr(carry_c);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    float *ch = ch_all + b0 * nh, *cc = cc_all + b0 * nh;
    Buf a;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t r0 = t * B + b0;
      const float* cp = t ? cs + (r0 - B) * nh : c0 + b0 * nh;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t r = r0 + b;
        const float* gb = ifgo + r * 4 * nh;
        float* dab = da + r * 4 * nh;
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) {
          const int64_t i = b * nh + j;
          const float ig = gb[j], fg = gb[nh + j], cg = gb[2 * nh + j], og = gb[3 * nh + j];
          const float dh = dy[r * nh + j] + ch[i];
          const float th = tc[r * nh + j];
          const float dc = cc[i] + dh * og * (1.0f - th * th);
          dab[j] = dc * cg * ig * (1.0f - ig);
          dab[nh + j] = dc * cp[i] * fg * (1.0f - fg);
          dab[2 * nh + j] = dc * ig * (1.0f - cg * cg);
          dab[3 * nh + j] = dh * th * og * (1.0f - og);
          cc[i] = dc * fg;
        }
      }
      gemm(false, nb, nh, 4 * nh, gemm.operand(da + r0 * 4 * nh, nb, 4 * nh, 4 * nh, a), wh_t,
           0.0f, ch, nh);
      dtable.add(r0, nb, da + r0 * 4 * nh);
    }
  });
  Tensor dW_h = weight_grad(gemm, h0, y, da, T, B, nh, 4 * nh, 4 * nh, opts);
  return {ids ? dtable.result() : dA, carry_h, carry_c, dW_h};
}

// ---------------------------------------------------------------- RNN
std::vector<Tensor> rnn_forward(Tensor P, c10::optional<Tensor> ids, Tensor H0, Tensor W_hh,
                                int64_t kind) {
  const Gemm gemm(kind);
  check_input(P, ids, H0, 1);
  check_matrix(W_hh, H0.size(1), H0.size(1), "W_hh");
  const int64_t nh = H0.size(1);
  const int64_t T = ids ? ids->size(0) : P.size(0), B = H0.size(0);
  const Rows prow = rows_of(P, ids, nh);
  Tensor Y = at::empty({T, B, nh}, P.options());
  Tensor H0c = H0.contiguous();
  Buf w_buf;
  const Mat w = gemm.operand(cptr(W_hh), nh, nh, nh, w_buf);
  const float* h0 = cptr(H0c);
  float* y = ptr(Y);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    Buf h_buf;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r0 = t * B + b0;
      const float* h = t ? y + (r0 - B) * nh : h0 + b0 * nh;
      float* y_t = y + r0 * nh;
      gemm(false, nb, nh, nh, gemm.operand(h, nb, nh, nh, h_buf), w, 0.0f, y_t, nh);
      for (int64_t b = 0; b < nb; ++b) {
        const float* pb = prow(r0 + b);
        float* yb = y_t + b * nh;
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) yb[j] = std::tanh(yb[j] + pb[j]);
      }
    }
  });
  return {Y};
}

std::vector<Tensor> rnn_backward(Tensor dY, c10::optional<Tensor> ids, int64_t table_rows,
                                 Tensor H0, Tensor W_hh, Tensor Y, int64_t kind) {
  const Gemm gemm(kind);
  check_backward(dY, Y, ids, table_rows);
  check_matrix(W_hh, Y.size(2), Y.size(2), "W_hh");
  const int64_t T = Y.size(0), B = Y.size(1), nh = Y.size(2);
  auto opts = Y.options();
  TableGrad dtable(ids, table_rows, nh, opts);
  dY = dY.contiguous();
  Tensor H0c = H0.contiguous();
  Tensor dA = at::empty({T, B, nh}, opts);
  Tensor carry = at::zeros({B, nh}, opts);
  Tensor W_T = transposed(W_hh);
  const float *y = cptr(Y), *dy = cptr(dY);
  Buf w_buf;
  const Mat w_t = gemm.operand(cptr(W_T), nh, nh, nh, w_buf);
  float *da = ptr(dA), *c_all = ptr(carry);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    float* c = c_all + b0 * nh;
    Buf a;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t o = (t * B + b0) * nh;
#pragma omp simd
      for (int64_t i = 0; i < nb * nh; ++i)
        da[o + i] = (dy[o + i] + c[i]) * (1.0f - y[o + i] * y[o + i]);
      gemm(false, nb, nh, nh, gemm.operand(da + o, nb, nh, nh, a), w_t, 0.0f, c, nh);
      dtable.add(t * B + b0, nb, da + o);
    }
  });
  Tensor dW = weight_grad(gemm, cptr(H0c), y, da, T, B, nh, nh, nh, opts);
  return {ids ? dtable.result() : dA, carry, dW};
}

// ---------------------------------------------------------------- Mogrifier LSTM
// Before each LSTM step, rounds k = 0 .. R-1 rescale the input and the state in turn:
//   k even: x <- 2 s(h F_k + b_k) * x         k odd: h <- 2 s(x F_k + b_k) * h
// F_k one matrix, or two factors of rank r applied in turn; then the LSTM's step on the last
// x and h: gates = x W_x + h W_h + b, [i | f | g | o]. The input product cannot be done for
// all steps at once (x depends on the previous output), so both products run in the loop.
// Saved for backward: every version of x (XV[0] the input) and of h (HV[0] the previous
// output), each round's mask 2 s(.) and, for a factored round, the product with its first
// factor. Backward returns the per-step gradients (gate pre-activations dA, each round's
// dS = d(pre-sigmoid) and, factored, dS F2^T); the weight gradients are sums over all steps,
// done by the caller as one GEMM each (gru_lm/mogrifier.py).
struct Round {
  int64_t src = 0, dst = 0, rank = 0;  // rank 0: one (src, dst) matrix
  const float* f1 = nullptr;           // (src, rank) or (src, dst)
  const float* f2 = nullptr;           // (rank, dst)
  const float* bias = nullptr;         // (dst)
};

std::vector<Round> rounds_of(const std::vector<Tensor>& mats, const std::vector<int64_t>& counts,
                             const std::vector<Tensor>& biases, int64_t E, int64_t nh) {
  TORCH_CHECK(counts.size() == biases.size(), "fused kernels: one bias per mogrifier round");
  std::vector<Round> out;
  size_t m = 0;
  for (size_t k = 0; k < counts.size(); ++k) {
    Round r;
    r.src = k % 2 ? E : nh;
    r.dst = k % 2 ? nh : E;
    TORCH_CHECK((counts[k] == 1 || counts[k] == 2) && m + counts[k] <= mats.size(),
                "fused kernels: a mogrifier round takes one matrix or two factors");
    if (counts[k] == 1) {
      check_matrix(mats[m], r.src, r.dst, "a round's matrix");
      r.f1 = cptr(mats[m]);
    } else {
      r.rank = mats[m].dim() == 2 ? mats[m].size(1) : 0;
      TORCH_CHECK(r.rank > 0, "fused kernels: a round's factors need a rank above 0");
      check_matrix(mats[m], r.src, r.rank, "a round's first factor");
      check_matrix(mats[m + 1], r.rank, r.dst, "a round's second factor");
      r.f1 = cptr(mats[m]);
      r.f2 = cptr(mats[m + 1]);
    }
    const Tensor& b = biases[k];
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.dim() == 1 &&
                    b.size(0) == r.dst,
                "fused kernels: a round's bias must be a contiguous float32 (", r.dst, ")");
    r.bias = cptr(b);
    out.push_back(r);
    m += counts[k];
  }
  TORCH_CHECK(m == mats.size(), "fused kernels: more round matrices than the counts say");
  return out;
}

inline Mat dense(const float* p, int64_t ld) { return {p, nullptr, ld}; }

std::vector<Tensor> mogrifier_forward(Tensor X, Tensor H0, Tensor C0, Tensor W_x, Tensor W_h,
                                      Tensor b, std::vector<Tensor> mats,
                                      std::vector<int64_t> counts, std::vector<Tensor> biases) {
  const Gemm gemm(kFp32);
  TORCH_CHECK(X.scalar_type() == at::kFloat && X.device().is_cpu() && X.is_contiguous() &&
                  X.dim() == 3,
              "fused kernels: X must be a contiguous float32 (T, B, num_inputs) CPU tensor");
  const int64_t T = X.size(0), B = X.size(1), E = X.size(2), nh = H0.size(1);
  TORCH_CHECK(H0.scalar_type() == at::kFloat && H0.device().is_cpu() && H0.dim() == 2 &&
                  H0.size(0) == B && H0.is_contiguous() && C0.scalar_type() == at::kFloat &&
                  C0.device().is_cpu() && C0.sizes() == H0.sizes() && C0.is_contiguous(),
              "fused kernels: H0 and C0 must be contiguous float32 CPU (", B, ", num_hiddens)");
  check_matrix(W_x, E, 4 * nh, "W_x");
  check_matrix(W_h, nh, 4 * nh, "W_h");
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.device().is_cpu() && b.is_contiguous() &&
                  b.numel() == 4 * nh,
              "fused kernels: b must be a contiguous float32 CPU (", 4 * nh, ")");
  const std::vector<Round> rounds = rounds_of(mats, counts, biases, E, nh);
  const int64_t R = rounds.size(), nx = (R + 1) / 2, nhr = R / 2, TB = T * B;
  auto opts = X.options();
  Tensor Y = at::empty({T, B, nh}, opts), IFGO = at::empty({T, B, 4 * nh}, opts);
  Tensor Cs = at::empty({T, B, nh}, opts), Tc = at::empty({T, B, nh}, opts);
  Tensor XV = at::empty({nx + 1, T, B, E}, opts), HV = at::empty({nhr + 1, T, B, nh}, opts);
  std::vector<Tensor> Ms, As;
  std::vector<float*> m_p, a_p;
  for (const Round& r : rounds) {
    Ms.push_back(at::empty({T, B, r.dst}, opts));
    As.push_back(at::empty({r.rank ? T : 0, B, r.rank}, opts));
    m_p.push_back(ptr(Ms.back()));
    a_p.push_back(r.rank ? ptr(As.back()) : nullptr);
  }
  const float *x = cptr(X), *h0 = cptr(H0), *c0 = cptr(C0), *bias = cptr(b);
  const Mat wx = dense(cptr(W_x), 4 * nh), wh = dense(cptr(W_h), 4 * nh);
  float *y = ptr(Y), *ifgo = ptr(IFGO), *cs = ptr(Cs), *tc = ptr(Tc), *xv = ptr(XV),
        *hv = ptr(HV);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r0 = t * B + b0;
      std::memcpy(xv + r0 * E, x + r0 * E, nb * E * sizeof(float));
      std::memcpy(hv + r0 * nh, t ? y + (r0 - B) * nh : h0 + b0 * nh, nb * nh * sizeof(float));
      for (int64_t k = 0; k < R; ++k) {
        const Round& rd = rounds[k];
        const bool on_x = k % 2 == 0;
        const float* src = on_x ? hv + ((k / 2) * TB + r0) * nh : xv + (((k + 1) / 2) * TB + r0) * E;
        const float* old = on_x ? xv + ((k / 2) * TB + r0) * E : hv + (((k - 1) / 2) * TB + r0) * nh;
        float* neu = on_x ? xv + ((k / 2 + 1) * TB + r0) * E : hv + (((k + 1) / 2) * TB + r0) * nh;
        float* m = m_p[k] + r0 * rd.dst;
        if (rd.rank) {
          float* a = a_p[k] + r0 * rd.rank;
          gemm(false, nb, rd.rank, rd.src, dense(src, rd.src), dense(rd.f1, rd.rank), 0.0f, a,
               rd.rank);
          gemm(false, nb, rd.dst, rd.rank, dense(a, rd.rank), dense(rd.f2, rd.dst), 0.0f, m,
               rd.dst);
        } else {
          gemm(false, nb, rd.dst, rd.src, dense(src, rd.src), dense(rd.f1, rd.dst), 0.0f, m,
               rd.dst);
        }
        const int64_t n = rd.dst;
        for (int64_t bb = 0; bb < nb; ++bb)
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const float mv = 2.0f * sigm(m[bb * n + j] + rd.bias[j]);
            m[bb * n + j] = mv;
            neu[bb * n + j] = mv * old[bb * n + j];
          }
      }
      float* ifgo_t = ifgo + r0 * 4 * nh;
      gemm(false, nb, 4 * nh, E, dense(xv + (nx * TB + r0) * E, E), wx, 0.0f, ifgo_t, 4 * nh);
      gemm(false, nb, 4 * nh, nh, dense(hv + (nhr * TB + r0) * nh, nh), wh, 1.0f, ifgo_t, 4 * nh);
      const float* cprev = t ? cs + (r0 - B) * nh : c0 + b0 * nh;
      for (int64_t bb = 0; bb < nb; ++bb) {
        const int64_t r = r0 + bb;
        float* gb = ifgo_t + bb * 4 * nh;
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) {
          const float ig = sigm(gb[j] + bias[j]), fg = sigm(gb[nh + j] + bias[nh + j]);
          const float cg = std::tanh(gb[2 * nh + j] + bias[2 * nh + j]);
          const float og = sigm(gb[3 * nh + j] + bias[3 * nh + j]);
          gb[j] = ig;
          gb[nh + j] = fg;
          gb[2 * nh + j] = cg;
          gb[3 * nh + j] = og;
          const float cn = fg * cprev[bb * nh + j] + ig * cg;
          cs[r * nh + j] = cn;
          const float th = std::tanh(cn);
          tc[r * nh + j] = th;
          y[r * nh + j] = og * th;
        }
      }
    }
  });
  std::vector<Tensor> out = {Y, IFGO, Cs, Tc, XV, HV};
  out.insert(out.end(), Ms.begin(), Ms.end());
  out.insert(out.end(), As.begin(), As.end());
  return out;
}

std::vector<Tensor> mogrifier_backward(Tensor dY, Tensor dC_T, Tensor C0, Tensor W_x,
                                       Tensor W_h, std::vector<Tensor> mats,
                                       std::vector<int64_t> counts, std::vector<Tensor> biases,
                                       Tensor IFGO, Tensor Cs, Tensor Tc, Tensor XV, Tensor HV,
                                       std::vector<Tensor> Ms) {
  const Gemm gemm(kFp32);
  TORCH_CHECK(Cs.scalar_type() == at::kFloat && Cs.dim() == 3 && Cs.is_contiguous() &&
                  XV.dim() == 4,
              "fused kernels: Cs must be a contiguous float32 (T, B, num_hiddens) tensor");
  const int64_t T = Cs.size(0), B = Cs.size(1), nh = Cs.size(2), E = XV.size(3), TB = T * B;
  check_saved(IFGO, Cs, 4 * nh, "IFGO");
  check_saved(Tc, Cs, nh, "Tc");
  TORCH_CHECK(dY.scalar_type() == at::kFloat && dY.sizes() == Cs.sizes(),
              "fused kernels: dY must be (T, B, num_hiddens)");
  TORCH_CHECK(!dC_T.defined() || dC_T.numel() == B * nh,
              "fused kernels: dC_T must be (batch_size, num_hiddens)");
  check_matrix(W_x, E, 4 * nh, "W_x");
  check_matrix(W_h, nh, 4 * nh, "W_h");
  const std::vector<Round> rounds = rounds_of(mats, counts, biases, E, nh);
  const int64_t R = rounds.size();
  TORCH_CHECK(static_cast<int64_t>(Ms.size()) == R && XV.scalar_type() == at::kFloat &&
                  HV.scalar_type() == at::kFloat && XV.dim() == 4 && HV.dim() == 4 &&
                  XV.sizes() == at::IntArrayRef({(R + 1) / 2 + 1, T, B, E}) &&
                  HV.sizes() == at::IntArrayRef({R / 2 + 1, T, B, nh}) &&
                  XV.is_contiguous() && HV.is_contiguous(),
              "fused kernels: the saved mogrifier versions do not match its rounds");
  TORCH_CHECK(C0.scalar_type() == at::kFloat && C0.is_contiguous() && C0.dim() == 2 &&
                  C0.size(0) == B && C0.size(1) == nh,
              "fused kernels: C0 must be a contiguous float32 (", B, ", ", nh, ")");
  auto opts = Cs.options();
  dY = dY.contiguous();
  Tensor dA = at::empty({T, B, 4 * nh}, opts), dX = at::empty({T, B, E}, opts);
  Tensor carry_h = at::zeros({B, nh}, opts);
  Tensor carry_c = dC_T.defined() ? dC_T.contiguous().view({B, nh}).clone()
                                  : at::zeros({B, nh}, opts);
  Tensor W_x_T = transposed(W_x), W_h_T = transposed(W_h);
  std::vector<Tensor> dS, dR, f1t, f2t;  // transposes of the factors, for the carries
  std::vector<float*> ds_p, dr_p;
  std::vector<const float*> m_p;
  for (size_t k = 0; k < rounds.size(); ++k) {
    const Round& r = rounds[k];
    dS.push_back(at::empty({T, B, r.dst}, opts));
    dR.push_back(at::empty({r.rank ? T : 0, B, r.rank}, opts));
    ds_p.push_back(ptr(dS.back()));
    dr_p.push_back(r.rank ? ptr(dR.back()) : nullptr);
    TORCH_CHECK(Ms[k].is_contiguous() && Ms[k].numel() == TB * r.dst,
                "fused kernels: a saved mask does not match its round");
    m_p.push_back(cptr(Ms[k]));
  }
  size_t m = 0;
  for (size_t k = 0; k < rounds.size(); ++k) {
    f1t.push_back(transposed(mats[m]));
    f2t.push_back(counts[k] == 2 ? transposed(mats[m + 1]) : Tensor());
    m += counts[k];
  }
  const float *ifgo = cptr(IFGO), *cs = cptr(Cs), *tc = cptr(Tc), *dy = cptr(dY),
              *c0 = cptr(C0), *xv = cptr(XV), *hv = cptr(HV);
  const Mat wx_t = dense(cptr(W_x_T), E), wh_t = dense(cptr(W_h_T), nh);
  float *da = ptr(dA), *dx = ptr(dX), *ch_all = ptr(carry_h), *cc_all = ptr(carry_c);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    float *ch = ch_all + b0 * nh, *cc = cc_all + b0 * nh;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t r0 = t * B + b0;
      const float* cp = t ? cs + (r0 - B) * nh : c0 + b0 * nh;
      for (int64_t bb = 0; bb < nb; ++bb) {
        const int64_t r = r0 + bb;
        const float* gb = ifgo + r * 4 * nh;
        float* dab = da + r * 4 * nh;
#pragma omp simd
        for (int64_t j = 0; j < nh; ++j) {
          const int64_t i = bb * nh + j;
          const float ig = gb[j], fg = gb[nh + j], cg = gb[2 * nh + j], og = gb[3 * nh + j];
          const float dh = dy[r * nh + j] + ch[i];
          const float th = tc[r * nh + j];
          const float dc = cc[i] + dh * og * (1.0f - th * th);
          dab[j] = dc * cg * ig * (1.0f - ig);
          dab[nh + j] = dc * cp[i] * fg * (1.0f - fg);
          dab[2 * nh + j] = dc * ig * (1.0f - cg * cg);
          dab[3 * nh + j] = dh * th * og * (1.0f - og);
          cc[i] = dc * fg;
        }
      }
      const Mat da_t = dense(da + r0 * 4 * nh, 4 * nh);
      float* gx = dx + r0 * E;  // the gradient of the newest x, then of older ones
      gemm(false, nb, E, 4 * nh, da_t, wx_t, 0.0f, gx, E);
      gemm(false, nb, nh, 4 * nh, da_t, wh_t, 0.0f, ch, nh);  // likewise for h
      for (int64_t k = R - 1; k >= 0; --k) {
        const Round& rd = rounds[k];
        const bool on_x = k % 2 == 0;
        float* g = on_x ? gx : ch;
        float* gsrc = on_x ? ch : gx;
        const float* old = on_x ? xv + ((k / 2) * TB + r0) * E : hv + (((k - 1) / 2) * TB + r0) * nh;
        const float* mk = m_p[k] + r0 * rd.dst;
        float* ds = ds_p[k] + r0 * rd.dst;
        const int64_t n = rd.dst;
#pragma omp simd
        for (int64_t i = 0; i < nb * n; ++i) {
          const float mv = mk[i], dm = g[i] * old[i];
          g[i] *= mv;
          ds[i] = dm * mv * (1.0f - 0.5f * mv);  // d(2 s(u))/du = m (1 - m / 2)
        }
        if (rd.rank) {
          float* dr = dr_p[k] + r0 * rd.rank;
          gemm(false, nb, rd.rank, n, dense(ds, n), dense(cptr(f2t[k]), rd.rank), 0.0f, dr,
               rd.rank);
          gemm(false, nb, rd.src, rd.rank, dense(dr, rd.rank), dense(cptr(f1t[k]), rd.src),
               1.0f, gsrc, rd.src);
        } else {
          gemm(false, nb, rd.src, n, dense(ds, n), dense(cptr(f1t[k]), rd.src), 1.0f, gsrc,
               rd.src);
        }
      }
    }
  });
  std::vector<Tensor> out = {dA, dX, carry_h, carry_c};
  out.insert(out.end(), dS.begin(), dS.end());
  out.insert(out.end(), dR.begin(), dR.end());
  return out;
}

// ---------------------------------------------------------------- choosing a GEMM
std::vector<int64_t> gemm_kinds() {
  std::vector<int64_t> out;
  for (int64_t k : {kFp32, kBf16Mkl, kBf16Sgemm})
    if (has_kind(k)) out.push_back(k);
  return out;
}

// Seconds per row-major (M x K) . (K x N) product of this kind on the calling thread, the
// left operand's conversion included (the recurrences convert H at every step; the weights
// once per call): the best of 3 rounds of `reps` products, after a warm-up.
double time_gemm(int64_t kind, int64_t M, int64_t N, int64_t K, int64_t reps) {
  const Gemm gemm(kind);
  TORCH_CHECK(M > 0 && N > 0 && K > 0 && reps > 0, "time_gemm: sizes must be positive");
  at::Generator g = at::detail::createCPUGenerator(0);
  Tensor A = at::rand({M, K}, g) - 0.5, W = at::rand({K, N}, g) - 0.5, C = at::empty({M, N});
  Buf a, w;
  const Mat Wm = gemm.operand(cptr(W), K, N, N, w);
  auto once = [&] { gemm(false, M, N, K, gemm.operand(cptr(A), M, K, K, a), Wm, 0.0f, ptr(C), N); };
  once();
  double best = 1e30;
  for (int round = 0; round < 3; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < reps; ++i) once();
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    best = std::min(best, dt.count() / reps);
  }
  return best;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
  m.def("gru_ra_forward", &gru_ra_forward);
  m.def("gru_ra_backward", &gru_ra_backward);
  m.def("lstm_forward", &lstm_forward);
  m.def("lstm_backward", &lstm_backward);
  m.def("rnn_forward", &rnn_forward);
  m.def("rnn_backward", &rnn_backward);
  m.def("mogrifier_forward", &mogrifier_forward);
  m.def("mogrifier_backward", &mogrifier_backward);
  m.def("gemm_kinds", &gemm_kinds);
  m.def("time_gemm", &time_gemm);
}
