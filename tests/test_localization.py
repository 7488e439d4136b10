"""The attention-map sanity check on a really trained (reduced) tiny variant: relevancy puts
more mass inside the asked-about object's box than a uniform map would. Trains ~2 minutes."""
import statistics

import pytest

from lgemma.data.llava_json import turns
from lgemma.interpret import localization_score, relevancy_map
from lgemma.pipeline import ImageSource, get_config, load_variant, records, train_variant


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.delenv("LGEMMA_FAST", raising=False)
    mp.setenv("LGEMMA_HOME", str(tmp_path_factory.mktemp("home")))
    cfg = get_config("tiny", ["name=tiny-loc", "data.n_train=2000", "data.n_heldout=100", "data.n_compositional=20",
                              "train.stage0.clip_steps=100", "train.stage0.lm_steps=150",
                              "train.align.steps=100", "train.instruct.steps=300"])
    train_variant(cfg, progress=False, evaluate=False)
    yield load_variant(cfg.run_dir)
    mp.undo()


def test_relevancy_localizes_the_asked_object_on_color_questions(trained):
    model, tok, cfg = trained
    source = ImageSource(cfg, model.vision)
    recs = [r for r in records(cfg, "heldout") if r["question_type"] == "color" and r.get("box")][:30]
    scores = [localization_score(relevancy_map(model, tok, turns(r)[0][0], r["answer"], source.pixels(r)),
                                 r["box"], cfg.data.image_size) for r in recs]
    print(f"relevancy localization on {len(scores)} held-out color questions: mean {statistics.mean(scores):.2f}, "
          f"median {statistics.median(scores):.2f} (uniform = 1)")
    assert len(scores) >= 20 and statistics.mean(scores) > 1.0
