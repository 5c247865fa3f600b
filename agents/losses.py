"""MHD loss terms (docs/design.md#loss): teacher selection and the distillation losses.

Each term is returned under its own name (big_vision's distill habit) so every one can be
logged and ablated separately.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sim.core.registry import Registry


@dataclass(frozen=True)
class DistillConfig:
    nu_main: float  # weight of KL(main-head teacher || main head)
    nu_aux: float  # weight of each KL(head k-1 teacher || aux head k)
    nu_emb: float  # weight of ||P(e(u)) - E(u)||^2; 0 turns embedding exchange off
    temperature: float  # T for teacher and student softmax; KL is scaled by T^2
    teacher_rule: str  # registry name in TEACHER_RULES
    include_self: bool  # the agent's own previous prediction competes as a teacher


@dataclass(frozen=True)
class TeacherChoice:
    """Distillation targets for one head on the round's public batch."""

    probs: torch.Tensor  # [P, C] target distribution at temperature T
    source: torch.Tensor  # [P] index of the chosen candidate per sample (-1 when averaged)


TeacherRule = Callable[[torch.Tensor, torch.Tensor, torch.Generator], TeacherChoice]
TEACHER_RULES: Registry[TeacherRule] = Registry("method.teacher_rule")


@TEACHER_RULES.register("most_confident")
def most_confident(tempered: torch.Tensor, confidence: torch.Tensor, generator: torch.Generator) -> TeacherChoice:
    """Per sample, the candidate whose own (T=1) max-probability is largest."""
    del generator
    source = confidence.argmax(dim=0)  # [P]
    probs = tempered[source, torch.arange(tempered.shape[1])]  # [P, C]
    return TeacherChoice(probs, source)


@TEACHER_RULES.register("mean")
def mean_teacher(tempered: torch.Tensor, confidence: torch.Tensor, generator: torch.Generator) -> TeacherChoice:
    """The ensemble average of all candidates (FedDF / FedMD style)."""
    del confidence, generator
    return TeacherChoice(tempered.mean(dim=0), torch.full((tempered.shape[1],), -1, dtype=torch.long))


@TEACHER_RULES.register("random")
def random_teacher(tempered: torch.Tensor, confidence: torch.Tensor, generator: torch.Generator) -> TeacherChoice:
    """A uniformly random candidate per sample, drawn from the agent's own stream."""
    del confidence
    source = torch.randint(tempered.shape[0], (tempered.shape[1],), generator=generator)
    return TeacherChoice(tempered[source, torch.arange(tempered.shape[1])], source)


def choose_teacher(
    candidate_logits: torch.Tensor, temperature: float, rule: str, generator: torch.Generator
) -> TeacherChoice:
    """Targets for one student head from candidates' logits [N, P, C] (N teachers)."""
    logits = candidate_logits.float()
    confidence = logits.softmax(dim=-1).amax(dim=-1)  # [N, P]
    tempered = (logits / temperature).softmax(dim=-1)  # [N, P, C]
    return TEACHER_RULES.get(rule)(tempered, confidence, generator)


def distillation_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || softmax(student / T)), averaged over samples (Hinton et al. 2015)."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


EMBEDDING_TERM = "loss/emb"


def head_term(head_name: str) -> str:
    """Name of the term that distils into one head: loss/kl_main, loss/kl_aux1, ..."""
    return f"loss/kl_{head_name}"


def mhd_terms(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    y: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    head_of_term: Mapping[str, int],
    temperature: float | None,
    project: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Every loss term of one agent's step (docs/design.md#loss), by name, in a fixed order.

    The one definition of the loss: the Agent's step and the vmapped step both call it.

    Args:
        logits: [heads, B + b, C]: the B private samples first, then the b public ones.
        embedding: [B + b, D].
        y: [B] private labels.
        targets: term name -> the teacher's target on the b public samples: [b, C] for a
            head_term, [b, D] for EMBEDDING_TERM. Empty when the agent has no teacher.
        head_of_term: head_term name -> index of the student head it trains.
        temperature: T of the distillation KL (None only when there are no targets).
        project: P_i, applied to the public samples' embedding.
    """
    n_private = y.shape[0]
    terms = {"loss/ce": F.cross_entropy(logits[0, :n_private], y)}
    for name, target in targets.items():
        if name == EMBEDDING_TERM:
            diff = project(embedding[n_private:]) - target  # [b, D]
            terms[name] = diff.pow(2).sum(dim=-1).mean()
        else:
            assert temperature is not None  # a head target exists only when the agent distils
            terms[name] = distillation_kl(logits[head_of_term[name], n_private:], target, temperature)
    return terms


def weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum_k weight_k * term_k, summed in the terms' order (so every path rounds alike)."""
    return torch.stack([weights[name] * value for name, value in terms.items()]).sum()
