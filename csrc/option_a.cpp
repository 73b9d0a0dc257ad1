// Schemas of the option-A shortcut primitives (ResNet paper, CIFAR experiments):
// the shortcut of a block whose dimensions change is the input subsampled with
// stride s and zero-padded with extra channels; it has no parameters.
//
//   sc(x)[n, c, h, w] = x[n, c, h*s, w*s]  for c < C_in,   0 for C_in <= c < C
//
// with the block's output size H = ceil(H_in / s), W = ceil(W_in / s) (what a 3x3,
// padding-1, stride-s convolution gives, also for odd H_in, W_in). Notation as in
// csrc/ops.cpp: x is the pre-BN tensor z of the main branch, per-channel vectors are
// [C] in acc_t, outputs take the dtype and memory format of x.
//
// bn_apply_option_a(x, scale, shift, shortcut, stride, relu) -> out
//     out = x*scale[c] + shift[c] + sc(shortcut), then ReLU if relu.
//     shortcut: [N, C_in, H_in, W_in], C_in <= C, dtype of x.
// bn_backward_apply_option_a(grad_out, out?, x, mean, a, b, d, shortcut_size, stride)
//     -> (grad_x, grad_shortcut)
//     g = (out <= 0) ? 0 : grad_out when out is given (the ReLU mask), else grad_out;
//     grad_x = a[c]*g + b[c]*(x - mean[c]) + d[c];
//     grad_shortcut: shape shortcut_size = [N, C_in, H_in, W_in], the transpose of sc:
//     g[n, c, h, w] at [n, c, h*s, w*s] for c < C_in, zero at every other position.
//     One pass; the reduction of the backward (sum g, sum g*(x - mean)) is
//     bn_backward_reduce without x2.
// (CPU kernels: csrc/cpu/option_a.cpp, CUDA: csrc/cuda/option_a.cu, plain PyTorch and
// the autograd-carrying block operator: fused_resnet/option_a.py.)
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fused_resnet, m) {
  m.def("bn_apply_option_a(Tensor x, Tensor scale, Tensor shift, Tensor shortcut, int stride, "
        "bool relu) -> Tensor");
  m.def("bn_backward_apply_option_a(Tensor grad_out, Tensor? out, Tensor x, Tensor mean, "
        "Tensor a, Tensor b, Tensor d, SymInt[] shortcut_size, int stride) "
        "-> (Tensor grad_x, Tensor grad_shortcut)");
}
