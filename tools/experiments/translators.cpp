// Experiments 3-6: the translators of seq2seq/ trained on the embedded English -> French corpus
// (seq2seq/data/corpus.h) and measured: BLEU against source length with and without attention,
// Luong et al.'s scoring functions, Transformer heads, and the alignments the models learn.
#include <algorithm>
#include <cmath>
#include <map>

#include "attn/attention.h"
#include "seq2seq/metrics/bleu.h"
#include "tools/experiments/conclusions.h"
#include "tools/experiments/context.h"
#include "tools/experiments/statistics.h"
#include "tools/experiments/svg_chart.h"

namespace attn::experiments {

namespace s2s = attn::seq2seq;

namespace {

using s2s::AttentionPreset;

const std::vector<AttentionPreset>& luong_presets() {
  static const std::vector<AttentionPreset> p = {
      AttentionPreset::luong_dot, AttentionPreset::luong_general, AttentionPreset::luong_concat,
      AttentionPreset::location,  AttentionPreset::local_m,       AttentionPreset::local_p,
      AttentionPreset::bahdanau,  AttentionPreset::scaled_dot,    AttentionPreset::cosine};
  return p;
}

std::string label(AttentionPreset p) { return s2s::attention_preset_name(p); }

std::string setup_note(const Context& ctx, const s2s::Corpus& corpus, const s2s::TrainConfig& c) {
  return "Embedded English -> French corpus: " + std::to_string(corpus.train.size()) +
         " training pairs (sources of 4-16 tokens). " + std::string(s2s::architecture_name(c.model.arch)) +
         " translator, embedding " + std::to_string(c.model.embedding) + ", hidden " +
         std::to_string(c.model.hidden) + ", " + std::to_string(c.epochs) + " epochs of batches of " +
         std::to_string(c.batch_size) + ", Adam lr " + num(c.lr, 2) + ", greedy decoding, BLEU-4 on tokens." +
         (ctx.quick() ? " Quick mode: tiny models, indicative only." : "");
}

size_t source_length(const s2s::SentencePair& p) { return s2s::tokenize_training_text(p.source).size(); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// 3. Attention and sentence length

void length_experiment(Context& ctx, Report& report) {
  ctx.begin("length");
  const s2s::Corpus& corpus = ctx.corpus();
  const auto& with = ctx.train(preset_key(AttentionPreset::luong_general, 1),
                               preset_config(ctx, AttentionPreset::luong_general, 1), 0.0, 0.45);
  const auto& without = ctx.train(preset_key(AttentionPreset::none, 1),
                                  preset_config(ctx, AttentionPreset::none, 1), 0.45, 0.9);
  ctx.progress(0.9, "evaluating");
  std::vector<s2s::SentencePair> pairs = corpus.valid;
  pairs.insert(pairs.end(), corpus.test_long.begin(), corpus.test_long.end());
  const s2s::EvalResult r_with = s2s::evaluate(with.translator, pairs);
  const s2s::EvalResult r_without = s2s::evaluate(without.translator, pairs);
  const std::vector<std::pair<size_t, size_t>> buckets = {{4, 7}, {8, 11}, {12, 16}, {17, 20}, {21, 24}, {25, 1000}};
  Table table{"length_bleu", {"source_tokens_from", "source_tokens_to", "sentences", "mean_source_tokens",
                              "bleu_with_attention", "bleu_without_attention"}, {}};
  Series s_with{"with attention (Luong general)", {}, {}, {}, false, 0};
  Series s_without{"without attention (fixed context)", {}, {}, {}, false, 1};
  struct B { double len, with, without; size_t n; };
  std::vector<B> rows;
  for (const auto& [lo, hi] : buckets) {
    std::vector<s2s::Tokens> hw, hn, ref;
    double len = 0;
    for (size_t i = 0; i < pairs.size(); ++i) {
      const size_t n = source_length(pairs[i]);
      if (n < lo || n > hi) continue;
      hw.push_back(r_with.hypotheses[i]), hn.push_back(r_without.hypotheses[i]);
      ref.push_back(r_with.references[i]);
      len += static_cast<double>(n);
    }
    if (ref.size() < 5) continue;
    len /= static_cast<double>(ref.size());
    const double bw = s2s::corpus_bleu(hw, ref).bleu, bn = s2s::corpus_bleu(hn, ref).bleu;
    rows.push_back({len, bw, bn, ref.size()});
    table.add({std::to_string(lo), hi >= 1000 ? "" : std::to_string(hi), std::to_string(ref.size()),
               num(len, 4), num(bw, 4), num(bn, 4)});
    s_with.x.push_back(len), s_with.y.push_back(bw);
    s_without.x.push_back(len), s_without.y.push_back(bn);
  }
  Section sec = new_section("length", "3. Does attention help long sentences?",
                            "Bahdanau et al. (2015), Fig. 2: without attention, an encoder-decoder's BLEU falls "
                 "as sentences grow; with attention it holds up.");
  sec.charts.push_back(render(LineChart{"BLEU against source length", "source length (tokens, bucket mean)",
                                        "BLEU (0-100)", false, false, {s_with, s_without}}));
  if (rows.size() >= 2) {
    const B& a = rows.front();
    const B& b = rows.back();
    sec.conclusions.push_back("On the shortest sources (" + num(a.len, 3) + " tokens on average) BLEU was " +
                              num(a.with, 3) + " with attention and " + num(a.without, 3) +
                              " without; on the longest (" + num(b.len, 3) + " tokens, longer than any "
                              "training sentence when above 16) " + num(b.with, 3) + " and " + num(b.without, 3) + ".");
    const double gap_short = a.with - a.without, gap_long = b.with - b.without;
    sec.conclusions.push_back("The gain from attention was " + num(gap_short, 3) + " BLEU on short and " +
                              num(gap_long, 3) + " BLEU on long sources. " +
                              versus_claim(gap_long > gap_short && b.with > b.without,
                                           "attention helps most on long sentences"));
  }
  sec.conclusions.push_back("Same training budget: " + std::to_string(with.steps) + " steps each; training took " +
                            num(with.train_seconds, 3) + " s with attention and " + num(without.train_seconds, 3) +
                            " s without (" + std::to_string(with.parameters) + " and " +
                            std::to_string(without.parameters) + " parameters). Over all " +
                            std::to_string(pairs.size()) + " sentences: BLEU " + num(r_with.bleu.bleu, 3) +
                            " against " + num(r_without.bleu.bleu, 3) + ".");
  sec.notes.push_back(setup_note(ctx, corpus, preset_config(ctx, AttentionPreset::luong_general, 1)) +
                      " Evaluated on the validation split and the long test split (sources longer "
                      "than any in training); buckets of fewer than 5 sentences are left out.");
  sec.tables.push_back(std::move(table));
  finish(ctx, report, std::move(sec));
}

// ---------------------------------------------------------------------------------------------
// 4. Luong et al.'s comparison

void luong_experiment(Context& ctx, Report& report) {
  ctx.begin("luong");
  const s2s::Corpus& corpus = ctx.corpus();
  const std::vector<uint64_t> seeds = ctx.quick() ? std::vector<uint64_t>{1} : std::vector<uint64_t>{1, 2, 3};
  const auto& presets = luong_presets();
  Table table{"luong_runs", {"preset", "seed", "test_bleu", "exact_match", "train_seconds", "parameters", "steps"}, {}};
  struct Agg { Summary bleu, time; int64_t params = 0; };
  std::vector<Agg> agg;
  const double runs = static_cast<double>(presets.size() * seeds.size());
  double run_index = 0;
  for (const AttentionPreset p : presets) {
    std::vector<double> bleu, time;
    int64_t params = 0;
    for (const uint64_t seed : seeds) {
      const auto& t = ctx.train(preset_key(p, seed), preset_config(ctx, p, seed), run_index / runs,
                                (run_index + 0.9) / runs);
      ctx.progress((run_index + 0.9) / runs, "evaluating " + preset_key(p, seed));
      const s2s::EvalResult r = s2s::evaluate(t.translator, corpus.test);
      bleu.push_back(r.bleu.bleu), time.push_back(t.train_seconds);
      params = t.parameters;
      table.add({label(p), std::to_string(seed), num(r.bleu.bleu, 5), num(r.exact_match, 4),
                 num(t.train_seconds, 4), std::to_string(t.parameters), std::to_string(t.steps)});
      ++run_index;
    }
    agg.push_back({summarize(bleu), summarize(time), params});
  }
  BarChart bleu_chart{"Held-out BLEU per scoring function", "attention (decoder-score)", "test BLEU (0-100)", {}, {}, {}};
  BarChart time_chart{"Training time per scoring function", "attention (decoder-score)", "training time (s)", {}, {}, {}};
  BarChart param_chart{"Parameters per scoring function", "attention (decoder-score)", "parameters", {}, {}, {}};
  for (size_t i = 0; i < presets.size(); ++i) {
    const std::string name = label(presets[i]);
    bleu_chart.categories.push_back(name), bleu_chart.values.push_back(agg[i].bleu.mean);
    bleu_chart.error.push_back(agg[i].bleu.stddev);
    time_chart.categories.push_back(name), time_chart.values.push_back(agg[i].time.mean);
    time_chart.error.push_back(agg[i].time.stddev);
    param_chart.categories.push_back(name), param_chart.values.push_back(static_cast<double>(agg[i].params));
  }
  Section sec = new_section("luong", "4. Which of Luong's scoring functions works best?",
                            "Luong et al. (2015) compared global dot, general, concat and location scores and "
                 "local-m / local-p windows; additive (Bahdanau), scaled dot and cosine added here.");
  sec.charts.push_back(render(bleu_chart));
  sec.charts.push_back(render(time_chart));
  sec.charts.push_back(render(param_chart));
  size_t best = 0, worst = 0;
  for (size_t i = 0; i < agg.size(); ++i) {
    if (agg[i].bleu.mean > agg[best].bleu.mean) best = i;
    if (agg[i].bleu.mean < agg[worst].bleu.mean) worst = i;
  }
  const std::string spread = seeds.size() > 1 ? " (mean ± standard deviation over " + std::to_string(seeds.size()) + " seeds)" : " (one seed)";
  sec.conclusions.push_back("Best held-out BLEU: " + label(presets[best]) + " with " + num(agg[best].bleu.mean, 3) +
                            (seeds.size() > 1 ? " ± " + num(agg[best].bleu.stddev, 2) : "") + "; worst: " +
                            label(presets[worst]) + " with " + num(agg[worst].bleu.mean, 3) +
                            (seeds.size() > 1 ? " ± " + num(agg[worst].bleu.stddev, 2) : "") + spread + ".");
  size_t fastest = 0, slowest = 0;
  for (size_t i = 0; i < agg.size(); ++i) {
    if (agg[i].time.mean < agg[fastest].time.mean) fastest = i;
    if (agg[i].time.mean > agg[slowest].time.mean) slowest = i;
  }
  sec.conclusions.push_back("Training time ranged from " + num(agg[fastest].time.mean, 3) + " s (" +
                            label(presets[fastest]) + ") to " + num(agg[slowest].time.mean, 3) + " s (" +
                            label(presets[slowest]) + "): " + compare_times(label(presets[slowest]), agg[slowest].time.mean,
                                                                             label(presets[fastest]), agg[fastest].time.mean, "") +
                            ".");
  // Location against the content-based scores.
  std::vector<double> content;
  double location = NAN;
  for (size_t i = 0; i < presets.size(); ++i) {
    if (presets[i] == AttentionPreset::location) location = agg[i].bleu.mean;
    else content.push_back(agg[i].bleu.mean);
  }
  const double content_median = median(content);
  sec.conclusions.push_back("The location-only score (which never looks at the source words) reached " +
                            num(location, 3) + " BLEU against a median of " + num(content_median, 3) +
                            " for the content-based scores. " +
                            versus_claim(location < content_median, "location-based scoring is weaker than "
                                                                    "content-based scoring (Luong et al. 2015, Table 4)"));
  size_t dot = 0, general = 0;
  for (size_t i = 0; i < presets.size(); ++i) {
    if (presets[i] == AttentionPreset::luong_dot) dot = i;
    if (presets[i] == AttentionPreset::luong_general) general = i;
  }
  const double noise = std::max({agg[dot].bleu.stddev, agg[general].bleu.stddev, 0.5});
  const double diff = agg[general].bleu.mean - agg[dot].bleu.mean;
  sec.conclusions.push_back("General (q^T W k, " + std::to_string(agg[general].params - agg[dot].params) +
                            " more parameters) scored " + num(diff, 2) + " BLEU " + (diff >= 0 ? "above" : "below") +
                            " dot; " + (std::fabs(diff) <= noise ? "within" : "beyond") + " the noise of " +
                            num(noise, 2) + " BLEU" + (seeds.size() > 1 ? " (largest seed spread, at least 0.5)" : " (0.5 assumed: one seed)") + ".");
  sec.notes.push_back(setup_note(ctx, corpus, preset_config(ctx, AttentionPreset::luong_general, 1)) +
                      " Held-out BLEU: the test split, whose sentences hold noun-adjective combinations "
                      "never seen together in training. Error bars: standard deviation over seeds.");
  sec.tables.push_back(std::move(table));
  finish(ctx, report, std::move(sec));
}

// ---------------------------------------------------------------------------------------------
// 5. Heads

namespace {

// Per-head cross-attention weights [H][target row][source column] of the last decoder layer for
// one (source, target) pair, teacher-forced.
std::vector<std::vector<std::vector<double>>> per_head_weights(const s2s::Translator& tr, const s2s::Tokens& source,
                                             const s2s::Tokens& target) {
  const auto& model = std::get<s2s::TransformerSeq2Seq>(tr.model);
  const s2s::EncodedPair pair = s2s::encode_pair(tr.source_vocab, tr.target_vocab, source, target);
  const s2s::Batch batch = s2s::make_batch({pair}, {0});
  const s2s::TransformerForward fwd = model.forward(batch);
  const nn::AttentionSublayerCache& cross = fwd.layers.back().cross_attn;
  AttentionParams params = cross.params;
  params.return_weights = true;
  params.dropout = {};
  const AttentionOutput out = attention(cross.saved.q, cross.saved.k, cross.saved.v, params);
  const Tensor w = out.weights.contiguous();
  const int64_t H = w.shape()[1], T = w.shape()[2], S = w.shape()[3];
  std::vector<std::vector<std::vector<double>>> heads(static_cast<size_t>(H));
  const float* p = w.data<float>();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < T; ++i)
      heads[static_cast<size_t>(h)].emplace_back(p + (h * T + i) * S, p + (h * T + i + 1) * S);
  return heads;
}

const s2s::SentencePair& example_sentence(const s2s::Corpus& corpus) {
  for (const auto& p : corpus.test) {
    const size_t n = source_length(p);
    if (n >= 6 && n <= 10) return p;
  }
  return corpus.test.front();
}

}  // namespace

namespace {

// The histogram of an attention statistic (largest weight in [0, 1], entropy in [0, 3] nats).
std::string weight_histogram(const std::vector<double>& values, double hi, const std::string& title,
                             const std::string& what, const std::string& unit) {
  return render(histogram_chart(histogram(values, 0.0, hi, 10), title, what + " " + unit, "target words"));
}

}  // namespace

void heads_experiment(Context& ctx, Report& report) {
  ctx.begin("heads");
  const s2s::Corpus& corpus = ctx.corpus();
  const std::vector<int64_t> heads = {1, 2, 4, 8};
  // Two seeds even in quick mode: the differences between head counts are small, and only a
  // measured spread says whether one is real.
  const std::vector<uint64_t> seeds = {1, 2};
  Table table{"heads", {"heads", "head_dim", "seed", "test_bleu", "train_seconds", "parameters"}, {}};
  BarChart bleu_chart{"Transformer: held-out BLEU against heads", "heads (same d_model)", "test BLEU (0-100)", {}, {}, {}};
  BarChart time_chart{"Transformer: training time against heads", "heads (same d_model)", "training time (s)", {}, {}, {}};
  std::vector<Summary> bleu, time;
  const Context::Trained* last = nullptr;
  const double runs = static_cast<double>(heads.size() * seeds.size()) + 0.4;  // + heatmaps and histograms
  double run_index = 0;
  for (const int64_t h : heads) {
    std::vector<double> b, t;
    for (const uint64_t seed : seeds) {
      s2s::TrainConfig c = base_transformer_config(ctx, h);
      c.seed = seed;
      const std::string key = "transformer " + std::to_string(h) + " heads" + (seed == 1 ? "" : " seed " + std::to_string(seed));
      const auto& tr = ctx.train(key, c, run_index / runs, (run_index + 0.9) / runs);
      ctx.progress((run_index + 0.9) / runs, "evaluating " + key);
      const s2s::EvalResult r = s2s::evaluate(tr.translator, corpus.test);
      b.push_back(r.bleu.bleu), t.push_back(tr.train_seconds);
      table.add({std::to_string(h), std::to_string(c.model.hidden / h), std::to_string(seed), num(r.bleu.bleu, 5),
                 num(tr.train_seconds, 4), std::to_string(tr.parameters)});
      if (seed == seeds.front()) last = &tr;
      ++run_index;
    }
    bleu.push_back(summarize(b)), time.push_back(summarize(t));
    bleu_chart.categories.push_back(std::to_string(h)), bleu_chart.values.push_back(bleu.back().mean);
    bleu_chart.error.push_back(bleu.back().stddev);
    time_chart.categories.push_back(std::to_string(h)), time_chart.values.push_back(time.back().mean);
    time_chart.error.push_back(time.back().stddev);
  }
  Section sec = new_section("heads", "5. What do several heads buy?",
                            "Vaswani et al. (2017): multi-head attention lets the model attend to information "
                 "from different representation subspaces; one head averages them away.");
  sec.charts.push_back(render(bleu_chart));
  sec.charts.push_back(render(time_chart));
  size_t best = 0;
  for (size_t i = 0; i < bleu.size(); ++i)
    if (bleu[i].mean > bleu[best].mean) best = i;
  const bool several = seeds.size() > 1;
  auto pm = [&](const Summary& x) { return num(x.mean, 3) + (several ? " ± " + num(x.stddev, 2) : ""); };
  // The noise: the largest spread between seeds of any head count, at least 0.5 BLEU (assumed
  // with one seed), as for Luong's scores.
  double noise = 0.5;
  for (const Summary& x : bleu) noise = std::max(noise, x.stddev);
  const double gain = bleu[best].mean - bleu[0].mean;
  std::string best_text;
  if (best == 0)
    best_text = "1 head scored highest. ";
  else
    best_text = std::to_string(heads[best]) + " heads scored highest, " + num(gain, 2) + " BLEU above 1 head: " +
                (gain > noise ? "beyond" : "within") + " the noise of " + num(noise, 2) + " BLEU" +
                (several ? " (largest seed spread, at least 0.5)" : " (0.5 assumed: one seed)") +
                (gain > noise ? "." : ", so no head count is measurably best here.") + " ";
  sec.conclusions.push_back("At d_model " + std::to_string(base_transformer_config(ctx, 1).model.hidden) +
                            ", BLEU was " + pm(bleu[0]) + " with 1 head, " + pm(bleu[1]) + " with 2, " +
                            pm(bleu[2]) + " with 4 and " + pm(bleu[3]) + " with 8" +
                            (several ? " (mean ± standard deviation over " + std::to_string(seeds.size()) + " seeds)" : "") +
                            ". " + best_text +
                            versus_claim(gain > noise, "several heads translate better than one"));
  sec.conclusions.push_back(compare_times("8 heads", time[3].mean, "1 head", time[0].mean, "in training time") +
                            " (the same parameter count: heads split d_model).");
  // Per-head heatmaps of one held-out sentence, 8-head model.
  ctx.progress((run_index + 0.1) / runs, "per-head heatmaps");
  const s2s::SentencePair& example = example_sentence(corpus);
  const s2s::Tokens source = last->translator.source_tokens(example.source);
  const std::vector<s2s::Translation> tr = last->translator.translate({example.source}, {});
  s2s::Tokens target = last->translator.target_tokens(tr.front());
  const std::vector<std::vector<std::vector<double>>> per_head = per_head_weights(last->translator, source, target);
  s2s::Tokens cols = source, rows = target;
  cols.push_back("<eos>"), rows.push_back("<eos>");
  for (size_t h = 0; h < per_head.size(); ++h) {
    Heatmap hm;
    hm.title = "head " + std::to_string(h + 1) + " of " + std::to_string(per_head.size());
    hm.columns = cols, hm.rows = rows, hm.values = per_head[h];
    sec.charts.push_back(render(hm));
  }
  // Per-head histograms of the largest weight and the entropy per target word, over held-out
  // sentences (each teacher-forced on the model's own greedy translation).
  ctx.progress((run_index + 0.2) / runs, "per-head histograms");
  const size_t sentences = std::min<size_t>(corpus.test.size(), ctx.quick() ? 50 : 200);
  std::vector<std::string> sources;
  for (size_t i = 0; i < sentences; ++i) sources.push_back(corpus.test[i].source);
  const std::vector<s2s::Translation> outs = last->translator.translate(sources, {});
  std::vector<std::vector<double>> largest(per_head.size()), entropy(per_head.size());
  for (size_t i = 0; i < sentences; ++i) {
    const auto weights = per_head_weights(last->translator, last->translator.source_tokens(sources[i]),
                                          last->translator.target_tokens(outs[i]));
    for (size_t h = 0; h < weights.size() && h < largest.size(); ++h)
      for (const auto& row : weights[h]) {
        const RowStats st = row_stats(row);
        largest[h].push_back(st.largest), entropy[h].push_back(st.entropy);
      }
  }
  Table head_table{"head_rows", {"head", "rows", "mean_largest_weight", "mean_entropy_nats"}, {}};
  std::vector<std::string> histos_entropy;
  size_t sharpest = 0, softest = 0;
  for (size_t h = 0; h < largest.size(); ++h) {
    const std::string name = "head " + std::to_string(h + 1) + " of " + std::to_string(largest.size());
    sec.charts.push_back(weight_histogram(largest[h], 1.0, name + ": largest weight", "largest weight", "(bin start, 0-1)"));
    histos_entropy.push_back(weight_histogram(entropy[h], 3.0, name + ": entropy", "entropy", "(bin start, nats)"));
    head_table.add({std::to_string(h + 1), std::to_string(largest[h].size()), num(summarize(largest[h]).mean, 4),
                    num(summarize(entropy[h]).mean, 4)});
    if (summarize(largest[h]).mean > summarize(largest[sharpest]).mean) sharpest = h;
    if (summarize(largest[h]).mean < summarize(largest[softest]).mean) softest = h;
  }
  for (auto& c : histos_entropy) sec.charts.push_back(std::move(c));
  if (!largest.empty() && !largest[0].empty())
    sec.conclusions.push_back("The heads of the " + std::to_string(largest.size()) + "-head model differ: head " +
                              std::to_string(sharpest + 1) + " put on average " + num(summarize(largest[sharpest]).mean, 2) +
                              " of a target word's weight on one source word (entropy " +
                              num(summarize(entropy[sharpest]).mean, 2) + " nats), head " + std::to_string(softest + 1) +
                              " only " + num(summarize(largest[softest]).mean, 2) + " (" +
                              num(summarize(entropy[softest]).mean, 2) + " nats), over " + std::to_string(sentences) +
                              " held-out sentences.");
  sec.notes.push_back("Per-head heatmaps: cross-attention of the last decoder layer of the " +
                      std::to_string(heads.back()) + "-head model on the held-out sentence \"" + example.source +
                      "\" (its own greedy translation, teacher-forced), rows = target words, columns = source words. "
                      "Per-head histograms: the same layer over every target word of " + std::to_string(sentences) +
                      " held-out sentences; entropy above 3 nats is counted in the last bin.");
  sec.notes.push_back(setup_note(ctx, corpus, base_transformer_config(ctx, 4)));
  sec.tables.push_back(std::move(table));
  sec.tables.push_back(std::move(head_table));
  finish(ctx, report, std::move(sec));
}

// ---------------------------------------------------------------------------------------------
// 6. Alignments

void alignments_experiment(Context& ctx, Report& report) {
  ctx.begin("alignments");
  const s2s::Corpus& corpus = ctx.corpus();
  const auto& presets = luong_presets();
  const s2s::SentencePair& example = example_sentence(corpus);
  const size_t sentences = std::min<size_t>(corpus.test.size(), ctx.quick() ? 100 : 500);
  const std::vector<s2s::SentencePair> subset(corpus.test.begin(), corpus.test.begin() + static_cast<long>(sentences));
  std::vector<std::string> sources;
  for (const auto& p : subset) sources.push_back(p.source);
  Section sec = new_section("alignments", "6. What do the alignments look like?",
                            "Attention is often shown as a soft alignment: here for every scoring function, on "
                 "held-out sentences (English adjective-noun order is reversed in French).");
  Table table{"alignment_rows", {"preset", "rows", "mean_largest_weight", "median_largest_weight",
                                 "mean_entropy_nats", "rows_largest_above_0.9"}, {}};
  std::vector<std::string> heatmaps, histos_max, histos_entropy;
  struct Stat { std::string name; double mean_max, mean_entropy; };
  std::vector<Stat> stats;
  for (size_t i = 0; i < presets.size(); ++i) {
    const auto& t = ctx.train(preset_key(presets[i], 1), preset_config(ctx, presets[i], 1),
                              static_cast<double>(i) / static_cast<double>(presets.size()),
                              (static_cast<double>(i) + 0.8) / static_cast<double>(presets.size()));
    ctx.progress((static_cast<double>(i) + 0.8) / static_cast<double>(presets.size()), "alignments of " + label(presets[i]));
    // Heatmap of the example.
    std::vector<s2s::Tokens> src_tokens;
    const std::vector<s2s::Translation> ex = t.translator.translate({example.source}, {}, &src_tokens);
    Heatmap hm;
    hm.title = label(presets[i]);
    hm.columns = src_tokens.front(), hm.columns.push_back("<eos>");
    hm.rows = t.translator.target_tokens(ex.front()), hm.rows.push_back("<eos>");
    hm.values = ex.front().alignment;
    if (!hm.values.empty() && hm.values.size() >= hm.rows.size()) heatmaps.push_back(render(hm));
    // Rows of every sentence of the subset.
    const std::vector<s2s::Translation> all = t.translator.translate(sources, {});
    std::vector<double> largest, entropy;
    for (const auto& tr : all)
      for (const auto& row : tr.alignment) {
        const RowStats s = row_stats(row);
        largest.push_back(s.largest), entropy.push_back(s.entropy);
      }
    if (largest.empty()) continue;
    double peaked = 0;
    for (const double x : largest) peaked += x > 0.9 ? 1 : 0;
    table.add({label(presets[i]), std::to_string(largest.size()), num(summarize(largest).mean, 4),
               num(median(largest), 4), num(summarize(entropy).mean, 4),
               num(peaked / static_cast<double>(largest.size()), 4)});
    stats.push_back({label(presets[i]), summarize(largest).mean, summarize(entropy).mean});
    histos_max.push_back(weight_histogram(largest, 1.0, label(presets[i]) + ": largest weight", "largest weight",
                                          "(bin start, 0-1)"));
    histos_entropy.push_back(weight_histogram(entropy, 3.0, label(presets[i]) + ": entropy", "entropy", "(bin start, nats)"));
  }
  for (auto* group : {&heatmaps, &histos_max, &histos_entropy})
    for (auto& c : *group) sec.charts.push_back(std::move(c));
  if (!stats.empty()) {
    auto sharp = std::max_element(stats.begin(), stats.end(), [](const Stat& a, const Stat& b) { return a.mean_max < b.mean_max; });
    auto soft = std::min_element(stats.begin(), stats.end(), [](const Stat& a, const Stat& b) { return a.mean_max < b.mean_max; });
    sec.conclusions.push_back("Sharpest alignments: " + sharp->name + " (mean largest weight " + num(sharp->mean_max, 2) +
                              ", entropy " + num(sharp->mean_entropy, 2) + " nats); most diffuse: " + soft->name +
                              " (" + num(soft->mean_max, 2) + ", " + num(soft->mean_entropy, 2) + " nats), over " +
                              std::to_string(sentences) + " held-out sentences.");
    size_t sharp_count = 0;
    for (const auto& s : stats) sharp_count += s.mean_max > 0.5 ? 1 : 0;
    sec.conclusions.push_back(std::to_string(sharp_count) + " of " + std::to_string(stats.size()) +
                              " scoring functions put on average more than half of a target word's weight on "
                              "one source word. " +
                              versus_claim(2 * sharp_count > stats.size(),
                                           "attention learns sharp, nearly one-to-one alignments"));
  }
  sec.notes.push_back("Heatmaps: the greedy translation of the held-out sentence \"" + example.source +
                      "\" by each model (rows = output words, columns = source words, white 0 to dark "
                      "blue 1). Histograms: every output word of " + std::to_string(sentences) +
                      " held-out sentences; entropy above 3 nats is counted in the last bin.");
  sec.notes.push_back(setup_note(ctx, corpus, preset_config(ctx, AttentionPreset::luong_general, 1)));
  sec.tables.push_back(std::move(table));
  finish(ctx, report, std::move(sec));
}

}  // namespace attn::experiments
