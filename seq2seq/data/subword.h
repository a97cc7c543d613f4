// Subword vocabularies with SentencePiece (Kudo and Richardson 2018; Debian's libsentencepiece),
// trained and applied in-process.
//
// A SubwordModel turns raw text into pieces ("▁Fichier", "▁introuv", "able", "<0xC3>") and back:
// decode(encode(text)) == text for every text of the training data's characters after
// SentencePiece's whitespace handling (leading, trailing and repeated spaces collapse). The
// models are trained with:
//   - BPE or unigram, vocab_size pieces (a limit: small data may give fewer, never an error)
//   - identity normalisation: case, accents, digits and punctuation are kept as written
//   - character_coverage 1: every character of the training text is a piece
//   - byte fallback: a character never seen becomes its UTF-8 bytes (<0xNN> pieces), so there
//     is no <unk> and the decoder can still write any character
//   - printf and format placeholders as indivisible pieces: %s %d %i %u %ld %lu %lld %zu %f %c
//     %x %% {0} {1} {2}, so "%.2f" and "{0}" survive (the first as pieces, decoded back exactly)
// The serialized model (SentencePiece's protobuf) is what a checkpoint stores.
//
// The translator's Vocab over a subword model (subword_vocab): attn's four special tokens
// first, then every piece in SentencePiece's id order except its own control pieces (<unk>,
// <s>, </s>), so the ids are a pure function of the model.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {

enum class SubwordKind { bpe, unigram };
const char* subword_kind_name(SubwordKind kind);  // "bpe", "unigram"

struct SubwordConfig {
  SubwordKind kind = SubwordKind::bpe;
  int64_t vocab_size = 8000;
  uint64_t seed = 1;
  int threads = 1;
};

class SubwordModel {
 public:
  // Trains on `sentences` (empty lines are ignored). Throws attn::Error for no text or a
  // vocabulary size below what the characters need, with SentencePiece's reason.
  static SubwordModel train(const std::vector<std::string>& sentences, const SubwordConfig& config);
  // From SentencePiece's serialized model proto; `source_name` names it in errors.
  static SubwordModel from_serialized(const std::string& proto, const std::string& source_name);

  // Pieces of `text` (valid UTF-8; attn::Error otherwise).
  Tokens encode(std::string_view text) const;
  // Text of `pieces` (byte pieces reassembled; an incomplete byte sequence becomes U+FFFD).
  std::string decode(const Tokens& pieces) const;
  // Every piece, in SentencePiece's id order, without its control and unknown pieces.
  std::vector<std::string> pieces() const;
  const std::string& serialized() const { return serialized_; }

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  std::string serialized_;
};

// attn's Vocab over the model's pieces (see above).
Vocab subword_vocab(const SubwordModel& model);

// Base64 (RFC 4648, with padding), for storing a serialized model in checkpoint metadata.
std::string base64_encode(std::string_view bytes);
// Throws attn::Error naming `source_name` for a character outside the alphabet or bad padding.
std::string base64_decode(std::string_view text, const std::string& source_name);

}  // namespace attn::seq2seq
