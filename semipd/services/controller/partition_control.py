"""The controller's side of the SM split: manual switches (`semipd partition`), the partitioner's
decisions acted on, and the split reported in stats. The partitioner itself is pure logic
(partitioner.py); the switch is the switcher's (switcher.py)."""

import json
import sys
import time
from collections import deque
from collections.abc import Iterable

from semipd.services.controller.load_signals import gather
from semipd.services.controller.modes import ServingMode
from semipd.services.controller.partition_config import Decision
from semipd.services.controller.partitioner import Partitioner
from semipd.services.controller.requests import Request
from semipd.services.controller.supervisor import Supervisor
from semipd.services.controller.switcher import Switcher
from semipd.shared import protocol
from semipd.shared.errors import UserError


class PartitionControl:
    def __init__(self, mode: ServingMode, supervisor: Supervisor, switcher: Switcher):
        self.mode, self.supervisor, self.switcher = mode, supervisor, switcher
        switcher.on_end = self.settle  # every switch, done or failed, ends in a settled split
        self.unified = mode.unified
        self.partitioner = mode.partition and Partitioner(mode.partition, **{
            f"{role}_sm": share for role, share in mode.shares.items()})
        self.decisions: deque[dict] = deque(maxlen=100)

    def arrived(self, req: Request) -> None:
        if self.partitioner is not None:
            self.partitioner.arrived(req.arrival, len(req.prompt_ids))

    def finished(self, req: Request, final: protocol.Final) -> None:
        """Feed a request that completed to the partitioner; log its decision and act on it. Not
        while a switch is under way: the request ran on the old split, and a decision now would
        find the switch running. settle() starts a new window once it is done."""
        if self.partitioner is None or final.finish_reason not in ("stop", "length") or self.switcher.active:
            return
        tpot = sum(final.itl_s) / len(final.itl_s) if final.itl_s else None
        self._act(self.partitioner.observe(req.arrival, final.ttft_s, tpot, time.monotonic()))

    def tick(self, requests: Iterable[Request], now: float) -> None:
        """Between finished requests: decide on the load signals once the partitioner says a
        decision is due (a shift shows in the requests in flight seconds before any finishes)."""
        if self.partitioner is not None and not self.switcher.active and self.partitioner.due(now):
            # workers prepared ahead at the shares a raise of prefill is likely to ask for
            split = self.partitioner.prime_split() or (None, None)
            for role, share in zip(("prefill", "decode"), split):
                self.switcher.prime(role, share)
            prefill = self.supervisor.current("prefill").step_times
            self._act(self.partitioner.tick(gather(requests, prefill, now)))

    def _act(self, decision: Decision | None) -> None:
        """Log a partitioner's decision and start the switch it chose."""
        if decision is None:
            return
        record = decision.to_dict()
        self.decisions.append(record)
        print(f"semipd: partition decision {json.dumps(record)}", file=sys.stderr, flush=True)
        target = {"prefill": decision.next_prefill_sm, "decode": decision.next_decode_sm}
        if self.request(target, f"partitioner: {decision.action}") is not None:
            self.settle()  # could not switch now: the partitioner keeps the split in effect

    def settle(self) -> None:
        """Once no switch is under way, tell the partitioner which split is in effect from now."""
        if self.partitioner is not None and not self.switcher.active:
            workers = self.supervisor.workers
            self.partitioner.switched(workers["prefill"].sm_percent, workers["decode"].sm_percent, time.monotonic())

    def request(self, shares: dict[str, int], reason: str) -> str | None:
        """Start switching to a new SM split; an error message if it cannot be done now."""
        if self.unified:
            return "a unified server has no prefill/decode split"
        bad = next((v for v in shares.values() if not 1 <= v <= 100), None)
        if bad is not None:
            return f"SM shares are percentages in [1, 100], got {bad}"
        if self.partitioner is not None:  # it plans on a grid; a split off it is not one it can hold
            try:
                self.partitioner.check((shares["prefill"], shares["decode"]))
            except UserError as e:
                return f"this server moves the split itself (--dynamic): {e}"
        busy = [r for r, v in shares.items() if r in self.switcher.active and self.supervisor.workers[r].sm_percent != v]
        if busy:
            return f"the {busy[0]} worker is already switching; try again when it is done"
        for role, share in shares.items():
            self.switcher.request(role, share, reason)
        return None

    def serving(self) -> None:
        """The server is up: a dynamic one keeps standbys ready, for switches will come."""
        if self.partitioner is not None:
            self.switcher.keep_standbys = True
            for role in self.supervisor.workers:
                self.supervisor.ensure_standby(role)

    def stats(self) -> dict:
        workers = self.supervisor.workers
        return {"mode": "unified" if self.unified else "semi-pd",
                "prefill_sm": workers.get("prefill", workers.get("unified")).sm_percent,
                "decode_sm": workers.get("decode", workers.get("unified")).sm_percent,
                "mps": self.mode.mps, "dynamic": self.partitioner is not None,
                "primed_deaths": dict(self.switcher.prime_deaths),
                "switching": sorted(self.switcher.active), "history": self.switcher.history,
                "decisions": list(self.decisions)}
