"""One agent: private shard, multi-head model, optimizer, RNG, and the MHD training step.

Pure PyTorch (no Ray): the same class is stepped by the serial backend, by a Ray actor, and
by a plain loop in tests and benchmarks. What leaves it is a `Prediction`, `EvalCounts` or a
dict of metric numbers — never a parameter, gradient or private sample.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class, instantiate

from agents.codecs import MESSAGE_CODECS, CodecConfig
from agents.inbox import Inbox, message_from_state, message_state
from agents.losses import (
    EMBEDDING_TERM,
    DistillConfig,
    TeacherChoice,
    choose_teacher,
    head_term,
    mhd_terms,
    weighted_total,
)
from agents.messages import EvalCounts, Prediction
from agents.model import ModelConfig, MultiHeadModel, head_names
from agents.output_privacy import OutputPrivacy, OutputPrivacyConfig
from agents.privacy import DPSGD, PrivacyConfig, dp_train_step
from agents.public import public_batch_indices
from sim.core.seeding import derive_seed


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int  # optimizer steps per round
    batch_size: int  # private samples per step
    distill_batch_size: int  # public samples per step, drawn from the round's public batch
    eval_batch_size: int  # test samples per forward pass (memory only, not results)
    optimizer: dict[str, Any] = field(hash=False)  # {_target_: torch.optim.X, lr: ..., ...}


@dataclass(frozen=True)
class AgentSpec:
    """Everything one agent is built from; the shard is sent only to the actor hosting it."""

    agent_id: int
    seed: int  # this agent's stream, derived from the root seed
    in_neighbours: tuple[int, ...]  # senders whose predictions this agent distils from
    private_x: np.ndarray  # [n, C, H, W] float32
    private_y: np.ndarray  # [n] int64
    model: ModelConfig
    train: TrainConfig
    distill: DistillConfig | None  # None: the agent never distils (isolated, central)
    message_codec: CodecConfig  # wire format of outgoing predictions (agents/codecs.py)
    privacy: PrivacyConfig | None = None  # DP-SGD on the private part of each step (agents/privacy.py); None: off
    output_privacy: OutputPrivacyConfig | None = None  # randomises what it publishes (agents/output_privacy.py)

    def __post_init__(self) -> None:
        self.message_codec.check(self.model.num_classes)  # a ConfigError before any agent is built


@dataclass(frozen=True)
class PublicData:
    """Data every agent in a process shares: the unlabelled public set and the test set."""

    public_x: np.ndarray  # [P_total, C, H, W] float32, no labels
    public_batch_size: int  # samples per round's public batch
    schedule_seed: int  # root seed of the public-batch schedule
    test_x: np.ndarray  # [N_test, C, H, W] float32
    test_y: np.ndarray  # [N_test] int64
    eval_rows: np.ndarray  # [n] sorted test rows evaluated during training (stratified, seeded); all for a final one

    @property
    def evaluates_subset(self) -> bool:
        """Whether evaluations during training see fewer rows than the whole test set."""
        return len(self.eval_rows) < len(self.test_y)

    def test_set(self, full: bool) -> tuple[np.ndarray, np.ndarray]:
        """The whole test set, or the subset evaluated during training (the same rows for every agent)."""
        if full or not self.evaluates_subset:
            return self.test_x, self.test_y
        return self.test_x[self.eval_rows], self.test_y[self.eval_rows]


@dataclass(frozen=True)
class ExecutionConfig:
    """How an agent's math runs, never what it computes (results agree up to float rounding)."""

    device: str  # "cpu" or "cuda[:N]"
    torch_threads: int  # intra-op threads of the hosting process
    channels_last: bool  # NHWC memory format for convolutions
    compile: bool  # torch.compile the model (compiled once per process and shape, then cached)
    vectorize: bool  # step a process's agents together with torch.func.vmap (agents/vectorized.py)
    bf16: bool  # bfloat16 autocast for forward passes (losses stay float32); changes numerics, not the method
    eval_channels_last: bool  # evaluate through an NHWC copy of the model (test logits change by float rounding only)


RoundTargets = dict[str, torch.Tensor]
"""Loss-term name -> its target on the round's distillation pool: [P', C] per head, [P', D] for
the embedding. Empty when the agent has no teacher this round."""


@dataclass(frozen=True)
class Teachers:
    """A round's teachers: targets on the pool of public batches that the candidates' messages were made on.

    In lock-step every message was made on the round's own batch, so the pool is that one batch;
    a late message was made on an older batch and is distilled on that batch (docs/dynamic.md).
    """

    batches: tuple[int, ...]  # public batch ids, ascending; the pool is their samples in this order
    targets: RoundTargets  # every term's target on the pool's rows


def shared_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` as a tensor on `device`, without a copy on the CPU even when the array is read-only.

    The public and test sets reach an actor through Ray's object store as read-only views of
    shared memory that every actor of a node maps once; agents only read them, so viewing them
    keeps one copy per node instead of one per process (docs/performance.md, "Memory").
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).to(device)


def count_correct(
    predict: Callable[[torch.Tensor], torch.Tensor],
    test: tuple[np.ndarray, np.ndarray],
    batch_size: int,
    shape: tuple[int, int, int],
    device: torch.device,
) -> list[EvalCounts]:
    """Per-head, per-class correct counts of A models on a test set, `batch_size` images at a time.

    `predict` maps a batch [b, C, H, W] on `device` to every model's predicted classes
    [A, heads, b]: one agent's forward pass (A = 1) or a vectorised group's
    (agents/vectorized.py), so both count the same way. `shape` is (A, heads, classes).
    Counting stays on the device; only the small count arrays come back.
    """
    test_x, test_y = test
    correct = torch.zeros(shape, dtype=torch.int64, device=device)
    with torch.inference_mode():
        for start in range(0, len(test_y), batch_size):
            x = shared_tensor(test_x[start : start + batch_size], device)
            y = shared_tensor(test_y[start : start + batch_size], device)
            correct.index_add_(2, y, (predict(x) == y).long())
    seen = np.bincount(test_y, minlength=shape[2]).astype(np.int64)
    return [EvalCounts(counts, seen.copy()) for counts in correct.cpu().numpy()]


def build_optimizer(config: dict[str, Any], params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer `config` describes, on `params`: what Hydra's `instantiate` builds, faster.

    `instantiate` makes an OmegaConf node of the config on every call, ~4.5 ms: two thirds of
    building a small agent, and 0.45 s of every 100 agents an actor sets up. A flat config
    (`_target_` and keyword arguments) needs only the class, resolved once per process; one with
    nested configs or Hydra's own `_..._` keys still goes through `instantiate`.
    """
    keys = [key for key in config if key != "_target_"]
    if any(key.startswith("_") or isinstance(config[key], Mapping) for key in keys):
        return instantiate(config, params=params)  # type: ignore[no-any-return]
    return optimizer_class(str(config["_target_"]))(params, **{key: config[key] for key in keys})


@functools.cache
def optimizer_class(target: str) -> type[torch.optim.Optimizer]:
    return get_class(target)  # type: ignore[no-any-return]


class TrainingDivergedError(RuntimeError):
    """A loss or an outgoing logit became non-finite: the run would only produce noise."""


class Agent:
    """An MHD agent; docs/design.md#loss gives the loss it minimises."""

    def __init__(self, spec: AgentSpec, public: PublicData, execution: ExecutionConfig) -> None:
        self.agent_id = spec.agent_id
        self.in_neighbours = spec.in_neighbours
        self.spec = spec
        self.public = public
        self.device = device = torch.device(execution.device)
        self.memory_format = torch.channels_last if execution.channels_last else torch.contiguous_format
        self.generator = torch.Generator().manual_seed(spec.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.model = MultiHeadModel(spec.model).to(device)
            self.model.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # missing from torch's stubs
        # `forward` is what runs; `model` is what is saved (a compiled wrapper shares its parameters).
        self.forward = torch.compile(self.model, dynamic=False) if execution.compile else self.model
        self.bf16 = execution.bf16
        self.eval_channels_last = execution.eval_channels_last and not execution.compile
        self.optimizer = build_optimizer(spec.train.optimizer, self.model.parameters())
        self.private_x = torch.tensor(spec.private_x, device=device)  # own copy: specs may be read-only
        self.private_y = torch.tensor(spec.private_y, device=device)
        self.public_x = shared_tensor(public.public_x, device)  # shared by the group's agents (and actors of a node)
        self._order = torch.randperm(len(self.private_y), generator=self.generator)
        self._cursor = 0
        self._batch_index: torch.Tensor | None = None  # the latest private minibatch's shard indices
        # A support-conditioned backbone (HyperTransformer) predicts and evaluates with one fixed
        # support set from the agent's own shard, drawn once, so its published predictions are a
        # function of its weights alone; training draws a fresh one every step.
        self.support_size = self.model.backbone.support_size
        self.eval_support = self._draw_support() if self.support_size else None
        # Own latest outgoing message: competes as a teacher under include_self, and is what the
        # agent re-sends after a restore (its in-flight contribution to its neighbours' inboxes).
        self.last_published: Prediction | None = None
        # Own messages by public batch, for include_self on a batch that late messages describe:
        # only the batches the inbox still holds or expects, and the newest (prune_own).
        self.own: dict[int, Prediction] = {}
        # Neighbours' messages: in transit, then the newest per sender (agents/inbox.py).
        self.inbox = Inbox()
        self.heads = head_names(self.model.num_heads)
        self.head_of_term = {head_term(name): head for head, name in enumerate(self.heads)}
        self.temperature = None if spec.distill is None else spec.distill.temperature
        self.dp = None
        self.stopped = False  # its privacy budget stopped it: no more private steps, nothing published
        if spec.privacy is not None:
            self.dp = DPSGD(spec.privacy, spec.seed, len(spec.private_y), spec.train.batch_size)
        self.output = None
        if spec.output_privacy is not None:
            self.output = OutputPrivacy(spec.output_privacy, derive_seed(spec.seed, "output_privacy"))

    # ---- training -------------------------------------------------------------------------

    def train_round(self, round_idx: int, inbox: Sequence[Prediction]) -> dict[str, float]:
        """`local_steps` optimizer steps on private data plus distillation from the inbox.

        The inbox holds in-neighbours' predictions, each on the public batch it names: in
        lock-step all on batch `round_idx`, made at the end of the previous round (one round
        stale). Returns the mean of every loss term.
        """
        self.stopped = self.dp is not None and not self.dp.allows_round(self.spec.train.local_steps)
        if self.stopped:  # this round would pass its privacy budget (agents/privacy.py)
            return self.privacy_metrics()
        teachers = self.round_targets(round_idx, inbox)
        targets = teachers.targets
        public_batch = self.distill_pool(teachers.batches) if targets else None
        sums: dict[str, float] = {}
        self.model.train()
        for _ in range(self.spec.train.local_steps):
            terms = self._train_step(public_batch, targets)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        steps = self.spec.train.local_steps
        means = self.checked_means(round_idx, {name: total / steps for name, total in sums.items()})
        return {**means, **self.privacy_metrics(), **self.release_metrics()}

    def privacy_metrics(self) -> dict[str, float]:
        """Private steps taken so far (the accountant's state) and whether the agent trained and shares this round."""
        if self.dp is None:
            return {}
        return {"privacy/steps": float(self.dp.steps), "privacy/sharing": float(not self.stopped)}

    def release_metrics(self) -> dict[str, float]:
        """Messages released so far under an output mechanism (what its accounting composes over); {} otherwise."""
        return {} if self.output is None else {"privacy/messages": float(self.output.messages)}

    def checked_means(self, round_idx: int, means: dict[str, float]) -> dict[str, float]:
        """The round's mean losses, or TrainingDivergedError when the total is not finite."""
        if not math.isfinite(means["loss/total"]):
            raise TrainingDivergedError(
                f"agent {self.agent_id} diverged in round {round_idx} (loss/total={means['loss/total']}); "
                f"lower train.optimizer.lr (now {self.spec.train.optimizer.get('lr')})"
            )
        return means

    def step_batch(self, public_batch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The next step's inputs: private minibatch, then (when distilling) a public minibatch.

        Returns x [B + b, C, H, W], y [B] and the public samples picked (indices into the round's
        public batch), all drawn from this agent's own generator in a fixed order.
        """
        x, y = self._next_private_batch()
        if public_batch is None:
            return x, y, None
        pick = self.pick_public(public_batch)
        return torch.cat([x, public_batch[pick]]), y, pick

    def pick_public(self, public_batch: torch.Tensor) -> torch.Tensor:
        """`distill_batch_size` rows of the round's public batch, without replacement, from the agent's stream."""
        pick = torch.randperm(len(public_batch), generator=self.generator)[: self.spec.train.distill_batch_size]
        return pick.to(self.device)

    def _train_step(self, public_batch: torch.Tensor | None, targets: RoundTargets) -> dict[str, torch.Tensor]:
        if self.dp is not None:
            return dp_train_step(self, self.dp, public_batch, targets)
        x, y, pick = self.step_batch(public_batch)
        if self.support_size:  # an episode: support and query samples do not overlap
            self.model.backbone.condition(*self._draw_support(exclude=self._batch_index))
        with self.autocast():
            logits, embedding = self.forward(x.contiguous(memory_format=self.memory_format))
        if self.bf16:  # losses in float32
            logits, embedding = logits.float(), embedding.float()  # [heads, B+b, C], [B+b, D]
        picked = {} if pick is None else {name: target[pick] for name, target in targets.items()}
        terms = mhd_terms(logits, embedding, y, picked, self.head_of_term, self.temperature, self.model.project)
        total = weighted_total(terms, self.term_weights())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        terms["loss/total"] = total
        return terms

    def term_weights(self) -> dict[str, float]:
        """Weight of every loss term this agent can have: 1 for CE, then nu_main, nu_aux, nu_emb."""
        distill = self.spec.distill
        weights = {"loss/ce": 1.0}
        if distill is not None:
            weights[head_term(self.heads[0])] = distill.nu_main
            weights.update({head_term(name): distill.nu_aux for name in self.heads[1:]})
            weights[EMBEDDING_TERM] = distill.nu_emb
        return weights

    def _next_private_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next private minibatch, reshuffling after every pass over the shard (epochs)."""
        size = min(self.spec.train.batch_size, len(self._order))
        if self._cursor + size > len(self._order):
            self._order = torch.randperm(len(self._order), generator=self.generator)
            self._cursor = 0
        index = self._order[self._cursor : self._cursor + size].to(self.device)
        self._cursor += size
        self._batch_index = index
        return self.private_x[index], self.private_y[index]

    def _draw_support(self, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`support_size` labelled samples of the own shard, without replacement.

        Samples in `exclude` (the step's query batch) are left out unless nothing else is left;
        a shard smaller than `support_size` gives all it has.
        """
        candidates = torch.arange(len(self.private_y), device=self.device)
        if exclude is not None and len(exclude) < len(candidates):
            keep = torch.ones(len(candidates), dtype=torch.bool, device=self.device)
            keep[exclude] = False
            candidates = candidates[keep]
        order = torch.randperm(len(candidates), generator=self.generator)[: self.support_size].to(self.device)
        pick = candidates[order]
        return self.private_x[pick].contiguous(memory_format=self.memory_format), self.private_y[pick]

    def _condition_for_inference(self) -> None:
        """Give a support-conditioned backbone the fixed support set before a predict or evaluate."""
        if self.eval_support is not None:
            self.model.backbone.condition(*self.eval_support)

    def round_targets(self, round_idx: int, inbox: Sequence[Prediction]) -> Teachers:
        """Per-head teachers for this round: head 0 from heads 0, head k from heads k-1.

        Candidates are the inbox's messages (sorted by sender) and, under include_self, the
        agent's own message on each of their batches (on this round's batch when the inbox is
        empty). Teachers compete only with candidates made on the same public batch; the
        targets of each batch are stacked in ascending batch order, and a term is kept only
        when every batch has it.
        """
        distill = self.spec.distill
        if distill is None:
            return Teachers((), {})
        candidates = [message for message in inbox if message.batch_id <= round_idx]
        if distill.include_self:  # own message on each batch the others describe (this round's, with none)
            described = sorted({message.batch_id for message in candidates}) or [round_idx]
            candidates += [self.own[batch] for batch in described if batch in self.own]
        batches = tuple(sorted({message.batch_id for message in candidates}))
        per_batch = [self._batch_targets([m for m in candidates if m.batch_id == batch]) for batch in batches]
        terms = [name for name in per_batch[0] if all(name in targets for targets in per_batch)] if per_batch else []
        if len(per_batch) == 1:
            return Teachers(batches, per_batch[0])
        return Teachers(batches, {name: torch.cat([targets[name] for targets in per_batch]) for name in terms})

    def prune_own(self) -> None:
        """Keep own messages only for the batches of messages held or in transit, and the newest.

        A message not yet in transit was published at the end of this round, on the newest batch.
        """
        wanted = {message.batch_id for message in self.inbox.held.values()}
        wanted |= {message.batch_id for _, message in self.inbox.pending}
        wanted.add(max(self.own, default=-1))
        self.own = {batch: message for batch, message in self.own.items() if batch in wanted}

    def _batch_targets(self, candidates: list[Prediction]) -> RoundTargets:
        """The teachers' targets on one public batch, from candidates all made on it."""
        distill = self.spec.distill
        assert distill is not None
        targets: RoundTargets = {}
        main: TeacherChoice | None = None
        for head in range(self.model.num_heads if candidates else 0):
            source_head = max(head - 1, 0)
            usable = [m.decode(source_head) for m in candidates if m.num_heads > source_head]  # [P, C] each
            if not usable:
                continue
            stacked = torch.stack(usable).to(self.device)  # [N, P, C] logits or log-probabilities
            choice = choose_teacher(stacked, distill.temperature, distill.teacher_rule, self.generator)
            main = choice if head == 0 else main
            targets[head_term(self.heads[head])] = choice.probs  # [P, C]
        embedding = self._embedding_target(candidates, main)
        if embedding is not None:
            targets[EMBEDDING_TERM] = embedding  # [P, D]
        return targets

    def _embedding_target(self, candidates: list[Prediction], main: TeacherChoice | None) -> torch.Tensor | None:
        """E(u): the main-head teacher's embedding per sample (the mean under the mean rule)."""
        distill = self.spec.distill
        if distill is None or distill.nu_emb == 0 or main is None:
            return None
        with_embedding = [m.embeddings for m in candidates if m.embeddings is not None]
        if len(with_embedding) != len(candidates):
            return None
        stacked = torch.from_numpy(np.stack(with_embedding)).float().to(self.device)  # [N, P, D]
        if bool((main.source < 0).all()):
            return stacked.mean(dim=0)
        return stacked[main.source.to(self.device), torch.arange(stacked.shape[1], device=self.device)]

    # ---- what leaves the agent --------------------------------------------------------------

    def predict(self, batch_id: int) -> Prediction:
        """Logits of every head (and, when embedding distillation is on, P_i(e)) on a public batch."""
        self.model.eval()
        self._condition_for_inference()
        with torch.inference_mode(), self.autocast():
            logits, embedding = self.forward(self.public_batch(batch_id).contiguous(memory_format=self.memory_format))
            projected = None
            if self.spec.distill is not None and self.spec.distill.nu_emb > 0:
                projected = self.model.project(embedding)
        return self.publish(batch_id, logits, projected)

    def publish(self, batch_id: int, logits: torch.Tensor, projected: torch.Tensor | None) -> Prediction:
        """Encode logits [heads, P, C] (and P_i(e) [P, D]) as this agent's outgoing message."""
        codec = self.spec.message_codec
        logits = logits.float()
        payload = codec.encode(logits)
        if not bool(torch.isfinite(logits).all()) or not all(np.isfinite(array).all() for array in payload.values()):
            raise TrainingDivergedError(
                f"agent {self.agent_id}'s logits are not finite in the {codec.name} codec (round {batch_id - 1})"
            )
        if self.output is not None:  # the randomised prediction is what the codec encodes (log-probabilities)
            logits = self.output.release(logits)
            payload = codec.encode(logits)
        embedding_dtype = MESSAGE_CODECS.get(codec.name).embedding_dtype
        embeddings = None if projected is None else projected.float().cpu().numpy().astype(embedding_dtype)
        message = Prediction(self.agent_id, batch_id, codec.name, self.model.num_classes, payload, embeddings)
        self.last_published = message
        self.own[batch_id] = message
        self.prune_own()
        return message

    def evaluate(self, full: bool) -> EvalCounts:
        """Per-head, per-class correct counts on the global test set (`full`) or its evaluation subset."""
        self.model.eval()
        self._condition_for_inference()
        forward, memory_format = self._evaluation_forward()

        def predict(x: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                logits = forward(x.contiguous(memory_format=memory_format))[0]  # [heads, b, C]
            return logits.argmax(dim=-1)[None]  # [1, heads, b]

        shape = (1, self.model.num_heads, self.model.num_classes)
        test = self.public.test_set(full)
        return count_correct(predict, test, self.spec.train.eval_batch_size, shape, self.device)[0]

    def _evaluation_forward(self) -> tuple[Callable[[torch.Tensor], Any], torch.memory_format]:
        """The model evaluation runs, and the memory format of its input.

        With `runtime.eval_channels_last`, the test set goes through a throwaway NHWC copy of an
        NCHW model: on a CPU, convolutions and max-pooling run ~2.7x faster that way for
        small_cnn (docs/performance.md, Evaluation). The model that trains, publishes and is
        saved never sees the copy, so training is bit for bit what it was; the test logits differ
        by float rounding only. Not for a compiled model (it would compile again) or a
        support-conditioned backbone (its conditioning lives in the model it was given).
        """
        if not self.eval_channels_last or self.memory_format == torch.channels_last or self.eval_support is not None:
            return self.forward, self.memory_format
        nhwc = copy.deepcopy(self.model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return nhwc, torch.channels_last

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast when `runtime.bf16` (a no-op context otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def distill_pool(self, batches: Sequence[int]) -> torch.Tensor:
        """The public samples of `batches`, one after another: what a round's distillation steps draw from."""
        if len(batches) == 1:
            return self.public_batch(batches[0])
        return torch.cat([self.public_batch(batch) for batch in batches])

    def public_batch(self, batch_id: int) -> torch.Tensor:
        """Public batch `batch_id`, [P, C, H, W]: the same samples for every agent (one schedule)."""
        indices = public_batch_indices(
            self.public.schedule_seed, batch_id, len(self.public.public_x), self.public.public_batch_size
        )
        return self.public_x[torch.from_numpy(indices).to(self.device)]

    def state_dict(self) -> dict[str, Any]:
        """Full resumable state (tensors and numbers only, so it loads with weights_only=True).

        Written only to the agent's own checkpoint storage; never sent to another agent.
        """
        published = self.last_published
        privacy = {} if self.dp is None else {"privacy": self.dp.state_dict()}  # none: the file as before
        if self.output is not None:
            privacy["output_privacy"] = self.output.state_dict()
        return {
            **privacy,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "order": self._order,
            "cursor": self._cursor,
            "published": None if published is None else message_state(published),
            "own": [message_state(message) for _, message in sorted(self.own.items())],
            "inbox": self.inbox.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore everything `state_dict` saved: training continues bit-identically."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self._order = state["order"]
        self._cursor = state["cursor"]
        if self.dp is not None:
            self.dp.load_state_dict(state["privacy"])
        if self.output is not None:
            self.output.load_state_dict(state["output_privacy"])
        published = state["published"]
        self.last_published = None
        if published is not None:  # checkpoints of older versions name no sender
            self.last_published = message_from_state({"sender": self.agent_id, **published}, self.model.num_classes)
        own = [message_from_state(item, self.model.num_classes) for item in state.get("own", [])]
        if "own" not in state and self.last_published is not None:  # older checkpoints kept only the newest
            own = [self.last_published]
        self.own = {message.batch_id: message for message in own}
        self.inbox = Inbox()
        if "inbox" in state:  # older checkpoints had none: every message was delivered in the next round
            self.inbox.load_state_dict(state["inbox"], self.model.num_classes)
