"""`semipd bench`: load a running server with Poisson arrivals and report latency percentiles.

Arrivals: exponential gaps with mean 1/--rate (a Gamma process with burstiness 1); --rate inf
sends every request at once. Every request sets ignore_eos and max_tokens to its planned output
length, so outputs are exactly as long as planned.

A --workload of phases (phases.py) sends phases back to back in one run, each with its own rate
and length means, to show a server under a load that shifts; presets name a shape (sharegpt, the
default, and prompt-heavy) or a schedule of phases (shifting). Per-phase figures come with the
overall ones.

Lengths come from one of two sources, both clipped to [4, 2048] input and [4, 1024] output tokens:
- --dataset FILE in ShareGPT format: the input is a conversation's first human turn, the output
  its first gpt reply after it. The client has no tokenizer, so each length is len(text) / 4
  tokens, the usual four characters per token of English text under BPE vocabularies.
- otherwise independent lognormal input and output lengths, sigma 1.0, around the workload's
  means; the default approximates ShareGPT, with means 251 input tokens (ShareGPT as the semi-PD
  paper, arXiv 2504.19867, reports it) and 203 output tokens (vLLM's ShareGPT run in
  github.com/vllm-project/vllm/pull/18566 generated 203,068 tokens for 1,000 requests). Not a
  fit: real ShareGPT lengths are more skewed and correlated. The lognormal's location is solved so
  the means hold after clipping.
Prompts are random token ids in [0, 256) of the planned length, not text, so that no tokenizer
changes their length: ids below 256 exist in every preset's byte vocabulary and in real ones. The
shared-prefix and multi-turn workloads put shared prefixes before them (prompts.py), to measure a
prefix cache.

Per request, at the client: TTFT (send to first token), E2E (send to Final), TPOT = (E2E - TTFT) /
(output tokens - 1) and ITL, every gap between successive tokens (a message carrying k tokens
splits its wait into k equal gaps). SLO attainment is the fraction of all requests, failed ones
counting as misses, with TTFT <= --ttft-slo and TPOT <= --tpot-slo; goodput is their rate.
Whether the server kept up with the rate, or only absorbed a burst as long as the run, shows in
the backlog trend (`backlog_trend`): a queue that grows for as long as requests arrive can leave
attainment high over a short run.

Requests go to a semipd server through the SDK, or with --backend openai to any OpenAI-compatible
server over HTTP (backends.py, openai_backend.py). Sweeps over rates and serving modes, with plots,
are in sweep.py; they reuse run_load.
"""
