"""The privacy boundary's types refuse anything but predictions and numbers; codecs round-trip."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from agents.agent import Agent
from agents.codecs import MESSAGE_CODECS, PROBABILITY_FLOOR, CodecConfig
from agents.losses import choose_teacher
from agents.messages import EvalCounts, Prediction, check_metrics
from sim.core.errors import ConfigError
from sim.experiment.assembly import build_experiment
from tests.conftest import PLAIN_CPU, TINY, make_config

HEADS, BATCH, CLASSES, K = 4, 128, 10, 3


def _logits(seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(HEADS, BATCH, CLASSES, generator=torch.Generator().manual_seed(seed)) * scale


def _encode(codec: str, logits: torch.Tensor, topk: int = K) -> Prediction:
    config = CodecConfig(codec, topk)
    return Prediction(3, 7, codec, logits.shape[-1], config.encode(logits))


def _decoded_probs(message: Prediction) -> torch.Tensor:
    return torch.stack([message.decode(head).softmax(dim=-1) for head in range(message.num_heads)])


def test_prediction_accepts_float16_logits_and_counts_bytes() -> None:
    message = Prediction(3, 7, "float16", 10, {"logits": np.zeros((4, 128, 10), dtype=np.float16)})
    assert message.num_heads == 4 and message.batch_size == 128
    assert message.nbytes == 4 * 128 * 10 * 2


@pytest.mark.parametrize(
    "logits",
    [
        torch.zeros(4, 128, 10),  # a tensor (could be a Parameter)
        np.zeros((4, 128, 10), dtype=np.int64),  # not a float payload
        np.zeros((128, 10), dtype=np.float16),  # wrong rank
        np.zeros((1, 1, 8, 8), dtype=np.float32),  # image-shaped
        np.zeros((4, 128, 9), dtype=np.float16),  # not 10 classes
    ],
)
def test_prediction_rejects_anything_else(logits: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        Prediction(0, 0, "float16", 10, {"logits": logits})  # type: ignore[dict-item]


MALFORMED = {
    "unknown codec": ("int4", {"logits": np.zeros((1, 8, 10), np.float16)}),
    "float32 array under float16": ("float16", {"logits": np.zeros((1, 8, 10), np.float32)}),
    "extra array": ("float16", {"logits": np.zeros((1, 8, 10), np.float16), "x": np.zeros((1, 8, 10), np.float16)}),
    "int8 as signed": ("int8", {"probs": np.zeros((1, 8, 10), np.int8)}),
    "int8 as float": ("int8", {"probs": np.zeros((1, 8, 10), np.float16)}),
    "topk without classes": ("topk", {"probs": np.zeros((1, 8, 3), np.float16)}),
    "topk shapes differ": (
        "topk",
        {"probs": np.zeros((1, 8, 3), np.float16), "classes": np.zeros((1, 8, 2), np.uint8)},
    ),
    "topk of every class": (
        "topk",
        {"probs": np.zeros((1, 8, 10), np.float16), "classes": np.zeros((1, 8, 10), np.uint8)},
    ),
    "topk class out of range": (
        "topk",
        {"probs": np.zeros((1, 8, 3), np.float16), "classes": np.full((1, 8, 3), 10, np.uint8)},
    ),
    "topk negative class": (
        "topk",
        {"probs": np.zeros((1, 8, 3), np.float16), "classes": np.full((1, 8, 3), -1, np.int16)},
    ),
    "topk batches differ": (
        "topk",
        {"probs": np.zeros((1, 8, 3), np.float16), "classes": np.zeros((1, 9, 3), np.uint8)},
    ),
}


@pytest.mark.parametrize("codec, payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_payload_is_refused_on_construction(codec: str, payload: dict[str, np.ndarray]) -> None:
    with pytest.raises((TypeError, ValueError)):
        Prediction(0, 0, codec, 10, payload)


def test_embeddings_must_match_the_batch() -> None:
    with pytest.raises(ValueError):
        Prediction(0, 0, "float16", 3, {"logits": np.zeros((1, 8, 3), np.float16)}, np.zeros((9, 4), np.float16))
    with pytest.raises(TypeError):
        Prediction(0, 0, "int8", 3, {"probs": np.zeros((1, 8, 3), np.uint8)}, np.zeros((8, 4), np.uint8))


# ---- codecs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", MESSAGE_CODECS.names())
def test_nbytes_is_the_payload_arrays_and_a_message_pickles(codec: str) -> None:
    message = _encode(codec, _logits())
    assert message.nbytes == sum(array.nbytes for array in message.payload.values())
    again = pickle.loads(pickle.dumps(message))  # what Ray does to it
    assert again.codec == codec and again.payload.keys() == message.payload.keys()
    assert all(np.array_equal(again.payload[name], message.payload[name]) for name in message.payload)


def test_codecs_shrink_the_message_as_promised() -> None:
    nbytes = {codec: _encode(codec, _logits()).nbytes for codec in MESSAGE_CODECS.names()}
    assert nbytes["float32"] == 2 * nbytes["float16"] == 4 * HEADS * BATCH * CLASSES
    assert nbytes["int8"] * 2 == nbytes["float16"]
    assert nbytes["topk"] == HEADS * BATCH * K * (2 + 1)  # float16 probability + uint8 class
    for k in range(1, CLASSES):  # smaller than float16 exactly when 3k < 2C
        assert (_encode("topk", _logits(), topk=k).nbytes < nbytes["float16"]) == (k < CLASSES / 1.5)


def test_dense_codecs_return_the_logits() -> None:
    logits = _logits()
    for head in range(HEADS):
        assert torch.equal(_encode("float32", logits).decode(head), logits[head])
        assert torch.equal(_encode("float16", logits).decode(head), logits[head].half().float())


def test_int8_decodes_probabilities_within_one_step() -> None:
    logits = _logits()
    message = _encode("int8", logits)
    probs = logits.softmax(dim=-1)
    decoded = torch.stack([message.decode(head) for head in range(HEADS)])  # log-probabilities
    assert torch.isfinite(decoded).all() and decoded.min() >= np.log(PROBABILITY_FLOOR) - 1e-6
    assert (message.payload["probs"].astype(int).sum(axis=-1) == 255).all()  # no mass lost to rounding
    assert (decoded.exp() - probs).abs().max() < 1 / 255
    assert (_decoded_probs(message) - probs).abs().max() < 1 / 255 + CLASSES * PROBABILITY_FLOOR


def test_int8_log_probabilities_give_the_tempered_teacher() -> None:
    """softmax(log p / T) is softmax(logits / T) up to the codec's rounding, which T > 1 amplifies."""
    logits = _logits(scale=1.0)
    message = _encode("int8", logits)
    for temperature, tolerance in ((1.0, 1 / 255 + CLASSES * PROBABILITY_FLOOR), (2.0, 0.03), (4.0, 0.05)):
        want = (logits[0] / temperature).softmax(dim=-1)
        got = (message.decode(0) / temperature).softmax(dim=-1)
        assert (got - want).abs().max() < tolerance


def test_topk_keeps_the_largest_probabilities_and_spreads_the_rest() -> None:
    logits = _logits()
    message = _encode("topk", logits)
    probs = logits.softmax(dim=-1)
    kept, classes = probs.topk(K, dim=-1)
    decoded = torch.stack([message.decode(head) for head in range(HEADS)]).exp()  # [H, P, C]
    sent = kept.half().float().clamp_min(PROBABILITY_FLOOR)
    torch.testing.assert_close(decoded.gather(-1, classes), sent, rtol=1e-6, atol=0)
    rest = decoded.scatter(-1, classes, float("nan"))  # the C - k classes left out
    rest_values = rest[~rest.isnan()].view(HEADS, BATCH, CLASSES - K)
    assert torch.equal(rest_values, rest_values[..., :1].expand_as(rest_values))  # uniform per sample
    floored = CLASSES * PROBABILITY_FLOOR  # the floor may lift a few tiny probabilities
    torch.testing.assert_close(decoded.sum(dim=-1), torch.ones(HEADS, BATCH), rtol=0, atol=floored)
    assert torch.equal(decoded.argmax(dim=-1), probs.argmax(dim=-1))


def test_topk_of_a_certain_prediction_stays_finite() -> None:
    logits = torch.zeros(1, 2, CLASSES)
    logits[:, :, 0] = 100.0  # probability 1 in float16: nothing left for the other classes
    decoded = _encode("topk", logits).decode(0)
    assert torch.isfinite(decoded).all() and torch.equal(decoded.argmax(dim=-1), torch.zeros(2, dtype=torch.long))


def test_topk_classes_widen_beyond_256_classes() -> None:
    message = _encode("topk", torch.randn(1, 4, 300))
    assert message.payload["classes"].dtype == np.int16 and message.nbytes == 4 * K * (2 + 2)


@pytest.mark.parametrize("codec", ["int8", "topk"])
@pytest.mark.parametrize("rule", ["most_confident", "mean", "random"])
def test_teacher_selection_on_decoded_messages_matches_float32(codec: str, rule: str) -> None:
    """A clear case: per sample one of three neighbours is sure of its class, the others are unsure."""
    base = _logits(seed=1, scale=0.3)[:3]  # three candidates, [3, P, C]
    sure = torch.arange(BATCH) % 3  # the confident candidate of each sample
    base[sure, torch.arange(BATCH), torch.arange(BATCH) % CLASSES] += 6.0
    candidates = [_encode(codec, base[i : i + 1]) for i in range(3)]
    decoded = torch.stack([message.decode(0) for message in candidates])
    want = choose_teacher(base, 2.0, rule, torch.Generator().manual_seed(0))
    got = choose_teacher(decoded, 2.0, rule, torch.Generator().manual_seed(0))
    assert torch.equal(got.source, want.source)
    if rule == "most_confident":
        assert torch.equal(got.source, sure)
    if rule != "random":  # a random pick may be an unsure candidate, whose near-ties rounding can flip
        assert torch.equal(got.probs.argmax(dim=-1), want.probs.argmax(dim=-1))


def test_codec_config_checks_name_and_k() -> None:
    CodecConfig("topk", 9).check(10)
    CodecConfig("int8", 10).check(10)  # k is read by topk only
    for config, key in (
        (CodecConfig("topk", 10), "method.message_topk"),
        (CodecConfig("topk", 0), "method.message_topk"),
        (CodecConfig("int4", 3), "method.message_codec"),
    ):
        with pytest.raises(ConfigError) as error:
            config.check(10)
        assert error.value.key == key


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread, as TINY's runtime.torch_threads=1 asks (two contend on a shared box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("codec", MESSAGE_CODECS.names())
@pytest.mark.usefixtures("one_thread")
def test_an_agent_learns_from_its_teacher_through_every_codec(codec: str) -> None:
    """A student on digits distils a trained teacher's decoded messages: the KLs fall, accuracy rises."""
    experiment = build_experiment(make_config(*TINY, f"method.message_codec={codec}", "train.local_steps=10"))
    execution = PLAIN_CPU
    student, teacher = (Agent(experiment.specs[i], experiment.public, execution) for i in (0, 1))
    for round_idx in range(5):
        teacher.train_round(round_idx, [])
    message = teacher.predict(0)
    assert message.codec == codec

    def accuracy() -> float:
        counts = student.evaluate(full=True)
        return float(counts.correct[0].sum() / counts.seen.sum())

    chance = accuracy()
    first = student.train_round(0, [message])
    for _ in range(5):
        last = student.train_round(0, [message])
    for term in ("loss/kl_main", "loss/kl_aux1", "loss/kl_aux3"):
        assert last[term] < 0.7 * first[term], term
    assert accuracy() > chance + 0.15


def test_metrics_are_numbers_only() -> None:
    assert check_metrics({"loss/ce": 1, "x": 0.5}) == {"loss/ce": 1.0, "x": 0.5}
    with pytest.raises(TypeError):
        check_metrics({"loss/ce": torch.tensor(1.0)})
    with pytest.raises(TypeError):
        check_metrics({"weights": [1.0, 2.0]})


def test_eval_counts_are_int_arrays() -> None:
    EvalCounts(np.zeros((2, 10), np.int64), np.ones(10, np.int64))
    with pytest.raises(TypeError):
        EvalCounts(np.zeros((2, 10), np.float32), np.ones(10, np.int64))
