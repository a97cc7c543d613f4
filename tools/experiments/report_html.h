// The report of `attn experiments`: sections of generated conclusions, inline SVG charts and
// tables, written as one self-contained HTML page (no script, no network, no external font)
// with the raw numbers beside it: one CSV per table and results.json with every table.
#pragma once

#include <string>
#include <vector>

namespace attn::experiments {

// A table of raw numbers; cells are text (numbers formatted by the caller, full precision).
struct Table {
  std::string name;  // file stem of its CSV: letters, digits, '_' and '-'
  std::vector<std::string> columns;
  std::vector<std::vector<std::string>> rows;

  void add(std::vector<std::string> row) { rows.push_back(std::move(row)); }
};

struct Section {
  std::string id;     // anchor, e.g. "cost"
  std::string title;
  std::string question;                  // the question people ask
  std::vector<std::string> conclusions;  // generated sentences (plain text, escaped on output)
  std::vector<std::string> notes;        // setup: sizes, seeds, what was measured
  std::vector<std::string> charts;       // rendered SVG (svg_chart.h)
  std::vector<Table> tables;
};

struct Report {
  std::string title;
  std::vector<std::string> preamble;  // paragraphs: machine, mode, caveats
  std::vector<Section> sections;
};

std::string render_html(const Report& report);
// RFC 4180: fields with a comma, quote or newline are quoted, quotes doubled.
std::string to_csv(const Table& table);
// {"title": ..., "sections": [{"id", "title", "conclusions": [...], "tables": [{"name",
// "columns", "rows"}]}]}; cells that are finite numbers are written as JSON numbers.
std::string to_json(const Report& report);

// Writes <dir>/report.html, <dir>/<table>.csv for every table and <dir>/results.json, creating
// <dir>; attn::Error names the path that could not be written.
void write_report(const Report& report, const std::string& dir);

// Checks that `dir` can be created and written (before hours of measurement); attn::Error if not.
void check_writable_directory(const std::string& dir);

}  // namespace attn::experiments
