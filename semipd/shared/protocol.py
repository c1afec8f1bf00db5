"""Every message that crosses a process boundary, and how to send and read one.

A message is a dataclass; semipd.shared.serializer puts it on the wire and checks every field of
what it reads back. encode, peek and ProtocolError are the serializer's; decode reads any message
defined here.
"""

from dataclasses import dataclass, field

from semipd.shared import serializer
from semipd.shared.serializer import ProtocolError, encode, peek

# Also set as ZMQ_MAXMSGSIZE on every receiving socket. Clients and the content monitor:
MAX_MESSAGE_BYTES = 16 << 20
# The controller and its own workers, over a private socket: a switch hands over every sequence a
# worker holds, token ids and all (256 of 32k tokens take some 40 MB).
MAX_WORKER_MESSAGE_BYTES = 1 << 30


# ---- client <-> controller -------------------------------------------------------------

@dataclass
class GenerateRequest:
    request_id: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    params: dict = field(default_factory=dict)   # SamplingParams fields
    moderate: bool = False                       # ask the content monitor to watch this request
    # A chat ({"role", "content"} dicts) that the controller renders with the model's chat
    # template; then prompt and prompt_ids are None.
    messages: list[dict] | None = None


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class HealthRequest:
    request_id: str


@dataclass
class StatsRequest:
    request_id: str


@dataclass
class PartitionRequest:
    """Ask for a new SM split (percent of the GPU's SMs for each phase)."""
    request_id: str
    prefill_sm: int
    decode_sm: int


@dataclass
class Delta:
    """New output of one request: text safe to show and the token ids behind it."""
    request_id: str
    text: str
    token_ids: list[int]


@dataclass
class Final:
    """The last message of every request stream, exactly once. It carries no output: the
    stream's Deltas hold all of it, so they add up to the text."""
    request_id: str
    finish_reason: str                 # stop | length | abort | error | content_filter
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between successive tokens
    error: str | None = None
    # whose the error is: invalid (the request's), unavailable (the server stops or lacks a
    # part it needs now), internal (it failed serving it); what an HTTP status is made of
    error_kind: str | None = None
    verdict: dict | None = None        # content monitor's stop decision (token index, score)


@dataclass
class Reply:
    """Answer to health and stats requests, and to messages that could not be read."""
    request_id: str
    ok: bool
    data: dict = field(default_factory=dict)
    error: str | None = None


# ---- controller <-> workers ------------------------------------------------------------

@dataclass
class WorkerHello:
    role: str          # prefill | decode
    pid: int


@dataclass
class WorkerInit:
    """What a worker needs to map the controller's memory and start."""
    model: str
    device: str
    dtype: str
    weights: dict      # SharedArena handle; the layout follows from the model (loader.weight_layout)
    k_pool: dict       # SharedArena handle
    v_pool: dict
    kv_shape: list[int]
    allocator: str     # PageAllocator segment name
    page_size: int
    max_model_len: int
    max_num_seqs: int
    max_batched_tokens: int
    cuda_graphs: bool
    sm_percent: int | None = None  # MPS quota, set before this process creates its CUDA context
    tp_rank: int = 0               # this process's rank in its role's tensor-parallel group
    tp_size: int = 1               # 1: no process group (the handles above are the whole model's)
    tp_init: str = ""              # the group's rendezvous (a file:// init method) when tp_size > 1


@dataclass
class WorkerReady:
    role: str
    pid: int
    prepare_parts_s: dict = field(default_factory=dict)  # part of its preparation -> seconds


@dataclass
class SeqState:
    """A sequence as handed between processes: metadata only, the K/V stays in the pool.
    token_ids are the tokens known; a decode worker that hands a sequence over from a step still
    in flight counts its newest token in num_in_flight instead (shared/sequence.py)."""
    seq_id: int
    token_ids: list[int]
    num_prompt: int
    params: dict
    seed: int
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    num_in_flight: int = 0


@dataclass
class RunSeqs:
    """Controller -> worker: sequences to prefill (from scratch or after preemption) or decode."""
    seqs: list[SeqState]


@dataclass
class PrefillDone:
    """Prefill -> controller: prompts computed and first tokens sampled (K/V writes finished)."""
    seqs: list[SeqState]
    finished: list[str | None]         # finish reason if the first token already ended it


@dataclass
class DecodeStep:
    """Decode -> controller: one batched message per step. Controller -> decode: a retiring
    predecessor's last step (HandedOver.last_step_follows)."""
    seq_ids: list[int]
    tokens: list[int]
    finished: list[str | None]


@dataclass
class StepTimes:
    """Worker -> controller, about once a second while it works: its steps since the last report."""
    steps: int
    seqs: int                          # sequences over those steps (the mean batch is seqs / steps)
    busy_s: float                      # wall time in steps: scheduling to sending the results
    gpu_s: float | None                # forward passes and sampling on the GPU (CUDA events); None on CPU
    span_s: float                      # wall time the report covers


@dataclass
class Preempted:
    """Decode -> controller: pages freed, recompute these through prefill."""
    seqs: list[SeqState]


@dataclass
class AbortSeqs:
    """Controller -> worker: drop these sequences and free their pages (idempotent)."""
    seq_ids: list[int]


@dataclass
class Handover:
    """Controller -> worker being replaced: at the next step boundary, send HandedOver and exit."""


@dataclass
class HandedOver:
    """Worker -> controller: everything it held (pages stay allocated) for its successor. With
    last_step_follows, the worker had a step in flight: the sequences in it have their newest
    token in flight (SeqState.num_in_flight), and that step's DecodeStep, the worker's last
    message, follows. The controller passes it on to the successor, which holds those sequences
    until then (DecodeScheduler.inherited, released by inherit)."""
    seqs: list[SeqState]
    last_step_follows: bool = False


@dataclass
class Shutdown:
    pass


# ---- controller <-> content monitor (services/scm) ---------------------------------------

@dataclass
class ScmHello:
    """Controller -> monitor on (re)connecting: drop this controller's streams, answer ScmReady."""
    pid: int


@dataclass
class ScmReady:
    tokenizer: str       # fingerprint: the controller sends token ids when it equals its own
    threshold: float
    k: int
    max_streams: int


@dataclass
class ScmOpen:
    """Watch a response. The monitor reads `prompt + "\n\n"` then the response, as text
    (prompt) or as the served model's token ids (prompt_ids) when both share a tokenizer."""
    stream_id: int
    prompt: str | None = None
    prompt_ids: list[int] | None = None


@dataclass
class ScmAppend:
    """More of a stream's response, in the form its ScmOpen chose."""
    stream_id: int
    upto: int                          # served response tokens covered so far
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    last: bool = False                 # the response is complete: score the rest, then drop it


@dataclass
class ScmBatch:
    """Controller -> monitor: everything new from one turn of the controller's loop."""
    opens: list[ScmOpen] = field(default_factory=list)
    appends: list[ScmAppend] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)

    def encoded(self, max_bytes: int = MAX_MESSAGE_BYTES) -> list[bytes]:
        """This batch as one message, or as several of at most max_bytes each (a burst of long
        prompts) that the monitor applies in turn to the same effect: the items keep their
        order, opens before appends before closes, as within one batch."""
        data = encode(self)
        if len(data) <= max_bytes:
            return [data]
        items = [("opens", x) for x in self.opens] + [("appends", x) for x in self.appends] + \
                [("closes", x) for x in self.closes]
        if len(items) == 1:
            return [data]
        halves = ScmBatch(), ScmBatch()
        for i, (kind, item) in enumerate(items):
            getattr(halves[i >= len(items) // 2], kind).append(item)
        return halves[0].encoded(max_bytes) + halves[1].encoded(max_bytes)


@dataclass
class ScmScored:
    """Monitor -> controller, one per step: the streams the step advanced."""
    stream_ids: list[int]
    upto: list[int]                    # served response tokens now scored
    verdicts: list[dict | None]        # the rule fired (token_index, score, ...): stream dropped
    errors: list[str | None]           # the monitor gave up on the stream: stream dropped


MESSAGES = {cls.__name__: cls for cls in (
    GenerateRequest, AbortRequest, HealthRequest, StatsRequest, PartitionRequest, Delta, Final, Reply, WorkerHello,
    WorkerInit, WorkerReady, SeqState, RunSeqs, PrefillDone, DecodeStep, StepTimes, Preempted, AbortSeqs, Handover, HandedOver,
    Shutdown,
    ScmHello, ScmReady, ScmOpen, ScmAppend, ScmBatch, ScmScored)}


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES):
    """The message in data, any of those above; max_bytes bounds what a peer may send."""
    return serializer.decode(data, MESSAGES, max_bytes)
