// Argument checks for the C++ entry points. Each macro expects a `const char* op` naming
// the operator (e.g. "fastvit::layer_norm") in scope; messages read
// "<op>: <argument> must ..., got ...".
// The Python layer (functional.py) already
// validates user input; these guard direct torch.ops.fastvit.* calls and name the
// expected and the received value, so a misuse fails loudly instead of reading garbage.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#define FASTVIT_CHECK_CPU(t)                                                          \
  TORCH_CHECK((t).device().is_cpu(), op, ": ", #t,                 \
              " must be a CPU tensor, got a tensor on ", (t).device())

#define FASTVIT_CHECK_FLOATING(t)                                                     \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), op, ": ", #t, \
              " must be floating point (float32/float64/bfloat16/float16), got ",     \
              (t).scalar_type())

#define FASTVIT_CHECK_DIM(t, n)                                                       \
  TORCH_CHECK((t).dim() == (n), op, ": ", #t, " must have ", (n),  \
              " dimensions, got shape ", (t).sizes())

#define FASTVIT_CHECK_SAME_DTYPE(a, b)                                                \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), op, ": ",    \
              #b, " has dtype ", (b).scalar_type(), " but ", #a, " has ",             \
              (a).scalar_type(), "; expected one dtype")

#define FASTVIT_CHECK_SHAPE(t, ...)                                                   \
  TORCH_CHECK((t).sizes() == at::IntArrayRef(std::vector<int64_t>{__VA_ARGS__}),      \
              op, ": ", #t, " must have shape ",                   \
              at::IntArrayRef(std::vector<int64_t>{__VA_ARGS__}), ", got ", (t).sizes())

// A tensor argument that must be CPU, floating and of `like`'s dtype.
#define FASTVIT_CHECK_INPUT(t, like) \
  FASTVIT_CHECK_CPU(t);              \
  FASTVIT_CHECK_FLOATING(t);         \
  FASTVIT_CHECK_SAME_DTYPE(like, t)

// An optional tensor argument: when present, CPU, of `like`'s dtype and given shape.
#define FASTVIT_CHECK_OPTIONAL(opt, like, ...)  \
  if (const auto& opt##_optional = (opt); opt##_optional.has_value()) { \
    const at::Tensor& opt = *opt##_optional;    \
    FASTVIT_CHECK_INPUT(opt, like);             \
    FASTVIT_CHECK_SHAPE(opt, __VA_ARGS__);      \
  }
