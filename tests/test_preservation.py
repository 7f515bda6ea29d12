"""Identity and untouched factors (evaluation/preservation.py): the arithmetic on a table of known
changes, and the face embedder on random InceptionResnetV1 weights saved to a file (as CLIP is tested)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from evaluation.preservation import FaceEmbedder, identity_similarity, preservation_table, untouched_factors
from pipeline.errors import ConfigError, ModelLoadError


def table():
    """Two directions on four seeds: smile moves smile by +1 and hair by +-0.5 (cancelling in the mean);
    pc1 moves everything by 0.25 and flips the background of one face."""
    rows = []
    for seed in range(4):
        sign = 1 if seed % 2 else -1
        base = {"repeat": 0, "seed": seed, "o_smile": float(seed), "o_hair": 2.0 * seed, "o_background": 1.0}
        rows.append({**base, "direction": "smile", "family": "original", "d_smile": 1.0, "d_hair": 0.5 * sign,
                     "d_background": 0.0})
        rows.append({**base, "direction": "pc1", "family": "pca", "d_smile": 0.25, "d_hair": 0.25,
                     "d_background": 2.0 if seed == 0 else 0.0})
    return pd.DataFrame(rows)


def test_untouched_factors_count_each_face():
    t = table()
    out = untouched_factors(t, {"smile": "smile", "pc1": None}, {"smile": 1.0, "hair": 2.0}).set_index("direction")
    assert out.loc["smile", "untouched"] == pytest.approx(0.25)  # |+-0.5| / 2, though its mean change is 0
    assert out.loc["smile", "largest_attribute"] == "hair" and out.loc["smile", "background_changed"] == 0
    assert out.loc["pc1", "untouched"] == pytest.approx((0.25 + 0.125) / 2)
    assert out.loc["pc1", "largest_attribute"] == "smile" and out.loc["pc1", "background_changed"] == 0.25
    assert "identity" not in out
    # preservation_table: units from the unedited scores of the seeds, own attribute by name
    auto = preservation_table(t).set_index("direction")
    assert auto.loc["smile", "untouched"] == pytest.approx(0.5 / t.drop_duplicates("seed").o_hair.std(ddof=1))
    with_id = untouched_factors(t.assign(identity=0.5), {"smile": "smile"}, {})
    assert (with_id.identity == 0.5).all()


@pytest.mark.slow
def test_face_embedder_with_random_weights_from_a_file(tmp_path):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    net = InceptionResnetV1(pretrained=None, classify=True, num_classes=7).eval()  # a classifier head is dropped
    path = tmp_path / "facenet.pt"
    torch.save(net.state_dict(), path)
    emb = FaceEmbedder(path)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    e = emb(images)
    assert e.shape == (3, 512)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    # the same computation by hand: resize to 160, facenet's standardisation, the network without its head
    x = torch.nn.functional.interpolate(images, size=(160, 160), mode="bilinear", antialias=True, align_corners=False)
    net.classify = False
    with torch.no_grad():
        torch.testing.assert_close(e, net((x * 127.5) / 128.0), atol=1e-5, rtol=1e-4)
    sim = identity_similarity(emb, images, images.flip(0))
    assert sim[1] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(sim, (e * e.flip(0)).sum(1).numpy(), atol=1e-5)
    assert np.isnan(identity_similarity(None, images, images)).all()
    with pytest.raises(ConfigError):
        FaceEmbedder(tmp_path / "missing.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="not an InceptionResnetV1"):
        FaceEmbedder(tmp_path / "other.pt")
