"""The generic training engine every stage (teacher, supernet, retrain, finetune) uses.

Shape of it (after google/flax ``examples/lm1b_nnx``):

* the NNX model is split ONCE into ``(graphdef, params, other)``; the train state
  (:class:`TrainState`) is a plain pytree, and ONE pure step
  ``train_step(state, batch) -> (state, metrics)`` is compiled with ``jax.jit``,
  explicit ``in_shardings``/``out_shardings`` (from ``jax.eval_shape`` of the state,
  see :mod:`elm_jax.engine.sharding`) and ``donate_argnums=0``;
* the data position IS the step: a data source is a pure function of
  ``(seed, step)``, and the state carries ``step`` and ``rng``, so a run killed and
  rerun from its checkpoint reproduces the uninterrupted run bit for bit (on CPU);
* the host loop (:func:`elm_jax.engine.loop.fit`) dispatches steps asynchronously and
  touches metrics on the host only every ``log_every`` steps, one step late, so the
  device never waits.

Config fields read from ``tc`` (a ConfigDict / any attribute object):
``steps, lr, warmup_frac, weight_decay, b1, b2, eps, clip_norm, log_every, eval_every,
checkpoint_every, keep_checkpoints, nan_policy ('stop' | 'skip'), seed``.

Function contracts:
``loss_fn(model, batch, rng) -> (loss, metrics)``: ``loss`` is the scalar that is
differentiated (e.g. a weighted mean), ``metrics`` a dict of scalars that are *summed*
over the steps of a log window (and over devices, by the caller's ``sharded_sums``).
``eval_fn(model, batch) -> metrics`` likewise returns sums, added over all eval batches.

Metric contract: the engine divides nothing on its own. The ``Trainer``'s ``ratios``
(``{derived name: (numerator, denominator)}``, default :data:`LM_RATIOS`:
``loss = loss_sum / weight_sum``, ``correct = correct_sum / weight_sum``) declares the
derived metrics; each is reported next to the raw sums, as the ratio of the two sums over
the whole window / eval set (so eval ``loss`` is the token-weighted mean over the eval set,
independent of how it is split into batches), and only when both sums are among the metrics.
Every other metric is reported as its raw sum (:func:`derive_ratios`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from elm_jax.engine import checkpoint as ckpt_lib
from elm_jax.engine import sharding as shd
from elm_jax.engine.losses import LM_RATIOS
from elm_jax.engine.optim import lr_schedule, make_optimizer, sampled_path_adamw
from elm_jax.fields import get as get_field

log = logging.getLogger(__name__)

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]
EvalFn = Callable[[nnx.Module, dict], dict]

_NO_BAD_STEP = np.iinfo(np.int32).max


class NonFiniteError(RuntimeError):
    """A train step produced a non-finite loss or gradient norm (nan_policy='stop')."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class TrainSource(Protocol):
    def batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]:
        """This process's local rows of global batch ``step`` (a pure function of step)."""


class EvalSource(Protocol):
    def batches(self, process_index: int, process_count: int) -> Iterable[dict[str, np.ndarray]]:
        """The fixed eval batches (this process's local rows); same count on every process."""


# ----------------------------------------------------------------------------
# Optimizer


# ----------------------------------------------------------------------------
# State and compiled steps


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole).

    Attributes:
      params: ``nnx.State`` of the model's ``nnx.Param`` variables.
      other: the rest of the model state (RNG counts/keys, batch stats); may be empty.
      opt_state: the optax state.
      step: int32 scalar, number of batches consumed = index of the next batch.
      rng: raw PRNG key data (``jax.random.key_data``); split once per step.
    """

    params: Any
    other: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


class _WithFrozen:
    """A jitted ``f(state, batch, frozen)`` called as ``f(state, batch)``; ``frozen`` is bound."""

    def __init__(self, jitted: Any, frozen: Any):
        self.jitted, self.frozen = jitted, frozen

    def __call__(self, state: Any, batch: Any) -> Any:
        return self.jitted(state, batch, self.frozen)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()  # pylint: disable=protected-access


def _where(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _reduce_metrics(acc: dict, m: dict) -> dict:
    """Folds one step's metrics into a window: sums, except min/last for two keys."""
    out = {}
    for k, v in m.items():
        if k == "first_bad_step":
            out[k] = jnp.minimum(acc[k], v)
        elif k == "lr":
            out[k] = v
        else:
            out[k] = acc[k] + v
    return out


Ratios = Mapping[str, tuple[str, str]]



def derive_ratios(sums: Mapping[str, float], ratios: Ratios) -> dict[str, float]:
    """``sums`` plus ``name = sums[num] / sums[den]`` for each declared ``name: (num, den)``
    whose two sums are present (NaN when the denominator is not positive).

    Nothing else is divided. The derived names follow the sums, in the order of their
    numerators in ``sums``.
    """
    out = dict(sums)
    pos = {k: i for i, k in enumerate(sums)}
    present = [(name, num, den) for name, (num, den) in ratios.items() if num in sums and den in sums]
    for name, num, den in sorted(present, key=lambda r: pos[r[1]]):
        w = float(sums[den])
        out[name] = float(sums[num]) / w if w > 0 else float("nan")
    return out


def _check_ratios(ratios: Ratios) -> dict[str, tuple[str, str]]:
    out = {}
    for name, pair in ratios.items():
        if not (isinstance(name, str) and isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"ratios: expected {{name: (numerator, denominator)}} of strings, "
                             f"got {name!r}: {pair!r}")
        out[name] = (pair[0], pair[1])
    return out


class Trainer:
    """A model, its loss, optimizer and mesh, with the compiled train/eval steps.

    Args:
      model: the constructed NNX model (its current values are the initial state).
      loss_fn: ``(model, batch, rng) -> (loss, metric_sums)``.
      eval_fn: ``(model, batch) -> metric_sums`` (may be ``None``: no evaluation).
      tc: train config (see module docstring for fields).
      mesh: from :func:`elm_jax.engine.sharding.make_mesh`.
      optimizer: overrides :func:`make_optimizer` (e.g. to freeze parts).
      frozen: a pytree passed as the last argument of ``loss_fn`` / ``eval_fn`` (e.g. a
        teacher's parameters); never trained or checkpointed.
      ratios: the derived metrics, ``{name: (numerator sum, denominator sum)}`` (see the
        module docstring); default :data:`LM_RATIOS`.
      sampled_path: update only the parameter tensors each step used (DESIGN 1.5): an object
        with ``unit_axes(path, leaf) -> int`` (leading axes that index separate tensors) and
        ``used(params, batch) -> tree of bool unit masks``; the optimizer is then
        :func:`~elm_jax.engine.optim.sampled_path_adamw`.

    Attributes:
      graphdef: the model's static structure (from the one ``nnx.split``).
      tx, schedule: the optax transformation and its learning-rate schedule.
      abstract_state: ``TrainState`` of ``jax.ShapeDtypeStruct`` with shardings (the
        restore target for checkpoints).
      state_shardings, batch_sharding: the ``NamedSharding`` trees used by the steps.
      train_step: jitted ``(state, batch) -> (state, metrics)``; DONATES ``state``.
        ``metrics`` (replicated scalars): ``loss``, ``grad_norm``, ``lr``, ``skipped``
        (1 if this step was not applied), ``finite_steps``, ``first_bad_step`` and the
        loss_fn's sums, all zeroed for a skipped step.
      eval_step: jitted ``(state, batch) -> metric sums``.
      train_step_traces: how many times ``train_step`` was traced (tests assert 1).
    """

    def __init__(
        self,
        model: nnx.Module,
        loss_fn: LossFn,
        eval_fn: EvalFn | None,
        tc: Any,
        mesh: Mesh,
        *,
        optimizer: optax.GradientTransformation | None = None,
        frozen: Any = None,
        ratios: Ratios | None = None,
        sampled_path: Any = None,
    ):
        self.tc = tc
        self.ratios = _check_ratios(LM_RATIOS if ratios is None else ratios)
        self.mesh = mesh
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.nan_policy = str(get_field(tc, "nan_policy", "stop"))
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"train.nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        self.total_steps = int(tc.steps)
        self.schedule = lr_schedule(tc, self.total_steps)
        self.sampled_path = sampled_path
        if optimizer is not None:
            self.tx = optimizer
        elif sampled_path is not None:
            self.tx = sampled_path_adamw(tc, self.total_steps, sampled_path.unit_axes)
        else:
            self.tx = make_optimizer(tc, self.total_steps)
        self.graphdef, params, other = nnx.split(model, nnx.Param, ...)
        # Kept to (re)build the initial state; never donated (init_state copies them).
        self._init_params, self._init_other = params, other

        abstract = jax.eval_shape(self._new_state, params, other)
        self.state_shardings: TrainState = shd.state_shardings(abstract, mesh)
        self.abstract_state: TrainState = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings
        )
        self.batch_sharding = shd.batch_sharding(mesh)
        self.train_step_traces = 0
        repl = shd.replicated(mesh)
        self.has_frozen = frozen is not None
        frozen_tree = frozen if self.has_frozen else {}
        frozen_sh = shd.state_shardings(jax.eval_shape(lambda: frozen_tree), mesh)
        self.frozen = self._place(frozen_tree, frozen_sh)
        self.train_step = _WithFrozen(
            jax.jit(
                self._train_step,
                in_shardings=(self.state_shardings, self.batch_sharding, frozen_sh),
                out_shardings=(self.state_shardings, repl),
                donate_argnums=0,
            ),
            self.frozen,
        )
        self.eval_step = _WithFrozen(
            jax.jit(
                self._eval_step,
                in_shardings=(self.state_shardings, self.batch_sharding, frozen_sh),
                out_shardings=repl,
            ),
            self.frozen,
        )
        self._accumulate = jax.jit(_reduce_metrics, out_shardings=repl)
        self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), out_shardings=repl)
        self._init_jit = jax.jit(self._new_state, out_shardings=self.state_shardings)

    # -- state ------------------------------------------------------------------
    def _new_state(self, params: Any, other: Any) -> TrainState:
        return TrainState(
            params=params,
            other=other,
            opt_state=self.tx.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(jax.random.key(int(get_field(self.tc, "seed", 0)))),
        )

    def _place(self, tree: Any, shardings: Any) -> Any:
        """Host values (identical on every process) -> global arrays with ``shardings``."""

        def one(x: Any, s: Any) -> jax.Array:
            if ckpt_lib.is_prng_key(x):
                data = one(jax.random.key_data(x), s)
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

        return jax.tree.map(one, tree, shardings)

    def init_state(self) -> TrainState:
        """The initial state (model's current params, fresh optimizer, step 0), sharded."""
        params = self._place(self._init_params, self.state_shardings.params)
        other = self._place(self._init_other, self.state_shardings.other)
        return self._init_jit(params, other)

    def model_from_state(self, state: TrainState) -> nnx.Module:
        """The NNX model holding ``state``'s params (``nnx.merge``).

        The model shares ``state``'s arrays: do not pass ``state`` to ``train_step``
        (which donates it) while the model is still needed.
        """
        return nnx.merge(self.graphdef, state.params, state.other)

    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.abstract_state.params)))

    # -- compiled steps ---------------------------------------------------------
    def _train_step(self, state: TrainState, batch: dict, frozen: Any) -> tuple[TrainState, dict]:
        self.train_step_traces += 1  # Python side effect: runs once per trace/compile
        key = jax.random.wrap_key_data(state.rng)
        next_key, step_key = jax.random.split(key)

        def loss_of(params):
            # copy=True: fresh Variables owned by this (grad) trace, so the model may
            # mutate its non-param state (RNG counts, batch stats) inside jax.grad.
            model = nnx.merge(self.graphdef, params, state.other, copy=True)
            loss, sums = self.loss_fn(model, batch, step_key, *self._frozen_args(frozen))
            _, _, new_other = nnx.split(model, nnx.Param, ...)
            return loss, (sums, new_other)

        (loss, (sums, new_other)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if self.sampled_path is not None:
            used = self.sampled_path.used(state.params, batch)
            updates, new_opt = self.tx.update(grads, state.opt_state, state.params, used=used)
        else:
            updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # Non-finite step: keep params/other/opt_state (data position and rng advance,
        # so the bad batch is skipped; with nan_policy='stop' the host loop raises).
        new_state = TrainState(
            params=_where(finite, new_params, state.params),
            other=_where(finite, new_other, state.other),
            opt_state=_where(finite, new_opt, state.opt_state),
            step=state.step + 1,
            rng=jax.random.key_data(next_key),
        )
        zero = jnp.zeros((), jnp.float32)
        metrics = {k: jnp.where(finite, jnp.asarray(v, jnp.float32), zero) for k, v in sums.items()}
        metrics.update(
            loss=jnp.where(finite, loss.astype(jnp.float32), zero),
            grad_norm=jnp.where(finite, grad_norm, zero),
            finite_steps=finite.astype(jnp.int32),
            skipped=(~finite).astype(jnp.int32),
            first_bad_step=jnp.where(finite, _NO_BAD_STEP, state.step).astype(jnp.int32),
            lr=self.schedule(state.step),
        )
        return new_state, metrics

    def _frozen_args(self, frozen: Any) -> tuple:
        return (frozen,) if self.has_frozen else ()

    def _eval_step(self, state: TrainState, batch: dict, frozen: Any) -> dict:
        model = nnx.merge(self.graphdef, state.params, state.other, copy=True)
        out = self.eval_fn(model, batch, *self._frozen_args(frozen))
        return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------
# Evaluation


def evaluate(trainer: Trainer, state: TrainState, eval_source: EvalSource) -> dict[str, float]:
    """Sums ``eval_fn`` over all eval batches (on device, one host fetch at the end).

    Returns the sums plus the trainer's declared ratios of them (:func:`derive_ratios`).
    """
    if trainer.eval_fn is None or eval_source is None:
        return {}
    sums = None
    for local in eval_source.batches(jax.process_index(), jax.process_count()):
        out = trainer.eval_step(state, shd.global_batch(local, trainer.mesh))
        sums = out if sums is None else trainer._add(sums, out)  # pylint: disable=protected-access
    if sums is None:
        return {}
    return derive_ratios({k: float(v) for k, v in jax.device_get(sums).items()}, trainer.ratios)


# ----------------------------------------------------------------------------
# The loop


