#include "seq2seq/data/corpus.h"

#include <array>
#include <memory>
#include <optional>
#include <set>
#include <unordered_set>
#include <utility>

#include "attn/error.h"
#include "attn/random.h"
#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {

namespace {

constexpr const char* kOp = "corpus";

// ---------------------------------------------------------------------------------------------
// Random numbers: SplitMix64, and Lemire's multiply-shift for bounded integers, so the corpus is
// the same with every compiler and standard library.

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    state_ += 0x9e3779b97f4a7c15ULL;
    return mix64(state_);
  }
  int below(int n) {
    return static_cast<int>((static_cast<unsigned __int128>(next()) * static_cast<uint64_t>(n)) >> 64);
  }
  bool chance(double p) { return static_cast<double>(next() >> 11) * 0x1.0p-53 < p; }

 private:
  uint64_t state_;
};

// ---------------------------------------------------------------------------------------------
// Lexicon. French nouns and verbs are consonant-initial so articles show their gender; the
// elision pass still handles the vowel-initial words the grammar does produce (est, un, il,
// elle, Anne, Emma).

enum class Gender { masculine, feminine };

// Noun kinds, as bits, so adjectives and verbs can say which kinds they combine with.
enum Kind : unsigned { kPerson = 1, kAnimal = 2, kThing = 4, kFood = 8, kText = 16, kPlace = 32 };
constexpr unsigned kAnimate = kPerson | kAnimal;
constexpr unsigned kObjects = kThing | kFood | kText;
constexpr unsigned kAnyKind = kAnimate | kObjects | kPlace;
// Colours describe animals, things and places; "the green boys" would read as nonsense.
constexpr unsigned kColourKinds = kAnimal | kObjects | kPlace;

struct Noun {
  const char* en;
  const char* en_plural;
  const char* fr;
  const char* fr_plural;
  Gender gender;
  Kind kind;
};

constexpr Gender M = Gender::masculine;
constexpr Gender F = Gender::feminine;

constexpr Noun kNouns[] = {
    {"girl", "girls", "fille", "filles", F, kPerson},
    {"boy", "boys", "garçon", "garçons", M, kPerson},
    {"woman", "women", "femme", "femmes", F, kPerson},
    {"king", "kings", "roi", "rois", M, kPerson},
    {"queen", "queens", "reine", "reines", F, kPerson},
    {"sister", "sisters", "sœur", "sœurs", F, kPerson},
    {"brother", "brothers", "frère", "frères", M, kPerson},
    {"cat", "cats", "chat", "chats", M, kAnimal},
    {"dog", "dogs", "chien", "chiens", M, kAnimal},
    {"horse", "horses", "cheval", "chevaux", M, kAnimal},
    {"cow", "cows", "vache", "vaches", F, kAnimal},
    {"mouse", "mice", "souris", "souris", F, kAnimal},
    {"fox", "foxes", "renard", "renards", M, kAnimal},
    {"rabbit", "rabbits", "lapin", "lapins", M, kAnimal},
    {"goat", "goats", "chèvre", "chèvres", F, kAnimal},
    {"wolf", "wolves", "loup", "loups", M, kAnimal},
    {"car", "cars", "voiture", "voitures", F, kThing},
    {"ball", "balls", "balle", "balles", F, kThing},
    {"hat", "hats", "chapeau", "chapeaux", M, kThing},
    {"box", "boxes", "boîte", "boîtes", F, kThing},
    {"key", "keys", "clé", "clés", F, kThing},
    {"bag", "bags", "sac", "sacs", M, kThing},
    {"bicycle", "bicycles", "vélo", "vélos", M, kThing},
    {"flower", "flowers", "fleur", "fleurs", F, kThing},
    {"table", "tables", "table", "tables", F, kThing},
    {"apple", "apples", "pomme", "pommes", F, kFood},
    {"cake", "cakes", "gâteau", "gâteaux", M, kFood},
    {"pear", "pears", "poire", "poires", F, kFood},
    {"cookie", "cookies", "biscuit", "biscuits", M, kFood},
    {"carrot", "carrots", "carotte", "carottes", F, kFood},
    {"book", "books", "livre", "livres", M, kText},
    {"letter", "letters", "lettre", "lettres", F, kText},
    {"newspaper", "newspapers", "journal", "journaux", M, kText},
    {"garden", "gardens", "jardin", "jardins", M, kPlace},
    {"house", "houses", "maison", "maisons", F, kPlace},
    {"kitchen", "kitchens", "cuisine", "cuisines", F, kPlace},
    {"street", "streets", "rue", "rues", F, kPlace},
    {"park", "parks", "parc", "parcs", M, kPlace},
    {"forest", "forests", "forêt", "forêts", F, kPlace},
    {"city", "cities", "ville", "villes", F, kPlace},
    {"boat", "boats", "bateau", "bateaux", M, kPlace},
};
constexpr int kNumNouns = static_cast<int>(std::size(kNouns));

struct Adjective {
  const char* en;
  // French forms: masculine singular, feminine singular, masculine plural, feminine plural.
  std::array<const char*, 4> fr;
  bool before_noun;  // the few French adjectives that precede the noun (petit, grand, ...)
  bool colour;       // colours may follow a before-noun adjective ("the small black cat")
  unsigned kinds;    // noun kinds it describes
};

constexpr Adjective kAdjectives[] = {
    {"small", {"petit", "petite", "petits", "petites"}, true, false, kAnyKind},
    {"big", {"grand", "grande", "grands", "grandes"}, true, false, kAnyKind},
    {"old", {"vieux", "vieille", "vieux", "vieilles"}, true, false, kAnyKind},
    {"young", {"jeune", "jeune", "jeunes", "jeunes"}, true, false, kAnimate},
    {"pretty", {"joli", "jolie", "jolis", "jolies"}, true, false, kAnyKind},
    {"black", {"noir", "noire", "noirs", "noires"}, false, true, kColourKinds},
    {"white", {"blanc", "blanche", "blancs", "blanches"}, false, true, kColourKinds},
    {"red", {"rouge", "rouge", "rouges", "rouges"}, false, true, kColourKinds},
    {"green", {"vert", "verte", "verts", "vertes"}, false, true, kColourKinds},
    {"blue", {"bleu", "bleue", "bleus", "bleues"}, false, true, kColourKinds},
    {"grey", {"gris", "grise", "gris", "grises"}, false, true, kColourKinds},
    {"happy", {"heureux", "heureuse", "heureux", "heureuses"}, false, false, kAnimate},
    {"tired", {"fatigué", "fatiguée", "fatigués", "fatiguées"}, false, false, kAnimate},
    {"heavy", {"lourd", "lourde", "lourds", "lourdes"}, false, false, kObjects},
};
constexpr int kNumAdjectives = static_cast<int>(std::size(kAdjectives));

// French person slots of a conjugation table.
enum Slot { kJe = 0, kIl = 1, kNous = 2, kVous = 3, kIls = 4 };

struct Verb {
  const char* en_base;   // "see", "look for"
  const char* en_third;  // "sees", "looks for"
  std::array<const char*, 5> fr;  // je, il/elle, nous, vous, ils/elles
  unsigned objects;      // kinds it takes as object; 0 = intransitive
  unsigned subjects;     // noun kinds it takes as subject (pronouns and names are people)
};

constexpr Verb kVerbs[] = {
    {"see", "sees", {"vois", "voit", "voyons", "voyez", "voient"}, kAnyKind, kAnimate},
    {"watch", "watches", {"regarde", "regarde", "regardons", "regardez", "regardent"}, kAnyKind, kAnimate},
    {"look for", "looks for", {"cherche", "cherche", "cherchons", "cherchez", "cherchent"}, kAnyKind, kAnimate},
    {"find", "finds", {"trouve", "trouve", "trouvons", "trouvez", "trouvent"}, kAnyKind, kAnimate},
    {"take", "takes", {"prends", "prend", "prenons", "prenez", "prennent"}, kObjects, kPerson},
    {"carry", "carries", {"porte", "porte", "portons", "portez", "portent"}, kObjects | kAnimal, kPerson},
    {"wash", "washes", {"lave", "lave", "lavons", "lavez", "lavent"}, kThing | kAnimal, kPerson},
    {"follow", "follows", {"suis", "suit", "suivons", "suivez", "suivent"}, kAnimate, kAnimate},
    {"eat", "eats", {"mange", "mange", "mangeons", "mangez", "mangent"}, kFood, kAnimate},
    {"read", "reads", {"lis", "lit", "lisons", "lisez", "lisent"}, kText, kPerson},
    {"want", "wants", {"veux", "veut", "voulons", "voulez", "veulent"}, kObjects | kAnimal, kAnimate},
    {"sell", "sells", {"vends", "vend", "vendons", "vendez", "vendent"}, kObjects | kAnimal, kPerson},
    {"draw", "draws", {"dessine", "dessine", "dessinons", "dessinez", "dessinent"}, kAnyKind, kPerson},
    {"meet", "meets", {"rencontre", "rencontre", "rencontrons", "rencontrez", "rencontrent"}, kAnimate, kAnimate},
    {"sleep", "sleeps", {"dors", "dort", "dormons", "dormez", "dorment"}, 0, kAnimate},
    {"run", "runs", {"cours", "court", "courons", "courez", "courent"}, 0, kAnimate},
    {"sing", "sings", {"chante", "chante", "chantons", "chantez", "chantent"}, 0, kAnimate},
    {"dance", "dances", {"danse", "danse", "dansons", "dansez", "dansent"}, 0, kPerson},
    {"walk", "walks", {"marche", "marche", "marchons", "marchez", "marchent"}, 0, kAnimate},
    {"work", "works", {"travaille", "travaille", "travaillons", "travaillez", "travaillent"}, 0, kPerson},
    {"laugh", "laughs", {"ris", "rit", "rions", "riez", "rient"}, 0, kPerson},
    {"play", "plays", {"joue", "joue", "jouons", "jouez", "jouent"}, 0, kAnimate},
};
constexpr int kNumVerbs = static_cast<int>(std::size(kVerbs));

struct Name {
  const char* text;  // identical in both languages: the model can copy it
  Gender gender;
};

constexpr Name kNames[] = {
    {"Paul", M}, {"Pierre", M}, {"Louis", M}, {"Marc", M}, {"Thomas", M}, {"Victor", M},
    {"Marie", F}, {"Sophie", F}, {"Claire", F}, {"Julie", F}, {"Anne", F}, {"Emma", F},
};
constexpr int kNumNames = static_cast<int>(std::size(kNames));

// Personal pronouns. Subject pronouns without a known gender (I, you, we) never take a
// predicate adjective, whose French form would depend on it.
struct Pronoun {
  const char* en_subject;
  const char* en_object;
  const char* fr_subject;
  const char* fr_object;  // before the verb
  Slot slot;
  bool plural;
  bool gender_known;
  Gender gender;
};

constexpr Pronoun kPronouns[] = {
    {"I", "me", "je", "me", kJe, false, false, M},
    {"you", "you", "vous", "vous", kVous, true, false, M},
    {"he", "him", "il", "le", kIl, false, true, M},
    {"she", "her", "elle", "la", kIl, false, true, F},
    {"we", "us", "nous", "nous", kNous, true, false, M},
    {"they", "them", "ils", "les", kIls, true, true, M},
};
constexpr int kNumPronouns = static_cast<int>(std::size(kPronouns));

struct Preposition {
  const char* en;
  const char* fr;  // "de" contracts with the article: du, de la, des
};
constexpr Preposition kPrepositions[] = {{"in", "dans"}, {"near", "près de"}};

struct Conjunction {
  const char* en;
  const char* fr;
};
constexpr Conjunction kConjunctions[] = {{"and", "et"}, {", but", ", mais"}, {"because", "parce que"}};

// ---------------------------------------------------------------------------------------------
// Abstract sentences: generated once, rendered in both languages.

struct Clause;

struct NounPhrase {
  enum class Form { definite, indefinite, number, name, pronoun } form = Form::definite;
  int noun = -1;      // kNouns index (definite, indefinite, number)
  bool plural = false;
  int pre_adjective = -1;   // kAdjectives index or -1
  int post_adjective = -1;
  int number = 0;     // Form::number
  int name = -1;      // Form::name
  int pronoun = -1;   // Form::pronoun
  std::shared_ptr<Clause> relative;  // "that ..." clause about this noun, or null

  bool is_noun() const { return noun >= 0; }
  unsigned kind() const { return is_noun() ? kNouns[noun].kind : kPerson; }
  Gender gender() const {
    if (is_noun()) return kNouns[noun].gender;
    if (form == Form::name) return kNames[name].gender;
    return kPronouns[pronoun].gender;
  }
  bool is_plural() const { return form == Form::pronoun ? kPronouns[pronoun].plural : plural; }
  Slot slot() const {
    if (form == Form::pronoun) return kPronouns[pronoun].slot;
    return is_plural() ? kIls : kIl;
  }
  bool english_third_singular() const {
    if (form == Form::pronoun) return kPronouns[pronoun].slot == kIl;
    return !is_plural();
  }
};

// What an anaphoric pronoun needs to know about the noun phrase it points back to.
struct Referent {
  unsigned kind;
  Gender gender;
  bool plural;
};

struct Clause {
  enum class Form {
    intransitive,    // S V [PP]
    transitive,      // S V O [PP]
    object_pronoun,  // S V pronoun ("I see him", "he takes it")
    copula,          // S is ADJ
    subject_relative,  // (head) that V O -- inside a noun phrase
    object_relative,   // (head) that S V -- inside a noun phrase
  } form = Form::intransitive;
  NounPhrase subject;
  int verb = -1;
  bool negated = false;
  NounPhrase object;
  int object_pronoun = -1;               // kPronouns index, when not anaphoric
  std::optional<Referent> antecedent;    // "it"/"them": an earlier clause's object
  int adjective = -1;                    // copula
  int preposition = -1;                  // optional place
  NounPhrase place;
};

struct Sentence {
  std::vector<Clause> clauses;
  std::vector<int> conjunctions;  // between consecutive clauses
};

// ---------------------------------------------------------------------------------------------
// Generation

class Generator {
 public:
  Generator(uint64_t seed, int max_number) : rng_(seed), max_number_(max_number) {}

  Sentence sentence() {
    Sentence s;
    const int clauses = rng_.chance(0.55) ? 1 : (rng_.chance(0.75) ? 2 : 3);
    for (int c = 0; c < clauses; ++c) {
      const Clause* previous = c > 0 ? &s.clauses.back() : nullptr;
      s.clauses.push_back(clause(previous));
      if (c > 0) s.conjunctions.push_back(rng_.below(static_cast<int>(std::size(kConjunctions))));
    }
    return s;
  }

 private:
  // Uniform choice among the indices that satisfy `fits`; -1 when none does.
  template <class Fits>
  int pick(int count, Fits fits) {
    std::vector<int> candidates;
    for (int i = 0; i < count; ++i) {
      if (fits(i)) candidates.push_back(i);
    }
    return candidates.empty() ? -1 : candidates[rng_.below(static_cast<int>(candidates.size()))];
  }

  int pick_noun(unsigned kinds) {
    return pick(kNumNouns, [&](int n) { return (kNouns[n].kind & kinds) != 0; });
  }

  int pick_adjective(unsigned kind, bool before_noun, bool colour_only) {
    return pick(kNumAdjectives, [&](int a) {
      const Adjective& adj = kAdjectives[a];
      return (adj.kinds & kind) && adj.before_noun == before_noun && (!colour_only || adj.colour);
    });
  }

  int pick_verb(bool transitive) {
    return pick(kNumVerbs, [&](int v) { return (kVerbs[v].objects != 0) == transitive; });
  }

  void add_adjectives(NounPhrase& np) {
    const unsigned kind = kNouns[np.noun].kind;
    const bool pre = rng_.chance(0.2);
    const bool post = rng_.chance(0.45);
    if (pre) np.pre_adjective = pick_adjective(kind, true, false);
    // With two adjectives the second is a colour: English puts size and age before colour
    // ("the small black cat"), as French puts petit before and noir after the noun. People
    // have no colour, so they get at most one of the two.
    if (post) np.post_adjective = pick_adjective(kind, false, pre);
  }

  // A noun phrase of one of `kinds`; `allow_pronoun`, `allow_relative` shape its form.
  NounPhrase noun_phrase(unsigned kinds, bool allow_pronoun, bool allow_relative, bool allow_name) {
    NounPhrase np;
    const bool people = (kinds & kPerson) != 0;
    const int roll = rng_.below(100);
    if (allow_pronoun && people && roll < 25) {
      np.form = NounPhrase::Form::pronoun;
      np.pronoun = rng_.below(kNumPronouns);
      return np;
    }
    if (allow_name && people && roll < 40) {
      np.form = NounPhrase::Form::name;
      np.name = rng_.below(kNumNames);
      return np;
    }
    np.noun = pick_noun(kinds);
    const int form = rng_.below(100);
    if (form < 60) {
      np.form = NounPhrase::Form::definite;
      np.plural = rng_.chance(0.35);
    } else if (form < 80) {
      np.form = NounPhrase::Form::indefinite;
    } else {
      np.form = NounPhrase::Form::number;
      np.plural = true;
      np.number = 2 + rng_.below(max_number_ - 1);
    }
    add_adjectives(np);
    if (allow_relative && np.form == NounPhrase::Form::definite && rng_.chance(0.12)) {
      np.relative = std::make_shared<Clause>(relative_clause(np));
    }
    return np;
  }

  // "that sees the dog" (the head is the subject) or "that the dog sees" (the head is the
  // object); the head's kind must suit the verb.
  Clause relative_clause(const NounPhrase& head) {
    Clause c;
    c.negated = rng_.chance(0.15);
    const unsigned kind = head.kind();
    c.verb = pick(kNumVerbs, [&](int v) {
      return kVerbs[v].objects != 0 && ((kVerbs[v].subjects | kVerbs[v].objects) & kind) != 0;
    });
    const Verb& v = kVerbs[c.verb];
    const bool head_can_be_object = (v.objects & kind) != 0;
    if ((v.subjects & kind) && (!head_can_be_object || rng_.chance(0.5))) {
      c.form = Clause::Form::subject_relative;
      c.object = noun_phrase(v.objects, false, false, true);
    } else {
      c.form = Clause::Form::object_relative;
      c.subject = noun_phrase(v.subjects, true, false, true);
    }
    return c;
  }

  Clause clause(const Clause* previous) {
    Clause c;
    c.negated = rng_.chance(0.25);
    // An earlier clause's object noun can be picked up by "it" / "them" / "him" / "her".
    std::optional<Referent> antecedent;
    if (previous && !previous->negated && previous->form == Clause::Form::transitive &&
        previous->object.form != NounPhrase::Form::pronoun && rng_.chance(0.5)) {
      const NounPhrase& o = previous->object;
      antecedent = Referent{o.kind(), o.gender(), o.is_plural()};
    }
    const int roll = rng_.below(100);
    if (antecedent || roll < 15) {
      c.form = Clause::Form::object_pronoun;
      if (antecedent) {
        // A verb taking the antecedent's kind, with a subject the verb accepts.
        const unsigned kind = antecedent->kind;
        c.verb = pick(kNumVerbs, [&](int v) { return (kVerbs[v].objects & kind) != 0; });
        c.antecedent = antecedent;
        c.subject = noun_phrase(kVerbs[c.verb].subjects, true, false, true);
      } else {
        c.verb = pick(kNumVerbs, [&](int v) { return (kVerbs[v].objects & kPerson) != 0; });
        c.subject = noun_phrase(kVerbs[c.verb].subjects, true, true, true);
        // No reflexives ("I see me" would be "je me vois", myself) and no object that includes
        // the speaker as the subject does ("we see me", "I see us").
        const int subject = c.subject.form == NounPhrase::Form::pronoun ? c.subject.pronoun : -1;
        auto first_person = [](int p) { return p >= 0 && (kPronouns[p].slot == kJe || kPronouns[p].slot == kNous); };
        c.object_pronoun = pick(kNumPronouns, [&](int p) {
          if (first_person(subject) && first_person(p)) return false;
          return p != subject || kPronouns[p].slot == kIl || kPronouns[p].slot == kIls;
        });
      }
      return c;
    }
    if (roll < 40) {
      c.form = Clause::Form::copula;
      // Redrawn while it is I, you or we (one draw in eight): a predicate adjective agrees with
      // its subject, so the subject's gender must be known.
      for (;;) {
        c.subject = noun_phrase(kAnyKind, true, true, true);
        if (c.subject.form != NounPhrase::Form::pronoun || kPronouns[c.subject.pronoun].gender_known) break;
      }
      // Not the subject's own adjective: "the red car is red" says nothing.
      const NounPhrase& subject = c.subject;
      c.adjective = pick(kNumAdjectives, [&](int a) {
        return (kAdjectives[a].kinds & subject.kind()) && a != subject.pre_adjective &&
               a != subject.post_adjective;
      });
      return c;
    }
    const bool transitive = roll < 75;
    c.form = transitive ? Clause::Form::transitive : Clause::Form::intransitive;
    c.verb = pick_verb(transitive);
    const Verb& v = kVerbs[c.verb];
    c.subject = noun_phrase(v.subjects, true, true, true);
    if (transitive) c.object = noun_phrase(v.objects, false, true, true);
    if (rng_.chance(0.25)) {
      c.preposition = rng_.below(static_cast<int>(std::size(kPrepositions)));
      c.place.form = NounPhrase::Form::definite;
      c.place.noun = pick_noun(kPlace);
      c.place.plural = rng_.chance(0.2);
      if (rng_.chance(0.3)) c.place.post_adjective = pick_adjective(kPlace, false, false);
    }
    return c;
  }

  Rng rng_;
  int max_number_;
};

// ---------------------------------------------------------------------------------------------
// Rendering

// Appends the space-separated words of `text` ("look for" -> "look", "for").
void push(Tokens& out, std::string_view text) {
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find(' ', start);
    if (end == std::string_view::npos) end = text.size();
    if (end > start) out.emplace_back(text.substr(start, end - start));
    start = end + 1;
  }
}

const char* french_adjective(int a, Gender gender, bool plural) {
  return kAdjectives[a].fr[(gender == F ? 1 : 0) + (plural ? 2 : 0)];
}

class English {
 public:
  explicit English(Tokens& out) : out_(out) {}

  void noun_phrase(const NounPhrase& np, bool as_object) {
    using Form = NounPhrase::Form;
    switch (np.form) {
      case Form::pronoun:
        push(out_, as_object ? kPronouns[np.pronoun].en_object : kPronouns[np.pronoun].en_subject);
        return;
      case Form::name: push(out_, kNames[np.name].text); return;
      case Form::definite: push(out_, "the"); break;
      case Form::indefinite: push(out_, "a"); break;  // "an" by the final pass
      case Form::number: push(out_, std::to_string(np.number)); break;
    }
    if (np.pre_adjective >= 0) push(out_, kAdjectives[np.pre_adjective].en);
    if (np.post_adjective >= 0) push(out_, kAdjectives[np.post_adjective].en);
    const Noun& n = kNouns[np.noun];
    push(out_, np.plural ? n.en_plural : n.en);
    if (np.relative) {
      const Clause& r = *np.relative;
      push(out_, "that");
      if (r.form == Clause::Form::subject_relative) {
        verb(r, np);
        noun_phrase(r.object, true);
      } else {
        noun_phrase(r.subject, false);
        verb(r, r.subject);
      }
    }
  }

  // The verb group of `c` agreeing with `subject`: "sees", "does not see".
  void verb(const Clause& c, const NounPhrase& subject) {
    const Verb& v = kVerbs[c.verb];
    const bool third = subject.english_third_singular();
    if (c.negated) {
      push(out_, third ? "does not" : "do not");
      push(out_, v.en_base);
    } else {
      push(out_, third ? v.en_third : v.en_base);
    }
  }

  void clause(const Clause& c) {
    noun_phrase(c.subject, false);
    switch (c.form) {
      case Clause::Form::copula:
        push(out_, c.subject.english_third_singular() ? "is" : "are");
        if (c.negated) push(out_, "not");
        push(out_, kAdjectives[c.adjective].en);
        return;
      case Clause::Form::object_pronoun:
        verb(c, c.subject);
        if (c.antecedent) {
          const Referent& a = *c.antecedent;
          // People take him/her; animals and things take it.
          if (a.plural) push(out_, "them");
          else if (a.kind == kPerson) push(out_, a.gender == F ? "her" : "him");
          else push(out_, "it");
        } else {
          push(out_, kPronouns[c.object_pronoun].en_object);
        }
        return;
      default:
        verb(c, c.subject);
        if (c.form == Clause::Form::transitive) noun_phrase(c.object, true);
        if (c.preposition >= 0) {
          push(out_, kPrepositions[c.preposition].en);
          noun_phrase(c.place, true);
        }
        return;
    }
  }

 private:
  Tokens& out_;
};

class French {
 public:
  explicit French(Tokens& out) : out_(out) {}

  // `negated_object`: the object of a negated verb, where "un"/"une" becomes "de".
  void noun_phrase(const NounPhrase& np, bool negated_object) {
    using Form = NounPhrase::Form;
    const Gender g = np.gender();
    switch (np.form) {
      case Form::pronoun: push(out_, kPronouns[np.pronoun].fr_subject); return;
      case Form::name: push(out_, kNames[np.name].text); return;
      case Form::definite: push(out_, np.plural ? "les" : (g == F ? "la" : "le")); break;
      case Form::indefinite: push(out_, negated_object ? "de" : (g == F ? "une" : "un")); break;
      case Form::number: push(out_, std::to_string(np.number)); break;
    }
    if (np.pre_adjective >= 0) push(out_, french_adjective(np.pre_adjective, g, np.plural));
    const Noun& n = kNouns[np.noun];
    push(out_, np.plural ? n.fr_plural : n.fr);
    if (np.post_adjective >= 0) push(out_, french_adjective(np.post_adjective, g, np.plural));
    if (np.relative) {
      const Clause& r = *np.relative;
      if (r.form == Clause::Form::subject_relative) {
        push(out_, "qui");
        verb(r, np.slot(), nullptr);
        noun_phrase(r.object, r.negated);
      } else {
        push(out_, "que");
        noun_phrase(r.subject, false);
        verb(r, r.subject.slot(), nullptr);
      }
    }
  }

  // [ne] [object pronoun] verb [pas]
  void verb(const Clause& c, Slot slot, const char* object_pronoun) {
    if (c.negated) push(out_, "ne");
    if (object_pronoun) push(out_, object_pronoun);
    push(out_, kVerbs[c.verb].fr[slot]);
    if (c.negated) push(out_, "pas");
  }

  void clause(const Clause& c) {
    noun_phrase(c.subject, false);
    const Slot slot = c.subject.slot();
    switch (c.form) {
      case Clause::Form::copula:
        if (c.negated) push(out_, "ne");
        push(out_, c.subject.is_plural() ? "sont" : "est");
        if (c.negated) push(out_, "pas");
        push(out_, french_adjective(c.adjective, c.subject.gender(), c.subject.is_plural()));
        return;
      case Clause::Form::object_pronoun: {
        const char* pronoun = nullptr;
        if (c.antecedent) {
          const Referent& a = *c.antecedent;
          pronoun = a.plural ? "les" : (a.gender == F ? "la" : "le");
        } else {
          pronoun = kPronouns[c.object_pronoun].fr_object;
        }
        verb(c, slot, pronoun);
        return;
      }
      default:
        verb(c, slot, nullptr);
        if (c.form == Clause::Form::transitive) noun_phrase(c.object, c.negated);
        if (c.preposition >= 0) {
          push(out_, kPrepositions[c.preposition].fr);
          noun_phrase(c.place, false);
        }
        return;
    }
  }

 private:
  Tokens& out_;
};

bool starts_with_vowel(const std::string& word) {
  // French vowels, accented ones included (UTF-8 prefixes); h is never mute in this lexicon.
  static const char* vowels[] = {"a", "e", "i", "o", "u", "y", "é", "è", "ê", "à", "â", "î", "ô", "œ",
                                 "A", "E", "I", "O", "U", "É"};
  for (const char* v : vowels) {
    if (word.rfind(v, 0) == 0) return true;
  }
  return false;
}

// French contraction and elision: de le -> du, de les -> des; je, me, le, la, ne, de, que
// before a vowel lose their vowel and become their own token ending in an apostrophe.
Tokens french_orthography(const Tokens& in) {
  Tokens contracted;
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (in[i] == "de" && i + 1 < in.size() && (in[i + 1] == "le" || in[i + 1] == "les")) {
      contracted.push_back(in[i + 1] == "le" ? "du" : "des");
      ++i;
    } else {
      contracted.push_back(in[i]);
    }
  }
  static const std::set<std::string> elide = {"je", "me", "le", "la", "ne", "de", "que"};
  for (std::size_t i = 0; i + 1 < contracted.size(); ++i) {
    std::string& w = contracted[i];
    if (elide.count(w) && starts_with_vowel(contracted[i + 1])) {
      w = (w == "que" ? "qu" : w.substr(0, 1)) + "'";
    }
  }
  return contracted;
}

// English: "a" before a vowel sound is "an". Here that is every word starting with a, e, i, o
// or u ("young" starts with a consonant sound).
Tokens english_orthography(Tokens tokens) {
  for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
    if (tokens[i] == "a" && std::string_view("aeiou").find(tokens[i + 1][0]) != std::string_view::npos) {
      tokens[i] = "an";
    }
  }
  return tokens;
}

struct Rendered {
  Tokens english;
  Tokens french;
};

Rendered render(const Sentence& s) {
  Rendered r;
  English en(r.english);
  French fr(r.french);
  for (std::size_t c = 0; c < s.clauses.size(); ++c) {
    if (c > 0) {
      push(r.english, kConjunctions[s.conjunctions[c - 1]].en);
      push(r.french, kConjunctions[s.conjunctions[c - 1]].fr);
    }
    en.clause(s.clauses[c]);
    fr.clause(s.clauses[c]);
  }
  push(r.english, ".");
  push(r.french, ".");
  r.english = english_orthography(std::move(r.english));
  r.french = french_orthography(r.french);
  return r;
}

// Every (noun, adjective) relation in a sentence, as noun * kNumAdjectives + adjective.
void collect_combinations(const NounPhrase& np, std::vector<int>& out) {
  if (np.is_noun()) {
    if (np.pre_adjective >= 0) out.push_back(np.noun * kNumAdjectives + np.pre_adjective);
    if (np.post_adjective >= 0) out.push_back(np.noun * kNumAdjectives + np.post_adjective);
  }
  if (np.relative) {
    collect_combinations(np.relative->subject, out);
    collect_combinations(np.relative->object, out);
  }
}

std::vector<int> combinations(const Sentence& s) {
  std::vector<int> out;
  for (const Clause& c : s.clauses) {
    collect_combinations(c.subject, out);
    collect_combinations(c.object, out);
    collect_combinations(c.place, out);
    if (c.form == Clause::Form::copula && c.subject.is_noun()) {
      out.push_back(c.subject.noun * kNumAdjectives + c.adjective);
    }
  }
  return out;
}

// Chooses the held-out combinations: each valid (noun, adjective) pair with probability
// `fraction`, keeping at least two training combinations for every noun and adjective so that
// each word is still learnt on its own.
std::vector<bool> choose_held_out(uint64_t seed, double fraction) {
  Rng rng(mix64(seed ^ 0x5eed0f4e1d07ULL));
  std::vector<bool> held(kNumNouns * kNumAdjectives, false);
  std::vector<int> noun_left(kNumNouns, 0), adjective_left(kNumAdjectives, 0);
  for (int n = 0; n < kNumNouns; ++n) {
    for (int a = 0; a < kNumAdjectives; ++a) {
      if (kAdjectives[a].kinds & kNouns[n].kind) ++noun_left[n], ++adjective_left[a];
    }
  }
  for (int n = 0; n < kNumNouns; ++n) {
    for (int a = 0; a < kNumAdjectives; ++a) {
      if (!(kAdjectives[a].kinds & kNouns[n].kind)) continue;
      if (rng.chance(fraction) && noun_left[n] > 2 && adjective_left[a] > 2) {
        held[n * kNumAdjectives + a] = true;
        --noun_left[n];
        --adjective_left[a];
      }
    }
  }
  return held;
}

}  // namespace

bool is_corpus_name(std::string_view word) {
  for (const Name& name : kNames) {
    if (word == name.text) return true;
  }
  return false;
}

Corpus generate_corpus(const CorpusConfig& config) {
  ATTN_CHECK(config.train_pairs >= 0 && config.valid_pairs >= 0 && config.test_pairs >= 0 &&
                 config.long_test_pairs >= 0,
             kOp, "split sizes must be >= 0, got train ", config.train_pairs, " valid ", config.valid_pairs,
             " test ", config.test_pairs, " long ", config.long_test_pairs);
  ATTN_CHECK(config.min_tokens >= 1 && config.min_tokens <= config.max_train_tokens, kOp,
             "need 1 <= min_tokens <= max_train_tokens, got ", config.min_tokens, " and ",
             config.max_train_tokens);
  ATTN_CHECK(config.held_out_fraction >= 0.0 && config.held_out_fraction < 1.0, kOp,
             "held_out_fraction must be in [0, 1), got ", config.held_out_fraction);
  ATTN_CHECK(config.max_number >= 2, kOp, "max_number must be >= 2, got ", config.max_number);
  ATTN_CHECK(config.test_pairs == 0 || config.held_out_fraction > 0.0, kOp,
             "test_pairs ", config.test_pairs, " needs held_out_fraction > 0");

  Corpus corpus;
  const std::vector<bool> held = choose_held_out(config.seed, config.held_out_fraction);
  for (int n = 0; n < kNumNouns; ++n) {
    for (int a = 0; a < kNumAdjectives; ++a) {
      if (held[n * kNumAdjectives + a]) {
        corpus.held_out_combinations.push_back({kAdjectives[a].en, kNouns[n].en, kNouns[n].en_plural});
      }
    }
  }

  Generator generator(config.seed, config.max_number);
  Rng split_rng(mix64(config.seed + 0x51u));
  std::unordered_set<std::string> seen;  // English sentences already used in any split
  // Valid draws from the same stream as train, at its share of the in-distribution sentences.
  const double valid_share = static_cast<double>(config.valid_pairs) /
                             static_cast<double>(config.train_pairs + config.valid_pairs + 1);
  // The grammar stalls when the sizes ask for more distinct sentences of the allowed lengths
  // than it makes; normally a pair is accepted every few draws, so a long run without one
  // means the request cannot be met.
  constexpr int64_t kMaxDrawsWithoutProgress = 50000;
  int64_t last_progress = 0;
  auto full = [](const std::vector<SentencePair>& split, int64_t size) {
    return static_cast<int64_t>(split.size()) >= size;
  };
  int64_t draws = 0;
  while (!(full(corpus.train, config.train_pairs) && full(corpus.valid, config.valid_pairs) &&
           full(corpus.test, config.test_pairs) && full(corpus.test_long, config.long_test_pairs))) {
    ++draws;
    ATTN_CHECK(draws - last_progress <= kMaxDrawsWithoutProgress, kOp, "could not fill the splits: ",
               kMaxDrawsWithoutProgress, " sentences in a row were unusable (train ", corpus.train.size(), "/", config.train_pairs, ", valid ",
               corpus.valid.size(), "/", config.valid_pairs, ", test ", corpus.test.size(), "/",
               config.test_pairs, ", long ", corpus.test_long.size(), "/", config.long_test_pairs,
               "); lower the sizes or widen the token limits");
    const Sentence sentence = generator.sentence();
    const Rendered text = render(sentence);
    const auto length = static_cast<int64_t>(text.english.size());
    if (length < config.min_tokens) continue;
    bool has_held_out = false;
    for (int combination : combinations(sentence)) has_held_out = has_held_out || held[combination];

    std::vector<SentencePair>* split = nullptr;
    if (length > config.max_train_tokens) {
      if (!has_held_out && !full(corpus.test_long, config.long_test_pairs)) split = &corpus.test_long;
    } else if (has_held_out) {
      if (!full(corpus.test, config.test_pairs)) split = &corpus.test;
    } else {
      const bool valid_room = !full(corpus.valid, config.valid_pairs);
      const bool train_room = !full(corpus.train, config.train_pairs);
      if (valid_room && (!train_room || split_rng.chance(valid_share))) split = &corpus.valid;
      else if (train_room) split = &corpus.train;
    }
    if (!split) continue;
    SentencePair pair{join_tokens(text.english), join_tokens(text.french)};
    if (!seen.insert(pair.source).second) continue;
    split->push_back(std::move(pair));
    last_progress = draws;
  }
  return corpus;
}

}  // namespace attn::seq2seq
