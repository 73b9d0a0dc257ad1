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
