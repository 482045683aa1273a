// Philox4x32-10, bit-identical to pixcon.reference.rng.philox4x32 and pixcon_kernels.rng:
// counter (c0, c1, 0, 0), key (seed low 32 bits, seed high 32 bits).
#pragma once
#include <cstdint>

namespace pixcon {

inline void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t out[4]) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  uint32_t c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// The key words of a 64-bit seed.
inline void philox_key(int64_t seed, uint32_t* k0, uint32_t* k1) {
  const uint64_t s = static_cast<uint64_t>(seed);
  *k0 = static_cast<uint32_t>(s & 0xFFFFFFFFu);
  *k1 = static_cast<uint32_t>(s >> 32);
}

// One sampler's stream of draws under one seed: draw(i) is Philox of counter (i, stream).
struct DrawStream {
  uint32_t k0, k1, c1;
  DrawStream(int64_t seed, int64_t stream) : c1(static_cast<uint32_t>(stream)) {
    philox_key(seed, &k0, &k1);
  }
  void draw(int64_t i, uint32_t w[4]) const {
    philox4x32_10(static_cast<uint32_t>(i), c1, k0, k1, w);
  }
};

// (r * n) >> 32: a 32-bit draw mapped to [0, n).
inline int64_t uniform_index(uint32_t r, int64_t n) {
  return static_cast<int64_t>((static_cast<uint64_t>(r) * static_cast<uint64_t>(n)) >> 32);
}

}  // namespace pixcon
