"""A model-free executor that checks the scheduler's contract like a paranoid model runner.

It keeps a fake KV cache: every slot written records which token sat there and a fingerprint
of the whole prefix up to it. Before "computing" a chunk it verifies that every earlier slot
of the sequence holds exactly that sequence's own prefix, so a prefix-cache hit or a fork
that reused the wrong block, or a block handed to two live owners, is caught at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from quire.core.outputs import RunnerOutput, SchedulerOutput


@dataclass
class _Seq:
    token_ids: list[int]
    block_ids: list[int]
    num_computed: int


class CheckingExecutor:
    def __init__(self, num_blocks: int, block_size: int, vocab: int = 50, seed: int = 0) -> None:
        self.block_size = block_size
        self.slots: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.seqs: dict[str, _Seq] = {}
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.steps = 0

    def _slot(self, seq: _Seq, position: int) -> int:
        return seq.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        self.apply_plan(plan)
        return self.compute(plan)

    def apply_plan(self, plan: SchedulerOutput) -> None:
        """Take in what the plan says changed (what a runner does before running the model)."""
        self.steps += 1
        for request_id in plan.finished_request_ids:
            self.seqs.pop(request_id, None)
        for new in plan.new_requests:
            self.seqs[new.request_id] = _Seq(
                list(new.token_ids), list(new.block_ids), new.num_computed_tokens
            )
        for cached in plan.cached_requests:
            seq = self.seqs[cached.request_id]
            assert seq.num_computed == cached.num_computed_tokens, (cached, seq.num_computed)
            seq.block_ids.extend(cached.new_block_ids)

    def compute(self, plan: SchedulerOutput) -> RunnerOutput:
        """Check and "compute" the scheduled tokens of an applied plan, sampling random tokens."""
        assert sum(plan.num_scheduled_tokens.values()) == plan.total_num_scheduled_tokens
        sampled_ids, sampled_tokens = [], []
        for request_id, count in plan.num_scheduled_tokens.items():
            seq = self.seqs[request_id]
            assert count >= 1
            end = seq.num_computed + count
            assert end <= len(seq.token_ids), (request_id, end, len(seq.token_ids))
            assert len(seq.block_ids) * self.block_size >= end, "not enough blocks for the scheduled tokens"
            assert len(set(seq.block_ids)) == len(seq.block_ids), "a block twice in one table"
            fingerprint = hash(tuple(seq.token_ids[: seq.num_computed]))
            for pos in range(seq.num_computed):  # what attention would read
                expected = (seq.token_ids[pos], hash(tuple(seq.token_ids[: pos + 1])))
                assert self.slots[self._slot(seq, pos)] == expected, f"{request_id} reads a wrong KV at {pos}"
            for pos in range(seq.num_computed, end):  # what attention would write
                fingerprint = hash(tuple(seq.token_ids[: pos + 1]))
                self.slots[self._slot(seq, pos)] = (seq.token_ids[pos], fingerprint)
            seq.num_computed = end
            if end == len(seq.token_ids):
                token = self.rng.randrange(self.vocab)
                seq.token_ids.append(token)
                sampled_ids.append(request_id)
                sampled_tokens.append(token)
        return RunnerOutput(sampled_ids, sampled_tokens, [None] * len(sampled_ids))
