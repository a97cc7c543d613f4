// Checkpoint averaging, as Marian, fairseq and OpenNMT-py offer it: the element-wise mean of the
// model weights of the last few checkpoints of one run usually translates better than any one
// of them (the average sits nearer the centre of the basin SGD wanders round).
//
// Training keeps numbered copies "checkpoint-<step>.safetensors" beside checkpoint.safetensors
// when asked to (attn train --keep-checkpoints N); `attn average` averages them (or any files
// of one model) into a new checkpoint that translate and eval load like any other.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "seq2seq/training/safetensors.h"

namespace attn::seq2seq {

// The mean of the "model.*" tensors of `paths` (at least one file), accumulated in float64 in
// the order given and stored in each tensor's own dtype. Everything else (configuration,
// vocabularies, optimizer and data position) comes from the last file, so the result resumes,
// translates and evaluates as that checkpoint does, with the averaged weights; metadata
// "averaged_from" lists the file names. Throws attn::Error naming the file when one cannot be
// read, when a file's configuration or vocabularies differ from the last file's (another model),
// or when a model tensor is missing, extra, or of another shape or dtype (naming the tensor and
// both shapes).
SafetensorsFile average_checkpoints(const std::vector<std::string>& paths);

// The numbered checkpoints in `dir` ("checkpoint-<step>.safetensors"), oldest step first.
struct NumberedCheckpoint {
  int64_t step = 0;
  std::string path;
};
std::vector<NumberedCheckpoint> numbered_checkpoints(const std::string& dir);

// Copies the checkpoint just written at `checkpoint_path` to "checkpoint-<step>.safetensors" in
// its directory (atomically, like every checkpoint write) and removes the oldest numbered ones
// beyond the newest `keep` (keep >= 1). Returns the numbered file's path.
std::string keep_numbered_checkpoint(const std::string& checkpoint_path, int64_t step, int64_t keep);

}  // namespace attn::seq2seq
