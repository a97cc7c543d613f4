#!/usr/bin/env bash
# Builds an English -> French development corpus from the translated messages Debian ships: the
# gettext catalogues in /usr/share/locale/fr/LC_MESSAGES/*.mo (coreutils, apt, dpkg, git, glib,
# gtk, tar, the ISO 3166/639 names, ...), nothing downloaded. Each catalogue is decompiled with
# msgunfmt (gettext; scripts/setup.sh installs it) and every translated message becomes a pair
# "English TAB French":
#   - the header, untranslated and identical pairs are dropped; plural forms keep the singular
#     (msgid / msgstr[0]); line breaks inside a message become spaces, runs of spaces collapse
#   - messages of more than MAX_WORDS English words (help screens) are dropped
#   - one pair per English message: when catalogues translate the same message differently, the
#     most frequent translation wins (ties: the first in byte order)
#   - splits by source: valid and test sources differ from every training source even after
#     lowercasing and removing accelerators (_ &) and final punctuation, so a test message is
#     never seen in training, not even as "Open..." for "&Open"
# Output (OUT_DIR, default runs/real_corpus, ignored by git): train.tsv, valid.tsv, test.tsv, and stats.txt.
# Usage: scripts/make_real_corpus.sh [OUT_DIR]   (env: TEST_PAIRS=1000 VALID_PAIRS=500 MAX_WORDS=40)
set -euo pipefail
out_dir="${1:-runs/real_corpus}"
locale_dir="${LOCALE_DIR:-/usr/share/locale/fr/LC_MESSAGES}"
test_pairs="${TEST_PAIRS:-1000}"
valid_pairs="${VALID_PAIRS:-500}"
max_words="${MAX_WORDS:-40}"

command -v msgunfmt >/dev/null || {
  echo "make_real_corpus: msgunfmt not found: install gettext (scripts/setup.sh does)" >&2
  exit 1
}
shopt -s nullglob
catalogues=("$locale_dir"/*.mo)
((${#catalogues[@]})) || { echo "make_real_corpus: no .mo files in $locale_dir" >&2; exit 1; }

mkdir -p "$out_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for mo in "${catalogues[@]}"; do
  name="$(basename "$mo" .mo)"
  # A catalogue msgunfmt cannot read is reported and skipped, never silently.
  msgunfmt --no-wrap -o "$work/$name.po" "$mo" 2>"$work/$name.err" ||
    echo "make_real_corpus: skipped $mo: $(head -1 "$work/$name.err")" >&2
done

python3 - "$work" "$out_dir" "$test_pairs" "$valid_pairs" "$max_words" <<'EOF'
import collections, glob, hashlib, os, re, sys

work, out_dir, n_test, n_valid, max_words = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def unquote(s):
    # A PO string literal's body: C escapes.
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == '\\' and i + 1 < len(s):
            n = s[i + 1]
            out.append({'n': '\n', 't': '\t', '"': '"', '\\': '\\', 'r': '\r'}.get(n, n))
            i += 2
        else:
            out.append(c)
            i += 1
    return ''.join(out)

def entries(path):
    # msgunfmt writes msgctxt/msgid/msgid_plural/msgstr[n] blocks, one string per line.
    cur, key = {}, None
    with open(path, encoding='utf-8', errors='strict') as f:
        for line in f:
            line = line.rstrip('\n')
            if not line or line.startswith('#'):
                if cur: yield cur
                cur, key = {}, None
                continue
            m = re.match(r'^(msgctxt|msgid_plural|msgid|msgstr(?:\[\d+\])?)\s+"(.*)"$', line)
            if m:
                key = m.group(1)
                cur[key] = unquote(m.group(2))
            elif line.startswith('"') and key:
                cur[key] += unquote(line[1:-1])
    if cur: yield cur

def clean(s):
    return ' '.join(s.replace('\t', ' ').split())

counts = collections.defaultdict(collections.Counter)
catalogues = 0
for po in sorted(glob.glob(os.path.join(work, '*.po'))):
    catalogues += 1
    try:
        for e in entries(po):
            src = e.get('msgid', '')
            tgt = e.get('msgstr', e.get('msgstr[0]', ''))
            src, tgt = clean(src), clean(tgt)
            if not src or not tgt or src == tgt:
                continue
            if len(src.split()) > max_words or len(tgt.split()) > 2 * max_words:
                continue
            counts[src][tgt] += 1
    except UnicodeDecodeError:
        print(f'make_real_corpus: skipped {po}: not UTF-8', file=sys.stderr)

pairs = []
for src, c in counts.items():
    best = max(c.values())
    pairs.append((src, min(t for t, k in c.items() if k == best)))

def key(s):
    s = s.replace('_', '').replace('&', '').lower().strip()
    return re.sub(r'[\s.:!?…]+$', '', s)

groups = collections.defaultdict(list)
for p in pairs:
    groups[key(p[0])].append(p)
order = sorted(groups, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
split = {'test': [], 'valid': [], 'train': []}
for k in order:
    name = 'test' if len(split['test']) < n_test else 'valid' if len(split['valid']) < n_valid else 'train'
    split[name].extend(groups[k])
for name, rows in split.items():
    rows.sort(key=lambda p: hashlib.sha256((p[0] + '\t' + p[1]).encode()).hexdigest())
    with open(os.path.join(out_dir, name + '.tsv'), 'w', encoding='utf-8') as f:
        for s, t in rows:
            f.write(f'{s}\t{t}\n')
train_keys = {key(s) for s, _ in split['train']}
assert not any(key(s) in train_keys for s, _ in split['test'] + split['valid'])
with open(os.path.join(out_dir, 'stats.txt'), 'w') as f:
    f.write(f'catalogues {catalogues}\n')
    for name in ('train', 'valid', 'test'):
        rows = split[name]
        words = sum(len(s.split()) for s, _ in rows)
        f.write(f'{name} {len(rows)} pairs, {words} source words\n')
print(open(os.path.join(out_dir, 'stats.txt')).read(), end='')
EOF
