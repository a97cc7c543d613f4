// Inline SVG charts for the `attn experiments` report: line charts (linear or log axes, error
// bars), bar charts (error bars) and heatmaps (with their colour scale). Every chart is one
// <svg class="chart" data-kind="..."> element with a <title>, both axes (class "axis"), tick
// labels, axis titles with units and, for several series, a legend: self-contained, no script,
// no external font (the generic font families only).
#pragma once

#include <string>
#include <vector>

namespace attn::experiments {

struct Series {
  std::string name;
  std::vector<double> x;
  std::vector<double> y;
  std::vector<double> error;  // empty, or one half-width per point (drawn as an error bar)
  bool dashed = false;
  int colour = -1;  // palette index; -1: the series' position
};

struct LineChart {
  std::string title;
  std::string x_label;  // with the unit, e.g. "sequence length N (tokens)"
  std::string y_label;
  bool log_x = false;
  bool log_y = false;
  std::vector<Series> series;
};

struct BarChart {
  std::string title;
  std::string x_label;
  std::string y_label;
  std::vector<std::string> categories;
  std::vector<double> values;  // one per category
  std::vector<double> error;   // empty, or one half-width per category
  int width = 640;
  int height = 320;
};

struct Heatmap {
  std::string title;
  std::vector<std::string> columns;         // e.g. source words
  std::vector<std::string> rows;            // e.g. target words
  std::vector<std::vector<double>> values;  // [row][column], in [0, 1]
  std::string scale_label = "attention weight";
};

struct Histogram;  // statistics.h
// A histogram as a bar chart of the share of values per bin (categories: bin starts, 2 digits;
// y: "share of <y_what>"), small enough to show several side by side.
BarChart histogram_chart(const Histogram& histogram, const std::string& title, const std::string& x_label,
                         const std::string& y_what);

// Charts (render's output, each `width` x `height`) side by side as one standalone SVG document.
std::string svg_document(const std::vector<std::string>& charts, int width, int height);

// Throws attn::Error for a chart without data or with mismatched sizes.
std::string render(const LineChart& chart);
std::string render(const BarChart& chart);
std::string render(const Heatmap& chart);

// "&", "<", ">", '"' escaped for XML text and attributes.
std::string xml_escape(const std::string& text);

// Compact number formatting for labels: 3 significant digits, k/M suffixes from 10^4 up.
std::string format_number(double value);

}  // namespace attn::experiments
