"""The training loop: one loop for every model size, device count and strategy.

Everything a run needs comes from its recipe; progress is reported as typed events (`train.events`) to an
`on_event` callback and to `metrics.jsonl`, never printed here, so the CLI, the TUI and tests all drive the
same code.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmctl.atomic import atomic_write_text
from llmctl.checkpoint import latest_checkpoint, prune_checkpoints, save_checkpoint, step_directory
from llmctl.data.instructions import IGNORE
from llmctl.data.loader import TokenFile, WindowSampler, validation_batches
from llmctl.data.token_files import read_meta, token_stream_fingerprint
from llmctl.data.tokenizer import open_tokenizer
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.errors import UserError
from llmctl.infer.generate import generate_ids, without_stop_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.model import Transformer
from llmctl.model.transformer import document_ids_of
from llmctl.recipe import Recipe
from llmctl.runtime import keep_freed_memory
from llmctl.train.budget import WallClock, budget_spent
from llmctl.train.distributed import (
    DistributedContext,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    wrap_model,
)
from llmctl.train.events import (
    CheckpointRejected,
    CheckpointSaved,
    Evaluated,
    Event,
    EventHandler,
    Finished,
    Interrupted,
    Resumed,
    Sampled,
    Started,
    StepLogged,
    StepSkipped,
)
from llmctl.train.loggers import open_loggers
from llmctl.train.metrics import AUTOCAST_DTYPES, MetricsWriter, device_peak_flops, memory_in_use
from llmctl.train.optim import build_optimizer, lr_at
from llmctl.train.plan import grad_accum_steps, make_plan, resolve_strategy
from llmctl.train.run_dir import RunLock, check_resume_matches, claim_run_dir, resume_checkpoint
from llmctl.train.run_log import RANKS_DIR
from llmctl.train.state import (
    full_model_state,
    full_optimizer_state,
    load_model_weights,
    read_trainer_state,
    restore_trainer_state,
    rng_state,
)


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    checkpoint: Path | None
    val_loss: float | None
    interrupted: bool = False
    skipped_steps: int = 0
    samples: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class LoopState:
    """Where the training loop stands: the last step done, the last checkpoint, the last validation."""

    step: int
    last_saved: Path | None = None
    val_loss: float | None = None
    stopped: bool = False  # a stop was requested: the loop ended early


@dataclass
class ThroughputWindow:
    """Tokens trained since the last logged step, and when that window began."""

    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def restart(self) -> None:
        self.tokens, self.started = 0, time.perf_counter()


@dataclass(frozen=True)
class StepStats:
    """One optimizer step: the loss averaged over its micro-batches and ranks, the lr and gradient norm."""

    step: int  # 1-based: the number of steps done
    loss: float
    lr: float
    grad_norm: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.grad_norm)


class Trainer:
    """The one training loop (pretraining as it is). Finetuning and distillation extend it by overriding its
    public extension points, each called at one place of the loop:

    - `open_data()`: the training and validation data (token files here; examples in finetuning);
    - `build_model()`: the model to train (a base with LoRA, a quantized base);
    - `lr_scale(name)`: a parameter's share of the scheduled learning rate;
    - `before_training(start_step)`: work once the run is set up (distillation's teacher cache);
    - `micro_batch(step, micro_step)`: one micro-batch's tensors;
    - `batch_loss(inputs, targets, documents)`: the loss of one micro-batch (distillation's KL);
    - `model_state()`, `write_checkpoint(directory, model_state, trainer_state)`, `load_weights(checkpoint)`:
      what a checkpoint holds and how it is written and read back (PEFT adapters in finetuning)."""

    def __init__(
        self, recipe: Recipe, context: DistributedContext, on_event: EventHandler | None = None
    ) -> None:
        self.recipe, self.context = recipe, context
        self.on_event = on_event or (lambda event: None)
        self.metrics: MetricsWriter | None = None
        self.rank_metrics: MetricsWriter | None = None  # under torchrun, every rank's own throughput
        self.run_dir = recipe.run_dir
        self.run_lock: RunLock | None = None  # rank 0's, while fit() runs
        make_plan(recipe, context.world_size)  # the recipe's shape checks, before anything is built
        self.strategy = resolve_strategy(recipe, context.world_size)
        self.accum = grad_accum_steps(recipe, context.world_size)
        self.seq_len = recipe.seq_len
        self.tokenizer: Tokenizer | None = None
        self.open_data()
        self.stop_requested = False
        self.skipped_steps = 0
        self.clock = WallClock(recipe.train.max_minutes, context)

        torch.manual_seed(recipe.train.seed)
        if context.device.type == "cpu":
            keep_freed_memory()
        if context.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = self.build_model()
        self.model.activation_checkpointing = recipe.train.activation_checkpointing
        self.wrapped = wrap_model(self.model, self.strategy, recipe.train.precision, context)
        self.forward = torch.compile(self.wrapped) if recipe.train.compile else self.wrapped
        self.optimizer = build_optimizer(self.model, recipe.optim, context.device, self.lr_scale)
        self.scaler = torch.amp.GradScaler(context.device.type, enabled=recipe.train.precision == "fp16")
        self.peak_flops = device_peak_flops(context.device, recipe.train.precision)
        self.flops_per_token = self._flops_per_token()

    # -- setup ---------------------------------------------------------------------------------------------

    def open_data(self) -> None:
        """Sets `meta` (special ids, vocabulary size, data fingerprint), `tokenizer`, `sampler` and
        `val_batches`: here from `tokenize encode` files, checked to fit the model and the tokenizer (the
        recipe's data.tokenizer, unless a subclass has set one)."""
        recipe = self.recipe
        if not recipe.data.tokens:
            raise UserError("recipe data.tokens is not set: point it at a `llmctl tokenize encode` output")
        self.meta = read_meta(Path(recipe.data.tokens))
        if self.tokenizer is None and recipe.data.tokenizer:
            self.tokenizer = open_tokenizer(recipe.data.tokenizer)
        if self.tokenizer is not None and self.tokenizer.sha256() != self.meta["tokenizer_sha256"]:
            raise UserError(
                f"tokenizer mismatch: {self.tokenizer.path} is not the tokenizer that encoded {recipe.data.tokens} "
                f"({self.meta['tokenizer']}); re-run llmctl tokenize encode with it, or fix the recipe"
            )
        if self.meta["vocab_size"] > recipe.model.vocab_size:
            raise UserError(
                f"the token files use a {self.meta['vocab_size']}-piece vocabulary but model.vocab_size is "
                f"{recipe.model.vocab_size}; set --set model.vocab_size={self.meta['vocab_size']}"
            )
        self.sampler = WindowSampler(
            TokenFile(recipe.data.tokens, "train"),
            self.seq_len,
            recipe.train.global_batch_size,
            recipe.train.seed,
        )
        self.val_batches = validation_batches(
            TokenFile(recipe.data.tokens, "val"),
            self.seq_len,
            recipe.train.micro_batch_size,
            recipe.train.eval_batches,
            self.context.rank,
            self.context.world_size,
        )

    def build_model(self) -> Transformer:
        """A freshly initialised model of the recipe's shape, on the run's device."""
        config = self.recipe.model.to_config(
            bos_token_id=self.meta["bos_id"],
            eos_token_id=self.meta["eos_id"],
            pad_token_id=self.meta["pad_id"],
        )
        with torch.device(self.context.device):
            return Transformer(config)

    def _flops_per_token(self) -> float:
        """The FLOPs a training step spends per token, what MFU counts: every weight trained here."""
        return self.model.config.flops_per_token(self.seq_len)

    def lr_scale(self, name: str) -> float:
        """A parameter's share of the scheduled learning rate (1 here; layer-wise decay overrides it)."""
        return 1.0

    def _claim_run_dir(self, resume: str | None, overwrite: bool) -> None:
        """Rank 0 decides (and clears, with `overwrite`) before any rank writes; every rank learns the
        outcome, so a refusal stops them all instead of leaving the others waiting in a collective."""
        refusal = None
        if self.context.is_main:
            try:
                self.run_lock = claim_run_dir(self.run_dir, resume, overwrite)
            except UserError as error:
                refusal = error
        if any_rank(refusal is not None, self.context):
            raise refusal or UserError(f"rank 0 refused the run directory {self.run_dir}")

    # -- the loop ------------------------------------------------------------------------------------------

    def fit(self, resume: str | None = None, overwrite: bool = False) -> TrainResult:
        """Train to the recipe's end. `resume`: 'auto' or a checkpoint path; `overwrite`: start clean in a
        run directory that holds an earlier run (refused otherwise). The directory stays locked meanwhile."""
        self._claim_run_dir(resume, overwrite)
        try:
            return self._fit(resume)
        finally:
            if self.run_lock is not None:
                self.run_lock.release()
                self.run_lock = None

    def _fit(self, resume: str | None) -> TrainResult:
        """Resume (or start), open the run's logs, loop, and report how the run ended."""
        checkpoint, start_step, rejected = self._resume(resume)
        self._open_run_logs(start_step, resumed=checkpoint is not None)
        self._emit(self._started(start_step))
        if checkpoint is not None:
            self._emit(Resumed(step=start_step, checkpoint=str(checkpoint)))
        for path, reason in rejected:
            self._emit(CheckpointRejected(step=start_step, path=str(path), reason=reason))
        self.before_training(start_step)
        with self._stop_on_signals():
            run = self._loop(start_step)
        samples = [] if run.stopped else self.samples()
        if not run.stopped:
            self._emit_samples(run.step, samples)
            saved = str(run.last_saved) if run.last_saved else None
            self._emit(Finished(step=run.step, checkpoint=saved, val_loss=run.val_loss))
        self._close_run_logs()
        return TrainResult(
            self.run_dir, run.step, run.last_saved, run.val_loss, run.stopped, self.skipped_steps, samples
        )

    def _resume(self, resume: str | None) -> tuple[Path | None, int, list[tuple[Path, str]]]:
        """The checkpoint resumed from (its weights, optimizer and clock restored), its step, and the newer
        checkpoints passed over as unusable, with why."""
        rejected: list[tuple[Path, str]] = []
        checkpoint = resume_checkpoint(
            self.run_dir, resume, lambda path, reason: rejected.append((path, reason))
        )
        if checkpoint is None:
            self.clock.restart()
            return None, 0, rejected
        state = read_trainer_state(checkpoint)
        check_resume_matches(checkpoint, self.recipe, token_stream_fingerprint(self.meta), state)
        self.load_weights(checkpoint)
        restore_trainer_state(self.model, self.optimizer, state, self.context.is_main)
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = state["skipped_steps"]
        self.clock.restart(elapsed_before=state.get("elapsed_seconds", 0.0))
        return checkpoint, state["step"], rejected

    def _open_run_logs(self, start_step: int, resumed: bool) -> None:
        """The run's recipe and metrics on rank 0 (and the configured loggers); each rank's own under torchrun."""
        if self.context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "recipe.toml", self.recipe.to_toml())
            loggers = open_loggers(
                self.recipe.train.loggers,
                self.run_dir,
                self.recipe.name,
                self.recipe.model_dump(mode="json", exclude_none=True),
                resume_step=start_step if resumed else None,
            )
            self.metrics = MetricsWriter(self.run_dir, loggers)
        if self.context.is_distributed:
            self.rank_metrics = MetricsWriter(
                self.run_dir / RANKS_DIR, file_name=f"rank-{self.context.rank}.jsonl"
            )

    def _close_run_logs(self) -> None:
        for writer in (self.metrics, self.rank_metrics):
            if writer is not None:
                writer.close()
        self.metrics = self.rank_metrics = None

    def _loop(self, start_step: int) -> LoopState:
        """Steps until the recipe's count or the time budget, each followed by the periodic actions; a stop
        request (a signal, the monitor) ends it after a checkpoint."""
        run, window = LoopState(start_step), ThroughputWindow()
        total = self.recipe.train.steps
        time_fraction = self.clock.fraction()
        while run.step < total and not budget_spent(time_fraction):
            stats = self.train_step(run.step, time_fraction)
            run.step += 1
            time_fraction = self.clock.fraction()
            last = run.step == total or budget_spent(time_fraction)
            window.tokens += self.recipe.train.global_batch_size * self.seq_len
            if not stats.finite:
                self._emit(StepSkipped(step=run.step, grad_norm=stats.grad_norm))
            self._log_if_due(run.step, stats, window, last)
            self._validate_if_due(run, last)
            self._sample_if_due(run.step, last)
            self._checkpoint_if_due(run, last)
            if run.stopped:
                break
        return run

    def _log_if_due(self, step: int, stats: StepStats, window: ThroughputWindow, last: bool) -> None:
        if step % self.recipe.train.log_every == 0 or last:
            logged = self._step_logged(stats, window.tokens, time.perf_counter() - window.started)
            self._emit(logged)
            self._report_rank(logged)
            window.restart()

    def _validate_if_due(self, run: LoopState, last: bool) -> None:
        every = self.recipe.train.eval_every
        if self.val_batches and ((every and run.step % every == 0) or last):
            run.val_loss = self.evaluate()
            self._emit(Evaluated(step=run.step, val_loss=run.val_loss, val_ppl=math.exp(run.val_loss)))

    def _sample_if_due(self, step: int, last: bool) -> None:
        every = self.recipe.train.sample_every  # the last step's samples come with the run's end
        if every and step % every == 0 and not last and self.strategy != "fsdp":
            self._emit_samples(step, self.samples())

    def _checkpoint_if_due(self, run: LoopState, last: bool) -> None:
        """A checkpoint on the recipe's cadence, at the end, and when any rank was asked to stop."""
        every = self.recipe.checkpoint.every
        run.stopped = any_rank(self.stop_requested, self.context)
        if (every and run.step % every == 0) or last or run.stopped:
            run.last_saved = self.save(run.step)
        if run.stopped:
            saved = str(run.last_saved) if run.last_saved else None
            self._emit(Interrupted(step=run.step, checkpoint=saved))

    def train_step(self, step: int, time_fraction: float | None = None) -> StepStats:
        """One optimizer step (0-based `step`): accumulate gradients over micro-batches, clip, update.

        `time_fraction`, the share of a wall-clock budget spent, sets the schedule's progress in place of
        the step count, or the share of steps done where that is further: the run ends at whichever budget
        runs out first, and the schedule has decayed by then. Steps with non-finite gradients leave the
        weights unchanged and count as skipped.
        """
        total = self.recipe.train.steps
        if time_fraction is not None:
            time_fraction = max(time_fraction, step / total)
        lr = lr_at(step, total, self.recipe.optim.lr, self.recipe.schedule, time_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # absent in checkpoints of earlier versions
        self.model.train()
        loss_sum = torch.zeros((), device=self.context.device)
        for micro_step in range(self.accum):
            inputs, targets, *segments = self.micro_batch(step, micro_step)
            documents = self._document_ids(inputs, *segments)
            inputs = inputs.to(self.context.device, non_blocking=True)
            targets = targets.to(self.context.device, non_blocking=True)
            with self._gradient_sync(micro_step == self.accum - 1), self._autocast():
                loss, cross_entropy = self.batch_loss(inputs, targets, documents)
                self.scaler.scale(loss / self.accum).backward()
            loss_sum += cross_entropy.detach()
        self.scaler.unscale_(self.optimizer)
        clip = self.recipe.optim.clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        stats = StepStats(
            step=step + 1,
            loss=float(all_reduce_mean(loss_sum / self.accum, self.context)),
            lr=lr,
            grad_norm=float(grad_norm),
        )
        if stats.finite:
            self.scaler.step(self.optimizer)
        else:
            self.skipped_steps += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def before_training(self, start_step: int) -> None:
        """Work a subclass needs done once the run has started and before its first step (every rank)."""

    def micro_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, ...]:
        """This rank's (inputs, targets) for one micro-step of an optimizer step, and for packed examples
        the example each position belongs to."""
        return self.sampler.micro_batch(
            step, micro_step, self.context.rank, self.context.world_size, self.recipe.train.micro_batch_size
        )

    def batch_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to minimise, the cross-entropy to report) of one micro-batch."""
        return self.forward(
            inputs,
            document_ids=documents,
            targets=targets,
            label_smoothing=self.recipe.train.label_smoothing,
            z_loss=self.recipe.train.z_loss,
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros(2, device=self.context.device, dtype=torch.float64)
        for inputs, targets, *segments in self.val_batches:
            documents = self._document_ids(inputs, *segments)
            inputs, targets = inputs.to(self.context.device), targets.to(self.context.device)
            with self._autocast():
                _, cross_entropy = self.forward(inputs, document_ids=documents, targets=targets)
            counted = int((targets != IGNORE).sum())  # finetuning masks all but the assistant's tokens
            total += torch.tensor([float(cross_entropy) * counted, counted], device=total.device)
        total = all_reduce_sum(total, self.context)
        self.model.train()
        return float(total[0] / total[1])

    def save(self, step: int) -> Path | None:
        """Collective under FSDP (every rank gathers); only rank 0 writes."""
        model_state = self.model_state()
        optimizer_state = full_optimizer_state(self.model, self.optimizer)
        elapsed = self.clock.elapsed()
        if not self.context.is_main:
            return None
        trainer_state = {
            "step": step,
            "optimizer": optimizer_state,
            "optimizer_name": self.recipe.optim.name,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "skipped_steps": self.skipped_steps,
            "elapsed_seconds": elapsed,
            "world_size": self.context.world_size,
            "data_fingerprint": token_stream_fingerprint(self.meta),
        }
        path = self.write_checkpoint(step_directory(self.run_dir, step), model_state, trainer_state)
        prune_checkpoints(self.run_dir, self.recipe.checkpoint.keep_last, newest_step=step)
        self._emit(CheckpointSaved(step=step, path=str(path)))
        return path

    def model_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the model (collective under FSDP)."""
        return full_model_state(self.model)

    def write_checkpoint(self, directory: Path, model_state: dict, trainer_state: dict) -> Path:
        return save_checkpoint(
            directory,
            self.model.config,
            model_state,
            recipe_toml=self.recipe.to_toml(),
            tokenizer=self.tokenizer,
            trainer_state=trainer_state,
        )

    def load_weights(self, checkpoint: Path) -> None:
        load_model_weights(self.model, checkpoint, self.context.is_main)

    def samples(self) -> list[tuple[str, str]]:
        """A few generations at the end, so the user sees text (rank 0; from the unsharded weights)."""
        if not self.context.is_main or self.tokenizer is None or not self.recipe.train.sample_prompts:
            return []
        model = self.model
        if self.strategy == "fsdp":  # the newest checkpoint, whole (an adapter merged into its base)
            from llmctl.checkpoint import is_adapter, open_model

            saved = latest_checkpoint(self.run_dir)
            if is_adapter(saved):
                from llmctl.adapters import open_adapted

                model = open_adapted(saved)[0].to(self.context.device)
            else:
                model = open_model(saved, device=self.context.device)
        model.eval()
        params = SamplingParams(
            max_new_tokens=self.recipe.train.sample_tokens,
            temperature=0.8,
            top_k=40,
            seed=self.recipe.train.seed,
            stop_token_ids=(self.tokenizer.eos_id,),
        )
        results = []
        for prompt in self.recipe.train.sample_prompts:
            prompt_ids = self.tokenizer.encode(prompt)
            new_ids = without_stop_ids(list(generate_ids(model, prompt_ids, params)), params.stop_token_ids)
            # decode with the prompt so the first new piece keeps its leading space
            results.append((prompt, self.tokenizer.decode(prompt_ids + new_ids)))
        return results

    # -- helpers -------------------------------------------------------------------------------------------

    def _document_ids(
        self, inputs: torch.Tensor, segments: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """With `train.document_masking`, training and validation both keep attention inside documents: the
        packed examples' `segments` where given, else the spans that eos ends. Computed on the host batch: a
        batch with no boundary keeps SDPA's fused causal path (no mask)."""
        if not self.recipe.train.document_masking:
            return None
        ids = document_ids_of(inputs, self.meta["eos_id"]) if segments is None else segments
        if not bool(ids[:, -1].any()):  # every row is one document
            return None
        return ids.to(self.context.device, non_blocking=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES.get(self.recipe.train.precision)
        if dtype is None or self.strategy == "fsdp":  # FSDP2's policy already computes in the low precision
            return contextlib.nullcontext()
        return torch.autocast(self.context.device.type, dtype=dtype)

    def _gradient_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
        if last_micro_step or not self.context.is_distributed:
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def _started(self, start_step: int) -> Started:
        return Started(
            name=self.recipe.name,
            parameters=self.model.config.num_parameters(),
            world_size=self.context.world_size,
            device=self.context.device.type,
            strategy=self.strategy,
            precision=self.recipe.train.precision,
            steps=self.recipe.train.steps,
            step=start_step,
            global_batch_size=self.recipe.train.global_batch_size,
            seq_len=self.seq_len,
            run_dir=str(self.run_dir),
            trainable_parameters=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            validation_tokens=sum(inputs.numel() for inputs, *_ in self.val_batches),
        )

    def _step_logged(self, stats: StepStats, tokens: int, seconds: float) -> StepLogged:
        tokens_per_second = tokens / max(seconds, 1e-9)
        mfu = self._mfu(tokens_per_second) if self.peak_flops else None
        if mfu is not None and mfu > 1:  # the peak was measured while the machine was busy: measure it again
            fresh = device_peak_flops(self.context.device, self.recipe.train.precision, fresh=True) or 0.0
            self.peak_flops = max(self.peak_flops, fresh)  # the best seen
            mfu = min(self._mfu(tokens_per_second), 1.0)
        return StepLogged(
            step=stats.step,
            loss=stats.loss,
            lr=stats.lr,
            grad_norm=stats.grad_norm,
            tokens_per_second=tokens_per_second,
            memory_bytes=memory_in_use(self.context.device),
            elapsed_seconds=self.clock.elapsed(),
            mfu=mfu,
        )

    def _mfu(self, tokens_per_second: float) -> float:
        return self.flops_per_token * tokens_per_second / (self.peak_flops * self.context.world_size)

    def _emit_samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        for prompt, text in samples:
            self._emit(Sampled(step=step, prompt=prompt, text=text))

    def _report_rank(self, logged: StepLogged) -> None:
        """Each rank's own share of the throughput and its memory, for the monitor's per-rank rows."""
        if self.rank_metrics is None:
            return
        self.rank_metrics.write(
            {
                "event": "rank",
                "step": logged.step,
                "rank": self.context.rank,
                "world_size": self.context.world_size,
                "tokens_per_second": logged.tokens_per_second / self.context.world_size,
                "memory_bytes": logged.memory_bytes,
            }
        )

    def _emit(self, event: Event) -> None:
        """Rank 0 records every event in metrics.jsonl and hands it to the caller."""
        if not self.context.is_main:
            return
        if self.metrics is not None:
            self.metrics.write(event.to_record())
        self.on_event(event)

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM ask the loop to checkpoint at the next step boundary and return."""

        def request_stop(signum, frame):
            self.stop_requested = True

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                previous[signum] = signal.signal(signum, request_stop)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
