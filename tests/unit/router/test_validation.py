import pytest

from common.errors import InvalidArgument, ModelNotFound
from router.request import ChatMessage, Request, SamplingSpec
from router.validation import Limits, check_prompt_tokens, check_request

LIMITS = Limits(model_name="m", max_model_len=100, max_tokens_limit=50, vocab_size=1000)


def req(**fields) -> Request:
    sampling = fields.pop("sampling", SamplingSpec(max_tokens=10))
    fields.setdefault("prompt", "hi")
    return Request(request_id="r", sampling=sampling, **fields)


def test_a_good_request_passes():
    check_request(req(), LIMITS)
    check_request(req(model="m", sampling=SamplingSpec(max_tokens=50, temperature=0, top_p=1, top_k=5)), LIMITS)
    check_prompt_tokens(list(range(99)), LIMITS)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": None}, "the request has no input"),
        ({"prompt": None, "chat": ()}, "chat.messages is empty"),
        ({"prompt": None, "chat": (ChatMessage("robot", "x"),)}, r"chat.messages\[0\].role must be one of"),
        ({"prompt": None, "chat": (ChatMessage("user", "\udfff"),)}, r"chat.messages\[0\].content is not valid UTF-8"),
        ({"prompt": None, "prompt_token_ids": ()}, "prompt_token_ids.ids is empty"),
        ({"sampling": SamplingSpec(max_tokens=0)}, "sampling.max_tokens must be between 1 and 50, got 0"),
        ({"sampling": SamplingSpec(max_tokens=51)}, "sampling.max_tokens must be between 1 and 50, got 51"),
        ({"sampling": SamplingSpec(max_tokens=5, temperature=-0.5)}, "sampling.temperature must be between"),
        ({"sampling": SamplingSpec(max_tokens=5, temperature=float("nan"))}, "sampling.temperature must be between"),
        ({"sampling": SamplingSpec(max_tokens=5, temperature=2.5)}, "sampling.temperature must be between 0 and 2"),
        ({"sampling": SamplingSpec(max_tokens=5, seed=2**64)}, "sampling.seed must be between"),
        ({"sampling": SamplingSpec(max_tokens=5, seed=-(2**63) - 1)}, "sampling.seed must be between"),
        ({"prompt": "a\ud800"}, "prompt is not valid UTF-8: a lone surrogate at character 1"),
        ({"sampling": SamplingSpec(max_tokens=5, top_p=0.0)}, r"sampling.top_p must be in \(0, 1\], got 0.0"),
        ({"sampling": SamplingSpec(max_tokens=5, top_p=1.5)}, r"sampling.top_p must be in \(0, 1\], got 1.5"),
        ({"sampling": SamplingSpec(max_tokens=5, stop_token_ids=(1000,))}, r"token ids must be in \[0, 1000\)"),
    ],
)
def test_invalid_fields_are_named_with_their_range(fields, message):
    with pytest.raises(InvalidArgument, match=message) as e:
        check_request(req(**fields), LIMITS)
    assert e.value.status == "INVALID_ARGUMENT"


def test_unknown_model_is_not_found():
    with pytest.raises(ModelNotFound, match="model 'gpt-9' is not served here; served models: \\['m'\\]") as e:
        check_request(req(model="gpt-9"), LIMITS)
    assert e.value.status == "NOT_FOUND"


def test_prompt_at_max_model_len_is_rejected_with_the_limit():
    with pytest.raises(InvalidArgument, match="prompt is 100 tokens long; this model accepts at most 99"):
        check_prompt_tokens(list(range(100)), LIMITS)


def test_prompt_token_ids_outside_the_vocabulary_are_rejected():
    with pytest.raises(InvalidArgument, match="prompt_token_ids.ids holds token id 1000"):
        check_prompt_tokens([1, 1000], LIMITS)


def test_a_key_in_flight_is_refused_unless_the_request_resumes_it():
    from common.errors import AlreadyExists
    from router.validation import check_key_free

    running = {"job-1"}
    with pytest.raises(AlreadyExists, match="request_id 'job-1' is already in flight") as refused:
        check_key_free("job-1", running, resuming=False)
    assert refused.value.status == "ALREADY_EXISTS"
    check_key_free("job-1", running, resuming=True)  # a resume takes the stream over
    check_key_free("job-2", running, resuming=False)
