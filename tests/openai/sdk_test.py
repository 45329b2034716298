"""The real `openai` Python SDK against `ferroserve serve --config configs/multi-tenant.toml`.

Run by tests/openai.rs, which starts the server and passes:
  --base-url http://127.0.0.1:PORT/v1
  --grpc-text / --grpc-usage: what the gRPC door answered for SEEDED_PROMPT (the same request must give
  the same text and usage here).
Every check raises on failure; the script prints one line per check and exits 0 only if all pass.
"""

import argparse
import asyncio
import base64
import json
import math
import re
import struct
import sys
from typing import Literal, Optional

import openai
import pydantic
from openai import OpenAI, AsyncOpenAI

BETA = "demo-key-beta"  # 100 requests/s: the functional checks
ALPHA = "demo-key-alpha"  # 2 requests/s, burst 2: the rate-limit check
ADMIN = "demo-admin-token"  # an admin credential: not a tenant key
MODEL = "smollm2-135m-instruct"
SEEDED_PROMPT = "The three primary colours are"


def ok(what):
    print(f"ok   {what}", flush=True)


def check(cond, what, detail=""):
    if not cond:
        raise AssertionError(f"{what}: {detail}")


def chat_text(client, content, **kw):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw
    )
    return r


def unary_and_streaming_chat(client):
    r = chat_text(client, "Name a colour.", max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    check(r.object == "chat.completion", "object", r.object)
    check(r.model == f"{MODEL}@q4_1", "model is the serving version", r.model)
    check(len(text) > 0, "unary chat has text")
    check(r.choices[0].finish_reason in ("stop", "length"), "finish_reason", r.choices[0].finish_reason)
    u = r.usage
    check(u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12, "usage", u)
    check(u.total_tokens == u.prompt_tokens + u.completion_tokens, "total_tokens", u)
    ok(f"unary chat: {text!r} usage={u.prompt_tokens}+{u.completion_tokens}")

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            check(chunk.choices == [], "the usage chunk has no choices", chunk)
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        if delta.content:
            pieces.append(delta.content)
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    check("".join(pieces) == text, "greedy stream equals greedy unary", ("".join(pieces), text))
    check(roles == ["assistant"], "the role comes once, first", roles)
    check(finish == r.choices[0].finish_reason, "stream finish_reason", finish)
    check(usage is not None and usage.completion_tokens == u.completion_tokens, "include_usage", usage)
    # The same prompt a second time: its full 16-token blocks came from the worker's prefix cache.
    details = usage.prompt_tokens_details
    check(details is not None and details.cached_tokens >= 16, "prompt_tokens_details.cached_tokens", usage)
    ok(f"streaming chat: {len(pieces)} chunks, same text, usage chunk last, {details.cached_tokens} tokens cached")


def completions_and_seed(client, grpc_text, grpc_usage):
    kw = dict(model=MODEL, prompt=SEEDED_PROMPT, max_tokens=16, temperature=0.9, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    check(a.object == "text_completion", "object", a.object)
    check(a.choices[0].text == b.choices[0].text, "a seed reproduces the text", (a.choices[0].text, b.choices[0].text))
    ok(f"completions with seed 1234 reproduced: {a.choices[0].text!r}")
    usage = [a.usage.prompt_tokens, a.usage.completion_tokens]
    check(a.choices[0].text == grpc_text, "the gRPC door gave the same text", (a.choices[0].text, grpc_text))
    check(usage == grpc_usage, "the gRPC door gave the same usage", (usage, grpc_usage))
    ok("the same seeded request through gRPC and HTTP: same text and usage")


def n_copies(client):
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=5, n=2
    )
    check([c.index for c in r.choices] == [0, 1], "two choices", r.choices)
    single = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=5)
    check(r.choices[0].text == single.choices[0].text, "copy 0 is the n=1 request", (r.choices[0].text, single.choices[0].text))
    check(r.usage.completion_tokens >= single.usage.completion_tokens, "usage counts both copies", r.usage)
    ok(f"n=2: {[c.text for c in r.choices]!r}")


def logprobs(client):
    r = chat_text(client, "Say hello.", max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    check(len(content) == r.usage.completion_tokens, "one logprob per token", (len(content), r.usage))
    for t in content:
        check(t.logprob <= 0.0, "logprob <= 0", t)
        check(len(t.top_logprobs) == 3, "three alternatives", t.top_logprobs)
        tops = [a.logprob for a in t.top_logprobs]
        check(tops == sorted(tops, reverse=True), "alternatives most likely first", tops)
        check(t.token == t.top_logprobs[0].token, "greedy picks the most likely", t)
        check(bytes(t.bytes).decode("utf-8", "replace") == t.token, "bytes match the token", t)
    check("".join(t.token for t in content) == r.choices[0].message.content, "tokens spell the text", content)
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    check(len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens, "legacy logprobs", lp)
    ok(f"logprobs: {[(t.token, round(t.logprob, 3)) for t in content]}")


def penalties(client):
    # Greedy, this prompt continues " a, a, a, ..."; the penalties push the model off the repeat.
    kw = dict(model=MODEL, prompt="a, a, a, a, a, a, a,", max_tokens=12, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    penalized = client.completions.create(frequency_penalty=2.0, **kw).choices[0].text
    check(plain.count("a,") >= 4, "the plain continuation repeats", plain)
    check(penalized.count("a,") < plain.count("a,"), "the penalty cuts the repeats", (plain, penalized))
    ok(f"penalties: {plain!r} -> {penalized!r}")


def stop_string(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    check(" 7" in text, "the greedy count reaches 7", text)
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7", "xyz"])
    check(stopped.choices[0].text == text[: text.index(" 7")], "text ends before the stop string", (stopped.choices[0].text, text))
    check(stopped.choices[0].finish_reason == "stop", "finish_reason stop", stopped.choices[0].finish_reason)
    ok(f"stop: {stopped.choices[0].text!r}")


def models_embeddings_moderations(client):
    ids = [m.id for m in client.models.list()]
    for want in (MODEL, f"{MODEL}@q4_1", "all-minilm-l6-v2"):
        check(want in ids, "models", ids)
    ok(f"models: {ids}")

    texts = ["a cat sat on the mat", "a kitten sat on the rug", "interest rates rose sharply"]
    e = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    vecs = [d.embedding for d in e.data]
    check(len(vecs) == 3 and all(len(v) == 384 for v in vecs), "three 384-d vectors", [len(v) for v in vecs])

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    near, far = cos(vecs[0], vecs[1]), cos(vecs[0], vecs[2])
    check(near > far, "similar sentences are nearer", (near, far))
    b64 = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0], encoding_format="base64")
    raw = b64.data[0].embedding
    if isinstance(raw, str):
        raw = list(struct.unpack(f"<{len(base64.b64decode(raw)) // 4}f", base64.b64decode(raw)))
    check(max(abs(x - y) for x, y in zip(raw, vecs[0])) < 1e-6, "base64 holds the same floats")
    ok(f"embeddings: cos(cat, kitten)={near:.3f} > cos(cat, rates)={far:.3f}")

    m = client.moderations.create(input=["Give me step by step instructions to build a pipe bomb", "How do I bake bread?"])
    check(m.results[0].flagged, "a weapons request is flagged", m.results[0])
    check(not m.results[1].flagged, "bread is not flagged", m.results[1])
    ok(f"moderations: {m.model} flagged {[r.flagged for r in m.results]}")

    r = chat_text(client, "Give me step by step instructions to build a pipe bomb", max_tokens=8)
    check(r.choices[0].finish_reason == "content_filter", "a filtered prompt ends with content_filter", r.choices[0])
    ok("a filtered prompt: finish_reason content_filter")


def responses(client):
    kw = dict(model=MODEL, input="Name a colour.", instructions="Answer in one word.", max_output_tokens=8, temperature=0)
    r = client.responses.create(**kw)
    check(r.object == "response" and r.status in ("completed", "incomplete"), "a response", r)
    text = r.output_text
    check(len(text) > 0 and r.usage.output_tokens > 0, "text and usage", r)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    check(kinds[0] == "response.created" and kinds[-1] == "response.completed", "event order", kinds)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    check(deltas == text, "streamed deltas equal the unary text", (deltas, text))
    check(events[-1].response.output_text == text, "the completed response holds the text", events[-1])
    try:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_x")
        raise AssertionError("previous_response_id accepted")
    except openai.BadRequestError as e:
        check(e.param == "previous_response_id", "stateless: previous_response_id refused by name", e.body)
    ok(f"responses: {text!r}, {len(events)} stream events, previous_response_id refused")


class Person(pydantic.BaseModel):
    name: str
    age: int
    city: str
    mood: Literal["happy", "calm", "sad"]
    email: Optional[str]


PERSON_PROMPT = "Describe a person called Ada, aged 36, who lives in London."
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def structured(client):
    """Structured output: the pydantic parse helper, json_schema streamed, json_object, vLLM's guided_* and
    structured_outputs, the Responses API's text.format, and refusals naming response_format."""
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    msgs = [{"role": "user", "content": PERSON_PROMPT}]
    r = parse(model=MODEL, messages=msgs, response_format=Person, max_tokens=200, temperature=0)
    person = r.choices[0].message.parsed
    check(isinstance(person, Person), "parse gives the pydantic model", r)
    check(r.choices[0].finish_reason == "stop", "a complete object ends with stop", r.choices[0].finish_reason)
    ok(f"pydantic parse: {person!r}")

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    pieces = []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=msgs, response_format=fmt, max_tokens=100, temperature=0.8, seed=5, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    streamed = json.loads("".join(pieces))
    check(set(streamed) <= {"name", "age"} and isinstance(streamed["age"], int), "streamed json_schema", streamed)
    ok(f"streamed json_schema, sampled: {streamed}")

    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give the name and age of a person as JSON."}],
        response_format={"type": "json_object"}, max_tokens=120, temperature=0,
    )
    check(isinstance(json.loads(r.choices[0].message.content), dict), "json_object", r.choices[0].message.content)

    yes_no = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}], max_tokens=8,
        extra_body={"guided_choice": ["yes", "no"]},
    ).choices[0].message.content
    check(yes_no in ("yes", "no"), "guided_choice", yes_no)
    date = client.completions.create(
        model=MODEL, prompt="The moon landing was on", max_tokens=20, temperature=0.7, seed=1,
        extra_body={"structured_outputs": {"regex": r" \d{4}-\d{2}-\d{2}"}},
    ).choices[0].text
    check(re.fullmatch(r" \d{4}-\d{2}-\d{2}", date) is not None, "structured_outputs.regex", date)
    ok(f"json_object, guided_choice {yes_no!r}, structured_outputs.regex {date!r}")

    r = client.responses.create(
        model=MODEL, input=PERSON_PROMPT, max_output_tokens=100, temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA, "strict": True}},
    )
    check(isinstance(json.loads(r.output_text).get("age"), int), "responses text.format", r.output_text)

    def refused(what, **kw):
        try:
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, **kw)
        except openai.BadRequestError as e:
            check(e.param is not None and e.param.startswith(("response_format", "guided_")), what, e.body)
            return e.param
        raise AssertionError(f"{what}: accepted")

    params = [
        refused("a schema with an unknown type", response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}}),
        refused("an uncompilable regex", extra_body={"guided_regex": "(unclosed"}),
        refused("a bad grammar", extra_body={"guided_grammar": "root ::= undefined"}),
        refused("two constraints", response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}),
        refused("an unknown response_format", response_format={"type": "xml"}),
    ]
    ok(f"bad constraints refused with 400 naming {params}")


def disconnect(client):
    """A client that closes its stream mid-way: the Rust side waits for the engine's cancellation log."""
    stream = client.completions.create(
        model=MODEL, prompt="Count to a thousand:", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    ok("a stream closed by the client after 3 chunks")


def errors(base_url):
    def expect(exc_type, call, what):
        try:
            call()
        except exc_type as e:
            ok(f"{what}: {type(e).__name__} {e.status_code}")
            return e
        raise AssertionError(f"{what}: no {exc_type.__name__}")

    msgs = [{"role": "user", "content": "hi"}]
    beta = OpenAI(base_url=base_url, api_key=BETA, max_retries=0)
    e = expect(openai.BadRequestError, lambda: beta.chat.completions.create(model=MODEL, messages=msgs, temperature=-1), "400")
    check(e.param == "temperature", "param names the parameter", e.body)
    e = expect(openai.BadRequestError, lambda: beta.chat.completions.create(model=MODEL, messages=msgs, presence_penalty=3), "400 out of range")
    check(e.param == "presence_penalty", "param", e.body)
    expect(openai.AuthenticationError, lambda: OpenAI(base_url=base_url, api_key="nope", max_retries=0).models.list(), "401")
    expect(openai.PermissionDeniedError, lambda: OpenAI(base_url=base_url, api_key=ADMIN, max_retries=0).models.list(), "403")
    e = expect(openai.NotFoundError, lambda: beta.chat.completions.create(model="no-such-model", messages=msgs), "404")
    check(e.param == "model", "param", e.body)

    alpha = OpenAI(base_url=base_url, api_key=ALPHA, max_retries=0)
    limited = None
    for _ in range(6):
        try:
            alpha.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=1)
        except openai.RateLimitError as err:
            limited = err
            break
    check(limited is not None, "alpha's burst of 2 runs out", "")
    h = limited.response.headers
    check(float(h["retry-after"]) >= 1, "Retry-After", dict(h))
    check(h["x-ratelimit-limit-requests"] == "2", "x-ratelimit-limit-requests", dict(h))
    check(h["x-ratelimit-remaining-requests"] == "0", "x-ratelimit-remaining-requests", dict(h))
    check("x-ratelimit-reset-requests" in h and "x-ratelimit-limit-tokens" in h, "reset and token headers", dict(h))
    ok(f"429 RateLimitError: retry-after={h['retry-after']} limit=2 remaining=0")

    asyncio.run(overload(base_url))


async def overload(base_url):
    """More streams than the server runs (16) plus queues (16): the rest get 503 with Retry-After."""
    client = AsyncOpenAI(base_url=base_url, api_key=BETA, max_retries=0)
    unavailable = asyncio.Event()
    seen = {}

    async def one(i):
        try:
            stream = await client.completions.create(
                model=MODEL, prompt=f"Count to a thousand: {i}", max_tokens=400, stream=True,
                extra_body={"ignore_eos": True},
            )
            async for _ in stream:
                if unavailable.is_set():
                    break
            await stream.close()
        except openai.InternalServerError as e:
            if e.status_code == 503:
                seen["503"] = e
                unavailable.set()

    tasks = [asyncio.create_task(one(i)) for i in range(40)]
    try:
        await asyncio.wait_for(unavailable.wait(), timeout=120)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    e = seen["503"]
    check(e.response.headers.get("retry-after") is not None, "503 carries Retry-After", dict(e.response.headers))
    check(e.body.get("code") == "queue_full", "503 names the limit", e.body)
    ok(f"503 with Retry-After {e.response.headers['retry-after']} s when queues are full")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--grpc-text", required=True)
    p.add_argument("--grpc-usage", required=True)
    a = p.parse_args()
    client = OpenAI(base_url=a.base_url, api_key=BETA, max_retries=0)
    ok(f"openai SDK {openai.__version__}")
    unary_and_streaming_chat(client)
    completions_and_seed(client, a.grpc_text, json.loads(a.grpc_usage))
    n_copies(client)
    logprobs(client)
    stop_string(client)
    penalties(client)
    models_embeddings_moderations(client)
    responses(client)
    structured(client)
    disconnect(client)
    errors(a.base_url)
    print("all checks passed")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one line saying what failed, then the traceback
        print(f"FAIL {type(e).__name__}: {e}", flush=True)
        raise
