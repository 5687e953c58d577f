"""Packing, MLM masking, CLM targets, and deterministic, resumable, per-process batches.

Every batch is a pure function of ``(seed, step)``: the row order is a per-epoch permutation
drawn from ``(seed, epoch)`` and the masking noise from ``(seed, step)``, so a run resumed at
step ``s`` sees exactly the batches an uninterrupted run sees, and the checkpointed step *is*
the data position. Each process materialises only its slice of the global batch.

A batch is a dict of numpy arrays, all ``[B, L]``:
  ``inputs``  int32  token ids fed to the model (MLM: after masking),
  ``targets`` int32  MLM: the original ids; CLM: the next token,
  ``weights`` float32 loss weights (MLM: 1 at selected positions; CLM: 1 where the target is real),
  ``mask``    int32  1 for real input tokens, 0 for padding (attention mask),
  ``segment_ids`` int32 (zeros: single-segment pre-training).

MLM batches with ``Masking.max_predictions = K > 0`` (BERT's ``max_predictions_per_seq``) also
carry the scored positions, so the LM head and its softmax run at ``K`` positions per row instead
of all ``L`` (:func:`scored_positions`), all ``[B, K]``:
  ``positions`` int32 each row's selected positions in order, padded with 0,
  ``targets_k`` int32 / ``weights_k`` float32 ``targets`` / ``weights`` gathered there (0 where padded).
Selection is then capped at ``K`` per row, so the gathered loss equals the full one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator, Sequence

import numpy as np

from elm_jax.data.corpus import DataError
from elm_jax.data.tokenizer import SpecialIds

_EVAL_SALT = 0x5EED_E7A1


def pack_mlm(docs: Sequence[np.ndarray], seq_len: int, special: SpecialIds) -> np.ndarray:
    """Packs documents into ``[N, seq_len]`` rows ``[CLS] t_1 ... t_{seq_len-1}``.

    The stream is every document followed by ``[SEP]``, cut into chunks of ``seq_len - 1``
    tokens; the last row is padded. ``rows[:, 1:]`` read in order, without the trailing padding,
    is exactly the stream: no token is lost or repeated.
    """
    stream = _stream(docs, special.sep)
    chunk = seq_len - 1
    n = -(-len(stream) // chunk)
    body = np.full((n * chunk,), special.pad, np.int32)
    body[: len(stream)] = stream
    rows = np.empty((n, seq_len), np.int32)
    rows[:, 0] = special.cls
    rows[:, 1:] = body.reshape(n, chunk)
    return rows


def pack_clm(docs: Sequence[np.ndarray], seq_len: int, special: SpecialIds) -> np.ndarray:
    """Packs documents into ``[N, seq_len + 1]`` windows with stride ``seq_len``.

    The stream is every document followed by ``eos``. Row ``i`` is
    ``stream[i*S : i*S + S + 1]`` (padded at the end), so inputs ``row[:-1]`` and targets
    ``row[1:]`` cover every stream token after the first exactly once as a target.
    """
    stream = _stream(docs, special.eos)
    n = max(1, -(-(len(stream) - 1) // seq_len))
    padded = np.full((n * seq_len + 1,), special.pad, np.int32)
    padded[: len(stream)] = stream
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return padded[idx]


def _stream(docs: Sequence[np.ndarray], sep: int) -> np.ndarray:
    parts = []
    for d in docs:
        if len(d):
            parts.append(np.asarray(d, np.int32))
            parts.append(np.asarray([sep], np.int32))
    if not parts:
        raise DataError("the corpus produced no tokens")
    return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class Masking:
    """MLM corruption: select ``rate`` of maskable tokens; of those ``mask_frac`` -> [MASK],
    ``random_frac`` -> a random non-special token, the rest kept."""

    rate: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1
    max_predictions: int = 0  # > 0: at most this many selected per row, gathered (module docstring)


def auto_max_predictions(rate: float, seq_len: int) -> int:
    """The default cap ``K`` of selected positions per row: the mean plus 3 standard deviations
    of the per-row count ``Binomial(L, rate)``, ``L * rate + 3 sqrt(L * rate * (1 - rate))``,
    rounded up to a multiple of 8 (about 1 row in 700 loses its excess selections); ``0`` (no
    gather) when that reaches ``L``, where gathering would save nothing."""
    k = seq_len * rate + 3.0 * math.sqrt(seq_len * rate * (1.0 - rate))
    k = int(-(-math.ceil(k) // 8) * 8)
    return 0 if k >= seq_len else k


def scored_positions(targets: np.ndarray, weights: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The first ``k`` positions of non-zero weight of each row (over the last axis, in position
    order, padded with position 0 at weight 0) and the targets and weights there:
    ``{positions, targets_k, weights_k}``, each ``[..., k]``. With at most ``k`` scored
    positions per row, ``sum(w_k * nll(y_k))`` over them equals the sum over all positions."""
    scored = weights > 0
    order = np.argsort(~scored, axis=-1, kind="stable")[..., :k].astype(np.int32)  # scored first
    keep = np.take_along_axis(scored, order, axis=-1)
    return {"positions": np.where(keep, order, 0).astype(np.int32),
            "targets_k": np.where(keep, np.take_along_axis(targets, order, -1), 0).astype(np.int32),
            "weights_k": np.where(keep, np.take_along_axis(weights, order, -1), 0).astype(np.float32)}


def _cap_per_row(select: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``select`` with each row's selections beyond ``k`` dropped, a uniformly random ``k`` kept."""
    over = select.sum(-1) > k
    if not over.any():
        return select
    keys = np.where(select, rng.random(select.shape), 2.0)
    rank = np.argsort(np.argsort(keys, axis=-1, kind="stable"), axis=-1, kind="stable")
    return select & ((rank < k) | ~over[:, None])


@functools.lru_cache(maxsize=8)
def _non_special(vocab_size: int, specials: tuple[int, ...]) -> np.ndarray:
    return np.setdiff1d(np.arange(vocab_size, dtype=np.int32), np.asarray(specials, np.int32))


def mlm_corrupt(
    rows: np.ndarray, rng: np.random.Generator, special: SpecialIds, vocab_size: int,
    masking: Masking,
) -> dict[str, np.ndarray]:
    """BERT masking of ``rows`` ``[B, L]``.

    Maskable = not pad and not a special id (pad, unk, bos, eos, mask, cls, sep). Each maskable
    token is selected independently with probability ``rate``; a selected token becomes [MASK]
    with probability ``mask_frac``, a uniformly random non-special token with ``random_frac``,
    else stays. Loss weight 1 on selected tokens, targets = the original ids. With
    ``max_predictions = K > 0`` a row keeps at most ``K`` selections (a random ``K`` of them) and
    the batch carries them gathered (module docstring).
    """
    specials = special.all()
    maskable = ~np.isin(rows, specials)
    select = (rng.random(rows.shape) < masking.rate) & maskable
    action = rng.random(rows.shape)
    k = int(masking.max_predictions)
    if k > 0:
        select = _cap_per_row(select, k, rng)
    table = _non_special(vocab_size, specials)
    rand_tok = table[rng.integers(0, len(table), rows.shape)]
    inputs = np.where(select & (action < masking.mask_frac), special.mask, rows)
    to_rand = select & (action >= masking.mask_frac) & (action < masking.mask_frac + masking.random_frac)
    inputs = np.where(to_rand, rand_tok, inputs).astype(np.int32)
    out = {
        "inputs": inputs,
        "targets": rows.astype(np.int32),
        "weights": select.astype(np.float32),
        "mask": (rows != special.pad).astype(np.int32),
        "segment_ids": np.zeros_like(rows, np.int32),
    }
    if k > 0:
        out |= scored_positions(out["targets"], out["weights"], k)
    return out


def clm_targets(rows: np.ndarray, special: SpecialIds) -> dict[str, np.ndarray]:
    """Next-token targets from ``[B, L+1]`` windows; weight 0 where the target is padding."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "weights": (targets != special.pad).astype(np.float32),
        "mask": (inputs != special.pad).astype(np.int32),
        "segment_ids": np.zeros_like(inputs, np.int32),
    }


def _local_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process index {process_index} of {process_count}")
    if global_batch % process_count:
        raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
    per = global_batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


class LMBatches:
    """Training batches: ``batch(step)`` is a pure function of ``(seed, step)``.

    Global row ``g = step * B + j`` is row ``perm_e[g mod N]`` of epoch ``e = g // N``, where
    ``perm_e`` is a permutation drawn from ``(seed, e)``. MLM masking noise comes from
    ``(seed, step)`` for the whole global batch, so the local slices of all processes
    concatenate to exactly the global batch a single process would build.
    """

    def __init__(self, rows: np.ndarray, kind: str, global_batch: int, seed: int,
                 special: SpecialIds, vocab_size: int, masking: Masking = Masking()):
        if kind not in ("mlm", "clm"):
            raise DataError(f"task must be 'mlm' or 'clm', got {kind!r}")
        if len(rows) < global_batch:
            raise DataError(
                f"the training corpus packs into only {len(rows)} sequences, fewer than one global "
                f"batch of {global_batch}: use more text, or lower config.data.batch_size / seq_len"
            )
        self.rows, self.kind, self.global_batch = rows, kind, int(global_batch)
        self.seed, self.special, self.vocab_size, self.masking = int(seed), special, int(vocab_size), masking

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def steps_per_epoch(self) -> float:
        return len(self.rows) / self.global_batch

    @functools.lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def row_indices(self, step: int) -> np.ndarray:
        """Corpus row index of each example of global batch ``step``."""
        g = step * self.global_batch + np.arange(self.global_batch)
        epochs, pos = g // len(self.rows), g % len(self.rows)
        out = np.empty(self.global_batch, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[pos[sel]]
        return out

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's slice of global batch ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        sl = _local_slice(self.global_batch, process_index, process_count)
        rows = self.rows[self.row_indices(step)]
        if self.kind == "clm":
            out = clm_targets(rows, self.special)
        else:
            rng = np.random.default_rng([self.seed, step])
            out = mlm_corrupt(rows, rng, self.special, self.vocab_size, self.masking)
        return {k: v[sl] for k, v in out.items()}


class EvalBatches:
    """A fixed evaluation set (the validation or the search split, named by ``split``): all rows
    in order (or the first ``max_batches`` batches).

    The last batch is filled with all-padding rows of weight 0, so every real token counts
    exactly once. MLM masking is fixed by ``(seed, salt, batch index)``: every evaluation of every
    model sees the same corrupted inputs.
    """

    def __init__(self, rows: np.ndarray, kind: str, batch_size: int, seed: int,
                 special: SpecialIds, vocab_size: int, masking: Masking = Masking(),
                 max_batches: int = 0, split: str = "validation"):
        if len(rows) == 0:
            raise DataError(f"the {split} split is empty")
        self.split = split
        self.rows, self.kind, self.batch_size = rows, kind, int(batch_size)
        self.seed, self.special, self.vocab_size, self.masking = int(seed), special, int(vocab_size), masking
        n = -(-len(rows) // self.batch_size)
        self.num_batches = min(n, max_batches) if max_batches > 0 else n

    def __len__(self) -> int:
        return self.num_batches

    def global_batch(self, k: int) -> dict[str, np.ndarray]:
        rows = self.rows[k * self.batch_size: (k + 1) * self.batch_size]
        if len(rows) < self.batch_size:
            fill = np.full((self.batch_size - len(rows), rows.shape[1]), self.special.pad, np.int32)
            rows = np.concatenate([rows, fill])
        if self.kind == "clm":
            return clm_targets(rows, self.special)
        rng = np.random.default_rng([self.seed, _EVAL_SALT, k])
        return mlm_corrupt(rows, rng, self.special, self.vocab_size, self.masking)

    def batches(self, process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        sl = _local_slice(self.batch_size, process_index, process_count)
        for k in range(self.num_batches):
            yield {key: v[sl] for key, v in self.global_batch(k).items()}
