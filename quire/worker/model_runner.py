"""SchedulerOutput -> flat batch tensors -> one forward -> sample -> RunnerOutput.

The runner keeps a small state per live request (its tokens, block table, sampling state) so
that each step only ships what changed. Every scheduled token of every request goes through a
single forward pass: single-token queries (decodes) first, then prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quire.core.outputs import NewRequestData, RequestExecutionError, RunnerOutput, SchedulerOutput
from quire.structured.manager import StructuredOutputManager
from quire.worker.attention_metadata import AttentionMetadata, PrefillChunk
from quire.worker.host_memory import release_free_heap
from quire.worker.sampler import Sampler, SamplingState, make_generator


@dataclass
class _RequestState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed: int
    sampling: SamplingState


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # flat token index of each row to sample from
    sample_ids: list[str]


class ModelRunner:
    """Executes scheduled steps on one device. ``model`` follows quire.models.llama's interface.

    ``structured`` is the constrained-decoding hook (see ``quire.structured.manager``); without
    it, requests carrying ``structured_outputs`` are refused at the step that admits them."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        vocab_size: int,
        device: torch.device,
        structured: StructuredOutputManager | None = None,
    ) -> None:
        self.model = model
        self.structured = structured
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.vocab_size = vocab_size
        self.sampler = Sampler(vocab_size, device)
        self._states: dict[str, _RequestState] = {}

    def release_idle_memory(self) -> None:
        """The engine is idle: hand the heap's free pages (the last steps' activations, kept for
        reuse while busy) back to the OS, so an idle server's RSS is its weights, KV pool and
        runtime (see quire.worker.host_memory). The next step faults them in again once."""
        if self.device.type == "cpu":
            release_free_heap()

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        self._apply_plan(plan)
        if plan.is_empty:
            return RunnerOutput([], [], [])
        batch = self._build_batch(plan)
        structured = self.structured
        if structured is not None:
            structured.raise_failures(plan.num_scheduled_tokens)
            # Filled on another thread while the forward below runs.
            structured.start_bitmask(batch.sample_ids)
        with torch.inference_mode():
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn)
            logits = (
                self.model.compute_logits(hidden.index_select(0, batch.sample_rows))
                if batch.sample_ids
                else None
            )
            states = [self._states[rid].sampling for rid in batch.sample_ids]
            allowed = structured.finish_bitmask() if structured is not None else None
            sampled = self.sampler(logits, states, allowed) if logits is not None else None

        if sampled is not None and structured is not None:
            # Before anything of the step is recorded: it may refuse the step for some requests.
            structured.accept_tokens(batch.sample_ids, sampled.token_ids)
        for request_id, count in plan.num_scheduled_tokens.items():
            self._states[request_id].num_computed += count
        if sampled is None:
            return RunnerOutput([], [], [])
        for request_id, token_id in zip(batch.sample_ids, sampled.token_ids, strict=True):
            state = self._states[request_id]
            state.token_ids.append(token_id)
            state.sampling.output_token_ids.append(token_id)
        return RunnerOutput(list(batch.sample_ids), list(sampled.token_ids), list(sampled.logprobs))

    def _apply_plan(self, plan: SchedulerOutput) -> None:
        structured = self.structured
        for request_id in plan.finished_request_ids:
            self._states.pop(request_id, None)
            if structured is not None:
                structured.remove_request(request_id)
        unsupported: set[str] = set()
        for new in plan.new_requests:
            params = new.params
            if not self._add_structured(new):
                unsupported.add(new.request_id)
            self._states[new.request_id] = _RequestState(
                token_ids=list(new.token_ids),
                block_ids=list(new.block_ids),
                num_computed=new.num_computed_tokens,
                sampling=SamplingState(
                    params=params,
                    prompt_token_ids=list(new.token_ids[: new.num_prompt_tokens]),
                    output_token_ids=list(new.token_ids[new.num_prompt_tokens :]),
                    eos_token_ids=new.eos_token_ids,
                    generator=None if params.seed is None else make_generator(params.seed, self.device),
                ),
            )
        for cached in plan.cached_requests:
            state = self._states[cached.request_id]
            if state.num_computed != cached.num_computed_tokens:
                raise RuntimeError(
                    f"runner and scheduler disagree on {cached.request_id}: "
                    f"{state.num_computed} vs {cached.num_computed_tokens} computed tokens"
                )
            state.block_ids.extend(cached.new_block_ids)
        if unsupported:  # raised once the whole plan is applied, as RequestExecutionError requires
            raise RequestExecutionError(
                "this engine was built without structured output support", unsupported
            )

    def _add_structured(self, new: NewRequestData) -> bool:
        """Give a new (or resumed) request to the structured-output hook; False if it needs one
        and this runner has none."""
        constraint = new.params.structured_outputs
        if self.structured is None:
            return constraint is None
        # A resumed request replays what it generated before preemption into a fresh matcher.
        self.structured.add_request(new.request_id, constraint, new.token_ids[new.num_prompt_tokens :])
        return True

    def _build_batch(self, plan: SchedulerOutput) -> _Batch:
        decodes = [rid for rid, n in plan.num_scheduled_tokens.items() if n == 1]
        prefills = [rid for rid, n in plan.num_scheduled_tokens.items() if n > 1]
        order = decodes + prefills
        total = plan.total_num_scheduled_tokens
        block_size = self.block_size

        input_ids = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int64)
        slot_mapping = np.empty(total, dtype=np.int64)
        max_blocks = max((len(self._states[rid].block_ids) for rid in decodes), default=0)
        decode_tables = np.zeros((len(decodes), max_blocks), dtype=np.int64)
        decode_lens = np.empty(len(decodes), dtype=np.int64)
        chunks: list[PrefillChunk] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []

        offset = 0
        for i, request_id in enumerate(order):
            state = self._states[request_id]
            count = plan.num_scheduled_tokens[request_id]
            start = state.num_computed
            end = start + count
            rows = slice(offset, offset + count)
            pos = np.arange(start, end)
            input_ids[rows] = state.token_ids[start:end]
            positions[rows] = pos
            table = np.asarray(state.block_ids, dtype=np.int64)
            # Flat cache slot of each new token: its block's id * block_size + offset in the block.
            slot_mapping[rows] = table[pos // block_size] * block_size + pos % block_size
            if i < len(decodes):
                decode_tables[i, : len(table)] = table
                decode_lens[i] = end
            else:
                num_blocks = -(-end // block_size)
                block_ids = torch.from_numpy(table[:num_blocks]).to(self.device)
                chunks.append(PrefillChunk(offset, count, start, block_ids))
            if end == len(state.token_ids):  # every known token computed: the next one is sampled
                sample_rows.append(offset + count - 1)
                sample_ids.append(request_id)
            offset += count

        self._check_token_ids(input_ids, order, plan)
        device = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(slot_mapping).to(device),
            num_decodes=len(decodes),
            decode_block_tables=torch.from_numpy(decode_tables).to(device),
            decode_seq_lens=torch.from_numpy(decode_lens).to(device),
            prefills=tuple(chunks),
            block_size=block_size,
        )
        return _Batch(
            input_ids=torch.from_numpy(input_ids).to(device),
            positions=torch.from_numpy(positions).to(device),
            attn=attn,
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64).to(device),
            sample_ids=sample_ids,
        )

    def _check_token_ids(self, input_ids: np.ndarray, order: list[str], plan: SchedulerOutput) -> None:
        """Refuse the step if a token id is outside the vocabulary, naming the requests that carry
        one: the embedding lookup would fail for the whole batch (or read out of bounds on some
        devices). One vectorized test per step; the search for the culprits runs only on failure.
        Raised after ``_apply_plan``, so the engine can schedule everyone else again at once."""
        if input_ids.size == 0 or (input_ids.min() >= 0 and input_ids.max() < self.vocab_size):
            return
        culprits: set[str] = set()
        offset = 0
        for request_id in order:
            count = plan.num_scheduled_tokens[request_id]
            ids = input_ids[offset : offset + count]
            if ids.min() < 0 or ids.max() >= self.vocab_size:
                culprits.add(request_id)
            offset += count
        raise RequestExecutionError(
            f"{len(culprits)} request(s) carry token ids outside the model's vocabulary of {self.vocab_size}",
            culprits,
        )
