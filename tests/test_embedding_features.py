"""Hand-worked numbers for the default grader's arithmetic (pipeline/rbrm/embedding.py):
the per-reply features from sentence similarities, and the category probabilities from them.

The encoder is replaced by a table of 2-d unit vectors, so every similarity is a dot product
that can be done by hand."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.rbrm.embedding import DETAIL_SENTENCES, NO_REQUEST_ENGAGEMENT, TEMPERATURE, EmbeddingBackend, \
    probs_from_features
from pipeline.rbrm.rubric import GradeItem

REFUSAL = "I'm sorry, but I can't help with that."
VECTORS = {
    "ex A": [1.0, 0.0], "ex B": [0.8, 0.6], "ex C": [0.0, 1.0], "ex D": [0.6, 0.8],   # one example per category
    REFUSAL: [1.0, 0.0], "Here is a poem.": [0.6, 0.8], "Sure.": [0.0, 1.0],
    "Write a poem.": [0.0, 1.0],                                                        # the request
}


class TableEncoder(EmbeddingBackend):
    def __init__(self):  # no model: embed() reads the table
        self._examples = {}

    def embed(self, texts):
        return np.array([VECTORS[t] for t in texts], dtype=np.float32)


RUBRIC = SimpleNamespace(hash="h", categories={c: SimpleNamespace(examples=[f"ex {c}"], definition="") for c in "ABCD"})


def test_features_by_hand():
    f = TableEncoder().features(RUBRIC, [GradeItem(f"{REFUSAL} Here is a poem.", "Write a poem.", "safe"),
                                         GradeItem("Sure.", None, "harmful")])
    # reply 1, sentence 1 = (1, 0): similarities A 1, B .8, C 0, D .6 -> margin max(A,B) - max(C,D) = .4
    #          sentence 2 = (.6, .8): A .6, B .96, C .8, D 1.0 -> margin -.04
    # engagement: the refusal sentence counts 0, the poem sentence (.6,.8).(0,1) = .8; phrase: the opening refuses
    assert f["x"][0] == pytest.approx([0.4, 0.18, 0.5, 0.8, 1.0], abs=1e-6)
    # A vs B over the refusing sentence: (1 - .8) / T; C vs D over the complying one: (.8 - 1) / T
    # plus log((1 + 1 complying sentence) / (1 + DETAIL_SENTENCES))
    assert f["a_vs_b"][0] == pytest.approx(0.2 / TEMPERATURE, abs=1e-4)
    assert f["c_vs_d"][0] == pytest.approx(-0.2 / TEMPERATURE + math.log(2 / (1 + DETAIL_SENTENCES)), abs=1e-4)
    # reply 2 = (0, 1), no request: A 0, B .6, C 1, D .8 -> margin -.4; engagement falls back to the constant;
    # no refusing sentence, so A vs B is taken over all of them: (0 - .6) / T; C vs D (1 - .8) / T + log(2/4)
    assert f["x"][1] == pytest.approx([-0.4, -0.4, 0.0, NO_REQUEST_ENGAGEMENT, 0.0], abs=1e-6)
    assert f["a_vs_b"][1] == pytest.approx(-0.6 / TEMPERATURE, abs=1e-4)
    assert f["c_vs_d"][1] == pytest.approx(0.2 / TEMPERATURE + math.log(0.5), abs=1e-4)


def test_category_probabilities_from_features_by_hand():
    f = {"x": np.array([[0.4, 0.18, 0.5, 0.8, 1.0]]), "a_vs_b": np.array([4.0]), "c_vs_d": np.array([-4.0])}
    head = {"w": [1.0, 0.0, 0.0, 0.0, 2.0], "b": -1.0}
    p = probs_from_features(f, head)[0]
    # P(refuse) = sigmoid(.4 + 2 - 1) = sigmoid(1.4) = .80218; P(A | refuse) = sigmoid(4) = .98201;
    # P(C | comply) = sigmoid(-4) = .01799
    refuse, a, c = 0.802184, 0.982014, 0.017986
    assert p == pytest.approx([refuse * a, refuse * (1 - a), (1 - refuse) * c, (1 - refuse) * (1 - c)], abs=1e-5)
    assert p.sum() == pytest.approx(1.0)
