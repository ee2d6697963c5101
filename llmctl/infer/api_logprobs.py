"""Token log-probabilities in OpenAI's two wire shapes: completions' parallel lists (tokens, token_logprobs,
top_logprobs, text_offset) and chat's `content` list of {token, logprob, bytes, top_logprobs}."""

from __future__ import annotations

from llmctl.data.tokenizer_base import Tokenizer
from llmctl.infer.api_schema import Endpoint
from llmctl.infer.logprobs import TokenLogprob


class LogprobWriter:
    """Writes one choice's log-probabilities, chunk by chunk: a token's text is what it adds after the token
    before it (sentencepiece drops a word's leading space when a piece is decoded alone), and completions'
    text offsets run on from the echoed prompt or the start of the text."""

    def __init__(self, tokenizer: Tokenizer, endpoint: Endpoint, before: int | None = None) -> None:
        self.tokenizer, self.endpoint = tokenizer, endpoint
        self.before, self.offset = before, 0
        self.texts: dict[tuple[int | None, int], str] = {}

    def text(self, token: int, before: int | None) -> str:
        key = (before, token)
        if key not in self.texts:
            if before is None:
                text = self.tokenizer.decode([token])
            else:
                text = self.tokenizer.decode([before, token])[len(self.tokenizer.decode([before])) :]
            self.texts[key] = text or self.tokenizer.token_text(token)  # a special token decodes to nothing
        return self.texts[key]

    def write(self, entries: list[TokenLogprob | None], tokens: list[int]) -> dict:
        """The wire object for `tokens` (an entry None: a prompt's first token, which has no probability)."""
        if self.endpoint is Endpoint.CHAT:
            return {"content": [self._chat_entry(entry) for entry in entries if entry is not None]}
        written: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry, token in zip(entries, tokens, strict=True):
            before, text = self.before, self.text(token, self.before)
            written["tokens"].append(text)
            written["text_offset"].append(self.offset)
            written["token_logprobs"].append(None if entry is None else entry.logprob)
            written["top_logprobs"].append(
                None if entry is None else {self.text(alt, before): value for alt, value in entry.top}
            )
            self.before, self.offset = token, self.offset + len(text)
        return written

    def _chat_entry(self, entry: TokenLogprob) -> dict:
        before, text = self.before, self.text(entry.token, self.before)
        self.before = entry.token
        return {
            **self._described(text, entry.logprob),
            "top_logprobs": [self._described(self.text(alt, before), value) for alt, value in entry.top],
        }

    @staticmethod
    def _described(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}
