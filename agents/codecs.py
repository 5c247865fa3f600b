"""Wire formats for predictions (docs/design.md#codecs): how a head's output on the public batch becomes bytes.

A codec turns an agent's logits [heads, P, C] into a few small numpy arrays (the payload of a
`Prediction`) and turns one head of such a payload back into float32 scores [P, C] for the
receiver. The decoded scores are logits (`float16`, `float32`) or log-probabilities (`int8`,
`topk`); either way softmax(scores / T) is the sender's prediction at temperature T (up to the
codec's rounding), because softmax(log p / T) = softmax(logits / T) when p = softmax(logits).
Teacher selection therefore runs on decoded scores unchanged.

    codec    payload per head and sample                    bytes (C classes, k kept)
    float16  logits, float16                                2 C
    float32  logits, float32                                4 C
    int8     probabilities at T=1 in 1/255 steps, uint8     C
    topk     k largest probabilities (float16) + classes    3 k  (uint8 classes; 4 k when C > 256)

The k classes left out by `topk` share the rest of the probability mass uniformly. Decoded
probabilities never drop below PROBABILITY_FLOOR, so no log-probability is -inf.

`int8` and `topk` are lossy where probabilities are small, and a temperature T > 1 magnifies
exactly those classes: on random 10-class logits, int8's largest error in a tempered teacher
probability is ~0.003 at T=1 but 0.02-0.03 at T=4 (0.1 for peaked logits). Prefer float16
when distilling at a high temperature.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from sim.core.errors import ConfigError
from sim.core.registry import Registry

Payload = Mapping[str, np.ndarray]  # array name -> [heads, P, *] array

PROBABILITY_FLOOR = 1e-4
"""Smallest decoded probability: a fortieth of int8's step (1/255), so a class the sender put
below the codec's resolution keeps (almost) no mass, and log p stays finite."""


class MessageCodec(ABC):
    """One wire format. Subclasses declare their payload arrays and how to fill and read them."""

    fields: Mapping[str, tuple[np.dtype, ...]]  # payload array name -> the dtypes it may have
    embedding_dtype: np.dtype  # dtype of the (opt-in) embeddings sent beside the payload

    @abstractmethod
    def encode(self, logits: torch.Tensor, topk: int) -> dict[str, np.ndarray]:
        """Payload for float32 logits [heads, P, C]; `topk` is read by the topk codec only."""

    @abstractmethod
    def check(self, payload: Payload, num_classes: int) -> None:
        """Raises ValueError when the payload's last dimension or values do not fit C classes.

        Called after the common checks: exactly `fields`, numpy arrays of the listed dtypes,
        all [heads, P, *] with the same heads and P.
        """

    @abstractmethod
    def decode(self, payload: Payload, head: int, num_classes: int) -> torch.Tensor:
        """Float32 logits or log-probabilities [P, C] of one head (a fresh CPU tensor)."""


class DenseLogits(MessageCodec):
    """The logits themselves, cast to one float dtype."""

    def __init__(self, dtype: type[np.floating]) -> None:
        self.dtype = np.dtype(dtype)
        self.fields = {"logits": (self.dtype,)}
        self.embedding_dtype = self.dtype

    def encode(self, logits: torch.Tensor, topk: int) -> dict[str, np.ndarray]:
        del topk
        return {"logits": logits.cpu().numpy().astype(self.dtype)}

    def check(self, payload: Payload, num_classes: int) -> None:
        _check_classes(payload["logits"], num_classes)

    def decode(self, payload: Payload, head: int, num_classes: int) -> torch.Tensor:
        del num_classes
        return torch.from_numpy(payload["logits"][head].astype(np.float32))  # a copy: payloads may be read-only


class QuantisedProbabilities(MessageCodec):
    """Probabilities at T=1 in steps of 1/255, one uint8 per class (`int8`: half of float16).

    Largest-remainder rounding: every probability is rounded down or up, less than one step
    from the original, so that each sample's codes sum to exactly 255. The decoded distribution
    then needs no renormalisation (beyond the floor), which plain rounding, off by up to C / 2
    steps in the sum, would force onto every class.
    """

    LEVELS = 255

    fields = {"probs": (np.dtype(np.uint8),)}
    embedding_dtype = np.dtype(np.float16)

    def encode(self, logits: torch.Tensor, topk: int) -> dict[str, np.ndarray]:
        del topk
        scaled = logits.softmax(dim=-1) * self.LEVELS  # [heads, P, C]
        codes = scaled.floor()
        missing = (self.LEVELS - codes.sum(dim=-1, keepdim=True)).round()  # [heads, P, 1]: steps left to give
        order = (scaled - codes).argsort(dim=-1, descending=True, stable=True)  # largest remainder first
        rank = order.argsort(dim=-1)  # each class's place in that order
        codes += (rank < missing).to(codes.dtype)
        return {"probs": codes.to(torch.uint8).cpu().numpy()}

    def check(self, payload: Payload, num_classes: int) -> None:
        _check_classes(payload["probs"], num_classes)

    def decode(self, payload: Payload, head: int, num_classes: int) -> torch.Tensor:
        del num_classes
        probs = torch.from_numpy(payload["probs"][head].astype(np.float32)) / self.LEVELS  # [P, C]
        return probs.clamp_min(PROBABILITY_FLOOR).log()


class TopKProbabilities(MessageCodec):
    """The k largest probabilities at T=1 (float16) and their classes; the rest shared evenly."""

    fields = {"probs": (np.dtype(np.float16),), "classes": (np.dtype(np.uint8), np.dtype(np.int16))}
    embedding_dtype = np.dtype(np.float16)

    def encode(self, logits: torch.Tensor, topk: int) -> dict[str, np.ndarray]:
        num_classes = logits.shape[-1]
        values, classes = logits.softmax(dim=-1).topk(topk, dim=-1)  # [heads, P, k] each
        class_dtype = torch.uint8 if num_classes <= 256 else torch.int16
        return {
            "probs": values.to(torch.float16).cpu().numpy(),
            "classes": classes.to(class_dtype).cpu().numpy(),
        }

    def check(self, payload: Payload, num_classes: int) -> None:
        probs, classes = payload["probs"], payload["classes"]
        if probs.shape != classes.shape or not 1 <= probs.shape[-1] < num_classes:
            raise ValueError(
                f"topk payload: probs {probs.shape} and classes {classes.shape} must match, "
                f"with 1 <= k < {num_classes} classes"
            )
        if classes.size and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
            raise ValueError(f"topk payload: a class index lies outside 0..{num_classes - 1}")

    def decode(self, payload: Payload, head: int, num_classes: int) -> torch.Tensor:
        kept = torch.from_numpy(payload["probs"][head].astype(np.float32))  # [P, k]
        classes = torch.from_numpy(payload["classes"][head].astype(np.int64))  # [P, k]
        rest = (1 - kept.sum(dim=-1, keepdim=True)).clamp_min(0) / (num_classes - kept.shape[-1])  # [P, 1]
        probs = rest.repeat(1, num_classes).scatter(-1, classes, kept)  # [P, C]
        return probs.clamp_min(PROBABILITY_FLOOR).log()


MESSAGE_CODECS: Registry[MessageCodec] = Registry("method.message_codec")
MESSAGE_CODECS.register("float16")(DenseLogits(np.float16))
MESSAGE_CODECS.register("float32")(DenseLogits(np.float32))
MESSAGE_CODECS.register("int8")(QuantisedProbabilities())
MESSAGE_CODECS.register("topk")(TopKProbabilities())


@dataclass(frozen=True)
class CodecConfig:
    """How an agent encodes what it sends (`method.message_codec`, `method.message_topk`)."""

    name: str  # key of MESSAGE_CODECS
    topk: int  # classes the topk codec sends per sample; read by no other codec

    def check(self, num_classes: int) -> None:
        """ConfigError unless the codec is known and, for topk, 1 <= k < num_classes."""
        MESSAGE_CODECS.get(self.name)
        if self.name == "topk" and not 1 <= self.topk < num_classes:
            raise ConfigError(
                "method.message_topk", self.topk, f"an integer in [1, {num_classes - 1}] for {num_classes} classes"
            )

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """Payload for float32 logits [heads, P, C]."""
        return MESSAGE_CODECS.get(self.name).encode(logits, self.topk)


def _check_classes(array: np.ndarray, num_classes: int) -> None:
    if array.shape[-1] != num_classes:
        raise ValueError(f"payload of shape {array.shape} does not hold {num_classes} classes")
