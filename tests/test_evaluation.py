from lgemma.evaluation import normalize, object_f1, pope_metrics, score


def test_pope_metrics_hand_computed():
    answers = ["yes", "yes", "no", "yes", "no", "no"]
    truths = ["yes", "no", "yes", "yes", "no", "no"]
    m = pope_metrics(answers, truths)          # tp=2 fp=1 fn=1 tn=2
    assert m["accuracy"] == 4 / 6 and m["precision"] == 2 / 3 and m["recall"] == 2 / 3
    assert abs(m["f1"] - 2 / 3) < 1e-12 and m["yes_ratio"] == 0.5
    always_yes = pope_metrics(["yes"] * 4, ["yes", "yes", "no", "no"])
    assert abs(always_yes["f1"] - 2 / 3) < 1e-12 and always_yes["yes_ratio"] == 1.0


def test_normalize_and_object_f1():
    assert normalize(" Red. ") == "red"
    assert object_f1("a large red circle and a small blue square.", "a small blue square and a large red circle.") == 1.0
    assert object_f1("a large red circle.", "a large red circle and a small blue square.") == 2 / 3


def test_score_splits_short_and_describe():
    recs = [{"question_type": "color", "answer": "red"}, {"question_type": "color", "answer": "blue"},
            {"question_type": "describe", "answer": "a small red circle."},
            {"question_type": "exist", "answer": "yes", "pope": "random"}]
    s = score(recs, ["red", "green", "a small red circle.", "no"])
    assert s["overall_accuracy"] == round(1 / 3, 4) and s["per_type"]["describe"] == 1.0
    assert s["pope"]["random"]["accuracy"] == 0.0 and s["describe_object_f1"] == 1.0


def test_a_chain_answer_is_scored_by_its_conclusion_and_gets_room_to_finish():
    recs = [{"question_type": "spatial", "answer": "left"}, {"question_type": "spatial", "answer": "above"},
            {"question_type": "spatial", "answer": "right"}]
    s = score(recs, ["circle 1 3, square 4 6, so left", "circle 1 3, square 1 6, so below", "right"])
    assert s["per_type"]["spatial"] == round(2 / 3, 4)
    # predict() asks for enough tokens: the longest chain of the tiny tokenizer's words fits
    from lgemma.evaluation import MAX_NEW_TOKENS, SHORT_MAX_NEW_TOKENS
    longest = "large yellow triangle 7 7, large purple triangle 7 7, so below"  # every word a token or two
    assert MAX_NEW_TOKENS["spatial"] >= len(longest.replace(",", " ,").split()) + 2 > SHORT_MAX_NEW_TOKENS
