"""`llmctl distill`: a student recipe trained by the one trainer against a frozen teacher as well as the data:
loss = alpha x T^2 x KL(teacher_T || student_T) + (1 - alpha) x cross-entropy, on temperature-softened logits
(Hinton et al., 2015). The teacher runs alongside on every rank, or, with `distill.teacher_cache`, once
before training into top-k logit files (llmctl.train.teacher_cache) that every later step reads instead;
the student is everything `train` makes."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llmctl.checkpoint import checkpoint_problem, model_directory, open_model
from llmctl.data.instructions import IGNORE
from llmctl.data.token_files import token_stream_fingerprint
from llmctl.data.tokenizer import open_tokenizer
from llmctl.digests import weights_sha256
from llmctl.errors import UserError
from llmctl.model import Transformer
from llmctl.recipe import Recipe
from llmctl.train.distributed import DistributedContext, all_reduce_sum
from llmctl.train.events import EventHandler, TeacherCached
from llmctl.train.teacher_cache import CacheKey, TeacherCache, build_teacher_cache
from llmctl.train.trainer import Trainer


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the blended loss, the student's cross-entropy), averaged over the positions that have a target."""
    counted = targets != IGNORE
    student, teacher = student_logits[counted].float(), teacher_logits[counted].float()
    cross_entropy = F.cross_entropy(student, targets[counted])
    divergence = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * temperature**2 * divergence + (1 - alpha) * cross_entropy, cross_entropy


def top_k_distillation_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_normalizer: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`distillation_loss` against a teacher known by its k largest logits per position and the log of its
    softened normaliser, logsumexp(logits / T): the KL between the two distributions over k + 1 outcomes,
    the teacher's k tokens and "any other token". The teacher's probabilities keep their true size (the
    mass outside the k is not spread over them), and with k equal to the vocabulary it is the full KL."""
    counted = targets != IGNORE
    student = student_logits[counted].float()
    teacher_log = teacher_values[counted].float() / temperature - teacher_normalizer[counted].float()[:, None]
    student_log = F.log_softmax(student / temperature, dim=-1).gather(1, teacher_indices[counted])
    teacher_rest, student_rest = _rest(teacher_log), _rest(student_log)
    divergence = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
    divergence = divergence + teacher_rest.exp() * (teacher_rest - student_rest)
    cross_entropy = F.cross_entropy(student, targets[counted])
    return alpha * temperature**2 * divergence.mean() + (1 - alpha) * cross_entropy, cross_entropy


def _rest(log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(log_probs))) over the last dimension: the log of the mass outside those outcomes,
    kept finite when it is (numerically) nothing."""
    mass = log_probs.exp().sum(-1).clamp(max=1 - 1e-6)
    return torch.log1p(-mass)


class DistillTrainer(Trainer):
    def __init__(
        self, recipe: Recipe, context: DistributedContext, on_event: EventHandler | None = None
    ) -> None:
        if not recipe.distill.teacher:
            raise UserError(
                "recipe distill.teacher is not set: point it at the teacher's checkpoint or run directory"
            )
        teacher_path = model_directory(Path(recipe.distill.teacher))
        problem = checkpoint_problem(teacher_path) if teacher_path.is_dir() else "it does not exist"
        if problem:
            raise UserError(f"distill.teacher {teacher_path}: {problem}")
        super().__init__(recipe, context, on_event)
        if open_tokenizer(teacher_path).sha256() != self.meta["tokenizer_sha256"]:
            raise UserError(
                f"the teacher {teacher_path} uses another tokenizer than {recipe.data.tokens} was encoded with; "
                "teacher and student must share one"
            )
        self.teacher: Transformer | None = open_model(teacher_path, device=context.device).eval()
        self.teacher.requires_grad_(False)
        if self.teacher.config.vocab_size != self.model.config.vocab_size:
            raise UserError(
                f"the teacher has {self.teacher.config.vocab_size} embeddings, the student {self.model.config.vocab_size}; "
                f"set model.vocab_size = {self.teacher.config.vocab_size}"
            )
        self.teacher_path = teacher_path
        self.teacher_parameters = self.teacher.config.num_parameters()
        self.teacher_val_loss = self._teacher_val_loss()  # every rank, now: it is a collective under torchrun
        self.cache: TeacherCache | None = None
        self._cached_teacher: tuple[torch.Tensor, ...] | None = None  # the micro-batch's rows

    def before_training(self, start_step: int) -> None:
        """Offline mode: open the teacher cache, building it first (every rank a share) when it is missing."""
        spec = self.recipe.distill
        if not spec.teacher_cache:
            return
        key = CacheKey(
            teacher_sha256=weights_sha256(self.teacher_path),
            tokens_fingerprint=token_stream_fingerprint(self.meta),
            seq_len=self.seq_len,
            top_k=spec.top_k,
            temperature=spec.temperature,
            document_masking=self.recipe.train.document_masking,
        )
        directory = Path(spec.teacher_cache)
        seconds = None
        if not directory.exists():
            tokens = self.sampler.tokens
            seconds = build_teacher_cache(
                directory, self.teacher, tokens, key, self.meta["eos_id"], self.context
            )
        self.cache = TeacherCache(directory, key)
        self.teacher = None  # never run again: its memory goes back
        self._emit(
            TeacherCached(
                step=start_step,
                path=str(directory),
                rows=self.cache.meta["rows"],
                top_k=key.top_k,
                build_seconds=seconds,
            )
        )

    def micro_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, ...]:
        """The windows, and in offline mode the cached teacher rows of the same windows for `batch_loss`."""
        if self.cache is not None:
            starts = self.sampler.micro_batch_starts(
                step,
                micro_step,
                self.context.rank,
                self.context.world_size,
                self.recipe.train.micro_batch_size,
            )
            self._cached_teacher = self.cache.windows(starts, self.seq_len)
        return super().micro_batch(step, micro_step)

    def batch_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        student = self.forward(inputs, document_ids=documents)
        spec = self.recipe.distill
        if self._cached_teacher is not None:
            values, indices, normalizer = (tensor.to(self.context.device) for tensor in self._cached_teacher)
            return top_k_distillation_loss(
                student, values, indices, normalizer, targets, spec.alpha, spec.temperature
            )
        with torch.no_grad():
            teacher = self.teacher(inputs, document_ids=documents)
        return distillation_loss(student, teacher, targets, spec.alpha, spec.temperature)

    @torch.no_grad()
    def _teacher_val_loss(self) -> float | None:
        """The teacher's cross-entropy on the student's validation windows (the same ranks' share); None
        without any."""
        if not self.val_batches:
            return None
        total = torch.zeros(2, device=self.context.device, dtype=torch.float64)
        for inputs, targets, *segments in self.val_batches:
            documents = self._document_ids(inputs, *segments)
            inputs, targets = inputs.to(self.context.device), targets.to(self.context.device)
            _, cross_entropy = self.teacher(inputs, document_ids=documents, targets=targets)
            counted = int((targets != IGNORE).sum())
            total += torch.tensor([float(cross_entropy) * counted, counted], device=total.device)
        total = all_reduce_sum(total, self.context)
        return float(total[0] / total[1])
