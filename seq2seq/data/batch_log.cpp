#include "seq2seq/data/batch_log.h"

#include <numeric>
#include <vector>

#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {
namespace {

template <class T>
void write_row(std::ostream& out, const char* name, const std::vector<T>& values) {
  out << name;
  for (const T& v : values) out << ' ' << v;
  out << '\n';
}

}  // namespace

void write_batch_log_header(std::ostream& out, int64_t source_vocab, int64_t target_vocab) {
  out << "attn-batches 1 " << source_vocab << ' ' << target_vocab << ' ' << Vocab::pad_id << ' '
      << Vocab::bos_id << ' ' << Vocab::eos_id << '\n';
}

void write_batch_log_entry(std::ostream& out, int64_t step, const Batch& batch) {
  out << "batch " << step << ' ' << batch.batch << ' ' << batch.source_steps << ' '
      << batch.target_steps << '\n';
  write_row(out, "source", batch.source);
  write_row(out, "source_lengths", batch.source_lengths);
  write_row(out, "target_input", batch.target_input);
  write_row(out, "target_output", batch.target_output);
  write_row(out, "target_lengths", batch.target_lengths);
}

int64_t batch_training_tokens(const Batch& batch) {
  return std::accumulate(batch.source_lengths.begin(), batch.source_lengths.end(), int64_t{0}) +
         std::accumulate(batch.target_lengths.begin(), batch.target_lengths.end(), int64_t{0});
}

}  // namespace attn::seq2seq
