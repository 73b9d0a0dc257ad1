// Schemas of the fused_resnet kernel-level ("primitive") operators.
//
// These are the four memory-bound kernels that every backend implements (CPU here in
// csrc/cpu, CUDA in csrc/cuda; the `reference` backend has the same math in
// fused_resnet/primitives.py). The autograd-carrying block operators
// (conv_bn_relu, bn_relu_conv, bn_add_relu, conv_bias_act) are defined in Python
// (fused_resnet/ops.py) and call these.
//
// Notation: x is [N, C, H, W] (NCHW-contiguous or channels_last), per-channel
// vectors are [C] in the accumulation dtype acc_t = float64 for float64 input,
// float32 otherwise (bf16/fp16/fp32). Reductions run over N, H, W.
//
// bn_stats(x) -> (mean, var)           biased variance, acc_t.
// bn_apply(x, scale, shift, residual?, x2?, scale2?, shift2?, relu) -> out
//     out = x*scale[c] + shift[c] (+ residual) (+ x2*scale2[c] + shift2[c]), then ReLU
//     if relu; dtype and memory format of x.
// bn_backward_reduce(grad_out, out?, x, mean, x2?, mean2?) -> (sum_g, sum_g_xmu, sum_g_xmu2)
//     g = grad_out masked by the ReLU: g = (out <= 0) ? 0 : grad_out when out is given
//     (written so, not as out > 0, to let NaN through exactly as eager's
//     threshold_backward does), else g = grad_out;
//     sum_g[c] = sum g, sum_g_xmu[c] = sum g*(x - mean[c]), sum_g_xmu2 likewise for
//     x2 (an empty tensor when x2 is absent). acc_t.
// bn_backward_apply(grad_out, out?, x, mean, a, b, d, x2?, mean2?, a2?, b2?, d2?, grad_residual)
//     -> (grad_x, grad_shortcut)
//     grad_x = a[c]*g + b[c]*(x - mean[c]) + d[c];
//     grad_shortcut = a2[c]*g + b2[c]*(x2 - mean2[c]) + d2[c] when x2 is given,
//                   = g when grad_residual, else an empty tensor.
//     Both in the dtype and memory format of x.
//
// The per-channel finish steps (math: csrc/bn_finish.h and primitives.py), so that a
// training step launches one kernel where a composite would launch five:
// bn_scale_shift(mean, var, gamma?, beta?, eps) -> (scale, shift)
//     scale = gamma/sqrt(var + eps), shift = beta - mean*scale (gamma = 1, beta = 0 when
//     absent).
// bn_stats_affine(x, gamma?, beta?, eps) -> (mean, var, scale, shift)
//     bn_stats with its finish step.
// bn_backward_coefficients(grad_out, out?, x, mean, var, gamma?, eps, use_batch_stats,
//                          x2?, mean2?, var2?, gamma2?, eps2) -> (coef, coef2)
//     bn_backward_reduce with its finish step: coef [5, C] = rows a, b, d (grad_x =
//     a*g + b*(x - mean) + d), d gamma, d beta; coef2 the same for x2's BN, else empty.
// bn_update_running_stats(running_means, running_vars, num_batches_tracked, means,
//                         variances, counts, momenta, cumulative) -> ()
//     in place, for every layer i: num_batches_tracked += 1, then running = running*(1-f)
//     + batch*f with the unbiased variance, f = momenta[i] or 1/num_batches_tracked
//     (cumulative[i]); variances[i] with C + 1 elements carries the count (sync BN),
//     which replaces counts[i]; an empty batch is only counted.
// bn_fold(weight, gamma?, beta?, running_mean, running_var, eps, dtype?) -> (weight, bias)
//     eval-mode BN folded into the convolution before it: weight[o]*scale[o] (in dtype,
//     default weight's; memory format of weight) and bias = shift, scale / shift as
//     bn_scale_shift of the running statistics (in their dtype).
#include <torch/library.h>

TORCH_LIBRARY(fused_resnet, m) {
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("bn_apply(Tensor x, Tensor scale, Tensor shift, Tensor? residual, Tensor? x2, "
        "Tensor? scale2, Tensor? shift2, bool relu) -> Tensor");
  m.def("bn_backward_reduce(Tensor grad_out, Tensor? out, Tensor x, Tensor mean, "
        "Tensor? x2, Tensor? mean2) -> (Tensor sum_g, Tensor sum_g_xmu, Tensor sum_g_xmu2)");
  m.def("bn_backward_apply(Tensor grad_out, Tensor? out, Tensor x, Tensor mean, Tensor a, "
        "Tensor b, Tensor d, Tensor? x2, Tensor? mean2, Tensor? a2, Tensor? b2, Tensor? d2, "
        "bool grad_residual) -> (Tensor grad_x, Tensor grad_shortcut)");
  m.def("bn_scale_shift(Tensor mean, Tensor var, Tensor? gamma, Tensor? beta, float eps) "
        "-> (Tensor scale, Tensor shift)");
  m.def("bn_stats_affine(Tensor x, Tensor? gamma, Tensor? beta, float eps) "
        "-> (Tensor mean, Tensor var, Tensor scale, Tensor shift)");
  m.def("bn_backward_coefficients(Tensor grad_out, Tensor? out, Tensor x, Tensor mean, "
        "Tensor var, Tensor? gamma, float eps, bool use_batch_stats, Tensor? x2, Tensor? mean2, "
        "Tensor? var2, Tensor? gamma2, float eps2) -> (Tensor coef, Tensor coef2)");
  m.def("bn_update_running_stats(Tensor(a!)[] running_means, Tensor(b!)[] running_vars, "
        "Tensor(c!)[] num_batches_tracked, Tensor[] means, Tensor[] variances, int[] counts, "
        "float[] momenta, bool[] cumulative) -> ()");
  m.def("bn_fold(Tensor weight, Tensor? gamma, Tensor? beta, Tensor running_mean, "
        "Tensor running_var, float eps, ScalarType? dtype) -> (Tensor weight, Tensor bias)");
}

#ifdef FUSED_RESNET_PYTHON_MODULE
// `import fused_resnet._C` loads this library (running the registrations above); the
// module itself is empty. Only setup.py's build defines this: the CMake build for C++
// users has no Python.
#include <Python.h>
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
