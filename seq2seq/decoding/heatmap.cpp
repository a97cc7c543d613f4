#include "seq2seq/decoding/heatmap.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <span>
#include <sstream>

#include "attn/error.h"
#include "seq2seq/decoding/png.h"
#include "seq2seq/training/safetensors.h"

namespace attn::seq2seq {
namespace {

void check_shape(const Tokens& source, const Tokens& target, const Alignment& weights) {
  ATTN_CHECK(weights.size() >= target.size(), "heatmap", target.size(), " target words but ",
             weights.size(), " rows of weights");
  for (std::size_t i = 0; i < target.size(); ++i)
    ATTN_CHECK(weights[i].size() >= source.size(), "heatmap", source.size(),
               " source words but row ", i, " has ", weights[i].size(), " weights");
}

// UTF-8 code points of a word, one string each (display width 1 per code point is good enough
// for the Latin scripts of the corpus).
std::vector<std::string> code_points(const std::string& word) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < word.size();) {
    const unsigned char c = static_cast<unsigned char>(word[i]);
    const std::size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    out.push_back(word.substr(i, n));
    i += n;
  }
  return out;
}

const char* shade(double w) {
  if (w < 0.1) return "  ";
  if (w < 0.3) return "░░";
  if (w < 0.5) return "▒▒";
  if (w < 0.7) return "▓▓";
  return "██";
}

// White to dark blue (8, 48, 107), linear in the weight (clamped to [0, 1]); SVG and PNG agree.
png::Rgb heat_colour(double weight) {
  const double w = std::clamp(weight, 0.0, 1.0);
  auto channel = [w](int dark) { return static_cast<uint8_t>(255 - w * (255 - dark)); };
  return {channel(8), channel(48), channel(107)};
}

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

}  // namespace

std::string terminal_heatmap(const Tokens& source, const Tokens& target, const Alignment& weights) {
  check_shape(source, target, weights);
  std::size_t label_width = 0;
  for (const std::string& w : target) label_width = std::max(label_width, code_points(w).size());
  std::vector<std::vector<std::string>> columns;
  std::size_t header_height = 0;
  for (const std::string& w : source) {
    columns.push_back(code_points(w));
    header_height = std::max(header_height, columns.back().size());
  }
  std::ostringstream out;
  const std::string indent(label_width + 2, ' ');
  for (std::size_t r = 0; r < header_height; ++r) {
    out << indent;
    for (const auto& col : columns) out << (r < col.size() ? col[r] : " ") << "  ";
    out << '\n';
  }
  for (std::size_t i = 0; i < target.size(); ++i) {
    const std::size_t pad = label_width - code_points(target[i]).size();
    out << std::string(pad, ' ') << target[i] << "  ";
    for (std::size_t j = 0; j < source.size(); ++j) out << shade(weights[i][j]) << ' ';
    out << '\n';
  }
  return out.str();
}

std::string svg_heatmap(const Tokens& source, const Tokens& target, const Alignment& weights) {
  check_shape(source, target, weights);
  constexpr int cell = 28, char_px = 8;
  std::size_t longest_target = 1, longest_source = 1;
  for (const auto& w : target) longest_target = std::max(longest_target, code_points(w).size());
  for (const auto& w : source) longest_source = std::max(longest_source, code_points(w).size());
  const int left = static_cast<int>(longest_target) * char_px + 12;
  const int top = static_cast<int>(longest_source) * char_px * 7 / 10 + 24;
  // Labels rotated by 45 degrees reach ~0.7 of their length to the right of their column.
  const int width = left + cell * static_cast<int>(source.size()) +
                    static_cast<int>(longest_source) * char_px * 7 / 10 + 10;
  const int height = top + cell * static_cast<int>(target.size()) + 10;
  std::ostringstream out;
  out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" font-family=\"sans-serif\" font-size=\"13\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (std::size_t j = 0; j < source.size(); ++j) {
    const int x = left + cell * static_cast<int>(j) + cell / 2;
    out << "<text transform=\"translate(" << x << "," << top - 6 << ") rotate(-45)\">"
        << xml_escape(source[j]) << "</text>\n";
  }
  for (std::size_t i = 0; i < target.size(); ++i) {
    const int y = top + cell * static_cast<int>(i);
    out << "<text x=\"" << left - 6 << "\" y=\"" << y + cell / 2 + 4
        << "\" text-anchor=\"end\">" << xml_escape(target[i]) << "</text>\n";
    for (std::size_t j = 0; j < source.size(); ++j) {
      const double w = std::clamp(weights[i][j], 0.0, 1.0);
      const png::Rgb c = heat_colour(w);
      char fill[8];
      std::snprintf(fill, sizeof fill, "#%02x%02x%02x", c.r, c.g, c.b);
      out << "<rect x=\"" << left + cell * static_cast<int>(j) << "\" y=\"" << y << "\" width=\""
          << cell << "\" height=\"" << cell << "\" fill=\"" << fill
          << "\" stroke=\"#ddd\"><title>" << xml_escape(target[i]) << " / "
          << xml_escape(source[j]) << ": " << w << "</title></rect>\n";
    }
  }
  out << "</svg>\n";
  return out.str();
}

void write_svg_heatmap(const std::string& path, const Tokens& source, const Tokens& target,
                       const Alignment& weights) {
  const std::string svg = svg_heatmap(source, target, weights);
  write_file_atomically(path, std::as_bytes(std::span(svg.data(), svg.size())), "heatmap");
}

namespace {
// Labels at twice the font's size: 10 x 18 pixel glyphs, 12 pixels apart, beside 28 pixel
// cells (the SVG's), so a cap-height glyph (14 pixels) sits centred in a row or column.
constexpr int kPngScale = 2;
constexpr int64_t kPngCell = 28;
constexpr int64_t kPngGap = 6;      // between a label and the grid
constexpr int64_t kPngMargin = 10;  // around the whole picture
constexpr int64_t kCapHeight = 7 * kPngScale;
constexpr png::Rgb kGrid{221, 221, 221};
constexpr png::Rgb kInk{0, 0, 0};
}  // namespace

PngHeatmapLayout png_heatmap_layout(const Tokens& source, const Tokens& target) {
  int64_t longest_target = 1, longest_source = 1;
  for (const auto& w : target) longest_target = std::max(longest_target, png::text_length(w, kPngScale));
  for (const auto& w : source) longest_source = std::max(longest_source, png::text_length(w, kPngScale));
  PngHeatmapLayout l;
  l.cell = kPngCell;
  l.left = kPngMargin + longest_target + kPngGap;
  l.top = kPngMargin + longest_source + kPngGap;
  l.width = l.left + l.cell * static_cast<int64_t>(source.size()) + kPngMargin;
  l.height = l.top + l.cell * static_cast<int64_t>(target.size()) + kPngMargin;
  return l;
}

std::vector<uint8_t> png_heatmap(const Tokens& source, const Tokens& target, const Alignment& weights) {
  check_shape(source, target, weights);
  const PngHeatmapLayout l = png_heatmap_layout(source, target);
  png::RgbImage image(l.width, l.height, {255, 255, 255});
  const int64_t S = static_cast<int64_t>(source.size()), T = static_cast<int64_t>(target.size());
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < S; ++j)
      image.fill_rect(l.left + j * l.cell, l.top + i * l.cell, l.cell, l.cell, heat_colour(weights[i][j]));
  // One-pixel grid lines on the cell borders, like the SVG's strokes.
  for (int64_t i = 0; i <= T; ++i) image.fill_rect(l.left, l.top + i * l.cell, S * l.cell + 1, 1, kGrid);
  for (int64_t j = 0; j <= S; ++j) image.fill_rect(l.left + j * l.cell, l.top, 1, T * l.cell + 1, kGrid);
  const int64_t inset = (l.cell - kCapHeight) / 2;  // centres the cap height in a cell
  for (int64_t j = 0; j < S; ++j)
    png::draw_text(image, l.left + j * l.cell + inset, l.top - kPngGap, source[j],
                   {kPngScale, kInk, png::TextDirection::bottom_to_top});
  for (int64_t i = 0; i < T; ++i)
    png::draw_text(image, l.left - kPngGap - png::text_length(target[i], kPngScale),
                   l.top + i * l.cell + inset, target[i], {kPngScale, kInk, png::TextDirection::left_to_right});
  return png::encode_png(image);
}

void write_heatmap(const std::string& path, const Tokens& source, const Tokens& target,
                   const Alignment& weights) {
  const std::string ext = lowercase(std::filesystem::path(path).extension().string());
  if (ext == ".svg") return write_svg_heatmap(path, source, target, weights);
  ATTN_CHECK(ext == ".png", "heatmap", "cannot tell the image format of ", path,
             ": the file name must end in .svg or .png");
  const std::vector<uint8_t> bytes = png_heatmap(source, target, weights);
  write_file_atomically(path, std::as_bytes(std::span(bytes.data(), bytes.size())), "heatmap");
}

}  // namespace attn::seq2seq
