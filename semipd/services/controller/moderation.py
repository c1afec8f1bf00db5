"""The controller's side of content moderation: which requests the streaming content monitor
(`semipd scm`) watches, and what its answers do to their streams.

Which requests: `--moderate all`, or only those that ask (`moderate=True`, `semipd complete
--moderate`); a request that asks on a server without `--scm` is refused.

What the monitor is sent, and the handshake: monitor_link.py. Progress (ScmScored) is counted
in served tokens.

When tokens reach the client (`--scm-show`):
- scored (default): a token's delta is held until the monitor has scored it, so nothing past the
  stop point is ever shown; the latency cost is the verdict lag (added to TTFT; TPOT changes
  only if the monitor falls behind). A finished request's Final waits for the last scores.
- immediate: deltas go out at once (lowest latency); when the monitor fires, the client has
  already seen the tokens generated during the verdict lag.

A verdict aborts the request at once (the worker frees its pages) and ends it with
finish_reason `content_filter` and the verdict in the Final; the tokens from the stop point on
are never sent (in scored mode).

Failure (`--scm-failure`): the monitor counts as lost when its connection drops (a socket
event), when a send finds no connection (the socket queues only to a connected peer), when it
refuses a stream, or when sent tokens wait longer than `--scm-timeout` for a score. `open` lets
the affected requests go on unmonitored (held deltas are released, the Final's verdict says
monitored: false); `closed` ends them with an error. While the monitor is lost, new monitored
requests get the same policy at once, and the controller says hello until a monitor answers.

Verdict lag: for every scored token, the number of tokens the request generated after it before
its score arrived; per request in the Final's verdict, for all requests in stats.
"""

import collections
import time
from dataclasses import dataclass, field

import zmq

from semipd.services.controller.monitor_link import MonitorLink, warn
from semipd.services.controller.requests import Request
from semipd.shared import protocol
from semipd.shared.errors import UserError
from semipd.shared.runtime import default_monitor_address


@dataclass
class ModerationConfig:
    address: str
    scope: str = "opt-in"          # all | opt-in
    failure: str = "open"          # open: go on unmonitored | closed: end with an error
    show: str = "scored"           # scored: deltas wait for their score | immediate
    timeout_s: float = 5.0


def add_moderation_args(p) -> None:
    p.add_argument("--scm", metavar="ADDR", nargs="?", const=default_monitor_address(), default=None,
                   help="use the content monitor at ADDR (without ADDR: `semipd scm`'s default, %(const)s)")
    p.add_argument("--moderate", choices=["all", "opt-in"], default="opt-in",
                   help="monitor every request, or only those that ask (default %(default)s)")
    p.add_argument("--scm-failure", choices=["open", "closed"], default="open",
                   help="monitor down or too slow: continue unmonitored (open) or end with an error")
    p.add_argument("--scm-show", choices=["scored", "immediate"], default="scored",
                   help="send a token once the monitor has scored it, or at once (lower latency)")
    p.add_argument("--scm-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="longest wait for a score before the failure policy applies")


def moderation_config(args) -> ModerationConfig | None:
    if args.scm is None:
        if args.moderate == "all":
            raise UserError("--moderate all needs a content monitor: give --scm ADDR")
        return None
    if not args.scm.startswith(("ipc://", "tcp://")):
        raise UserError(f"--scm must be an ipc:// or tcp:// address, got {args.scm!r}")
    if not args.scm_timeout > 0:
        raise UserError(f"--scm-timeout must be positive, got {args.scm_timeout}")
    return ModerationConfig(args.scm, args.moderate, args.scm_failure, args.scm_show, args.scm_timeout)


@dataclass
class Watch:
    """A monitored request."""
    req: Request
    ids: bool                          # its output goes to the monitor as token ids (else text)
    sent: int = 0                      # served tokens sent to the monitor
    scored: int = 0                    # of those, scored
    shown: int = 0                     # tokens sent to the client
    held: collections.deque = field(default_factory=collections.deque)  # deltas awaiting scores
    final: protocol.Final | None = None  # the request has ended: its Final awaits the last scores
    waiting_since: float | None = None   # since when sent tokens wait for a score
    lag_sum: int = 0
    lag_max: int = 0


class Moderation:
    def __init__(self, config: ModerationConfig, ctx: zmq.Context, tokenizer, send_client, abort, name: str):
        self.config, self.tokenizer = config, tokenizer
        self._send_client, self._abort = send_client, abort  # the controller's
        self.link = MonitorLink(ctx, config.address, tokenizer, name)
        self.watches: dict[int, Watch] = {}
        self.unmonitored: dict[int, str] = {}  # request seq_id -> why it went on unmonitored
        self.counts = collections.Counter()
        self.lags = collections.Counter()

    # ---- hooks the controller calls ------------------------------------------------------

    def open(self, req: Request, prompt: str | None, moderate: bool) -> str | None:
        """Start watching a new request if it is to be monitored; an error to refuse it with."""
        if not (moderate or self.config.scope == "all"):
            return None
        if not self.link.ready:
            return self._unwatched(req.seq_id, "the content monitor is not connected")
        ids = self.link.same_tokenizer
        text = None if ids else (prompt if prompt is not None else self.tokenizer.decode(req.prompt_ids))
        self.link.open(req.seq_id, text, req.prompt_ids if ids else None)
        self.watches[req.seq_id] = Watch(req, ids)
        self.counts["monitored"] += 1
        return None

    def hold(self, req: Request, delta: protocol.Delta) -> bool:
        """Pass new output to the monitor; True if the delta waits for its score."""
        w = self.watches.get(req.seq_id)
        if w is None:
            return False
        self._feed(w, delta.text, delta.token_ids, last=False)
        if self.config.show == "immediate":
            w.shown += len(delta.token_ids)
            return False
        w.held.append(delta)
        return True

    def finish(self, req: Request, final: protocol.Final | None) -> protocol.Final | None:
        """The request has ended (final None: its client is gone). Returns the Final to send
        now, or None when the Final waits for the last scores (scored mode)."""
        reason = self.unmonitored.pop(req.seq_id, None)
        if reason is not None and final is not None:
            final.verdict = {"monitored": False, "error": reason}
        w = self.watches.get(req.seq_id)
        if w is None:
            return final
        if final is not None and final.finish_reason in ("stop", "length") and self.config.show == "scored":
            self._feed(w, "", [], last=True)  # the output came in deltas
            w.final = final
            return None
        del self.watches[req.seq_id]
        self.link.close_stream(req.seq_id)
        if final is not None:
            final.verdict = self._verdict(w)
        return final

    def on_scored(self, msg: protocol.ScmScored) -> None:
        for stream_id, upto, verdict, error in zip(msg.stream_ids, msg.upto, msg.verdicts, msg.errors):
            w = self.watches.get(stream_id)
            if w is None:
                continue  # ended or given up here already
            if verdict is not None and not isinstance(verdict.get("token_index"), int):
                error = f"a verdict without a token_index: {verdict!r}"
            if error is not None:
                self._fail(w, f"the content monitor refused the stream: {error}")
                continue
            self._record(w, upto)
            if verdict is not None:
                self._flag(w, verdict)
            else:
                self._advance(w)

    def tick(self) -> None:
        """End of a loop turn: read the monitor's answers, send what the turn produced, say hello
        while not connected, and apply the failure policy to a monitor that stopped answering."""
        if self.link.disconnected():  # before the messages: a handshake answer follows its connection
            self._lost("the content monitor disconnected")
        for msg in self.link.receive():
            if isinstance(msg, protocol.ScmScored):
                self.on_scored(msg)
        now = time.monotonic()
        if not self.link.ready:
            return self.link.hello(now)
        if any(w.waiting_since is not None and now - w.waiting_since > self.config.timeout_s
               for w in self.watches.values()):
            return self._lost(f"no scores from the content monitor for {self.config.timeout_s:g} s")
        if not self.link.send():
            self._lost("the content monitor is not reachable")

    def health(self) -> str:
        return "ready" if self.link.ready else "connecting"

    def stats(self) -> dict:
        n = sum(self.lags.values())
        lags = sorted(self.lags.items())

        def quantile(q: float) -> int | None:
            seen = 0
            for lag, count in lags:
                seen += count
                if seen >= q * n:
                    return lag
            return None
        return {"address": self.config.address, "status": self.health(), "show": self.config.show,
                "sends": "token ids" if self.link.same_tokenizer else "text", "watching": len(self.watches),
                "monitored": self.counts["monitored"], "flagged": self.counts["flagged"],
                "failures": self.counts["failures"], "scored_tokens": n,
                "lag_tokens": {"mean": sum(k * c for k, c in lags) / n if n else None, "p50": quantile(0.5),
                               "p90": quantile(0.9), "p99": quantile(0.99), "max": lags[-1][0] if lags else None}}

    def close(self) -> None:
        """Streams still waiting for scores end by the failure policy, as if the monitor were lost;
        the monitor is told to drop every stream (best effort: a restart's hello does it too)."""
        for w in list(self.watches.values()):
            self._fail(w, "the server is shutting down")
        self.link.close()

    # ---- inside -------------------------------------------------------------------------

    def _feed(self, w: Watch, text: str, token_ids: list[int], last: bool) -> None:
        w.sent += len(token_ids)
        self.link.append(w.req.seq_id, w.sent, text, token_ids if w.ids else None, last)
        if w.waiting_since is None:
            w.waiting_since = time.monotonic()

    def _record(self, w: Watch, upto: int) -> None:
        """The monitor has scored the first upto tokens: note each one's verdict lag."""
        generated = len(w.req.output_ids)
        for i in range(w.scored, upto):
            lag = generated - 1 - i
            self.lags[lag] += 1
            w.lag_sum += lag
            w.lag_max = max(w.lag_max, lag)
        w.scored = max(w.scored, upto)
        w.waiting_since = None if w.scored >= w.sent else time.monotonic()

    def _advance(self, w: Watch) -> None:
        """Show what is scored; send a finished request's Final once all of it is."""
        self._release(w, w.scored)
        if w.final is not None and w.scored >= w.sent and self.watches.pop(w.req.seq_id, None):
            w.final.verdict = self._verdict(w)
            self._send_client(w.req.client, w.final)

    def _flag(self, w: Watch, verdict: dict) -> None:
        """The monitor fired (and dropped the stream): show what came before the stop point, end
        the request with content_filter."""
        self.watches.pop(w.req.seq_id, None)
        self.counts["flagged"] += 1
        self._release(w, verdict["token_index"])
        info = self._verdict(w) | verdict | {"flagged": True}
        final = w.final or w.req.final("content_filter")
        final.finish_reason, final.verdict = "content_filter", info
        if w.final is not None:  # the worker has already let it go
            self._send_client(w.req.client, final)
        else:
            self._abort(w.req, final)

    def _fail(self, w: Watch, reason: str, tell_monitor: bool = True) -> None:
        """The failure policy for one request."""
        sid = w.req.seq_id
        if self.watches.pop(sid, None) is None:  # ended meanwhile: a failed send to its client
            return                               # aborts all of that client's requests
        if tell_monitor:
            self.link.close_stream(sid)
        self.counts["failures"] += 1
        if self.config.failure == "open":
            if w.final is None:  # noted first: a release whose send fails ends the request (finish)
                self.unmonitored[sid] = reason
            self._release(w, float("inf"))
            if w.final is None:
                return
            final = w.final
        else:
            final = w.final or w.req.final("error")
            final.finish_reason, final.error_kind = "error", "unavailable"
            final.error = f"content monitor unavailable: {reason}"
        final.verdict = {"monitored": False, "error": reason}
        if w.final is not None:
            self._send_client(w.req.client, final)
        else:
            self._abort(w.req, final)

    def _lost(self, reason: str) -> None:
        warn(f"{reason}; applying --scm-failure {self.config.failure} and reconnecting")
        self.link.lost()
        for w in list(self.watches.values()):
            self._fail(w, reason, tell_monitor=False)

    def _unwatched(self, seq_id: int, reason: str) -> str | None:
        if self.config.failure == "closed":
            return f"content monitor unavailable: {reason}"
        self.unmonitored[seq_id] = reason
        self.counts["failures"] += 1
        return None

    def _release(self, w: Watch, upto: float) -> None:
        """Send held deltas of the tokens before index upto."""
        while w.held and w.shown < upto:
            delta = w.held.popleft()
            w.shown += len(delta.token_ids)
            self._send_client(w.req.client, delta)

    def _verdict(self, w: Watch) -> dict:
        return {"monitored": True, "flagged": False, "scored_tokens": w.scored,
                "lag_tokens_mean": w.lag_sum / w.scored if w.scored else None, "lag_tokens_max": w.lag_max}
