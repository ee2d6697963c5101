"""Generation: token-for-token agreement with transformers' generate (greedy, batched, beam search)."""

from __future__ import annotations

import pytest
import torch

from llmctl.infer.beam import BeamParams, beam_search
from llmctl.infer.decode import PromptTooLong, fit_prompt
from llmctl.infer.generate import generate_batch, generate_ids
from llmctl.infer.sampling import SamplingParams, filter_logits, greedy_ids, sample_next
from llmctl.model import ModelConfig, Transformer
from llmctl.model.hf_format import export_state_dict, write_model_files

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=96
    )
    ours = Transformer(config).eval()
    # sharpen the random model so greedy and beam choices are not near-ties
    with torch.no_grad():
        ours.lm_head.weight.mul_(8)
    path = tmp_path_factory.mktemp("gen")
    write_model_files(path, config, export_state_dict(ours))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


def hf_generate(theirs, prompt, **kwargs):
    ids = torch.tensor([prompt])
    out = theirs.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)
    return out[:, len(prompt) :].tolist()


PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 201, 202, 203, 17]]


def test_greedy_matches_transformers(models):
    ours, theirs = models
    for prompt in PROMPTS:
        mine = list(generate_ids(ours, prompt, SamplingParams(max_new_tokens=20, temperature=0.0)))
        (expected,) = hf_generate(theirs, prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)
        assert mine == expected


def test_batched_left_padded_greedy_matches_each_prompt_alone(models):
    ours, theirs = models
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    batched = generate_batch(ours, PROMPTS, greedy)
    alone = [list(generate_ids(ours, prompt, greedy)) for prompt in PROMPTS]
    assert batched == alone
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in PROMPTS])[:, None]).long()
    hf = theirs.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert hf[:, width:].tolist() == batched


def test_stop_ids_end_each_row_on_its_own(models):
    ours, _ = models
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    free = generate_batch(ours, PROMPTS, greedy)
    stop = free[0][3]
    stopped = generate_batch(
        ours, PROMPTS, SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=(stop,))
    )
    for full, cut in zip(free, stopped, strict=True):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert cut == expected


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_transformers(models, num_beams):
    ours, theirs = models
    for prompt in PROMPTS:
        params = BeamParams(num_beams=num_beams, max_new_tokens=12, num_return_sequences=num_beams)
        mine = beam_search(ours, prompt, params)
        expected = hf_generate(
            theirs,
            prompt,
            num_beams=num_beams,
            max_new_tokens=12,
            do_sample=False,
            num_return_sequences=num_beams,
            eos_token_id=None,
        )
        assert [h.ids for h in mine] == expected


def test_beam_search_with_stop_id_and_length_penalty_matches_transformers(models):
    ours, theirs = models
    prompt = PROMPTS[0]
    eos = list(generate_ids(ours, prompt, SamplingParams(max_new_tokens=5, temperature=0.0)))[2]
    ended_on_stop = []
    for penalty in (1.0, 0.5, 2.0):
        params = BeamParams(
            num_beams=3,
            max_new_tokens=10,
            length_penalty=penalty,
            num_return_sequences=3,
            stop_token_ids=(eos,),
        )
        mine = beam_search(ours, prompt, params)
        expected = hf_generate(
            theirs,
            prompt,
            num_beams=3,
            max_new_tokens=10,
            do_sample=False,
            num_return_sequences=3,
            eos_token_id=eos,
            length_penalty=penalty,
        )
        trimmed = [row[: row.index(eos) + 1] if eos in row else row for row in expected]  # HF pads after eos
        assert [h.ids for h in mine] == trimmed
        ended_on_stop.extend(h.ids[-1] == eos for h in mine)
    assert any(ended_on_stop)  # the stop id path was exercised


def test_diverse_beam_groups_differ(models):
    ours, _ = models
    plain = beam_search(ours, PROMPTS[1], BeamParams(num_beams=4, max_new_tokens=8, num_return_sequences=4))
    diverse = beam_search(
        ours,
        PROMPTS[1],
        BeamParams(
            num_beams=4, num_beam_groups=2, diversity_penalty=100.0, max_new_tokens=8, num_return_sequences=4
        ),
    )
    first_tokens = {h.ids[0] for h in diverse}
    assert len(first_tokens) >= 2
    assert [h.ids for h in diverse] != [h.ids for h in plain]


def test_n_samples_share_prefill_and_are_reproducible(models):
    ours, _ = models
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    first = generate_batch(ours, PROMPTS[:2], params, n=3)
    assert len(first) == 6 and first == generate_batch(ours, PROMPTS[:2], params, n=3)
    assert len({tuple(s) for s in first[:3]}) > 1  # different samples of the same prompt


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    keep = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw))).squeeze(0).tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False, False]
    probs = logits.softmax(-1)[0]
    assert keep(top_p=float(probs[0]) + 0.01) == [True, True, False, False, False]
    assert keep(min_p=0.3) == [True, True, False, False, False]
    penalised = sample_next(
        torch.tensor([[2.0, 1.9]]),
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        torch.tensor([[0]]),
    )
    assert penalised.item() == 1


def test_greedy_ids_are_torchs_argmax_first_index_on_ties_in_every_layout_and_dtype():
    torch.manual_seed(0)
    logits = torch.randn(8, 3, 8000)
    logits[2, -1, 7] = logits[2, -1, 4000] = 100.0  # a tie: the first index wins
    logits[5, -1, 11] = float("nan")  # NaN counts as the largest, as in torch
    for rows in (logits[:, -1], logits[:1, -1], logits[:, -1].contiguous(), logits[:, -1].double()):
        picks = greedy_ids(rows)
        assert picks.dtype == torch.long and picks.tolist() == rows.argmax(-1).tolist()
    assert greedy_ids(logits[:, -1])[2] == 7 and greedy_ids(logits[:, -1])[5] == 11
    halves = logits[:, -1].bfloat16()
    assert greedy_ids(halves).tolist() == halves.argmax(-1).tolist()


def test_prompt_longer_than_context_is_an_error_naming_both_lengths():
    with pytest.raises(PromptTooLong, match="100 tokens.*context is 64"):
        fit_prompt(list(range(100)), 64)
    assert fit_prompt(list(range(100)), 64, truncate_left=True) == list(range(37, 100))


def test_sampling_follows_the_distribution_and_never_picks_masked_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]]).clamp(min=1e-30)).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    picks = sample_next(logits, SamplingParams(temperature=1.0, top_k=3), generator=generator)
    frequencies = torch.bincount(picks, minlength=5).float() / len(picks)
    assert torch.allclose(frequencies[:3], torch.tensor([0.5, 0.3, 0.2]), atol=0.015)
    assert frequencies[3:].sum() == 0
