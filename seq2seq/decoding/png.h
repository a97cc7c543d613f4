// A minimal PNG writer and a built-in bitmap font, enough for alignment heatmaps with labels and
// no image library.
//
// PNG (ISO/IEC 15948): 8-bit RGB (colour type 2), no interlace, every scanline with filter 0
// (None). The pixel data is a zlib stream (RFC 1950: header 0x78 0x01, Adler-32 trailer) of
// stored, i.e. uncompressed, deflate blocks (RFC 1951 section 3.2.4) of at most 65535 bytes
// each. A heatmap of a few hundred pixels a side is a few hundred KiB this way; compression
// would save space but needs a real deflate encoder, and these files are viewed, not shipped.
//
// Font: 5 x 9 pixel glyphs (rows 0-6 above the baseline, 7-8 for descenders) designed for this
// project, one per printable ASCII character (0x20-0x7E), drawn at an integer scale with one
// blank column between glyphs. Other characters:
//   - Latin-1 letters with a diacritic (e acute, e grave, c cedilla, a grave, e/i/o/u
//     circumflex, u grave, e/i diaeresis, n tilde, ... U+00C0-U+00FF and U+0178) are drawn as
//     their base letter with the accent as two pixel rows above it (lowercase) or, for
//     capitals, which fill the glyph's top rows, as the bare base letter; the cedilla is drawn
//     below the baseline for both.
//   - ligatures and sharp s are spelt out: oe / OE (U+0153 / U+0152), ae / AE, ss.
//   - anything else, and bytes that are not valid UTF-8, are drawn as a hollow box, one per
//     code point (or invalid byte).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace attn::seq2seq::png {

// CRC-32 of ISO 3309 / ITU-T V.42 (reflected polynomial 0xEDB88320, as PNG chunks and zlib's
// crc32 use). `crc` continues a previous call's result: crc32(b, crc32(a)) == crc32(a + b).
uint32_t crc32(std::span<const uint8_t> bytes, uint32_t crc = 0);

// Adler-32 of RFC 1950 (the zlib stream's trailer); `adler` continues a previous result, 1 to
// start.
uint32_t adler32(std::span<const uint8_t> bytes, uint32_t adler = 1);

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};

// Row-major 8-bit RGB pixels. Writes outside the image are clipped (labels may overhang).
class RgbImage {
 public:
  // Throws attn::Error "[png] ..." unless 1 <= width, height <= max_side.
  RgbImage(int64_t width, int64_t height, Rgb background);
  static constexpr int64_t max_side = 1 << 15;

  int64_t width() const { return width_; }
  int64_t height() const { return height_; }
  Rgb at(int64_t x, int64_t y) const;  // throws when outside
  void set(int64_t x, int64_t y, Rgb colour);
  void fill_rect(int64_t x, int64_t y, int64_t w, int64_t h, Rgb colour);
  const std::vector<uint8_t>& pixels() const { return pixels_; }  // width * height * 3 bytes

 private:
  int64_t width_ = 0, height_ = 0;
  std::vector<uint8_t> pixels_;
};

// The whole PNG file: signature, IHDR, one IDAT, IEND.
std::vector<uint8_t> encode_png(const RgbImage& image);

// Font metrics in pixels at scale 1.
constexpr int glyph_width = 5;
constexpr int glyph_height = 9;   // including the descender rows
constexpr int glyph_advance = 6;  // glyph plus one blank column

enum class TextDirection {
  left_to_right,  // (x, y) is the top-left corner of the first glyph
  bottom_to_top,  // rotated 90 degrees counter-clockwise: (x, y) is the bottom-left corner of
                  // the first glyph, the text runs upwards, glyph tops face left
};

struct TextStyle {
  int scale = 1;  // each font pixel becomes scale x scale image pixels
  Rgb colour{0, 0, 0};
  TextDirection direction = TextDirection::left_to_right;
};

// Number of glyphs `text` draws as (a ligature counts two, an invalid byte one).
int64_t glyph_count(std::string_view text);
// Length along the text direction in pixels: glyph_count * glyph_advance * scale.
int64_t text_length(std::string_view text, int scale);
void draw_text(RgbImage& image, int64_t x, int64_t y, std::string_view text, const TextStyle& style);

}  // namespace attn::seq2seq::png
