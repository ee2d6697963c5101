"""Structured outputs: `response_format` (json_object, json_schema) and vLLM's `structured_outputs` (regex,
choice, grammar) constrain what the server generates, through the official `openai` client; the same
requests unconstrained fail the schema, which shows the constraint does the work; what the grammar engine
refuses is a 400 naming it; constrained and unconstrained rows share the engine without changing each other."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from typing import Literal

import openai
import pytest
import torch
from conftest import Collector, running_server
from pydantic import BaseModel, Field, ValidationError

from llmctl.infer.beam import BeamParams, beam_search
from llmctl.infer.constraints import ConstraintError, ConstraintSpec
from llmctl.infer.engine import Engine
from llmctl.infer.generate import generate_batch, generate_ids, without_stop_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.served import load_served_model
from llmctl.infer.server import create_app
from llmctl.infer.speculative import SpeculationStats, speculative_generate_ids

pytest.importorskip("llguidance")


class Ticket(BaseModel):  # a flat object: bounded strings, an enum, bounded integers
    title: str = Field(max_length=24)
    severity: Literal["low", "medium", "high"]
    priority: int = Field(ge=1, le=5)


class Owner(BaseModel):
    name: str = Field(max_length=16)
    team: Literal["platform", "data", "web"]


class Incident(BaseModel):  # nested objects and an array
    owner: Owner
    tags: list[Literal["network", "disk", "auth"]] = Field(max_length=3)
    resolved: bool


class Measurement(BaseModel):  # numbers with bounds
    value: float = Field(ge=-10, le=10)
    count: int = Field(ge=0, le=1000)
    unit: Literal["ms", "s"]


SCHEMAS = [Ticket, Incident, Measurement]


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    return load_served_model("tiny", tiny_checkpoint, max_batch=16)


@pytest.fixture(scope="module")
def client(served):
    with running_server(create_app({"tiny": served})) as running:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)


def report_request(index: int) -> dict:
    """The same sampled request, constrained or not: a report at temperature 1, seeded by its index."""
    messages = [{"role": "user", "content": f"Report number {index} as JSON."}]
    return dict(model="tiny", messages=messages, temperature=1.0, max_tokens=100, seed=index)


def test_parse_with_a_pydantic_model_validates_fifty_of_fifty_sampled_replies(client):
    for index in range(50):
        schema = SCHEMAS[index % len(SCHEMAS)]
        completion = client.chat.completions.parse(**report_request(index), response_format=schema)
        assert isinstance(completion.choices[0].message.parsed, schema), index


def test_the_same_requests_unconstrained_fail_the_schema(client):
    """The tiny random model does not write JSON by itself: the constraint is what makes the replies valid."""
    failures = 0
    for index in range(12):
        schema = SCHEMAS[index % len(SCHEMAS)]
        reply = client.chat.completions.create(**report_request(index))
        try:
            schema.model_validate_json(reply.choices[0].message.content)
        except ValidationError:
            failures += 1
    assert failures >= 10


def test_a_json_object_is_a_json_object_whenever_it_ends_before_max_tokens(client):
    """Any object: the random model's strings may run past max_tokens (finish "length"); every reply that
    ends on its own is an object."""
    finishes = []
    for seed in range(6):
        reply = client.completions.create(
            model="tiny",
            prompt="The daemon",
            max_tokens=100,
            temperature=1.0,
            seed=seed,
            extra_body={"response_format": {"type": "json_object"}},
        ).choices[0]
        finishes.append(reply.finish_reason)
        if reply.finish_reason == "stop":
            assert isinstance(json.loads(reply.text), dict), reply.text
        assert reply.text.startswith("{")
    assert "stop" in finishes


def test_regex_choice_and_grammar_hold_under_sampling_streamed_or_not(client):
    def completion(constraint: dict, seed: int) -> str:
        arguments = dict(model="tiny", prompt="The daemon", max_tokens=60, temperature=1.0, seed=seed)
        arguments["extra_body"] = {"structured_outputs": constraint}
        if seed % 2 == 0:
            return client.completions.create(**arguments).choices[0].text
        return "".join(chunk.choices[0].text for chunk in client.completions.create(**arguments, stream=True))

    choices = ["start the daemon", "stop", "reload it"]
    lark = 'start: "port " NUMBER\nNUMBER: /[1-9][0-9]{1,3}/'
    for seed in range(4):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", completion({"regex": r"[0-9]{3}-[a-z]{2,4}"}, seed))
        assert completion({"choice": choices}, seed) in choices
        assert re.fullmatch(r"port [1-9][0-9]{1,3}", completion({"grammar": lark}, seed))
        assert completion({"grammar": 'root ::= "yes" | "no"'}, seed) in ("yes", "no")  # GBNF


def test_a_structure_cut_by_max_tokens_ends_with_length(client):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "t", "schema": Ticket.model_json_schema()},
        },
        max_tokens=3,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("extra", "param", "names"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"if": {}}}}},
            "response_format",
            '"if"',
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        (
            {"response_format": {"type": "json_object", "colour": "red"}},
            "response_format.colour",
            "Extra inputs",
        ),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
        (
            {"structured_outputs": {"grammar": "start: undefined_rule"}},
            "structured_outputs",
            "undefined_rule",
        ),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"regx": "a"}}, "structured_outputs.regx", "Extra inputs"),
    ],
)
def test_what_the_engine_refuses_is_a_400_naming_it(client, extra, param, names):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, extra_body=extra
        )
    error = caught.value.body
    assert error["param"] == param and names in error["message"], error


# (spec, the pattern every output it allows matches): a regular expression, a choice, a Lark grammar
KINDS = [
    (ConstraintSpec("regex", r"[a-z]{1,8} [0-9]{2}"), r"[a-z]{1,8} [0-9]{2}"),
    (ConstraintSpec("choice", ["alpha", "beta gamma", "delta"]), r"alpha|beta gamma|delta"),
    (
        ConstraintSpec("grammar", 'start: KEY "=" VALUE\nKEY: /[a-z]{2,5}/\nVALUE: /[0-9]{1,2}/'),
        r"[a-z]{2,5}=[0-9]{1,2}",
    ),
]


def test_constrained_and_unconstrained_rows_share_the_engine_and_leave_each_other_alone(served):
    """16 concurrent rows, every other one under a regex, a choice or a grammar and sampled: the
    unconstrained ones generate exactly what they generate alone, the constrained ones follow theirs."""
    engine, tokenizer = served.engine, served.tokenizer
    prompts = [tokenizer.encode(f"Line {index} of the manual") for index in range(16)]
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=(tokenizer.eos_id,))
    alone = [list(generate_ids(engine.model, prompt, greedy)) for prompt in prompts[::2]]
    collectors = [Collector() for _ in prompts]
    for index, (prompt, collector) in enumerate(zip(prompts, collectors, strict=True)):
        if index % 2:
            spec, _ = KINDS[index // 2 % 3]
            sampled = SamplingParams(
                max_new_tokens=20, temperature=1.0, seed=index, stop_token_ids=(tokenizer.eos_id,)
            )
            engine.submit(prompt, sampled, collector, constraint=served.constraints.compile(spec))
        else:
            engine.submit(prompt, greedy, collector)
    for collector in collectors:
        assert collector.done.wait(120)
    assert [collector.tokens for collector in collectors[::2]] == alone
    for index, collector in enumerate(collectors[1::2]):
        _, pattern = KINDS[index % 3]
        text = tokenizer.decode(without_stop_ids(collector.tokens, (tokenizer.eos_id,)))
        assert re.fullmatch(pattern, text), (pattern, collector.tokens)


@pytest.fixture(scope="module")
def draft(served):
    """A draft that often disagrees with the model: its weights, perturbed."""
    model = copy.deepcopy(served.engine.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    return model


def generations(generator: str, served, draft, spec: ConstraintSpec) -> list[list[int]]:
    """Outputs of one generator under `spec`, sampled with several seeds (beam search: its hypotheses)."""
    model, tokenizer = served.engine.model, served.tokenizer
    prompt = tokenizer.encode("The configuration file says")
    stops = (tokenizer.eos_id,)

    def sampled(seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed, stop_token_ids=stops)

    compile_ = served.constraints.compile
    if generator == "sample":
        return [
            list(generate_ids(model, prompt, sampled(seed), constraint=compile_(spec))) for seed in range(4)
        ]
    if generator == "batch":
        constraints = [compile_(spec) for _ in range(4)]
        params = replace(sampled(0), seed=None)
        return generate_batch(model, [prompt, prompt[:3]], params, n=2, constraints=constraints)
    if generator == "beam":
        diverse = BeamParams(
            num_beams=4,
            num_beam_groups=2,
            diversity_penalty=1.0,
            num_return_sequences=4,
            max_new_tokens=24,
            stop_token_ids=stops,
        )
        return [hypothesis.ids for hypothesis in beam_search(model, prompt, diverse, compile_(spec))]
    if generator == "speculative":
        stats = SpeculationStats()
        outputs = [
            list(speculative_generate_ids(model, draft, prompt, sampled(seed), 3, stats, compile_(spec)))
            for seed in range(4)
        ]
        assert stats.proposed > 0
        if spec.kind == "regex":  # free enough that the draft's proposals were refused at times
            assert stats.accepted < stats.proposed
        return outputs
    engine = Engine(model, max_batch=4, draft=draft, lookahead=3).start()  # the engine, speculating
    try:
        collectors = [Collector() for _ in range(4)]
        for seed, collector in enumerate(collectors):
            engine.submit(prompt, sampled(seed), collector, constraint=compile_(spec))
        assert all(collector.done.wait(120) for collector in collectors)
        return [collector.tokens for collector in collectors]
    finally:
        engine.stop()


@pytest.mark.parametrize("generator", ["sample", "batch", "beam", "speculative", "engine with a draft"])
@pytest.mark.parametrize("kind", range(len(KINDS)), ids=["regex", "choice", "grammar"])
def test_every_generator_follows_a_regex_a_choice_and_a_grammar(served, draft, generator, kind):
    spec, pattern = KINDS[kind]
    outputs = generations(generator, served, draft, spec)
    texts = [served.tokenizer.decode(without_stop_ids(ids, (served.tokenizer.eos_id,))) for ids in outputs]
    assert len(texts) == 4 and all(re.fullmatch(pattern, text) for text in texts), texts


def test_a_schema_the_engine_cannot_compile_names_the_keyword(served):
    with pytest.raises(ConstraintError, match='Unimplemented keys: \\["if"\\]'):
        served.constraints.compile(ConstraintSpec("json_schema", {"type": "object", "if": {}}))


def test_chat_replies_follow_a_json_schema_a_regex_or_a_choice(tiny_checkpoint, tmp_path):
    """`llmctl chat --json-schema FILE | --regex RE | --choice A,B,C`: every sampled reply follows it."""
    import subprocess
    import sys

    schema = tmp_path / "ticket.json"
    # a strict schema, as OpenAI's strict mode writes it: no properties besides those named
    schema.write_text(json.dumps({**Ticket.model_json_schema(), "additionalProperties": False}))
    base = [sys.executable, "-m", "llmctl", "chat", str(tiny_checkpoint), "--plain", "--max-tokens", "100"]
    cases = [  # the tiny model's context is 128 tokens: one JSON reply fills most of it
        (["--json-schema", str(schema)], "a ticket\n", lambda line: Ticket.model_validate_json(line)),
        (
            ["--regex", "[a-z]{2,6} [0-9]{1,3}"],
            "one\ntwo\nthree\n",
            lambda line: re.fullmatch(r"[a-z]{2,6} [0-9]{1,3}", line),
        ),
        (
            ["--choice", "yes,no,maybe later"],
            "one\ntwo\nthree\n",
            lambda line: line in ("yes", "no", "maybe later"),
        ),
    ]
    for options, questions, check in cases:
        result = subprocess.run(
            [*base, *options, "--temperature", "1.0"],
            input=questions,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        replies = result.stdout.splitlines()
        assert len(replies) == questions.count("\n") and all(check(reply) for reply in replies), replies
    refused = subprocess.run(
        [*base, "--json-schema", str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "not a readable JSON file" in refused.stderr


def test_generate_ids_follows_a_constraint_alone(served):
    """The one-row generator (chat's) masks and stops as the engine does."""
    constraint = served.constraints.compile(ConstraintSpec("choice", ["alpha", "beta gamma"]))
    prompt = served.tokenizer.encode("Pick one")
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=1)
    ids = list(generate_ids(served.engine.model, prompt, params, constraint=constraint))
    assert served.tokenizer.decode(ids) in ("alpha", "beta gamma")
