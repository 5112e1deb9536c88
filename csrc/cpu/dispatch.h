// Which ISA level of the CPU kernels runs (cpu/dispatch.cpp), for the build facts (csrc/ops.cpp).
#pragma once
#include <string>
#include <vector>

namespace pylora {
namespace cpu {

struct IsaChoice {
  int level = 0;                       // 0 default, 1 avx2, 2 avx512 (common/isa.h)
  std::string running;                 // the level's name: "default", "avx2" or "avx512"
  std::vector<std::string> compiled;   // the levels this build holds, best first
  std::vector<std::string> supported;  // the levels of those this CPU runs, best first
  std::string requested;               // PYLORA_CPU_ISA as found ("" when unset)
  std::string note;                    // why the request was not followed ("" when it was, or none was made)
};

// Made once, on first use (the CPU kernels' registration, when the library loads).
const IsaChoice& isa_choice();

}  // namespace cpu
}  // namespace pylora
