// Fused CPU kernels for the scratch cells (float32): the step loops of gru_lm/cells.py
// with the elementwise work of each step in one vectorised pass between the GEMMs.
// Same inputs, outputs and saved tensors as the Python loops, which remain the portable
// fallback; tests check the two agree.
#include <torch/extension.h>

#include <cmath>
#include <vector>

using at::Tensor;

namespace {

inline float sigm(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// ---------------------------------------------------------------- GRU, the book's formula
// Z = s(P_z + H W_hz), R = s(P_r + H W_hr), Ht = tanh(P_h + (R*H) W_hh), H' = Ht + Z (H - Ht)
std::vector<Tensor> gru_forward(Tensor P, Tensor H0, Tensor W_hzr, Tensor W_hh) {
  const int64_t T = P.size(0), B = P.size(1), nh = H0.size(1);
  auto Y = at::empty({T, B, nh}, P.options());
  auto ZR = at::empty({T, B, 2 * nh}, P.options());
  auto Ht = at::empty({T, B, nh}, P.options());
  auto S = at::empty({T, B, nh}, P.options());
  const float* p = P.data_ptr<float>();
  Tensor H = H0.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    Tensor zr_t = ZR[t];
    at::mm_out(zr_t, H, W_hzr);
    float* zr = zr_t.data_ptr<float>();
    float* s = S[t].data_ptr<float>();
    const float* h = H.data_ptr<float>();
    const float* pt = p + t * B * 3 * nh;
    for (int64_t b = 0; b < B; ++b) {
      float* zrb = zr + b * 2 * nh;
      const float* pb = pt + b * 3 * nh;
#pragma omp simd
      for (int64_t j = 0; j < 2 * nh; ++j) zrb[j] = sigm(zrb[j] + pb[j]);
#pragma omp simd
      for (int64_t j = 0; j < nh; ++j) s[b * nh + j] = zrb[nh + j] * h[b * nh + j];
    }
    Tensor ht_t = Ht[t];
    at::mm_out(ht_t, S[t], W_hh);
    float* ht = ht_t.data_ptr<float>();
    float* y = Y[t].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float* pb = pt + b * 3 * nh + 2 * nh;
      const float* zb = zr + b * 2 * nh;
#pragma omp simd
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t i = b * nh + j;
        const float c = std::tanh(ht[i] + pb[j]);
        ht[i] = c;
        y[i] = c + zb[j] * (h[i] - c);
      }
    }
    H = Y[t];
  }
  return {Y, ZR, Ht, S};
}

std::vector<Tensor> gru_backward(Tensor dY, Tensor H0, Tensor W_hzr, Tensor W_hh, Tensor Y,
                                 Tensor ZR, Tensor Ht, Tensor S) {
  const int64_t T = Y.size(0), B = Y.size(1), nh = Y.size(2);
  dY = dY.contiguous();
  auto dA = at::empty({T, B, 3 * nh}, Y.options());
  auto dAzr = at::empty({B, 2 * nh}, Y.options());
  auto dAh = at::empty({B, nh}, Y.options());
  auto dS = at::empty({B, nh}, Y.options());
  auto base = at::empty({B, nh}, Y.options());
  auto carry = at::zeros({B, nh}, Y.options());
  const Tensor W_hzr_T = W_hzr.t().contiguous(), W_hh_T = W_hh.t().contiguous();
  const Tensor H0c = H0.contiguous();
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* hp = (t ? Y[t - 1] : H0c).data_ptr<float>();
    const float* zr = ZR[t].data_ptr<float>();
    const float* ht = Ht[t].data_ptr<float>();
    const float* dy = dY[t].data_ptr<float>();
    float* c = carry.data_ptr<float>();
    float* bs = base.data_ptr<float>();
    float* da = dA[t].data_ptr<float>();
    float* dazr = dAzr.data_ptr<float>();
    float* dah = dAh.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float* zb = zr + b * 2 * nh;
#pragma omp simd
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t i = b * nh + j;
        const float z = zb[j];
        const float dh = dy[i] + c[i];
        const float g = ht[i];
        dah[i] = dh * (1.0f - z) * (1.0f - g * g);
        dazr[b * 2 * nh + j] = dh * (hp[i] - g) * z * (1.0f - z);
        bs[i] = dh * z;  // dH_{t-1} from H' = Ht + Z (H - Ht), direct term
      }
    }
    at::mm_out(dS, dAh, W_hh_T);
    const float* ds = dS.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float* rb = zr + b * 2 * nh + nh;
#pragma omp simd
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t i = b * nh + j;
        const float r = rb[j];
        dazr[b * 2 * nh + nh + j] = ds[i] * hp[i] * r * (1.0f - r);
        bs[i] += ds[i] * r;
        da[b * 3 * nh + 2 * nh + j] = dah[i];
      }
      std::copy(dazr + b * 2 * nh, dazr + (b + 1) * 2 * nh, da + b * 3 * nh);
    }
    at::addmm_out(carry, base, dAzr, W_hzr_T);
  }
  const int64_t flat = T * B;
  Tensor Hprev = at::cat({H0c.unsqueeze(0), Y.narrow(0, 0, T - 1)}, 0).reshape({flat, nh});
  Tensor dA2 = dA.view({flat, 3 * nh});
  Tensor dW_hzr = at::mm(Hprev.t(), dA2.narrow(1, 0, 2 * nh));
  Tensor dW_hh = at::mm(S.view({flat, nh}).t(), dA2.narrow(1, 2 * nh, nh));
  return {dA, carry, dW_hzr, dW_hh};
}

// ---------------------------------------------------------------- GRU, torch.nn's formula
// A = H W_h; Z, R = s(P + A); M = A_h + b_hh; N = tanh(P_h + R M); H' = N + Z (H - N)
std::vector<Tensor> gru_ra_forward(Tensor P, Tensor H0, Tensor W_h, Tensor b_hh) {
  const int64_t T = P.size(0), B = P.size(1), nh = H0.size(1);
  auto Y = at::empty({T, B, nh}, P.options());
  auto ZR = at::empty({T, B, 2 * nh}, P.options());
  auto N = at::empty({T, B, nh}, P.options());
  auto M = at::empty({T, B, nh}, P.options());
  auto A = at::empty({B, 3 * nh}, P.options());
  const float* p = P.data_ptr<float>();
  const float* bh = b_hh.contiguous().data_ptr<float>();
  Tensor H = H0.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    at::mm_out(A, H, W_h);
    const float* a = A.data_ptr<float>();
    const float* h = H.data_ptr<float>();
    float* zr = ZR[t].data_ptr<float>();
    float* n = N[t].data_ptr<float>();
    float* m = M[t].data_ptr<float>();
    float* y = Y[t].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float* pb = p + (t * B + b) * 3 * nh;
      const float* ab = a + b * 3 * nh;
      float* zrb = zr + b * 2 * nh;
#pragma omp simd
      for (int64_t j = 0; j < 2 * nh; ++j) zrb[j] = sigm(pb[j] + ab[j]);
#pragma omp simd
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t i = b * nh + j;
        const float mm = ab[2 * nh + j] + bh[j];
        m[i] = mm;
        const float nn = std::tanh(pb[2 * nh + j] + zrb[nh + j] * mm);
        n[i] = nn;
        y[i] = nn + zrb[j] * (h[i] - nn);
      }
    }
    H = Y[t];
  }
  return {Y, ZR, N, M};
}

std::vector<Tensor> gru_ra_backward(Tensor dY, Tensor H0, Tensor W_h, Tensor Y, Tensor ZR,
                                    Tensor N, Tensor M) {
  const int64_t T = Y.size(0), B = Y.size(1), nh = Y.size(2);
  dY = dY.contiguous();
  auto dA = at::empty({T, B, 3 * nh}, Y.options());  // [z | r | m]
  auto dP = at::empty({T, B, 3 * nh}, Y.options());
  auto base = at::empty({B, nh}, Y.options());
  auto carry = at::zeros({B, nh}, Y.options());
  const Tensor W_h_T = W_h.t().contiguous();
  const Tensor H0c = H0.contiguous();
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* hp = (t ? Y[t - 1] : H0c).data_ptr<float>();
    const float* zr = ZR[t].data_ptr<float>();
    const float* n = N[t].data_ptr<float>();
    const float* m = M[t].data_ptr<float>();
    const float* dy = dY[t].data_ptr<float>();
    const float* c = carry.data_ptr<float>();
    float* bs = base.data_ptr<float>();
    float* da = dA[t].data_ptr<float>();
    float* dp = dP[t].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float* zb = zr + b * 2 * nh;
      float* dab = da + b * 3 * nh;
      float* dpb = dp + b * 3 * nh;
#pragma omp simd
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t i = b * nh + j;
        const float z = zb[j], r = zb[nh + j], nn = n[i];
        const float dh = dy[i] + c[i];
        const float dan = dh * (1.0f - z) * (1.0f - nn * nn);
        const float daz = dh * (hp[i] - nn) * z * (1.0f - z);
        const float dar = dan * m[i] * r * (1.0f - r);
        dab[j] = daz;
        dab[nh + j] = dar;
        dab[2 * nh + j] = dan * r;
        dpb[j] = daz;
        dpb[nh + j] = dar;
        dpb[2 * nh + j] = dan;
        bs[i] = dh * z;
      }
    }
    at::addmm_out(carry, base, dA[t], W_h_T);
  }
  const int64_t flat = T * B;
  Tensor Hprev = at::cat({H0c.unsqueeze(0), Y.narrow(0, 0, T - 1)}, 0).reshape({flat, nh});
  Tensor dA2 = dA.view({flat, 3 * nh});
  Tensor dW_h = at::mm(Hprev.t(), dA2);
  Tensor db_hh = dA2.narrow(1, 2 * nh, nh).sum(0);
  return {dP, carry, dW_h, db_hh};
}

// ---------------------------------------------------------------- LSTM [i | f | g | o]
std::vector<Tensor> lstm_forward(Tensor P, Tensor H0, Tensor C0, Tensor W_h) {
  const int64_t T = P.size(0), B = P.size(1), nh = H0.size(1);
  auto Y = at::empty({T, B, nh}, P.options());
  auto G = at::empty({T, B, 4 * nh}, P.options());
  auto Cs = at::empty({T, B, nh}, P.options());
  auto Tc = at::empty({T, B, nh}, P.options());
  Tensor H = H0.contiguous();
  const Tensor C0c = C0.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    Tensor g_t = G[t];
    at::addmm_out(g_t, P[t], H, W_h);
    float* g = g_t.data_ptr<float>();
    const float* cp = (t ? Cs[t - 1] : C0c).data_ptr<float>();
    float* cs = Cs[t].data_ptr<float>();
    float* tc = Tc[t].data_ptr<float>();
    float* y = Y[t].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      float* gb = g + b * 4 * nh;
#pragma omp simd
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t i = b * nh + j;
        const float ig = sigm(gb[j]), fg = sigm(gb[nh + j]);
        const float cg = std::tanh(gb[2 * nh + j]), og = sigm(gb[3 * nh + j]);
        gb[j] = ig;
        gb[nh + j] = fg;
        gb[2 * nh + j] = cg;
        gb[3 * nh + j] = og;
        const float cn = fg * cp[i] + ig * cg;
        cs[i] = cn;
        const float th = std::tanh(cn);
        tc[i] = th;
        y[i] = og * th;
      }
    }
    H = Y[t];
  }
  return {Y, G, Cs, Tc};
}

std::vector<Tensor> lstm_backward(Tensor dY, Tensor dC_T, Tensor H0, Tensor C0, Tensor W_h,
                                  Tensor Y, Tensor G, Tensor Cs, Tensor Tc) {
  const int64_t T = Y.size(0), B = Y.size(1), nh = Y.size(2);
  dY = dY.contiguous();
  auto dA = at::empty({T, B, 4 * nh}, Y.options());
  auto carry_h = at::zeros({B, nh}, Y.options());
  Tensor carry_c = dC_T.defined() ? dC_T.contiguous().clone() : at::zeros({B, nh}, Y.options());
  const Tensor W_h_T = W_h.t().contiguous();
  const Tensor H0c = H0.contiguous(), C0c = C0.contiguous();
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* cp = (t ? Cs[t - 1] : C0c).data_ptr<float>();
    const float* g = G[t].data_ptr<float>();
    const float* tc = Tc[t].data_ptr<float>();
    const float* dy = dY[t].data_ptr<float>();
    const float* ch = carry_h.data_ptr<float>();
    float* cc = carry_c.data_ptr<float>();
    float* da = dA[t].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float* gb = g + b * 4 * nh;
      float* dab = da + b * 4 * nh;
#pragma omp simd
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t i = b * nh + j;
        const float ig = gb[j], fg = gb[nh + j], cg = gb[2 * nh + j], og = gb[3 * nh + j];
        const float dh = dy[i] + ch[i];
        const float th = tc[i];
        const float dc = cc[i] + dh * og * (1.0f - th * th);
        dab[j] = dc * cg * ig * (1.0f - ig);
        dab[nh + j] = dc * cp[i] * fg * (1.0f - fg);
        dab[2 * nh + j] = dc * ig * (1.0f - cg * cg);
        dab[3 * nh + j] = dh * th * og * (1.0f - og);
        cc[i] = dc * fg;
      }
    }
    at::mm_out(carry_h, dA[t], W_h_T);
  }
  const int64_t flat = T * B;
  Tensor Hprev = at::cat({H0c.unsqueeze(0), Y.narrow(0, 0, T - 1)}, 0).reshape({flat, nh});
  Tensor dW_h = at::mm(Hprev.t(), dA.view({flat, 4 * nh}));
  return {dA, carry_h, carry_c, dW_h};
}

// ---------------------------------------------------------------- RNN
std::vector<Tensor> rnn_forward(Tensor P, Tensor H0, Tensor W_hh) {
  const int64_t T = P.size(0), B = P.size(1), nh = H0.size(1);
  auto Y = at::empty({T, B, nh}, P.options());
  Tensor H = H0.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    Tensor y_t = Y[t];
    at::addmm_out(y_t, P[t], H, W_hh);
    float* y = y_t.data_ptr<float>();
#pragma omp simd
    for (int64_t i = 0; i < B * nh; ++i) y[i] = std::tanh(y[i]);
    H = y_t;
  }
  return {Y};
}

std::vector<Tensor> rnn_backward(Tensor dY, Tensor H0, Tensor W_hh, Tensor Y) {
  const int64_t T = Y.size(0), B = Y.size(1), nh = Y.size(2);
  dY = dY.contiguous();
  auto dA = at::empty({T, B, nh}, Y.options());
  auto carry = at::zeros({B, nh}, Y.options());
  const Tensor W_T = W_hh.t().contiguous();
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* y = Y[t].data_ptr<float>();
    const float* dy = dY[t].data_ptr<float>();
    const float* c = carry.data_ptr<float>();
    float* da = dA[t].data_ptr<float>();
#pragma omp simd
    for (int64_t i = 0; i < B * nh; ++i) da[i] = (dy[i] + c[i]) * (1.0f - y[i] * y[i]);
    at::mm_out(carry, dA[t], W_T);
  }
  const int64_t flat = T * B;
  Tensor Hprev = at::cat({H0.contiguous().unsqueeze(0), Y.narrow(0, 0, T - 1)}, 0)
                     .reshape({flat, nh});
  Tensor dW = at::mm(Hprev.t(), dA.view({flat, nh}));
  return {dA, carry, dW};
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
}
