// The `attn experiments --quick` report in a real browser: Debian's chromium, headless, loads the
// page (a subset of the experiments with every kind of chart: line, bar, heatmap), and the test
// checks that every chart made it into the rendered DOM with axes and content, that the page
// logged nothing to the console (no failed resource, no error), and saves a screenshot to
// <build>/tests/experiments_report/screenshot.png. Skips when chromium is not installed
// (scripts/setup.sh installs it).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>

namespace {

namespace fs = std::filesystem;

fs::path build_dir() { return fs::read_symlink("/proc/self/exe").parent_path().parent_path(); }

struct Process {
  int status = -1;
  std::string output;
};

Process run(const std::string& command) {
  Process p;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return p;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) p.output.append(buf, n);
  p.status = pclose(pipe);
  return p;
}

std::string read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

TEST(ExperimentsReport, RendersInHeadlessChromium) {
  if (run("command -v chromium >/dev/null 2>&1 && echo yes").output.find("yes") == std::string::npos)
    GTEST_SKIP() << "chromium is not installed (bash scripts/setup.sh installs it): report not rendered";
  const fs::path dir = build_dir() / "tests" / "experiments_report";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path attn = build_dir() / "bin" / "attn";
  ASSERT_TRUE(fs::exists(attn)) << "no binary at " << attn;
  // scale: line charts; heads: bar charts and heatmaps.
  const Process exp = run(attn.string() + " experiments --quick --only scale,heads --out " + dir.string() +
                          " 2>" + (dir / "progress.txt").string());
  ASSERT_EQ(exp.status, 0) << exp.output << read(dir / "progress.txt");
  EXPECT_NE(read(dir / "progress.txt").find("ETA"), std::string::npos);
  const std::string html = read(dir / "report.html");
  ASSERT_FALSE(html.empty());
  for (const char* f : {"results.json", "scale_statistics.csv", "heads.csv"})
    EXPECT_TRUE(fs::exists(dir / f)) << f;
  const size_t charts = count(html, "<svg class=\"chart\"");
  EXPECT_GE(count(html, "data-kind=\"line\""), 1u);
  EXPECT_GE(count(html, "data-kind=\"bar\""), 1u);
  EXPECT_GE(count(html, "data-kind=\"heatmap\""), 1u);

  const std::string url = "file://" + fs::absolute(dir / "report.html").string();
  const std::string common = "chromium --headless --no-sandbox --disable-gpu --no-first-run "
                             "--user-data-dir=" + (dir / "profile").string() +
                             " --enable-logging=stderr --v=0 --virtual-time-budget=5000 ";
  const Process dom = run(common + "--dump-dom " + url + " 2>" + (dir / "chromium.log").string());
  ASSERT_EQ(dom.status, 0) << read(dir / "chromium.log");
  // Every chart made it into the DOM, each with a size, axes and marks.
  EXPECT_EQ(count(dom.output, "<svg class=\"chart\""), charts);
  const std::regex svg_re("<svg class=\"chart\"[^>]*width=\"([0-9]+)\" height=\"([0-9]+)\"[^]*?</svg>");
  size_t checked = 0;
  for (auto it = std::sregex_iterator(dom.output.begin(), dom.output.end(), svg_re); it != std::sregex_iterator(); ++it) {
    const std::string svg = it->str();
    EXPECT_GT(std::stoi((*it)[1]), 100);
    EXPECT_GT(std::stoi((*it)[2]), 100);
    EXPECT_TRUE(svg.find("class=\"axis") != std::string::npos) << svg.substr(0, 200);
    EXPECT_TRUE(svg.find("<polyline") != std::string::npos || svg.find("<rect x=") != std::string::npos)
        << svg.substr(0, 200);
    EXPECT_GE(count(svg, "<text"), 3u) << svg.substr(0, 200);
    ++checked;
  }
  EXPECT_EQ(checked, charts);
  // The page itself logs nothing: console messages appear as "CONSOLE" lines.
  const std::string log = read(dir / "chromium.log");
  EXPECT_EQ(log.find("CONSOLE"), std::string::npos) << log;
  EXPECT_EQ(log.find("Failed to load resource"), std::string::npos) << log;

  const fs::path shot = dir / "screenshot.png";
  const Process png = run(common + "--hide-scrollbars --window-size=1400,2600 --screenshot=" + shot.string() +
                          " " + url + " 2>>" + (dir / "chromium.log").string());
  ASSERT_EQ(png.status, 0) << read(dir / "chromium.log");
  ASSERT_TRUE(fs::exists(shot));
  EXPECT_GT(fs::file_size(shot), 20000u) << "a nearly blank screenshot";
  std::printf("report: %s\nscreenshot: %s\n", (dir / "report.html").c_str(), shot.c_str());
}

}  // namespace
