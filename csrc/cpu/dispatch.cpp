// The CPU kernels' registration: which ISA level runs, chosen once when the library loads.
//
// A portable build (setup.py's default) holds csrc/cpu/{merge,lora_apply,lora_linear}.cpp compiled once
// per level, each copy in its own namespace (common/isa.h): plain x86-64 ("default"), AVX2 + FMA + F16C
// ("avx2") and AVX-512 F/BW/VL/DQ/BF16 + FMA + F16C ("avx512"). As ATen's DispatchStub does, this picks
// the best level the CPU runs, from cpuid (the compiler's __builtin_cpu_supports, which also asks the
// OS whether it saves the AVX and AVX-512 registers), or a lower one that PYLORA_CPU_ISA asks for. Unlike
// DispatchStub, the choice is made once, here, and the chosen level's functions are what the dispatcher
// registers: a call costs what it cost in a one-level build.
// A native build (PYLORA_CPU_ARCH=native, or any -march) holds one level, whatever its flags give; this
// file is compiled with the same flags, so its own level (PYLORA_ISA_LEVEL) is that one.
#include "dispatch.h"

#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../common/isa.h"
#include "kernels.h"

// The levels this build holds: this file's own (the level setup.py compiled the main sources at) and
// those setup.py compiled csrc/cpu/*.cpp for besides (PYLORA_CPU_WITH_AVX2 / _AVX512).
#if PYLORA_ISA_LEVEL == 2 || defined(PYLORA_CPU_WITH_AVX512)
#define PYLORA_HAVE_AVX512 1
#else
#define PYLORA_HAVE_AVX512 0
#endif
#if PYLORA_ISA_LEVEL == 1 || defined(PYLORA_CPU_WITH_AVX2)
#define PYLORA_HAVE_AVX2 1
#else
#define PYLORA_HAVE_AVX2 0
#endif
#if PYLORA_ISA_LEVEL == 0
#define PYLORA_HAVE_PLAIN 1
#else
#define PYLORA_HAVE_PLAIN 0
#endif

namespace pylora {
namespace cpu {
namespace {

constexpr int kLevels = 3;
const char* const kNames[kLevels] = {"default", "avx2", "avx512"};
constexpr bool kCompiled[kLevels] = {PYLORA_HAVE_PLAIN, PYLORA_HAVE_AVX2, PYLORA_HAVE_AVX512};
// A native build runs its one level: it was compiled for the machine that runs it, with flags
// (-march=...) that this file cannot list.
#if defined(PYLORA_CPU_ARCH)  // setup.py: the -march of a native build
constexpr bool kNative = true;
const char* const kNativeNote =
    " (a native build, PYLORA_CPU_ARCH=" PYLORA_CPU_ARCH "; build without PYLORA_CPU_ARCH for every level)";
#else
constexpr bool kNative = false;
const char* const kNativeNote = "";
#endif

// Whether this CPU (and OS) runs the instructions a portable build compiles level `level` with
// (setup.py's flags for it).
bool cpu_runs(int level) {
  if (level == 0) return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();  // needed before constructors have run; we may be called from one
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (level == 1) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

IsaChoice choose() {
  IsaChoice c;
  int best = -1;
  for (int level = kLevels - 1; level >= 0; --level) {
    if (!kCompiled[level]) continue;
    c.compiled.push_back(kNames[level]);
    if (kNative || cpu_runs(level)) {
      c.supported.push_back(kNames[level]);
      if (best < 0) best = level;
    }
  }
  // A portable build always holds level 0, which every CPU runs; a native build runs its one level.
  c.level = best;
  const char* env = std::getenv("PYLORA_CPU_ISA");
  c.requested = env ? env : "";
  if (!c.requested.empty() && c.requested != "auto") {
    int want = -1;
    for (int level = 0; level < kLevels; ++level)
      if (c.requested == kNames[level]) want = level;
    const std::string asked = "PYLORA_CPU_ISA=" + c.requested;
    if (want < 0) {
      c.note = asked + " is not one of avx512, avx2, default (or auto): ignored";
    } else if (!kCompiled[want]) {
      c.note = asked + ": this build holds only " + kNames[best] + kNativeNote;
    } else if (want > best) {
      c.note = asked + ": this CPU does not run it (it runs " + kNames[best] + ")";
    } else {
      c.level = want;
    }
  }
  c.running = kNames[c.level];
  return c;
}

}  // namespace

const IsaChoice& isa_choice() {
  static const IsaChoice choice = choose();
  return choice;
}

// Registers the kernels of level `ns` (kernels.h).
#define PYLORA_REGISTER_CPU_KERNELS(ns)                                  \
  do {                                                                   \
    m.impl("merge_", &ns::merge_cpu);                                    \
    m.impl("unmerge_", &ns::unmerge_cpu);                                \
    m.impl("lora_linear", &ns::lora_linear_cpu);                         \
    m.impl("lora_linear_backward", &ns::lora_linear_backward_cpu);       \
    m.impl("lora_multi", &ns::lora_multi_cpu);                           \
    m.impl("lora_multi_backward", &ns::lora_multi_backward_cpu);         \
    m.impl("lora_apply_", &ns::lora_apply_cpu);                          \
  } while (0)

TORCH_LIBRARY_IMPL(pylora, CPU, m) {
  switch (isa_choice().level) {
#if PYLORA_HAVE_AVX512
    case 2:
      PYLORA_REGISTER_CPU_KERNELS(avx512);
      break;
#endif
#if PYLORA_HAVE_AVX2
    case 1:
      PYLORA_REGISTER_CPU_KERNELS(avx2);
      break;
#endif
#if PYLORA_HAVE_PLAIN
    case 0:
      PYLORA_REGISTER_CPU_KERNELS(plain);
      break;
#endif
    default:
      TORCH_INTERNAL_ASSERT(false, "pylora: no CPU kernels for level ", isa_choice().level);
  }
}

}  // namespace cpu
}  // namespace pylora
