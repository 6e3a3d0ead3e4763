"""The shared tokenizer loader (gpcl_trt.text): both paths (tokenizers on tokenizer.json,
transformers' AutoTokenizer without it) give the same ids; padded and unpadded shapes."""

from __future__ import annotations

import shutil

import numpy as np

from gpcl_trt.text import text_encoder

TEXTS = ["A short one.", "A somewhat longer sentence, with a comma and more words in it."]


def test_fast_and_transformers_paths_agree(minilm_dir, tmp_path):
    slow_dir = tmp_path / "no_tokenizer_json"
    slow_dir.mkdir()
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm_dir / f).is_file():
            shutil.copy(minilm_dir / f, slow_dir / f)
    fast, slow = text_encoder(minilm_dir, length=16), text_encoder(slow_dir, length=16)
    a, b = fast(TEXTS), slow(TEXTS)
    assert set(a) == set(b) == {"input_ids", "attention_mask", "token_type_ids"}
    for k in a:
        assert a[k].dtype == np.int64 and a[k].shape == (2, 16)
        np.testing.assert_array_equal(a[k], b[k])
    assert a["input_ids"][0, 0] == 101 and a["attention_mask"][0].sum() < 16  # [CLS] first, padded
    # Unpadded: one text, its own length, truncated at max_tokens.
    one = text_encoder(minilm_dir, max_tokens=8)([TEXTS[1]])
    assert one["input_ids"].shape == (1, 8) and one["attention_mask"].all()
    short = text_encoder(slow_dir)([TEXTS[0]])
    assert short["input_ids"].shape[1] == int(a["attention_mask"][0].sum())


def test_no_tokenizer_files_gives_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert text_encoder(tmp_path) is None
