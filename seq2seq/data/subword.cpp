#include "seq2seq/data/subword.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <array>
#include <mutex>
#include <unordered_map>

#include "attn/error.h"
#include "seq2seq/data/pairs_file.h"

namespace attn::seq2seq {
namespace {

constexpr const char* kOp = "subword";

// Feeds the training sentences to SentencePiece without a temporary file.
class VectorIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>& sentences) : sentences_(sentences) {
    skip_empty();
  }
  bool done() const override { return i_ >= sentences_.size(); }
  void Next() override {
    ++i_;
    skip_empty();
  }
  const std::string& value() const override { return sentences_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  void skip_empty() {
    while (i_ < sentences_.size() && sentences_[i_].empty()) ++i_;
  }
  const std::vector<std::string>& sentences_;
  std::size_t i_ = 0;
};

constexpr const char* kPlaceholders = "%s,%d,%i,%u,%ld,%lu,%lld,%zu,%f,%c,%x,%%,{0},{1},{2}";

}  // namespace

struct SubwordModel::Impl {
  sentencepiece::SentencePieceProcessor processor;
};

const char* subword_kind_name(SubwordKind kind) {
  return kind == SubwordKind::bpe ? "bpe" : "unigram";
}

SubwordModel SubwordModel::train(const std::vector<std::string>& sentences,
                                 const SubwordConfig& config) {
  ATTN_CHECK(config.vocab_size >= 8, kOp, "vocabulary size must be >= 8, got ", config.vocab_size);
  bool any = false;
  for (const std::string& s : sentences) {
    ATTN_CHECK(is_valid_utf8(s), kOp, "training sentence is not valid UTF-8: ", s.substr(0, 40));
    any = any || !s.empty();
  }
  ATTN_CHECK(any, kOp, "no training text to learn a subword vocabulary from");
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", subword_kind_name(config.kind)},
      {"vocab_size", std::to_string(config.vocab_size)},
      {"hard_vocab_limit", "false"},
      {"character_coverage", "1.0"},
      {"byte_fallback", "true"},
      {"normalization_rule_name", "identity"},
      {"user_defined_symbols", kPlaceholders},
      {"input_sentence_size", "0"},
      {"max_sentence_length", "16384"},
      {"num_threads", std::to_string(std::max(1, config.threads))},
      {"minloglevel", "2"},
      {"model_prefix", ""},
  };
  // SentencePiece's random generator is global; training is otherwise deterministic.
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned>(config.seed));
  VectorIterator it(sentences);
  std::string proto;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &proto);
  ATTN_CHECK(status.ok(), kOp, "SentencePiece could not learn a ", subword_kind_name(config.kind),
             " vocabulary of ", config.vocab_size, " pieces: ", status.ToString());
  return from_serialized(proto, "the trained subword model");
}

SubwordModel SubwordModel::from_serialized(const std::string& proto, const std::string& source_name) {
  auto impl = std::make_shared<Impl>();
  const auto status = impl->processor.LoadFromSerializedProto(proto);
  ATTN_CHECK(status.ok(), kOp, source_name, ": not a SentencePiece model: ", status.ToString());
  SubwordModel m;
  m.impl_ = std::move(impl);
  m.serialized_ = proto;
  return m;
}

Tokens SubwordModel::encode(std::string_view text) const {
  std::size_t offset = 0;
  ATTN_CHECK(is_valid_utf8(text, &offset), kOp, "text is not valid UTF-8 (byte ", offset, ")");
  Tokens pieces;
  const auto status = impl_->processor.Encode(text, &pieces);
  ATTN_CHECK(status.ok(), kOp, "SentencePiece could not encode the text: ", status.ToString());
  return pieces;
}

std::string SubwordModel::decode(const Tokens& pieces) const {
  std::string text;
  const auto status = impl_->processor.Decode(pieces, &text);
  ATTN_CHECK(status.ok(), kOp, "SentencePiece could not decode ", pieces.size(),
             " pieces: ", status.ToString());
  return text;
}

std::vector<std::string> SubwordModel::pieces() const {
  std::vector<std::string> out;
  const auto& p = impl_->processor;
  for (int id = 0; id < p.GetPieceSize(); ++id)
    if (!p.IsControl(id) && !p.IsUnknown(id)) out.push_back(p.IdToPiece(id));
  return out;
}

Vocab subword_vocab(const SubwordModel& model) {
  std::vector<std::string> tokens = {Vocab::pad_token, Vocab::unk_token, Vocab::bos_token,
                                     Vocab::eos_token};
  for (std::string& piece : model.pieces()) tokens.push_back(std::move(piece));
  return Vocab::from_tokens(tokens);
}

namespace {
constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}

std::string base64_encode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  for (std::size_t i = 0; i < bytes.size(); i += 3) {
    uint32_t v = static_cast<unsigned char>(bytes[i]) << 16;
    if (i + 1 < bytes.size()) v |= static_cast<unsigned char>(bytes[i + 1]) << 8;
    if (i + 2 < bytes.size()) v |= static_cast<unsigned char>(bytes[i + 2]);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += i + 1 < bytes.size() ? kAlphabet[(v >> 6) & 63] : '=';
    out += i + 2 < bytes.size() ? kAlphabet[v & 63] : '=';
  }
  return out;
}

std::string base64_decode(std::string_view text, const std::string& source_name) {
  ATTN_CHECK(text.size() % 4 == 0, kOp, source_name, ": base64 length ", text.size(),
             " is not a multiple of 4");
  std::array<int, 256> value;
  value.fill(-1);
  for (int i = 0; i < 64; ++i) value[static_cast<unsigned char>(kAlphabet[i])] = i;
  std::string out;
  out.reserve(text.size() / 4 * 3);
  for (std::size_t i = 0; i < text.size(); i += 4) {
    const bool last = i + 4 == text.size();
    uint32_t v = 0;
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      const unsigned char c = static_cast<unsigned char>(text[i + k]);
      if (c == '=' && last && k >= 2 && (k == 3 || text[i + 3] == '=')) {
        ++pad;
        v <<= 6;
        continue;
      }
      ATTN_CHECK(value[c] >= 0 && pad == 0, kOp, source_name, ": invalid base64 at offset ", i + k);
      v = (v << 6) | static_cast<uint32_t>(value[c]);
    }
    out += static_cast<char>((v >> 16) & 0xFF);
    if (pad < 2) out += static_cast<char>((v >> 8) & 0xFF);
    if (pad < 1) out += static_cast<char>(v & 0xFF);
  }
  return out;
}

}  // namespace attn::seq2seq
