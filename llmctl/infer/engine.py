"""A continuous-batching generation engine: requests join and leave the running batch at token boundaries,
and one model forward per decode step serves every active request.

The engine runs in its own thread; callers submit prompts with a callback that receives each new token id
and, last, a finish reason. A server bridges the callback into asyncio; tests can call it directly.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llmctl.infer.decode import compile_decode, decode_step, fit_prompt, prefill, warm_up_decode
from llmctl.infer.sampling import SamplingParams, sample_next
from llmctl.model import Transformer

if TYPE_CHECKING:
    from llmctl.adapters import AdapterRouter

# on_token(token_id, finish_reason): token_id is None only on the final call; finish_reason is None
# until the request ends with "stop" (a stop id), "length" (max tokens or context), "cancelled" or
# "error" (this request failed; `Request.error` says why, and the engine serves the others on).
TokenCallback = Callable[[int | None, str | None], None]
log = logging.getLogger("llmctl.engine")


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    on_token: TokenCallback
    submitted: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    history: torch.Tensor | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False
    error: str | None = None
    adapter: str | None = None  # which LoRA adapter of an `AdapterRouter` model serves it (None: the base)

    def cancel(self) -> None:
        """Safe from any thread: the engine frees the slot at the next token boundary."""
        self.cancelled = True


class Engine:
    """Runs up to `max_batch` requests per decode step; the rest wait in order. Admission limits are the
    caller's (the server answers 429 before a request reaches the engine). With `compile`, the decode step is
    compiled here, before the first request, not during it."""

    def __init__(
        self,
        model: Transformer,
        max_batch: int = 16,
        router: AdapterRouter | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model.eval()
        self.router = router
        self.device = model.device
        self.max_batch = max_batch
        self.cache = model.new_kv_cache(max_batch, slots=True)
        self.slots: list[Request] = []
        self.waiting: deque[Request] = deque()
        self.ids = itertools.count()
        self.wakeup = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.decode_steps = 0
        self.restarts = 0
        if compile:
            compile_decode(self.model)
            warm_up_decode(self.model, self.cache)

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    def queue_depth(self) -> int:
        return len(self.waiting)

    def active(self) -> int:
        return len(self.slots)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_token: TokenCallback,
        adapter: str | None = None,
    ) -> Request:
        prompt_ids = fit_prompt(prompt_ids, self.context)  # raises PromptTooLong before anything is queued
        request = Request(next(self.ids), prompt_ids, params, on_token, adapter=adapter)
        with self.wakeup:
            self.waiting.append(request)
            self.wakeup.notify()
        return request

    def start(self) -> Engine:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="llmctl-engine", daemon=True)
        self.thread.start()
        return self

    def alive(self) -> bool:
        """Whether the loop thread runs; it only dies of a bug (a failing request fails alone)."""
        return self.thread is not None and self.thread.is_alive()

    def restart_if_dead(self) -> bool:
        """The watchdog's repair: fail the requests a dead loop held and start a new loop. True if it did."""
        if not self.running or self.alive():
            return False
        for request in self.slots:
            request.error = "the engine stopped while serving this request"
            request.on_token(None, "error")
        self.slots.clear()
        self.cache.lengths.zero_()
        self.restarts += 1
        self.start()
        return True

    def stop(self) -> None:
        with self.wakeup:
            self.running = False
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()

    # -- the loop (engine thread only) ---------------------------------------------------------------------

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self.wakeup:
                while self.running and not self.waiting and not self.slots:
                    self.wakeup.wait()
                if not self.running:
                    break
            self._admit()
            if not self.slots:
                continue
            try:
                self._decode_step()
            except Exception as error:  # the batch's forward failed: its requests fail, the engine goes on
                log.exception("decode step failed; failing the %d requests in the batch", len(self.slots))
                for request in self.slots:
                    request.error = request.error or f"{type(error).__name__}: {error}"
            self._retire_finished()
        for request in [*self.slots, *self.waiting]:
            request.on_token(None, "cancelled")

    def _admit(self) -> None:
        while len(self.slots) < self.max_batch:
            with self.wakeup:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                request.on_token(None, "cancelled")
                continue
            slot = len(self.slots)
            try:
                ids = torch.tensor([request.prompt_ids], device=self.device)
                if request.params.seed is not None:
                    request.generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
                with self._routing([request]):
                    logits = prefill(self.model, ids, self.cache.row(slot))
            except Exception as error:  # this request alone fails
                log.exception("request %d failed at prefill", request.id)
                request.error = f"{type(error).__name__}: {error}"
                request.on_token(None, "error")
                continue
            self.cache.lengths[slot] = len(request.prompt_ids)
            request.history = ids
            self.slots.append(request)
            self._sample_token(slot, logits)
            self._retire_finished()

    def _decode_step(self) -> None:
        last = torch.tensor([request.generated[-1] for request in self.slots], device=self.device)
        with self._routing(self.slots):
            logits = decode_step(self.model, last, self.cache)
        self.decode_steps += 1
        for slot in range(len(self.slots)):
            self._sample_token(slot, logits[slot : slot + 1])

    def _routing(self, rows: list[Request]) -> contextlib.AbstractContextManager:
        """Each row's own adapter, when the model carries several (continuous batching across adapters)."""
        if self.router is None:
            return contextlib.nullcontext()
        return self.router.route([request.adapter for request in rows])

    def _sample_token(self, slot: int, logits: torch.Tensor) -> None:
        request = self.slots[slot]
        if request.cancelled or request.error:
            return
        try:
            token = sample_next(logits, request.params, request.history, request.generator)
        except Exception as error:  # this request alone fails
            log.exception("request %d failed while sampling", request.id)
            request.error = f"{type(error).__name__}: {error}"
            return
        request.history = torch.cat([request.history, token[:, None]], dim=1)
        token_id = int(token)
        request.generated.append(token_id)
        request.on_token(token_id, None)

    def _finish_reason(self, slot: int) -> str | None:
        request = self.slots[slot]
        if request.error:
            return "error"
        if request.cancelled:
            return "cancelled"
        if request.generated and request.generated[-1] in request.params.stop_token_ids:
            return "stop"
        if len(request.generated) >= request.params.max_new_tokens:
            return "length"
        if int(self.cache.lengths[slot]) + 1 >= self.context:
            return "length"
        return None

    def _retire_finished(self) -> None:
        slot = 0
        while slot < len(self.slots):
            reason = self._finish_reason(slot)
            if reason is None:
                slot += 1
                continue
            self.slots[slot].on_token(None, reason)
            last = len(self.slots) - 1
            if slot != last:  # keep active requests in a contiguous prefix of rows
                self.cache.move(last, slot)
                self.slots[slot] = self.slots[last]
            self.slots.pop()
