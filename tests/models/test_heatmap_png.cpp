// PNG alignment heatmaps: the checksums against published values, the encoder read back by an
// independent minimal PNG reader written here (chunk CRCs, stored deflate blocks, Adler-32,
// scanlines), the heatmap's cells and labels, images needing many stored blocks, Python's zlib
// accepting the stream (when python3 is installed), and write_heatmap's choice of format.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <vector>

#include "seq2seq/decoding/heatmap.h"
#include "seq2seq/decoding/png.h"
#include "support/test_support.h"

namespace {

namespace s2s = attn::seq2seq;
namespace png = attn::seq2seq::png;
namespace fs = std::filesystem;

std::vector<uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }

// ---------------------------------------------------------------------------------------------
// An independent reader: bit-at-a-time checksums, no tables, nothing shared with png.cpp.

uint32_t bitwise_crc32(const uint8_t* p, std::size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

uint32_t plain_adler32(const std::vector<uint8_t>& data) {
  uint32_t a = 1, b = 0;
  for (uint8_t x : data) {
    a = (a + x) % 65521;
    b = (b + a) % 65521;
  }
  return (b << 16) | a;
}

uint32_t read_be32(const std::vector<uint8_t>& d, std::size_t at) {
  if (at + 4 > d.size()) throw std::runtime_error("truncated at byte " + std::to_string(at));
  return (uint32_t{d[at]} << 24) | (uint32_t{d[at + 1]} << 16) | (uint32_t{d[at + 2]} << 8) | d[at + 3];
}

struct DecodedPng {
  uint32_t width = 0, height = 0;
  std::vector<std::string> chunk_types;
  std::vector<uint8_t> zlib;     // the IDAT payload
  std::vector<uint8_t> raw;      // inflated scanlines, filter bytes included
  int64_t stored_blocks = 0;
  std::vector<uint8_t> rgb;      // width * height * 3

  png::Rgb at(int64_t x, int64_t y) const {
    const std::size_t i = static_cast<std::size_t>((y * width + x) * 3);
    return {rgb[i], rgb[i + 1], rgb[i + 2]};
  }
};

// Throws std::runtime_error naming what is wrong.
DecodedPng read_png(const std::vector<uint8_t>& file) {
  const std::vector<uint8_t> signature = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (file.size() < 8 || !std::equal(signature.begin(), signature.end(), file.begin()))
    throw std::runtime_error("no PNG signature");
  DecodedPng png;
  std::size_t at = 8;
  while (at < file.size()) {
    const uint32_t len = read_be32(file, at);
    if (at + 12 + len > file.size()) throw std::runtime_error("chunk runs past the end");
    const std::string type(file.begin() + at + 4, file.begin() + at + 8);
    const uint32_t crc = read_be32(file, at + 8 + len);
    if (crc != bitwise_crc32(file.data() + at + 4, len + 4)) throw std::runtime_error("bad CRC on " + type);
    const auto data = file.begin() + at + 8;
    png.chunk_types.push_back(type);
    if (type == "IHDR") {
      const std::vector<uint8_t> h(data, data + len);
      if (len != 13) throw std::runtime_error("IHDR length");
      png.width = read_be32(h, 0);
      png.height = read_be32(h, 4);
      if (h[8] != 8 || h[9] != 2 || h[10] != 0 || h[11] != 0 || h[12] != 0)
        throw std::runtime_error("not 8-bit RGB, deflate, filter 0, non-interlaced");
    } else if (type == "IDAT") {
      png.zlib.insert(png.zlib.end(), data, data + len);
    }
    at += 12 + len;
  }
  if (png.chunk_types.empty() || png.chunk_types.front() != "IHDR" || png.chunk_types.back() != "IEND")
    throw std::runtime_error("chunks must start with IHDR and end with IEND");
  // zlib header, then stored deflate blocks only (BTYPE 00), then Adler-32.
  const std::vector<uint8_t>& z = png.zlib;
  if (z.size() < 6 || (z[0] & 0x0F) != 8 || ((z[0] << 8) | z[1]) % 31 != 0 || (z[1] & 0x20))
    throw std::runtime_error("bad zlib header");
  std::size_t p = 2;
  for (bool final_block = false; !final_block;) {
    if (p + 5 > z.size()) throw std::runtime_error("truncated deflate block header");
    final_block = z[p] & 1;
    if (((z[p] >> 1) & 3) != 0) throw std::runtime_error("a block that is not stored");
    const uint32_t len = z[p + 1] | (z[p + 2] << 8), nlen = z[p + 3] | (z[p + 4] << 8);
    if ((len ^ 0xFFFFu) != nlen) throw std::runtime_error("NLEN is not the complement of LEN");
    if (p + 5 + len > z.size()) throw std::runtime_error("stored block runs past the stream");
    png.raw.insert(png.raw.end(), z.begin() + p + 5, z.begin() + p + 5 + len);
    p += 5 + len;
    ++png.stored_blocks;
  }
  if (p + 4 != z.size()) throw std::runtime_error("bytes after the Adler-32 trailer");
  if (read_be32(z, p) != plain_adler32(png.raw)) throw std::runtime_error("bad Adler-32");
  const std::size_t row = std::size_t{png.width} * 3 + 1;
  if (png.raw.size() != row * png.height) throw std::runtime_error("wrong amount of pixel data");
  for (uint32_t y = 0; y < png.height; ++y) {
    if (png.raw[y * row] != 0) throw std::runtime_error("a scanline filter other than None");
    png.rgb.insert(png.rgb.end(), png.raw.begin() + y * row + 1, png.raw.begin() + (y + 1) * row);
  }
  return png;
}

std::string rgb_str(png::Rgb c) {
  return "(" + std::to_string(c.r) + ", " + std::to_string(c.g) + ", " + std::to_string(c.b) + ")";
}

bool is_white(png::Rgb c) { return c == png::Rgb{255, 255, 255}; }

// Non-white pixels in a rectangle: where label glyphs were drawn.
int64_t ink_in(const DecodedPng& img, int64_t x0, int64_t y0, int64_t x1, int64_t y1) {
  int64_t n = 0;
  for (int64_t y = std::max<int64_t>(y0, 0); y < std::min<int64_t>(y1, img.height); ++y)
    for (int64_t x = std::max<int64_t>(x0, 0); x < std::min<int64_t>(x1, img.width); ++x)
      n += !is_white(img.at(x, y));
  return n;
}

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("attn_test_png_" + name + "_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::vector<uint8_t> read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// ---------------------------------------------------------------------------------------------

TEST(PngChecksums, MatchPublishedValues) {
  // The CRC-32 "check" value of the catalogue of CRC parameters, and Wikipedia's Adler-32
  // example.
  EXPECT_EQ(png::crc32(bytes_of("123456789")), 0xCBF43926u);
  EXPECT_EQ(png::adler32(bytes_of("Wikipedia")), 0x11E60398u);
  EXPECT_EQ(png::crc32({}), 0u);
  EXPECT_EQ(png::adler32({}), 1u);
  // The CRC of PNG's IEND chunk type (every PNG file ends with these four bytes).
  EXPECT_EQ(png::crc32(bytes_of("IEND")), 0xAE426082u);
  // Continuing a checksum equals checksumming the concatenation, across Adler's 5552-byte
  // modulo blocks too.
  std::vector<uint8_t> big(20000);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<uint8_t>(255 - i % 7);
  const std::span<const uint8_t> all(big);
  EXPECT_EQ(png::crc32(all.subspan(7000), png::crc32(all.first(7000))), png::crc32(all));
  EXPECT_EQ(png::adler32(all.subspan(7000), png::adler32(all.first(7000))), png::adler32(all));
  EXPECT_EQ(png::adler32(all), plain_adler32(big));
  EXPECT_EQ(png::crc32(all), bitwise_crc32(big.data(), big.size()));
}

TEST(PngEncoder, RoundTripsThroughAnIndependentReader) {
  png::RgbImage image(5, 3, {10, 20, 30});
  image.set(4, 2, {200, 100, 0});
  image.fill_rect(-2, -2, 3, 3, {1, 2, 3});  // clipped to pixel (0, 0)
  const DecodedPng d = read_png(png::encode_png(image));
  EXPECT_EQ(d.width, 5u);
  EXPECT_EQ(d.height, 3u);
  EXPECT_EQ((d.chunk_types), (std::vector<std::string>{"IHDR", "IDAT", "IEND"}));
  EXPECT_EQ(d.stored_blocks, 1);
  EXPECT_EQ(d.rgb, image.pixels());
  EXPECT_EQ(d.at(4, 2), (png::Rgb{200, 100, 0}));
  EXPECT_EQ(d.at(0, 0), (png::Rgb{1, 2, 3}));
  EXPECT_EQ(d.at(1, 1), (png::Rgb{10, 20, 30}));
  attn::testing::expect_error([] { png::RgbImage(0, 4, {}); }, {"[png]", "0 x 4"});
  attn::testing::expect_error([&] { image.at(5, 0); }, {"[png]", "(5, 0)", "5 x 3"});
}

// 3000 x 100 pixels are 900,100 bytes of scanlines: 14 stored blocks, 13 full ones of 65535
// bytes and the final one.
TEST(PngEncoder, LargeImagesSpanSeveralStoredBlocks) {
  png::RgbImage image(3000, 100, {0, 0, 0});
  for (int64_t y = 0; y < 100; ++y)
    for (int64_t x = 0; x < 3000; ++x)
      image.set(x, y, {static_cast<uint8_t>(x), static_cast<uint8_t>(y), static_cast<uint8_t>(x ^ y)});
  const DecodedPng d = read_png(png::encode_png(image));
  const std::size_t raw = (3000 * 3 + 1) * 100;
  EXPECT_EQ(d.raw.size(), raw);
  EXPECT_EQ(d.stored_blocks, static_cast<int64_t>((raw + 65534) / 65535));
  EXPECT_EQ(d.stored_blocks, 14);
  EXPECT_EQ(d.rgb, image.pixels());
}

// zlib (Python's, which wraps the reference implementation) inflates the IDAT stream to the
// scanlines: the stream is valid for a decoder we did not write.
TEST(PngEncoder, PythonZlibAcceptsTheStream) {
  if (std::system("python3 -c 'import zlib' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 with zlib not found: skipping the cross-check";
  png::RgbImage image(700, 40, {255, 255, 255});  // 84,040 bytes: two stored blocks
  for (int64_t x = 0; x < 700; ++x) image.fill_rect(x, x % 40, 1, 3, {static_cast<uint8_t>(x), 0, 90});
  const DecodedPng d = read_png(png::encode_png(image));
  ASSERT_EQ(d.stored_blocks, 2);
  const fs::path dir = temp_dir("python");
  std::ofstream(dir / "stream.z", std::ios::binary).write(reinterpret_cast<const char*>(d.zlib.data()), d.zlib.size());
  std::ofstream(dir / "raw.bin", std::ios::binary).write(reinterpret_cast<const char*>(d.raw.data()), d.raw.size());
  const std::string cmd = "python3 -c \"import sys, zlib; z = open(sys.argv[1], 'rb').read(); "
                          "r = open(sys.argv[2], 'rb').read(); sys.exit(0 if zlib.decompress(z) == r else 3)\" '" +
                          (dir / "stream.z").string() + "' '" + (dir / "raw.bin").string() + "'";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  fs::remove_all(dir);
}

TEST(PngFont, GlyphsForAccentsLigaturesAndUnknownCharacters) {
  EXPECT_EQ(png::glyph_count("chat"), 4);
  EXPECT_EQ(png::glyph_count("\xC3\xA9t\xC3\xA9"), 3);  // "été": one glyph per letter
  EXPECT_EQ(png::glyph_count("\xC5\x93uf"), 4);         // "œuf" is drawn "oeuf"
  EXPECT_EQ(png::glyph_count("\xE2\x82\xAC"), 1);       // "€": a box
  EXPECT_EQ(png::glyph_count("a\xFF"), 2);              // an invalid byte: a box
  EXPECT_EQ(png::text_length("abc", 2), 3 * png::glyph_advance * 2);
  // 'é' is 'e' with two accent rows above it; 'è' differs from 'é' only there.
  auto draw = [](const std::string& s) {
    png::RgbImage img(png::glyph_width, png::glyph_height, {255, 255, 255});
    png::draw_text(img, 0, 0, s, {});
    return img;
  };
  const png::RgbImage e = draw("e"), e_acute = draw("\xC3\xA9"), e_grave = draw("\xC3\xA8"),
                      box = draw("\xE2\x82\xAC");
  int64_t accent_ink = 0, differ_below = 0, acute_vs_grave_above = 0, box_ink = 0;
  for (int64_t y = 0; y < png::glyph_height; ++y)
    for (int64_t x = 0; x < png::glyph_width; ++x) {
      if (y < 2) {
        accent_ink += !is_white(e_acute.at(x, y));
        acute_vs_grave_above += !(e_acute.at(x, y) == e_grave.at(x, y));
        EXPECT_TRUE(is_white(e.at(x, y)));
      } else {
        differ_below += !(e.at(x, y) == e_acute.at(x, y));
      }
      box_ink += !is_white(box.at(x, y));
    }
  EXPECT_GT(accent_ink, 0);
  EXPECT_GT(acute_vs_grave_above, 0);
  EXPECT_EQ(differ_below, 0);
  EXPECT_EQ(box_ink, 5 + 5 * 2 + 5);  // the 5 x 7 outline: top, two sides of 5 rows, bottom
}

TEST(PngHeatmap, CellsAreShadedAndWordsAreDrawnOnTheAxes) {
  const s2s::Tokens source = {"the", "black", "cat", "<eos>"};
  const s2s::Tokens target = {"le", "chat", "noir", "<eos>"};
  // A permutation: weight 1 on one cell per row, 0 elsewhere.
  const s2s::Alignment weights = {{1, 0, 0, 0}, {0, 0, 1, 0}, {0, 1, 0, 0}, {0, 0, 0, 1}};
  const int64_t column_of[4] = {0, 2, 1, 3};
  const s2s::PngHeatmapLayout l = s2s::png_heatmap_layout(source, target);
  const DecodedPng d = read_png(s2s::png_heatmap(source, target, weights));
  ASSERT_EQ(d.width, static_cast<uint32_t>(l.width));
  ASSERT_EQ(d.height, static_cast<uint32_t>(l.height));
  EXPECT_EQ(l.width, l.left + 4 * l.cell + 10);
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t cx = l.left + j * l.cell + l.cell / 2, cy = l.top + i * l.cell + l.cell / 2;
      const png::Rgb c = d.at(cx, cy);
      if (j == column_of[i])
        EXPECT_EQ(c, (png::Rgb{8, 48, 107})) << "cell " << i << ", " << j << ": " << rgb_str(c);
      else
        EXPECT_TRUE(is_white(c)) << "cell " << i << ", " << j << ": " << rgb_str(c);
    }
  // Each target word has ink left of its row, each source word above its column, and the
  // margins stay blank.
  for (int64_t i = 0; i < 4; ++i)
    EXPECT_GT(ink_in(d, 0, l.top + i * l.cell, l.left, l.top + (i + 1) * l.cell), 10) << target[i];
  for (int64_t j = 0; j < 4; ++j)
    EXPECT_GT(ink_in(d, l.left + j * l.cell, 0, l.left + (j + 1) * l.cell, l.top), 10) << source[j];
  EXPECT_EQ(ink_in(d, 0, 0, l.left, l.top), 0);                  // top-left corner
  EXPECT_EQ(ink_in(d, 0, d.height - 5, d.width, d.height), 0);   // bottom margin
  // A longer word widens the left margin by its glyphs.
  const s2s::PngHeatmapLayout narrow = s2s::png_heatmap_layout(source, {"le", "chat"});
  const s2s::PngHeatmapLayout wider = s2s::png_heatmap_layout(source, {"le", "chatons"});
  EXPECT_EQ(wider.left - narrow.left, png::text_length("chatons", 2) - png::text_length("chat", 2));
  // Mid weights are in between, and the shape is checked like the other heatmaps'.
  const DecodedPng half = read_png(s2s::png_heatmap({"a"}, {"b"}, {{0.5}}));
  const s2s::PngHeatmapLayout hl = s2s::png_heatmap_layout({"a"}, {"b"});
  const png::Rgb mid = half.at(hl.left + hl.cell / 2, hl.top + hl.cell / 2);
  EXPECT_TRUE(mid.r > 8 && mid.r < 255 && mid.b > 107 && mid.b < 255) << rgb_str(mid);
  EXPECT_THROW(s2s::png_heatmap(source, {"le", "chat", "noir", "<eos>", "x"}, weights), attn::Error);
}

TEST(PngHeatmap, WriteHeatmapChoosesTheFormatByExtension) {
  const fs::path dir = temp_dir("write");
  const s2s::Tokens source = {"Marie", "sees", "it"}, target = {"Marie", "le", "voit", "\xC3\xA7\xC3\xA0"};
  const s2s::Alignment weights = {{0.9, 0.05, 0.05}, {0, 0.2, 0.8}, {0.1, 0.8, 0.1}, {0.3, 0.3, 0.4}};
  s2s::write_heatmap((dir / "a.png").string(), source, target, weights);
  s2s::write_heatmap((dir / "b.PNG").string(), source, target, weights);
  s2s::write_heatmap((dir / "c.svg").string(), source, target, weights);
  const std::vector<uint8_t> a = read_file(dir / "a.png");
  EXPECT_EQ(a, s2s::png_heatmap(source, target, weights));
  EXPECT_EQ(read_file(dir / "b.PNG"), a);
  const DecodedPng d = read_png(a);
  EXPECT_EQ(d.width, static_cast<uint32_t>(s2s::png_heatmap_layout(source, target).width));
  const std::vector<uint8_t> svg = read_file(dir / "c.svg");
  EXPECT_EQ(std::string(svg.begin(), svg.end()), s2s::svg_heatmap(source, target, weights));
  for (const std::string bad : {"out.jpg", "out", "out.png.txt"}) {
    const std::string path = (dir / bad).string();
    attn::testing::expect_error([&] { s2s::write_heatmap(path, source, target, weights); },
                                {"[heatmap]", path, ".svg or .png"});
    EXPECT_FALSE(fs::exists(path)) << path;
  }
  // A directory that does not exist: the atomic writer names the path.
  const std::string missing = (dir / "no_such_dir" / "x.png").string();
  EXPECT_THROW(s2s::write_heatmap(missing, source, target, weights), attn::Error);
  fs::remove_all(dir);
}

}  // namespace
