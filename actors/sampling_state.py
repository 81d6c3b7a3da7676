"""What the sampling rank remembers of each running sequence between steps, and the grammar
masks it computes while the model runs.

Every worker receives each step's whole `StepInput`; the sampling rank (TP rank 0 of the
last stage) keeps, per sequence:
- its `SamplingParams` (sent when the sequence is (re)scheduled);
- if they need it (penalties, a grammar), every token of the sequence: the prefix-cache
  hits arrive once as `prefix_ids`, the rest in the steps' `token_ids`;
- its grammar matcher, fed the generated tokens as they come back as input.

Nothing is updated from what the sampler chose, only from what the driver sends. So when
the driver forgets a sequence (finished, preempted, or resent to new workers after a
failure) and later sends it again from its start, the same tokens rebuild the same
counts and the same grammar state, exactly.

Grammar masks run in a background thread (llguidance drops the GIL) started before the
forward pass and joined just before sampling: constrained sequences cost the step
nothing while their masks take less time than the forward (measured by
`python -m deploy.bench.grammar`). A matcher is touched only by that thread, and only
between `start_masks` and the join; releases happen before the next start.
"""

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from actors.grammar import GrammarVocabulary
from actors.logits_processors import SampleRow
from actors.sampling_params import SamplingParams
from actors.step_io import SeqStep


@dataclass
class SeqState:
    params: SamplingParams
    history: list[int] = field(default_factory=list)  # kept only if params.needs_history
    matcher: object | None = None  # llguidance.LLMatcher, built by the mask thread
    consumed: int = 0  # generated tokens the matcher has consumed


class SequenceStates:
    def __init__(self, vocabulary: GrammarVocabulary | None):
        self.vocabulary = vocabulary
        self.states: dict[int, SeqState] = {}
        self._mask_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")

    def release(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            self.states.pop(seq_id, None)

    def absorb(self, s: SeqStep) -> None:
        """Take in one sequence's part of a step: new params, new tokens."""
        if s.params is not None:
            if s.params.grammar is not None and self.vocabulary is None:
                raise ValueError("a grammar-constrained sequence reached a worker without a tokenizer vocabulary")
            self.states[s.seq_id] = SeqState(s.params, list(s.prefix_ids))
        state = self.states[s.seq_id]
        if state.params.needs_history:
            state.history += s.token_ids
            assert len(state.history) == s.start_pos + len(s.token_ids), "sampling history out of step with the KV cache"

    def rows(self, sampled: list[SeqStep]) -> list[SampleRow]:
        return [SampleRow(self.states[s.seq_id].params, s.output_index, self.states[s.seq_id].history) for s in sampled]

    def start_masks(self, sampled: list[SeqStep]) -> Future | None:
        """Begin the grammar bitmask of this step's sampled rows ([rows, words] int32,
        -1 for rows without a grammar); None when no row has a grammar."""
        constrained = [(row, self.states[s.seq_id], s.output_index) for row, s in enumerate(sampled)
                       if self.states[s.seq_id].params.grammar is not None]
        if not constrained:
            return None
        return self._mask_thread.submit(self._masks, constrained, len(sampled))

    def _masks(self, constrained: list[tuple[int, SeqState, int]], rows: int) -> torch.Tensor:
        matchers = []
        for row, state, output_index in constrained:
            if state.matcher is None:
                state.matcher = self.vocabulary.matcher(state.params.grammar)
            generated = state.history[len(state.history) - output_index :]
            # a refused token leaves the matcher in its error state, which allows only EOS
            state.matcher.consume_tokens(generated[state.consumed :])
            state.consumed = len(generated)
            matchers.append((state.matcher, row))
        bitmask = self.vocabulary.bitmask(rows)
        self.vocabulary.fill_bitmasks(matchers, bitmask)
        return bitmask

    def shutdown(self) -> None:
        self._mask_thread.shutdown(wait=False)
