"""Text in, text out: incremental detokenization, stop strings and the finish reason, over any id stream."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from llmctl.data.tokenizer_base import Tokenizer
from llmctl.infer.logprobs import TokenLogprob

PREFIX_TOKENS = 4
INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """Turns a stream of ids into text deltas that are safe to show.

    Decoding each id alone would lose sentencepiece's word-initial spaces and split multi-byte characters
    that byte fallback spreads over several ids, so the text is decoded with a few prompt ids in front and
    held back while it ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.prefix = prompt_ids[-PREFIX_TOKENS:]
        self.prefix_text = tokenizer.decode(self.prefix)
        self.ids: list[int] = []
        self.emitted = 0

    def text(self) -> str:
        return self.tokenizer.decode(self.prefix + self.ids)[len(self.prefix_text) :]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.text()
        if text.endswith(INCOMPLETE):
            return ""
        delta, self.emitted = text[self.emitted :], len(text)
        return delta


class StopStrings:
    """Finds stop strings in streamed text, holding back any tail that might become one."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        text = self.pending + delta
        for stop in self.stops:
            index = text.find(stop)
            if index >= 0:
                self.pending = ""
                return text[:index], True
        hold = max((self._partial(text, stop) for stop in self.stops), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of stop."""
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                return size
        return 0


@dataclass
class TextChunk:
    text: str
    token_id: int | None
    finish_reason: str | None = None  # "stop" (stop id or string) or "length"
    # the tokens this chunk's text came from, where log-probabilities were asked for (None: a prompt's first)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)


class TextStream:
    """Generated ids -> visible text chunks: detokenization, stop ids (never shown) and stop strings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        stop_token_ids: Iterable[int] = (),
        stop_strings: Iterable[str] = (),
    ) -> None:
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.stops = StopStrings(stop_strings)
        self.stop_ids = set(stop_token_ids)

    def push(self, token_id: int) -> TextChunk:
        """The text this id makes visible; finish_reason is "stop" when a stop id or string ends the text."""
        if token_id in self.stop_ids:
            return TextChunk(self.stops.flush(), token_id, "stop")
        visible, stopped = self.stops.feed(self.decoder.push(token_id))
        return TextChunk(visible, token_id, "stop" if stopped else None)

    def end(self, reason: str) -> TextChunk:
        """The text held back for a possible stop string, released when generation ends for `reason`."""
        return TextChunk(self.stops.flush(), None, reason)


def stream_text(
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    ids: Iterable[int],
    stop_token_ids: Iterable[int] = (),
    stop_strings: Iterable[str] = (),
) -> Iterator[TextChunk]:
    """Text deltas of an id stream; the last chunk carries the finish reason."""
    stream = TextStream(tokenizer, prompt_ids, stop_token_ids, stop_strings)
    for token_id in ids:
        chunk = stream.push(token_id)
        yield chunk
        if chunk.finish_reason:
            return
    yield stream.end("length")  # max_new_tokens or the end of the context
