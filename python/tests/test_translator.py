"""The translator from Python: a model trained by the `attn train` command line loads, translates
what `attn translate` translates, and returns its alignment as an array."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import attn

PAIRS = [
    ("the cat sleeps .", "le chat dort ."),
    ("the dog sleeps .", "le chien dort ."),
    ("the cat eats .", "le chat mange ."),
    ("the dog eats .", "le chien mange ."),
    ("a cat sees the dog .", "un chat voit le chien ."),
    ("a dog sees the cat .", "un chien voit le chat ."),
] * 8


def attn_binary() -> Path:
    binary = Path(os.environ.get("ATTN_BIN_DIR", "build/bin")) / "attn"
    if not binary.exists():
        pytest.skip(f"no attn command-line tool at {binary} (set ATTN_BIN_DIR)")
    return binary


@pytest.fixture(scope="module", params=["gru", "transformer", "gru_subword"])
def model_dir(request, tmp_path_factory):
    binary = attn_binary()
    d = tmp_path_factory.mktemp(request.param)
    train = d / "train.tsv"
    train.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS))
    arch = (["--arch", "transformer", "--layers", "1", "--heads", "2", "--ffn", "32",
             "--emb", "16"] if request.param == "transformer" else ["--emb", "8"])
    if request.param == "gru_subword":  # SentencePiece BPE: cased, detokenised output
        arch += ["--subword", "bpe", "--vocab-size", "300"]
    subprocess.run([str(binary), "train", "--train", str(train), "--out", str(d / "model"),
                    "--hidden", "16", "--epochs", "2", "--batch", "16",
                    "--threads", "1", *arch], check=True, capture_output=True)
    return d / "model"


def test_translations_match_the_command_line(model_dir):
    translator = attn.Translator(model_dir)
    sentences = ["the cat sleeps .", "", "a dog sees the cat ."]
    got = translator.translate(sentences, beam=2)
    cli = subprocess.run([str(attn_binary()), "translate", "--model", str(model_dir), "--beam",
                          "2", "--no-alignment"], input=("\n".join(sentences) + "\n").encode(),
                         capture_output=True, check=True).stdout
    # An undertrained subword model may emit bytes that are not UTF-8; Python shows them as
    # U+FFFD, exactly as this decode does.
    cli = cli.decode("utf-8", "replace").split("\n")[:-1]
    assert [t.text for t in got] == cli
    assert got[1].text == "" and got[1].tokens == []


def test_alignment_is_an_array_over_source_and_target(model_dir):
    t = attn.Translator(model_dir).translate("the dog eats .")
    assert isinstance(t, attn.Translation)
    if "subword" in str(model_dir):
        assert t.source_tokens[-1] == "<eos>" and len(t.source_tokens) >= 3
    else:
        assert t.source_tokens == ["the", "dog", "eats", ".", "<eos>"]
    a = t.alignment
    assert isinstance(a, np.ndarray) and a.dtype == np.float64
    assert a.shape == (len(t.target_tokens), len(t.source_tokens))
    assert np.allclose(a.sum(axis=1), 1.0, atol=1e-6)  # each output step's weights sum to one
    assert t.log_prob <= 0 and t.finished in (True, False)
    assert t.target_tokens[0] in attn.Translator.heatmap(t)


def test_over_long_input_and_missing_models_are_refused(model_dir, tmp_path):
    translator = attn.Translator(model_dir)
    too_long = " ".join(["cat"] * (translator.max_source_tokens + 1))
    with pytest.raises(attn.Error, match="sentence 0 has"):
        translator.translate([too_long])
    with pytest.raises(Exception, match="checkpoint"):
        attn.Translator(tmp_path / "nothing-here")
