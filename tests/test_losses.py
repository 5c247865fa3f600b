"""Teacher selection and the distillation loss."""

from __future__ import annotations

import pytest
import torch

from agents.losses import TEACHER_RULES, choose_teacher, distillation_kl
from sim.core.errors import ConfigError


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_most_confident_picks_the_most_confident_teacher_per_sample() -> None:
    # 3 teachers, 4 samples, 3 classes; the confident teacher differs per sample.
    logits = torch.zeros(3, 4, 3)
    confident_teacher = [2, 0, 1, 2]
    for sample, teacher in enumerate(confident_teacher):
        logits[teacher, sample, sample % 3] = 5.0
        logits[(teacher + 1) % 3, sample, (sample + 1) % 3] = 1.0  # a less confident opinion
    choice = choose_teacher(logits, temperature=1.0, rule="most_confident", generator=_generator())
    assert choice.source.tolist() == confident_teacher
    for sample, teacher in enumerate(confident_teacher):
        assert torch.allclose(choice.probs[sample], logits[teacher, sample].softmax(-1))


def test_confidence_is_judged_at_temperature_one_but_targets_are_tempered() -> None:
    logits = torch.tensor([[[4.0, 0.0]], [[1.0, 0.0]]])  # teacher 0 is more confident
    choice = choose_teacher(logits, temperature=4.0, rule="most_confident", generator=_generator())
    assert choice.source.tolist() == [0]
    assert torch.allclose(choice.probs[0], (logits[0, 0] / 4.0).softmax(-1))


def test_mean_rule_averages_tempered_probabilities() -> None:
    logits = torch.randn(5, 7, 10)
    choice = choose_teacher(logits, temperature=2.0, rule="mean", generator=_generator())
    assert torch.allclose(choice.probs, (logits / 2.0).softmax(-1).mean(0), atol=1e-6)
    assert (choice.source == -1).all()


def test_random_rule_is_seeded_and_picks_existing_teachers() -> None:
    logits = torch.randn(4, 100, 3)
    first = choose_teacher(logits, 1.0, "random", _generator())
    second = choose_teacher(logits, 1.0, "random", _generator())
    assert torch.equal(first.source, second.source)
    assert set(first.source.tolist()) == {0, 1, 2, 3}


def test_unknown_rule_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match="method.teacher_rule='best'.*most_confident"):
        choose_teacher(torch.zeros(1, 1, 2), 1.0, "best", _generator())
    assert TEACHER_RULES.names() == ["mean", "most_confident", "random"]


def test_kl_is_zero_when_student_matches_teacher_and_scales_with_t_squared() -> None:
    student = torch.randn(8, 5)
    assert distillation_kl(student, (student / 3.0).softmax(-1), 3.0).abs() < 1e-6
    teacher = torch.randn(8, 5).softmax(-1)
    at_one = distillation_kl(student * 2.0, teacher, 1.0)
    at_two = distillation_kl(student * 4.0, teacher, 2.0)  # same tempered student
    assert torch.allclose(at_two, 4.0 * at_one)
