"""fewstep.data_config: what `validate` knows of the embedded digits without loading them equals the loaded set."""

import pytest

from fewstep.data import build_data
from fewstep.data_config import DataConfig, digits_summary


@pytest.mark.parametrize("update", [{}, {"channels": 3, "resolution": 16}, {"class_conditional": True, "limit": 5},
                                    {"resolution": 8, "flip": True}])
def test_digits_summary_equals_the_loaded_set(update):
    cfg = DataConfig(**update)
    loaded, known = build_data(cfg), digits_summary(cfg)
    assert known.shape == loaded.shape
    assert known.num_classes == loaded.num_classes == 10
    assert known.has_captions is loaded.has_captions is False


@pytest.mark.parametrize("update", [{"labels": "x.gz"}, {"images_key": "x"}, {"split": "test"}, {"cache": "off"},
                                    {"crop": "random"}, {"buckets": [[8, 8]]}])
def test_digits_summary_refuses_what_loading_refuses(update):
    cfg = DataConfig(**update)
    with pytest.raises(ValueError) as loaded:
        build_data(cfg)
    with pytest.raises(ValueError) as known:
        digits_summary(cfg)
    assert str(known.value) == str(loaded.value)


def test_only_loading_tells_for_other_sources_and_paired_prompts(tmp_path):
    assert digits_summary(DataConfig(source=str(tmp_path))) is None
    assert digits_summary(DataConfig(prompts=str(tmp_path / "p.txt"))) is None
