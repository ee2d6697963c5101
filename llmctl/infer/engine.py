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
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import torch

from llmctl.infer.constraints import Constraint, ConstraintError
from llmctl.infer.decode import (
    compile_decode,
    decode_step,
    fit_prompt,
    last_positions,
    prefill_rows,
    warm_up_decode,
)
from llmctl.infer.fused_step import fused_serves_all
from llmctl.infer.logprobs import prompt_logprobs, token_logprobs
from llmctl.infer.prefix_cache import PrefixCache, PrefixEntry
from llmctl.infer.request import Request, TokenCallback
from llmctl.infer.sampling import SamplingParams, sample_rows
from llmctl.infer.speculative import DEFAULT_LOOKAHEAD
from llmctl.infer.speculative_rows import DraftRows
from llmctl.model import Transformer

if TYPE_CHECKING:
    from llmctl.adapters import AdapterRouter

log = logging.getLogger("llmctl.engine")
# prompt tokens (rows x the longest) prefilled in one forward: bounds its (rows, width, vocab) logits
PREFILL_TOKENS = 2048


class Engine:
    """Runs up to `max_batch` requests per decode step; the rest wait in order. Admission limits are the
    caller's (the server answers 429 before a request reaches the engine). With `compile`, the decode step is
    compiled here, before the first request, not during it. With `prefix_cache_tokens`, up to that many
    positions of finished requests are kept for later prompts that begin the same way. With `draft` (a smaller
    model of the same vocabulary), every step is a speculative round: up to `lookahead` tokens per row.

    On a CPU, steps run at full speed only while no other live thread has run parallel torch work: load and
    build it in `llmctl.runtime.in_passing_thread`, as `llmctl serve` does."""

    def __init__(
        self,
        model: Transformer,
        max_batch: int = 16,
        router: AdapterRouter | None = None,
        compile: bool = False,
        prefix_cache_tokens: int = 0,
        draft: Transformer | None = None,
        lookahead: int = DEFAULT_LOOKAHEAD,
    ) -> None:
        if draft is not None and router is not None:
            raise ValueError("a draft model does not combine with adapters (the draft knows none of them)")
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
        self.masks: ThreadPoolExecutor | None = None  # computes grammar masks while a forward runs
        # where the engine thread's time goes, cumulative: /metrics exposes it, benchmarks/serve.py --profile
        # splits a step with it
        self.seconds = dict.fromkeys(("prefill", "forward", "sampling", "delivery"), 0.0)
        # adapters change every key and value, so a prefix is only reused on a plain model
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens and router is None else None
        self.speculation = DraftRows(model, draft, max_batch, lookahead) if draft is not None else None
        if self.speculation is not None:
            self.seconds["draft"] = 0.0
            if compile:
                self.speculation.compile(self.cache)
        elif compile and not fused_serves_all(self.model, max_batch):  # nothing left to compile otherwise
            compile_decode(self.model)
            warm_up_decode(self.model, self.cache)

    @property
    def context(self) -> int:
        if self.speculation is not None:
            return self.speculation.context
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
        constraint: Constraint | None = None,
    ) -> Request:
        prompt_ids = fit_prompt(prompt_ids, self.context)  # raises PromptTooLong before anything is queued
        request = Request(
            next(self.ids), prompt_ids, params, on_token, adapter=adapter, constraint=constraint
        )
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
        """The watchdog's repair: fail the requests a dead loop held, and the waiting ones that have now seen
        two loops die (one of them may be the cause; a fallback model can serve them), and start a new loop.
        True if it did."""
        if not self.running or self.alive():
            return False
        with self.wakeup:
            for request in self.waiting:
                request.engine_deaths += 1
            doomed = [request for request in self.waiting if request.engine_deaths >= 2]
            self.waiting = deque(request for request in self.waiting if request.engine_deaths < 2)
        for request in [*self.slots, *doomed]:
            request.error = "the engine stopped while serving this request"
            request.on_token(None, "error")
        self.slots.clear()
        self.cache.lengths.zero_()
        if self.speculation is not None:
            self.speculation.reset()
        self.restarts += 1
        self.start()
        return True

    def stop(self) -> None:
        with self.wakeup:
            self.running = False
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()
        if self.masks is not None:
            self.masks.shutdown()

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
        """Move waiting requests into free slots: those that begin like a recently served sequence start
        from its cached keys and values; the rest, arrived together, are prefilled in one forward."""
        while len(self.slots) < self.max_batch:
            group = self._take_waiting(self.max_batch - len(self.slots))
            if not group:
                return
            reuse = {request.id: self._reusable(request) for request in group}
            fresh = [request for request in group if reuse[request.id][0] is None]
            first = len(self.slots)
            started = time.perf_counter()
            admitted = self._prefill_fresh(fresh, first)
            for request in group:
                entry, length = reuse[request.id]
                if entry is not None:
                    slot = first + len(admitted)
                    admitted += self._isolated(
                        request, partial(self._prefill_after, request, slot, entry, length)
                    )
            if self.speculation is not None and admitted:
                admitted = self._prefill_draft(admitted, first)
            self.seconds["prefill"] += time.perf_counter() - started
            if not admitted:
                continue
            for slot, (request, _) in enumerate(admitted, start=first):
                self.cache.lengths[slot] = len(request.prompt_ids)
                request.history = torch.tensor([request.prompt_ids], device=self.device)
                self.slots.append(request)
                if self.prefixes is not None:  # reusable now, by requests that arrive while this one decodes
                    self.prefixes.store(request.prompt_ids, self.cache, slot)
            logits = torch.cat([row for _, row in admitted])
            self._sample_tokens(list(range(first, first + len(admitted))), logits)
            self._retire_finished()

    def _prefill_fresh(self, group: list[Request], first: int) -> list[tuple[Request, torch.Tensor]]:
        """Prefill `group` into slots first.. in one forward; if that fails, each alone, so that only the
        request at fault fails. (request, its next-token logits (1, vocab)) for each admitted."""
        if not group:
            return []
        try:
            logits = self._prefill(group, first)
            return [(request, logits[row : row + 1]) for row, request in enumerate(group)]
        except Exception:
            admitted: list[tuple[Request, torch.Tensor]] = []
            for request in group:
                slot = first + len(admitted)
                admitted += self._isolated(request, partial(self._prefill, [request], slot))
            return admitted

    def _prefill_draft(
        self, admitted: list[tuple[Request, torch.Tensor]], first: int
    ) -> list[tuple[Request, torch.Tensor]]:
        """The draft's prefill of the admitted prompts into the same slots; if it fails, they fail."""
        try:
            self.speculation.prefill([request.prompt_ids for request, _ in admitted], first)
            return admitted
        except Exception as error:
            log.exception("the draft failed to prefill %d requests", len(admitted))
            for request, _ in admitted:
                request.error = f"draft model: {type(error).__name__}: {error}"
                request.on_token(None, "error")
            return []

    def _isolated(
        self, request: Request, prefill: Callable[[], torch.Tensor]
    ) -> list[tuple[Request, torch.Tensor]]:
        """[(request, its logits)], or [] with the request failed alone."""
        try:
            return [(request, prefill())]
        except Exception as error:
            log.exception("request %d failed at prefill", request.id)
            request.error = f"{type(error).__name__}: {error}"
            request.on_token(None, "error")
            return []

    def _reusable(self, request: Request) -> tuple[PrefixEntry | None, int]:
        """A cached prefix to start from; never for a request that scores its whole prompt."""
        if self.prefixes is None or request.params.prompt_logprobs is not None:
            return None, 0
        return self.prefixes.lookup(request.prompt_ids)

    def _prefill_after(self, request: Request, slot: int, entry: PrefixEntry, length: int) -> torch.Tensor:
        """Copy a cached prefix into `slot` and prefill only the rest of the prompt after it."""
        self._seed(request)
        PrefixCache.restore(entry, length, self.cache, slot)
        rest = self.cache.rows_from(slot, 1)
        rest.length = length
        with self._routing([request]):
            return prefill_rows(self.model, [request.prompt_ids[length:]], rest)

    def _take_waiting(self, room: int) -> list[Request]:
        """Up to `room` waiting requests whose padded prompts fit PREFILL_TOKENS (always at least one)."""
        group: list[Request] = []
        with self.wakeup:
            while self.waiting and len(group) < room:
                request = self.waiting[0]
                width = max([len(request.prompt_ids), *(len(r.prompt_ids) for r in group)])
                if group and width * (len(group) + 1) > PREFILL_TOKENS:
                    break
                self.waiting.popleft()
                if request.cancelled:
                    request.on_token(None, "cancelled")
                    continue
                group.append(request)
        return group

    def _seed(self, request: Request) -> None:
        if request.params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.params.seed)

    def _prefill(self, group: list[Request], first: int) -> torch.Tensor:
        """Prefill `group` into slots first.., right-padded in one forward; each row's next-token logits."""
        for request in group:
            self._seed(request)
        prompts = [request.prompt_ids for request in group]
        scored = [request for request in group if request.params.prompt_logprobs is not None]
        with self._routing(group):
            logits = prefill_rows(
                self.model, prompts, self.cache.rows_from(first, len(group)), all_positions=bool(scored)
            )
        if not scored:
            return logits
        for row, request in enumerate(group):
            if request.params.prompt_logprobs is not None:
                request.prompt_logprobs = prompt_logprobs(
                    logits[row], request.prompt_ids, request.params.prompt_logprobs
                )
        return last_positions(logits, prompts)

    def _decode_step(self) -> None:
        if self.speculation is not None:
            self._speculative_step()
            return
        started = time.perf_counter()
        # the constrained rows' masks are computed while the forward runs (llguidance releases the GIL)
        constrained = [r for r in self.slots if r.constraint is not None and not self._stopped(r)]
        masks = self._mask_worker().submit(_masks_of, constrained) if constrained else None
        last = torch.tensor([request.generated[-1] for request in self.slots], device=self.device)
        with self._routing(self.slots):
            logits = decode_step(self.model, last, self.cache)
        self.seconds["forward"] += time.perf_counter() - started
        self.decode_steps += 1
        self._sample_tokens(list(range(len(self.slots))), logits, masks.result() if masks else None)

    def _mask_worker(self) -> ThreadPoolExecutor:
        if self.masks is None:
            self.masks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmctl-masks")
        return self.masks

    def _speculative_step(self) -> None:
        """One speculative round for every active row: draft proposals, one verifying forward, acceptance."""
        started = time.perf_counter()
        proposals = self.speculation.propose(self.slots, self.cache)
        drafted = time.perf_counter()
        logits = self.speculation.verify(proposals, self.cache)
        verified = time.perf_counter()
        emitted = self.speculation.accept(self.slots, proposals, logits, self.cache)
        accepted = time.perf_counter()
        self.decode_steps += 1
        for row, (request, tokens) in enumerate(zip(self.slots, emitted, strict=True)):
            for position, token in enumerate(tokens):
                if self._stopped(request) or self._complete(request):
                    break
                self._deliver(request, token, logits[row, position])
        self.seconds["draft"] += drafted - started
        self.seconds["forward"] += verified - drafted
        self.seconds["sampling"] += accepted - verified
        self.seconds["delivery"] += time.perf_counter() - accepted

    @staticmethod
    def _complete(request: Request) -> bool:
        """It has generated a stop id or its `max_new_tokens`, or completed its grammar: later tokens of a round
        are not its own."""
        generated = request.generated
        if request.constraint is not None and request.constraint.finished:
            return True
        return bool(generated) and (
            generated[-1] in request.params.stop_token_ids or len(generated) >= request.params.max_new_tokens
        )

    def _deliver(self, request: Request, token: int, logits: torch.Tensor) -> None:
        """Hand `token`, drawn from the model's `logits` (vocab,), to its request."""
        if request.history is not None and request.params.penalised:
            request.history = torch.cat([request.history, request.history.new_tensor([[token]])], dim=1)
        if request.constraint is not None:
            try:  # the mask allowed it, so only an engine fault lands here; it fails this request alone
                request.constraint.advance(token, request.params.stop_token_ids)
            except ConstraintError as error:
                request.error = str(error)
                return
        if request.params.logprobs is not None:
            request.logprobs += token_logprobs(logits[None], [token], request.params.logprobs)
        request.generated.append(token)
        request.on_token(token, None)

    def _routing(self, rows: list[Request]) -> contextlib.AbstractContextManager:
        """Each row's own adapter, when the model carries several (continuous batching across adapters)."""
        if self.router is None:
            return contextlib.nullcontext()
        return self.router.route([request.adapter for request in rows])

    def _sample_tokens(
        self,
        slots: list[int],
        logits: torch.Tensor,
        masks: dict[int, torch.Tensor | ConstraintError] | None = None,
    ) -> None:
        """Each slot's next token from its row of `logits` (masked to its grammar, for a constrained one: by
        its mask in `masks` where computed ahead), all rows sampled together; a row whose masking or sampling
        fails fails its request alone."""
        live = [
            (slot, row)
            for row, slot in enumerate(slots)
            if not self._stopped(self.slots[slot]) and self.slots[slot].params.max_new_tokens > 0
        ]
        if not live:
            return
        started = time.perf_counter()
        rows = logits[[row for _, row in live]]  # a copy: masking it leaves `logits` as it was
        for (slot, _), row in zip(live, rows, strict=True):
            request = self.slots[slot]
            self._constrain(request, row, (masks or {}).get(request.id))
        kept = [index for index, (slot, _) in enumerate(live) if not self._stopped(self.slots[slot])]
        requests = [self.slots[live[index][0]] for index in kept]
        raw = [live[index][1] for index in kept]  # each request's row of the unmasked logits
        rows = rows[kept] if len(kept) < len(live) else rows
        try:
            tokens = self._sample(requests, rows) if requests else []
        except Exception:  # find the request at fault: sample each alone
            tokens = []
            for request, row in zip(requests, rows, strict=True):
                try:
                    tokens.extend(self._sample([request], row[None]))
                except Exception as error:
                    log.exception("request %d failed while sampling", request.id)
                    request.error = f"{type(error).__name__}: {error}"
                    tokens.append(None)
        sampled = time.perf_counter()
        for request, token, row in zip(requests, tokens, raw, strict=True):
            if token is not None:
                self._deliver(request, token, logits[row])
        self.seconds["sampling"] += sampled - started
        self.seconds["delivery"] += time.perf_counter() - sampled

    @staticmethod
    def _constrain(request: Request, row: torch.Tensor, mask: torch.Tensor | ConstraintError | None) -> None:
        """Mask the row to the tokens the request's grammar allows (`mask`, or computed now); a grammar that
        allows none fails it."""
        if request.constraint is None:
            return
        try:
            if mask is None:
                mask = _masks_of([request])[request.id]
            if isinstance(mask, ConstraintError):
                raise mask
            row.masked_fill_(~mask.to(row.device)[: row.shape[-1]], float("-inf"))
        except ConstraintError as error:
            request.error = str(error)

    @staticmethod
    def _sample(requests: list[Request], logits: torch.Tensor) -> list[int]:
        return sample_rows(
            logits,
            [request.params for request in requests],
            [request.history for request in requests],
            [request.generator for request in requests],
        )

    @staticmethod
    def _stopped(request: Request) -> bool:
        return request.cancelled or request.error is not None

    def _finish_reason(self, slot: int) -> str | None:
        request = self.slots[slot]
        if request.error:
            return "error"
        if request.cancelled:
            return "cancelled"
        if request.generated and request.generated[-1] in request.params.stop_token_ids:
            return "stop"
        if request.constraint is not None and request.constraint.finished:
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
            request = self.slots[slot]
            request.on_token(None, reason)
            if self.prefixes is not None and reason in ("stop", "length"):
                cached = int(self.cache.lengths[slot])  # the last token generated was never fed back
                self.prefixes.store([*request.prompt_ids, *request.generated][:cached], self.cache, slot)
            last = len(self.slots) - 1
            if slot != last:  # keep active requests in a contiguous prefix of rows
                self.cache.move(last, slot)
                if self.speculation is not None:
                    self.speculation.move(last, slot)
                self.slots[slot] = self.slots[last]
            self.slots.pop()


def _masks_of(requests: list[Request]) -> dict[int, torch.Tensor | ConstraintError]:
    """Each constrained request's allowed next tokens, by request id (or why its grammar cannot go on)."""
    masks: dict[int, torch.Tensor | ConstraintError] = {}
    for request in requests:
        try:
            masks[request.id] = request.constraint.allowed(request.params.stop_token_ids)
        except ConstraintError as error:
            masks[request.id] = error
    return masks
