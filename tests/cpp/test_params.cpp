// Unit tests of the torch-free parameter structs in csrc/common/*_params.h: the untyped struct that
// prepare_* fills and the typed one a kernel gets from as<T>() must hold the same call, field for field.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "check.h"
#include "common/lora_apply_params.h"
#include "common/lora_linear_params.h"
#include "common/merge_math.h"
#include "common/merge_params.h"

using namespace pylora;

namespace {

// Every byte of both structs up to the end of the last field (padding after it left out) is the same.
template <class A, class B>
bool same_bytes(const A& a, const B& b, size_t end) {
  static_assert(sizeof(A) == sizeof(B), "as<T>() keeps the layout");
  return std::memcmp(&a, &b, end) == 0;
}

// A struct gaining a field must copy it in as<T>() and extend these tests: these sizes say so.
static_assert(sizeof(MergeParams<void>) == 3 * sizeof(void*) + 4 * sizeof(int64_t) + 8, "MergeParams changed");
static_assert(sizeof(LoraApplyParams<void>) == 9 * sizeof(void*) + 11 * sizeof(int64_t), "LoraApplyParams changed");

void check_merge_params() {
  MergeParams<void> a;
  std::memset(&a, 0x5A, sizeof a);  // every field holds a pattern; as<T>() must carry each one
  a.P = 7;
  a.Q = 4097;
  a.r = 3;
  a.nb = mm::chunks_per_row(a.Q);
  a.s = -0.75f;
  const MergeParams<uint16_t> b = a.as<uint16_t>();
  CHECK(static_cast<void*>(b.W) == a.W && b.U == a.U && b.V == a.V, "MergeParams pointers");
  CHECK(b.P == 7 && b.Q == 4097 && b.r == 3 && b.nb == 2 && b.s == -0.75f, "MergeParams sizes");
  CHECK(same_bytes(a, b, offsetof(MergeParams<void>, s) + sizeof(float)), "MergeParams bytes");
}

void check_lora_apply_params() {
  LoraApplyParams<void> a;
  std::memset(&a, 0x5A, sizeof a);
  int64_t* sizes[] = {&a.T, &a.I, &a.O, &a.P, &a.N, &a.S, &a.nnz, &a.ldy, &a.ldx, &a.lda, &a.ldb};
  for (int k = 0; k < 11; ++k) *sizes[k] = 100 + k;  // distinct, so a swapped pair shows
  const LoraApplyParams<float> b = a.as<float>();
  CHECK(static_cast<void*>(b.y) == a.y && b.x == a.x && b.A == a.A && b.B == a.B, "LoraApplyParams operands");
  CHECK(b.row_ptr == a.row_ptr && b.row_idx == a.row_idx && b.seg_ptr == a.seg_ptr && b.seg_slot == a.seg_slot &&
            b.scales == a.scales,
        "LoraApplyParams plan");
  CHECK(b.T == 100 && b.I == 101 && b.O == 102 && b.P == 103 && b.N == 104 && b.S == 105 && b.nnz == 106 &&
            b.ldy == 107 && b.ldx == 108 && b.lda == 109 && b.ldb == 110,
        "LoraApplyParams sizes");
  CHECK(same_bytes(a, b, sizeof a), "LoraApplyParams bytes");
}

void check_lora_linear_params() {
  LoraLinearParams pb;
  pb.seed = -1;  // all 64 bits set: lo32 and hi32 both 0xFFFFFFFF
  pb.dropout_p = 0.25;
  const dropout::Key k = pb.key();
  CHECK(k.k0 == 0xFFFFFFFFu && k.k1 == dropout::mix32(0xFFFFFFFFu ^ 0x9E3779B9u), "key of seed -1");
  CHECK(k.threshold == 0x40000000u, "threshold of p = 0.25 is 2^30, got 0x%08x", k.threshold);
  CHECK(pb.inv_keep() == 1.0 / 0.75, "inv_keep of p = 0.25");
  pb.dropout_p = std::nextafter(1.0, 0.0);  // p * 2^32 rounds to 2^32: clamped, so keep stays possible
  CHECK(pb.key().threshold == 0xFFFFFFFFu, "threshold clamps below 2^32");
  pb.dropout_p = 0.0;
  CHECK(pb.key().threshold == 0u, "p = 0 keeps everything");
}

}  // namespace

int main() {
  check_merge_params();
  check_lora_apply_params();
  check_lora_linear_params();
  return CHECK_REPORT();
}
