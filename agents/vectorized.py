"""Homogeneous agents of one group trained as one vmapped model (an option, not the default).

The agents stay ordinary `Agent`s: each keeps its shard, RNG stream, teacher choice, optimizer
state, checkpoint format and message code. Only the math of a step runs for all of them at
once: their parameters are stacked into [A, ...] tensors and one `torch.func.vmap` of
`grad_and_value(functional_call(...))` computes every agent's loss and gradients, followed by
an SGD update on the stacked tensors. Prediction and evaluation forward the shared public or
test batch through all stacked models in one vmapped call.

Why an option: on CPU, vmap turns each conv into one grouped conv over the agents, which
oneDNN runs slower than A plain ones (resnet8 at 28x28: 3-6x slower per round in
scripts/bench_vmap.py on 2 shared cores; small_cnn on 8x8 digits, where per-call overhead
dominates, about even: 0.7-1.2x). On a GPU, A tiny kernels per layer become one larger
launch, which is where it may pay. Results equal `AgentGroup`'s up to float rounding: in
float64 to ~1e-15 (tests/test_vectorized.py).

Parameters live in each Agent's module between rounds: they are stacked afresh at the start
of every round and copied back at its end, rather than the modules' parameters being views
into the stack. A round costs three extra copies of the parameters (stack, write back, stack
for prediction), next to `local_steps` forward and backward passes; in exchange nothing here
holds state of its own, so `state_dict`, `load_state_dict`, save and restore stay the Agent's
code, and no agent's tensor is ever a view into its neighbours' storage (`torch.save` of a
view writes the whole storage: every agent's weights would land in each agent's checkpoint).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from agents.agent import (
    Agent,
    AgentSpec,
    ExecutionConfig,
    PublicData,
    Teachers,
    TrainConfig,
    build_optimizer,
    count_correct,
)
from agents.group import AgentGroup, Bundle, staleness
from agents.inbox import RoundPlan
from agents.losses import EMBEDDING_TERM, mhd_terms, weighted_total
from agents.messages import EvalCounts, Prediction, check_metrics
from agents.model import ModelConfig, MultiHeadModel
from sim.core.errors import ConfigError

Stacked = dict[str, Tensor]  # parameter name -> [A, *shape]: one slice per agent

HOMOGENEOUS_FIELDS = ("model", "train", "distill", "message_codec")
"""AgentSpec fields every agent of a vectorised group must share: one architecture, one step."""

PROJECTION_PREFIX = "projection."  # MultiHeadModel's P_i, outside its forward pass


@dataclass(frozen=True)
class StackedSGD:
    """torch.optim.SGD's update on stacked parameters: one op per tensor serves every agent.

    Same arithmetic as torch.optim.SGD with dampening 0: d_p = g + wd * p; buf = momentum * buf
    + d_p; p -= lr * buf (lr * (d_p + momentum * buf) with nesterov). SGD's first step sets buf
    = d_p instead; a zero buffer gives the same bits (0 * momentum + d_p), which lets agents
    with and without a buffer share one update.
    """

    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, train: TrainConfig) -> StackedSGD:
        """The optimizer's current settings (read each round: a restore reloads them).

        Raises:
            ConfigError: the optimizer (built from `train.optimizer`) is not torch.optim.SGD
                with one param group, dampening 0 and maximize off (the update implemented here).
        """
        groups = optimizer.param_groups
        plain = len(groups) == 1 and groups[0].get("dampening") == 0 and not groups[0].get("maximize")
        if type(optimizer) is not torch.optim.SGD or not plain:
            raise ConfigError(
                "train.optimizer._target_",
                train.optimizer.get("_target_"),
                "the vectorised step implements torch.optim.SGD (one param group, dampening 0, "
                "maximize off) only; use it or turn vectorisation off",
            )
        group = groups[0]
        return cls(
            lr=float(group["lr"]),
            momentum=float(group["momentum"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
        )

    def step(self, params: Stacked, grads: Stacked, buffers: Stacked) -> None:
        """Updates `params` and (when momentum is on, one per parameter) `buffers` in place."""
        for name, param in params.items():
            d_p = grads[name]  # [A, *shape]
            if self.weight_decay != 0:
                d_p = d_p.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = buffers[name].mul_(self.momentum).add_(d_p)
                d_p = d_p.add(buf, alpha=self.momentum) if self.nesterov else buf
            param.add_(d_p, alpha=-self.lr)


@dataclass
class Cohort:
    """Agents whose steps this round have the same loss terms, so one vmapped call serves them.

    Agents of one group differ only in what their inbox held: no message (cross-entropy only,
    no public samples), messages covering more or fewer heads, without embeddings, or made on
    other public batches (late messages, docs/dynamic.md). Grouping by the terms, rather than
    masking absent terms with zero weights, keeps each agent's forward batch, reported terms and
    updated parameters what `Agent` computes; a round has one cohort in the usual case.
    """

    agents: list[Agent]
    teachers: list[dict[str, Tensor]]  # per agent: term name -> target on the distillation pool, [P', C] or [P', D]
    batches: tuple[int, ...]  # the public batches of the pool (the same for the whole cohort)

    @property
    def distils(self) -> bool:
        return bool(self.teachers[0])


class VectorizedAgentGroup(AgentGroup):
    """An AgentGroup whose agents train, predict and evaluate as one vmapped model.

    Same constructor, `run_round`, `evaluate`, `save` and `restore` as AgentGroup (save and
    restore are inherited: checkpoints are interchangeable between the two), so a backend can
    host either. `execution.channels_last` and `execution.compile` do not apply to the vmapped
    math (it always runs in the default memory format, uncompiled).

    Raises:
        ConfigError, ValueError: specs this cannot vectorise (see `check_vectorizable`).
    """

    def __init__(self, specs: Sequence[AgentSpec], public: PublicData, execution: ExecutionConfig) -> None:
        check_vectorizable(specs)
        super().__init__(specs, public, execution)
        first = next(iter(self.agents.values()))
        # The architecture without storage: functional_call supplies each agent's parameters.
        self.base = copy.deepcopy(first.model).to("meta")
        self.template = first  # settings shared by all (spec, public schedule)
        self.weights = first.term_weights()
        self.step_fn = vmap(grad_and_value(self._agent_loss, has_aux=True))

    # ---- training -------------------------------------------------------------------------

    def run_round(
        self, round_idx: int, incoming: Iterable[Bundle], publish: bool, plan: RoundPlan | None = None
    ) -> tuple[dict[int, dict[str, float]], dict[int, Prediction]]:
        """AgentGroup.run_round, with every cohort's steps vmapped and one vmapped prediction."""
        plan = self.round_plan(round_idx, plan)
        inboxes = self.inboxes(round_idx, incoming, plan)
        active = self.active(plan)
        teachers = {agent_id: self.agents[agent_id].round_targets(round_idx, inboxes[agent_id]) for agent_id in active}
        found: dict[int, dict[str, float]] = {}
        for cohort in self._cohorts(teachers):
            found.update(self._train_cohort(round_idx, cohort))
        metrics = {agent_id: check_metrics(found[agent_id]) for agent_id in active}
        for agent_id in active:
            metrics[agent_id].update(staleness(round_idx, inboxes[agent_id]))
        outgoing: dict[int, Prediction] = {}
        publishers = self.publishers(plan, publish)
        if publishers:
            outgoing = self._predict(round_idx + 1, [self.agents[agent_id] for agent_id in publishers])
            for agent_id, message in outgoing.items():
                metrics[agent_id]["comm/message_bytes"] = float(message.nbytes)
                metrics[agent_id].update(self.agents[agent_id].release_metrics())
        return metrics, outgoing

    def _cohorts(self, teachers: dict[int, Teachers]) -> list[Cohort]:
        cohorts: dict[tuple[tuple[str, ...], tuple[int, ...]], Cohort] = {}
        for agent_id, found in teachers.items():
            cohort = cohorts.setdefault((tuple(found.targets), found.batches), Cohort([], [], found.batches))
            cohort.agents.append(self.agents[agent_id])
            cohort.teachers.append(found.targets)
        return list(cohorts.values())

    def _train_cohort(self, round_idx: int, cohort: Cohort) -> dict[int, dict[str, float]]:
        """`local_steps` vmapped steps of a cohort; returns each agent's mean loss terms."""
        sgd = StackedSGD.of(cohort.agents[0].optimizer, cohort.agents[0].spec.train)
        params = stack_parameters(cohort.agents)
        trained = trained_parameters(self.base, EMBEDDING_TERM in cohort.teachers[0])
        buffers = stack_momentum(cohort.agents, trained) if sgd.momentum != 0 else {}
        public_batch = self.template.distill_pool(cohort.batches) if cohort.distils else None
        self.base.train()
        history: dict[str, list[Tensor]] = {}
        for _ in range(self.template.spec.train.local_steps):
            x, y, targets = draw_batches(cohort, public_batch)
            grads, (_, terms) = self.step_fn(params, x, y, targets)
            with torch.no_grad():
                sgd.step({name: params[name] for name in trained}, grads, buffers)
            for name, value in terms.items():  # [A_c] each
                history.setdefault(name, []).append(value.detach())
        write_back(cohort.agents, trained, params, buffers)
        means = {name: torch.stack(values).double().mean(dim=0).tolist() for name, values in history.items()}
        return {
            agent.agent_id: agent.checked_means(round_idx, {name: per_agent[i] for name, per_agent in means.items()})
            for i, agent in enumerate(cohort.agents)
        }

    def _agent_loss(
        self, params: Stacked, x: Tensor, y: Tensor, targets: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One agent's `Agent._train_step` loss, written for vmap (tensors here carry no A dim).

        Args:
            params: the agent's parameters.
            x: [B+b, C, H, W] private samples, then (when distilling) the picked public ones.
            y: [B] private labels.
            targets: term name -> the teacher's target on the picked public samples, [b, C] per
                distilled head and [b, D] for the embedding term.
        """
        logits, embedding = functional_call(self.base, params, (x,))  # [heads, B+b, C], [B+b, D]
        template = self.template
        terms = mhd_terms(
            logits,
            embedding,
            y,
            targets,
            template.head_of_term,
            template.temperature,
            lambda public_embedding: self._project(params, public_embedding),
        )
        total = weighted_total(terms, self.weights)
        return total, {**terms, "loss/total": total}

    def _project(self, params: Stacked, embedding: Tensor) -> Tensor:
        """P_i(e) with the agent's own projection weights (MultiHeadModel.project, functionally)."""
        projection = self.base.projection
        assert projection is not None  # embedding terms and messages exist only with a projection
        own = {
            name.removeprefix(PROJECTION_PREFIX): value
            for name, value in params.items()
            if name.startswith(PROJECTION_PREFIX)
        }
        return functional_call(projection, own, (embedding,))

    # ---- what leaves the agents ------------------------------------------------------------

    def _predict(self, batch_id: int, agents: list[Agent]) -> dict[int, Prediction]:
        """Each of `agents`' `Agent.predict(batch_id)`, from one vmapped forward pass."""
        params = stack_parameters(agents)
        distill = self.template.spec.distill
        self.base.eval()
        with torch.inference_mode():
            # [A, heads, P, C], [A, P, D]
            logits, embedding = self._forward_shared(params, self.template.public_batch(batch_id))
            projected = vmap(self._project)(params, embedding) if distill is not None and distill.nu_emb > 0 else None
        return {
            agent.agent_id: agent.publish(batch_id, logits[i], None if projected is None else projected[i])
            for i, agent in enumerate(agents)
        }

    def evaluate(self, full: bool) -> dict[int, EvalCounts]:
        """Test-set counts per agent id, every agent's forward pass on a chunk at once.

        A chunk holds eval_batch_size // A samples, so one pass still forwards about
        eval_batch_size images (the memory bound that setting promises).
        """
        agents = list(self.agents.values())
        params = stack_parameters(agents)
        chunk = max(1, self.template.spec.train.eval_batch_size // len(agents))
        shape = (len(agents), self.base.num_heads, self.base.num_classes)
        self.base.eval()
        counts = count_correct(
            lambda x: self._forward_shared(params, x)[0].argmax(dim=-1),  # [A, heads, b]
            self.template.public.test_set(full),
            chunk,
            shape,
            self.device,
        )
        return {agent.agent_id: agent_counts for agent, agent_counts in zip(agents, counts, strict=True)}

    def _forward_shared(self, params: Stacked, x: Tensor) -> tuple[Tensor, Tensor]:
        """All agents' models on one batch x [N, C, H, W] -> ([A, heads, N, C], [A, N, D])."""
        return vmap(lambda own: functional_call(self.base, own, (x,)))(params)


# ---- checks -----------------------------------------------------------------------------------


def check_vectorizable(specs: Sequence[AgentSpec]) -> None:
    """Raises what VectorizedAgentGroup(specs, ...) would, without building its agents.

    Builds one model and optimizer (no data), so the driver can check every group before any
    worker starts.

    Raises:
        ConfigError: agents that differ (`runtime.vectorize`, see `check_homogeneous`), a model
            with buffers (`backbone.norm`) or an optimizer other than plain SGD
            (`train.optimizer._target_`).
        ValueError: no specs.
    """
    check_homogeneous(specs)
    spec = specs[0]
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream as it was
        model = MultiHeadModel(spec.model)
    check_no_buffers(model, spec.model)
    if model.backbone.support_size:
        raise ConfigError(
            "runtime.vectorize", True, f"a backbone without a support set ({spec.model.backbone} reads one)"
        )
    StackedSGD.of(build_optimizer(spec.train.optimizer, model.parameters()), spec.train)


def check_homogeneous(specs: Sequence[AgentSpec]) -> None:
    """ConfigError (a ValueError) unless all specs share one architecture, step and batch size.

    Named after `runtime.vectorize`, the switch that asked for one vmapped step per group.
    """
    if not specs:
        raise ValueError("a vectorised group needs at least one agent")
    first = specs[0]
    for spec in specs[1:]:
        for name in HOMOGENEOUS_FIELDS:
            if getattr(spec, name) != getattr(first, name):
                raise ConfigError(
                    "runtime.vectorize",
                    True,
                    f"agents {first.agent_id} and {spec.agent_id} differ in {name}, but a vectorised group "
                    "trains one architecture with one step",
                )
        if private_batch_size(spec) != private_batch_size(first):
            raise ConfigError(
                "runtime.vectorize",
                True,
                f"agents {first.agent_id} and {spec.agent_id} draw {private_batch_size(first)} and "
                f"{private_batch_size(spec)} private samples per step (train.batch_size={first.train.batch_size} "
                "exceeds a shard), but a vectorised step needs equal batches: lower train.batch_size",
            )


def private_batch_size(spec: AgentSpec) -> int:
    """Private samples per step, as `Agent._next_private_batch` draws them."""
    return min(spec.train.batch_size, len(spec.private_y))


def check_no_buffers(model: MultiHeadModel, config: ModelConfig) -> None:
    """ConfigError for a model with buffers: vmap cannot update them in place per agent.

    The only buffers these backbones have are batch norm's running statistics.
    """
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ConfigError(
            "backbone.norm",
            config.backbone_params.get("norm"),
            f"batch norm's running statistics ({buffers[0]}, ...) cannot be updated per agent under vmap; "
            "use backbone.norm=group or turn vectorisation off",
        )


# ---- per-agent pieces, in each agent's own order ----------------------------------------------


def draw_batches(cohort: Cohort, public_batch: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Each agent's next step batch, drawn from its own generator exactly as `_train_step` does.

    Returns:
        x [A, B+b, C, H, W], y [A, B] and term name -> [A, b, C] or [A, b, D] targets.
    """
    xs, ys = [], []
    picked: dict[str, list[Tensor]] = {name: [] for name in cohort.teachers[0]}
    for agent, teachers in zip(cohort.agents, cohort.teachers, strict=True):
        x, y, pick = agent.step_batch(public_batch)  # [B+b, C, H, W], [B], [b]
        if pick is not None:
            for name, target in teachers.items():
                picked[name].append(target[pick])
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys), {name: torch.stack(values) for name, values in picked.items()}


def stack_parameters(agents: Sequence[Agent]) -> Stacked:
    """Copies of the agents' parameters, stacked along a new leading agent dim."""
    names = [name for name, _ in agents[0].model.named_parameters()]
    with torch.no_grad():
        return {name: torch.stack([agent.model.get_parameter(name) for agent in agents]) for name in names}


def trained_parameters(model: MultiHeadModel, distils_embedding: bool) -> list[str]:
    """Names of the parameters a step's loss reaches: the ones torch.optim.SGD updates.

    SGD skips a parameter whose .grad is None (no weight decay, no momentum): the projection
    P_i in a step without an embedding term. torch.func.grad reports zeros for it instead, so
    it is left out of the update here.
    """
    return [name for name, _ in model.named_parameters() if distils_embedding or not name.startswith(PROJECTION_PREFIX)]


def stack_momentum(agents: Sequence[Agent], names: Sequence[str]) -> Stacked:
    """The agents' SGD momentum buffers for `names`, stacked; zeros for an agent without one yet."""
    stacked: Stacked = {}
    for name in names:
        buffers = []
        for agent in agents:
            param = agent.model.get_parameter(name)
            buffer = agent.optimizer.state[param].get("momentum_buffer")
            buffers.append(torch.zeros_like(param) if buffer is None else buffer)
        stacked[name] = torch.stack(buffers)
    return stacked


def write_back(agents: Sequence[Agent], names: Sequence[str], params: Stacked, buffers: Stacked) -> None:
    """Copies slice i of the stacks into agent i's parameters `names` and optimizer state.

    Momentum buffers are cloned so that each agent's state owns its storage (see the module
    docstring: a saved view would carry every agent's buffers).
    """
    with torch.no_grad():
        for i, agent in enumerate(agents):
            for name in names:
                param = agent.model.get_parameter(name)
                param.copy_(params[name][i])
                if name in buffers:
                    agent.optimizer.state[param]["momentum_buffer"] = buffers[name][i].clone()
