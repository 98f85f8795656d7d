// tree_attention CPU kernel body. Included ONLY by tree_attention.cpp, once per instruction set, inside
// a namespace and a `#pragma GCC target(...)` region, so every function here is compiled for that
// instruction set. It includes nothing and uses no std:: templates (their out-of-line instantiations
// would be shared between the regions and could end up compiled for the wrong instruction set); the
// including file provides Problem, the scratch memory, EAGLE_TA_VEC_BYTES (64, 32 or 16: one
// register of the instruction set) and, on x86, <immintrin.h> (the FMA intrinsics of vfma).
//
// One task = (sequence b, kv head, chunk of query rows). Rows are (token t, grouped head g) pairs,
// row = t * G + g, so each K/V block is read (or converted to the accumulator type A) once and used by
// the whole GQA group. Scores are dot products over K rows, 4 rows x 4 keys per pass (dot4x4), or for
// bf16 caches on AMX CPUs tile products (tree_attention_amx.cpp; each score its own sum, rows independent); the
// softmax is taken over each row's whole set of keys (two passes, no online rescaling) with its sums
// running key by key in order; P @ V is a register-tiled micro-kernel accumulating key by key, or with
// AMX tile products over blocks of 32 keys that every row takes from key 0 with its keys gap-free
// (attend_pv in tree_attention_amx.cpp). So a row's output depends only on the sequence of keys it
// sees: not on the rows beside it, nor on where its keys sit in the cache (a tree token and the same
// token decoded after its path agree bit for bit).
// GCC vector extensions, EAGLE_TA_VEC_BYTES-byte vectors. The sums' order (and so the bits) differs
// between the variants; within one variant every row is computed the same way whatever its block.

template <typename A>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(EAGLE_TA_VEC_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(EAGLE_TA_VEC_BYTES)));
};
template <typename A>
using Vec = typename VecOf<A>::type;
using VecI32 = int32_t __attribute__((vector_size(EAGLE_TA_VEC_BYTES)));

template <typename A>
constexpr int64_t lanes() {
  return EAGLE_TA_VEC_BYTES / sizeof(A);
}

template <typename A>
inline Vec<A> vload(const A* p) {
  Vec<A> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename A>
inline void vstore(A* p, const Vec<A>& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename A>
inline Vec<A> vsplat(A s) {
  return Vec<A>{} + s;
}

template <typename A>
inline A imin(A a, A b) {
  return a < b ? a : b;
}

template <typename A>
inline A imax(A a, A b) {
  return a > b ? a : b;
}

// a * b + c, rounded once where the instruction set has FMA. Written out because the build turns
// contraction off (-ffp-contract=off, setup.py): a compiler left to fuse `acc += x * y` by itself fused
// it in some instantiations and not in others (GCC 12 here vs another GCC on an H200 host), so a row of
// a verified block stopped matching its one-token step by an ulp. Explicit, every row's arithmetic is
// the same FMA chain whatever the compiler.
inline Vec<float> vfma(const Vec<float>& a, const Vec<float>& b, const Vec<float>& c) {
#if EAGLE_TA_VEC_BYTES == 64
  return _mm512_fmadd_ps(a, b, c);
#elif EAGLE_TA_VEC_BYTES == 32
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;  // the baseline variant (x86: SSE2, no FMA; elsewhere contraction is off too): two roundings
#endif
}

inline Vec<double> vfma(const Vec<double>& a, const Vec<double>& b, const Vec<double>& c) {
#if EAGLE_TA_VEC_BYTES == 64
  return _mm512_fmadd_pd(a, b, c);
#elif EAGLE_TA_VEC_BYTES == 32
  return _mm256_fmadd_pd(a, b, c);
#else
  return a * b + c;
#endif
}

// exp for a vector of floats: 2^n * e^r with n = round(x / ln 2), |r| <= ln(2)/2 and a degree-7 polynomial for
// e^r (Cephes' coefficients, ~1 ulp). Inputs below -87 (including -inf of masked scores) give exactly 0.
inline Vec<float> vexp(const Vec<float>& in) {
  Vec<float> x = in;
  const Vec<float> lo = vsplat(-87.0f), hi = vsplat(88.0f);
  const auto underflow = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const Vec<float> round_magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec<float> n = vfma(x, vsplat(1.44269504088896341f), round_magic) - round_magic;
  const Vec<float> r = vfma(n, vsplat(2.12194440e-4f), vfma(n, vsplat(-0.693359375f), x));
  Vec<float> p = vsplat(1.9875691500e-4f);
  p = vfma(p, r, vsplat(1.3981999507e-3f));
  p = vfma(p, r, vsplat(8.3334519073e-3f));
  p = vfma(p, r, vsplat(4.1665795894e-2f));
  p = vfma(p, r, vsplat(1.6666665459e-1f));
  p = vfma(p, r, vsplat(5.0000001201e-1f));
  p = vfma(p * r, r, r) + 1.0f;
  const VecI32 bits = (__builtin_convertvector(n, VecI32) + 127) << 23;
  const Vec<float> result = p * (Vec<float>)bits;  // same-size vector cast: reinterprets bits
  return underflow ? vsplat(0.0f) : result;
}

// float64 inputs are the reference-grade path: libm's exp per lane.
inline Vec<double> vexp(const Vec<double>& in) {
  Vec<double> x = in;
  for (int64_t i = 0; i < lanes<double>(); ++i) x[i] = __builtin_exp(x[i]);
  return x;
}

// The max of the lanes, NaN when any lane is NaN (imax alone would drop it: NaN > x is false).
template <typename A>
inline A hmax(const Vec<A>& v) {
  A m = v[0];
  for (int64_t i = 1; i < lanes<A>() && m == m; ++i) m = (v[i] != v[i]) ? v[i] : imax(m, v[i]);
  return m;
}

// Halves added until 4 lanes are left, then (b0 + b2) + (b1 + b3).
inline float hsum(const Vec<float>& v) {
  typedef float V4 __attribute__((vector_size(16)));
#if EAGLE_TA_VEC_BYTES == 64
  typedef float V8 __attribute__((vector_size(32)));
  const V8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
#elif EAGLE_TA_VEC_BYTES == 32
  const V4 b = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  const V4 b = v;
#endif
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline double hsum(const Vec<double>& v) {
#if EAGLE_TA_VEC_BYTES == 64
  typedef double V4 __attribute__((vector_size(32)));
  const V4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (a[0] + a[2]) + (a[1] + a[3]);
#elif EAGLE_TA_VEC_BYTES == 32
  return (v[0] + v[2]) + (v[1] + v[3]);
#else
  return v[0] + v[1];
#endif
}

template <typename X, typename Y>
struct same_type {
  static constexpr bool value = false;
};
template <typename X>
struct same_type<X, X> {
  static constexpr bool value = true;
};

// bf16 K/V rows can be read in place by the float32 kernels: each vector widened in registers (exact, a
// bf16 value is the high half of its float32), so the products and sums are those of the rows converted
// into scratch first, without that copy. The kernels widen a vector once per 4 query rows, so this pays
// for decoding's few rows per task (bf16 decode attention 0.74x the time on a Zen 4 core) and not for a
// tree's many (there each block is converted once; see attend_task's in_place).
template <typename S, typename A>
struct widened_in_registers {
  static constexpr bool value = same_type<S, c10::BFloat16>::value && same_type<A, float>::value;
};

constexpr int64_t kWidenedRowsMax = 4;  // see attend_task's in_place

// The element type attend_task reads K/V rows in place as: S when vload_row takes it, else A (unused).
template <typename S, typename A, bool readable>
struct RowOf {
  typedef A type;
};
template <typename S, typename A>
struct RowOf<S, A, true> {
  typedef S type;
};

// lanes<A>() elements of a K or V row (element type KS: A itself, or bf16 widened to float32) as Vec<A>.
template <typename A, typename KS>
inline Vec<A> vload_row(const KS* p) {
  if constexpr (same_type<KS, A>::value) {
    return vload(p);
  } else {
    static_assert(widened_in_registers<KS, A>::value, "K/V rows are A or bf16 widened to float32");
    typedef uint16_t Half __attribute__((vector_size(EAGLE_TA_VEC_BYTES / 2)));
    Half bits;
    __builtin_memcpy(&bits, p, sizeof(bits));
    return (Vec<A>)(__builtin_convertvector(bits, VecI32) << 16);  // zero-extended, then the high half
  }
}

// dst[j * dp + d] = X[j, d] for j < nb, converted to A; columns D..dp-1 are zero.
template <typename S, typename A>
void pack_rows(const S* x, int64_t s_pos, int64_t s_d, int64_t nb, int64_t D, int64_t dp, A* packed) {
  for (int64_t j = 0; j < nb; ++j) {
    const S* row = x + j * s_pos;
    A* dst = packed + j * dp;
    if (s_d == 1) {
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<A>(row[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<A>(row[d * s_d]);
    }
    for (int64_t d = D; d < dp; ++d) dst[d] = A(0);
  }
}

// s[r, j] = q[r, :] . k[j, :] for RM rows: one pass over each key row; hsum of the lane partials.
template <typename A, int RM, typename KS>
inline void dot_rows(const A* q, int64_t dp, const KS* k, int64_t k_stride, int64_t nb, int64_t nbp, A* s) {
  constexpr int64_t L = lanes<A>();
  for (int64_t j = 0; j < nb; ++j) {
    const KS* kr = k + j * k_stride;
    Vec<A> acc[RM] = {};
    for (int64_t d = 0; d < dp; d += L) {
      const Vec<A> kv = vload_row<A>(kr + d);
      for (int r = 0; r < RM; ++r) acc[r] = vfma(vload(q + r * dp + d), kv, acc[r]);
    }
    for (int r = 0; r < RM; ++r) s[r * nbp + j] = hsum(acc[r]);
  }
}

#if EAGLE_TA_VEC_BYTES == 64  // 16 float lanes
// Sixteen reductions in one vector: out[i] = hsum(x[i]), each summed in exactly hsum's order (halves,
// then quarters, then (b0 + b2) + (b1 + b3)), with 30 two-source shuffles instead of 16 reductions
// (a scalar hsum per score made the 4-row dot kernel bound by its shuffles and scalar adds).
inline Vec<float> hsum16(const Vec<float>* x) {
  Vec<float> y[8], z[4], w[2];
  for (int m = 0; m < 8; ++m)  // y[m] = the 8-lane halves sums of x[2m] | x[2m + 1]
    y[m] = __builtin_shufflevector(x[2 * m], x[2 * m + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(x[2 * m], x[2 * m + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  for (int n = 0; n < 4; ++n)  // z[n] = the 4-lane quarter sums b of x[4n .. 4n + 3]
    z[n] = __builtin_shufflevector(y[2 * n], y[2 * n + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(y[2 * n], y[2 * n + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                   31);
  for (int p = 0; p < 2; ++p)  // w[p] = b0 + b2 of x[8p .. 8p + 7] | b1 + b3 of the same
    w[p] = __builtin_shufflevector(z[2 * p], z[2 * p + 1], 0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29) +
           __builtin_shufflevector(z[2 * p], z[2 * p + 1], 2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
  return __builtin_shufflevector(w[0], w[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(w[0], w[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}

// s[r, j0 + c] = q[r] . k[j0 + c] for 4 rows x 4 keys, each exactly as dot_rows computes it.
template <typename KS>
inline void dot4x4(const float* q, int64_t dp, const KS* k, int64_t k_stride, int64_t nbp, float* s) {
  Vec<float> acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = Vec<float>{};
  for (int64_t d = 0; d < dp; d += 16) {
    Vec<float> kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = vload_row<float>(k + c * k_stride + d);
    for (int r = 0; r < 4; ++r) {
      const Vec<float> qv = vload(q + r * dp + d);
      for (int c = 0; c < 4; ++c) acc[r * 4 + c] = vfma(qv, kv[c], acc[r * 4 + c]);
    }
  }
  const Vec<float> out = hsum16(acc);
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) s[r * nbp + c] = out[r * 4 + c];
}
#endif

// s[R, :nb] = q[R, dp] @ k[:nb, dp]^T with k row-major. Every score is the same lane-wise FMA chain
// and hsum whatever R, nb and the task's row chunk are, so a query row's attention does not depend on
// the rows computed beside it: a verified chain of any length gives each row the values that one-token
// decoding steps give it (the linears keep that property too, see panel_linear.cpp).
template <typename A, typename KS>
void scores_by_dots(const A* q, int64_t dp, const KS* k, int64_t k_stride, int64_t nb, int64_t nbp, int64_t R,
                    A* s) {
  int64_t r0 = 0;  // rows below r0: 4 x 4 blocks (float), then the last nb % 4 keys; rows from r0: all keys
#if EAGLE_TA_VEC_BYTES == 64
  if constexpr (same_type<A, float>::value) {
    r0 = R / 4 * 4;
    const int64_t j0 = nb / 4 * 4;
    for (int64_t r = 0; r < r0; r += 4) {
      for (int64_t j = 0; j < j0; j += 4) dot4x4(q + r * dp, dp, k + j * k_stride, k_stride, nbp, s + r * nbp + j);
      if (j0 < nb) dot_rows<A, 4>(q + r * dp, dp, k + j0 * k_stride, k_stride, nb - j0, nbp, s + r * nbp + j0);
    }
  }
#endif
  for (int64_t r = r0; r < R; r += 4) {
    const A* qr = q + r * dp;
    A* sr = s + r * nbp;
    switch (imin<int64_t>(R - r, 4)) {
      case 4: dot_rows<A, 4>(qr, dp, k, k_stride, nb, nbp, sr); break;
      case 3: dot_rows<A, 3>(qr, dp, k, k_stride, nb, nbp, sr); break;
      case 2: dot_rows<A, 2>(qr, dp, k, k_stride, nb, nbp, sr); break;
      default: dot_rows<A, 1>(qr, dp, k, k_stride, nb, nbp, sr); break;
    }
  }
}

// o[r, d0 + c*L ..] += sum_{j < nb} p[r, j] * vb[j, d0 + c*L ..] for RM rows and CN vectors of dims,
// key by key. With SUM, also l[r] += p[r, 0] + p[r, 1] + ..., added one key after the other (lane 0 of a
// vector of broadcasts): the softmax's row sum, which then depends only on the sequence of keys, hides
// its add latency among the FMAs instead of running as a latency-bound loop of its own.
template <typename A, int RM, int CN, bool SUM, typename VS>
inline void pv_tile(const A* p, int64_t nbp, const VS* vb, int64_t v_stride, int64_t dp, int64_t nb, A* o,
                    int64_t d0, A* l) {
  constexpr int64_t L = lanes<A>();
  Vec<A> acc[RM][CN];
  Vec<A> sums[RM];
  for (int r = 0; r < RM; ++r) {
    for (int c = 0; c < CN; ++c) acc[r][c] = vload(o + r * dp + d0 + c * L);
    if constexpr (SUM) sums[r] = vsplat<A>(l[r]);
  }
  for (int64_t j = 0; j < nb; ++j) {
    Vec<A> vv[CN];
    for (int c = 0; c < CN; ++c) vv[c] = vload_row<A>(vb + j * v_stride + d0 + c * L);
    for (int r = 0; r < RM; ++r) {
      const Vec<A> pr = vsplat<A>(p[r * nbp + j]);
      for (int c = 0; c < CN; ++c) acc[r][c] = vfma(pr, vv[c], acc[r][c]);
      if constexpr (SUM) sums[r] += pr;
    }
  }
  for (int r = 0; r < RM; ++r) {
    for (int c = 0; c < CN; ++c) vstore(o + r * dp + d0 + c * L, acc[r][c]);
    if constexpr (SUM) l[r] = sums[r][0];
  }
}

// Dims in tiles of 4 vectors (AVX-512: 64 float32, one pass for a 64-dim head; 4 x 4 accumulators need
// the 32 zmm registers, so 2 at most with 16 registers), then 2, then 1; the first tile also sums the
// row. The tiling changes no result: each output is one FMA chain over the keys in order.
template <typename A, int RM, typename VS>
inline void pv_rows(const A* p, int64_t nbp, const VS* vb, int64_t v_stride, int64_t dp, int64_t nb, A* o, A* l) {
  constexpr int64_t L = lanes<A>();
  constexpr bool wide_tiles = EAGLE_TA_VEC_BYTES == 64;
  int64_t d0;
  if (wide_tiles && dp >= 4 * L) {
    pv_tile<A, RM, 4, true>(p, nbp, vb, v_stride, dp, nb, o, 0, l);
    d0 = 4 * L;
  } else if (dp >= 2 * L) {
    pv_tile<A, RM, 2, true>(p, nbp, vb, v_stride, dp, nb, o, 0, l);
    d0 = 2 * L;
  } else {
    pv_tile<A, RM, 1, true>(p, nbp, vb, v_stride, dp, nb, o, 0, l);
    d0 = L;
  }
  if constexpr (wide_tiles) {
    for (; d0 + 4 * L <= dp; d0 += 4 * L) pv_tile<A, RM, 4, false>(p, nbp, vb, v_stride, dp, nb, o, d0, l);
  }
  for (; d0 + 2 * L <= dp; d0 += 2 * L) pv_tile<A, RM, 2, false>(p, nbp, vb, v_stride, dp, nb, o, d0, l);
  if (d0 < dp) pv_tile<A, RM, 1, false>(p, nbp, vb, v_stride, dp, nb, o, d0, l);
}

// o[R, dp] += p[R, :nb] @ v[:nb, dp] (v rows v_stride apart), l[R] += the rows of p, key by key.
template <typename A, typename VS>
void accumulate_pv(const A* p, int64_t nbp, const VS* v, int64_t v_stride, int64_t dp, int64_t nb, int64_t R,
                   A* o, A* l) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) pv_rows<A, 4>(p + r * nbp, nbp, v, v_stride, dp, nb, o + r * dp, l + r);
  const A* pr = p + r * nbp;
  A* orow = o + r * dp;
  switch (R - r) {
    case 3: pv_rows<A, 3>(pr, nbp, v, v_stride, dp, nb, orow, l + r); break;
    case 2: pv_rows<A, 2>(pr, nbp, v, v_stride, dp, nb, orow, l + r); break;
    case 1: pv_rows<A, 1>(pr, nbp, v, v_stride, dp, nb, orow, l + r); break;
    default: break;
  }
}

// Softmax of one row's scores over all its keys, in place: s[:nkp] (masked entries -inf) becomes
// exp(s - max), or all zero when the row sees no key. A NaN score (NaN or inf in q, K or sm_scale)
// makes the max NaN, so the whole row, and the output, is NaN as in the reference: a max that skipped
// NaN left a row of only NaN scores at -inf, which read as "sees no key" and gave zeros, so a model
// with a NaN weight decoded wrong text instead of raising.
template <typename A>
inline void exp_shifted(A* s, int64_t nkp) {
  constexpr int64_t L = lanes<A>();
  Vec<A> vmax = vsplat<A>(-__builtin_inf());
  for (int64_t j = 0; j < nkp; j += L) {
    const Vec<A> x = vload(s + j);
    vmax = (x > vmax) | (x != x) ? x : vmax;  // takes a NaN x, then keeps it (x > NaN is false)
  }
  const A m = hmax<A>(vmax);
  if (m == -__builtin_inf()) {
    for (int64_t j = 0; j < nkp; ++j) s[j] = A(0);
    return;
  }
  const Vec<A> shift = vsplat<A>(m);
  for (int64_t j = 0; j < nkp; j += L) vstore(s + j, vexp(vload(s + j) - shift));
}

template <typename A>
inline A* carve(char*& cursor, int64_t count) {
  A* p = reinterpret_cast<A*>(cursor);
  cursor += ((count * static_cast<int64_t>(sizeof(A)) + 63) / 64) * 64;
  return p;
}

// The task's R query rows (unscaled, bf16) as AMX B tiles: qb[((kd * groups + g) * 16 + i) * 32 + 2n + j]
// = q[row g * 16 + n, dim kd * 32 + 2i + j]; rows past R are zero.
template <typename S>
void pack_q_tiles(const S* q_base, const Problem& P, int64_t r_begin, int64_t R, int64_t kvh, S* qb) {
  const int64_t groups = (R + 15) / 16, words = P.D / 2;  // a word: the bf16 pair of dims 2w, 2w + 1
  if (R % 16 != 0) {  // the last group's unused columns
    __builtin_memset(static_cast<void*>(qb), 0, tree_attn_amx::packed_q_elems(R, P.D) * sizeof(S));
  }
  uint32_t* qw = reinterpret_cast<uint32_t*>(qb);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = (r_begin + r) / P.G, h = kvh * P.G + (r_begin + r) % P.G;
    const S* qrow = q_base + t * P.sq_t + h * P.sq_h;
    uint32_t* col = qw + (r / 16) * 256 + r % 16;  // word (kd, i) of this row: col[(kd * groups * 16 + i) * 16]
    for (int64_t w = 0; w < words; ++w) {
      uint32_t pair;
      if (P.sq_d == 1) {
        __builtin_memcpy(&pair, qrow + 2 * w, sizeof(pair));
      } else {
        const S two[2] = {qrow[2 * w * P.sq_d], qrow[(2 * w + 1) * P.sq_d]};
        __builtin_memcpy(&pair, two, sizeof(pair));
      }
      col[((w / 16) * groups * 16 + w % 16) * 16] = pair;
    }
  }
}

// Whether x[0 .. n) are all finite, n a multiple of lanes<A>(): x - x is 0 for a finite x and NaN for
// NaN / inf, summed a vector at a time (a scalar sum is one long chain of dependent adds).
template <typename A>
inline bool all_finite(const A* x, int64_t n) {
  Vec<A> z = vsplat(A(0));
  for (int64_t i = 0; i < n; i += lanes<A>()) {
    const Vec<A> v = vload(x + i);
    z += v - v;
  }
  A sum = A(0);
  for (int64_t i = 0; i < lanes<A>(); ++i) sum += z[i];
  return sum == sum;
}

// Whether the V row at cache position pos holds a NaN or inf (read in the accumulator type: a float64
// cache's 1e300 is finite).
template <typename S, typename A>
inline bool v_row_not_finite(const S* v_head, const Problem& P, int64_t pos, int64_t D) {
  const S* row = v_head + pos * P.sv_s;
  for (int64_t d = 0; d < D; ++d) {
    if (!__builtin_isfinite(static_cast<A>(row[d * P.sv_d]))) return true;
  }
  return false;
}

// P @ V of a task again with the non-finite values of the new tokens' V rows taken as 0, when one of
// them holds any (returns whether it did; o and l are then the new sums). p: the task's probabilities
// (R rows, ld_p apart, masked keys 0), kv: scratch for one converted block. With AMX tiles
// (amx_rows != nullptr) through attend_pv again, over a cleaned copy of the head's V rows: the same
// values at the same positions, so the rows that do not see the bad token keep their bits.
template <typename S, typename A>
__attribute__((noinline)) bool redo_pv_without_non_finite_new_v(const Problem& P, const A* p, int64_t ld_p,
                                                                const S* v_head, int64_t seqlen, int64_t n_keys,
                                                                int64_t new_keys, int64_t R, A* o, A* l, A* kv,
                                                                const tree_attn_amx::PvRows* amx_rows, char* cursor) {
  const int64_t D = P.D, dp = (D + lanes<A>() - 1) / lanes<A>() * lanes<A>(), NB = kBlockN;
  bool bad = false;
  for (int64_t jj = 0; jj < new_keys && !bad; ++jj) bad = v_row_not_finite<S, A>(v_head, P, seqlen + jj, D);
  if (!bad) return false;  // the prefix (seen by every row) or q / K: as computed
  if constexpr (same_type<S, c10::BFloat16>::value) {
    if (amx_rows != nullptr) {  // rare: a heap copy of n_keys rows rather than scratch sized for it
      c10::BFloat16* clean = new c10::BFloat16[n_keys * D];
      for (int64_t j = 0; j < n_keys; ++j) {
        const c10::BFloat16* row = v_head + j * P.sv_s;
        for (int64_t d = 0; d < D; ++d) {
          const c10::BFloat16 x = row[d * P.sv_d];
          clean[j * D + d] = j >= seqlen && !__builtin_isfinite(static_cast<float>(x)) ? c10::BFloat16(0.0f) : x;
        }
      }
      tree_attn_amx::begin();
      tree_attn_amx::attend_pv(*amx_rows, p, ld_p, clean, D, 1, D, o, l, cursor);
      tree_attn_amx::end();
      delete[] clean;
      return true;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t d = 0; d < dp; ++d) o[r * dp + d] = A(0);
    l[r] = A(0);
  }
  for (int64_t n0 = 0; n0 < n_keys; n0 += NB) {
    const int64_t nb = imin(NB, n_keys - n0);
    pack_rows(v_head + n0 * P.sv_s, P.sv_s, P.sv_d, nb, D, dp, kv);
    for (int64_t j = imax(seqlen - n0, int64_t(0)); j < nb; ++j) {  // the new tokens' rows
      for (int64_t d = 0; d < D; ++d) {
        if (!__builtin_isfinite(kv[j * dp + d])) kv[j * dp + d] = A(0);
      }
    }
    accumulate_pv(p + n0, ld_p, static_cast<const A*>(kv), dp, dp, nb, R, o, l);
  }
  return true;
}

// After redo_pv_without_non_finite_new_v: the task's output rows whose token sees a new token with a
// non-finite V become NaN.
template <typename S, typename A>
__attribute__((noinline)) void mark_rows_that_see_non_finite_new_v(const Problem& P, int64_t kvh,
                                                                   int64_t r_begin, int64_t R, const S* v_head,
                                                                   int64_t seqlen, int64_t new_keys,
                                                                   const uint8_t* vis_b, S* out_base) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = (r_begin + r) / P.G, h = kvh * P.G + (r_begin + r) % P.G;
    bool sees = false;
    for (int64_t jj = 0; jj < new_keys && !sees; ++jj) {
      const bool visible = vis_b == nullptr ? jj <= t : vis_b[t * P.T + jj] != 0;
      sees = visible && v_row_not_finite<S, A>(v_head, P, seqlen + jj, P.D);
    }
    if (!sees) continue;
    S* orow = out_base + (t * P.Hq + h) * P.D;
    for (int64_t d = 0; d < P.D; ++d) orow[d] = static_cast<S>(static_cast<A>(__builtin_nan("")));
  }
}

// Pages are in no particular order, so the hardware prefetchers (which follow a stream within a 4 KB
// page) see a new stream at every block: each page's rows are requested this many rows ahead. At the
// one-token decode shape of bench/bench_paged_tree_attention.py at batch 16 (ad hoc runs, not a claim)
// 32, 64 and 128 rows were within noise of each other and 10-25% faster than one line of the next page.
constexpr int64_t kPrefetchRows = 64;

// Rows p_begin .. p_begin + n - 1 of one kv head of a sequence's paged cache (`head`: the pool's first
// element of that head; position p is slot p % page of block table_row[p / page]) into `rows`,
// contiguous [n, D], with inline fixed-size moves, one page at a time.
template <typename S>
void gather_page_rows(const S* head, const int64_t* table_row, int64_t page, int64_t s_blk, int64_t s_slot,
                      int64_t s_d, int64_t p_begin, int64_t n, int64_t D, S* rows) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(S));
  const int64_t span = (D - 1) * s_d * static_cast<int64_t>(sizeof(S)) + sizeof(S);  // bytes a row reaches
  const int64_t end = p_begin + n;
  for (int64_t p0 = p_begin; p0 < end;) {
    const int64_t first = p0 % page, in_page = imin(page - first, end - p0);  // this page's rows
    const S* block = head + table_row[p0 / page] * s_blk + first * s_slot;
    const int64_t ahead = (p0 / page + (kPrefetchRows + page - 1) / page) * page;  // a page requested now
    if (ahead < end) {
      const char* next = reinterpret_cast<const char*>(head + table_row[ahead / page] * s_blk);
      for (int64_t i = 0; i < imin(page, end - ahead); ++i)
        for (int64_t c = 0; c < span; c += 64) __builtin_prefetch(next + i * s_slot * sizeof(S) + c);
    }
    for (int64_t i = 0; i < in_page; ++i) {
      const S* src = block + i * s_slot;
      S* dst = rows + (p0 - p_begin + i) * D;
      if (s_d == 1) {
        const char* from = reinterpret_cast<const char*>(src);
        char* to = reinterpret_cast<char*>(dst);
        int64_t c = 0;
        for (; c + 64 <= bytes; c += 64) __builtin_memcpy(to + c, from + c, 64);
        for (; c + 8 <= bytes; c += 8) __builtin_memcpy(to + c, from + c, 8);
        for (; c < bytes; ++c) to[c] = from[c];
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = src[d * s_d];
      }
    }
    p0 += in_page;
  }
}

// Rows p_begin .. p_begin + n - 1 of one kv head of an 8-bit paged cache (bytes; as gather_page_rows)
// into `rows`, contiguous [n, D] of q's dtype, each row converted by `convert` with `scale`.
template <typename S>
void gather_quantized_rows(const uint8_t* head, const int64_t* table_row, int64_t page, int64_t s_blk,
                           int64_t s_slot, int64_t s_d, int64_t p_begin, int64_t n, int64_t D,
                           void (*convert)(const uint8_t*, int64_t, double, void*, int64_t), double scale, S* rows) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = p_begin + i;
    convert(head + table_row[p / page] * s_blk + p % page * s_slot, s_d, scale, rows + i * D, D);
  }
}

// A paged task's rows. Each block of kBlockN keys is gathered into `block` just before it is read, so
// the copy stays in cache and scratch needs one block per thread, not the task's whole K and V. Where
// P @ V needs every V row at once (AMX tiles, or the rare redo of a non-finite output) they are
// gathered into a heap buffer, freed with this object.
template <typename S>
struct PagedRows {
  const S* k_head;  // the pool's first element of the task's kv head
  const S* v_head;
  const int64_t* table_row;
  int64_t page, sk_blk, sk_s, sk_d, sv_blk, sv_s, sv_d, D;
  S* block;  // kBlockN rows of D (scratch)
  int64_t n_rows;  // the rows the table maps for this sequence (its committed length + T)
  S* all_v = nullptr;
  // An 8-bit cache: the pool's bytes of this kv head, the row conversion and the head's scales.
  const uint8_t* kq_head = nullptr;
  const uint8_t* vq_head = nullptr;
  void (*convert)(const uint8_t*, int64_t, double, void*, int64_t) = nullptr;
  double k_scale = 1.0, v_scale = 1.0;

  // The rows of sequence b's kv head kvh in P's pool.
  PagedRows(const Problem& P, int64_t b, int64_t kvh, S* block_rows)
      : k_head(P.kv_convert != nullptr ? nullptr : static_cast<const S*>(P.k) + kvh * P.sk_h),
        v_head(P.kv_convert != nullptr ? nullptr : static_cast<const S*>(P.v) + kvh * P.sv_h),
        table_row(P.block_table + b * P.table_cols),
        page(P.page),
        sk_blk(P.sk_b),
        sk_s(P.sk_s),
        sk_d(P.sk_d),
        sv_blk(P.sv_b),
        sv_s(P.sv_s),
        sv_d(P.sv_d),
        D(P.D),
        block(block_rows),
        n_rows(P.seqlens[b] + P.T) {
    if (P.kv_convert != nullptr) {
      kq_head = static_cast<const uint8_t*>(P.k) + kvh * P.sk_h;
      vq_head = static_cast<const uint8_t*>(P.v) + kvh * P.sv_h;
      convert = P.kv_convert;
      k_scale = P.k_scales[kvh * P.scale_stride];
      v_scale = P.v_scales[kvh * P.scale_stride];
    }
  }
  PagedRows(const PagedRows&) = delete;
  PagedRows& operator=(const PagedRows&) = delete;
  ~PagedRows() { delete[] all_v; }

  // Keys n0 .. n0 + nb - 1 of K (or V), their row stride in *stride: read in place where they lie in
  // one page with unit-stride rows (pages of kBlockN rows or a multiple), else
  // gathered into `block`.
  // An 8-bit cache's block is always converted into `block`.
  const S* k_rows(int64_t n0, int64_t nb, int64_t* stride) {
    if (convert != nullptr) return converted(kq_head, k_scale, sk_blk, sk_s, sk_d, n0, nb, stride);
    return rows(k_head, sk_blk, sk_s, sk_d, n0, nb, stride);
  }
  const S* v_rows(int64_t n0, int64_t nb, int64_t* stride) {
    if (convert != nullptr) return converted(vq_head, v_scale, sv_blk, sv_s, sv_d, n0, nb, stride);
    return rows(v_head, sv_blk, sv_s, sv_d, n0, nb, stride);
  }
  const S* converted(const uint8_t* head, double scale, int64_t s_blk, int64_t s_slot, int64_t s_d, int64_t n0,
                     int64_t nb, int64_t* stride) {
    gather_quantized_rows(head, table_row, page, s_blk, s_slot, s_d, n0, nb, D, convert, scale, block);
    *stride = D;
    return block;
  }
  // The lines of n rows `stride` apart (the next block read in place: strided rows defeat the hardware
  // prefetchers).
  void prefetch_rows(const S* first, int64_t stride, int64_t n) const {
    const int64_t span = D * static_cast<int64_t>(sizeof(S));
    const char* row = reinterpret_cast<const char*>(first);
    for (int64_t i = 0; i < n; ++i, row += stride * sizeof(S))
      for (int64_t c = 0; c < span; c += 64) __builtin_prefetch(row + c);
  }
  const S* rows(const S* head, int64_t s_blk, int64_t s_slot, int64_t s_d, int64_t n0, int64_t nb, int64_t* stride) {
    const int64_t first = n0 % page;
    if (s_d == 1 && first + nb <= page) {
      // strided rows (a head's rows between other heads': vLLM's, FlashInfer's NHD) defeat the hardware
      // prefetchers, so the next block's rows are requested now; adjacent rows (HND) stream without it
      // (requesting them too took 1.35x the time at decode-B16, ad hoc)
      const int64_t next = n0 + nb;
      if (s_slot != D && next < n_rows) {
        const int64_t count = imin(imin(nb, page - next % page), n_rows - next);
        prefetch_rows(head + table_row[next / page] * s_blk + next % page * s_slot, s_slot, count);
      }
      *stride = s_slot;
      return head + table_row[n0 / page] * s_blk + first * s_slot;
    }
    gather_page_rows(head, table_row, page, s_blk, s_slot, s_d, n0, nb, D, block);
    *stride = D;
    return block;
  }
  // Every V row 0 .. n - 1, contiguous [n, D].
  const S* every_v_row(int64_t n) {
    if (all_v == nullptr) {
      all_v = new S[n * D];
      if (convert != nullptr) {
        gather_quantized_rows(vq_head, table_row, page, sv_blk, sv_s, sv_d, int64_t(0), n, D, convert, v_scale, all_v);
      } else {
        gather_page_rows(v_head, table_row, page, sv_blk, sv_s, sv_d, int64_t(0), n, D, all_v);
      }
    }
    return all_v;
  }
};

// One task. With `pg` (a paged task) the K / V rows come through it, and `P` describes them as
// gathered (unit strides).
template <typename S, typename A>
void attend_contiguous_task(const Problem& P, int64_t task, char* scratch, PagedRows<S>* pg) {
  constexpr int64_t L = lanes<A>();
  const int64_t rows = P.T * P.G;
  const int64_t chunks = (rows + P.rows_per_task - 1) / P.rows_per_task;
  const int64_t chunk = task % chunks, kvh = (task / chunks) % P.Hkv, b = task / (chunks * P.Hkv);
  const int64_t r_begin = chunk * P.rows_per_task, R = imin(P.rows_per_task, rows - r_begin);
  const int64_t D = P.D, dp = (D + L - 1) / L * L, NB = kBlockN;

  const int64_t seqlen = P.seqlens[b];
  const int64_t t_last = (r_begin + R - 1) / P.G;
  const int64_t new_keys = P.new_visible == nullptr ? t_last + 1 : P.T;  // causal: later tokens unseen
  const int64_t n_keys = seqlen + new_keys, nkp = (n_keys + L - 1) / L * L;

  bool amx_scores = false;     // bf16 K read in place by AMX tiles (tree_attention_amx.cpp), unscaled q
  bool amx_pv = false;         // and P @ V on tiles, the probabilities rounded to bf16
  bool dpbf16_scores = false;  // bf16 K read in place by VDPBF16PS (tree_attention_dpbf16.cpp), unscaled q
  if constexpr (same_type<S, c10::BFloat16>::value) {
    amx_scores = P.amx_scores, amx_pv = P.amx_pv, dpbf16_scores = P.dpbf16_scores;
  }

  char* cursor = scratch;
  A* q = carve<A>(cursor, R * dp);
  A* kv = carve<A>(cursor, NB * dp);  // a converted K or V block
  A* o = carve<A>(cursor, (amx_pv ? (R + 15) / 16 * 16 : R) * dp);  // AMX P @ V stores 16-row tiles
  A* l = carve<A>(cursor, R);
  A* s = carve<A>(cursor, R * nkp);  // every score of the task's rows (sized by the longest row)

  const S* q_base = static_cast<const S*>(P.q) + b * P.sq_b;
  const A scale = static_cast<A>(P.sm_scale);
  for (int64_t r = 0; r < R; ++r) {
    if (!amx_scores && !dpbf16_scores) {  // scaled q rows in the accumulator type, for the dot products
      const int64_t t = (r_begin + r) / P.G, h = kvh * P.G + (r_begin + r) % P.G;
      const S* qrow = q_base + t * P.sq_t + h * P.sq_h;
      for (int64_t d = 0; d < D; ++d) q[r * dp + d] = static_cast<A>(qrow[d * P.sq_d]) * scale;
      for (int64_t d = D; d < dp; ++d) q[r * dp + d] = A(0);
    }
    if (!amx_pv) {  // (attend_pv sets o and l)
      for (int64_t d = 0; d < dp; ++d) o[r * dp + d] = A(0);
      l[r] = A(0);
    }
  }

  const S* k_head = static_cast<const S*>(P.k) + b * P.sk_b + kvh * P.sk_h;
  const S* v_head = static_cast<const S*>(P.v) + b * P.sv_b + kvh * P.sv_h;  // paged: set where needed
  const uint8_t* vis_b = P.new_visible == nullptr ? nullptr : P.new_visible + b * P.T * P.T;

  // K/V rows are used in place when they are contiguous rows of the accumulator type with no ragged
  // tail, or such bf16 rows for at most 4 query rows (widened in registers once per 4 rows: for more
  // rows, converting each block once into scratch is faster); otherwise each block is converted first.
  constexpr bool readable_in_place = same_type<S, A>::value || widened_in_registers<S, A>::value;
  const bool in_place = readable_in_place && P.sk_d == 1 && P.sv_d == 1 && D == dp &&
                        (same_type<S, A>::value || R <= kWidenedRowsMax);
  using Row = typename RowOf<S, A, readable_in_place>::type;  // a K/V element read in place

  // Two passes instead of an online softmax, so that a row's output is the same whatever positions its
  // keys occupy: a tree token sees its ancestors at the slots of the verified block, the same token
  // decoded alone sees them at consecutive positions. Pass 1 stores every score; the softmax takes the
  // max over the whole row (no rescaling at block boundaries) and sums key by key in order; pass 2
  // accumulates P @ V key by key in order. Masked keys contribute exact zeros to both sums.
  if (amx_scores) {
    if constexpr (same_type<S, c10::BFloat16>::value) {
      c10::BFloat16* qb = carve<c10::BFloat16>(cursor, tree_attn_amx::packed_q_elems(R, D));
      c10::BFloat16* tail = carve<c10::BFloat16>(cursor, 16 * D);
      pack_q_tiles(q_base, P, r_begin, R, kvh, qb);
      tree_attn_amx::begin();
      for (int64_t n0 = 0; n0 < n_keys; n0 += NB) {
        const int64_t nb = imin(NB, n_keys - n0);
        int64_t ks = P.sk_s;
        const S* k_block = pg != nullptr ? pg->k_rows(n0, nb, &ks) : k_head + n0 * P.sk_s;
        tree_attn_amx::score_block(qb, R, D, k_block, ks, nb, static_cast<float>(P.sm_scale), s + n0, nkp, tail);
      }
      if (!amx_pv) tree_attn_amx::end();  // else after P @ V
    }
  } else if (dpbf16_scores) {
    if constexpr (same_type<S, c10::BFloat16>::value) {
      c10::BFloat16* qr = carve<c10::BFloat16>(cursor, R * D);  // the task's query rows, contiguous
      uint32_t* kt = carve<uint32_t>(cursor, tree_attn_dpbf16::scratch_words(D));
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = (r_begin + r) / P.G, h = kvh * P.G + (r_begin + r) % P.G;
        const S* qrow = q_base + t * P.sq_t + h * P.sq_h;
        for (int64_t d = 0; d < D; ++d) qr[r * D + d] = qrow[d * P.sq_d];
      }
      for (int64_t n0 = 0; n0 < n_keys; n0 += NB) {
        const int64_t nb = imin(NB, n_keys - n0);
        int64_t ks = P.sk_s;
        const S* k_block = pg != nullptr ? pg->k_rows(n0, nb, &ks) : k_head + n0 * P.sk_s;
        tree_attn_dpbf16::score_block(qr, R, D, k_block, ks, nb, static_cast<float>(P.sm_scale), s + n0, nkp,
                                      kt);
      }
    }
  } else {
    for (int64_t n0 = 0; n0 < n_keys; n0 += NB) {
      const int64_t nb = imin(NB, n_keys - n0);
      int64_t ks = P.sk_s;
      const S* k_block = pg != nullptr ? pg->k_rows(n0, nb, &ks) : k_head + n0 * P.sk_s;
      if (in_place) {
        scores_by_dots(q, dp, reinterpret_cast<const Row*>(k_block), ks, nb, nkp, R, s + n0);
      } else {
        pack_rows(k_block, ks, P.sk_d, nb, D, dp, kv);
        scores_by_dots(q, dp, kv, dp, nb, nkp, R, s + n0);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    A* sr = s + r * nkp;
    const int64_t t = (r_begin + r) / P.G;
    for (int64_t jj = 0; jj < new_keys; ++jj) {  // the new tokens' keys, at seqlen + jj
      const bool visible = vis_b == nullptr ? jj <= t : vis_b[t * P.T + jj] != 0;
      if (!visible) sr[seqlen + jj] = -__builtin_inf();
    }
    for (int64_t j = n_keys; j < nkp; ++j) sr[j] = -__builtin_inf();
    exp_shifted(sr, nkp);
  }
  const tree_attn_amx::PvRows amx_rows{R, r_begin, P.G, P.T, seqlen, n_keys, vis_b};
  if (amx_pv) {
    if constexpr (same_type<S, c10::BFloat16>::value) {
      if (pg != nullptr) v_head = pg->every_v_row(n_keys);
      tree_attn_amx::attend_pv(amx_rows, s, nkp, v_head, P.sv_s, P.sv_d, D, o, l, cursor);
      tree_attn_amx::end();
    }
  } else {
    for (int64_t n0 = 0; n0 < n_keys; n0 += NB) {
      const int64_t nb = imin(NB, n_keys - n0);
      int64_t vs = P.sv_s;
      const S* v_block = pg != nullptr ? pg->v_rows(n0, nb, &vs) : v_head + n0 * P.sv_s;
      if (in_place) {
        accumulate_pv(s + n0, nkp, reinterpret_cast<const Row*>(v_block), vs, dp, nb, R, o, l);
      } else {
        pack_rows(v_block, vs, P.sv_d, nb, D, dp, kv);
        accumulate_pv(s + n0, nkp, static_cast<const A*>(kv), dp, dp, nb, R, o, l);
      }
    }
  }
  // A NaN / inf in a new token's V must reach only the rows that see that token, but above a masked
  // key's p = 0 times NaN reaches every row that shares its block (a rejected draft token whose V
  // overflowed float16 turned the whole verified tree NaN). So when an output is not finite and a new
  // token's V is the cause (rare), P @ V is redone over the finite values (FMAs, also where AMX tiles
  // took it) and the rows that see a non-finite one come out NaN, as in the reference. Out of line,
  // so that this function's code (and its P @ V's) stays as it was.
  bool redone = false;
  if (!all_finite(o, R * dp)) {
    if (pg != nullptr) v_head = pg->every_v_row(n_keys);
    redone = redo_pv_without_non_finite_new_v<S, A>(P, s, nkp, v_head, seqlen, n_keys, new_keys, R, o, l, kv,
                                                   amx_pv ? &amx_rows : nullptr, cursor);
  }

  S* out_base = static_cast<S*>(P.out) + b * P.T * P.Hq * D;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = (r_begin + r) / P.G, h = kvh * P.G + (r_begin + r) % P.G;
    S* orow = out_base + (t * P.Hq + h) * D;
    // a row that saw no key gets zeros; a NaN sum stays NaN
    const A inv = l[r] > A(0) ? A(1) / l[r] : l[r] == A(0) ? A(0) : l[r];
    for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<S>(o[r * dp + d] * inv);
  }
  if (redone) mark_rows_that_see_non_finite_new_v<S, A>(P, kvh, r_begin, R, v_head, seqlen, new_keys, vis_b, out_base);
}

// One task of either layout. A paged task reads its rows through PagedRows, and the contiguous code runs
// on them as on a [1, 1, n, D] cache: the same code, so the same bits, as the contiguous op.
template <typename S, typename A>
void attend_task(const Problem& P, int64_t task, char* scratch) {
  if (P.block_table == nullptr) return attend_contiguous_task<S, A>(P, task, scratch, nullptr);
  const int64_t chunks = (P.T * P.G + P.rows_per_task - 1) / P.rows_per_task;
  const int64_t kvh = (task / chunks) % P.Hkv, b = task / (chunks * P.Hkv);
  char* cursor = scratch;
  PagedRows<S> pg(P, b, kvh, carve<S>(cursor, kBlockN * P.D));
  Problem one = P;
  one.block_table = nullptr;
  one.k = one.v = nullptr;  // rows only through pg
  one.sk_b = one.sv_b = one.sk_h = one.sv_h = 0;
  one.sk_s = one.sv_s = P.D;
  one.sk_d = one.sv_d = 1;
  attend_contiguous_task<S, A>(one, task, cursor, &pg);
}

template <typename S, typename A>
void attend_tasks(const Problem& P, int64_t begin, int64_t end, char* scratch) {
  for (int64_t task = begin; task < end; ++task) attend_task<S, A>(P, task, scratch);
}

void run_f32(const Problem& P, int64_t begin, int64_t end, char* scratch) {
  attend_tasks<float, float>(P, begin, end, scratch);
}
void run_f64(const Problem& P, int64_t begin, int64_t end, char* scratch) {
  attend_tasks<double, double>(P, begin, end, scratch);
}
void run_f16(const Problem& P, int64_t begin, int64_t end, char* scratch) {
  attend_tasks<c10::Half, float>(P, begin, end, scratch);
}
void run_bf16(const Problem& P, int64_t begin, int64_t end, char* scratch) {
  attend_tasks<c10::BFloat16, float>(P, begin, end, scratch);
}
