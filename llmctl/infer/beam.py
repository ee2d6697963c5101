"""Beam search: length penalty, early stopping, n-best output, and diverse (grouped) beam search.

Hypotheses are scored as sum of log-probabilities / generated_length ** length_penalty, the convention of
Hugging Face `generate(num_beams=...)`, whose output this reproduces token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.infer.constraints import Constraint
from llmctl.infer.decode import PaddedBatch
from llmctl.model import Transformer

NEG_INF = -1.0e9


@dataclass
class Hypothesis:
    ids: list[int]  # generated ids, a final stop id included
    score: float  # length-penalised


@dataclass
class BeamParams:
    num_beams: int = 4
    max_new_tokens: int = 32
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_return_sequences: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_beams % self.num_beam_groups:
            raise ValueError("num_beams must be a multiple of num_beam_groups")
        if self.num_return_sequences > self.num_beams:
            raise ValueError("num_return_sequences cannot exceed num_beams")


class _Group:
    """The running beams and finished hypotheses of one beam group."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.scores = torch.full((size,), NEG_INF)
        self.scores[0] = 0.0  # all beams start identical: expand only the first at step one
        self.sequences: list[list[int]] = [[] for _ in range(size)]
        self.finished: list[Hypothesis] = []
        self.improvable = True

    def full(self) -> bool:
        return len(self.finished) >= self.size

    def worst_finished(self) -> float:
        return min(h.score for h in self.finished) if self.full() else NEG_INF

    def step(
        self, log_probs: torch.Tensor, generated: int, last: bool, params: BeamParams
    ) -> tuple[list[int], list[int]]:
        """Choose the next beams from (size, vocab) log-probs; returns (parent beam, token) per new beam."""
        vocab = log_probs.shape[-1]
        totals = (log_probs + self.scores[:, None]).reshape(-1)
        keep = (len(params.stop_token_ids) + 1) * self.size
        top_scores, top_index = torch.topk(totals, keep)
        parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        hits = [last or token in params.stop_token_ids for token in tokens]
        accept_finished = self.improvable and not (params.early_stopping and self.full())
        if accept_finished:
            for rank in range(self.size):  # only candidates among the top `size` may finish
                if hits[rank]:
                    score = float(top_scores[rank]) / generated**params.length_penalty
                    self.finished.append(Hypothesis(self.sequences[parents[rank]] + [tokens[rank]], score))
            self.finished = sorted(self.finished, key=lambda h: -h.score)[: self.size]
        running = [rank for rank in range(keep) if not hits[rank]][: self.size]
        while len(running) < self.size:  # every candidate finished (last step): keep shapes, nothing runs on
            running.append(running[-1] if running else 0)
        self.scores = torch.tensor([float(top_scores[r]) if not hits[r] else NEG_INF for r in running])
        self.sequences = [self.sequences[parents[r]] + [tokens[r]] for r in running]
        return [parents[r] for r in running], [tokens[r] for r in running]

    def update_improvable(self, generated: int, params: BeamParams) -> None:
        best_running = float(self.scores.max()) / generated**params.length_penalty
        self.improvable = self.improvable and best_running > self.worst_finished()

    def done(self, params: BeamParams) -> bool:
        return not self.improvable or (params.early_stopping and self.full())


@torch.inference_mode()
def beam_search(
    model: Transformer, prompt_ids: list[int], params: BeamParams, constraint: Constraint | None = None
) -> list[Hypothesis]:
    """The `num_return_sequences` best hypotheses, best first. Under `constraint` every beam carries its own
    grammar state: each beam's candidates are the tokens its grammar allows, and a beam whose grammar is
    complete ends at its next step (with a stop id that costs it nothing)."""
    if constraint is not None and not params.stop_token_ids:
        raise ValueError("a constrained beam search needs stop_token_ids to end its hypotheses with")
    batch = PaddedBatch(model, [prompt_ids], params.max_new_tokens)
    device = model.device
    group_size = params.num_beams // params.num_beam_groups
    groups = [_Group(group_size) for _ in range(params.num_beam_groups)]
    batch.select(torch.zeros(params.num_beams, dtype=torch.long, device=device))
    logits = batch.logits
    states = [constraint.copy() for _ in range(params.num_beams)] if constraint is not None else None
    for generated in range(1, batch.budget + 1):
        log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
        if states is not None:
            _constrain(log_probs, states, params.stop_token_ids)
        chosen_this_step = torch.zeros(log_probs.shape[-1])
        parents, tokens = [], []
        last = generated == batch.budget
        for index, group in enumerate(groups):
            rows = slice(index * group_size, (index + 1) * group_size)
            # Hamming diversity: tokens earlier groups picked at this step cost diversity_penalty each
            group_log_probs = log_probs[rows] - params.diversity_penalty * chosen_this_step
            group_parents, group_tokens = group.step(group_log_probs, generated, last, params)
            parents += [index * group_size + parent for parent in group_parents]
            tokens += group_tokens
            chosen_this_step.index_add_(0, torch.tensor(group_tokens), torch.ones(len(group_tokens)))
            group.update_improvable(generated, params)
        if all(group.done(params) for group in groups) or last:
            break
        batch.select(torch.tensor(parents, device=device))
        if states is not None:
            alive = torch.cat([group.scores for group in groups]) > NEG_INF / 2
            states = [
                _branch(states[parent], token, params.stop_token_ids) if live else states[parent]
                for parent, token, live in zip(parents, tokens, alive.tolist(), strict=True)
            ]
        logits = batch.step(torch.tensor(tokens, device=device))
    finished = sorted((h for group in groups for h in group.finished), key=lambda h: -h.score)
    return finished[: params.num_return_sequences]


def _constrain(log_probs: torch.Tensor, states: list[Constraint], stop_ids: tuple[int, ...]) -> None:
    """Each beam's row, in place: what its grammar does not allow costs NEG_INF; a complete grammar's beam
    may only stop, at no cost."""
    for row, state in enumerate(states):
        if state.finished:
            log_probs[row] = NEG_INF
            log_probs[row, list(stop_ids)] = 0.0
        else:
            log_probs[row].masked_fill_(~state.allowed(stop_ids)[: log_probs.shape[-1]], NEG_INF)


def _branch(parent: Constraint, token: int, stop_ids: tuple[int, ...]) -> Constraint:
    """A new beam's grammar: its parent's, advanced by the token it chose. (A beam that is no candidate, its
    score NEG_INF because too few tokens were allowed to fill the beams, keeps its parent's, unadvanced.)"""
    state = parent.copy()
    if not state.finished:
        state.advance(token, stop_ids)
    return state
