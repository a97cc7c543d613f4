#include "tools/experiments/svg_chart.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

#include "attn/error.h"
#include "tools/experiments/conclusions.h"
#include "tools/experiments/statistics.h"

namespace attn::experiments {

std::string svg_document(const std::vector<std::string>& charts, int width, int height) {
  std::ostringstream o;
  o << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\""
    << width * static_cast<int>(charts.size()) << "\" height=\"" << height << "\">\n";
  for (size_t i = 0; i < charts.size(); ++i)
    o << "<g transform=\"translate(" << width * static_cast<int>(i) << ",0)\">" << charts[i] << "</g>\n";
  o << "</svg>\n";
  return o.str();
}

BarChart histogram_chart(const Histogram& histogram, const std::string& title, const std::string& x_label,
                         const std::string& y_what) {
  BarChart c;
  c.title = title;
  c.x_label = x_label;
  c.y_label = "share of " + y_what;
  c.width = 330, c.height = 230;
  const double total = static_cast<double>(std::max<int64_t>(1, histogram.total()));
  for (size_t b = 0; b < histogram.counts.size(); ++b) {
    c.categories.push_back(num(histogram.lo + histogram.bin_width() * static_cast<double>(b), 2));
    c.values.push_back(static_cast<double>(histogram.counts[b]) / total);
  }
  return c;
}
namespace {

// Distinguishable on white, colour-blind friendly first (Okabe-Ito), then extras.
const char* const kPalette[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00",
                                "#56B4E9", "#000000", "#8C564B", "#7F7F7F", "#BCBD22"};
constexpr int kPaletteSize = sizeof(kPalette) / sizeof(kPalette[0]);
const char* const kFont = "font-family=\"sans-serif\"";

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

void require(bool ok, const std::string& message) {
  if (!ok) throw Error("experiments", message);
}

// One axis: maps data to pixels, linear or log10, with its tick values.
struct Axis {
  bool log = false;
  double lo = 0.0, hi = 1.0;  // in data units (log: positive)
  double p0 = 0.0, p1 = 1.0;  // pixels of lo and hi
  std::vector<double> ticks;

  double t(double v) const { return log ? std::log10(v) : v; }
  double px(double v) const { return p0 + (t(v) - t(lo)) / (t(hi) - t(lo)) * (p1 - p0); }
};

double nice_step(double span, int target) {
  const double raw = span / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (const double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * mag >= raw) return m * mag;
  return 10.0 * mag;
}

Axis make_axis(double lo, double hi, bool log, bool include_zero) {
  Axis a;
  a.log = log;
  if (log) {
    lo = std::max(lo, 1e-300);
    hi = std::max(hi, lo);
    double e0 = std::floor(std::log10(lo)), e1 = std::ceil(std::log10(hi));
    if (e1 <= e0) e1 = e0 + 1;
    a.lo = std::pow(10.0, e0);
    a.hi = std::pow(10.0, e1);
    const bool few = e1 - e0 <= 2;
    for (double e = e0; e <= e1 + 1e-9; ++e) {
      const double base = std::pow(10.0, e);
      a.ticks.push_back(base);
      if (few && e < e1) {
        a.ticks.push_back(2 * base);
        a.ticks.push_back(5 * base);
      }
    }
    // Tight range when the data span less than a decade: round to the ticks around the data.
    return a;
  }
  if (include_zero) lo = std::min(lo, 0.0), hi = std::max(hi, 0.0);
  if (hi <= lo) hi = lo + (lo == 0.0 ? 1.0 : std::fabs(lo) * 0.1);
  const double step = nice_step(hi - lo, 5);
  a.lo = std::floor(lo / step - 1e-9) * step;
  a.hi = std::ceil(hi / step + 1e-9) * step;
  for (double v = a.lo; v <= a.hi + step * 1e-6; v += step) a.ticks.push_back(std::fabs(v) < step * 1e-9 ? 0.0 : v);
  return a;
}

void open_svg(std::ostringstream& o, const char* kind, int w, int h, const std::string& title) {
  o << "<svg class=\"chart\" data-kind=\"" << kind << "\" xmlns=\"http://www.w3.org/2000/svg\" width=\""
    << w << "\" height=\"" << h << "\" viewBox=\"0 0 " << w << " " << h << "\" role=\"img\" "
    << kFont << " font-size=\"12\">\n<title>" << xml_escape(title) << "</title>\n"
    << "<rect x=\"0\" y=\"0\" width=\"" << w << "\" height=\"" << h << "\" fill=\"white\"/>\n"
    << "<text class=\"chart-title\" x=\"" << w / 2 << "\" y=\"18\" text-anchor=\"middle\" font-size=\"14\" "
       "font-weight=\"bold\">" << xml_escape(title) << "</text>\n";
}

// Axis lines, ticks, grid, tick labels and titles of a plot area [x0, x1] x [y1, y0] (y0 bottom).
void draw_axes(std::ostringstream& o, const Axis& xa, const Axis& ya, double x0, double x1,
               double y0, double y1, const std::string& x_label, const std::string& y_label,
               bool x_ticks = true) {
  o << "<g class=\"grid\" stroke=\"#e4e4e4\" stroke-width=\"1\">\n";
  for (const double v : ya.ticks) {
    const double y = ya.px(v);
    o << "<line x1=\"" << fmt(x0) << "\" y1=\"" << fmt(y) << "\" x2=\"" << fmt(x1) << "\" y2=\""
      << fmt(y) << "\"/>\n";
  }
  o << "</g>\n<g class=\"axis\" stroke=\"#333\" stroke-width=\"1\">\n"
    << "<line class=\"x-axis\" x1=\"" << fmt(x0) << "\" y1=\"" << fmt(y0) << "\" x2=\"" << fmt(x1)
    << "\" y2=\"" << fmt(y0) << "\"/>\n"
    << "<line class=\"y-axis\" x1=\"" << fmt(x0) << "\" y1=\"" << fmt(y0) << "\" x2=\"" << fmt(x0)
    << "\" y2=\"" << fmt(y1) << "\"/>\n</g>\n<g class=\"tick-labels\" fill=\"#333\">\n";
  for (const double v : ya.ticks) {
    const double y = ya.px(v);
    o << "<line x1=\"" << fmt(x0 - 4) << "\" y1=\"" << fmt(y) << "\" x2=\"" << fmt(x0) << "\" y2=\""
      << fmt(y) << "\" stroke=\"#333\"/><text x=\"" << fmt(x0 - 6) << "\" y=\"" << fmt(y + 4)
      << "\" text-anchor=\"end\">" << format_number(v) << "</text>\n";
  }
  if (x_ticks) {
    for (const double v : xa.ticks) {
      const double x = xa.px(v);
      o << "<line x1=\"" << fmt(x) << "\" y1=\"" << fmt(y0) << "\" x2=\"" << fmt(x) << "\" y2=\""
        << fmt(y0 + 4) << "\" stroke=\"#333\"/><text x=\"" << fmt(x) << "\" y=\"" << fmt(y0 + 17)
        << "\" text-anchor=\"middle\">" << format_number(v) << "</text>\n";
    }
  }
  o << "</g>\n<text class=\"axis-label x-label\" x=\"" << fmt((x0 + x1) / 2) << "\" y=\""
    << fmt(y0 + 36) << "\" text-anchor=\"middle\">" << xml_escape(x_label) << "</text>\n"
    << "<text class=\"axis-label y-label\" transform=\"translate(14," << fmt((y0 + y1) / 2)
    << ") rotate(-90)\" text-anchor=\"middle\">" << xml_escape(y_label) << "</text>\n";
}

}  // namespace

std::string xml_escape(const std::string& text) {
  // Text and attribute values alike: the five characters XML reserves.
  static const std::pair<char, const char*> kEntities[] = {
      {'&', "&amp;"}, {'<', "&lt;"}, {'>', "&gt;"}, {'"', "&quot;"}, {'\'', "&#39;"}};
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    const char* entity = nullptr;
    for (const auto& [ch, name] : kEntities)
      if (ch == c) entity = name;
    if (entity) out += entity;
    else out += c;
  }
  return out;
}

std::string format_number(double v) {
  char buf[32];
  const double a = std::fabs(v);
  if (!std::isfinite(v)) return v != v ? "nan" : (v > 0 ? "inf" : "-inf");
  if (a >= 1e6) std::snprintf(buf, sizeof buf, "%gM", std::round(v / 1e5) / 10);
  else if (a >= 1e4) std::snprintf(buf, sizeof buf, "%gk", std::round(v / 1e2) / 10);
  else if (a == 0.0) return "0";
  else std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

std::string render(const LineChart& c) {
  require(!c.series.empty(), "line chart '" + c.title + "' has no series");
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
  for (const Series& s : c.series) {
    require(s.x.size() == s.y.size() && !s.x.empty(),
            "line chart '" + c.title + "': series '" + s.name + "' has no points or x/y sizes differ");
    require(s.error.empty() || s.error.size() == s.y.size(),
            "line chart '" + c.title + "': series '" + s.name + "' error bars do not match its points");
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      if (c.log_x && s.x[i] <= 0) continue;
      if (c.log_y && s.y[i] <= 0) continue;
      const double e = s.error.empty() ? 0.0 : s.error[i];
      xmin = std::min(xmin, s.x[i]), xmax = std::max(xmax, s.x[i]);
      ymin = std::min(ymin, c.log_y ? s.y[i] : s.y[i] - e), ymax = std::max(ymax, s.y[i] + e);
    }
  }
  require(std::isfinite(xmin) && std::isfinite(ymin), "line chart '" + c.title + "' has no plottable point");
  const int legend_rows = static_cast<int>(c.series.size() > 1 ? (c.series.size() + 1) / 2 : 0);
  const int w = 640, h = 360 + 18 * legend_rows;
  const double x0 = 78, x1 = w - 24, y1 = 34, y0 = 360 - 58;
  Axis xa = make_axis(xmin, xmax, c.log_x, false);
  if (!c.log_x) {  // lines over x: no padding to zero needed, keep the data's own range
    xa = make_axis(xmin, xmax, false, false);
  }
  Axis ya = make_axis(ymin, ymax, c.log_y, !c.log_y);
  xa.p0 = x0, xa.p1 = x1, ya.p0 = y0, ya.p1 = y1;
  std::ostringstream o;
  open_svg(o, "line", w, h, c.title);
  draw_axes(o, xa, ya, x0, x1, y0, y1, c.x_label, c.y_label);
  for (size_t si = 0; si < c.series.size(); ++si) {
    const Series& s = c.series[si];
    const int ci = s.colour >= 0 ? s.colour : static_cast<int>(si);
    const char* colour = kPalette[ci % kPaletteSize];
    const bool dashed = s.dashed || si >= static_cast<size_t>(kPaletteSize);
    o << "<g class=\"series\" data-name=\"" << xml_escape(s.name) << "\">\n<title>"
      << xml_escape(s.name) << "</title>\n<polyline fill=\"none\" stroke=\"" << colour
      << "\" stroke-width=\"2\"" << (dashed ? " stroke-dasharray=\"6 4\"" : "") << " points=\"";
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i]) || (c.log_y && s.y[i] <= 0) || (c.log_x && s.x[i] <= 0)) continue;
      o << fmt(xa.px(s.x[i])) << "," << fmt(ya.px(s.y[i])) << " ";
    }
    o << "\"/>\n";
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i]) || (c.log_y && s.y[i] <= 0) || (c.log_x && s.x[i] <= 0)) continue;
      const double px = xa.px(s.x[i]), py = ya.px(s.y[i]);
      if (!s.error.empty() && s.error[i] > 0) {
        const double lo = c.log_y ? std::max(s.y[i] - s.error[i], ya.lo) : s.y[i] - s.error[i];
        o << "<path class=\"error-bar\" stroke=\"" << colour << "\" d=\"M" << fmt(px) << ","
          << fmt(ya.px(lo)) << "V" << fmt(ya.px(s.y[i] + s.error[i])) << "M" << fmt(px - 4) << ","
          << fmt(ya.px(lo)) << "h8M" << fmt(px - 4) << "," << fmt(ya.px(s.y[i] + s.error[i]))
          << "h8\"/>\n";
      }
      o << "<circle cx=\"" << fmt(px) << "\" cy=\"" << fmt(py) << "\" r=\"3\" fill=\"" << colour
        << "\"><title>" << xml_escape(s.name) << ": x=" << format_number(s.x[i])
        << ", y=" << format_number(s.y[i]) << "</title></circle>\n";
    }
    o << "</g>\n";
  }
  if (c.series.size() > 1) {
    o << "<g class=\"legend\">\n";
    for (size_t si = 0; si < c.series.size(); ++si) {
      const double lx = x0 - 40 + static_cast<double>(si % 2) * 290, ly = 360 - 4 + 18.0 * static_cast<double>(si / 2);
      const bool dashed = c.series[si].dashed || si >= static_cast<size_t>(kPaletteSize);
      o << "<line x1=\"" << fmt(lx) << "\" y1=\"" << fmt(ly - 4) << "\" x2=\"" << fmt(lx + 22)
        << "\" y2=\"" << fmt(ly - 4) << "\" stroke=\""
        << kPalette[(c.series[si].colour >= 0 ? static_cast<size_t>(c.series[si].colour) : si) % kPaletteSize]
        << "\" stroke-width=\"3\"" << (dashed ? " stroke-dasharray=\"6 4\"" : "") << "/><text x=\""
        << fmt(lx + 28) << "\" y=\"" << fmt(ly) << "\">" << xml_escape(c.series[si].name) << "</text>\n";
    }
    o << "</g>\n";
  }
  o << "</svg>\n";
  return o.str();
}

std::string render(const BarChart& c) {
  require(!c.categories.empty() && c.values.size() == c.categories.size(),
          "bar chart '" + c.title + "' needs one value per category");
  require(c.error.empty() || c.error.size() == c.values.size(),
          "bar chart '" + c.title + "': error bars do not match its bars");
  double ymin = 0.0, ymax = 0.0;
  for (size_t i = 0; i < c.values.size(); ++i) {
    const double e = c.error.empty() ? 0.0 : c.error[i];
    if (!std::isfinite(c.values[i])) continue;
    ymin = std::min(ymin, c.values[i] - e), ymax = std::max(ymax, c.values[i] + e);
  }
  const bool rotate = c.categories.size() > 6;
  const int w = c.width, h = c.height + (rotate ? 40 : 0);
  const double x0 = 70, x1 = w - 16, y1 = 34, y0 = c.height - 58;
  Axis ya = make_axis(ymin, ymax, false, true);
  ya.p0 = y0, ya.p1 = y1;
  Axis xa;  // categorical: no ticks from the axis
  xa.p0 = x0, xa.p1 = x1;
  std::ostringstream o;
  open_svg(o, "bar", w, h, c.title);
  draw_axes(o, xa, ya, x0, x1, y0, y1, "", c.y_label, false);
  const double slot = (x1 - x0) / static_cast<double>(c.categories.size());
  o << "<g class=\"bars\">\n";
  for (size_t i = 0; i < c.categories.size(); ++i) {
    const double v = std::isfinite(c.values[i]) ? c.values[i] : 0.0;
    const double cx = x0 + slot * (static_cast<double>(i) + 0.5);
    const double top = ya.px(std::max(v, 0.0)), bottom = ya.px(std::min(v, 0.0));
    o << "<rect x=\"" << fmt(cx - slot * 0.35) << "\" y=\"" << fmt(top) << "\" width=\""
      << fmt(slot * 0.7) << "\" height=\"" << fmt(std::max(bottom - top, 0.5)) << "\" fill=\""
      << kPalette[0] << "\"><title>" << xml_escape(c.categories[i]) << ": "
      << format_number(c.values[i]);
    if (!c.error.empty()) o << " ± " << format_number(c.error[i]);
    o << "</title></rect>\n";
    if (!c.error.empty() && c.error[i] > 0) {
      const double a = ya.px(v - c.error[i]), b = ya.px(v + c.error[i]);
      o << "<path class=\"error-bar\" stroke=\"#222\" d=\"M" << fmt(cx) << "," << fmt(a) << "V"
        << fmt(b) << "M" << fmt(cx - 5) << "," << fmt(a) << "h10M" << fmt(cx - 5) << "," << fmt(b)
        << "h10\"/>\n";
    }
    if (rotate) {
      o << "<text x=\"" << fmt(cx) << "\" y=\"" << fmt(y0 + 12) << "\" text-anchor=\"end\" "
        << "transform=\"rotate(-35 " << fmt(cx) << " " << fmt(y0 + 12) << ")\">"
        << xml_escape(c.categories[i]) << "</text>\n";
    } else {
      o << "<text x=\"" << fmt(cx) << "\" y=\"" << fmt(y0 + 16) << "\" text-anchor=\"middle\">"
        << xml_escape(c.categories[i]) << "</text>\n";
    }
  }
  o << "</g>\n<text class=\"axis-label x-label\" x=\"" << fmt((x0 + x1) / 2) << "\" y=\""
    << h - 6 << "\" text-anchor=\"middle\">" << xml_escape(c.x_label) << "</text>\n</svg>\n";
  return o.str();
}

std::string render(const Heatmap& c) {
  require(!c.rows.empty() && !c.columns.empty() && c.values.size() >= c.rows.size(),
          "heatmap '" + c.title + "' needs a value row per label");
  for (size_t i = 0; i < c.rows.size(); ++i)
    require(c.values[i].size() >= c.columns.size(), "heatmap '" + c.title + "': a row is too short");
  size_t longest_row = 1, longest_col = 1;
  for (const auto& s : c.rows) longest_row = std::max(longest_row, s.size());
  for (const auto& s : c.columns) longest_col = std::max(longest_col, s.size());
  const double cell = 22;
  const double left = 12 + 7.0 * static_cast<double>(longest_row);
  const double top = 34 + 7.0 * static_cast<double>(longest_col);
  const double grid_w = cell * static_cast<double>(c.columns.size());
  const double grid_h = cell * static_cast<double>(c.rows.size());
  const int w = static_cast<int>(left + grid_w + 110);
  const int h = static_cast<int>(std::max(top + grid_h + 16, top + 170.0));
  std::ostringstream o;
  open_svg(o, "heatmap", std::max(w, 260), h, c.title);
  auto shade = [](double v) {
    v = std::clamp(std::isfinite(v) ? v : 0.0, 0.0, 1.0);
    // white (255, 255, 255) to dark blue (8, 48, 107), as seq2seq/decoding/heatmap.h
    const int r = static_cast<int>(std::lround(255 + (8 - 255) * v));
    const int g = static_cast<int>(std::lround(255 + (48 - 255) * v));
    const int b = static_cast<int>(std::lround(255 + (107 - 255) * v));
    char buf[16];
    std::snprintf(buf, sizeof buf, "#%02x%02x%02x", r, g, b);
    return std::string(buf);
  };
  o << "<g class=\"cells\" stroke=\"#ddd\" stroke-width=\"0.5\">\n";
  for (size_t i = 0; i < c.rows.size(); ++i)
    for (size_t j = 0; j < c.columns.size(); ++j) {
      const double v = c.values[i][j];
      o << "<rect x=\"" << fmt(left + cell * static_cast<double>(j)) << "\" y=\""
        << fmt(top + cell * static_cast<double>(i)) << "\" width=\"" << cell << "\" height=\""
        << cell << "\" fill=\"" << shade(v) << "\"><title>" << xml_escape(c.rows[i]) << " / "
        << xml_escape(c.columns[j]) << ": " << format_number(v) << "</title></rect>\n";
    }
  o << "</g>\n<g class=\"axis row-labels\">\n";
  for (size_t i = 0; i < c.rows.size(); ++i)
    o << "<text x=\"" << fmt(left - 4) << "\" y=\"" << fmt(top + cell * (static_cast<double>(i) + 0.7))
      << "\" text-anchor=\"end\">" << xml_escape(c.rows[i]) << "</text>\n";
  o << "</g>\n<g class=\"axis column-labels\">\n";
  for (size_t j = 0; j < c.columns.size(); ++j) {
    const double x = left + cell * (static_cast<double>(j) + 0.65);
    o << "<text x=\"" << fmt(x) << "\" y=\"" << fmt(top - 4) << "\" transform=\"rotate(-90 " << fmt(x)
      << " " << fmt(top - 4) << ")\">" << xml_escape(c.columns[j]) << "</text>\n";
  }
  // Colour scale: 0 at the bottom, 1 at the top.
  static int gradients = 0;  // ids unique within the page
  const int id = ++gradients;
  const double sx = left + grid_w + 24, sy = top, sh = 140;
  o << "</g>\n<g class=\"legend colour-scale\">\n<defs><linearGradient id=\"g" << id
    << "\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\"><stop offset=\"0\" stop-color=\"#ffffff\"/><stop "
       "offset=\"1\" stop-color=\"#08306b\"/></linearGradient></defs>\n<rect x=\"" << fmt(sx)
    << "\" y=\"" << fmt(sy) << "\" width=\"14\" height=\"" << sh << "\" fill=\"url(#g"
    << id << ")\" stroke=\"#333\"/>\n";
  for (const double v : {0.0, 0.25, 0.5, 0.75, 1.0})
    o << "<text x=\"" << fmt(sx + 18) << "\" y=\"" << fmt(sy + sh * (1 - v) + 4) << "\">"
      << format_number(v) << "</text>\n";
  o << "<text x=\"" << fmt(sx) << "\" y=\"" << fmt(sy + sh + 16) << "\" font-size=\"10\">"
    << xml_escape(c.scale_label) << "</text>\n</g>\n</svg>\n";
  return o.str();
}

}  // namespace attn::experiments
