"""The run's settings are wired once: every label setting is in the params JSON and the resume check, every
settings field with a flag has exactly one ``diffcut label`` flag with the field's default and help."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace

import pytest

from diffcut.commands import label as label_command
from diffcut.job import resume, schema, settings, units
from diffcut.job.settings import DecodeSettings, LabelSettings, Pools, PoolSettings, SpeedSettings
from diffcut.job.storage import InputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    label_command.add_arguments(parser)
    return parser


def test_every_label_setting_is_in_the_params_and_the_resume_check(tmp_path):
    label = LabelSettings(vocabulary="voc")
    params = label.params()
    assert {f.name for f in fields(LabelSettings)} <= set(params)
    assert {"diffcut_version", "schema_version"} <= set(params)
    json.loads(schema.params_json(params))  # every value is JSON
    for f in fields(LabelSettings):
        stored = dict(params, **{f.name: "another value"})
        assert set(settings.changed_settings(stored, params)) == {f.name}


def test_the_naming_settings_appear_only_with_a_vocabulary():
    assert not {"vocabulary", "naming_model"} & set(LabelSettings().params())
    assert {"vocabulary", "naming_model"} <= set(LabelSettings(vocabulary="voc").params())


def test_the_resume_check_refuses_another_setting_and_names_it(tmp_path):
    label = LabelSettings(model="tiny-random")
    params = schema.params_json(label.params())
    row = schema.error_row("a", "a.png", "decode failed", params=params)
    output = str(tmp_path / "labels")
    units.put_durably(units.label_file(output, "u"), units.table_bytes(schema.rows_to_table([row])))
    units.write_record(
        output, units.UnitRecord("u", rows=1, ok=0, error=1, bytes=0, params=params, run_id="r", sources=["a.png"])
    )
    done, _ = resume.output_state(output, label.params())
    assert (done.units, set(done.sources)) == ({"u"}, {"a.png"})
    with pytest.raises(InputError, match=r"\(tau: 0.5 -> 0.3, timestep: 50 -> 10\)"):
        resume.output_state(output, replace(label, tau=0.3, timestep=10).params())


def test_a_setting_missing_from_an_older_output_counts_as_its_default():
    stored = {k: v for k, v in LabelSettings().params().items() if k != "vae_dtype"}
    assert settings.changed_settings(stored, LabelSettings().params()) == {}
    assert settings.changed_settings(stored, LabelSettings(vae_dtype="bfloat16").params()) == {
        "vae_dtype": ("auto", "bfloat16")
    }


def test_every_settings_field_has_one_flag_with_its_default_and_help():
    parser = _parser()
    actions = {option: action for action in parser._actions for option in action.option_strings}
    specs = list(settings.flags())
    assert len({spec.flag for spec in specs}) == len(specs)
    for spec in specs:
        action = actions[spec.flag]
        assert action.dest == spec.dest
        assert action.default == spec.default, spec.flag
        assert action.help == spec.help, spec.flag
    # Every field has its flag, except the ones fixed by the method (no flag) and ncut's GPUs.
    flagged = {(spec.owner, spec.name) for spec in specs}
    for key, cls in settings.SETTINGS.items():
        if cls is Pools:
            continue
        for f in fields(cls):
            assert ((key,), f.name) in flagged or (f.metadata["flag"] is None and not f.init), f.name
    for pool in fields(Pools):
        for f in fields(pool.default_factory()):
            assert (("pools", pool.name), f.name) in flagged or f.name in pool.metadata["without"], (pool.name, f.name)


def test_the_flags_build_the_settings_objects():
    args = _parser().parse_args(
        ["--input", "in", "--output", "out", "--tau", "0.3", "--ncut-pool-max", "4", "--batch-size", "auto"]
        + ["--decode-cpus", "0.5", "--naming-gpus", "0.25", "--vae-dtype", "bfloat16", "--device", "cpu"]
    )
    kwargs = settings.job_arguments(vars(args))
    assert kwargs["label"] == LabelSettings(tau=0.3, vae_dtype="bfloat16")
    assert kwargs["speed"] == SpeedSettings(batch_size="auto")
    assert kwargs["pools"] == Pools(
        decode=DecodeSettings(cpus=0.5), ncut=PoolSettings(max=4), naming=PoolSettings(gpus=0.25)
    )
    assert kwargs["device"] == "cpu" and kwargs["input"] == "in"
    assert settings.job_arguments({}) == {"label": LabelSettings(), "speed": SpeedSettings(), "pools": Pools()}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LabelSettings(tau=0), "--tau and --alpha must be positive"),
        (lambda: LabelSettings(resolution=100), "--resolution must be a positive multiple"),
        (lambda: LabelSettings(resize="crop"), "unknown --resize 'crop'"),
        (lambda: LabelSettings(mask_size="big"), "--mask-size must be"),
        (lambda: LabelSettings(vae_dtype="int8"), "--vae-dtype must be one of"),
        (lambda: LabelSettings(vocabulary="no-such-vocabulary-file.txt"), "no-such-vocabulary-file"),
        (lambda: SpeedSettings(attention="flash"), "--attention must be one of"),
        (lambda: SpeedSettings(batch_size="many"), "--batch-size must be a positive integer or auto"),
        (lambda: DecodeSettings(batch_size=0), "--decode-batch-size must be at least 1"),
        (lambda: Pools(ncut=PoolSettings(min=3, max=2)), r"--ncut-pool-min/-max must satisfy 1 <= min <= max"),
    ],
)
def test_settings_refuse_bad_values_with_the_flags_name(build, message):
    with pytest.raises(InputError, match=message):
        build()


def test_values_are_recorded_in_one_spelling():
    label = LabelSettings(tau=1, mask_size="64X48", resolution="64")
    assert (label.tau, label.mask_size, label.resolution) == (1.0, "64x48", 64)
    assert isinstance(label.params()["tau"], float)


def test_each_stage_setting_is_a_parameter_of_its_method_call():
    """A label setting marked for a stage reaches the method by its name: a new one needs no stage code."""
    import inspect

    from diffcut.method.features import FeatureExtractor
    from diffcut.method.segmenter import segment_features

    for stage, call in ((settings.FEATURES, FeatureExtractor.from_pretrained), (settings.SEGMENT, segment_features)):
        names = set(LabelSettings().options(stage))
        assert names and names <= set(inspect.signature(call).parameters), (stage, names)
