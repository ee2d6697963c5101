"""Speculative decoding: greedy output is token-identical to the target alone, whatever the draft, and
sampled output follows the target's distribution exactly (the accept/reject rule)."""

from __future__ import annotations

import pytest
import torch
from conftest import decisive_model

from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.speculative import SpeculationStats, speculative_generate_ids
from llmctl.model import Transformer


def model(seed: int, **shape) -> Transformer:
    return decisive_model(seed, **({"vocab_size": 96, "n_kv_head": None, "max_seq_len": 40} | shape))


@pytest.mark.parametrize("lookahead", [1, 3, 6])
def test_greedy_with_a_draft_is_the_target_alone(lookahead):
    target = model(0)
    for draft in (model(1, d_model=32, n_layer=1), target):  # a poor draft and a perfect one
        for prompt, budget in (([1, 2, 3], 12), ([5], 30), ([7] * 30, 20)):  # the last meets the context
            # a repetition penalty counts, at each position, the proposals before it
            params = SamplingParams(max_new_tokens=budget, temperature=0.0, repetition_penalty=1.3)
            stats = SpeculationStats()
            got = list(speculative_generate_ids(target, draft, prompt, params, lookahead, stats))
            assert got == list(generate_ids(target, prompt, params))
            if draft is target and len(got) > lookahead:
                assert stats.acceptance_rate == 1.0 and stats.target_passes < len(got)


def test_a_stop_id_ends_speculative_output_where_the_target_would():
    target, draft = model(0), model(1, d_model=32, n_layer=1)
    free = list(generate_ids(target, [1, 2], SamplingParams(max_new_tokens=15, temperature=0.0)))
    stop = free[6]
    params = SamplingParams(max_new_tokens=15, temperature=0.0, stop_token_ids=(stop,))
    got = list(speculative_generate_ids(target, draft, [1, 2], params, lookahead=4))
    assert got == free[: free.index(stop) + 1]


def test_sampled_tokens_follow_the_targets_distribution():
    target = model(0, vocab_size=6)
    draft = model(5, vocab_size=6, d_model=32, n_layer=1)  # a different distribution: many refusals
    with torch.no_grad():
        target.lm_head.weight.div_(8)
        draft.lm_head.weight.div_(8)
    prompt = [1, 2, 3]
    with torch.inference_mode():
        expected = target(torch.tensor([prompt]))[0, -1].softmax(-1)
    counts = torch.zeros(6)
    stats = SpeculationStats()
    runs = 3000
    for seed in range(runs):
        params = SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed)
        first = next(iter(speculative_generate_ids(target, draft, prompt, params, lookahead=1, stats=stats)))
        counts[first] += 1
    assert 0.05 < stats.acceptance_rate < 0.95  # both branches of the rule ran
    assert (counts / runs - expected).abs().max() < 0.03, (counts / runs, expected)


def test_a_foreign_vocabulary_is_refused():
    target = model(0)
    with pytest.raises(ValueError, match="vocabulary"):
        list(speculative_generate_ids(target, model(1, vocab_size=50), [1], SamplingParams()))


def test_the_draft_and_the_verifying_pass_run_through_the_decode_step():
    """Speculative decoding's forwards go through `infer.decode`: a step installed as `compile_decode`
    installs the compiled one runs the draft's steps (one or two tokens) and the target's verifying pass
    (the proposals and one more), and the output is still the target's own."""
    from llmctl.infer import decode

    target, draft = (
        decisive_model(0, max_seq_len=64),
        decisive_model(7, d_model=32, n_layer=1, max_seq_len=64),
    )
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    alone = list(generate_ids(target, [1, 2, 3], greedy))
    widths: dict[str, set[int]] = {"target": set(), "draft": set()}

    def recording(model, ids, keys, values, positions, span):
        widths["target" if model is target else "draft"].add(ids.shape[1])
        return decode._rows_step(model, ids, keys, values, positions, span)

    decode.use_compiled_step(target, recording)
    decode.use_compiled_step(draft, recording)
    assert list(speculative_generate_ids(target, draft, [1, 2, 3], greedy, lookahead=3)) == alone
    assert widths["draft"] <= {1, 2} and 1 in widths["draft"]
    assert max(widths["target"]) == 4  # the newest token and three proposals, checked in one pass
