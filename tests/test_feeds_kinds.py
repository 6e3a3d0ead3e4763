"""Feeds for the input kinds of audio encoders and dual encoders (gpcl_trt/feeds.py): a
waveform's ``samples`` axis (320 per ``sequence`` step), texts and images batched apart."""

from __future__ import annotations

import numpy as np

from gpcl_trt.feeds import SAMPLES_PER_FRAME, InputSpec, complete_feed, make_feeds


def test_a_waveform_has_320_samples_per_sequence_step():
    specs = [InputSpec("input_values", np.dtype(np.float32), ("batch", "samples"))]
    feed = make_feeds(specs, 2, 5)
    assert feed["input_values"].shape == (2, 5 * SAMPLES_PER_FRAME) and feed["input_values"].dtype == np.float32
    assert float(np.std(feed["input_values"])) > 0.5  # noise, not silence


def test_texts_and_images_keep_their_own_batches():
    specs = [
        InputSpec("input_ids", np.dtype(np.int64), ("text_batch", "sequence")),
        InputSpec("pixel_values", np.dtype(np.float32), ("image_batch", 3, 4, 4)),
        InputSpec("attention_mask", np.dtype(np.int64), ("text_batch", "sequence")),
    ]
    rnd = make_feeds(specs, 2, 5, vocab=50)
    assert rnd["input_ids"].shape == (2, 5) and rnd["pixel_values"].shape == (2, 3, 4, 4)
    given = {"input_ids": np.ones((3, 6), np.int64), "pixel_values": np.zeros((2, 3, 4, 4), np.float32)}
    feed = complete_feed(specs, given)
    assert feed["input_ids"].shape == (3, 6) and feed["attention_mask"].shape == (3, 6)
    assert feed["pixel_values"].shape == (2, 3, 4, 4)
