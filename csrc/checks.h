// Argument checks at the boundary of the compiled operators, shared by the CPU
// (csrc/cpu) and CUDA (csrc/cuda) kernels: the same rules and messages on every device.
// A kernel states which device type it runs on; every other tensor must be on x's device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <sstream>
#include <string>

namespace fused_resnet {
namespace checks {

using at::Tensor;

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

// The accumulation dtype of the per-channel vectors: float64 for float64 x, else float32.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline const char* device_name(c10::DeviceType type) {
  return type == c10::DeviceType::CUDA ? "CUDA" : "CPU";
}

inline bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

inline const Tensor& required(const char* op, const std::optional<Tensor>& t,
                              const char* name, const char* because) {
  TORCH_CHECK(given(t), "fused_resnet::", op, ": ", name, " is required when ", because);
  return *t;
}

inline void absent(const char* op, const std::optional<Tensor>& t, const char* name,
                   const char* unless) {
  TORCH_CHECK(!given(t), "fused_resnet::", op, ": ", name, " was given but ", unless,
              " is None: pass both or neither");
}

// The activation x of a primitive: on the kernel's device type, a floating dtype the
// kernels have, 2-D to 4-D ([N, C], [N, C, L], [N, C, H, W]; exactly 4-D when four_d).
inline void check_x(const char* op, const Tensor& x, c10::DeviceType device,
                    const char* name = "x", bool four_d = false) {
  TORCH_CHECK(x.defined(), "fused_resnet::", op, ": expected ", name, " to be a tensor");
  TORCH_CHECK(x.device().type() == device, "fused_resnet::", op, ": expected ", name,
              " to be a ", device_name(device), " tensor, got a tensor on ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "fused_resnet::", op, ": expected ", name,
              " to have dtype float64, float32, bfloat16 or float16, got ", t);
  if (four_d) {
    TORCH_CHECK(x.dim() == 4, "fused_resnet::", op, ": expected ", name,
                " to be a 4-D [N, C, H, W] tensor, got shape ", shape_str(x.sizes()));
  } else {
    TORCH_CHECK(x.dim() >= 2 && x.dim() <= 4, "fused_resnet::", op, ": expected ", name,
                " to be a 4-D [N, C, H, W] tensor (2-D [N, C] and 3-D [N, C, L] are also "
                "accepted), got a ", x.dim(), "-D tensor of shape ", shape_str(x.sizes()));
  }
}

// Another tensor of the op on x's device (one device for all of an op's tensors).
inline void check_device(const char* op, const Tensor& t, const char* name,
                         const c10::Device& device) {
  TORCH_CHECK(t.device() == device, "fused_resnet::", op, ": expected ", name,
              " on x's device ", device, " (all tensors on the same ",
              device_name(device.type()), " device), got a tensor on ", t.device());
}

// A tensor with the shape, dtype and device of x.
inline void check_like(const char* op, const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.defined(), "fused_resnet::", op, ": expected ", name, " to be a tensor");
  check_device(op, t, name, x.device());
  TORCH_CHECK(t.sizes().equals(x.sizes()), "fused_resnet::", op, ": expected ", name,
              " to have the shape of x ", shape_str(x.sizes()), ", got ",
              shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_resnet::", op, ": expected ", name,
              " to have the dtype of x (", x.scalar_type(), "), got ", t.scalar_type());
}

// A per-channel vector: 1-D of C values of a floating dtype on `device`. Returns it as a
// contiguous `acc` tensor (no copy when it already is one).
inline Tensor per_channel(const char* op, const Tensor& v, const char* name,
                          const c10::Device& device, int64_t C, at::ScalarType acc) {
  TORCH_CHECK(v.defined(), "fused_resnet::", op, ": expected ", name, " to be a tensor");
  check_device(op, v, name, device);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, "fused_resnet::", op, ": expected ", name,
              " to be a per-channel vector of shape [", C, "] (C = x.size(1)), got shape ",
              shape_str(v.sizes()));
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), "fused_resnet::", op, ": expected ", name,
              " to have a floating dtype (", acc, " expected), got ", v.scalar_type());
  return v.to(acc).contiguous();
}

}  // namespace checks
}  // namespace fused_resnet
