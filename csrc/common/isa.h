// The instruction-set level a translation unit is compiled for, read once from the compiler's target
// macros (the flags setup.py passes). Torch-free; cpu/vec.h, cpu/*.cpp and common/merge_math.h key on it.
//
//   level 2  avx512  AVX-512 (F; a portable build also asks for BW, VL, DQ, BF16, FMA and F16C)
//   level 1  avx2    AVX2 + FMA + F16C
//   level 0  plain   anything else (a portable build: x86-64 with SSE2); the run-time name is "default"
//
// A portable build compiles csrc/cpu/*.cpp once per level, each with its own target flags, and
// cpu/dispatch.cpp registers the best level the CPU runs (ATen's CPU kernels work the same way). So that
// the copies link side by side, everything those files define lives in namespace PYLORA_ISA_NS, and so
// do the inline helpers of the headers they share with code compiled at other levels (merge_math.h,
// vec.h): an inline function compiled twice, once for AVX-512 with FMA units and once for plain
// x86-64, would otherwise be one symbol of which the linker keeps one copy, maybe the one an older
// CPU cannot run.
#pragma once

#if defined(__AVX512F__)
#define PYLORA_ISA_LEVEL 2
#define PYLORA_ISA_NS avx512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PYLORA_ISA_LEVEL 1
#define PYLORA_ISA_NS avx2
#else
#define PYLORA_ISA_LEVEL 0
#define PYLORA_ISA_NS plain
#endif
