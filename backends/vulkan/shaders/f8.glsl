// e4m3 / e4m3fnuz bytes to f16, exactly, with int8 and f16 arithmetic
// (needs GL_EXT_shader_explicit_arithmetic_types_int8 and _float16): the
// exponent and mantissa fields are taken apart as uint8_t, the magnitude is
// the integer significand (< 16) times a power of two, both exact in f16
// (e4m3 spans 2^-9 .. 448, e4m3fnuz 2^-10 .. 240; f16 holds both). f16
// products of two decoded values are NOT formed: e4m3 · e4m3 can exceed
// f16's range, so callers multiply in f32 (exact: 11 + 11 bits < 24).
float16_t e4m3_to_f16(uint8_t c, bool fnuz) {
    uint8_t mag = c & uint8_t(0x7f);
    bool neg = (c & uint8_t(0x80)) != uint8_t(0);
    if (fnuz ? c == uint8_t(0x80) : mag == uint8_t(0x7f)) return float16_t(f32_nan());
    uint8_t ef = mag >> uint8_t(3);
    uint8_t m = mag & uint8_t(7);
    // Significand as an integer and the exponent of its unit: normal
    // (8 + m) · 2^(ef - bias - 3), subnormal m · 2^(1 - bias - 3).
    uint8_t sig = ef == uint8_t(0) ? m : (m | uint8_t(8));
    int e = int(ef == uint8_t(0) ? uint8_t(1) : ef) - (fnuz ? 11 : 10);
    float16_t v = float16_t(sig) * float16_t(uintBitsToFloat(uint(e + 127) << 23u));
    return neg ? -v : v;
}
