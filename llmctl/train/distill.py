"""`llmctl distill`: a student recipe trained by the one trainer against a frozen teacher as well as the data:
loss = alpha x T^2 x KL(teacher_T || student_T) + (1 - alpha) x cross-entropy, on temperature-softened logits
(Hinton et al., 2015). The teacher runs alongside on every rank; the student is everything `train` makes."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llmctl.checkpoint import checkpoint_problem, model_directory, open_model
from llmctl.data.instructions import IGNORE
from llmctl.data.tokenizer import open_tokenizer
from llmctl.errors import UserError
from llmctl.recipe import Recipe
from llmctl.train.distributed import DistributedContext, all_reduce_sum
from llmctl.train.events import EventHandler
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
        self.teacher = open_model(teacher_path, device=context.device).eval().requires_grad_(False)
        if self.teacher.config.vocab_size != self.model.config.vocab_size:
            raise UserError(
                f"the teacher has {self.teacher.config.vocab_size} embeddings, the student {self.model.config.vocab_size}; "
                f"set model.vocab_size = {self.teacher.config.vocab_size}"
            )
        self.teacher_path = teacher_path
        self.teacher_val_loss = self._teacher_val_loss()  # every rank, now: it is a collective under torchrun

    def _loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        student = self.forward(inputs, document_ids=documents)
        with torch.no_grad():
            teacher = self.teacher(inputs, document_ids=documents)
        spec = self.recipe.distill
        return distillation_loss(student, teacher, targets, spec.alpha, spec.temperature)

    @torch.no_grad()
    def _teacher_val_loss(self) -> float:
        """The teacher's cross-entropy on the student's validation windows (the same ranks' share)."""
        total = torch.zeros(2, device=self.context.device, dtype=torch.float64)
        for inputs, targets in self.val_batches:
            documents = self._document_ids(inputs)
            inputs, targets = inputs.to(self.context.device), targets.to(self.context.device)
            _, cross_entropy = self.teacher(inputs, document_ids=documents, targets=targets)
            counted = int((targets != IGNORE).sum())
            total += torch.tensor([float(cross_entropy) * counted, counted], device=total.device)
        total = all_reduce_sum(total, self.context)
        return float(total[0] / total[1])
