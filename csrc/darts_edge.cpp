// The fused DARTS edge (fastnas::darts_edge) on the building blocks, forward and
// backward, for any device whose building blocks have kernels; its autograd.
//
// The arithmetic is that of the Python composite in fastnas/ops/darts_edge.py
// (DartsEdgeFunction), op for op, so the two give bit-identical results; the
// difference is that nothing here returns to Python, arguments are checked once
// at the boundary, and the building blocks are called through operator handles
// looked up once.
#include "darts_edge.h"

#include "checks.h"
#include "fastnas_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

namespace fastnas {
namespace edge {

using at::Tensor;
using at::TensorList;

// --- the spec ------------------------------------------------------------------------

Spec decode_spec(const char* op, at::IntArrayRef encoded, int64_t offset, double eps, double momentum) {
  const int64_t size = static_cast<int64_t>(encoded.size());
  TORCH_CHECK_VALUE(offset + Spec::kHeader <= size, op, ": spec has ", size - offset, " ints from offset ", offset,
                    "; an edge needs at least ", Spec::kHeader, " (use EdgeSpec.encoded)");
  const int64_t* e = encoded.data() + offset;
  Spec s;
  s.stride = e[0];
  s.K = e[1];
  s.ns = e[2];
  s.nd = e[3];
  s.max_index = e[4];
  s.avg_index = e[5];
  s.skip_index = e[6];
  s.reduce_index = e[7];
  s.eps = eps;
  s.momentum = momentum;
  TORCH_CHECK_VALUE(s.stride == 1 || s.stride == 2, op, ": spec stride must be 1 or 2, got ", s.stride);
  TORCH_CHECK_VALUE(s.K >= 1, op, ": spec K (the number of weights) must be >= 1, got ", s.K);
  TORCH_CHECK_VALUE(s.ns >= 0 && s.nd >= 0, op, ": spec has ", s.ns, " separable and ", s.nd,
                    " dilated convolutions; both must be >= 0");
  TORCH_CHECK_VALUE(offset + s.encoded_size() <= size, op, ": spec needs ", s.encoded_size(), " ints for ", s.ns,
                    " separable and ", s.nd, " dilated convolutions, got ", size - offset);
  const std::pair<const char*, int64_t> indices[] = {{"max_index", s.max_index},
                                                     {"avg_index", s.avg_index},
                                                     {"skip_index", s.skip_index},
                                                     {"reduce_index", s.reduce_index}};
  for (const auto& [name, index] : indices) {
    TORCH_CHECK_VALUE(index >= -1 && index < s.K, op, ": spec ", name, "=", index, " is out of range for K=", s.K,
                      " (-1 when absent)");
  }
  TORCH_CHECK_VALUE(!s.has_skip() || s.stride == 1, op,
                    ": the identity skip needs stride 1; use reduce_index on stride-2 edges");
  TORCH_CHECK_VALUE(!s.has_reduce() || s.stride == 2, op, ": a factorized reduce needs stride 2");
  const int64_t* conv = e + Spec::kHeader;
  for (int64_t j = 0; j < s.ns + s.nd; ++j) {
    const int64_t k = conv[3 * j], index = conv[3 * j + 1], activation = conv[3 * j + 2];
    const char* kind = j < s.ns ? "separable" : "dilated";
    TORCH_CHECK_VALUE(k >= 1 && k % 2 == 1, op, ": spec gives a ", kind, " convolution kernel size ", k,
                      "; it must be odd");
    TORCH_CHECK_VALUE(index >= 0 && index < s.K, op, ": spec gives a ", kind, " convolution weight index ", index,
                      ", out of range for K=", s.K);
    TORCH_CHECK_VALUE(activation >= 0 && activation < math::kNumActivations, op, ": spec gives a ", kind,
                      " convolution activation code ", activation, "; codes run from 0 to ", math::kNumActivations - 1);
    s.act1.push_back(activation);
    if (j < s.ns) s.act2.push_back(activation);
    (j < s.ns ? s.sep_k : s.dil_k).push_back(k);
    (j < s.ns ? s.sep_i : s.dil_i).push_back(index);
  }
  return s;
}

// --- checks at the boundary ------------------------------------------------------------

void check_memory(const char* op, c10::string_view memory) {
  TORCH_CHECK_VALUE(memory == "save" || memory == "recompute", op,
                    ": memory must be one of ('save', 'recompute'), got '", std::string(memory), "'");
}

namespace {

const char* param_role(const Spec& s, int64_t i, int64_t& conv) {
  static const char* sep_roles[] = {"first depthwise", "first 1x1", "second depthwise", "second 1x1"};
  if (i < 4 * s.ns) {
    conv = i / 4;
    return sep_roles[i % 4];
  }
  if (i < 4 * s.ns + 2 * s.nd) {
    conv = (i - 4 * s.ns) / 2;
    return (i - 4 * s.ns) % 2 ? "1x1" : "depthwise";
  }
  conv = i - 4 * s.ns - 2 * s.nd;
  return "factorized reduce 1x1";
}

}  // namespace

void check_edge(const char* op, const Spec& s, const Tensor& x, const Tensor& weights, TensorList params,
                const Buffers& buffers) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_TYPE(supported_dtype(x.scalar_type()), op,
                   ": the fused edge computes float32, float64, float16 and bfloat16 inputs, not ", x.scalar_type());
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(x.size(0) >= 1 && C >= 1 && H >= 1 && W >= 1, op, ": x has an empty dimension, shape ", x.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == s.K, op, ": weights must have shape (", s.K,
                    ",), one per candidate, got ", weights.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), op, ": weights has dtype ", weights.scalar_type(),
                   "; expected a floating dtype");
  TORCH_CHECK_VALUE(weights.device() == x.device(), op, ": weights is on ", weights.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == s.n_params(), op, ": expected ", s.n_params(),
                    " parameter tensors (", s.ns, " separable, ", s.nd, " dilated convolutions",
                    s.has_reduce() ? ", a factorized reduce" : "", "), got ", params.size());
  if (s.has_reduce()) {
    TORCH_CHECK_VALUE(H % 2 == 0 && W % 2 == 0, op, ": a factorized reduce needs even H and W, got ", H, "x", W);
    TORCH_CHECK_VALUE(C >= 2, op, ": a factorized reduce needs at least 2 channels, got ", C);
  }
  for (int64_t i = 0; i < s.n_params(); ++i) {
    const Tensor& p = params[i];
    int64_t conv = 0;
    const char* role = param_role(s, i, conv);
    c10::SmallVector<int64_t, 4> want;
    if (i < 4 * s.ns) {
      const int64_t k = s.sep_k[conv];
      want = i % 2 ? c10::SmallVector<int64_t, 4>{C, C, 1, 1} : c10::SmallVector<int64_t, 4>{C, 1, k, k};
    } else if (i < 4 * s.ns + 2 * s.nd) {
      const int64_t k = s.dil_k[conv];
      want = (i - 4 * s.ns) % 2 ? c10::SmallVector<int64_t, 4>{C, C, 1, 1} : c10::SmallVector<int64_t, 4>{C, 1, k, k};
    } else {
      want = {conv == 0 ? C / 2 : C - C / 2, C, 1, 1};
    }
    TORCH_CHECK_VALUE(p.sizes() == at::IntArrayRef(want), op, ": params[", i, "], the ", role, " weight of ",
                      i < 4 * s.ns ? "separable convolution " : (i < 4 * s.ns + 2 * s.nd ? "dilated convolution " : ""),
                      i < 4 * s.ns + 2 * s.nd ? std::to_string(conv) : std::string("the edge"), ", must have shape ",
                      at::IntArrayRef(want), ", got ", p.sizes());
    TORCH_CHECK_TYPE(p.scalar_type() == x.scalar_type(), op, ": params[", i, "] has dtype ", p.scalar_type(),
                     " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(p.device() == x.device(), op, ": params[", i, "] is on ", p.device(), " but x is on ",
                      x.device());
  }
  if (buffers.empty()) return;
  const int64_t n = s.n_norms();
  const std::pair<const char*, TensorList> lists[] = {
      {"running_mean", buffers.mean}, {"running_var", buffers.var}, {"num_batches_tracked", buffers.count}};
  for (const auto& [name, list] : lists) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(list.size()) == n, op, ": ", name, " has ", list.size(),
                      " tensors; the edge has ", n, " batch norms (or pass no buffers at all)");
    for (size_t i = 0; i < list.size(); ++i) {
      const Tensor& t = list[i];
      TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but x is on ",
                        x.device());
      if (list.data() == buffers.count.data()) {
        TORCH_CHECK_VALUE(t.numel() == 1, op, ": num_batches_tracked[", i, "] must have one element, got shape ",
                          t.sizes());
      } else {
        TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, op, ": ", name, "[", i, "] must have shape (", C, ",), got ",
                          t.sizes());
        TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                         "; expected a floating dtype");
      }
    }
  }
  const int64_t Ho = (H - 1) / s.stride + 1, Wo = (W - 1) / s.stride + 1;
  TORCH_CHECK_VALUE(x.size(0) * Ho * Wo > 1, op, ": batch norm in training needs more than one value per channel, ",
                    "got ", x.size(0) * Ho * Wo);
}

void check_saved(const char* op, const Spec& s, const Tensor& x, const Tensor& out_like, const Saved& saved,
                 const char* out_name) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t Ho = (x.size(2) - 1) / s.stride + 1, Wo = (x.size(3) - 1) / s.stride + 1;
  TORCH_CHECK_VALUE(out_like.sizes() == at::IntArrayRef({N, C, Ho, Wo}), op, ": ", out_name, " must have shape (", N,
                    ", ", C, ", ", Ho, ", ", Wo, "), got ", out_like.sizes());
  TORCH_CHECK_TYPE(out_like.scalar_type() == x.scalar_type(), op, ": ", out_name, " has dtype ", out_like.scalar_type(),
                   " but x has dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(out_like.device() == x.device(), op, ": ", out_name, " is on ", out_like.device(), " but x is on ",
                    x.device());
  if (saved.zs.defined()) {
    TORCH_CHECK_VALUE(saved.zs.sizes() == at::IntArrayRef({s.nz(), C, N, Ho, Wo}), op, ": zs must have shape (", s.nz(),
                      ", ", C, ", ", N, ", ", Ho, ", ", Wo, "), got ", saved.zs.sizes());
    TORCH_CHECK_TYPE(saved.zs.scalar_type() == x.scalar_type(), op, ": zs has dtype ", saved.zs.scalar_type(),
                     " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(saved.zs.device() == x.device(), op, ": zs is on ", saved.zs.device(), " but x is on ",
                      x.device());
  }
  const std::tuple<const char*, const Tensor*, int64_t> stats[] = {{"mid_mean", &saved.mid_mean, s.ns},
                                                                   {"mid_rstd", &saved.mid_rstd, s.ns},
                                                                   {"mean", &saved.mean, s.nz() + 2},
                                                                   {"rstd", &saved.rstd, s.nz() + 2}};
  for (const auto& [name, t, rows] : stats) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({rows, C}), op, ": ", name, " must have shape (", rows, ", ", C,
                      "), got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": ", name, " has dtype ",
                     t->scalar_type(), "; expected float32 or float64");
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
  }
}

void bump_versions(std::initializer_list<TensorList> lists) {
  for (const TensorList& list : lists) {
    for (const Tensor& t : list) torch::autograd::impl::bump_version(t);
  }
}

// --- the computation ----------------------------------------------------------------------

namespace {

using OptionalTensor = std::optional<Tensor>;

// The building blocks, through the dispatcher: each device's kernels serve.
using MultiDepthwise = Tensor(const Tensor&, TensorList, at::IntArrayRef, int64_t, const OptionalTensor&,
                              const OptionalTensor&, at::IntArrayRef);
using MultiDepthwiseBackward = std::tuple<Tensor, std::vector<Tensor>>(const Tensor&, const Tensor&, TensorList,
                                                                       at::IntArrayRef, int64_t, const OptionalTensor&,
                                                                       const OptionalTensor&, bool, at::IntArrayRef);
using Stats = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, double);
using StatsBackward = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using PoolStats = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, double);
using DartsSum = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, bool, bool,
                        bool);
using DartsSumBackward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const Tensor&, int64_t, bool, bool, bool,
                                                            bool);

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

struct Blocks {
  c10::TypedOperatorHandle<MultiDepthwise> multi_depthwise = find_op<MultiDepthwise>("fastnas::multi_depthwise");
  c10::TypedOperatorHandle<MultiDepthwiseBackward> multi_depthwise_backward =
      find_op<MultiDepthwiseBackward>("fastnas::multi_depthwise_backward");
  c10::TypedOperatorHandle<Stats> stats = find_op<Stats>("fastnas::stacked_batch_norm_stats");
  c10::TypedOperatorHandle<StatsBackward> stats_backward =
      find_op<StatsBackward>("fastnas::stacked_batch_norm_backward");
  c10::TypedOperatorHandle<PoolStats> pool_stats = find_op<PoolStats>("fastnas::pool_batch_norm_stats");
  c10::TypedOperatorHandle<DartsSum> darts_sum = find_op<DartsSum>("fastnas::darts_sum");
  c10::TypedOperatorHandle<DartsSumBackward> darts_sum_backward =
      find_op<DartsSumBackward>("fastnas::darts_sum_backward");

  // Looked up once, at the first call (every schema is defined by then).
  static const Blocks& get() {
    static const Blocks blocks;
    return blocks;
  }
};

struct Shape {
  int64_t N, C, H, W, Ho, Wo, M;
};

Shape shape_of(const Spec& s, const Tensor& x) {
  Shape sh{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, 0};
  sh.Ho = (sh.H - 1) / s.stride + 1;
  sh.Wo = (sh.W - 1) / s.stride + 1;
  sh.M = sh.N * sh.Ho * sh.Wo;
  return sh;
}

at::ScalarType accumulate_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The parameters by role; dil1 the first depthwise convolutions' dilations
// (separable ones 1, dilated ones 2).
struct EdgeParams {
  c10::SmallVector<Tensor, 8> dw1, pw1, dw2, pw2, fr;
  c10::SmallVector<int64_t, 8> dil1, ones;
};

EdgeParams split_params(const Spec& s, TensorList p) {
  EdgeParams e;
  for (int64_t j = 0; j < s.ns; ++j) {
    e.dw1.push_back(p[4 * j]);
    e.pw1.push_back(p[4 * j + 1]);
    e.dw2.push_back(p[4 * j + 2]);
    e.pw2.push_back(p[4 * j + 3]);
    e.dil1.push_back(1);
    e.ones.push_back(1);
  }
  for (int64_t j = 0; j < s.nd; ++j) {
    e.dw1.push_back(p[4 * s.ns + 2 * j]);
    e.pw1.push_back(p[4 * s.ns + 2 * j + 1]);
    e.dil1.push_back(2);
  }
  for (int64_t j = 4 * s.ns + 2 * s.nd; j < s.n_params(); ++j) e.fr.push_back(p[j]);
  return e;
}

// The candidates' tensors of one pass over x (see _Forward in fastnas/ops/darts_edge.py).
struct Pass {
  Tensor pw1, pw2;  // the 1x1 weights stacked, (J, C, C)
  Tensor d1;        // the first depthwise outputs, (J1, C, N, Ho, Wo)
  Tensor z_mid;     // the separable convolutions' middles, (ns, C, N, Ho, Wo)
  Tensor d2;        // their second depthwise outputs
  Tensor a1, a2;    // the factorized reduce's inputs, (C, M)
};

// The second depthwise stage's input as multi_depthwise takes it: float32
// statistics applied in its prologue, or, for float64, normalised here so the
// statistics keep their precision.
std::tuple<Tensor, OptionalTensor, OptionalTensor> prologue(const Tensor& z_mid, const Tensor& mean,
                                                            const Tensor& rstd) {
  if (z_mid.scalar_type() == at::kDouble) {
    const std::vector<int64_t> shape{mean.size(0), mean.size(1), 1, 1, 1};
    return {(z_mid - mean.view(shape)) * rstd.view(shape), std::nullopt, std::nullopt};
  }
  const auto as_float = [](const Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); };
  return {z_mid, as_float(mean), as_float(rstd)};
}

Tensor channel_major(const Tensor& t) { return t.transpose(0, 1).reshape({t.size(1), -1}); }

// Runs the candidates from x. ``fill``: write the pre-BN tensors into zs.
// ``v1`` non-null (forward): compute the middles' batch statistics into m1, r1, *v1.
void run_candidates(const Spec& s, const Shape& sh, const Tensor& x, const EdgeParams& P, Pass& pass, const Tensor& zs,
                    bool fill, Tensor& m1, Tensor& r1, Tensor* v1) {
  const Blocks& B = Blocks::get();
  const int64_t ns = s.ns, nd = s.nd, J1 = s.J1(), C = sh.C, M = sh.M;
  if (J1) pass.pw1 = at::stack(P.pw1).flatten(2);
  if (ns) pass.pw2 = at::stack(P.pw2).flatten(2);
  if (J1) {
    pass.d1 = B.multi_depthwise.call(x, P.dw1, P.dil1, s.stride, std::nullopt, std::nullopt, s.act1);
    const Tensor d1 = pass.d1.view({J1, C, M});
    if (ns) pass.z_mid = at::bmm(pass.pw1.narrow(0, 0, ns), d1.narrow(0, 0, ns)).view({ns, C, sh.N, sh.Ho, sh.Wo});
    if (fill && nd) {
      Tensor out = zs.narrow(0, 0, nd).view({nd, C, M});
      at::bmm_out(out, pass.pw1.narrow(0, ns, nd), d1.narrow(0, ns, nd));
    }
  }
  if (ns) {
    if (v1 != nullptr) std::tie(m1, r1, *v1) = B.stats.call(pass.z_mid, s.eps);
    auto [pre, mean, rstd] = prologue(pass.z_mid, m1, r1);
    pass.d2 = B.multi_depthwise.call(pre, P.dw2, P.ones, 1, mean, rstd, s.act2);
    if (fill) {
      Tensor out = zs.narrow(0, nd, ns).view({ns, C, M});
      at::bmm_out(out, pass.pw2, pass.d2.view({ns, C, M}));
    }
  }
  if (s.has_reduce()) {
    const int64_t half = C / 2;
    pass.a1 = channel_major(at::relu(x.slice(2, 0, sh.H, 2).slice(3, 0, sh.W, 2)));
    pass.a2 = channel_major(at::relu(x.slice(2, 1, sh.H, 2).slice(3, 1, sh.W, 2)));
    if (fill) {
      const Tensor z = zs.select(0, s.nz() - 1);
      Tensor out1 = z.narrow(0, 0, half).view({half, M});
      Tensor out2 = z.narrow(0, half, C - half).view({C - half, M});
      at::mm_out(out1, P.fr[0].flatten(1), pass.a1);
      at::mm_out(out2, P.fr[1].flatten(1), pass.a2);
    }
  }
}

// darts_sum's coefficient order, [dilated, separable ends, reduce, max, avg, skip],
// as weight indices; absent max/avg/skip read weight 0 (their terms are dropped).
c10::SmallVector<int64_t, 16> coef_index(const Spec& s) {
  c10::SmallVector<int64_t, 16> index(s.dil_i.begin(), s.dil_i.end());
  index.append(s.sep_i.begin(), s.sep_i.end());
  if (s.has_reduce()) index.push_back(s.reduce_index);
  for (const int64_t i : {s.max_index, s.avg_index, s.skip_index}) index.push_back(std::max<int64_t>(i, 0));
  return index;
}

// weights[coef_index] in the accumulation dtype.
Tensor gather_coef(const Spec& s, const Tensor& weights, at::ScalarType acc) {
  const auto index = coef_index(s);
  const Tensor w = weights.scalar_type() == acc ? weights : weights.to(acc);
  if (!host_loops(w)) {
    std::vector<Tensor> rows;
    for (const int64_t i : index) rows.push_back(w.select(0, i));
    return at::stack(rows);
  }
  Tensor coef = at::empty({static_cast<int64_t>(index.size())}, w.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "darts_edge_gather_coef", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    scalar_t* dst = coef.mutable_data_ptr<scalar_t>();
    const int64_t stride = w.stride(0);
    for (size_t k = 0; k < index.size(); ++k) dst[k] = src[index[k] * stride];
  });
  return coef;
}

// A batch norm's statistics: rows of (mean, var).
struct StatRow {
  const Tensor* mean;
  const Tensor* var;
  int64_t row;
};

// nn.BatchNorm2d's training-mode buffer update, for every batch norm of the edge:
// running = (1 - m) * running + m * batch (the variance unbiased), count += 1.
void update_running_stats(const Buffers& b, const c10::SmallVector<StatRow, 16>& rows, double momentum, int64_t count) {
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  bool cpu = true;
  for (const auto& list : {b.mean, b.var, b.count}) {
    for (const Tensor& t : list) cpu = cpu && host_loops(t);
  }
  if (!cpu) {
    // Views of the statistics' rows, and one launch for all the unbiased variances.
    std::vector<Tensor> means, vars, new_mean, var_rows;
    for (size_t i = 0; i < rows.size(); ++i) {
      means.push_back(b.mean[i]);
      vars.push_back(b.var[i]);
      new_mean.push_back(rows[i].mean->select(0, rows[i].row).to(b.mean[i].scalar_type()));
      var_rows.push_back(rows[i].var->select(0, rows[i].row));
    }
    std::vector<Tensor> new_var = at::_foreach_mul(var_rows, unbias);
    for (size_t i = 0; i < rows.size(); ++i) new_var[i] = new_var[i].to(b.var[i].scalar_type());
    at::_foreach_mul_(means, 1 - momentum);
    at::_foreach_add_(means, new_mean, momentum);
    at::_foreach_mul_(vars, 1 - momentum);
    at::_foreach_add_(vars, new_var, momentum);
    at::_foreach_add_(b.count, 1);
    return;
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const StatRow& r = rows[i];
    const bool stats_float = r.mean->scalar_type() == at::kFloat;
    const int64_t C = r.mean->size(1);
    for (int which = 0; which < 2; ++which) {
      const Tensor& stat = which == 0 ? *r.mean : *r.var;
      const Tensor& buf = which == 0 ? b.mean[i] : b.var[i];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "darts_edge_running_stats", [&] {
        // The arithmetic of ATen's mul_ and add_(alpha) on these buffers (what
        // update_running_stats runs): in the opmath type, the add fused.
        using opmath_t = at::opmath_type<scalar_t>;
        scalar_t* dst = buf.mutable_data_ptr<scalar_t>();
        const int64_t step = buf.stride(0);
        const opmath_t keep = static_cast<opmath_t>(1 - momentum), take = static_cast<opmath_t>(momentum);
        for (int64_t c = 0; c < C; ++c) {
          double v;
          if (stats_float) {
            const float f = stat.const_data_ptr<float>()[r.row * C + c];
            v = which == 0 ? f : static_cast<double>(f * static_cast<float>(unbias));
          } else {
            const double d = stat.const_data_ptr<double>()[r.row * C + c];
            v = which == 0 ? d : d * unbias;
          }
          scalar_t& o = dst[c * step];
          o = static_cast<scalar_t>(static_cast<opmath_t>(o) * keep);
          const opmath_t batch = static_cast<opmath_t>(static_cast<scalar_t>(v));
          o = static_cast<scalar_t>(std::fma(take, batch, static_cast<opmath_t>(o)));
        }
      });
    }
    const Tensor& n = b.count[i];
    AT_DISPATCH_ALL_TYPES(n.scalar_type(), "darts_edge_num_batches", [&] { *n.mutable_data_ptr<scalar_t>() += 1; });
  }
}

}  // namespace

Tensor scatter_coef(const Spec& s, const Tensor& grad_coef, at::ScalarType weights_dtype, bool generic) {
  const auto index = coef_index(s);
  const int64_t n = static_cast<int64_t>(index.size());
  Tensor grad;
  if (generic) {
    // Each weight reads its own coefficient's gradient, or the zero appended after
    // them (the 'none' candidate): one pad and one stack, whatever K is.
    c10::SmallVector<int64_t, 16> from(s.K, n);
    const bool present[3] = {s.has_max(), s.has_avg(), s.has_skip()};
    for (int64_t k = 0; k < n; ++k) {
      if (k < n - 3 || present[k - (n - 3)]) from[index[k]] = k;
    }
    const Tensor padded = at::constant_pad_nd(grad_coef, {0, 1});
    std::vector<Tensor> rows;
    for (const int64_t k : from) rows.push_back(padded.select(0, k));
    grad = at::stack(rows);
  } else {
    grad = at::zeros({s.K}, grad_coef.options());
    AT_DISPATCH_FLOATING_TYPES(grad_coef.scalar_type(), "darts_edge_scatter_coef", [&] {
      const Tensor g = grad_coef.contiguous();
      const scalar_t* src = g.const_data_ptr<scalar_t>();
      scalar_t* dst = grad.mutable_data_ptr<scalar_t>();
      for (int64_t k = 0; k < n; ++k) dst[index[k]] += src[k];
    });
  }
  return grad.scalar_type() == weights_dtype ? grad : grad.to(weights_dtype);
}

EdgeOutputs edge_forward(const Spec& s, const Tensor& x_in, const Tensor& weights, TensorList params,
                         const Buffers& buffers, const Tensor& zs_out) {
  const Blocks& B = Blocks::get();
  const Tensor x = x_in.contiguous();
  const Shape sh = shape_of(s, x);
  const auto acc = accumulate_dtype(x);
  const auto stat_options = x.options().dtype(acc);
  const EdgeParams P = split_params(s, params);
  const int64_t nz = s.nz();
  const Tensor zs = zs_out.defined() ? zs_out : at::empty({nz, sh.C, sh.N, sh.Ho, sh.Wo}, x.options());
  Pass pass;
  Tensor m1, r1, v1;
  run_candidates(s, sh, x, P, pass, zs, true, m1, r1, &v1);
  Tensor m2, r2, v2;
  if (nz) std::tie(m2, r2, v2) = B.stats.call(zs, s.eps);
  Tensor pm, pr, pv;
  if (s.has_max() || s.has_avg()) {
    std::tie(pm, pr, pv) = B.pool_stats.call(x, s.stride, s.eps);
  } else {
    pm = at::zeros({2, sh.C}, stat_options);
    pr = at::ones_like(pm);
    pv = pm;
  }
  const Tensor mean = nz ? at::cat({m2, pm}) : pm;
  const Tensor rstd = nz ? at::cat({r2, pr}) : pr;
  if (!buffers.empty()) {
    // Buffer order: separable middles, dilated, separable ends, reduce, max, avg.
    c10::SmallVector<StatRow, 16> rows;
    for (int64_t j = 0; j < s.ns; ++j) rows.push_back({&m1, &v1, j});
    for (int64_t j = 0; j < nz; ++j) rows.push_back({&m2, &v2, j});
    if (s.has_max()) rows.push_back({&pm, &pv, 0});
    if (s.has_avg()) rows.push_back({&pm, &pv, 1});
    update_running_stats(buffers, rows, s.momentum, sh.M);
  }
  const Tensor coef = gather_coef(s, weights, acc);
  Tensor out = B.darts_sum.call(x, zs, mean, rstd, coef, s.stride, s.has_max(), s.has_avg(), s.has_skip());
  if (!s.ns) {
    m1 = at::empty({0, sh.C}, stat_options);
    r1 = at::empty({0, sh.C}, stat_options);
  }
  return {std::move(out), zs, m1, r1, mean, rstd};
}

EdgeGrads edge_backward(const Spec& s, const Tensor& grad_out, const Tensor& x_in, const Tensor& weights,
                        TensorList params, const Saved& saved) {
  const Blocks& B = Blocks::get();
  const Tensor x = x_in.contiguous();
  const Shape sh = shape_of(s, x);
  const int64_t ns = s.ns, nd = s.nd, J1 = s.J1(), nz = s.nz(), C = sh.C, N = sh.N, M = sh.M;
  const auto acc = accumulate_dtype(x);
  const EdgeParams P = split_params(s, params);
  const bool fill = !saved.zs.defined();
  const Tensor zs = fill ? at::empty({nz, C, N, sh.Ho, sh.Wo}, x.options()) : saved.zs;
  Tensor m1 = saved.mid_mean, r1 = saved.mid_rstd;
  Pass pass;
  run_candidates(s, sh, x, P, pass, zs, fill, m1, r1, nullptr);
  const Tensor g = grad_out.contiguous();
  const Tensor coef = gather_coef(s, weights, acc);
  auto [gz, gx, gcoef] = B.darts_sum_backward.call(g, x, zs, saved.mean, saved.rstd, coef, s.stride, s.has_max(),
                                                   s.has_avg(), s.has_skip(), true);
  std::vector<Tensor> g_dw1, g_pw1, g_dw2, g_pw2;
  if (J1) {
    const Tensor d1 = pass.d1.view({J1, C, M});
    Tensor gz_mid;
    if (ns) {
      const Tensor gz_end = gz.narrow(0, nd, ns).view({ns, C, M});
      g_pw2 = at::unbind_copy(at::bmm(gz_end, pass.d2.view({ns, C, M}).transpose(1, 2)).view({ns, C, C, 1, 1}));
      const Tensor gd2 = at::bmm(pass.pw2.transpose(1, 2), gz_end);
      auto [a2, m_a2, r_a2] = prologue(pass.z_mid, m1, r1);
      auto [gpre2, gdw2] = B.multi_depthwise_backward.call(gd2.view({ns, C, N, sh.Ho, sh.Wo}), a2, P.dw2, P.ones, 1,
                                                           m_a2, r_a2, true, s.act2);
      g_dw2 = std::move(gdw2);
      gz_mid = B.stats_backward.call(gpre2, pass.z_mid, m1, r1).view({ns, C, M});
    }
    // The first 1x1 convolutions, [seps, dils], per part: their output gradients are
    // never concatenated (a copy of J1 x C x M values).
    const Tensor gd1 = at::empty({J1, C, M}, gz.options());
    const Tensor gw1 = at::empty({J1, C, C}, gz.options());
    const std::pair<int64_t, Tensor> parts[] = {{0, gz_mid}, {ns, gz.narrow(0, 0, nd).view({nd, C, M})}};
    for (const auto& [start, gz_part] : parts) {
      if (!gz_part.defined() || gz_part.size(0) == 0) continue;
      const int64_t count = gz_part.size(0);
      Tensor gd1_part = gd1.narrow(0, start, count), gw1_part = gw1.narrow(0, start, count);
      at::bmm_out(gd1_part, pass.pw1.narrow(0, start, count).transpose(1, 2), gz_part);
      at::bmm_out(gw1_part, gz_part, d1.narrow(0, start, count).transpose(1, 2));
    }
    // Copies, not views: an op's outputs must not alias each other.
    g_pw1 = at::unbind_copy(gw1.view({J1, C, C, 1, 1}));
    auto [gx1, gdw1] = B.multi_depthwise_backward.call(gd1.view({J1, C, N, sh.Ho, sh.Wo}), x, P.dw1, P.dil1, s.stride,
                                                       std::nullopt, std::nullopt, true, s.act1);
    g_dw1 = std::move(gdw1);
    gx.add_(gx1);
  }
  std::vector<Tensor> grads;
  grads.reserve(s.n_params());
  for (int64_t j = 0; j < ns; ++j) grads.insert(grads.end(), {g_dw1[j], g_pw1[j], g_dw2[j], g_pw2[j]});
  for (int64_t j = 0; j < nd; ++j) grads.insert(grads.end(), {g_dw1[ns + j], g_pw1[ns + j]});
  if (s.has_reduce()) {
    const int64_t half = C / 2;
    const Tensor gfr = gz.select(0, nz - 1).view({C, M});
    for (int64_t k = 0; k < 2; ++k) {
      const Tensor gzs = k == 0 ? gfr.narrow(0, 0, half) : gfr.narrow(0, half, C - half);
      const Tensor& a = k == 0 ? pass.a1 : pass.a2;
      const Tensor& w = P.fr[k];
      grads.push_back(at::mm(gzs, a.t()).view(w.sizes()));
      const Tensor ga = at::mm(w.flatten(1).t(), gzs).view({C, N, sh.Ho, sh.Wo}).transpose(0, 1);
      const Tensor xs = x.slice(2, k, sh.H, 2).slice(3, k, sh.W, 2);
      gx.slice(2, k, sh.H, 2).slice(3, k, sh.W, 2).add_(ga * (xs > 0));
    }
  }
  return {gx, scatter_coef(s, gcoef, weights.scalar_type(), !host_loops(gcoef)), std::move(grads)};
}

// --- the ops ---------------------------------------------------------------------------

EdgeOutputs darts_edge(const Tensor& x, const Tensor& weights, TensorList params, TensorList running_mean,
                       TensorList running_var, TensorList num_batches_tracked, at::IntArrayRef spec, double eps,
                       double momentum, c10::string_view memory) {
  constexpr const char* op = "darts_edge";
  check_memory(op, memory);
  const Spec s = decode_spec(op, spec, 0, eps, momentum);
  TORCH_CHECK_VALUE(static_cast<int64_t>(spec.size()) == s.encoded_size(), op, ": spec has ", spec.size(),
                    " ints; its header describes ", s.encoded_size());
  const Buffers buffers{running_mean, running_var, num_batches_tracked};
  check_edge(op, s, x, weights, params, buffers);
  return edge_forward(s, x, weights, params, buffers);
}

EdgeGrads darts_edge_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weights, TensorList params,
                              const std::optional<Tensor>& zs, const Tensor& mid_mean, const Tensor& mid_rstd,
                              const Tensor& mean, const Tensor& rstd, at::IntArrayRef spec) {
  constexpr const char* op = "darts_edge_backward";
  const Spec s = decode_spec(op, spec, 0, 0.0, 0.0);
  TORCH_CHECK_VALUE(static_cast<int64_t>(spec.size()) == s.encoded_size(), op, ": spec has ", spec.size(),
                    " ints; its header describes ", s.encoded_size());
  check_edge(op, s, x, weights, params, Buffers{});
  const Saved saved{zs.has_value() && zs->defined() ? *zs : Tensor(), mid_mean, mid_rstd, mean, rstd};
  check_saved(op, s, x, grad_out, saved);
  return edge_backward(s, grad_out, x, weights, params, saved);
}

// --- autograd ---------------------------------------------------------------------------

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Running statistics travel to the forward as one non-differentiable argument.
struct BufferArg {
  TensorList mean, var, count;
};

class DartsEdgeFunction : public torch::autograd::Function<DartsEdgeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, c10::DispatchKeySet keys, const Tensor& x, const Tensor& weights,
                               TensorList params, BufferArg buffers, at::IntArrayRef spec, double eps, double momentum,
                               c10::string_view memory) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastnas::darts_edge", "")
                               .typed<decltype(fastnas::edge::darts_edge)>();
    // The building blocks this op calls skip autograd (they would each pass through
    // its dispatch, a Python function for the ops registered from Python).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, zs, mid_mean, mid_rstd, mean, rstd] =
        op.redispatch(keys & c10::after_autograd_keyset, x, weights, params, buffers.mean, buffers.var, buffers.count,
                      spec, eps, momentum, memory);
    bump_versions({buffers.mean, buffers.var, buffers.count});
    std::vector<Tensor> saved;
    saved.reserve(params.size() + 7);
    saved.push_back(x);
    saved.push_back(weights);
    saved.insert(saved.end(), params.begin(), params.end());
    saved.push_back(memory == "save" ? zs : Tensor());
    saved.insert(saved.end(), {mid_mean, mid_rstd, mean, rstd});
    ctx->save_for_backward(saved);
    ctx->saved_data["spec"] = spec.vec();
    ctx->mark_non_differentiable({zs, mid_mean, mid_rstd, mean, rstd});
    // The non-differentiable outputs' gradients stay undefined (materialised, they
    // would be one zero-filled launch each per backward); backward reads only grads[0].
    ctx->set_materialize_grads(false);
    return {out, zs, mid_mean, mid_rstd, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastnas::darts_edge_backward", "")
                               .typed<decltype(fastnas::edge::darts_edge_backward)>();
    const variable_list saved = ctx->get_saved_variables();
    const int64_t n_params = static_cast<int64_t>(saved.size()) - 7;
    // One entry per forward argument: keys, x, weights, params..., buffers, spec, eps, momentum, memory.
    variable_list result(8 + n_params);
    if (!grads[0].defined()) return result;
    const TensorList params(saved.data() + 2, n_params);
    const Tensor& zs = saved[2 + n_params];
    const std::vector<int64_t> spec = ctx->saved_data["spec"].toIntVector();
    check_not_double_backward("darts_edge");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_x, grad_weights, grad_params] =
        op.call(grads[0], saved[0], saved[1], params, zs.defined() ? std::optional<Tensor>(zs) : std::nullopt,
                saved[3 + n_params], saved[4 + n_params], saved[5 + n_params], saved[6 + n_params], spec);
    result[1] = std::move(grad_x);
    result[2] = std::move(grad_weights);
    std::move(grad_params.begin(), grad_params.end(), result.begin() + 3);
    return result;
  }
};

EdgeOutputs darts_edge_autograd(c10::DispatchKeySet keys, const Tensor& x, const Tensor& weights, TensorList params,
                                TensorList running_mean, TensorList running_var, TensorList num_batches_tracked,
                                at::IntArrayRef spec, double eps, double momentum, c10::string_view memory) {
  check_memory("darts_edge", memory);
  auto out = DartsEdgeFunction::apply(
      keys, x, weights, params, BufferArg{running_mean, running_var, num_batches_tracked}, spec, eps, momentum, memory);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace

}  // namespace edge
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, Autograd, m) { m.impl("darts_edge", &fastnas::edge::darts_edge_autograd); }
