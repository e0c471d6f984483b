"""One generation request in the engine's own process: its sequences on the ``GenerationRunner``, read a step
at a time as typed ``messages.Tokens`` (the same messages an engine core sends an API worker), then one
``messages.Finished``. The adapter's lease is this stream's: released when the engine let every sequence go, or,
when the request ended early, handed to ``hold`` which keeps it until the engine did."""
from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Callable, Iterable

from ptserve.server.engine_core import messages as m
from ptserve.server.generation.engine import StepEvent
from ptserve.server.generation.logprobs import TokenLogprob
from ptserve.server.generation.runner import GenerationRunner
from ptserve.server.generation.sequence import Sequence


def logprob_message(lp: TokenLogprob | None) -> m.Logprob | None:
    return None if lp is None else m.Logprob(lp.token, lp.logprob, list(lp.top))


class LocalTokenStream:
    def __init__(self, runner: GenerationRunner, seqs: list[Sequence], lease: AsyncExitStack,
                 hold: Callable[[AsyncExitStack, list[Sequence]], None]):
        self.seqs, self._lease, self._hold = seqs, lease, hold
        self._steps = runner.generate_steps(seqs)
        self._began = False  # the sequences are queued on the engine (at the first read)
        self._finished = False
        self._choice = {seq.id: k for k, seq in enumerate(seqs)}
        self._sent_prompt: set[int] = set()  # choices whose prompt logprobs went out (with their first token)

    def __aiter__(self) -> "LocalTokenStream":
        return self

    async def __anext__(self) -> m.Tokens | m.Finished:
        if self._finished:
            raise StopAsyncIteration
        self._began = True
        try:
            while True:
                try:
                    step, events = await self._steps.__anext__()
                except StopAsyncIteration:
                    self._finished = True
                    await self.aclose()
                    return m.Finished([s.finish_reason or "cancelled" for s in self.seqs],
                                      [len(s.output_ids) for s in self.seqs])
                tokens = [self._token(e) for e in events if e.token is not None]  # not the cancelled
                if tokens:
                    return m.Tokens(step, tokens)
        except BaseException:  # an engine failure, or the reader gave up waiting (cancelled)
            self._finished = True
            await self.aclose()
            raise

    def _token(self, event: StepEvent) -> m.Token:
        k = self._choice[event.seq.id]
        token = m.Token(k, event.token, logprob_message(event.logprob))
        if k not in self._sent_prompt:
            self._sent_prompt.add(k)
            if event.seq.prompt_logprobs is not None:
                token.prompt_logprobs = [logprob_message(lp) for lp in event.seq.prompt_logprobs]
        return token

    def cancel(self, choices: Iterable[int] | None) -> None:
        """Stop these choices (None: all); the engine frees their rows at its next step."""
        for k in range(len(self.seqs)) if choices is None else choices:
            if 0 <= k < len(self.seqs):
                self.seqs[k].cancelled.set()

    async def aclose(self) -> None:
        if self._lease is None:
            return
        self.cancel(k for k, s in enumerate(self.seqs) if not s.released.is_set())
        self._finished = True
        await self._steps.aclose()
        lease, self._lease = self._lease, None
        if not self._began or all(s.released.is_set() for s in self.seqs):
            await lease.aclose()
        else:
            self._hold(lease, self.seqs)
