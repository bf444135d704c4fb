"""Data-parallel probing under torchrun (or any launcher that sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT): every process probes the rows with ``row_id % world_size == rank`` and rank 0 alone writes the report.

Protocol (gloo, CPU; every collective is made by every rank, in this order):

1. ``sample sync`` (only with ``--grad-sample``): the per-class priorities of each rank's ghost-norm sample are
   exchanged, so each rank keeps exactly its share of the rows a single process would have sampled;
2. ``status``: every rank says whether its shard went through. A rank that fails at any point before this makes
   its next collective a failure report instead, so the others stop at the same step: nobody waits forever and
   rank 0 prints that rank's one-line error and exits 2 with nothing written;
3. ``results``: each rank's accumulator and counters (a few hundred kB) go to rank 0, which merges them
   (``Accumulator.merge``: sums, histograms and hash-ordered samples, so the statistics are a single run's);
4. ``predictions`` (when predictions.csv is written): each rank kept its rows' probabilities in a local temporary
   file; rank 0 pulls them one chunk per rank per round and writes them in row order, so no rank ever holds
   more than a few chunks.

Every rank reads the whole eval file (and tokenizes only its rows), so the file and the model must be at the same
path on every node; only rank 0 needs the ``--out`` folder. Each rank exits 0, 1 or 2 as a single process would
(ranks > 0: 0, or 2 after a failure anywhere); torchrun itself exits 1 whenever a rank exits non-zero.
"""

from __future__ import annotations

import datetime
import importlib
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from .errors import CollapseDetectError, describe


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def row_filter(self):
        world, rank = self.world_size, self.rank
        return lambda row_ids: (row_ids % world) == rank


def from_env(environ=None) -> DistEnv | None:
    """The process's place in a torchrun job, or None for an ordinary single-process run."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        raise CollapseDetectError("WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers "
                                  f"(got {env.get('WORLD_SIZE')!r}, {env.get('RANK')!r}, {env.get('LOCAL_RANK')!r}, "
                                  f"{env.get('LOCAL_WORLD_SIZE')!r})") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise CollapseDetectError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    return DistEnv(rank, world, local_rank, local_world)


class PeerFailed(CollapseDetectError):
    """Another rank failed; its message is this one."""


class Group:
    """The process group, and collectives that carry failures so that every rank stops at the same step."""

    def __init__(self, env: DistEnv):
        import torch.distributed as dist

        global _GROUP_MADE
        _GROUP_MADE = True
        self.env = env
        self.dist = dist
        timeout = float(os.environ.get("COLLAPSE_DETECT_DIST_TIMEOUT_S", 24 * 3600))
        self.owned = not dist.is_initialized()  # a caller's own process group is used, and left alone
        if self.owned:
            # torch.distributed.nn binds the world group as its functions' default argument when first imported,
            # which loading a model does (transformers imports it). Imported after the group exists, it keeps the
            # group alive past destroy_process_group, and gloo's threads are then torn down with the interpreter,
            # which now and then aborts the process at exit ("terminate called without an active exception").
            # Imported first, it binds None.
            importlib.import_module("torch.distributed.nn")

            dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
        self.failed = False

    def _all_gather(self, item) -> list:
        out = [None] * self.env.world_size
        self.dist.all_gather_object(out, item)
        return out

    def exchange(self, payload) -> list:
        """Everyone's payload, in rank order; raises PeerFailed when a rank reported a failure instead."""
        items = self._all_gather(("ok", payload))
        failures = [(r, msg) for r, (state, msg) in enumerate(items) if state == "error"]
        if failures:
            self.failed = True
            raise PeerFailed(_describe(failures, self.env.world_size))
        return [p for _, p in items]

    def fail(self, message: str) -> None:
        """Join the collective the other ranks are in with a failure report (once)."""
        if not self.failed:
            self.failed = True
            self._all_gather(("error", message))

    def gather(self, payload) -> list | None:
        """Payloads to rank 0 (None elsewhere); only after a successful status exchange."""
        out = [None] * self.env.world_size if self.env.rank == 0 else None
        self.dist.gather_object(payload, out, dst=0)
        return out

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


_GROUP_MADE = False
_FOLLOWERS: DistEnv | None = None


def expect_followers(env: DistEnv | None) -> None:
    """Rank 0 of a model run: the other ranks are probing and will wait for it."""
    global _FOLLOWERS
    _FOLLOWERS = env


def notify_failure(message: str) -> None:
    """Rank 0 failed before it joined the others (e.g. ``--out`` is a file): tell them, so they exit 2 at
    their first collective instead of waiting. Does nothing unless ``expect_followers`` named them and no
    process group was made yet."""
    env = _FOLLOWERS
    if env is None or env.rank != 0 or _GROUP_MADE:
        return
    try:
        group = Group(env)
        group.fail(message)
        group.close()
    except Exception:  # the original error is what the user needs to see
        pass


def _describe(failures, world: int) -> str:
    rank, message = failures[0]
    others = f"; {len(failures) - 1} other rank(s) failed too" if len(failures) > 1 else ""
    return f"{message} (rank {rank} of {world}{others})"


class _PartFile:
    """One rank's predictions, chunk by chunk, in a local temporary file (binary .npy records)."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="collapse-detect-part-")
        self.chunks = 0

    def write(self, chunk, probs, names) -> None:
        for array in (chunk.row_ids, chunk.gold, np.asarray(probs)):
            np.save(self.file, np.ascontiguousarray(array), allow_pickle=False)
        self.chunks += 1

    def rewind(self) -> None:
        self.file.flush()
        self.file.seek(0)

    def read(self):
        return tuple(np.load(self.file, allow_pickle=False) for _ in range(3))

    def close(self) -> None:
        self.file.close()


def trim_sample(group: Group, reservoirs: list) -> list:
    """Keep, per class, only this rank's rows among the ``capacity`` smallest priorities over all ranks: the
    rows a single process would have sampled (priorities are a bijective hash of the row id, so no ties)."""
    everyone = group.exchange([res.priority for res in reservoirs])
    for c, res in enumerate(reservoirs):
        merged = np.sort(np.concatenate([prios[c] for prios in everyone]))
        if len(merged) > res.capacity and len(res):
            keep = res.priority <= merged[res.capacity - 1]
            res.priority = res.priority[keep]
            res.arrays = {k: v[keep] for k, v in res.arrays.items()}
    return reservoirs


def merge_runs(runs: list):
    """One ProbeRun from the ranks' runs: merged accumulator and drift sample, summed counters, the slowest
    rank's time."""
    base = runs[0]
    for other in runs[1:]:
        base.accumulator.merge(other.accumulator)
        for name in ("rows", "tokens", "padded_tokens", "truncated_rows", "unknown_tokens"):
            setattr(base, name, getattr(base, name) + getattr(other, name))
        base.seconds = max(base.seconds, other.seconds)
        base.grad_seconds = max(base.grad_seconds, other.grad_seconds)
        base.notes.extend(n for n in other.notes if n not in base.notes)
        if base.drift is not None and other.drift is not None:
            base.drift.merge(other.drift)
    return base


def _probe_shard(env: DistEnv, group: Group, model_dir, data_file, options, keep_predictions: bool):
    from .api import probe_files

    part = _PartFile() if keep_predictions else None
    try:
        outcome = probe_files(model_dir, data_file, options,
                              on_chunk=part.write if part is not None else None, row_filter=env.row_filter,
                              sample_sync=lambda reservoirs: trim_sample(group, reservoirs))
    except BaseException:
        if part is not None:
            part.close()
        raise
    return outcome, part


def _shard_or_fail(env: DistEnv, group: Group, model_dir, data_file, options, keep_predictions: bool):
    """Probe this rank's shard; on failure tell the other ranks (at whatever collective they are in)."""
    try:
        outcome, part = _probe_shard(env, group, model_dir, data_file, options, keep_predictions)
    except PeerFailed:
        raise
    except CollapseDetectError as exc:
        group.fail(str(exc))
        raise
    except BaseException as exc:
        group.fail(describe(exc)[:400])
        raise
    try:
        counts = group.exchange(part.chunks if part is not None else 0)  # the status step
    except BaseException:
        if part is not None:
            part.close()
        raise
    return outcome, part, max(counts)


def lead(env: DistEnv, model_dir, data_file, options, writer, keep_predictions: bool = True):
    """Rank 0: probe its shard, merge everyone's statistics, write predictions.csv in row order through
    ``writer``; return the merged ProbeOutcome (the report is then written as for a single process)."""
    group = Group(env)
    part = None
    try:
        outcome, part, rounds = _shard_or_fail(env, group, model_dir, data_file, options, keep_predictions)
        runs = group.gather(outcome.run)
        outcome.run = merge_runs(runs)
        outcome.run.runtime["processes"] = env.world_size
        if part is not None:
            part.rewind()
            _merge_predictions(group, part, rounds, writer, outcome.class_names)
        return outcome
    finally:
        if part is not None:
            part.close()
        group.close()


def follow(env: DistEnv, model_dir, data_file, options, keep_predictions: bool = True) -> int:
    """Ranks > 0: probe the shard and hand everything to rank 0. Returns the exit code: 0, or 2 after a failure
    on any rank (rank 0 prints the one-line message; this rank prints nothing for user errors)."""
    from dataclasses import replace

    options = replace(options, progress=False)
    group = Group(env)
    part = None
    try:
        try:
            outcome, part, rounds = _shard_or_fail(env, group, model_dir, data_file, options, keep_predictions)
        except CollapseDetectError:
            return 2
        group.gather(outcome.run)
        if part is not None:
            part.rewind()
            for i in range(rounds):
                group.gather(part.read() if i < part.chunks else None)
        return 0
    finally:
        if part is not None:
            part.close()
        group.close()


def _merge_predictions(group: Group, part: _PartFile, rounds: int, writer, names) -> None:
    """Rounds of one chunk per rank; rows are written once every rank has sent a row past them (each rank's
    rows arrive in increasing row id, so below the smallest "last row seen" of the unfinished ranks nothing
    is missing)."""
    world = group.env.world_size
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    done = [False] * world
    last = [-1] * world
    for i in range(rounds):
        blocks = group.gather(part.read() if i < part.chunks else None)
        for r, block in enumerate(blocks):
            if block is None:
                done[r] = True
                continue
            if len(block[0]):
                pending.append(block)
                last[r] = int(block[0][-1])
        if i == rounds - 1:
            done = [True] * world
        open_ranks = [last[r] for r in range(world) if not done[r]]
        limit = min(open_ranks) if open_ranks else None
        pending = _flush(pending, limit, writer, names)


def _flush(pending, limit, writer, names):
    if not pending:
        return pending
    ids = np.concatenate([b[0] for b in pending])
    gold = np.concatenate([b[1] for b in pending])
    probs = np.concatenate([b[2] for b in pending])
    order = np.argsort(ids, kind="stable")
    ids, gold, probs = ids[order], gold[order], probs[order]
    n = len(ids) if limit is None else int(np.searchsorted(ids, limit, side="right"))
    if n:
        writer.write_predictions(ids[:n], gold[:n], probs[:n], names)
    return [(ids[n:], gold[n:], probs[n:])] if n < len(ids) else []
