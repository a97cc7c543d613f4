#include "seq2seq/decoding/png.h"

#include <algorithm>
#include <array>
#include <string>

#include "attn/error.h"

namespace attn::seq2seq::png {
namespace {

constexpr const char* kOp = "png";

// ---------------------------------------------------------------------------------------------
// Checksums

// Byte-at-a-time table of the reflected CRC: table[n] is the CRC register after shifting the
// byte n through eight rounds of the polynomial.
std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t n = 0; n < 256; ++n) {
    uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[n] = c;
  }
  return table;
}

// ---------------------------------------------------------------------------------------------
// Font

using GlyphRows = std::array<uint8_t, glyph_height>;  // bit 4 is the leftmost column

// Printable ASCII 0x20..0x7E.
constexpr GlyphRows kAscii[95] = {
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // ' '
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04, 0x00, 0x00},  // '!'
    {0x0A, 0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // '"'
    {0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A, 0x00, 0x00},  // '#'
    {0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04, 0x00, 0x00},  // '$'
    {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03, 0x00, 0x00},  // '%'
    {0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D, 0x00, 0x00},  // '&'
    {0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // '''
    {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02, 0x00, 0x00},  // '('
    {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08, 0x00, 0x00},  // ')'
    {0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00, 0x00, 0x00},  // '*'
    {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00, 0x00, 0x00},  // '+'
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x04, 0x08, 0x00},  // ','
    {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00, 0x00},  // '-'
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x00, 0x00},  // '.'
    {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00, 0x00, 0x00},  // '/'
    {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E, 0x00, 0x00},  // '0'
    {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00},  // '1'
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F, 0x00, 0x00},  // '2'
    {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E, 0x00, 0x00},  // '3'
    {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02, 0x00, 0x00},  // '4'
    {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E, 0x00, 0x00},  // '5'
    {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E, 0x00, 0x00},  // '6'
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08, 0x00, 0x00},  // '7'
    {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E, 0x00, 0x00},  // '8'
    {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C, 0x00, 0x00},  // '9'
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00, 0x00, 0x00},  // ':'
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x08, 0x00, 0x00},  // ';'
    {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02, 0x00, 0x00},  // '<'
    {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00},  // '='
    {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08, 0x00, 0x00},  // '>'
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04, 0x00, 0x00},  // '?'
    {0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E, 0x00, 0x00},  // '@'
    {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00, 0x00},  // 'A'
    {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E, 0x00, 0x00},  // 'B'
    {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E, 0x00, 0x00},  // 'C'
    {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C, 0x00, 0x00},  // 'D'
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F, 0x00, 0x00},  // 'E'
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10, 0x00, 0x00},  // 'F'
    {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F, 0x00, 0x00},  // 'G'
    {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00, 0x00},  // 'H'
    {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00},  // 'I'
    {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C, 0x00, 0x00},  // 'J'
    {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11, 0x00, 0x00},  // 'K'
    {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F, 0x00, 0x00},  // 'L'
    {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11, 0x00, 0x00},  // 'M'
    {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x00, 0x00},  // 'N'
    {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00},  // 'O'
    {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10, 0x00, 0x00},  // 'P'
    {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D, 0x00, 0x00},  // 'Q'
    {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11, 0x00, 0x00},  // 'R'
    {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E, 0x00, 0x00},  // 'S'
    {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00},  // 'T'
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00},  // 'U'
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00, 0x00},  // 'V'
    {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A, 0x00, 0x00},  // 'W'
    {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11, 0x00, 0x00},  // 'X'
    {0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00},  // 'Y'
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F, 0x00, 0x00},  // 'Z'
    {0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E, 0x00, 0x00},  // '['
    {0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00, 0x00, 0x00},  // 'backslash'
    {0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E, 0x00, 0x00},  // ']'
    {0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // '^'
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F, 0x00, 0x00},  // '_'
    {0x08, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // '`'
    {0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F, 0x00, 0x00},  // 'a'
    {0x10, 0x10, 0x1E, 0x11, 0x11, 0x11, 0x1E, 0x00, 0x00},  // 'b'
    {0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E, 0x00, 0x00},  // 'c'
    {0x01, 0x01, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x00, 0x00},  // 'd'
    {0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E, 0x00, 0x00},  // 'e'
    {0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08, 0x00, 0x00},  // 'f'
    {0x00, 0x00, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // 'g'
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00},  // 'h'
    {0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00},  // 'i'
    {0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C},  // 'j'
    {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12, 0x00, 0x00},  // 'k'
    {0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00},  // 'l'
    {0x00, 0x00, 0x1A, 0x15, 0x15, 0x15, 0x15, 0x00, 0x00},  // 'm'
    {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00},  // 'n'
    {0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00},  // 'o'
    {0x00, 0x00, 0x1E, 0x11, 0x11, 0x11, 0x1E, 0x10, 0x10},  // 'p'
    {0x00, 0x00, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x01},  // 'q'
    {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10, 0x00, 0x00},  // 'r'
    {0x00, 0x00, 0x0F, 0x10, 0x0E, 0x01, 0x1E, 0x00, 0x00},  // 's'
    {0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06, 0x00, 0x00},  // 't'
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D, 0x00, 0x00},  // 'u'
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00, 0x00},  // 'v'
    {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A, 0x00, 0x00},  // 'w'
    {0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00, 0x00},  // 'x'
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // 'y'
    {0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F, 0x00, 0x00},  // 'z'
    {0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02, 0x00, 0x00},  // '{'
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00},  // '|'
    {0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08, 0x00, 0x00},  // '}'
    {0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00, 0x00, 0x00},  // '~'
};

// A hollow box for characters the font lacks.
constexpr GlyphRows kBox = {0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F, 0x00, 0x00};

enum class Accent { none, acute, grave, circumflex, diaeresis, tilde, cedilla };

// Two rows drawn above a lowercase letter (rows 0-1, where lowercase glyphs are blank).
GlyphRows with_accent(GlyphRows base, Accent accent, bool lowercase) {
  auto above = [&](uint8_t r0, uint8_t r1) {
    if (!lowercase) return;  // capitals fill rows 0-1: the bare letter stays readable
    base[0] = r0;
    base[1] = r1;
  };
  switch (accent) {
    case Accent::none: break;
    case Accent::acute: above(0x02, 0x04); break;
    case Accent::grave: above(0x08, 0x04); break;
    case Accent::circumflex: above(0x04, 0x0A); break;
    case Accent::diaeresis: above(0x0A, 0x00); break;
    case Accent::tilde: above(0x0D, 0x16); break;
    case Accent::cedilla:  // below the baseline, where c and C have nothing
      base[7] = 0x04;
      base[8] = 0x0C;
      break;
  }
  return base;
}

GlyphRows ascii_glyph(char c) { return kAscii[static_cast<unsigned char>(c) - 0x20]; }

// Latin-1 letters U+00C0..U+00FF as (base letters, accent); an empty base means "no glyph".
struct Latin1Letter {
  const char* base;
  Accent accent;
};
constexpr Latin1Letter kLatin1[64] = {
    {"A", Accent::grave}, {"A", Accent::acute}, {"A", Accent::circumflex}, {"A", Accent::tilde},
    {"A", Accent::diaeresis}, {"A", Accent::none}, {"AE", Accent::none}, {"C", Accent::cedilla},
    {"E", Accent::grave}, {"E", Accent::acute}, {"E", Accent::circumflex}, {"E", Accent::diaeresis},
    {"I", Accent::grave}, {"I", Accent::acute}, {"I", Accent::circumflex}, {"I", Accent::diaeresis},
    {"D", Accent::none}, {"N", Accent::tilde}, {"O", Accent::grave}, {"O", Accent::acute},
    {"O", Accent::circumflex}, {"O", Accent::tilde}, {"O", Accent::diaeresis}, {"x", Accent::none},
    {"O", Accent::none}, {"U", Accent::grave}, {"U", Accent::acute}, {"U", Accent::circumflex},
    {"U", Accent::diaeresis}, {"Y", Accent::acute}, {"", Accent::none}, {"ss", Accent::none},
    {"a", Accent::grave}, {"a", Accent::acute}, {"a", Accent::circumflex}, {"a", Accent::tilde},
    {"a", Accent::diaeresis}, {"a", Accent::none}, {"ae", Accent::none}, {"c", Accent::cedilla},
    {"e", Accent::grave}, {"e", Accent::acute}, {"e", Accent::circumflex}, {"e", Accent::diaeresis},
    {"i", Accent::grave}, {"i", Accent::acute}, {"i", Accent::circumflex}, {"i", Accent::diaeresis},
    {"d", Accent::none}, {"n", Accent::tilde}, {"o", Accent::grave}, {"o", Accent::acute},
    {"o", Accent::circumflex}, {"o", Accent::tilde}, {"o", Accent::diaeresis}, {"/", Accent::none},
    {"o", Accent::none}, {"u", Accent::grave}, {"u", Accent::acute}, {"u", Accent::circumflex},
    {"u", Accent::diaeresis}, {"y", Accent::acute}, {"", Accent::none}, {"y", Accent::diaeresis},
};

// Decodes one UTF-8 code point at text[i]; returns its length, or 0 for an invalid sequence
// (a stray continuation byte, a truncated or overlong sequence, a surrogate, > U+10FFFF).
std::size_t decode_utf8(std::string_view text, std::size_t i, uint32_t& cp) {
  const unsigned char c = static_cast<unsigned char>(text[i]);
  std::size_t n;
  uint32_t min;
  if (c < 0x80) { cp = c; return 1; }
  if ((c >> 5) == 0x6) { n = 2; cp = c & 0x1F; min = 0x80; }
  else if ((c >> 4) == 0xE) { n = 3; cp = c & 0x0F; min = 0x800; }
  else if ((c >> 3) == 0x1E) { n = 4; cp = c & 0x07; min = 0x10000; }
  else return 0;
  if (i + n > text.size()) return 0;
  for (std::size_t k = 1; k < n; ++k) {
    const unsigned char d = static_cast<unsigned char>(text[i + k]);
    if ((d >> 6) != 0x2) return 0;
    cp = (cp << 6) | (d & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

// The glyphs `text` is drawn with.
std::vector<GlyphRows> glyphs_of(std::string_view text) {
  std::vector<GlyphRows> out;
  auto spell = [&](const char* letters, Accent accent) {
    for (const char* p = letters; *p; ++p) {
      const bool lower = *p >= 'a' && *p <= 'z';
      out.push_back(with_accent(ascii_glyph(*p), accent, lower));
    }
  };
  for (std::size_t i = 0; i < text.size();) {
    uint32_t cp = 0;
    const std::size_t n = decode_utf8(text, i, cp);
    if (n == 0) {  // one box per invalid byte, then resynchronise on the next byte
      out.push_back(kBox);
      ++i;
      continue;
    }
    i += n;
    if (cp >= 0x20 && cp <= 0x7E) {
      out.push_back(ascii_glyph(static_cast<char>(cp)));
    } else if (cp >= 0xC0 && cp <= 0xFF && kLatin1[cp - 0xC0].base[0] != '\0') {
      const Latin1Letter& l = kLatin1[cp - 0xC0];
      if (l.base[0] == 'i' && l.accent != Accent::none) {
        // A dotless i under the accent: the body of 'i' without its dot.
        GlyphRows dotless = ascii_glyph('i');
        dotless[0] = dotless[1] = 0;
        out.push_back(with_accent(dotless, l.accent, true));
      } else {
        spell(l.base, l.accent);
      }
    } else if (cp == 0x152) {
      spell("OE", Accent::none);
    } else if (cp == 0x153) {
      spell("oe", Accent::none);
    } else if (cp == 0x178) {
      spell("Y", Accent::diaeresis);
    } else {
      out.push_back(kBox);
    }
  }
  return out;
}

void put_u32_be(std::vector<uint8_t>& out, uint32_t v) {
  out.push_back(static_cast<uint8_t>(v >> 24));
  out.push_back(static_cast<uint8_t>(v >> 16));
  out.push_back(static_cast<uint8_t>(v >> 8));
  out.push_back(static_cast<uint8_t>(v));
}

// length, type, data, CRC-32 of type and data.
void put_chunk(std::vector<uint8_t>& out, const char (&type)[5], std::span<const uint8_t> data) {
  ATTN_CHECK(data.size() <= 0x7FFFFFFFu, kOp, "chunk ", type, " of ", data.size(),
             " bytes exceeds PNG's 2^31 - 1");
  put_u32_be(out, static_cast<uint32_t>(data.size()));
  const std::size_t type_at = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put_u32_be(out, crc32(std::span(out).subspan(type_at)));
}

}  // namespace

uint32_t crc32(std::span<const uint8_t> bytes, uint32_t crc) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  uint32_t c = crc ^ 0xFFFFFFFFu;
  for (uint8_t b : bytes) c = table[(c ^ b) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t adler32(std::span<const uint8_t> bytes, uint32_t adler) {
  constexpr uint32_t kMod = 65521;  // the largest prime below 2^16
  // 5552 is the most bytes for which b cannot overflow 32 bits before the modulo (RFC 1950's
  // reference code uses the same bound).
  constexpr std::size_t kBlock = 5552;
  uint32_t a = adler & 0xFFFFu, b = adler >> 16;
  for (std::size_t start = 0; start < bytes.size(); start += kBlock) {
    const std::size_t end = std::min(bytes.size(), start + kBlock);
    for (std::size_t i = start; i < end; ++i) {
      a += bytes[i];
      b += a;
    }
    a %= kMod;
    b %= kMod;
  }
  return (b << 16) | a;
}

RgbImage::RgbImage(int64_t width, int64_t height, Rgb background) : width_(width), height_(height) {
  ATTN_CHECK(width >= 1 && height >= 1 && width <= max_side && height <= max_side, kOp,
             "image of ", width, " x ", height, " pixels: each side must be in [1, ", max_side, "]");
  pixels_.resize(static_cast<std::size_t>(width * height * 3));
  for (std::size_t i = 0; i < pixels_.size(); i += 3) {
    pixels_[i] = background.r;
    pixels_[i + 1] = background.g;
    pixels_[i + 2] = background.b;
  }
}

Rgb RgbImage::at(int64_t x, int64_t y) const {
  ATTN_CHECK(x >= 0 && y >= 0 && x < width_ && y < height_, kOp, "pixel (", x, ", ", y,
             ") is outside the ", width_, " x ", height_, " image");
  const std::size_t i = static_cast<std::size_t>((y * width_ + x) * 3);
  return {pixels_[i], pixels_[i + 1], pixels_[i + 2]};
}

void RgbImage::set(int64_t x, int64_t y, Rgb colour) {
  if (x < 0 || y < 0 || x >= width_ || y >= height_) return;
  const std::size_t i = static_cast<std::size_t>((y * width_ + x) * 3);
  pixels_[i] = colour.r;
  pixels_[i + 1] = colour.g;
  pixels_[i + 2] = colour.b;
}

void RgbImage::fill_rect(int64_t x, int64_t y, int64_t w, int64_t h, Rgb colour) {
  const int64_t x0 = std::max<int64_t>(x, 0), y0 = std::max<int64_t>(y, 0);
  const int64_t x1 = std::min(x + w, width_), y1 = std::min(y + h, height_);
  for (int64_t yy = y0; yy < y1; ++yy)
    for (int64_t xx = x0; xx < x1; ++xx) set(xx, yy, colour);
}

std::vector<uint8_t> encode_png(const RgbImage& image) {
  const int64_t W = image.width(), H = image.height();
  const std::size_t row_bytes = static_cast<std::size_t>(W) * 3;
  // Scanlines with their filter byte (0: None), as the zlib stream's payload.
  std::vector<uint8_t> raw;
  raw.reserve((row_bytes + 1) * static_cast<std::size_t>(H));
  for (int64_t y = 0; y < H; ++y) {
    raw.push_back(0);
    const auto row = image.pixels().begin() + static_cast<std::ptrdiff_t>(y * row_bytes);
    raw.insert(raw.end(), row, row + static_cast<std::ptrdiff_t>(row_bytes));
  }
  // zlib: CMF 0x78 (deflate, 32 KiB window), FLG 0x01 (no dictionary, level "fastest";
  // 0x7801 is a multiple of 31 as RFC 1950 requires), stored blocks, Adler-32 big-endian.
  constexpr std::size_t kMaxStored = 65535;
  std::vector<uint8_t> z = {0x78, 0x01};
  z.reserve(raw.size() + raw.size() / kMaxStored * 5 + 16);
  for (std::size_t start = 0; start < raw.size(); start += kMaxStored) {
    const std::size_t len = std::min(kMaxStored, raw.size() - start);
    const bool final_block = start + len == raw.size();
    // Block header bits: BFINAL, then BTYPE = 00 (stored); the rest of the byte is padding to
    // the byte boundary, after which come LEN and its one's complement NLEN, little-endian.
    z.push_back(final_block ? 1 : 0);
    z.push_back(static_cast<uint8_t>(len & 0xFF));
    z.push_back(static_cast<uint8_t>(len >> 8));
    z.push_back(static_cast<uint8_t>(~len & 0xFF));
    z.push_back(static_cast<uint8_t>((~len >> 8) & 0xFF));
    z.insert(z.end(), raw.begin() + static_cast<std::ptrdiff_t>(start),
             raw.begin() + static_cast<std::ptrdiff_t>(start + len));
  }
  put_u32_be(z, adler32(raw));

  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> ihdr;
  put_u32_be(ihdr, static_cast<uint32_t>(W));
  put_u32_be(ihdr, static_cast<uint32_t>(H));
  // bit depth 8, colour type 2 (RGB), compression 0, filter method 0, no interlace
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});
  put_chunk(png, "IHDR", ihdr);
  put_chunk(png, "IDAT", z);
  put_chunk(png, "IEND", {});
  return png;
}

int64_t glyph_count(std::string_view text) { return static_cast<int64_t>(glyphs_of(text).size()); }

int64_t text_length(std::string_view text, int scale) {
  return glyph_count(text) * glyph_advance * scale;
}

void draw_text(RgbImage& image, int64_t x, int64_t y, std::string_view text, const TextStyle& style) {
  ATTN_CHECK(style.scale >= 1, kOp, "text scale must be >= 1, got ", style.scale);
  const int s = style.scale;
  int64_t pen = 0;  // along the text direction, in image pixels
  for (const GlyphRows& glyph : glyphs_of(text)) {
    for (int row = 0; row < glyph_height; ++row)
      for (int col = 0; col < glyph_width; ++col) {
        if (!((glyph[row] >> (glyph_width - 1 - col)) & 1)) continue;
        // (u, v): the font pixel's corner in text coordinates (u along the text, v down).
        const int64_t u = pen + col * s, v = int64_t{row} * s;
        if (style.direction == TextDirection::left_to_right)
          image.fill_rect(x + u, y + v, s, s, style.colour);
        else  // rotated counter-clockwise: u runs up from y, v runs right from x
          image.fill_rect(x + v, y - u - s, s, s, style.colour);
      }
    pen += int64_t{glyph_advance} * s;
  }
}

}  // namespace attn::seq2seq::png
