// Alignment heatmaps: the attention weights of a translation, source words as columns and
// target words as rows, in the terminal (Unicode shade blocks) or as an SVG or PNG image.
//
// weights[i][j] is output step i's weight on source position j (decode.h's Translation::
// alignment); rows and columns beyond the given words are ignored, missing ones are an error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {

using Alignment = std::vector<std::vector<double>>;

// Each cell is two characters of ' ' (< 0.1), '░' (< 0.3), '▒' (< 0.5), '▓' (< 0.7) or '█',
// source words written vertically above their column, target words left of their row.
std::string terminal_heatmap(const Tokens& source, const Tokens& target, const Alignment& weights);

// A standalone SVG document: one square per weight, shaded from white (0) to dark blue (1),
// source words (rotated) along the top, target words along the left, the weight as a tooltip.
std::string svg_heatmap(const Tokens& source, const Tokens& target, const Alignment& weights);

// Writes svg_heatmap to `path` atomically; attn::Error names the path on failure.
void write_svg_heatmap(const std::string& path, const Tokens& source, const Tokens& target,
                       const Alignment& weights);

// Where png_heatmap puts things, in pixels: cell (i, j) (target row i, source column j) covers
// x in [left + j cell, left + (j + 1) cell), y in [top + i cell, top + (i + 1) cell).
struct PngHeatmapLayout {
  int64_t width = 0;
  int64_t height = 0;
  int64_t left = 0;  // target labels end to the left of it
  int64_t top = 0;   // source labels end above it
  int64_t cell = 0;
};
PngHeatmapLayout png_heatmap_layout(const Tokens& source, const Tokens& target);

// A PNG file (png.h: 8-bit RGB, stored deflate blocks): the cells shaded like svg_heatmap's
// (white for 0 to dark blue (8, 48, 107) for 1) with a light grey grid, source words drawn
// bottom to top above their column and target words right-aligned left of their row in the
// built-in bitmap font (accented Latin letters as base letter plus accent, other non-ASCII
// characters as a box; see png.h).
std::vector<uint8_t> png_heatmap(const Tokens& source, const Tokens& target, const Alignment& weights);

// Writes the heatmap atomically as SVG or PNG, chosen by the extension of `path` (.svg or
// .png, in any case); any other extension is an attn::Error naming the path.
void write_heatmap(const std::string& path, const Tokens& source, const Tokens& target,
                   const Alignment& weights);

}  // namespace attn::seq2seq
