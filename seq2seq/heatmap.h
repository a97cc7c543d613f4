// Alignment heatmaps: the attention weights of a translation, source words as columns and
// target words as rows, in the terminal (Unicode shade blocks) or as an SVG image.
//
// weights[i][j] is output step i's weight on source position j (decode.h's Translation::
// alignment); rows and columns beyond the given words are ignored, missing ones are an error.
#pragma once

#include <string>
#include <vector>

#include "seq2seq/vocab.h"

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

}  // namespace attn::seq2seq
