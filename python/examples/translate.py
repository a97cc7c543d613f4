"""The translator from Python: load a model trained by `attn train`, translate, look at the
alignment. With no argument, trains a small model on attn's embedded corpus first (about a
minute on 2 cores; needs the `attn` command on PATH, e.g. PATH=build/bin:$PATH).

    python3 python/examples/translate.py [MODEL_DIR] ["a sentence ." ...]
"""
import subprocess
import sys
import tempfile

import attn

model = sys.argv[1] if len(sys.argv) > 1 else None
sentences = sys.argv[2:] or ["the black cat sees Marie .", "the small dog eats the apple ."]
if model is None:
    model = tempfile.mkdtemp(prefix="attn-example-") + "/model"
    subprocess.run(["attn", "train", "--corpus", "--out", model, "--epochs", "2", "--emb", "32",
                    "--hidden", "64", "--attention", "luong-general", "--threads", "2"],
                   check=True, stderr=subprocess.DEVNULL)

translator = attn.Translator(model)
for t in translator.translate(sentences, beam=4):
    print(t.text)
    if t.alignment is not None:
        print("alignment", t.alignment.shape, "(output steps x source tokens)")
        print(attn.Translator.heatmap(t))
