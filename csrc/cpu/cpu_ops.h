// The CPU primitives that other CPU operators build on: bn_finish.cpp runs the
// statistics and the backward reduction, then their per-channel finish step.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fused_resnet {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward_reduce_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& x,
    const at::Tensor& mean, const std::optional<at::Tensor>& x2,
    const std::optional<at::Tensor>& mean2);

}  // namespace cpu
}  // namespace fused_resnet
