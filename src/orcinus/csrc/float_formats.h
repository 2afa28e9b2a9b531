/* Conversions between float32 and the 16-bit formats torch stores (bfloat16, IEEE half), shared
 * by every C kernel of orcinus: attention/paged_attention.c, layers/quant_kernels.c and
 * layers/decode_layers.c include it (attention/native.py builds them with this folder on the include
 * path and its headers in each build's cache key). Rounding to 16 bits is to nearest even, as
 * torch's own conversion, so a pool written here equals one written by torch, bit for bit. */
#ifndef ORCINUS_FLOAT_FORMATS_H
#define ORCINUS_FLOAT_FORMATS_H
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even, as torch does */
    return (uint16_t)(bits >> 16);
}

/* IEEE half to float, exactly (normal, subnormal, zero, infinity, NaN). */
static inline float f16_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#endif
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112u) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else {  /* subnormal: normalise */
        int e = -1;
        uint32_t m = man;
        do { e++; m <<= 1; } while (!(m & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* float to IEEE half, rounded to nearest even (infinity past the largest half, NaN kept). */
static inline uint16_t f32_to_f16(float f) {
    const uint32_t denorm_magic = ((127 - 15) + (23 - 10) + 1) << 23;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint16_t o;
    if (u >= (uint32_t)(127 + 16) << 23) o = u > 0x7f800000u ? 0x7e00 : 0x7c00;
    else if (u < (uint32_t)113 << 23) {  /* a half subnormal or zero: let float addition round it */
        float x, m;
        memcpy(&x, &u, sizeof x);
        memcpy(&m, &denorm_magic, sizeof m);
        x += m;
        memcpy(&u, &x, sizeof u);
        o = (uint16_t)(u - denorm_magic);
    } else {
        const uint32_t odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

#endif
