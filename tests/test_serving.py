"""Serving: the Assistant on the engine, the OpenAI-compatible API (against real clients on
loopback), parity with evaluation, auth, limits, overload, disconnects, schema fuzzing, and
the generate/chat/serve commands.

Models are the random ``tiny-qwen3`` (decoder-only) and ``tiny-t5`` (encoder-decoder): their
answers are gibberish, but every code path is the real one. Hostile input has its own suite
(test_hostile_http.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medassist import DISCLAIMER
from medassist.cli import serve as serve_cli
from medassist.config import EvalConfig, ServeConfig, TrainConfig
from medassist.data import QAExample
from medassist.errors import MedassistError
from medassist.models import LoadedModel, load_for_inference
from medassist.serving import DEFAULT_SYSTEM_PROMPT, Assistant, RequestError, create_app, sampling
from medassist.streaming import StopText, cut_at_stop

SAMPLE = sampling(max_new_tokens=8, temperature=1.0)
GREEDY = sampling(max_new_tokens=24, temperature=0.0)
QUESTION = "What are the symptoms of asthma?"


# ---------------------------------------------------------------------------------------
# fixtures and helpers
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models are overhead-bound; one thread avoids oversubscribing a busy CPU (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qwen() -> LoadedModel:
    loaded = load_for_inference("tiny-qwen3")
    diversify(loaded.model)  # varied greedy answers (an untouched random model repeats one token)
    return loaded


@pytest.fixture(scope="module")
def assistant(qwen) -> Assistant:
    return Assistant(qwen, max_prompt_tokens=256)


def small_settings(**overrides) -> ServeConfig:
    base = dict(model_name="tiny-qwen3", temperature=1.0, default_max_tokens=8, max_tokens_limit=16,
                max_prompt_tokens=256, max_body_bytes=200_000)
    return ServeConfig(**{**base, **overrides})


def local_client(app) -> TestClient:
    """An in-process client; a keyless loopback server answers only loopback Host names."""
    return TestClient(app, base_url="http://localhost")


@pytest.fixture(scope="module")
def client(qwen) -> TestClient:
    with local_client(create_app(qwen, small_settings())) as c:
        yield c


class _Sleep:
    def __init__(self, owner: "SlowModel") -> None:
        self.owner = owner

    def __call__(self, input_ids, scores, **kwargs):
        self.owner.steps += 1
        time.sleep(self.owner.delay)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class SlowModel:
    """The real model, but every generated token takes ``delay`` seconds more (counted)."""

    def __init__(self, model, delay: float) -> None:
        self._model, self.delay, self.steps = model, delay, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def parameters(self):
        return self._model.parameters()

    def generate(self, **kwargs):
        kwargs["stopping_criteria"].append(_Sleep(self))
        return self._model.generate(**kwargs)


def slow(qwen: LoadedModel, delay: float = 0.05) -> LoadedModel:
    return LoadedModel(SlowModel(qwen.model, delay), qwen.tokenizer, qwen.family, None, "slow-tiny-qwen3")


def chat_body(content: str = QUESTION, **extra) -> dict:
    return {"model": "tiny-qwen3", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(text: str) -> list:
    events = [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def streamed_text(text: str) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(text) if e["choices"])


def diversify(model, std: float = 0.5):
    """Re-draw the weights (seeded) with a wide spread: a random tiny model otherwise repeats
    one token for every prompt, which would make 'the same answer' vacuous."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, std)
    return model.eval()


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------
# the assistant on the engine
def test_assistant_generates_and_counts_tokens(assistant):
    torch.manual_seed(0)
    answer = assistant.generate(QUESTION, settings=SAMPLE)
    prompt = assistant.prompt_ids(QUESTION)
    assert answer.text.strip()
    assert answer.prompt_tokens == len(prompt)
    assert 1 <= answer.completion_tokens <= 8
    assert answer.finish_reason in ("stop", "length")
    # a chat-template model without a run config gets the default medical system prompt
    assert DEFAULT_SYSTEM_PROMPT in assistant.tokenizer.decode(prompt)


def test_stream_pieces_add_up_to_the_answer(assistant):
    torch.manual_seed(1)
    generation = assistant.stream(QUESTION, settings=sampling(max_new_tokens=16, temperature=1.0))
    pieces = list(generation)
    answer = generation.result()
    assert len(pieces) >= 1 and "".join(pieces).strip() == answer.text
    assert answer.completion_tokens <= 16


def test_history_and_system_prompt_shape_the_prompt(assistant):
    with_history = assistant.tokenizer.decode(assistant.prompt_ids("And in children?", [(QUESTION, "Wheezing.")]))
    assert QUESTION in with_history and "Wheezing." in with_history
    assert with_history.index(QUESTION) < with_history.index("And in children?")
    custom = assistant.tokenizer.decode(assistant.prompt_ids(QUESTION, system_prompt="Be brief."))
    assert "Be brief." in custom and DEFAULT_SYSTEM_PROMPT not in custom
    assert DEFAULT_SYSTEM_PROMPT in assistant.tokenizer.decode(assistant.prompt_ids(QUESTION))  # not mutated


def test_sampling_maps_openai_knobs_to_one_rule():
    greedy = sampling(8, temperature=0.0, top_p=0.5)
    assert greedy.do_sample is False and greedy.temperature == 1.0 and greedy.top_p == 1.0
    sampled = sampling(8, temperature=0.7, top_p=0.9, stop=("END",))
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_p == 0.9 and sampled.stop == ["END"]
    with pytest.raises(RequestError, match="max_new_tokens"):
        sampling(0)


def test_stop_string_cuts_the_answer_and_stops_generation(assistant):
    base = assistant.generate(QUESTION, settings=GREEDY)  # greedy: the same text every time
    assert len(base.text) >= 2
    stop = base.text[1:2]
    expected = base.text[: base.text.find(stop)].strip()
    cut = assistant.generate(QUESTION, settings=sampling(24, 0.0, stop=(stop,)))
    assert cut.text == expected
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens <= base.completion_tokens


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab\nc", max_size=30),
    stops=st.lists(st.text(alphabet="ab\nc", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
def test_stop_text_cuts_the_same_however_the_text_is_split(text, stops, cuts):
    # the stream is cut where the whole answer is cut (the engine's one rule: before the
    # earliest stop string), whatever pieces the text arrives in
    expected, _ = cut_at_stop(text, stops)
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    stop_text = StopText(stops)
    out = "".join(stop_text.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + stop_text.flush()
    assert out == expected


def test_length_limits_and_history_trimming(qwen):
    small = Assistant(qwen, max_prompt_tokens=150)
    with pytest.raises(RequestError, match="at most 150"):
        small.stream("word " * 200, settings=SAMPLE)
    history = [(f"question {i} " * 5, f"answer {i} " * 5) for i in range(10)]
    kept = small.fit_history(QUESTION, history, 8)
    assert 0 < len(kept) < len(history) and kept == history[-len(kept):]
    assert len(small.prompt_ids(QUESTION, kept)) <= 150
    with pytest.raises(RequestError, match="context of 1024"):  # tiny-qwen3 has 1024 positions
        Assistant(qwen, max_prompt_tokens=4096).check_lengths(1000, 100)


def test_encoder_decoder_model_through_the_assistant():
    t5 = Assistant(load_for_inference("tiny-t5"))
    assert t5.family.name == "encoder-decoder" and not t5.keeps_history and t5.system_prompt is None
    assert t5.prompt_ids(QUESTION, [("earlier", "turn")]) == t5.prompt_ids(QUESTION)
    answer = t5.generate(QUESTION, settings=sampling(max_new_tokens=6))
    assert answer.completion_tokens == 6 and answer.finish_reason == "length"
    assert answer.text.strip()
    generation = t5.stream(QUESTION, settings=sampling(max_new_tokens=6))
    assert "".join(generation).strip() == generation.result().text == answer.text  # greedy: the same answer
    # and over HTTP
    with local_client(create_app(t5.loaded, small_settings(model_name="tiny-t5"), assistant=t5)) as c:
        r = c.post("/v1/chat/completions", json=chat_body(max_tokens=6, temperature=0))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == answer.text


def test_system_prompt_comes_from_the_flag_then_the_run_then_the_default(qwen):
    def system_of(cfg, flag=None) -> str:
        engine = Assistant(LoadedModel(qwen.model, qwen.tokenizer, qwen.family, cfg, "run"), system_prompt=flag)
        return engine.tokenizer.decode(engine.prompt_ids(QUESTION))

    assert "Trained with this." in system_of(TrainConfig(system_prompt="Trained with this."))
    assert "Flag wins." in system_of(TrainConfig(system_prompt="Trained with this."), "Flag wins.")
    # a run trained without one is served without one, exactly as it was trained
    assert DEFAULT_SYSTEM_PROMPT not in system_of(TrainConfig())
    assert system_of(TrainConfig()) == qwen.tokenizer.decode(qwen.format().prompt_ids(QUESTION))
    # a model medassist did not train (no config) gets the careful default
    untrained = Assistant(LoadedModel(qwen.model, qwen.tokenizer, qwen.family, None, "preset"))
    assert DEFAULT_SYSTEM_PROMPT in untrained.tokenizer.decode(untrained.prompt_ids(QUESTION))
    plain = system_of(TrainConfig(prompt_format="plain"))  # trained without one: none added
    assert plain.startswith("Question: ") and DEFAULT_SYSTEM_PROMPT not in plain


def test_adapter_run_and_merged_folder_are_served(tmp_path):
    """A run whose final/ is a LoRA adapter, and the folder `export --merge` would write.
    (tiny-t5: its tokenizer loads in a blink; the decoder-only path is the same code.)"""
    import peft

    base = load_for_inference("tiny-t5")
    adapter = peft.get_peft_model(base.model, peft.LoraConfig(r=4, target_modules="all-linear",
                                                              task_type="SEQ_2_SEQ_LM"))
    run = tmp_path / "run"
    adapter.save_pretrained(run / "final")
    base.tokenizer.save_pretrained(run / "final")
    (run / "config.yaml").write_text("model: tiny-t5\nsource_prefix: 'answer: '\n")
    merged = tmp_path / "merged"
    adapter.merge_and_unload().save_pretrained(merged)
    base.tokenizer.save_pretrained(merged)

    for ref, prefix in ((run, "[CLS] answer : what"), (merged, "[CLS] what")):
        loaded = load_for_inference(str(ref))
        assert not isinstance(loaded.model, peft.PeftModel)  # the run's adapter is merged into its base
        if ref == run:  # kept on request (the evaluation scores the base model with it switched off)
            assert isinstance(load_for_inference(str(ref), merge=False).model, peft.PeftModel)
        engine = Assistant(loaded)
        assert engine.tokenizer.decode(engine.prompt_ids(QUESTION)).startswith(prefix)  # the run's prefix
        expected = engine.generate(QUESTION, settings=sampling(max_new_tokens=6)).text
        with local_client(create_app(loaded, small_settings(), assistant=engine)) as c:
            r = c.post("/v1/chat/completions", json=chat_body(max_tokens=6, temperature=0))
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected


class _Broken:
    def __getattr__(self, name):
        raise AttributeError(name)

    def parameters(self):
        return iter(())

    def generate(self, **kwargs):
        raise RuntimeError("the model fell over")


def test_a_failing_generation_is_an_error_answer_not_a_dead_server(qwen):
    broken = LoadedModel(_Broken(), qwen.tokenizer, qwen.family, None, "broken")
    with local_client(create_app(broken, small_settings())) as c:
        r = c.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json=chat_body(stream=True))
        assert r.status_code == 200 and '"error"' in r.text and r.text.endswith("data: [DONE]\n\n")
        assert c.get("/health").json()["active"] == 0  # slots given back


# ---------------------------------------------------------------------------------------
# parity: the server answers what evaluation scores (issue 10)
PARITY_QUESTIONS = ["What is type 2 diabetes?", "How is asthma treated in children?", "Is flu contagious?",
                    "What causes high blood pressure in adults over sixty?"]


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-t5"])
def test_server_answers_what_evaluate_scores(preset, live_server):
    """Same question, same settings (greedy, max tokens, the run's system prompt): the answer
    over HTTP, plain and streamed, is the one `evaluate` generated and scored."""
    from medassist.evaluation import evaluate_examples, get_bert_scorer

    loaded = load_for_inference(preset)
    diversify(loaded.model)
    loaded.config = TrainConfig(model=preset, system_prompt="Answer in plain words.")  # as a run carries it
    examples = [QAExample(q, "A reference answer.", row=i + 1) for i, q in enumerate(PARITY_QUESTIONS)]
    ecfg = EvalConfig(max_new_tokens=10, baselines=False, retrieval_baseline=False, bootstrap_resamples=100)
    result = evaluate_examples(loaded.engine(), examples, ecfg, scorer=get_bert_scorer())
    scored = [row.generated for row in result.examples]
    assert len(set(scored)) > 1 and all(scored), "answers must differ for the check to mean anything"

    app = create_app(loaded, ServeConfig(model_name=preset))
    with live_server(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        for question, expected in zip(PARITY_QUESTIONS, scored):
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 10, "temperature": 0}
            plain = http.post("/v1/chat/completions", json=body)
            assert plain.status_code == 200, plain.text
            assert plain.json()["choices"][0]["message"]["content"] == expected
            streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
            assert streamed_text(streamed.text) == expected


# ---------------------------------------------------------------------------------------
# HTTP basics (in-process ASGI client)
def test_health_models_and_page(client):
    assert client.get("/health").json() == {"status": "ok", "auth_required": False, "active": 0, "waiting": 0}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-qwen3"
    assert client.get("/v1/models/tiny-qwen3").status_code == 200
    assert client.get("/v1/models/gpt-4").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert DISCLAIMER in page.text  # the one wording, served by the app
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
        assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "https://" not in page.text and "http://" not in page.text  # nothing from a CDN


def test_openapi_describes_the_models_the_routes_return(client):
    schema = client.get("/openapi.json").json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert chat["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {"ChatCompletionRequest", "ChatMessage", "ChatCompletion", "ModelList", "ErrorResponse"} <= set(
        schema["components"]["schemas"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_chat_completion_plain(client):
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=8))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "tiny-qwen3"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["prompt_tokens"] > 10 and 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_completion_streaming_format(client):
    body = chat_body(max_tokens=8, stream=True, stream_options={"include_usage": True})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content
    assert len({e["id"] for e in events}) == 1


def test_conversation_and_system_messages_reach_the_prompt(client, assistant):
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Wheezing."},
                {"role": "user", "content": [{"type": "text", "text": "And in children?"}]}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text
    expected = assistant.prompt_ids("And in children?", [(QUESTION, "Wheezing.")], "Answer in one word.")
    assert r.json()["usage"]["prompt_tokens"] == len(expected)


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"messages": [', 400, "not valid JSON"),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": HI, "max_tokens": "lots"}, 400, "max_tokens"),
        ({"messages": HI, "temperature": 5}, 400, "temperature"),
        ({"messages": HI, "n": 2}, 400, "n"),
        ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ({"messages": [{"role": "user", "content": "   "}]}, 400, "empty"),
        ({"messages": HI + [{"role": "assistant", "content": "yo"}]}, 400, "last message"),
        ({"messages": [{"role": "system", "content": "only system"}]}, 400, "last message"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "'text'"),
        ({"messages": HI, "max_tokens": 17}, 400, "at most 16"),
        ({"messages": [{"role": "user", "content": "word " * 300}]}, 400, "at most 256"),
        ({"messages": [{"role": "user", "content": "x" * 100_000}]}, 400, "characters"),
        ({"messages": [{"role": "user", "content": "x" * 300_000}]}, 413, "limit"),
        # issue 11 item 10: strict types, never coerced
        ({"messages": HI, "max_tokens": "3"}, 400, "max_tokens"),
        ({"messages": HI, "max_tokens": True}, 400, "max_tokens"),
        ({"messages": HI, "max_tokens": 3.0}, 400, "max_tokens"),
        ({"messages": HI, "stream": "yes"}, 400, "stream"),
        ({"messages": HI, "stream": 1}, 400, "stream"),
        ({"messages": HI, "temperature": "0"}, 400, "temperature"),
        ({"messages": HI, "stream_options": {"include_usage": "true"}}, 400, "include_usage"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, 400, "content"),
    ],
)
def test_bad_requests_get_a_clear_error_in_openai_shape(client, body, status, message):
    if isinstance(body, bytes):
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]  # issue 11 item 18: 400 {"error": {message, type, param, code}}, not 422
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_api_key_guards_every_v1_route(qwen):
    with TestClient(create_app(qwen, small_settings(api_key="s3cret"))) as c:  # with a key: any Host name
        good = {"Authorization": "Bearer s3cret"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "API key" in r.json()["error"]["message"]
            # before the body is even read: bad JSON without a key is still 401
            assert c.post("/v1/chat/completions", content=b"{", headers=headers).status_code == 401
            assert c.get("/v1/nothing-here", headers=headers).status_code == 401
        assert c.get("/v1/nothing-here", headers=good).status_code == 404
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post("/v1/chat/completions", json=chat_body(max_tokens=2), headers=good).status_code == 200
        assert c.get("/health").json()["auth_required"] is True
        assert c.get("/").status_code == 200  # the page itself is public; it asks for the key


# ---------------------------------------------------------------------------------------
# real clients on loopback
def test_official_openai_client_plain_and_streaming(qwen, live_server):
    import openai

    with live_server(create_app(qwen, small_settings(api_key="k-123"))) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="k-123", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["tiny-qwen3"]

        reply = client.chat.completions.create(
            model="tiny-qwen3", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=1.0)
        assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 10

        stream = client.chat.completions.create(
            model="tiny-qwen3", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
            temperature=1.0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and chunks[-1].usage.completion_tokens >= 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")

        greedy = client.chat.completions.create(
            model="tiny-qwen3", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0)
        full = greedy.choices[0].message.content
        stop = full[1:2]
        cut = client.chat.completions.create(
            model="tiny-qwen3", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0,
            stop=[stop])
        assert cut.choices[0].message.content == full[: full.find(stop)].strip()

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError, match="at most 16"):
            client.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=1000)
        # issue 11 item 18: a wrong type reaches the user as OpenAI's 400 with the message
        with pytest.raises(openai.BadRequestError, match="max_tokens: Input should be a valid integer"):
            client.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"max_tokens": "3"})


def test_overload_gets_429_at_once_and_the_queue_is_served(qwen, live_server):
    model = slow(qwen, delay=0.05)
    app = create_app(model, small_settings(max_concurrency=1, max_queue=1, max_tokens_limit=64))
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        results: dict[str, httpx.Response] = {}

        def post(name: str) -> None:
            results[name] = httpx.post(base + "/v1/chat/completions", json=chat_body(max_tokens=20), timeout=30)

        first = threading.Thread(target=post, args=("first",))
        first.start()
        _wait_for(lambda: http.get("/health").json()["active"] == 1)
        queued = threading.Thread(target=post, args=("queued",))
        queued.start()
        _wait_for(lambda: http.get("/health").json()["waiting"] == 1)
        t0 = time.monotonic()
        refused = http.post("/v1/chat/completions", json=chat_body(max_tokens=20))
        assert refused.status_code == 429 and time.monotonic() - t0 < 2.0
        assert refused.headers["retry-after"] and "busy" in refused.json()["error"]["message"]
        first.join(30)
        queued.join(30)
        assert results["first"].status_code == 200 and results["queued"].status_code == 200
        assert http.get("/health").json() == {"status": "ok", "auth_required": False, "active": 0, "waiting": 0}


def test_queue_timeout_answers_503(qwen, live_server):
    app = create_app(slow(qwen, delay=0.05), small_settings(max_concurrency=1, max_queue=2, queue_timeout_s=0.3,
                                                             max_tokens_limit=64))
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        first = threading.Thread(target=lambda: httpx.post(base + "/v1/chat/completions",
                                                           json=chat_body(max_tokens=30), timeout=30))
        first.start()
        _wait_for(lambda: http.get("/health").json()["active"] == 1)
        r = http.post("/v1/chat/completions", json=chat_body(max_tokens=4))
        assert r.status_code == 503 and "within" in r.json()["error"]["message"]
        first.join(30)


def test_disconnected_stream_stops_generating_and_frees_the_slot(qwen, live_server):
    loaded = slow(qwen, delay=0.05)
    app = create_app(loaded, small_settings(max_concurrency=1, max_queue=2, max_tokens_limit=400))
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        body = chat_body(max_tokens=400, stream=True)  # 400 tokens x 0.05 s = 20 s if never stopped
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"content"' in line and '"content":""' not in line:
                    break  # got real text: hang up mid-answer
        t0 = time.monotonic()
        r = http.post("/v1/chat/completions", json=chat_body(max_tokens=4))
        waited = time.monotonic() - t0
        assert r.status_code == 200 and waited < 8.0, waited  # vs 20 s if it kept generating
        steps = loaded.model.steps
        time.sleep(0.3)
        assert loaded.model.steps == steps < 100  # nothing is generating any more
        assert http.get("/health").json()["active"] == 0


# ---------------------------------------------------------------------------------------
# schema fuzzing: whatever the OpenAPI schema allows (and what it does not), never a 5xx.
# (schemathesis' own pytest plugin does not run on pytest 9 yet, so its strategies go through
# plain hypothesis.)
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_schema_fuzzing_never_gets_a_server_error(qwen, mode):
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode

    app = create_app(qwen, small_settings(max_tokens_limit=4, default_max_tokens=4, max_prompt_tokens=128,
                                          max_queue=64, allowed_hosts=["testserver"]))  # the ASGI client's Host
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    paths = set(schema.raw_schema["paths"])
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= paths
    seen: set[tuple[str, int]] = set()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=schema.as_strategy(GenerationMode(mode)))
    def fuzz(case):
        response = case.call_and_validate(checks=[not_a_server_error])
        seen.add((case.path, response.status_code))
        if os.environ.get("SHOW_FUZZ"):
            print(mode, case.path, response.status_code, response.text[:150])

    fuzz()
    # (schema-valid requests may still be refused with 400, e.g. when the last message is not
    # the user's: the schema cannot say that; answered requests are tested above)
    assert any(path == "/v1/chat/completions" for path, _ in seen)
    assert any(status == 200 for _, status in seen), "the fuzzer's requests must reach the routes (Host check)"


# ---------------------------------------------------------------------------------------
# the generate / chat / serve commands
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medassist")
    serve_cli.add_serving_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_generate_command_prints_the_answer(qwen, monkeypatch, capsys):
    monkeypatch.setattr(serve_cli, "load_model", lambda ref: qwen)
    args = _parse(["generate", "--model", "tiny-qwen3", QUESTION, "--max-new-tokens", "6", "--temperature", "1"])
    torch.manual_seed(0)
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(MedassistError, match="temperature"):
        bad = _parse(["generate", "--model", "tiny-qwen3", "q", "--temperature", "-1"])
        bad.func(bad)


def test_chat_command_keeps_history_resets_and_exits_cleanly(qwen, monkeypatch):
    monkeypatch.setattr(serve_cli, "load_model", lambda ref: qwen)
    lines = iter([QUESTION, "", "/reset", "And in children?"])
    prompts: list[int] = []
    real_prompt_ids = Assistant.prompt_ids

    def spy(self, question, history=(), system_prompt=None, passages=()):
        prompts.append(len(history))
        return real_prompt_ids(self, question, history, system_prompt, passages)

    monkeypatch.setattr(Assistant, "prompt_ids", spy)

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    args = _parse(["chat", "--model", "tiny-qwen3", "--max-new-tokens", "4", "--temperature", "1"])
    assert serve_cli.cmd_chat(args, input_fn=read, out=out) == 0
    text = out.getvalue()
    assert DISCLAIMER in text and text.count("assistant> ") == 2 and "(conversation cleared)" in text
    assert prompts and max(prompts) == 0  # /reset came before the second question

    lines = iter([QUESTION, "And in children?"])
    prompts.clear()
    assert serve_cli.cmd_chat(args, input_fn=read, out=io.StringIO()) == 0
    assert max(prompts) == 1  # the second question was asked with the first turn as history

    def interrupt(prompt: str) -> str:
        raise KeyboardInterrupt

    assert serve_cli.cmd_chat(args, input_fn=interrupt, out=io.StringIO()) == 0


def test_chat_process_exits_cleanly_on_ctrl_c():
    proc = subprocess.Popen(
        [sys.executable, "-m", "medassist", "chat", "--model", "tiny-t5", "--max-new-tokens", "4", "--threads", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # as in a terminal: Ctrl-C has its default action, whatever an earlier test left in this
        # process (an ignored SIGINT is inherited across exec, and Python then never raises
        # KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        proc.stdin.write(QUESTION.encode() + b"\n")
        proc.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 60
        while seen.count(b"you> ") < 2:  # the answer came and the next prompt is waiting
            assert time.monotonic() < deadline and proc.poll() is None, seen + proc.stderr.read()
            if select.select([proc.stdout], [], [], 0.5)[0]:
                seen += os.read(proc.stdout.fileno(), 4096)
        assert b"assistant> " in seen
        # Ctrl-C as a person presses it: at the waiting prompt. A signal that lands between the
        # prompt's write and the read() would only be seen once a line came (CPython's race).
        _wait_for(lambda: _blocked_in_read(proc.pid), timeout=20)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def _blocked_in_read(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "S"  # sleeping: waiting for input
    except OSError:  # no /proc: nothing to wait for
        return True


def test_serve_options_come_from_serve_config(monkeypatch):
    args = _parse(["serve"])
    defaults = ServeConfig()
    for name in ("host", "port", "max_prompt_tokens", "max_tokens_limit", "default_max_tokens", "temperature",
                 "top_p", "max_concurrency", "max_queue", "queue_timeout_s", "max_body_bytes", "allowed_hosts"):
        assert getattr(args, name) == getattr(defaults, name), name
    args = _parse(["serve", "--allowed-hosts", "example.org, localhost", "--max-new-tokens", "32",
                   "--queue-timeout", "5"])
    assert args.allowed_hosts == ["example.org", "localhost"]
    assert args.default_max_tokens == 32 and args.queue_timeout_s == 5.0


def test_serve_command_checks_its_options(monkeypatch):
    monkeypatch.setattr(serve_cli, "load_model", lambda ref: pytest.fail("must not load a model"))
    with pytest.raises(MedassistError, match="max-concurrency"):
        args = _parse(["serve", "--model", "tiny-qwen3", "--max-concurrency", "0"])
        args.func(args)
    with pytest.raises(MedassistError, match="temperature"):
        args = _parse(["serve", "--model", "tiny-qwen3", "--temperature", "3"])
        args.func(args)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = _parse(["serve", "--model", "tiny-qwen3", "--port", str(busy.getsockname()[1])])
        with pytest.raises(MedassistError, match="cannot listen"):
            args.func(args)


def test_a_run_is_served_with_the_repetition_rules_it_was_evaluated_with():
    """eval.no_repeat_ngram_size / repetition_penalty of a run are its decoding everywhere:
    the assistant (generate, chat, serve) answers exactly what evaluation generated."""
    from medassist.config import TrainConfig
    from medassist.models import LoadedModel, load_for_inference
    from medassist.serving.assistant import run_decoding

    base = load_for_inference("tiny-qwen3")
    cfg = TrainConfig(eval={"no_repeat_ngram_size": 2, "max_new_tokens": 24})
    run = LoadedModel(base.model, base.tokenizer, base.family, cfg, "run")
    assert run_decoding(run) == {"no_repeat_ngram_size": 2} and run_decoding(base) == {}
    served = Assistant(run).generate("What is flu?", settings=sampling(24)).text
    evaluated = run.engine(run.format()).answer(["What is flu?"], cfg.eval.generation(seed=0))[0].text
    plain = Assistant(LoadedModel(base.model, base.tokenizer, base.family, TrainConfig(), "run")).generate(
        "What is flu?", settings=sampling(24)).text
    assert served == evaluated and served != plain
