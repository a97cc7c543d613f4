// `attn experiments [--quick] [--out DIR] [--only NAME,...]`: the questions people ask about
// attention, answered by measurement on this machine, as DIR/report.html (inline SVG charts)
// with the raw numbers beside it (CSV per table, results.json). Every conclusion in the report
// is generated from this run's numbers (conclusions.h).
//
// Experiments, in order (names for --only):
//   cost        forward / backward time and peak memory of every scoring function against
//               sequence length and width, fused kernels and materialised scores
//   scale       why scale by 1/sqrt(d): variance of q.k, softmax entropy, largest weight and
//               Jacobian norm, scaled vs unscaled (full run: plus training curves)
//   length      BLEU against source length, encoder-decoder with and without attention
//   luong       Luong et al. 2015's scoring functions on the translator (BLEU, time, parameters)
//   heads       1/2/4/8 heads on the Transformer translator over two seeds, with per-head
//               heatmaps and histograms of the largest weight and entropy per target word
//   alignments  heatmaps of held-out sentences per scoring function; histograms of the
//               largest weight and entropy per target word, per scoring function
//   copying     names and numbers never seen in training: no copying, pointer-generator and
//               pointer-sentinel
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "tools/experiments/report_html.h"

namespace attn::experiments {

struct Options {
  bool quick = false;
  std::string out = "experiments";
  std::vector<std::string> only;  // empty: all
};

const std::vector<std::string>& experiment_names();

// Splits "a,b" and checks every name; attn::Error listing the valid names otherwise.
std::vector<std::string> parse_only(const std::string& list);

// Runs the selected experiments; `progress` receives one status line at a time (the CLI prints
// it on stderr with a carriage return).
Report run(const Options& options, const std::function<void(const std::string&)>& progress);

// The command: args are what follows "experiments". Returns the exit code (2 for usage errors).
int main_experiments(const std::vector<std::string>& args);

}  // namespace attn::experiments
