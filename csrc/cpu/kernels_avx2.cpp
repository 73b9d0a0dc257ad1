// The AVX2 (+FMA, F16C) build of the CPU kernels of bn_stats.cpp, bn_apply.cpp and
// bn_backward.cpp: the same source compiled a second time, with at::vec's AVX2
// Vectorized, into namespace fused_resnet::cpu::AVX2. The op entry points in those
// files choose it at run time (cpu_utils.h: use_avx2()), so the library still runs,
// on the generic kernels, on an x86-64 CPU without AVX2, and setup.py / CMake need no
// per-file flags.
//
// Only the kernels are compiled here (FUSED_RESNET_KERNELS_ONLY: no ATen.h, no argument
// checks, no operator registration). This file sorts after bn_*.cpp, so it is linked
// after them and the linker keeps their baseline-ISA copies of the inline functions
// the headers give both translation units (the rule ATen's per-CPU kernels rely on).
//
// The condition must match FUSED_RESNET_HAVE_AVX2 in cpu_utils.h (checked below); it is
// spelled out because the target pragma and macros must come before any header.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(FUSED_RESNET_NO_AVX2)
#pragma GCC target("avx2,fma,f16c")
// GCC's C++ front end does not define the ISA macros for a target pragma; the
// headers (sleef.h, at::vec) test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
// GCC compiles the static invoker of a lambda in the at::vec headers (bfloat16
// operator+) without the pragma's target and warns that its __m256 return "changes the
// ABI"; the kernels never convert that lambda to a function pointer.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FUSED_RESNET_ISA AVX2
#define FUSED_RESNET_KERNELS_ONLY

#include "bn_stats.cpp"
#include "bn_apply.cpp"
#include "bn_backward.cpp"

#if !FUSED_RESNET_HAVE_AVX2
#error "kernels_avx2.cpp and cpu_utils.h disagree on FUSED_RESNET_HAVE_AVX2"
#endif
#endif
