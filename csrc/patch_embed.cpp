// Patch embedding: a stride-P, kernel-P Conv2d as a single GEMM over the patches,
// written straight into the (B, T, D) token tensor. The patch matrix has one row per
// output token, the prefix tokens' rows (class, register or distillation tokens) left
// zero, so the GEMM's rows are the output's rows; the output starts as
// (prefix token [+ pos]) / (pos + bias) per token and the GEMM adds onto it (beta = 1).
// No conv output to flatten, transpose, concatenate and add to in separate passes, and
// backward needs no copy of the gradient either (the zero rows contribute nothing to
// dweight).
#include "checks.h"
#include "common.h"
#include "gemm.h"
#include "ops.h"

namespace fastvit {
namespace {

struct PatchGeom {
  int64_t B, C, H, W, P, gh, gw, prefix;
  int64_t tokens() const { return gh * gw + prefix; }
  int64_t K() const { return C * P * P; }
};

PatchGeom geometry(const at::Tensor& images, int64_t P, int64_t prefix) {
  return {images.size(0), images.size(1), images.size(2), images.size(3), P,
          images.size(2) / P, images.size(3) / P, prefix};
}

// Copies between images (B, C, H, W), any strides, and the patch matrix (B * T, C*P*P),
// row b*T + prefix + i*gw + j holding patch (i, j) in (c, py, px) order; parallel over
// patch rows. to_cols: images -> cols (prefix-token rows zeroed); else cols -> images.
template <typename T>
void patch_copy(T* images, const at::IntArrayRef strides, T* cols, const PatchGeom& g, bool to_cols) {
  const int64_t sb = strides[0], sc = strides[1], sh = strides[2], sw = strides[3];
  const int64_t K = g.K(), P = g.P, T_ = g.tokens();
  at::parallel_for(0, g.B * g.gh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t b = bi / g.gh, i = bi % g.gh;
      if (to_cols && g.prefix && i == 0) std::memset(cols + b * T_ * K, 0, g.prefix * K * sizeof(T));
      for (int64_t j = 0; j < g.gw; ++j) {
        T* row = cols + (b * T_ + g.prefix + i * g.gw + j) * K;
        for (int64_t c = 0; c < g.C; ++c) {
          for (int64_t py = 0; py < P; ++py) {
            T* img = images + b * sb + c * sc + (i * P + py) * sh + j * P * sw;
            T* col = row + (c * P + py) * P;
            if (sw == 1) {
              std::memcpy(to_cols ? col : img, to_cols ? img : col, P * sizeof(T));
            } else {
              for (int64_t px = 0; px < P; ++px) {
                if (to_cols) col[px] = img[px * sw]; else img[px * sw] = col[px];
              }
            }
          }
        }
      }
    }
  });
}

at::Tensor im2col(const at::Tensor& images, const PatchGeom& g) {
  at::Tensor cols = at::empty({g.B * g.tokens(), g.K()}, images.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "im2col", [&] {
    patch_copy<scalar_t>(const_cast<scalar_t*>(images.data_ptr<scalar_t>()), images.strides(),
                         cols.data_ptr<scalar_t>(), g, true);
  });
  return cols;
}

at::Tensor col2im(const at::Tensor& cols, const PatchGeom& g) {
  at::Tensor images = at::empty({g.B, g.C, g.H, g.W}, cols.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cols.scalar_type(), "col2im", [&] {
    patch_copy<scalar_t>(images.data_ptr<scalar_t>(), images.strides(), const_cast<scalar_t*>(cols.data_ptr<scalar_t>()),
                         g, false);
  });
  return images;
}

void check_patch_args(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "fastvit::patch_embed";
  FASTVIT_CHECK_CPU(images);
  FASTVIT_CHECK_FLOATING(images);
  FASTVIT_CHECK_DIM(images, 4);
  FASTVIT_CHECK_INPUT(weight, images);
  FASTVIT_CHECK_DIM(weight, 4);
  const int64_t P = weight.size(2);
  TORCH_CHECK(weight.size(3) == P, op, ": weight must be (D, C, P, P), got ", weight.sizes());
  TORCH_CHECK(images.size(1) == weight.size(1), op, ": images have ", images.size(1),
              " channels but weight ", weight.sizes(), " expects ", weight.size(1));
  TORCH_CHECK(P > 0 && images.size(2) % P == 0 && images.size(3) % P == 0, op, ": image size ",
              images.size(2), "x", images.size(3), " is not divisible by the patch size ", P);
  FASTVIT_CHECK_OPTIONAL(bias, images, weight.size(0));
}

}  // namespace

at::Tensor patch_embed(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& pos_embed, const std::optional<at::Tensor>& prefix) {
  FASTVIT_BELOW_AUTOGRAD;
  check_patch_args(images, weight, bias);
  const char* op = "fastvit::patch_embed";
  FASTVIT_CHECK_INPUT(pos_embed, images);
  const int64_t B = images.size(0), D = weight.size(0), P = weight.size(2);
  const int64_t grid = (images.size(2) / P) * (images.size(3) / P);
  int64_t n = 0;
  if (prefix.has_value()) {
    const at::Tensor& tokens = *prefix;
    FASTVIT_CHECK_INPUT(tokens, images);
    TORCH_CHECK(tokens.dim() == 3 && tokens.size(0) == 1 && tokens.size(1) >= 1 && tokens.size(2) == D, op,
                ": prefix must have shape (1, n, ", D, ") with n >= 1, got ", tokens.sizes());
    n = tokens.size(1);
  }
  const int64_t T = grid + n;
  const int64_t pos_rows = pos_embed.dim() >= 2 ? pos_embed.size(-2) : -1;
  TORCH_CHECK(pos_embed.size(-1) == D && pos_embed.numel() == pos_rows * D && (pos_rows == T || pos_rows == grid),
              op, ": pos_embed must have ",
              T, " or ", grid, " rows of ", D, " ((1, ", T, ", ", D, ") or (1, ", grid, ", ", D,
              ")), got shape ", pos_embed.sizes());
  // Equal row counts only when n == 0, where both readings are the same.
  const bool pos_prefix = pos_rows == T;
  const PatchGeom g = geometry(images, P, n);
  // Per-token starting values: prefix token [+ pos] for the prefix rows, pos + bias for the rest.
  at::Tensor start;
  if (pos_prefix) {
    start = pos_embed.reshape({T, D}).clone();
    if (n > 0) start.narrow(0, 0, n).add_(prefix->reshape({n, D}));
  } else {
    start = at::empty({T, D}, pos_embed.options());
    if (n > 0) start.narrow(0, 0, n).copy_(prefix->reshape({n, D}));
    start.narrow(0, n, grid).copy_(pos_embed.reshape({grid, D}));
  }
  if (bias.has_value()) start.narrow(0, n, grid).add_(*bias);
  at::Tensor out = start.unsqueeze(0).expand({B, T, D}).contiguous();
  if (B == 0) return out;
  gemm::linear_accumulate_(out.view({B * T, D}), im2col(images, g), weight.reshape({D, -1}));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, int64_t num_prefix,
    bool pos_prefix, bool images_grad) {
  FASTVIT_BELOW_AUTOGRAD;
  check_patch_args(images, weight, std::nullopt);
  const char* op = "fastvit::patch_embed_bwd";
  FASTVIT_CHECK_INPUT(grad_out, images);
  TORCH_CHECK(num_prefix >= 0, op, ": num_prefix must be >= 0, got ", num_prefix);
  const int64_t B = images.size(0), D = weight.size(0), P = weight.size(2);
  const int64_t grid = (images.size(2) / P) * (images.size(3) / P);
  const int64_t n = num_prefix;
  const int64_t T = grid + n;
  FASTVIT_CHECK_SHAPE(grad_out, B, T, D);
  const PatchGeom geom = geometry(images, P, n);
  const at::Tensor g2d = grad_out.contiguous().view({B * T, D});
  // Sums over the batch, each output a tensor of its own (no views into another).
  const at::Tensor g3 = g2d.view({B, T, D});
  const at::Tensor dpos = (pos_prefix ? g3 : g3.narrow(1, n, grid)).sum(0);
  const at::Tensor dprefix = pos_prefix ? dpos.narrow(0, 0, n).clone() : g3.narrow(1, 0, n).sum(0);
  const at::Tensor dbias = (pos_prefix ? dpos.narrow(0, n, grid) : dpos).sum(0);
  // Prefix-token rows of the patch matrix are zero: the full-gradient GEMM is exact.
  const at::Tensor dweight = gemm::matmul(g2d.t(), im2col(images, geom)).view(weight.sizes());
  if (!images_grad) return {at::empty({0}, g2d.options()), dweight, dbias, dpos, dprefix};
  const at::Tensor dimages = col2im(gemm::matmul(g2d, weight.reshape({D, -1})), geom);
  return {dimages, dweight, dbias, dpos, dprefix};
}

}  // namespace fastvit
