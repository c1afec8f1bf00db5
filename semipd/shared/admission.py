"""What every server checks before it accepts a request: a request that could never be served
is refused at once with one clear message."""

from semipd.shared.errors import UserError
from semipd.shared.kv_cache import pages_for
from semipd.shared.sampling_params import SamplingParams


def check_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                  page_size: int, num_pages: int) -> None:
    """Raise UserError if the request can never be served."""
    params.validate(vocab_size)
    if not prompt_ids:
        raise UserError("prompt is empty")
    bad = next((t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int)
                or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise UserError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab_size})")
    total = len(prompt_ids) + params.max_tokens
    if total > max_model_len:
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                        f"exceeds the context length {max_model_len}")
    if pages_for(total, page_size) > num_pages:
        raise UserError(f"request needs {pages_for(total, page_size)} KV pages; the pool has {num_pages}")
