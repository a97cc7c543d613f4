// The batches of a training run as text, for replaying the same steps in another framework
// (bench/torch_translators.py, the PyTorch twins of the benchmarked translators):
//
//   attn-batches 1 <source vocab> <target vocab> <pad id> <bos id> <eos id>
//   batch <step> <B> <S> <T>
//   source <B S ids, row-major [B, S]>
//   source_lengths <B>
//   target_input <T B ids, time-major [T, B]>
//   target_output <T B ids, time-major [T, B]>
//   target_lengths <B>
//
// A batch's training tokens are its source and target lengths summed (one <eos> per side).
#pragma once

#include <cstdint>
#include <ostream>

#include "seq2seq/data/batching.h"

namespace attn::seq2seq {

void write_batch_log_header(std::ostream& out, int64_t source_vocab, int64_t target_vocab);
void write_batch_log_entry(std::ostream& out, int64_t step, const Batch& batch);

// Source plus target tokens of a batch, <eos> included on both sides.
int64_t batch_training_tokens(const Batch& batch);

}  // namespace attn::seq2seq
