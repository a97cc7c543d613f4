#include "tools/experiments/report_html.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "attn/error.h"
#include "tools/experiments/svg_chart.h"

namespace attn::experiments {
namespace {

namespace fs = std::filesystem;

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

// A cell that is a finite number as JSON wants it is written bare, anything else as a string.
std::string json_cell(const std::string& s) {
  if (!s.empty()) {
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    if (end == s.c_str() + s.size() && std::isfinite(v) && s.find_first_of("xXnN") == std::string::npos &&
        s.front() != '+' && s.front() != '.' && s.back() != '.')
      return s;
  }
  return json_string(s);
}

void write_file(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    if (!out) throw Error("experiments", "cannot write " + tmp.string() + ": " + std::strerror(errno));
    out << text;
    if (!out.flush()) throw Error("experiments", "cannot write " + tmp.string());
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw Error("experiments", "cannot write " + path.string() + ": " + ec.message());
}

const char* const kStyle = R"(
body { font-family: sans-serif; max-width: 1360px; margin: 0 auto; padding: 0 16px 48px; color: #222; }
h1 { font-size: 26px; } h2 { margin-top: 40px; border-bottom: 1px solid #ccc; padding-bottom: 4px; }
.question { font-style: italic; color: #444; }
.conclusions li { margin: 4px 0; }
.contradicts { background: #fff3cd; }
.notes { color: #555; font-size: 13px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.charts svg { border: 1px solid #ddd; background: white; max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f2f2f2; }
details { margin: 8px 0; }
nav a { margin-right: 12px; }
)";

}  // namespace

std::string to_csv(const Table& t) {
  auto field = [](const std::string& s) {
    if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
    std::string q = "\"";
    for (const char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
    return q + "\"";
  };
  std::string out;
  for (size_t i = 0; i < t.columns.size(); ++i) out += (i ? "," : "") + field(t.columns[i]);
  out += "\n";
  for (const auto& row : t.rows) {
    for (size_t i = 0; i < row.size(); ++i) out += (i ? "," : "") + field(row[i]);
    out += "\n";
  }
  return out;
}

std::string to_json(const Report& r) {
  std::ostringstream o;
  o << "{\n  \"title\": " << json_string(r.title) << ",\n  \"preamble\": [";
  for (size_t i = 0; i < r.preamble.size(); ++i) o << (i ? ", " : "") << json_string(r.preamble[i]);
  o << "],\n  \"sections\": [";
  for (size_t s = 0; s < r.sections.size(); ++s) {
    const Section& sec = r.sections[s];
    o << (s ? "," : "") << "\n    {\"id\": " << json_string(sec.id) << ", \"title\": "
      << json_string(sec.title) << ",\n     \"conclusions\": [";
    for (size_t i = 0; i < sec.conclusions.size(); ++i)
      o << (i ? ", " : "") << json_string(sec.conclusions[i]);
    o << "],\n     \"tables\": [";
    for (size_t t = 0; t < sec.tables.size(); ++t) {
      const Table& tab = sec.tables[t];
      o << (t ? "," : "") << "\n      {\"name\": " << json_string(tab.name) << ", \"columns\": [";
      for (size_t i = 0; i < tab.columns.size(); ++i) o << (i ? ", " : "") << json_string(tab.columns[i]);
      o << "], \"rows\": [";
      for (size_t ri = 0; ri < tab.rows.size(); ++ri) {
        o << (ri ? ",\n        " : "\n        ") << "[";
        for (size_t i = 0; i < tab.rows[ri].size(); ++i) o << (i ? ", " : "") << json_cell(tab.rows[ri][i]);
        o << "]";
      }
      o << "]}";
    }
    o << "]}";
  }
  o << "\n  ]\n}\n";
  return o.str();
}

std::string render_html(const Report& r) {
  std::ostringstream o;
  o << "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>"
    << xml_escape(r.title) << "</title>\n<style>" << kStyle << "</style>\n</head>\n<body>\n<h1>"
    << xml_escape(r.title) << "</h1>\n";
  for (const auto& p : r.preamble) o << "<p>" << xml_escape(p) << "</p>\n";
  o << "<nav>";
  for (const Section& s : r.sections)
    o << "<a href=\"#" << xml_escape(s.id) << "\">" << xml_escape(s.title) << "</a>";
  o << "</nav>\n";
  for (const Section& s : r.sections) {
    o << "<section id=\"" << xml_escape(s.id) << "\">\n<h2>" << xml_escape(s.title) << "</h2>\n";
    if (!s.question.empty()) o << "<p class=\"question\">" << xml_escape(s.question) << "</p>\n";
    if (!s.conclusions.empty()) {
      o << "<ul class=\"conclusions\">\n";
      for (const auto& c : s.conclusions) {
        const bool contradicts = c.find("contradicts") != std::string::npos;
        o << "<li" << (contradicts ? " class=\"contradicts\"" : "") << ">" << xml_escape(c) << "</li>\n";
      }
      o << "</ul>\n";
    }
    o << "<div class=\"charts\">\n";
    for (const auto& svg : s.charts) o << svg;
    o << "</div>\n";
    for (const auto& n : s.notes) o << "<p class=\"notes\">" << xml_escape(n) << "</p>\n";
    for (const Table& t : s.tables) {
      o << "<details><summary>Raw numbers: " << xml_escape(t.name) << ".csv (" << t.rows.size()
        << " rows)</summary>\n<table>\n<tr>";
      for (const auto& c : t.columns) o << "<th>" << xml_escape(c) << "</th>";
      o << "</tr>\n";
      for (const auto& row : t.rows) {
        o << "<tr>";
        for (const auto& cell : row) o << "<td>" << xml_escape(cell) << "</td>";
        o << "</tr>\n";
      }
      o << "</table>\n</details>\n";
    }
    o << "</section>\n";
  }
  o << "</body>\n</html>\n";
  return o.str();
}

void check_writable_directory(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    throw Error("experiments", "cannot create the output directory " + dir +
                                   (ec ? ": " + ec.message() : std::string(": not a directory")));
  const fs::path probe = fs::path(dir) / ".attn-write-test";
  {
    std::ofstream out(probe);
    if (!out || !(out << "x") || !out.flush())
      throw Error("experiments", "cannot write into the output directory " + dir);
  }
  fs::remove(probe, ec);
}

void write_report(const Report& report, const std::string& dir) {
  check_writable_directory(dir);
  for (const Section& s : report.sections)
    for (const Table& t : s.tables) write_file(fs::path(dir) / (t.name + ".csv"), to_csv(t));
  write_file(fs::path(dir) / "results.json", to_json(report));
  write_file(fs::path(dir) / "report.html", render_html(report));
}

}  // namespace attn::experiments
