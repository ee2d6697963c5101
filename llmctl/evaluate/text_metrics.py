"""Generation metrics through the libraries the field reports with: sacrebleu (BLEU, chrF), rouge-score."""

from __future__ import annotations

from llmctl.errors import UserError


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF, mean ROUGE-1/2/L F1 (stemmed), and exact match, all on a 0-100 scale."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise UserError(
            f"generation metrics need the eval extra ({error.name} is missing): pip install 'llmctl[eval]'"
        ) from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for key in rouge:
            rouge[key] += scores[key].fmeasure
    count = max(len(predictions), 1)
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
        **{key: 100 * value / count for key, value in rouge.items()},
        "exact_match": 100
        * sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
        / count,
    }
