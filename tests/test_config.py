import pytest

from recon import config
from recon.errors import UsageError


def test_every_preset_builds_and_validates():
    names = config.preset_names()
    assert {"default", "preview", "fast", "quality", "game", "tiny"} <= set(names)
    for n in names:
        cfg = config.build_config(n)
        assert cfg.preset == n


def test_preset_inherits_base():
    tiny, default = config.build_config("tiny"), config.build_config("default")
    assert tiny.fit.steps < default.fit.steps
    assert tiny.export.formats == default.export.formats  # not overridden: inherited


def test_set_overrides_are_typed():
    cfg = config.build_config("default", sets=["fit.steps=500", "export.formats=glb,gif", "views.elevation=10",
                                                "preprocess.face_box=1,2,3,4", "views.low_memory=true",
                                                "views.condition_dir=none"])
    assert cfg.fit.steps == 500
    assert cfg.export.formats == ("glb", "gif")
    assert cfg.views.elevation == 10.0
    assert cfg.preprocess.face_box == (1.0, 2.0, 3.0, 4.0)
    assert cfg.views.low_memory is True and cfg.views.condition_dir is None


def test_unknown_key_names_close_matches():
    with pytest.raises(UsageError) as e:
        config.build_config("default", sets=["fit.stepz=3"])
    assert "fit.stepz" in e.value.message and "fit.steps" in e.value.hint
    with pytest.raises(UsageError):
        config.build_config("default", sets=["nosuchsection.x=1"])


@pytest.mark.parametrize("item", ["fit.steps=abc", "fit.steps=1.5", "views.low_memory=maybe", "fit.steps", "=3"])
def test_bad_values_are_usage_errors(item):
    with pytest.raises(UsageError):
        config.build_config("default", sets=[item])


def test_validation_of_ranges_and_formats():
    with pytest.raises(UsageError, match="format"):
        config.build_config("default", sets=["export.formats=glb,fbx"])
    with pytest.raises(UsageError):
        config.build_config("default", sets=["views.num_views=2"])
    with pytest.raises(UsageError):
        config.build_config("default", sets=["export.lods=1,0"])


def test_unknown_preset_suggests():
    with pytest.raises(UsageError) as e:
        config.build_config("defualt")
    assert "default" in e.value.hint


def test_config_round_trips_through_dict():
    cfg = config.build_config("game", sets=["fit.steps=7"])
    assert config.from_dict(cfg.to_dict()) == cfg


def test_configs_are_frozen():
    cfg = config.build_config("default")
    with pytest.raises(Exception):
        cfg.fit.steps = 3
