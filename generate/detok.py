"""Tokens -> text while generating: incremental detokenisation that never emits half a character,
and stop strings that are cut from the text (and never streamed in part)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from gpcl_trt.common import GpclError, one_line
from gpcl_trt.text import TOKENIZER_FILES

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved in a local directory (transformers' AutoTokenizer; never downloads)."""
    d = Path(directory)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise GpclError(f"no tokenizer files in {d} (looked for {', '.join(TOKENIZER_FILES)}); pass --tokenizer DIR")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as exc:
        raise GpclError(f"cannot load the tokenizer in {d} ({one_line(exc)})") from None


class StreamDecoder:
    """Text of a growing token sequence, piece by piece. Each ``add`` decodes a short window,
    ids[prefix:] against ids[prefix:read] (the window before the newest tokens), so the cost per
    token stays flat and a tokenizer's word-start rules (SentencePiece's leading space) see the
    same context on both sides; the difference is emitted only when it does not end in U+FFFD,
    i.e. when the newest bytes complete a character. ``flush`` emits what is left at the end."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def _delta(self, final: bool) -> str:
        before = self._text(self.ids[self.prefix : self.read])
        now = self._text(self.ids[self.prefix :])
        if len(now) > len(before) and (final or not now.endswith(REPLACEMENT)):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)


class TextStream:
    """One prompt's generated text: decoded pieces, stop strings found across piece boundaries
    and cut (with what follows them), and ``pending()`` giving what may be shown now: everything
    but the last (longest stop string - 1) characters, which could still begin a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def _extend(self, piece: str) -> bool:
        if piece and not self.stopped:
            start = max(0, len(self.text) - self.hold)
            self.text += piece
            hits = [j for j in (self.text.find(s, start) for s in self.stop) if j >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        return self.stopped

    def add(self, token_id: int) -> bool:
        """Take one token; True when a stop string is complete (generation stops here)."""
        return self._extend(self.decoder.add(token_id))

    def finish(self) -> None:
        self._extend(self.decoder.flush())
        self.stopped = True

    def pending(self) -> str:
        end = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent : end], end
        return piece
