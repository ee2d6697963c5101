"""A/B serving: sticky variants per user, the completion log and its feedback, and `llmctl ab report`."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict

import httpx
import pytest
from conftest import running_server

from llmctl.evaluate.ab_stats import compare, variant_stats
from llmctl.infer.ab_log import CompletionLog, choose_variant, read_log

pytest.importorskip("fastapi")


def test_a_user_keeps_one_variant_and_users_split_by_weight():
    variants = [("stable", 0.9), ("candidate", 0.1)]
    for user in ("ana", "bo", "user-17"):
        assert len({choose_variant("ab", variants, user) for _ in range(50)}) == 1
    chosen = Counter(choose_variant("ab", variants, f"user-{i}") for i in range(20_000))
    # binomial(20000, 0.1): sd 42; 4 sd either side
    assert abs(chosen["candidate"] - 2_000) < 170, chosen
    # another alias draws independently: a user is not always on the same side of every test
    other = [choose_variant("other", variants, f"user-{i}") for i in range(20_000)]
    same = sum(o == choose_variant("ab", variants, f"user-{i}") for i, o in enumerate(other))
    assert abs(same - 20_000 * (0.9**2 + 0.1**2)) < 4 * (20_000 * 0.18 * 0.82) ** 0.5


@pytest.fixture(scope="module")
def ab_server(tiny_checkpoint, tmp_path_factory):
    from llmctl.infer.served import load_served_model
    from llmctl.infer.server import create_app

    log_path = tmp_path_factory.mktemp("ab") / "ab.jsonl"
    models = {name: load_served_model(name, tiny_checkpoint, max_batch=8) for name in ("A", "B")}
    log = CompletionLog(log_path)
    app = create_app(models, routes={"chatbot": [("A", 0.5), ("B", 0.5)]}, ab_log=log, max_concurrency=64)
    with running_server(app) as running:
        yield running.url, log_path


def test_route_is_sticky_per_user_and_feedback_lands_in_the_report(ab_server, llmctl):
    url, log_path = ab_server
    served: dict[str, set[str]] = defaultdict(set)
    ids: list[tuple[str, str]] = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for request in range(200):
            user = f"user-{request % 20}"
            body = {"model": "chatbot", "prompt": "The", "max_tokens": 1, "user": user}
            if request % 2:  # the header names the user when the body does not
                body.pop("user")
                response = client.post("/v1/completions", json=body, headers={"x-llmctl-user": user})
            else:
                response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            result = response.json()
            assert response.headers["x-llmctl-variant"] == result["model"]
            served[user].add(result["model"])
            ids.append((result["id"], result["model"], user))
        assert all(len(variants) == 1 for variants in served.values()), served
        users_on_a = sum(variants == {"A"} for variants in served.values())
        assert 3 <= users_on_a <= 17  # binomial(20, 0.5): within 3 sd

        rated = Counter()
        for index, (completion_id, variant, user) in enumerate(ids[:100]):
            score = "up" if index % 3 else 0.25
            response = client.post("/v1/feedback", json={"id": completion_id, "score": score, "user": user})
            assert response.status_code == 200 and response.json()["variant"] == variant
            rated[variant] += 1
        assert client.post("/v1/feedback", json={"id": "cmpl-nope", "score": 1}).status_code == 404
        first, _, owner = ids[0]
        for bad in (1.5, True, "1"):  # JSON true is no score of 1
            assert (
                client.post("/v1/feedback", json={"id": first, "score": bad, "user": owner}).status_code
                == 400
            )
        # another user cannot re-rate it (user-1's completion is not user-0's), nor can an anonymous client
        other = client.post("/v1/feedback", json={"id": first, "score": 0, "user": "user-1"})
        assert other.status_code == 403 and other.json()["error"]["param"] == "user"
        assert client.post("/v1/feedback", json={"id": first, "score": 0}).status_code == 403
        # its user may change their mind twice more (the latest counts), then the ratings stop
        by_header = {"x-llmctl-user": owner}
        codes = [
            client.post("/v1/feedback", json={"id": first, "score": 1}, headers=by_header).status_code
            for _ in range(3)
        ]
        assert codes == [200, 200, 429]

    records = read_log(log_path)
    assert not any("prompt" in record for record in records)  # no text without --log-prompts
    stats = variant_stats(records)
    assert {name: s.requests for name, s in stats.items()} == {
        "A": 10 * users_on_a,
        "B": 200 - 10 * users_on_a,
    }
    assert {name: len(s.scores) for name, s in stats.items()} == dict(rated)
    assert stats["A"].users == users_on_a and all(s.latencies and s.first_token for s in stats.values())

    result = llmctl("ab", "report", str(log_path), "--control", "A")
    assert result.returncode == 0, result.stderr
    for name in ("A", "B"):
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"│ {name} "))
        assert f"{rated[name]} (" in row and str(stats[name].requests) in row
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith(("B is better than A", "B is worse than A", "no difference")) and "B" in verdict


def ratings(variant: str, scores: list[float], start: int = 0) -> list[dict]:
    rows = []
    for index, score in enumerate(scores, start):
        rows.append(
            {"event": "completion", "id": f"{variant}{index}", "variant": variant, "latency_seconds": 0.1}
        )
        rows.append({"event": "feedback", "id": f"{variant}{index}", "variant": variant, "score": score})
    return rows


def test_a_known_effect_is_significant_and_no_effect_is_not():
    rng = random.Random(0)
    thumbs = lambda p, n: [float(rng.random() < p) for _ in range(n)]  # noqa: E731
    stats = variant_stats(ratings("A", thumbs(0.50, 2000)) + ratings("B", thumbs(0.56, 2000)))
    better = compare(stats["A"], stats["B"])
    assert better.significant and better.difference > 0 and better.test == "two-proportion z-test"
    assert better.verdict().startswith("B is better than A")

    stats = variant_stats(ratings("A", thumbs(0.5, 2000)) + ratings("B", thumbs(0.5, 2000)))
    same = compare(stats["A"], stats["B"])
    assert not same.significant and same.verdict().startswith("no difference")

    graded = lambda mean, n: [min(1.0, max(0.0, rng.gauss(mean, 0.2))) for _ in range(n)]  # noqa: E731
    stats = variant_stats(ratings("A", graded(0.60, 400)) + ratings("B", graded(0.55, 400)))
    worse = compare(stats["A"], stats["B"])
    assert worse.significant and worse.difference < 0 and worse.test == "Welch z-test"
    low, high = stats["A"].interval()
    assert low < stats["A"].mean < high and high - low < 0.05

    small = variant_stats(ratings("A", [1.0] * 20 + [0.0] * 20) + ratings("B", [1.0] * 24 + [0.0] * 16))
    undecided = compare(small["A"], small["B"])  # 0.5 against 0.6 on 40 ratings each: p = 0.37
    assert not undecided.significant and undecided.p_value == pytest.approx(0.37, abs=0.01)
    # n = (1.96 + 0.84)^2 (0.25 + 0.24) / 0.1^2 = 385 per variant for 80% power, 40 of them in hand
    assert undecided.more_per_variant == pytest.approx(345, abs=3)
    assert "about 345 more rated completions per variant" in undecided.verdict()


def test_the_log_keeps_ids_across_restarts_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "ab.jsonl"
    log = CompletionLog(path, log_prompts=True)
    log.completion({"id": "c1", "variant": "A"}, prompt="secret?", replies=["yes"])
    log.close()
    with path.open("a") as handle:
        handle.write('{"event": "completion", "id": "c2"')  # a crash mid-line
    reopened = CompletionLog(path)
    assert reopened.feedback("c1", 1.0) == "A"
    records = read_log(path)
    assert [r["event"] for r in records] == ["completion", "feedback"] and records[0]["prompt"] == "secret?"
    reopened.close()


def test_serve_and_ab_report_refuse_bad_input_in_one_line(tmp_path, llmctl):
    result = llmctl("ab", "report", str(tmp_path / "none.jsonl"))
    assert result.returncode == 2 and "is not a file" in result.stderr
    (tmp_path / "empty.jsonl").write_text(json.dumps({"event": "feedback", "id": "x", "score": 1}) + "\n")
    result = llmctl("ab", "report", str(tmp_path / "empty.jsonl"))
    assert result.returncode == 2 and "no served completions" in result.stderr
    result = llmctl("serve", "--log-prompts", "--port", "1")
    assert result.returncode == 2 and "--log-prompts needs --ab-log" in result.stderr
