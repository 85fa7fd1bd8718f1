"""Continuous batching (medassist.batching): rows that join and leave a running batch give the
greedy answers of one-at-a-time generation (transformers' ``generate``, batch 1); per-request
settings (max tokens, stop strings, sampling, repetition penalty) hold inside a shared batch;
streaming, cancellation within a step, errors, and the server's admission limits with
batching on; LoRA models; the opt-in bf16 mode.

Models are the random ``tiny-qwen3`` with re-drawn weights (varied answers) and ``tiny-t5``.
Speed is measured in bench/serve_load.py and bench/eval_throughput.py, never here.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from medassist.batching import Batcher, PrefixStore, SlotCache, batching_problem, make_row
from medassist.config import GenerationSettings, ServeConfig
from medassist.engine import Engine
from medassist.models import load_for_inference, load_pretrained
from medassist.serving import create_app

QUESTIONS = [
    "What is type 2 diabetes?",
    "What are the symptoms of asthma and how is it treated in children?",
    "Is flu contagious?",
    "What are the symptoms of asthma?",
    "Hi",
    "What causes high blood pressure in adults over sixty, and can it be prevented or treated with diet alone?",
]


def diversify(model, std: float = 0.5):
    """Re-draw the weights (seeded) with a wide spread, so answers differ from prompt to prompt."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SYSTEM = "You are a careful medical information assistant. Answer accurately and clearly."


@pytest.fixture(scope="module")
def qwen() -> Engine:
    """tiny-qwen3 with a system prompt, as the default recipe trains and serves it."""
    model, tok, family = load_pretrained("tiny-qwen3")
    return Engine(diversify(model), family.make_format(tok).with_system_prompt(SYSTEM), family)


def unbatched(engine: Engine, prompt: list[int], settings: GenerationSettings):
    """The reference: transformers' generate, this prompt alone."""
    reference = Engine(engine.model, engine.fmt, engine.family, batching=False)
    return reference.generate([prompt], settings.generation(batch_size=1))[0]


def run(batcher: Batcher, rows) -> list:
    for row in rows:
        batcher.add(row)
    with torch.inference_mode():
        while batcher.busy:
            batcher.step()
    return [batcher.engine.finish(r.tokens, len(r.prompt), r.settings, cancelled=r.was_cancelled) for r in rows]


class Forwards:
    """Counts the model's forward passes and the rows of each; ``delay`` seconds each."""

    def __init__(self, model, delay: float = 0.0) -> None:
        self.model, self.delay, self.rows = model, delay, []

    def __enter__(self):
        def hook(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.rows.append(0 if ids is None else ids.shape[0])
            if self.delay:
                time.sleep(self.delay)

        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------
# the batch: same answers as one at a time
def test_rows_joining_and_leaving_give_the_unbatched_greedy_answers(qwen):
    """Two rows, six prompts with their own answer lengths: prompts join as others end, shared
    prompt prefixes are computed once; every answer is the one generated alone."""
    prompts = qwen.prompts(QUESTIONS)
    settings = [GenerationSettings(max_new_tokens=n) for n in (3, 9, 5, 12, 1, 7)]
    batcher = Batcher(qwen, max_rows=2)
    joined = []
    prefill = batcher._prefill

    def spy(rows):
        joined.append(len(batcher.active) - len(rows))  # rows already decoding when these join
        prefill(rows)

    batcher._prefill = spy
    got = run(batcher, [make_row(qwen, p, s) for p, s in zip(prompts, settings)])
    want = [unbatched(qwen, p, s) for p, s in zip(prompts, settings)]
    assert [a.token_ids for a in got] == [w.token_ids for w in want]
    assert [a.text for a in got] == [w.text for w in want]
    assert [a.finish_reason for a in got] == ["length"] * len(prompts)
    assert len({tuple(a.token_ids) for a in got}) == len(prompts), "answers must differ for the check to mean anything"
    assert any(n > 0 for n in joined), "some prompts must join a batch that is already decoding"
    assert batcher.prefixes.entries, "the shared system prompt is computed once"
    assert not batcher.active and batcher.cache.rows <= 3


def test_engine_batch_api_refills_rows_and_keeps_input_order(qwen):
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    got = qwen.answer(QUESTIONS, settings)
    want = [unbatched(qwen, p, settings) for p in qwen.prompts(QUESTIONS)]
    assert [a.token_ids for a in got] == [w.token_ids for w in want]


def test_a_long_prompt_joining_later_grows_the_cache(qwen):
    long_text = "Describe " + " and ".join(f"symptom number {i}" for i in range(80)) + "?"
    prompts = qwen.prompts(["Hi", "Is flu contagious?"]) + [qwen.tokenizer(long_text).input_ids]
    settings = GenerationSettings(max_new_tokens=5)
    batcher = Batcher(qwen, max_rows=2)
    got = run(batcher, [make_row(qwen, p, settings) for p in prompts])
    assert len(prompts[2]) > 300 and batcher.cache.length > len(prompts[2])
    assert [a.token_ids for a in got] == [unbatched(qwen, p, settings).token_ids for p in prompts]


def test_stop_strings_and_processors_hold_per_row(qwen):
    """Rows with different settings share forwards: a stop string, repetition penalty and
    no-repeat n-grams give each row the answer generate gives it alone."""
    prompts = qwen.prompts(QUESTIONS[:4])
    plain = unbatched(qwen, prompts[0], GenerationSettings(max_new_tokens=12))
    stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 2]
    assert stop.strip() and plain.text.find(stop) > 0
    settings = [GenerationSettings(max_new_tokens=12, stop=[stop]),
                GenerationSettings(max_new_tokens=10, repetition_penalty=1.5),
                GenerationSettings(max_new_tokens=10, no_repeat_ngram_size=2),
                GenerationSettings(max_new_tokens=10)]
    got = run(Batcher(qwen, max_rows=4), [make_row(qwen, p, s) for p, s in zip(prompts, settings)])
    want = [unbatched(qwen, p, s) for p, s in zip(prompts, settings)]
    assert [a.text for a in got] == [w.text for w in want]
    assert [a.token_ids for a in got[1:]] == [w.token_ids for w in want[1:]]
    assert got[0].finish_reason == "stop" and got[0].text == plain.text[: plain.text.find(stop)].strip()
    assert len(got[0].token_ids) < 12


def test_sampled_and_greedy_rows_share_a_batch(qwen):
    prompts = qwen.prompts(QUESTIONS[:3])
    greedy = GenerationSettings(max_new_tokens=8)
    sampled = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9)
    rows = [make_row(qwen, prompts[0], greedy), make_row(qwen, prompts[1], sampled, seed=7),
            make_row(qwen, prompts[2], greedy)]
    got = run(Batcher(qwen, max_rows=3), rows)
    assert got[0].token_ids == unbatched(qwen, prompts[0], greedy).token_ids
    assert got[2].token_ids == unbatched(qwen, prompts[2], greedy).token_ids
    alone = run(Batcher(qwen, max_rows=1), [make_row(qwen, prompts[1], sampled, seed=7)])[0]
    assert alone.token_ids == got[1].token_ids, "a seeded answer does not depend on its batch"
    other = run(Batcher(qwen, max_rows=1), [make_row(qwen, prompts[1], sampled, seed=8)])[0]
    assert other.token_ids != got[1].token_ids
    assert got[1].token_ids != unbatched(qwen, prompts[1], greedy).token_ids


def test_prefix_store_keeps_shared_prefixes_worth_computing():
    store = PrefixStore(min_tokens=4, min_saving=8)
    system = list(range(100, 120))
    prompts = [system + [1, 2, 3], system + [1, 2, 4], system + [7]]
    # the system prompt saves 20 tokens for the third prompt; two more tokens for two prompts do not pay
    assert store.wanted(prompts) == [tuple(system)]
    more = [system + [7]] + [system + [1, 2, 3, 4, 5, k] for k in (6, 7, 8, 9)]  # 4 x 5 more tokens shared
    assert store.wanted(more) == [tuple(system), tuple(system + [1, 2, 3, 4, 5])]
    store.add(tuple(system), ["kv"])
    assert store.best(system + [9]) == tuple(system)
    assert store.best(system) == (), "a prefix must leave a token to prefill"
    assert store.wanted([[1, 2, 3]]) == []


def test_slot_cache_writes_rows_at_their_own_positions():
    cache = SlotCache()
    cache.reserve(rows=2, length=5)
    keys = torch.arange(2 * 1 * 3 * 1, dtype=torch.float32).reshape(2, 1, 3, 1)
    cache.select(0, 2, torch.tensor([[0, 1, cache.scratch], [2, 3, 4]]), kv_length=5)
    k, v = cache.update(keys, keys + 100, layer_idx=0)
    assert k.shape == (2, 1, 5, 1)
    assert k[0, 0, :2, 0].tolist() == [0.0, 1.0] and k[1, 0, 2:5, 0].tolist() == [3.0, 4.0, 5.0]
    assert cache.keys[0][0, 0, cache.scratch, 0] == 2.0  # padding went to the scratch column
    cache.move(1, 0, length=5)
    assert cache.keys[0][0, 0, 2:5, 0].tolist() == [3.0, 4.0, 5.0]


# ---------------------------------------------------------------------------------------
# streaming through the scheduler
def test_streams_share_the_batch_stream_text_and_cancel_within_a_step(qwen):
    engine = Engine(qwen.model, qwen.fmt, qwen.family)
    assert engine.serve_batched(4)
    settings = GenerationSettings(max_new_tokens=10)
    prompts = qwen.prompts(QUESTIONS[:2])
    with Forwards(qwen.model, delay=0.02) as seen:
        long = engine.stream(qwen.prompts(["Tell me everything."])[0], GenerationSettings(max_new_tokens=400))
        streams = [engine.stream(p, settings) for p in prompts]
        pieces = [list(s) for s in streams]
        answers = [s.result(30) for s in streams]
        assert not long.done
        long.cancel()
        steps_at_cancel = len(seen.rows)
        cut = long.result(10)
        steps_after = len(seen.rows) - steps_at_cancel
    assert cut.finish_reason == "cancelled" and 0 < cut.completion_tokens < 400
    assert steps_after <= 2, "a cancelled row leaves at the next step"
    assert max(seen.rows) >= 2, "streams share forward passes"
    for got, parts, prompt in zip(answers, pieces, prompts):
        want = unbatched(qwen, prompt, settings)
        assert got.token_ids == want.token_ids and got.text == want.text
        assert "".join(parts).strip() == got.text
    engine.scheduler.close()


def test_a_failing_forward_fails_its_rows_and_the_scheduler_carries_on(qwen):
    engine = Engine(qwen.model, qwen.fmt, qwen.family)
    assert engine.serve_batched(2)
    calls = {"n": 0}

    def boom(_module, _args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the model fell over")

    handle = qwen.model.register_forward_pre_hook(boom)
    try:
        failed = engine.stream(qwen.prompts(["Hi"])[0], GenerationSettings(max_new_tokens=4))
        with pytest.raises(RuntimeError, match="fell over"):
            failed.result(10)
        fine = engine.stream(qwen.prompts(["Hi"])[0], GenerationSettings(max_new_tokens=4)).result(10)
    finally:
        handle.remove()
    assert fine.completion_tokens == 4
    engine.scheduler.close()


def test_models_the_batcher_does_not_take_keep_generate():
    t5, tok, family = load_pretrained("tiny-t5")
    engine = Engine(t5, family.make_format(tok), family)
    assert "encoder-decoder" in engine.batching_problem and engine.serve_batched(4) is False
    stream = engine.stream(engine.prompts(["Hi"])[0], GenerationSettings(max_new_tokens=3))
    assert stream.result(30).completion_tokens <= 3

    class Stub:  # offers generate() only, like a test double
        def generate(self, **kwargs):
            raise NotImplementedError

    qwen_model, qtok, qfamily = load_pretrained("tiny-qwen3")
    assert batching_problem(Stub(), qfamily) is not None
    assert batching_problem(qwen_model, qfamily) is None


# ---------------------------------------------------------------------------------------
# the server
def test_server_batches_concurrent_requests_within_its_admission_limits(live_server):
    loaded = load_for_inference("tiny-qwen3")
    diversify(loaded.model)
    settings = ServeConfig(model_name="tiny-qwen3", max_concurrency=3, max_queue=0, max_tokens_limit=64,
                           max_prompt_tokens=256)
    app = create_app(loaded, settings)
    assistant = app.state.server.backend
    assert assistant.batched and assistant.engine.scheduler.max_rows == 3
    questions = QUESTIONS[:3]
    results: dict[int, httpx.Response] = {}

    def ask(i: int) -> None:
        body = {"messages": [{"role": "user", "content": questions[i]}], "max_tokens": 20, "temperature": 0}
        results[i] = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)

    with Forwards(loaded.model, delay=0.03) as seen, live_server(app) as base, httpx.Client(base_url=base) as http:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while http.get("/health").json()["active"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert refused.status_code == 429  # 3 rows + no queue: the limit holds with batching
        for t in threads:
            t.join(60)
        assert http.get("/health").json()["active"] == 0
    assert max(seen.rows) == 3, "the three requests shared forward passes"
    want = [unbatched(assistant.engine, assistant.prompt_ids(q), GenerationSettings(max_new_tokens=20)).text
            for q in questions]
    assert [results[i].json()["choices"][0]["message"]["content"] for i in range(3)] == want
    assert all(results[i].json()["choices"][0]["finish_reason"] == "length" for i in range(3))


def test_a_client_that_hangs_up_frees_its_row_within_a_step(live_server):
    loaded = load_for_inference("tiny-qwen3")
    diversify(loaded.model)
    app = create_app(loaded, ServeConfig(model_name="tiny-qwen3", max_concurrency=2, max_tokens_limit=400,
                                         max_prompt_tokens=256))
    assert app.state.server.backend.batched
    with Forwards(loaded.model, delay=0.03) as seen, live_server(app) as base, httpx.Client(base_url=base) as http:
        body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 400,
                "temperature": 0, "stream": True}  # 400 steps x 0.03 s = 12 s if never stopped
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"content"' in line and '"content":""' not in line:
                    break  # got real text: hang up mid-answer
        deadline = time.monotonic() + 5
        while http.get("/health").json()["active"]:
            assert time.monotonic() < deadline, "the row was not freed"
            time.sleep(0.02)
        steps = len(seen.rows)
        time.sleep(0.3)
        assert len(seen.rows) == steps < 100  # nothing is generating any more
        r = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_server_without_batching_runs_a_thread_per_request():
    from fastapi.testclient import TestClient

    loaded = load_for_inference("tiny-qwen3")
    app = create_app(loaded, ServeConfig(model_name="tiny-qwen3", batching=False, default_max_tokens=4))
    assert not app.state.server.backend.batched and app.state.server.backend.engine.scheduler is None
    with TestClient(app, base_url="http://localhost") as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4


# ---------------------------------------------------------------------------------------
# LoRA, bf16
def test_lora_model_batched_equals_unbatched():
    from peft import LoraConfig, get_peft_model

    model, tok, family = load_pretrained("tiny-qwen3")
    diversify(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained-looking adapter (B starts at zero: the adapter would do nothing)
        torch.manual_seed(1)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.eval()
    engine = Engine(peft_model, family.make_format(tok), family)
    assert engine.batching_problem is None
    settings = GenerationSettings(max_new_tokens=8, batch_size=3)
    got = engine.answer(QUESTIONS, settings)
    want = [unbatched(engine, p, settings) for p in engine.prompts(QUESTIONS)]
    assert [a.token_ids for a in got] == [w.token_ids for w in want]
    base_only = Engine(model, engine.fmt, family)
    with peft_model.disable_adapter():
        plain = base_only.answer(QUESTIONS[:2], settings)
    assert [a.token_ids for a in plain] != [a.token_ids for a in got[:2]], "the adapter must change the answers"


def test_bf16_mode_is_opt_in_and_leaves_the_model_fp32(qwen):
    settings = GenerationSettings(max_new_tokens=6, batch_size=4, dtype="bf16")
    got = qwen.answer(QUESTIONS[:4], settings)
    assert all(a.completion_tokens == 6 for a in got)
    assert all(p.dtype == torch.float32 for p in qwen.model.parameters())
    assert GenerationSettings().dtype == "fp32"
    hf = Engine(qwen.model, qwen.fmt, qwen.family, batching=False).answer(QUESTIONS[:2], settings)
    assert all(a.completion_tokens == 6 for a in hf)  # generate under bf16 autocast
